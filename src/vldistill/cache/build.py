"""Building a cache: run every teacher once over the dataset; resume a killed build; reuse or extend a complete one.

:func:`build_cache` is ``vldistill cache``. A cache of other data or settings is refused by the field that differs
(``--rebuild`` replaces it); a cache of the same data and settings that lacks some teachers gets them added
(:mod:`.extend`); the shards themselves are computed and written by :mod:`.writer`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import CacheConfig
from ..models import Teacher
from .extend import add_teachers
from .fingerprint import dataset_digests, fingerprint
from .identity import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    CacheError,
    find_teacher,
    first_difference,
    read_manifest,
    short,
    teacher_identity,
    write_json,
)
from .views import augmentation_settings, view_params
from .writer import auto_shard_rows, run_build, summary


def build_cache(
    directory: str | os.PathLike,
    teachers: Sequence[Teacher],
    dataset,
    fields: Sequence[Sequence[str]],
    identities: Sequence[dict[str, Any]] | None = None,
    options: CacheConfig | None = None,
    rebuild: bool = False,
    progress: bool = True,
    pad_bytes: int = 0,
) -> dict[str, Any]:
    """Run ``teachers`` once over ``dataset`` and write their outputs to a cache in ``directory``.

    A complete cache of the same data and settings is reused as it is when it holds every teacher (in any order); the
    teachers it lacks are added to it (only they run; each shard is rewritten with their columns). An interrupted
    build or addition is resumed from its last complete shard. A cache of other data or settings is refused.
    ``rebuild=True`` replaces a cache that differs in anything, teachers included, with one of exactly ``teachers``.

    Args:
        directory: the cache directory (created).
        teachers: the loaded teachers, in the recipe's order.
        dataset: the training data (a :class:`~vldistill.data.PairDataset`, a ``TaskDataset``, or any dataset of
            raw sample dicts).
        fields: per teacher, the text fields to embed (:func:`~vldistill.batching.teacher_texts`): caption
            languages for image-text pairs; for task samples e.g. ``qa`` or ``candidates`` (see
            :func:`~vldistill.cache.dataset_fields`).
        identities: per teacher, :func:`teacher_identity` (default: computed from ``teachers``).
        options: dtype, token features, views, batch size, workers, shard size.
        rebuild: replace an existing cache built from other teachers, data or settings.
        progress: show a progress bar (samples per second).
        pad_bytes: benchmarks only: this many extra bytes per row (a ``pad`` tensor no run reads).

    Returns:
        A summary: directory, rows, shards, bytes, rows built by this call, seconds and samples per second.
    """
    options = options or CacheConfig()
    directory = Path(directory)
    teachers = list(teachers)
    identities = list(identities) if identities is not None else [teacher_identity(t) for t in teachers]
    digest_fields = sorted({name for names in fields for name in names})
    digests = dataset_digests(dataset, digest_fields)
    header = _header(teachers, fields, identities, dataset, digests, digest_fields, options, pad_bytes)
    views = view_params(digests, header["augmentation"])
    try:
        manifest = read_manifest(directory)
    except CacheError:
        if not rebuild:
            raise
        manifest = {}  # unreadable (another format): replaced below
    if manifest and rebuild and "extending" in manifest:  # an interrupted addition: replaced, never half-reused
        _clear(directory)
        manifest = None
    if manifest and not rebuild and (manifest.get("complete") or "extending" in manifest):
        added = add_teachers(directory, manifest, header, teachers, dataset, digests, options)
        if added is not None and not callable(added):  # the same data and settings, every teacher cached: reuse
            return added
        if added is not None:  # the same data and settings: add the teachers it lacks
            done = added(progress)
            held = read_manifest(directory)["teachers"]
            if all(find_teacher(held, e, e["fields"]) is not None for e in header["teachers"]):
                return done
            # that finished an interrupted addition; now add the rest
            return build_cache(directory, teachers, dataset, fields, identities, options, False, progress, pad_bytes)
    if manifest is not None:
        order = [k for k in header if k != "teachers"] + ["teachers"]  # name data and settings before teachers
        diff = first_difference({k: manifest.get(k) for k in order}, {k: header[k] for k in order})
        if options.shard_rows is not None and diff is None and options.shard_rows != manifest["shard_rows"]:
            diff = ("shard_rows", manifest["shard_rows"], options.shard_rows)
        if diff is not None and not rebuild:
            field, old, new = diff
            raise CacheError(
                f"{directory} holds a cache built with other settings ({field}: {short(old)} there, {short(new)} "
                f"now); delete it, choose another directory, or rebuild it (--rebuild)"
            )
        if diff is not None:
            _clear(directory)
            manifest = None
    if manifest is not None and manifest["complete"]:
        return summary(directory, manifest, 0, 0.0)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".*.tmp"):  # a shard being written when the last build was killed
        stale.unlink()
    if manifest is None:
        rows = options.shard_rows or auto_shard_rows(teachers, dataset, header, fields, views)
        manifest = {**header, "vldistill": __version__, "shard_rows": rows, "shards": [], "complete": False}
        write_json(directory / MANIFEST, manifest)
    manifest["shards"] = _valid_prefix(directory, manifest["shards"])
    return run_build(directory, teachers, dataset, fields, digests, views, manifest, options, progress)


def _clear(directory: Path) -> None:
    """Delete a cache's own files (and nothing else a user may keep in the directory)."""
    for path in [directory / MANIFEST, *directory.glob("shard-*.safetensors"), *directory.glob(".*.tmp")]:
        path.unlink(missing_ok=True)


def _header(teachers, fields, identities, dataset, digests, digest_fields, options, pad_bytes) -> dict[str, Any]:
    """The part of the manifest that defines the cache's content (what a resumed build must agree with)."""
    if len(identities) != len(teachers) or len(fields) != len(teachers):
        raise ValueError("build_cache needs one identity and one list of text fields per teacher")
    entries = []
    for teacher, ident, names in zip(teachers, identities, fields, strict=True):
        scale = teacher.logit_scale()
        entries.append(
            {
                **ident,
                "fields": list(names),
                "dims": dataclasses.asdict(teacher.dims),
                "logit_scale": None if scale is None else float(scale.float()),
                "max_length": teacher.max_length,
                "padding": "max_length" if teacher.model_type == "siglip" else "longest",
                "padding_side": getattr(teacher.tokenizer, "padding_side", "right"),
            }
        )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "teachers": entries,
        "dataset": {
            "fingerprint": fingerprint(digests),
            "rows": len(digests),
            "source": str(getattr(dataset, "source", "")),
            "fields": list(digest_fields),
            "hash": "blake2b-128 of each image's bytes and its texts in the fields; sha256 of the row digests in order",
        },
        "augmentation": augmentation_settings(options),
        "dtype": options.dtype,
        "tokens": options.tokens,
        "pad_bytes": pad_bytes,
    }


def _valid_prefix(directory: Path, shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The listed shards up to the first one that is missing or has the wrong size."""
    kept = []
    for shard in shards:
        path = directory / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            break
        kept.append(shard)
    return kept
