"""Task samples from their sources: :func:`load_task_manifest` reads a JSONL manifest with one item per row,
:func:`load_task_hf` a Hugging Face dataset (opened as :func:`~vldistill.data.hf.load_hf_dataset` opens one). Both
read rows into the samples of :mod:`vldistill.data.tasks` the same way and build a checked
:class:`~vldistill.data.tasks.TaskDataset`; both are re-exported from :mod:`vldistill.data.tasks`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from vldistill.data.hf import (
    _HF_DEFAULT_COLUMNS,
    _hf_image,
    _hf_image_root,
    _hf_source,
    _open_hf,
    _undecoded_images,
)
from vldistill.data.pairs import DataError, _read_jsonl, resolve_image
from vldistill.data.tasks import (
    _LABELS_EXPECTED,
    DEFAULT_QUESTION_TYPE,
    ENTAILMENT_LABELS,
    ChoiceSample,
    EntailmentSample,
    TaskDataset,
    TaskSample,
    VQASample,
    _check_kind,
    _Rejected,
)

__all__ = ["load_task_hf", "load_task_manifest"]

_MANIFEST_SUFFIXES = (".jsonl", ".ndjson")
# Our keys per kind -> dataset column names tried, in order, when `load_task_hf` is given no mapping for a key.
_COMMON_COLUMNS = {"image": _HF_DEFAULT_COLUMNS["image"], "id": ("id",), "attributes": ("attributes",)}
_KIND_COLUMNS: dict[str, dict[str, tuple[str, ...]]] = {
    "vqa": {
        "question": ("question",),
        "answers": ("answers",),
        "answer": ("answer",),
        "question_type": ("question_type",),
    },
    "entailment": {"hypothesis": ("hypothesis",), "label": ("label",)},
    "multiple_choice": {
        "question": ("question",),
        "candidates": ("candidates", "choices", "options"),
        "answer": ("answer", "answer_index"),
        "rationales": ("rationales",),
        "rationale": ("rationale", "rationale_index"),
    },
}
# Required columns per kind; a tuple means "one of these".
_REQUIRED: dict[str, tuple[str | tuple[str, ...], ...]] = {
    "vqa": ("image", "question", ("answers", "answer")),
    "entailment": ("image", "hypothesis", "label"),
    "multiple_choice": ("image", "question", "candidates", "answer"),
}


# ---------------------------------------------------------------------------------------------------------------
# Rows -> samples, shared by the manifest and Hugging Face loaders.


def _cell_text(record: Mapping[str, Any], column: str, *, required: bool) -> str | None:
    """A text cell; surrounding whitespace is kept for the dataset to strip, emptiness for it to report."""
    value = record.get(column)
    if value is None:
        if required:
            raise DataError(f"no {column} (expected a non-empty string)")
        return None
    if not isinstance(value, str):
        raise DataError(f"{column} is {type(value).__name__} {value!r:.60} (expected a string)")
    return value


def _cell_texts(record: Mapping[str, Any], column: str, *, required: bool) -> list[str]:
    value = record.get(column)
    if value is None:
        if required:
            raise DataError(f"no {column} (expected a list of strings)")
        return []
    if not isinstance(value, list | tuple):
        raise DataError(f"{column} is {type(value).__name__} {value!r:.60} (expected a list of strings)")
    return list(value)


def _cell_index(record: Mapping[str, Any], column: str, what: str, *, required: bool) -> int:
    value = record.get(column)
    if value is None:
        if required:
            raise DataError(f"no {column} (expected an index into the {what})")
        return -1
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataError(f"{column} {value!r:.60} is not an integer (expected an index into the {what})")
    return value


def _cell_answers(record: Mapping[str, Any]) -> list[str]:
    """VQA answers: ``answers`` (strings, or dicts with an ``answer`` as in VQA v2 on the hub) or ``answer``."""
    value = record.get("answers")
    if value is None:
        value = record.get("answer")
    if value is None:
        raise DataError("no answers (expected 'answers': a list of strings, or 'answer': a string)")
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list | tuple):
        raise DataError(f"answers is {type(value).__name__} {value!r:.60} (expected a list of strings, or a string)")
    return [a["answer"] if isinstance(a, Mapping) and "answer" in a else a for a in value]


def _cell_label(record: Mapping[str, Any]) -> int:
    value = record.get("label")
    if value is None:
        raise DataError(f"no label ({_LABELS_EXPECTED})")
    if isinstance(value, str):
        name = value.strip().lower()
        if name in ENTAILMENT_LABELS:
            return ENTAILMENT_LABELS.index(name)
        if name.isdigit():
            return int(name)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise DataError(f"label {value!r:.60} is not an entailment label ({_LABELS_EXPECTED})")


def _cell_attributes(record: Mapping[str, Any]) -> dict[str, str]:
    value = record.get("attributes")
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise DataError(f"attributes {value!r:.80} (expected an object such as {{'color': 'red', 'shape': 'circle'}})")
    values = {key: str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for key, v in value.items()}
    if not all(isinstance(v, str) for v in values.values()):
        raise DataError(f"attributes {value!r:.80} (expected string values)")
    return {key: v.strip() for key, v in values.items()}


def _cell_id(record: Mapping[str, Any], default: str) -> str:
    value = record.get("id")
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        return str(value).strip()
    raise DataError(f"id is {type(value).__name__} {value!r:.60} (expected a string or a number)")


def _parse_record(
    record: Mapping[str, Any],
    kind: str,
    where: str,
    locate: Callable[[], tuple[str, bytes | Image.Image | None]],
    default_id: str,
    rationales: bool = True,
) -> TaskSample | _Rejected:
    """One row as a sample of ``kind``, or the reason it cannot be read. ``locate`` gives (image, in-memory data);
    without ``rationales`` a multiple-choice row's rationale columns are not read."""
    try:
        image, data = locate()
        common = {
            "image": image,
            "data": data,
            "id": _cell_id(record, default_id),
            "attributes": _cell_attributes(record),
            "origin": where,
        }
        if kind == "vqa":
            question_type = _cell_text(record, "question_type", required=False)
            return VQASample(
                **common,
                question=_cell_text(record, "question", required=True),
                answers=_cell_answers(record),
                question_type=question_type if question_type and question_type.strip() else DEFAULT_QUESTION_TYPE,
            )
        if kind == "entailment":
            return EntailmentSample(
                **common, hypothesis=_cell_text(record, "hypothesis", required=True), label=_cell_label(record)
            )
        return ChoiceSample(
            **common,
            question=_cell_text(record, "question", required=True),
            candidates=_cell_texts(record, "candidates", required=True),
            answer_index=_cell_index(record, "answer", "candidates", required=True),
            rationales=_cell_texts(record, "rationales", required=False) if rationales else [],
            rationale_index=_cell_index(record, "rationale", "rationales", required=False) if rationales else -1,
        )
    except DataError as err:
        return _Rejected(f"{where}: {err}")


