"""Building a cache: run every teacher once over the dataset; resume a killed build; reuse or extend a complete one.

:func:`build_cache` is ``vldistill cache``. A cache of other data or settings is refused by the field that differs
(``--rebuild`` replaces it); a cache of the same data and settings that lacks some teachers gets them added
(:mod:`.extend`); the shards themselves are computed and written by :mod:`.writer`.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..config import CacheConfig
from ..models import Teacher
from .distributed import (
    addition_done,
    all_gather,
    broadcast,
    build_together,
    clear_records,
    extend_together,
    local_device,
    plan_build,
    records,
    share,
    world,
)
from .extend import Addition, add_teachers
from .fingerprint import dataset_digests, fingerprint
from .identity import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    CacheError,
    find_teacher,
    first_difference,
    identity_difference,
    read_manifest,
    short,
    teacher_identity,
    write_json,
)
from .views import augmentation_settings, view_params
from .writer import auto_shard_rows, damaged_shards, read_header, run_build, summary


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
    replace: bool = False,
    _alone: bool = False,
) -> dict[str, Any]:
    """Run ``teachers`` once over ``dataset`` and write their outputs to a cache in ``directory``.

    A complete cache of the same data and settings is reused when it holds every teacher (in any order); the
    teachers it lacks are added to it (only they run; each shard is rewritten with their columns). Every shard it
    would reuse is checked first (size and SHA-256 against the manifest): damaged ones are recomputed (which runs
    every teacher the cache holds, so they must all be given). An interrupted build or addition is resumed from its
    last complete shard. A cache of other data or settings is refused, unless ``replace`` (then it is replaced, and a
    matching one is still reused). ``rebuild=True`` builds the cache anew whatever it holds, with exactly
    ``teachers``.

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
        rebuild: build anew, deleting what the directory's cache holds (``vldistill cache --rebuild``).
        progress: show a progress bar (samples per second).
        pad_bytes: benchmarks only: this many extra bytes per row (a ``pad`` tensor no run reads).
        replace: replace a cache built from other teachers, data or settings; reuse (and repair) a matching one.

    On several processes (``torch.distributed`` initialised: ``torchrun``, ``accelerate launch``) every process
    calls it with the same arguments and they build one cache together (:mod:`.distributed`): each hashes a share of
    the rows and computes a disjoint set of shards; process 0 writes the manifest once, when every shard is whole.
    Teachers on the CPU are moved to the process's GPU (``cuda:LOCAL_RANK``) when there is one.

    Returns:
        A summary: directory, rows, shards, bytes, rows built by this call, seconds and samples per second; with
        ``repaired``, the shards this call recomputed and why.
    """
    options = options or CacheConfig()
    directory = Path(directory)
    teachers = list(teachers)
    identities = list(identities) if identities is not None else [teacher_identity(t) for t in teachers]
    rank, size = (0, 1) if _alone else world()
    device = local_device()
    if device.type == "cuda":
        teachers = [t.to(device) if t.device.type == "cpu" else t for t in teachers]
    digest_fields = sorted({name for names in fields for name in names})
    if size > 1:  # each process hashes its share of the rows; all get every digest
        shares = all_gather(dataset_digests(dataset, digest_fields, share(len(dataset), rank, size)))
        digests = np.concatenate(shares)
    else:
        digests = dataset_digests(dataset, digest_fields)
    header = _header(teachers, fields, identities, dataset, digests, digest_fields, options, pad_bytes)
    views = view_params(digests, header["augmentation"])
    args = (directory, teachers, dataset, fields, identities, options, rebuild, progress, pad_bytes, replace)
    if size == 1 and (_alone or not (directory.is_dir() and records(directory))):
        plan = _prepare(*args, digests, digest_fields, header, views)
        if "build" not in plan:
            return plan
        return run_build(directory, teachers, dataset, fields, digests, views, plan["build"], options, progress)
    source_shards = None
    tar_shards = hasattr(dataset, "shards") and hasattr(dataset, "shard_fingerprint")
    if tar_shards and broadcast(not (directory / MANIFEST).exists()):  # a new cache stores the shards' fingerprint
        # tar shards: each process hashes a share of the shard files (one sequential read each), all get the list
        mine = share(len(dataset.shards), rank, size)
        source_shards = [e for part in all_gather(dataset.shard_fingerprint(subset=mine)) for e in part]

    def prepare() -> dict[str, Any]:  # process 0 alone
        plan = _prepare(*args, digests, digest_fields, header, views, source_shards, together=size > 1)
        if "extend" in plan:  # teachers to add: started, shared out below (its records are its progress)
            return plan
        if "build" not in plan:
            clear_records(directory)
            return plan
        return plan_build(directory, plan["build"], len(digests))

    result = build_together(directory, prepare, teachers, dataset, fields, digests, views, options, progress)
    if not result.get("extend"):
        return result
    addition = add_teachers(directory, read_manifest(directory), header, teachers, dataset, digests, options)
    if not isinstance(addition, Addition):
        raise CacheError(f"{directory}: process {rank} does not find the addition process 0 started; run again")
    done = extend_together(directory, addition, progress)
    held = read_manifest(directory)["teachers"]
    if all(find_teacher(held, e, e["fields"]) is not None for e in header["teachers"]):
        return done
    # that finished an interrupted addition; now add the rest
    return build_cache(directory, teachers, dataset, fields, identities, options, False, progress, pad_bytes, replace)


def _prepare(
    directory,
    teachers,
    dataset,
    fields,
    identities,
    options,
    rebuild,
    progress,
    pad_bytes,
    replace,
    digests,
    digest_fields,
    header,
    views,
    source_shards=None,
    together: bool = False,
) -> dict[str, Any]:
    """Read and check the directory's cache: a summary when nothing is left to build (reused, repaired or extended
    here, on this process alone), else ``{"build": manifest}`` with the complete shards listed. ``source_shards``:
    the tar shards' fingerprint when the processes of a distributed build computed it together."""
    try:
        manifest = read_manifest(directory)
    except CacheError:
        if not (rebuild or replace):
            raise
        manifest = {}  # unreadable (another format): replaced below
    if manifest is not None and rebuild:  # anew, whatever it holds
        _clear(directory)
        manifest = None
    if manifest and replace and "extending" in manifest:  # an interrupted addition: replaced, never half-reused
        _clear(directory)
        manifest = None
    if manifest and (manifest.get("complete") or "extending" in manifest):
        added = add_teachers(directory, manifest, header, teachers, dataset, digests, options)
        if added is not None:  # the same data and settings: check (and repair) every shard it would reuse
            start = time.perf_counter()
            repaired = _repair(
                directory, manifest, header, teachers, dataset, digests, digest_fields, options, progress
            )
        if added is not None and not callable(added):  # every teacher cached: reuse
            _record_times(directory, manifest)
            built = sum(manifest["shards"][i]["rows"] for i, _ in repaired)
            done = summary(directory, manifest, built, time.perf_counter() - start)
            return {**done, "repaired": [why for _, why in repaired]} if repaired else done
        if added is not None and together:  # the processes share the addition (build_cache, extend_together)
            added.start()
            return {"extend": True}
        if added is not None:  # add the teachers it lacks
            done = added(progress)
            held = read_manifest(directory)["teachers"]
            if all(find_teacher(held, e, e["fields"]) is not None for e in header["teachers"]):
                return done
            # that finished an interrupted addition; now add the rest
            return build_cache(
                directory, teachers, dataset, fields, identities, options, False, progress, pad_bytes, replace, True
            )
    if manifest is not None:
        order = [k for k in header if k != "teachers"] + ["teachers"]  # name data and settings before teachers
        diff = first_difference({k: manifest.get(k) for k in order}, {k: header[k] for k in order})
        if options.shard_rows is not None and diff is None and options.shard_rows != manifest["shard_rows"]:
            diff = ("shard_rows", manifest["shard_rows"], options.shard_rows)
        if diff is not None and not replace:
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
        clear_records(directory)
        rows = options.shard_rows or auto_shard_rows(teachers, dataset, header, fields, views)
        manifest = {**header, "vldistill": __version__, "shard_rows": rows, "shards": [], "complete": False}
        if hasattr(dataset, "shard_fingerprint"):  # tar shards: opening the cache compares these, not every row
            manifest["source_shards"] = source_shards or dataset.shard_fingerprint()
        write_json(directory / MANIFEST, manifest)
    manifest["shards"] = _valid_prefix(directory, manifest["shards"])
    return {"build": manifest}


