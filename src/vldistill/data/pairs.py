"""Image-caption pairs: the one dataset type that trainers and evaluators read.

A :class:`PairDataset` holds :class:`Sample` s, each an image with one caption per language (parallel sentences) and
an optional class label. It checks every sample when it is built, decoding every image, so that a bad file fails
before training starts with a message naming the file, the row and the problem, rather than halfway through an
epoch. With ``skip_bad=True`` bad samples are dropped and counted instead.

Sources: :func:`load_manifest` reads a JSONL or CSV manifest, :func:`load_hf_dataset` a Hugging Face dataset (hub
name, local files or a dataset saved with ``save_to_disk``; it lives in :mod:`vldistill.data.hf` and is re-exported
here). :func:`collate_raw` batches the raw items; the model's own processor turns them into tensors later, so that
teacher and student never share preprocessing by accident.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

__all__ = ["DataError", "PairDataset", "Sample", "collate_raw", "load_hf_dataset", "load_manifest"]

DEFAULT_LANG = "en"
MANIFEST_COLUMNS = ("image", "caption", "lang", "id", "label")
_REQUIRED_COLUMNS = ("image", "caption")
_MANIFEST_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}
# Errors PIL raises for files it cannot read; anything else is a bug and should propagate.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
# Below this many images, or this many pixels per image, a thread pool costs more than it saves.
_PARALLEL_DECODE_MIN = 256
_PARALLEL_DECODE_MIN_PIXELS = 256 * 256


class DataError(ValueError):
    """Bad input data. The message names the file or row and the problem."""


@dataclass
class Sample:
    """One image with its captions.

    Attributes:
        image: image file path (absolute after loading), or a name such as ``"data.jsonl:train[3]"`` when the
            image is held in memory in ``data``.
        captions: language tag -> caption, e.g. ``{"en": "a red circle", "zh": "一个红色的圆形"}``.
        label: class index for zero-shot evaluation, -1 if none.
        data: the image itself when it lives in memory rather than in a file: encoded bytes or a PIL image.
            When set, ``image`` is only a name.
        origin: where the sample came from, e.g. ``"data/train.jsonl row 7"``; error messages start with it.
    """

    image: str
    captions: dict[str, str]
    label: int = -1
    data: bytes | Image.Image | None = field(default=None, repr=False, compare=False)
    origin: str = ""


def decode_image(sample: Sample) -> Image.Image:
    """Opens and fully decodes the image of a sample as 8-bit RGB (see :func:`to_rgb`).

    Raises:
        DataError: the file is missing or cannot be decoded; the message names the image but not the row.
    """
    if isinstance(sample.data, Image.Image):
        try:
            return to_rgb(sample.data)
        except _DECODE_ERRORS as err:
            raise DataError(f"image {sample.image!r} cannot be decoded ({type(err).__name__}: {err})") from err
    if sample.data is None and not os.path.isfile(sample.image):
        raise DataError(f"image {sample.image!r} not found")
    source = io.BytesIO(sample.data) if sample.data is not None else sample.image
    try:
        with Image.open(source) as img:
            # load() forces a full decode, so a truncated file fails here and not in the middle of an epoch.
            img.load()
            return to_rgb(img)
    except _DECODE_ERRORS as err:
        raise DataError(f"image {sample.image!r} cannot be decoded ({type(err).__name__}: {err})") from err


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any mode as the 8-bit RGB image a viewer shows.

    - EXIF orientation is applied (a phone photo stored sideways comes out upright).
    - High bit depth is scaled, not clipped: 16-bit grey (``I;16*``) by ``v * 255 / 65535``; 32-bit integer grey
      (``I``) the same when its values fit 16 bits, else from its own minimum and maximum; float grey (``F``) from
      [0, 1] when its values lie there, else from [0, 255], else from its minimum and maximum. (PIL's
      ``convert("RGB")`` clips these modes to 0 and 255: a 16-bit gradient would become two values.) 16-bit RGB PNGs
      are already reduced to 8 bits per channel by PIL's decoder.
    - Transparency (an alpha band, or a palette or grey image with a transparent colour) is composited onto white,
      as ``transformers``' ``convert_to_rgb`` does.
    - CMYK, YCbCr, LAB, palettes and the rest go through PIL's own conversion.
    """
    if image.getexif().get(0x0112, 1) != 1:  # ExifTags.Base.Orientation
        image = ImageOps.exif_transpose(image)
    if image.mode in (*_SIXTEEN_BIT, "I", "F"):
        image = Image.fromarray(_to_uint8(np.asarray(image), image.mode), "L")
    if "A" in image.getbands() or "a" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Grey values of a high-bit-depth mode scaled to 0..255 (see :func:`to_rgb`)."""
    a = values.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
    if mode in _SIXTEEN_BIT or (mode == "I" and lo >= 0 and hi <= 65535):
        low, high = 0.0, 65535.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        low, high = 0.0, 1.0
    elif mode == "F" and lo >= 0 and hi <= 255:
        low, high = 0.0, 255.0
    else:
        low, high = lo, hi if hi > lo else lo + 1.0
    return np.clip(np.rint((a - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)


def _caption_problem(sample: Sample, languages: Sequence[str] | None) -> str | None:
    """Returns what is wrong with the captions or label of a sample, or None."""
    if not isinstance(sample.captions, Mapping) or not sample.captions:
        return "no captions"
    for lang, text in sample.captions.items():
        if not isinstance(text, str):
            return f"caption for language {lang!r} is {type(text).__name__}, not a string"
        if not text.strip():
            return f"empty caption for language {lang!r}"
    for lang in languages or ():
        if lang not in sample.captions:
            return f"no caption for language {lang!r} (has: {', '.join(sample.captions)})"
    if not isinstance(sample.label, int) or isinstance(sample.label, bool) or sample.label < -1:
        return f"label {sample.label!r} is not a class index (an int >= 0, or -1 for none)"
    return None


def _common_languages(samples: Sequence[Sample], source: str) -> list[str]:
    """Languages that every sample has a caption in, in order of first appearance."""
    seen: dict[str, int] = {}
    for sample in samples:
        for lang in sample.captions:
            seen[lang] = seen.get(lang, 0) + 1
    common = [lang for lang, count in seen.items() if count == len(samples)]
    partial = {lang: count for lang, count in seen.items() if count < len(samples)}
    if not common:
        raise DataError(f"{source or 'dataset'}: no language has a caption in every sample (counts: {seen})")
    if partial:
        warnings.warn(
            f"{source or 'dataset'}: ignoring languages only some of the {len(samples)} samples have: {partial}; "
            f"pass languages=[...] to require them",
            stacklevel=3,
        )
    return common


class CheckedRows:
    """The bad-row bookkeeping shared by the datasets that check their samples up front (:class:`PairDataset`,
    :class:`~vldistill.data.tasks.TaskDataset`): where a sample came from, rejecting it (raise, or count it with
    ``skip_bad``), the refusal when none is left and the one-line summary."""

    samples: list[Any]
    source: str
    skipped: int
    skipped_reasons: list[str]
    total: int

    def _start_rows(self, source: str, total: int) -> None:
        self.source = source
        self.skipped = 0
        self.skipped_reasons = []
        self.total = total

    def _noun(self) -> str:
        return "samples"

    def _where(self, index: int, sample: Any) -> str:
        origin = getattr(sample, "origin", "")
        return origin or (f"{self.source} sample {index}" if self.source else f"sample {index}")

    def _reject(self, reason: str, skip_bad: bool) -> None:
        if not skip_bad:
            raise DataError(reason)
        self.skipped += 1
        self.skipped_reasons.append(reason)

    def _none_left(self) -> DataError:
        first = f" (first: {self.skipped_reasons[0]})" if self.skipped_reasons else ""
        return DataError(f"{self.source or 'dataset'}: no valid samples out of {self.total}{first}")

    def summary(self) -> str:
        """One line for logs, e.g. ``"skipped 3 bad samples of 100 (first: ...)"``."""
        name = f"{self.source}: " if self.source else ""
        if not self.skipped:
            return f"{name}{len(self)} {self._noun()}, none skipped"
        return f"{name}skipped {self.skipped} bad samples of {self.total} (first: {self.skipped_reasons[0]})"

    def __len__(self) -> int:
        return len(self.samples)


class PairDataset(CheckedRows, Dataset):
    """Image-caption pairs, checked up front.

    Every image is opened and fully decoded once at construction; every caption must be non-empty after stripping;
    with ``languages`` given, every sample must have a caption in each of them.

    Items are dicts ``{"index": i, "image": PIL RGB image, "captions": {lang: str}, "label": int}`` with captions
    in :attr:`languages` only. With ``preload`` the decoded images are kept and the same objects are returned on
    every access: transforms must not modify them in place (PIL's own transforms return new images).

    Attributes:
        samples: the kept samples, captions stripped.
        languages: the requested languages, or else those present in every sample.
        skipped: how many input samples were dropped as bad (``skip_bad=True`` only).
        skipped_reasons: one message per dropped sample, each naming the file or row and the problem.
        total: how many samples there were before dropping.
        source: name of where the samples came from, used in messages.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        languages: Sequence[str] | None = None,
        skip_bad: bool = False,
        preload: bool = False,
        source: str = "",
    ):
        """Checks the samples and optionally decodes and keeps their images.

        Args:
            samples: the samples; they are not modified.
            languages: language tags every sample must have a caption in; None accepts what the samples have.
            skip_bad: drop bad samples (and count them) instead of raising.
            preload: keep the decoded RGB images in memory; much faster epochs for small datasets.
            source: name of the origin (a file, a dataset), used in messages for samples without ``origin``.

        Raises:
            DataError: a sample is bad (without ``skip_bad``), or no sample is left.
        """
        self._start_rows(source, len(samples))
        self._rejected: list[int] = []  # the index of each dropped sample, in the order of skipped_reasons
        requested = _check_language_list(languages, source)
        kept: list[Sample] = []
        images: list[Image.Image] = []
        for i, (sample, result) in enumerate(zip(samples, self._decode_all(samples, preload), strict=True)):
            problem = _caption_problem(sample, requested) or (str(result) if isinstance(result, DataError) else None)
            if problem is not None:
                self._reject(f"{self._where(i, sample)}: {problem}", skip_bad)
                self._rejected.append(i)
                continue
            kept.append(replace(sample, captions={lang: text.strip() for lang, text in sample.captions.items()}))
            if preload:
                images.append(result)
        if not kept:
            raise self._none_left()
        self.samples = kept
        self.languages = requested if requested is not None else _common_languages(kept, source)
        self._images = images if preload else None

    @staticmethod
    def _decode_all(samples: Sequence[Sample], keep: bool) -> Iterator[Image.Image | DataError | None]:
        """Decodes every image in order, yielding the image (or None when not kept) or the DataError."""

        def one(sample: Sample, keep: bool = keep) -> Image.Image | DataError | None:
            try:
                img = decode_image(sample)
            except DataError as err:
                return err
            return img if keep else None

        if not samples:
            return
        first = one(samples[0], keep=True)
        yield first if keep or isinstance(first, DataError) else None
        # PIL releases the GIL while decoding, so threads pay off for large images (1.5x on 2 cores at 640x480),
        # but cost more than they save on thumbnails such as easy-vqa's; the first image tells which case this is.
        big = isinstance(first, Image.Image) and first.width * first.height >= _PARALLEL_DECODE_MIN_PIXELS
        workers = min(8, os.cpu_count() or 1)
        rest = samples[1:]
        if not big or len(rest) < _PARALLEL_DECODE_MIN or workers == 1:
            yield from map(one, rest)
            return
        with ThreadPoolExecutor(workers) as pool:
            yield from pool.map(one, rest)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = range(len(self.samples))[index]  # normalises negative indices and raises IndexError
        sample = self.samples[index]
        image = image_at(self, index, sample, decode_image)
        captions = {lang: sample.captions[lang] for lang in self.languages}
        return {"index": index, "image": image, "captions": captions, "label": sample.label}

    def __repr__(self) -> str:
        return f"PairDataset({len(self)} samples, languages={self.languages}, source={self.source!r})"


