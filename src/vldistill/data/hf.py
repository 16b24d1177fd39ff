"""Image-caption pairs from Hugging Face datasets: :func:`load_hf_dataset` (a hub name, a builder such as ``json``
or ``imagefolder`` on local files, or a dataset saved with ``save_to_disk``) and the helpers that open a dataset,
map its columns and read its image cells, which :mod:`vldistill.data.task_loaders` reuses for task samples.

Rows become samples exactly as manifest rows do (:mod:`vldistill.data.pairs`); ``load_hf_dataset`` is re-exported
there. :class:`HfStream` streams a dataset for training instead (``data.streaming: true``; a ``datasets``
``IterableDataset``, ``load_dataset(..., streaming=True)``), at constant memory: see :mod:`vldistill.data.streaming`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from vldistill.data.pairs import (
    _REQUIRED_COLUMNS,
    DataError,
    PairDataset,
    Sample,
    _build_dataset,
    _parse_row,
    _Row,
    decode_image,
    resolve_image,
)
from vldistill.data.streaming import ShardStream

_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # a directory written by save_to_disk

# Column names tried, in order, when `load_hf_dataset` is given no mapping for a key.
_HF_DEFAULT_COLUMNS = {
    "image": ("image", "img", "image_path", "file_name"),
    "caption": ("caption", "text", "sentence"),
    "lang": ("lang", "language"),
    "label": ("label",),
    "id": ("id",),
}


def load_hf_dataset(
    name_or_path: str | os.PathLike,
    split: str | None = "train",
    columns: Mapping[str, str | None] | None = None,
    languages: Sequence[str] | None = None,
    skip_bad: bool = False,
    preload: bool = False,
    image_root: str | os.PathLike | None = None,
    image_root_only: bool = False,
    **load_kwargs: Any,
) -> PairDataset:
    """Reads image-caption pairs from a Hugging Face dataset.

    A directory holding a dataset saved with ``save_to_disk`` is opened with ``datasets.load_from_disk``; anything
    else goes to ``datasets.load_dataset(name_or_path, split=split, **load_kwargs)``, e.g.
    ``load_hf_dataset("json", data_files="train.jsonl")`` or ``load_hf_dataset("imagefolder", data_dir=...)``.

    Column mapping keys: ``image``, ``caption``, ``lang``, ``label``, ``id``, or per-language caption columns
    ``caption_<lang>`` (e.g. ``{"caption_en": "en_text", "caption_zh": "zh_text"}``) instead of ``caption``. Keys
    left out are looked for under common names (image: image/img/image_path/file_name; caption:
    caption/text/sentence; lang: lang/language; label; id); map a key to None to ignore a column. Rows are grouped
    into samples as in :func:`load_manifest` (default id: the image path, or the row for in-memory images).

    The image column may hold paths or images (the ``datasets.Image`` feature, or ``{"bytes", "path"}`` dicts).
    Images stored in the dataset stay in memory as encoded bytes; such a sample's ``image`` is a name like
    ``"train.jsonl:train[3]"``.

    Args:
        name_or_path: hub name, builder name ("json", "csv", "imagefolder", ...) or a saved dataset directory.
        split: which split to read.
        columns: key -> column name mapping, see above.
        languages: languages every sample must have a caption in.
        skip_bad: drop bad samples and count them instead of raising.
        preload: keep decoded images in memory.
        image_root: directory that relative image paths are resolved against; default: the directory of
            ``data_files`` when it is one local file, else the saved dataset's directory, else the working directory.
        image_root_only: refuse (as a bad row) an image path that resolves outside the image root; images stored
            in the dataset are always accepted.
        **load_kwargs: passed to ``datasets.load_dataset``.

    Raises:
        DataError: a mapped column is missing (the message lists the available columns), the split does not exist,
            or (without ``skip_bad``) a row is bad.
    """
    dataset = _open_hf(name_or_path, split, load_kwargs)
    source = _hf_source(name_or_path, split, load_kwargs)
    mapping = _resolve_columns(dataset.column_names, columns, source)
    dataset = _undecoded_images(dataset, mapping["image"])
    root = Path(image_root) if image_root is not None else _hf_image_root(name_or_path, load_kwargs)
    table = dataset.select_columns(sorted(set(mapping.values()))).to_dict()
    rows = _hf_rows(table, mapping, source, root, image_root_only)
    return _build_dataset(rows, source, languages, skip_bad, preload)


def _open_hf(name_or_path: str | os.PathLike, split: str | None, load_kwargs: dict[str, Any]) -> Any:
    import datasets  # imported here: it takes about a second and manifests do not need it

    path = Path(name_or_path)
    if path.is_dir() and any((path / marker).is_file() for marker in _SAVED_MARKERS):
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise DataError(f"{path}: no split {split!r}; splits: {', '.join(dataset)}")
            dataset = dataset[split]
    else:
        dataset = datasets.load_dataset(str(name_or_path), split=split, **load_kwargs)
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"{name_or_path}: pass split=, one of {', '.join(dataset)}")
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(f"{name_or_path}: only map-style datasets are supported, got {type(dataset).__name__}")
    return dataset


def _hf_source(name_or_path: str | os.PathLike, split: str | None, load_kwargs: Mapping[str, Any]) -> str:
    """A short name for messages: the data file for builder-style loads, else the dataset name."""
    data_files = load_kwargs.get("data_files")
    name = Path(data_files).name if isinstance(data_files, str | os.PathLike) else str(name_or_path)
    return f"{name}:{split}" if split else name


def _hf_image_root(name_or_path: str | os.PathLike, load_kwargs: Mapping[str, Any]) -> Path:
    data_files = load_kwargs.get("data_files")
    if isinstance(data_files, str | os.PathLike) and Path(data_files).is_file():
        return Path(data_files).parent
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    return Path.cwd()


def _resolve_columns(available: list[str], columns: Mapping[str, str | None] | None, source: str) -> dict[str, str]:
    """Maps our keys to the dataset's columns, checking that every mapped column exists."""
    columns = dict(columns or {})
    allowed = [*_HF_DEFAULT_COLUMNS, "caption_<lang>"]
    for key in columns:
        if key not in _HF_DEFAULT_COLUMNS and not (key.startswith("caption_") and len(key) > len("caption_")):
            raise DataError(f"{source}: unknown column key {key!r}; allowed keys: {', '.join(allowed)}")
    per_lang = {key: col for key, col in columns.items() if key.startswith("caption_") and col is not None}
    if per_lang and (columns.get("caption") or columns.get("lang")):
        raise DataError(
            f"{source}: map either 'caption' (with an optional 'lang') or 'caption_<lang>' columns, not both"
        )
    mapping: dict[str, str] = {}
    for key, col in columns.items():
        if col is None:
            continue
        if col not in available:
            raise DataError(f"{source}: column {col!r} (mapped as {key!r}) not found; available columns: {available}")
        mapping[key] = col
    skip = {key for key, col in columns.items() if col is None} | ({"caption", "lang"} if per_lang else set())
    for key, candidates in _HF_DEFAULT_COLUMNS.items():
        if key in mapping or key in skip:
            continue
        found = next((c for c in candidates if c in available), None)
        if found is not None:
            mapping[key] = found
        elif key in _REQUIRED_COLUMNS:
            raise DataError(
                f"{source}: no {key} column (looked for {', '.join(candidates)}); available columns: {available}; "
                f"map one with columns={{{key!r}: ...}}"
            )
    return mapping