def _record_times(directory: Path, manifest: dict[str, Any]) -> None:
    """After every shard was checked byte for byte: record the shards' present modification times (a copied cache
    has new ones), so that opening the cache trusts them by ``stat`` again instead of hashing them every time."""
    changed = False
    for shard in manifest["shards"]:
        mtime = (directory / shard["file"]).stat().st_mtime_ns
        changed |= shard.get("mtime_ns") != mtime
        shard["mtime_ns"] = mtime
    if changed:
        write_json(directory / MANIFEST, manifest)


def _clear(directory: Path) -> None:
    """Delete a cache's own files (and nothing else a user may keep in the directory)."""
    clear_records(directory)
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
    """The listed shards up to the first one that is missing, has the wrong size or the wrong checksum."""
    damaged = [i for i, _ in damaged_shards(directory, shards)]
    return shards[: min(damaged, default=len(shards))]


def _rewritten(path: Path, column: int) -> bool:
    """Whether a shard already holds the columns ``t{column}.*`` of the addition under way (rewritten before a kill
    that came before its record): its bytes differ from the manifest's, and the addition rewrites it again."""
    try:
        _, header = read_header(path)
    except (OSError, ValueError, struct.error):
        return False
    return any(name.startswith(f"t{column}.") for name in header)


def _repair(directory, manifest, header, teachers, dataset, digests, digest_fields, options, progress):
    """Recompute the damaged shards of a complete cache of the same data and settings; returns ``(index, why)``
    per recomputed shard. Every teacher the cache holds runs again on those rows, so every one must be given."""
    shards = manifest["shards"]
    if "extending" in manifest:  # shards this addition rewrote are checked against their records (or redone)
        done = addition_done(directory, manifest)
        first = manifest["extending"]["from_teacher"]
        shards = [done.get(i, s) for i, s in enumerate(shards)]
        damaged = [
            (i, why)
            for i, why in damaged_shards(directory, shards)
            if i in done or not _rewritten(directory / shards[i]["file"], first)
        ]
    else:
        damaged = damaged_shards(directory, shards)
    if not damaged:
        return []
    what = "; ".join(why for _, why in damaged)
    if "extending" in manifest:
        raise CacheError(
            f"{directory}: damaged shards ({what}) while teachers were being added; rebuild the cache (--rebuild)"
        )
    held = manifest["teachers"]
    order = [
        next((j for j, e in enumerate(header["teachers"]) if identity_difference(h, e) is None), None) for h in held
    ]
    if None in order:
        missing = [h["id"] for h, j in zip(held, order, strict=True) if j is None]
        raise CacheError(
            f"{directory}: damaged shards ({what}); recomputing them runs every teacher the cache holds, and "
            f"{missing} are not among the teachers given: give them all to `vldistill cache`, or rebuild it (--rebuild)"
        )
    known = manifest["dataset"]["fields"]  # the row digests (and so the views) are of the fields it was built with
    row_keys = digests if list(known) == list(digest_fields) else dataset_digests(dataset, known)
    views = view_params(row_keys, manifest["augmentation"])
    chosen, fields = [teachers[j] for j in order], [h["fields"] for h in held]
    for _, why in damaged:
        print(f"cache: recomputing {why}", flush=True)
    indices = [i for i, _ in damaged]
    run_build(directory, chosen, dataset, fields, row_keys, views, manifest, options, progress, shards=indices)
    return damaged
