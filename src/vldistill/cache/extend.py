"""Adding a teacher to a complete cache: only the new teacher runs, on the stored views.

A cache holds one set of ``t{k}.*`` columns per teacher. A build for a teacher the cache lacks (same data and
settings) adds its columns to every shard without running the cached teachers again; until the last shard is
rewritten the manifest says ``extending`` and the cache is not used. Each rewritten shard is recorded beside it
(``shard-NNNNN.json``, naming the addition), so a killed addition, on one process or several, rewrites only the
shards no record covers; the manifest lists the new checksums once every shard is recorded. The row digests (the
cache's identity) never change, so a new teacher may read only text fields they cover.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .fingerprint import dataset_digests, fields_key, fingerprint
from .identity import MANIFEST, CacheError, find_teacher, first_difference, identity_difference, write_json
from .writer import read_column, run_build, summary


def add_teachers(
    directory: Path, manifest, header, teachers, dataset, digests, options
) -> dict[str, Any] | Addition | None:
    """A complete (or being extended) cache of the same data and settings: its summary when it holds every teacher
    asked for, or an :class:`Addition` that adds the missing ones (or finishes an interrupted addition).
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

    chosen = [teachers[j] for j in new]
    return Addition(directory, manifest, held, pending, first, extending is None, chosen, dataset, row_keys, options)


class Addition:
    """Adding ``pending`` teachers (columns ``t{first}``, ...) to every shard of a cache, or finishing an interrupted
    addition. Called with ``progress`` it runs on this process alone; :mod:`.build` shares it among the processes of
    a distributed build instead (:meth:`start` on process 0, :meth:`run` of a share of :meth:`todo` on each, then
    :func:`~.distributed.finish_addition`). Each rewritten shard is recorded beside it as it is finished, so a
    killed addition, on one process or several, redoes only the shards no record covers."""

    def __init__(self, directory, manifest, held, pending, first, fresh, teachers, dataset, row_keys, options):
        self.directory, self.manifest, self.held, self.pending = directory, manifest, held, pending
        self.first, self.fresh, self.teachers, self.dataset = first, fresh, teachers, dataset
        self.row_keys, self.options = row_keys, options

    def start(self) -> None:
        """Mark the cache as being extended (not used until complete); on process 0 only."""
        from .distributed import clear_records

        if self.fresh:
            self.manifest["teachers"] = [*self.held, *self.pending]
            self.manifest["extending"] = {"from_teacher": self.first, "shards_done": 0}
            self.manifest["complete"] = False
            clear_records(self.directory)
            write_json(self.directory / MANIFEST, self.manifest)
            self.fresh = False
        for stale in self.directory.glob(".*.tmp"):
            stale.unlink()

    def todo(self) -> list[int]:
        """The shards that no earlier run of this addition has rewritten."""
        from .distributed import addition_done

        done = addition_done(self.directory, self.manifest)
        return [i for i in range(len(self.manifest["shards"])) if i not in done]

    def run(self, shards, progress: bool) -> dict[str, Any]:
        """Rewrite ``shards`` with the new teachers' columns, recording each; the manifest is left alone."""
        stored = None
        if self.manifest["augmentation"]["views"] > 1:  # the views the cached teachers saw, not recomputed
            stored = np.concatenate([read_column(self.directory / s["file"], "views") for s in self.manifest["shards"]])
        fields = [p["fields"] for p in self.pending]  # as the manifest lists them
        args = (self.directory, self.teachers, self.dataset, fields, self.row_keys, stored, self.manifest)
        return run_build(*args, self.options, progress, self.first, shards=shards, record=True)

    def __call__(self, progress: bool) -> dict[str, Any]:
        from .distributed import finish_addition

        self.start()
        built = self.run(self.todo(), progress)
        finish_addition(self.directory, self.manifest)
        return summary(self.directory, self.manifest, built["built_rows"], built["seconds"])