# ---------------------------------------------------------------------------------------------------------------
# Manifests.


def load_task_manifest(
    path: str | os.PathLike,
    kind: str,
    image_root: str | os.PathLike | None = None,
    skip_bad: bool = False,
    answers: Sequence[str] | None = None,
    preload: bool = False,
    image_root_only: bool = False,
    rationales: bool = True,
) -> TaskDataset:
    """Reads a JSONL manifest with one item of ``kind`` per row.

    Columns (all kinds): ``image`` (path; relative paths resolve against ``image_root``, else the manifest's
    directory), optional ``id`` (default: the row number), optional ``attributes`` (an object of strings). VQA:
    ``question``, ``answers`` (a list of strings) or ``answer`` (one string), optional ``question_type`` (default
    ``"other"``). Entailment: ``hypothesis``, ``label`` (``"entailment"``/``"neutral"``/``"contradiction"`` or
    0/1/2). Multiple choice: ``question``, ``candidates`` (a list), ``answer`` (index into the candidates), optional
    ``rationales`` (a list, as many as the candidates to train QA->R) and ``rationale`` (index into the rationales),
    e.g. ``{"image": "a.png", "question": "What shape is it?", "candidates": ["circle", "star"], "answer": 0,
    "rationales": ["It has no corners.", "It has five points."], "rationale": 0}``: an item with rationales is
    trained and evaluated as VCR's Q->A and QA->R (:meth:`~vldistill.data.tasks.TaskDataset.rationale_samples`).
    Rows are numbered as lines, from 1.

    Args:
        path: the manifest (``.jsonl`` or ``.ndjson``).
        kind: ``"vqa"``, ``"entailment"`` or ``"multiple_choice"``.
        image_root: directory that relative image paths are resolved against.
        skip_bad: drop bad rows and count them instead of raising.
        answers: VQA: the answer vocabulary (e.g. ``train.answers`` for an evaluation set); a row whose target
            answer is not in it is bad. None builds it from this manifest's answers.
        preload: keep decoded images in memory.
        image_root_only: refuse (as a bad row) an image path that resolves outside the image root.
        rationales: multiple choice: read the ``rationales`` / ``rationale`` columns (False: ignore them, Q->A only).

    Raises:
        DataError: the file is missing or malformed, a required column is missing, or (without ``skip_bad``) a row
            is bad; the message names the file, the row and what was expected.
    """
    path = Path(path)
    source = str(path)
    _check_kind(kind, source)
    if path.suffix.lower() not in _MANIFEST_SUFFIXES:
        raise DataError(f"{source}: task manifests are JSONL; expected a suffix in {', '.join(_MANIFEST_SUFFIXES)}")
    if not path.is_file():
        raise DataError(f"manifest {source!r} not found")
    root = Path(image_root) if image_root is not None else path.parent
    records, columns = _read_jsonl(path)
    if not records:
        raise DataError(f"{source}: manifest has no rows")
    _check_required(columns, kind, source, hint="")
    entries: list[TaskSample | _Rejected] = []
    for lineno, record in records:
        where = f"{source} row {lineno}"
        if isinstance(record, str):  # a line the reader could not parse; the string says why
            entries.append(_Rejected(f"{where}: {record}"))
            continue

        def locate(record: Mapping[str, Any] = record) -> tuple[str, None]:
            image = _cell_text(record, "image", required=True)
            if not image.strip():
                raise DataError("empty image (expected a path)")
            return resolve_image(root, image.strip(), image_root_only), None

        entries.append(_parse_record(record, kind, where, locate, str(lineno), rationales))
    return TaskDataset._from_entries(entries, kind, source, answers, skip_bad, preload)


