"""Image-caption pairs from Hugging Face datasets: :func:`load_hf_dataset` (a hub name, a builder such as ``json``
or ``imagefolder`` on local files, or a dataset saved with ``save_to_disk``) and the helpers that open a dataset,
map its columns and read its image cells, which :mod:`vldistill.data.task_loaders` reuses for task samples.

Rows become samples exactly as manifest rows do (:mod:`vldistill.data.pairs`); ``load_hf_dataset`` is re-exported
there.
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
    _build_dataset,
    _parse_row,
    _Row,
    resolve_image,
)

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
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if path.is_dir() and any((path / marker).is_file() for marker in markers):
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