def image_at(dataset: Any, index: int, sample: Any, decode: Callable[[Any], Image.Image]) -> Image.Image:
    """Item ``index``'s image: the one decoded at construction, or decoded now; a file that changed since the check
    at construction fails naming the dataset's row. Shared by :class:`PairDataset` and the task datasets."""
    if dataset._images is not None:
        return dataset._images[index]
    try:
        return decode(sample)
    except DataError as err:
        raise DataError(f"{dataset._where(index, sample)}: {err}") from err


def _check_language_list(languages: Sequence[str] | None, source: str) -> list[str] | None:
    if languages is None:
        return None
    if isinstance(languages, str):  # "en" would otherwise be read as ["e", "n"]
        languages = [languages]
    requested = list(languages)
    if not requested or len(set(requested)) != len(requested) or not all(isinstance(x, str) for x in requested):
        raise DataError(f"{source or 'dataset'}: languages must be distinct language tags, got {languages!r}")
    return requested


def collate_raw(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batches :class:`PairDataset` items without touching the images (the model's processor does that).

    Returns:
        ``{"index": LongTensor[B], "images": list of PIL images, "captions": {lang: list of B str},
        "labels": LongTensor[B], "groups": {lang: LongTensor[B]}}``, where ``groups[l][i] == groups[l][j]``
        exactly when captions ``i`` and ``j`` of language ``l`` are the same string (ids 0..k-1 in order of first
        appearance). The contrastive loss needs these to treat identical captions in a batch as matches.
    """
    if not batch:
        raise ValueError("collate_raw got an empty batch")
    languages = list(batch[0]["captions"])
    for item in batch:
        if list(item["captions"]) != languages:
            raise ValueError(f"items in one batch have different languages: {languages} vs {list(item['captions'])}")
    captions = {lang: [item["captions"][lang] for item in batch] for lang in languages}
    return {
        "index": torch.tensor([item["index"] for item in batch], dtype=torch.long),
        "images": [item["image"] for item in batch],
        "captions": captions,
        "labels": torch.tensor([item["label"] for item in batch], dtype=torch.long),
        "groups": {lang: caption_groups(texts) for lang, texts in captions.items()},
    }


def caption_groups(texts: Sequence[str]) -> torch.Tensor:
    """Integer ids, equal exactly for equal strings, numbered 0..k-1 in order of first appearance."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(text, len(ids)) for text in texts], dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------
# Rows -> samples, shared by the manifest and Hugging Face loaders.


@dataclass
class _Row:
    """One caption of one image, as read from a file row or dataset row (or the problem with that row)."""

    where: str
    key: str | None = None  # the sample id; rows with the same key are parallel captions of one image
    image: str = ""
    data: bytes | Image.Image | None = None
    caption: str = ""
    lang: str = DEFAULT_LANG
    label: int = -1
    problem: str | None = None
    order: int = -1  # position among the rows read, so that problems are reported in file order


def _parse_label(value: Any) -> int:
    """Reads an optional label cell: empty means -1; otherwise an integer >= -1 (CSV gives strings)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return -1
    if isinstance(value, bool):
        raise DataError(f"label {value!r} is not an integer")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise DataError(f"label {value!r} is not an integer") from None
    if not isinstance(value, int) or value < -1:
        raise DataError(f"label {value!r} is not a class index (an int >= 0, or -1 for none)")
    return value


def _text_cell(record: Mapping[str, Any], column: str, *, required: bool) -> str | None:
    value = record.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise DataError(f"empty {column}" if value is not None else f"no {column}")
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and column == "id":
        return str(value)  # numeric ids are common in JSONL
    if not isinstance(value, str):
        raise DataError(f"{column} is {type(value).__name__} {value!r}, not a string")
    return value.strip()


def _group_rows(rows: Iterable[_Row]) -> tuple[list[Sample], list[tuple[str, int, int]], list[int]]:
    """Turns rows into samples: rows sharing a key are one sample with one caption per language.

    If a (key, language) pair repeats, the k-th caption of each language goes to the k-th sample of that key. A key
    with any bad row is dropped whole (a sample with half its captions would silently change the languages).

    Returns:
        The samples; for each dropped unit its reason, how many samples it would have made and the position of the
        row it names; and for each sample the position of its first row.
    """
    groups: dict[str, list[_Row]] = {}
    bad: list[tuple[str, int, int]] = []
    for order, row in enumerate(rows):
        row.order = order
        if row.key is None:  # the row is too broken to tell which sample it belongs to
            bad.append((f"{row.where}: {row.problem}", 1, order))
        else:
            groups.setdefault(row.key, []).append(row)
    samples: list[Sample] = []
    orders: list[int] = []
    for key, members in groups.items():
        _check_group_agrees(key, members)
        per_lang: dict[str, list[_Row]] = {}
        for row in members:
            per_lang.setdefault(row.lang, []).append(row)
        n_samples = max(len(lang_rows) for lang_rows in per_lang.values())
        broken = next((row for row in members if row.problem is not None), None)
        if broken is not None:
            extra = sum(row.problem is not None for row in members) - 1
            more = f" (and {extra} more bad rows with id {key!r})" if extra else ""
            bad.append((f"{broken.where}: {broken.problem}{more}", n_samples, broken.order))
            continue
        for k in range(n_samples):
            chosen = [lang_rows[k] for lang_rows in per_lang.values() if k < len(lang_rows)]
            first = chosen[0]
            captions = {row.lang: row.caption for row in chosen}
            samples.append(Sample(first.image, captions, first.label, data=first.data, origin=_origin(chosen)))
            orders.append(min(row.order for row in chosen))
    return samples, bad, orders


def _origin(rows: list[_Row]) -> str:
    """Names the rows of one sample: "f.jsonl row 3", or "f.jsonl rows 3, 4" for parallel captions on many rows."""
    wheres = list(dict.fromkeys(row.where for row in rows))
    if len(wheres) == 1:
        return wheres[0]
    source = wheres[0].rsplit(" row ", 1)[0]
    return f"{source} rows {', '.join(where.rsplit(' row ', 1)[-1] for where in wheres)}"


def _check_group_agrees(key: str, members: list[_Row]) -> None:
    """Marks rows whose image or label contradicts the first good row with the same id."""
    good = [row for row in members if row.problem is None]
    if not good:
        return
    ref = good[0]
    for row in good[1:]:
        if row.image != ref.image:
            row.problem = (
                f"image {row.image!r} differs from image {ref.image!r} of {ref.where} with the same id {key!r}"
            )
        elif row.label != ref.label:
            row.problem = f"label {row.label} differs from label {ref.label} of {ref.where} with the same id {key!r}"


def _build_dataset(
    rows: Iterable[_Row],
    source: str,
    languages: Sequence[str] | None,
    skip_bad: bool,
    preload: bool,
) -> PairDataset:
    samples, bad, orders = _group_rows(rows)
    bad.sort(key=lambda unit: unit[2])
    if bad and not skip_bad:
        raise DataError(bad[0][0])
    if not samples:
        first = f" (first: {bad[0][0]})" if bad else ""
        raise DataError(f"{source}: no valid samples{first}")
    dataset = PairDataset(samples, languages=languages, skip_bad=skip_bad, preload=preload, source=source)
    # Rows dropped while grouping count as skipped too; every reason is listed in file order, so the summary's
    # "first" is the first bad row of the file.
    dataset.skipped += sum(count for _, count, _ in bad)
    dataset.total += sum(count for _, count, _ in bad)
    own = [(orders[i], reason) for i, reason in zip(dataset._rejected, dataset.skipped_reasons, strict=True)]
    merged = sorted([(order, reason) for reason, _, order in bad] + own, key=lambda pair: pair[0])
    dataset.skipped_reasons = [reason for _, reason in merged]
    return dataset


# ---------------------------------------------------------------------------------------------------------------
# Manifests.


def load_manifest(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    languages: Sequence[str] | None = None,
    skip_bad: bool = False,
    preload: bool = False,
    image_root_only: bool = False,
) -> PairDataset:
    """Reads a JSONL or CSV manifest of image-caption pairs (format chosen by suffix: .jsonl/.ndjson, .csv, .tsv).

    Columns: ``image`` (path; relative paths resolve against ``image_root``, or else the manifest's directory),
    ``caption``, optional ``lang`` (default ``"en"``), optional ``id``, optional ``label`` (int). Rows sharing an
    ``id`` (default: the image path) are one sample with one caption per language; if an (id, lang) pair repeats,
    the k-th caption of each language goes to the k-th sample of that id. Rows are numbered as lines of the file,
    from 1 (the CSV header is row 1).

    Args:
        path: the manifest.
        image_root: directory that relative image paths are resolved against.
        languages: languages every sample must have a caption in; None keeps those that every sample has.
        skip_bad: drop bad samples and count them instead of raising.
        preload: keep decoded images in memory.
        image_root_only: refuse (as a bad row) any image path that resolves outside the image root (``..``, an
            absolute path, a symbolic link leading out): for manifests written by others. Off by default: a
            manifest may name any image the user can read.

    Raises:
        DataError: the file is missing or malformed, a required column is missing, or (without ``skip_bad``) a row
            is bad; the message names the file, the row and the problem.
    """
    path = Path(path)
    source = str(path)
    fmt = _MANIFEST_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{source}: unknown manifest format {path.suffix!r}; use one of {', '.join(_MANIFEST_FORMATS)}")
    if not path.is_file():
        raise DataError(f"manifest {source!r} not found")
    root = Path(image_root) if image_root is not None else path.parent
    records, columns = _read_jsonl(path) if fmt == "jsonl" else _read_csv(path, "\t" if fmt == "tsv" else ",")
    if not records:
        raise DataError(f"{source}: manifest has no rows")
    for column in _REQUIRED_COLUMNS:
        if column not in columns:
            found = ", ".join(repr(c) for c in columns) or "none"
            raise DataError(f"{source}: missing required column {column!r}; columns found: {found}")
    rows = (_manifest_row(record, f"{source} row {lineno}", root, image_root_only) for lineno, record in records)
    return _build_dataset(rows, source, languages, skip_bad, preload)


def resolve_image(root: str | os.PathLike, image: str, root_only: bool = False) -> str:
    """The absolute path of an image cell: relative to ``root``, ``~`` expanded.

    Raises:
        DataError: with ``root_only``, the path (symbolic links followed) lies outside ``root``.
    """
    path = os.path.abspath(Path(root) / Path(image).expanduser())
    if root_only:
        real, real_root = os.path.realpath(path), os.path.realpath(root)
        if os.path.commonpath([real, real_root]) != real_root:
            raise DataError(
                f"image {image!r} resolves to {real}, outside the image root {real_root} (data.image_root_only: true "
                f"refuses such paths)"
            )
    return path


def _manifest_row(record: Mapping[str, Any] | str, where: str, root: Path, root_only: bool = False) -> _Row:
    if isinstance(record, str):  # a row the reader could not parse; the string says why
        return _Row(where, problem=record)

    def locate(row: _Row) -> None:
        row.key = _text_cell(record, "id", required=False)
        image = _text_cell(record, "image", required=True)
        row.image = resolve_image(root, image, root_only)
        row.key = row.key if row.key is not None else row.image

    return _parse_row(record, where, locate)


def _parse_row(record: Mapping[str, Any], where: str, locate: Callable[[_Row], None]) -> _Row:
    """A manifest or dataset row: ``locate`` sets its key and image (the two sources differ there); the language,
    label and caption cells are read the same way for both. A bad cell becomes the row's ``problem``."""
    row = _Row(where)
    try:
        locate(row)
        row.lang = _text_cell(record, "lang", required=False) or DEFAULT_LANG
        row.label = _parse_label(record.get("label"))
        row.caption = _caption_cell(record, row.lang)
    except DataError as err:
        row.problem = str(err)
    return row


def _caption_cell(record: Mapping[str, Any], lang: str) -> str:
    if record.get("caption") is None:
        raise DataError(f"no caption for language {lang!r}")
    caption = _text_cell(record, "caption", required=False)
    if caption is None:
        raise DataError(f"empty caption for language {lang!r}")
    return caption


def _read_jsonl(path: Path) -> tuple[list[tuple[int, dict[str, Any] | str]], list[str]]:
    """Returns (line number, record or problem) pairs and the keys seen, in order of first appearance.

    Each line is decoded on its own, so a line that is not UTF-8 is a bad row (named, skipped with ``skip_bad``)
    rather than the end of the file; a byte-order mark before the first line is accepted, as in CSV."""
    records: list[tuple[int, dict[str, Any] | str]] = []
    columns: dict[str, None] = {}
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                records.append((lineno, _not_utf8(raw[err.start], f"at byte {err.start + 1} of the line")))
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                records.append((lineno, f"invalid JSON ({err.msg} at column {err.colno})"))
                continue
            if not isinstance(record, dict):
                records.append((lineno, f"expected a JSON object, got {type(record).__name__}"))
                continue
            columns.update(dict.fromkeys(record))
            records.append((lineno, record))
    return records, list(columns)


def _read_csv(path: Path, delimiter: str) -> tuple[list[tuple[int, dict[str, Any] | str]], list[str]]:
    """Returns (line number, record or problem) pairs and the header's columns. A row with bytes that are not UTF-8
    is a bad row naming the column and the byte (read with ``surrogateescape``, which keeps them recognisable)."""
    records: list[tuple[int, dict[str, Any] | str]] = []
    # utf-8-sig: spreadsheet programs often write a byte-order mark that would otherwise stick to the first column.
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = [c.strip() for c in reader.fieldnames or []]
        for i, column in enumerate(columns):
            bad = _escaped_byte(column)
            if bad is not None:
                raise DataError(f"{path} row 1 (the header): {_not_utf8(bad[0], f'in column {i + 1}')}")
        reader.fieldnames = columns
        for record in reader:
            lineno = reader.line_num  # the record's last line: the same as its first unless a quoted cell spans lines
            bad_cells = [(col, _escaped_byte(v)) for col, v in record.items() if isinstance(v, str)]
            bad_cells = [(col, bad) for col, bad in bad_cells if bad is not None]
            if bad_cells:
                column, (byte, position) = bad_cells[0]
                records.append((lineno, _not_utf8(byte, f"at character {position} of column {column!r}")))
            elif None in record:  # DictReader files surplus cells under the key None
                records.append((lineno, f"{len(columns) + len(record[None])} cells but the header has {len(columns)}"))
            elif any(value is not None and value.strip() for value in record.values()):  # skip blank lines
                records.append((lineno, record))
    return records, columns


def _not_utf8(byte: int, where: str) -> str:
    return f"not UTF-8 text (byte 0x{byte:02x} {where}); save the file as UTF-8"


def _escaped_byte(text: str) -> tuple[int, int] | None:
    """The first byte ``surrogateescape`` kept in ``text`` (it was not UTF-8) and its position from 1, or None."""
    for i, ch in enumerate(text):
        if "\udc80" <= ch <= "\udcff":
            return ord(ch) - 0xDC00, i + 1
    return None


# load_hf_dataset lives in vldistill.data.hf, which builds on this module: imported last, after everything it takes
# from here is defined, so that `from vldistill.data.pairs import load_hf_dataset` keeps working.
from vldistill.data.hf import load_hf_dataset  # noqa: E402