def _undecoded_images(dataset: Any, column: str) -> Any:
    """Switches an Image feature to encoded bytes: cheaper to read, and lets PairDataset check the decoding."""
    import datasets

    if isinstance(dataset.features.get(column), datasets.Image):
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def _hf_rows(
    table: Mapping[str, list[Any]], mapping: Mapping[str, str], source: str, root: Path, root_only: bool = False
) -> Iterator[_Row]:
    per_lang = {key.removeprefix("caption_"): col for key, col in mapping.items() if key.startswith("caption_")}
    n_rows = len(table[mapping["image"]])
    for i in range(n_rows):
        record = {key: table[col][i] for key, col in mapping.items()}
        where = f"{source} row {i}"
        if per_lang:
            for lang, col in per_lang.items():
                record_lang = {**record, "lang": lang, "caption": table[col][i]}
                yield _hf_row(record_lang, where, f"{source}[{i}]", root, root_only)
        else:
            yield _hf_row(record, where, f"{source}[{i}]", root, root_only)


def _hf_row(record: Mapping[str, Any], where: str, name: str, root: Path, root_only: bool = False) -> _Row:
    def locate(row: _Row) -> None:
        key = record.get("id")
        row.key = None if key is None or key == "" else str(key)
        row.image, row.data = _hf_image(record.get("image"), name, root, root_only)
        if row.key is None:
            row.key = row.image if row.data is None else f"row:{name}"

    return _parse_row(record, where, locate)


