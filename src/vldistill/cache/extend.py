"""Adding a teacher to a complete cache: only the new teacher runs, on the stored views.

A cache holds one set of ``t{k}.*`` columns per teacher. A build for a teacher the cache lacks (same data and
settings) adds its columns to every shard without running the cached teachers again; until the last shard is
rewritten the manifest says ``extending`` and the cache is not used, and a killed addition resumes from the first
shard not yet rewritten. The row digests (the cache's identity) never change, so a new teacher may read only text
fields they cover.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .fingerprint import dataset_digests, fields_key, fingerprint
from .identity import MANIFEST, CacheError, find_teacher, first_difference, identity_difference, write_json
from .writer import read_column, run_build, summary


def add_teachers(
    directory: Path, manifest, header, teachers, dataset, digests, options
) -> dict[str, Any] | Callable[[bool], dict[str, Any]] | None:
    """A complete (or being extended) cache of the same data and settings: its summary when it holds every teacher
    asked for, or a function ``build(progress)`` that adds the missing ones (or finishes an interrupted addition).
    ``None`` when the data or settings differ (the caller refuses or rebuilds)."""
    rest = {k: v for k, v in header.items() if k not in ("teachers", "dataset")}
    if first_difference({k: manifest.get(k) for k in rest}, rest) is not None:
        return None
    if options.shard_rows is not None and options.shard_rows != manifest["shard_rows"]:
        return None
    old, wanted = manifest["dataset"], header["dataset"]
    if {k: v for k, v in old.items() if k not in ("fingerprint", "fields")} != {
        k: v for k, v in wanted.items() if k not in ("fingerprint", "fields")
    }:
        return None
    known = old["fields"]
    try:
        row_keys = digests if known == wanted["fields"] else dataset_digests(dataset, known)
    except CacheError:
        return None  # the data lacks texts the cache fingerprinted: other data
    if fingerprint(row_keys) != old["fingerprint"]:
        return None
    held, entries = manifest["teachers"], header["teachers"]
    found = [find_teacher(held, e, e["fields"]) for e in entries]
    extending = manifest.get("extending")
    if extending is None:
        new: list[int] = []
        for j, k in enumerate(found):
            if k is not None or any(identity_difference(entries[i], entries[j]) is None for i in new):
                continue  # cached, or asked for twice
            same = find_teacher(held, entries[j], [])
            covered = known if same is None else held[same]["fields"]
            lacking = sorted(set(entries[j]["fields"]) - set(covered))
            if lacking:
                where = "the cache's rows" if same is None else f"its cached column t{same}"
                what = "captions in" if fields_key(lacking) == "languages" else "the text fields"
                raise CacheError(
                    f"teachers.{j}.{fields_key(lacking)}: the teacher reads {what} {lacking}, which {where} do not "
                    f"cover ({covered}); rebuild the cache with all its teachers (--rebuild)"
                )
            new.append(j)
        if not new:
            return summary(directory, manifest, 0, 0.0)
        first = len(held)
        pending = [entries[j] for j in new]
    else:  # resume an interrupted addition: its teachers must be among those asked for
        first = extending["from_teacher"]
        pending = held[first:]
        new = [next((j for j, e in enumerate(entries) if identity_difference(p, e) is None), None) for p in pending]
        if None in new:
            missing = [p["id"] for p, j in zip(pending, new, strict=True) if j is None]
            raise CacheError(
                f"{directory}: adding the teachers {missing} to this cache was interrupted; give them to "
                f"`vldistill cache` to finish it, or replace the cache (--rebuild)"
            )

    def build(progress: bool) -> dict[str, Any]:
        if extending is None:  # start the addition: from here on the cache is not used until it is complete
            manifest["teachers"] = [*held, *pending]
            manifest["extending"] = {"from_teacher": first, "shards_done": 0}
            manifest["complete"] = False
            write_json(directory / MANIFEST, manifest)
        for stale in directory.glob(".*.tmp"):
            stale.unlink()
        stored = None
        if manifest["augmentation"]["views"] > 1:  # the views the cached teachers saw, not recomputed
            stored = np.concatenate([read_column(directory / s["file"], "views") for s in manifest["shards"]])
        chosen, fields = [teachers[j] for j in new], [p["fields"] for p in pending]  # as the manifest lists them
        return run_build(directory, chosen, dataset, fields, row_keys, stored, manifest, options, progress, first)

    return build