def _check_required(columns: Sequence[str], kind: str, source: str, hint: str) -> None:
    for required in _REQUIRED[kind]:
        options = required if isinstance(required, tuple) else (required,)
        if not any(option in columns for option in options):
            name = " or ".join(repr(option) for option in options)
            found = ", ".join(repr(c) for c in columns) or "none"
            raise DataError(f"{source}: missing required column {name} for kind {kind!r}; columns found: {found}{hint}")


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face datasets.


def load_task_hf(
    name_or_path: str | os.PathLike,
    kind: str,
    split: str | None = None,
    columns: Mapping[str, str | None] | None = None,
    skip_bad: bool = False,
    answers: Sequence[str] | None = None,
    preload: bool = False,
    image_root: str | os.PathLike | None = None,
    image_root_only: bool = False,
    rationales: bool = True,
    **load_kwargs: Any,
) -> TaskDataset:
    """Reads items of ``kind`` from a Hugging Face dataset, one item per row.

    Opened as in :func:`~vldistill.data.pairs.load_hf_dataset`: a ``save_to_disk`` directory with
    ``datasets.load_from_disk``, anything else with ``datasets.load_dataset(name_or_path, split=split,
    **load_kwargs)``. The image column may hold paths or images. ``columns`` maps our keys (the manifest columns of
    :func:`load_task_manifest`) to the dataset's columns; keys left out are looked for under their own name (image
    also under img/image_path/file_name, candidates under choices/options, answer and rationale also under
    answer_index/rationale_index); map a key to None to ignore a column. VQA ``answers`` may also be dicts with an
    ``answer`` key, as in VQA v2 on the hub. Rows are numbered from 0.

    Args:
        name_or_path: hub name, builder name ("json", "parquet", ...) or a saved dataset directory.
        kind: ``"vqa"``, ``"entailment"`` or ``"multiple_choice"``.
        split: which split to read (needed unless the dataset has a single split).
        columns: key -> column name mapping, see above.
        skip_bad: drop bad rows and count them instead of raising.
        answers: VQA: the answer vocabulary; None builds it from this dataset's answers.
        preload: keep decoded images in memory.
        image_root: directory that relative image paths are resolved against (default as in ``load_hf_dataset``).
        image_root_only: refuse (as a bad row) an image path that resolves outside the image root.
        rationales: multiple choice: read the rationale columns (False: ignore them, Q->A only).
        **load_kwargs: passed to ``datasets.load_dataset``.

    Raises:
        DataError: a mapped column is missing (the message lists the available columns), the split does not exist,
            or (without ``skip_bad``) a row is bad.
    """
    source = _hf_source(name_or_path, split, load_kwargs)
    _check_kind(kind, source)
    dataset = _open_hf(name_or_path, split, load_kwargs)
    mapping = _resolve_task_columns(dataset.column_names, columns, kind, source)
    dataset = _undecoded_images(dataset, mapping["image"])
    root = Path(image_root) if image_root is not None else _hf_image_root(name_or_path, load_kwargs)
    table = dataset.select_columns(sorted(set(mapping.values()))).to_dict()
    entries: list[TaskSample | _Rejected] = []
    for i in range(len(table[mapping["image"]])):
        record = {key: table[col][i] for key, col in mapping.items()}

        locate = partial(_hf_image, record.get("image"), f"{source}[{i}]", root, image_root_only)
        entries.append(_parse_record(record, kind, f"{source} row {i}", locate, str(i), rationales))
    return TaskDataset._from_entries(entries, kind, source, answers, skip_bad, preload)


def _resolve_task_columns(
    available: list[str], columns: Mapping[str, str | None] | None, kind: str, source: str
) -> dict[str, str]:
    """Maps our keys to the dataset's columns, checking that every mapped column exists."""
    defaults = {**_COMMON_COLUMNS, **_KIND_COLUMNS[kind]}
    columns = dict(columns or {})
    mapping: dict[str, str] = {}
    for key, col in columns.items():
        if key not in defaults:
            raise DataError(
                f"{source}: unknown column key {key!r} for kind {kind!r}; allowed keys: {', '.join(defaults)}"
            )
        if col is not None and col not in available:
            raise DataError(f"{source}: column {col!r} (mapped as {key!r}) not found; available columns: {available}")
        if col is not None:
            mapping[key] = col
    for key, candidates in defaults.items():
        if key not in columns:
            found = next((c for c in candidates if c in available), None)
            if found is not None:
                mapping[key] = found
    _check_required(list(mapping), kind, source, f"; dataset columns: {available}; map them with columns={{...}}")
    return mapping