def _hf_image(value: Any, name: str, root: Path, root_only: bool = False) -> tuple[str, bytes | Image.Image | None]:
    """Returns (path or name, in-memory image or None) for a cell of the image column."""
    if isinstance(value, Image.Image):
        return name, value
    if isinstance(value, Mapping):
        if value.get("bytes"):
            return name, value["bytes"]
        value = value.get("path")
    if isinstance(value, str | os.PathLike) and str(value).strip():
        return resolve_image(root, str(value), root_only), None
    raise DataError(f"no image (got {type(value).__name__} {value!r:.60})")


class HfStream(ShardStream):
    """Image-caption pairs streamed from a Hugging Face dataset (a ``datasets.IterableDataset``) at constant memory,
    split over processes and DataLoader workers by the dataset's own shards (its data files; see
    :mod:`vldistill.data.streaming`). One row is one sample: its captions come from ``caption_<lang>`` columns, or
    from the ``caption`` column in the first of ``languages`` (a ``lang`` column, when mapped, must agree). Items are
    ``{"index", "key", "image", "captions", "label"}``; ``key`` is ``SPLIT[shard]#position``.

    A saved dataset directory (``save_to_disk``) is opened with ``load_from_disk`` and streamed from its Arrow files
    (``to_iterable_dataset``, one shard per file); anything else with ``load_dataset(..., streaming=True)``.

    The per-shard sample counts of a stream are not known without reading it: a sample's ``index`` is then
    ``shard * 2**40 + position``. A teacher cache built from the stream (``vldistill cache`` with ``data.streaming:
    true``, which counts every shard once) stores the counts; a stream training from that cache adopts them
    (:meth:`adopt_counts`), so its ``index`` is the sample's row in the shards' order, the cache's row. Opening the
    cache then hashes every row once (:meth:`row_digests`, no image decoded), which also checks the counts: a
    streamed ``hf:`` dataset has no cheap shard fingerprint as tar shards have.

    Args:
        name_or_path, split, columns, image_root, image_root_only, **load_kwargs: as :func:`load_hf_dataset`.
        languages: the caption languages every sample needs.
        shuffle_buffer: samples each worker shuffles within (``data.shuffle_buffer``).
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike,
        split: str | None = "train",
        columns: Mapping[str, str | None] | None = None,
        languages: Sequence[str] | None = None,
        shuffle_buffer: int = 1000,
        image_root: str | os.PathLike | None = None,
        image_root_only: bool = False,
        **load_kwargs: Any,
    ):
        import datasets

        super().__init__(shuffle_buffer)
        self.source = _hf_source(name_or_path, split, load_kwargs)
        path = Path(name_or_path)
        if path.is_dir() and any((path / m).is_file() for m in _SAVED_MARKERS):
            saved = _open_hf(name_or_path, split, load_kwargs)
            dataset = saved.to_iterable_dataset(num_shards=max(1, len(saved.cache_files)))
        else:
            try:
                dataset = datasets.load_dataset(str(name_or_path), split=split, streaming=True, **load_kwargs)
            except ValueError as err:  # e.g. an unknown split
                raise DataError(f"{self.source}: {err}") from None
            if isinstance(dataset, datasets.IterableDatasetDict):
                raise DataError(f"{name_or_path}: pass split=, one of {', '.join(dataset)}")
        available = list(dataset.column_names or next(iter(dataset)).keys())
        self.mapping = _resolve_columns(available, columns, self.source)
        if isinstance((dataset.features or {}).get(self.mapping["image"]), datasets.Image):
            dataset = dataset.cast_column(self.mapping["image"], datasets.Image(decode=False))
        self.dataset = dataset.select_columns(sorted(set(self.mapping.values())))
        per_lang = [k.removeprefix("caption_") for k in self.mapping if k.startswith("caption_")]
        self.languages = per_lang or list(languages or ["en"])[:1]
        missing = [lang for lang in languages or [] if lang not in self.languages]
        if missing:
            raise DataError(f"{self.source}: no captions in {missing} (it streams captions in {self.languages})")
        self.root = Path(image_root) if image_root is not None else _hf_image_root(name_or_path, load_kwargs)
        self.root_only = image_root_only
        self.split = split or ""
        self._counts: list[int | None] = [None] * self.n_shards

    @property
    def n_shards(self) -> int:
        return self.dataset.num_shards

    def shard_samples(self, shard: int) -> Iterator[dict[str, Any]]:
        yield from self.dataset.shard(num_shards=self.n_shards, index=shard, contiguous=True)

    def decode(self, raw: dict[str, Any], shard: int, position: int) -> dict[str, Any]:
        name = f"{self.source}[{shard}]#{position}"
        record = {key: raw[col] for key, col in self.mapping.items()}
        try:
            image_name, data = _hf_image(record.get("image"), name, self.root, self.root_only)
            image = decode_image(Sample(image_name, {}, data=data))
            captions = {}
            for lang in self.languages:
                text = record.get(f"caption_{lang}", record.get("caption"))
                if not isinstance(text, str) or not text.strip():
                    raise DataError(f"no caption in {lang!r} (got {text!r:.60})")
                captions[lang] = text.strip()
            if "lang" in record and record["lang"] not in (None, "", self.languages[0]):
                raise DataError(f"lang {record['lang']!r}: this stream reads captions in {self.languages[0]!r}")
            label = record.get("label")
            label = label if isinstance(label, int) and not isinstance(label, bool) and label >= -1 else -1
        except DataError as err:
            raise DataError(f"{name} (shard {shard}, row {position} of the shard): {err}") from None
        return {"key": name, "image": image, "captions": captions, "label": label}

    def captions(self, languages: Sequence[str], limit: int) -> list[str]:
        """The first ``limit`` captions in the shards' order (a tokenizer's corpus), no image decoded."""
        out: list[str] = []
        for shard in range(self.n_shards):
            for raw in self.shard_samples(shard):
                if len(out) >= limit:
                    return out
                record = {key: raw[col] for key, col in self.mapping.items()}
                out += [
                    str(record.get(f"caption_{lang}", record.get("caption")) or "")
                    for lang in self.languages
                    if lang in languages
                ]
        return out

    def shard_counts(self) -> list[int] | None:
        """Samples per shard when every count is known (adopted from a cache, or counted), else ``None``."""
        return None if None in self._counts else list(self._counts)  # type: ignore[arg-type]

    def count_shards(self) -> list[int]:
        """Samples per shard, counting the unknown ones by reading them once (no image decoded)."""
        for shard, count in enumerate(self._counts):
            if count is None:
                self._counts[shard] = sum(1 for _ in self.shard_samples(shard))
        return list(self._counts)  # type: ignore[arg-type]

    def adopt_counts(self, known: Sequence[dict[str, Any]] | None) -> int:
        """Take the per-shard counts a teacher cache built from this stream stores (its manifest's
        ``source_shards``: ``{"shard", "rows"}`` per shard) when it lists as many shards as the stream has; they are
        checked against the data when the cache is opened (:meth:`row_digests`). Returns how many were taken."""
        entries = [k for k in known or [] if "shard" in k and "rows" in k]
        if len(entries) != self.n_shards or [k["shard"] for k in entries] != list(range(self.n_shards)):
            return 0
        self._counts = [int(k["rows"]) for k in entries]
        self.__dict__.pop("_offsets", None)
        return len(entries)

    def raw_digest(self, raw: dict[str, Any], fields: Sequence[str]) -> bytes:
        """The row digest :func:`vldistill.cache.sample_digest` gives the same row read map-style (``hf:`` with
        ``data.streaming: false``): the image's encoded bytes (or its file's), then the caption per field."""
        from vldistill.cache.fingerprint import sample_digest  # the cache's own hash; imported when a cache asks

        record = {key: raw[col] for key, col in self.mapping.items()}
        name, data = _hf_image(record.get("image"), f"{self.source}", self.root, self.root_only)
        captions = {lang: str(record.get(f"caption_{lang}", record.get("caption")) or "").strip() for lang in fields}
        return sample_digest(Sample(name, captions, data=data), fields)

    def __len__(self) -> int:
        """The number of samples: from the shard counts when known, else the dataset's split information, else by
        reading it once."""
        counts = self.shard_counts()
        if counts is not None:
            return sum(counts)
        info = getattr(self.dataset, "info", None)
        splits = getattr(info, "splits", None) or {}
        if self.split in splits and splits[self.split].num_examples:
            return int(splits[self.split].num_examples)
        return sum(1 for shard in range(self.n_shards) for _ in self.shard_samples(shard))  # counts kept unknown

    def __repr__(self) -> str:
        return f"HfStream({self.n_shards} shards, source={self.source!r}, shuffle_buffer={self.shuffle_buffer})"
