"""Which texts of the data a cache covers, and the content digest of every row (the dataset fingerprint).

A teacher embeds the texts of a sample keyed by *field* (:func:`vldistill.batching.teacher_texts`): one field per
caption language for an image-text pair; ``question`` and ``qa`` for VQA; ``hypothesis`` for entailment;
``question``, ``candidates`` and ``rationales`` for multiple choice (the last two hold one text per candidate).

Each sample's digest is a BLAKE2b-128 of its image *content* (the file's bytes, or the in-memory bytes or pixels) and
of its texts in the cached fields; the fingerprint is a SHA-256 of the digests in order. Content, not paths and
modification times: a copied dataset still matches, a changed image, caption, question or candidate does not. It
costs one read of every image file (no decoding).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from ..batching import teacher_texts
from .identity import CacheError

#: The text fields of task samples; every other field name is a caption language.
TASK_FIELDS = frozenset({"question", "qa", "hypothesis", "candidates", "rationales"})


def fields_key(fields: Sequence[str]) -> str:
    """What a recipe calls these fields: ``languages`` for captions (``teachers.N.languages``), else ``fields``."""
    return "fields" if set(fields) & TASK_FIELDS else "languages"


def _first_sample(dataset) -> Any:
    samples = getattr(dataset, "samples", None)
    return samples[0] if samples is not None else dataset[0]


def dataset_fields(dataset) -> list[str] | None:
    """The text fields to cache for a dataset of task samples (every field of the first sample's
    :func:`~vldistill.batching.teacher_texts`); ``None`` for image-text pairs, whose fields are the caption languages
    that the recipe and each teacher choose."""
    if len(dataset) == 0:
        return None
    first = _first_sample(dataset)
    captions = first.get("captions") if isinstance(first, dict) else getattr(first, "captions", None)
    return None if captions is not None else list(teacher_texts(first))


def sample_digest(sample: Any, fields: Sequence[str]) -> bytes:
    """BLAKE2b-128 of a sample's image content and of its texts in ``fields``.

    ``sample``: a sample record of :mod:`vldistill.data` (its image file is read unless ``data`` holds the image),
    or a raw item dict (``image``: a PIL image, whose pixels are hashed) wrapped by :class:`_ItemSample`.
    """
    h = hashlib.blake2b(digest_size=16)
    data = getattr(sample, "data", None)
    if isinstance(data, bytes | bytearray):
        h.update(data)
    elif isinstance(data, Image.Image):
        h.update(f"{data.mode}{data.size}".encode())
        h.update(data.tobytes())
    else:
        with open(sample.image, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    texts = teacher_texts(sample.item if isinstance(sample, _ItemSample) else sample)
    for name in fields:
        if name not in texts:
            key = fields_key([name])
            raise CacheError(f"{key}: a sample has no text field {name!r} (it has {sorted(texts)})")
        value = texts[name]
        if isinstance(value, str):  # as format 1 hashed a caption
            h.update(b"\0" + name.encode() + b"\0" + value.encode())
        else:  # one text per candidate: the count, then each text
            h.update(b"\0" + name.encode() + b"\1" + len(value).to_bytes(4, "little"))
            for text in value:
                h.update(b"\0" + text.encode())
    return h.digest()


def dataset_digests(dataset, fields: Sequence[str], rows: Sequence[int] | None = None) -> np.ndarray:
    """``[N, 16]`` uint8: the digest of every row of a dataset of :mod:`vldistill.data` (a
    :class:`~vldistill.data.PairDataset`, a ``TaskDataset``: their ``samples`` are hashed) or of any dataset of raw
    item dicts (whose decoded pixels are hashed), over the texts of ``fields``; with ``rows``, of those rows only
    (one process's share of a multi-process build)."""
    samples = getattr(dataset, "samples", None)
    languages = getattr(dataset, "languages", None)
    if languages is not None:
        missing = [f for f in fields if f not in languages]
    else:
        have = teacher_texts(_first_sample(dataset)) if len(dataset) else {}
        missing = [f for f in fields if f not in have]
    if missing and fields_key(missing) == "languages":
        raise CacheError(f"languages: the cache has captions in {missing}, which the training data lacks")
    if missing:
        raise CacheError(
            f"fields: the cache has the text fields {missing}, which the training data lacks (its samples have "
            f"{sorted(have) if languages is None else languages})"
        )
    row_digests = getattr(dataset, "row_digests", None)
    if row_digests is not None:  # tar shards: members read by offset, nothing decoded, nothing held
        return row_digests(fields, rows)
    if samples is None:
        samples = [_ItemSample(dataset[i]) for i in (range(len(dataset)) if rows is None else rows)]
    elif rows is not None:
        samples = [samples[i] for i in rows]
    if len(samples) >= 256:  # hashing releases the GIL: threads pay off on many files
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            digests = list(pool.map(lambda s: sample_digest(s, fields), samples))
    else:
        digests = [sample_digest(s, fields) for s in samples]
    return np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(samples), 16).copy()


class _ItemSample:
    """A raw item dict seen as a sample: its decoded image is hashed, its texts read from the item."""

    def __init__(self, item: dict[str, Any]):
        self.data, self.item = item["image"], item


def fingerprint(digests: np.ndarray) -> str:
    """SHA-256 of the row digests in order."""
    return hashlib.sha256(digests.tobytes()).hexdigest()[:32]
