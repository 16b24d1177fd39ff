"""Building one cache on several processes (``torchrun``, ``accelerate launch``, several nodes).

Every process hashes a contiguous share of the rows (the shares are gathered, so all agree on the fingerprint);
process 0 alone reads, checks and prepares the manifest (refusing other data or settings, clearing on ``--rebuild``,
reusing a complete cache) and tells the others what to do. To build, the shards not yet complete are dealt out
round-robin: process ``r`` of ``W`` computes the ``r``-th, ``r + W``-th, ... of them, so the shards of a process are
disjoint from every other's. A finished shard is recorded next to it in ``shard-NNNNN.json`` (its rows, size and
SHA-256; written atomically once the shard is whole): the manifest is not touched while the processes run. When
every process is done, process 0 writes the manifest once, atomically, with ``complete: true`` and every shard in
order, then deletes the records.

A killed process leaves whole shards with their records and, at most, a temporary file: the next run (on any number
of processes, one included) checks each recorded shard (size and SHA-256) and recomputes only the missing and damaged
ones. The columns are byte-identical to a one-process build: each shard covers the same rows, in the same batches,
whichever process computes it (given the same threads per process: a matrix product may round differently with
another thread count).

Adding teachers to a complete cache is shared the same way (:func:`extend_together`): process 0 marks the cache as
being extended, every process rewrites its round-robin share of the shards with the new teachers' columns and records
each (naming the addition), and process 0 lists the new checksums and marks the cache complete once every shard is
recorded; a killed addition redoes only the shards no record covers, on any number of processes. Not distributed:
recomputing damaged shards of a complete cache runs on process 0 while the others wait (it is rare).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dist import process_shard
from ..files import write_text
from .identity import MANIFEST, CacheError, read_manifest, write_json
from .writer import damaged_shards, run_build, summary

RECORD = "shard-{:05d}.json"


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process (``(0, 1)`` outside a process group)."""
    return process_shard()


def share(n: int, rank: int, size: int) -> range:
    """The contiguous rows ``[a, b)`` of ``n`` that process ``rank`` of ``size`` hashes."""
    bounds = np.linspace(0, n, size + 1).round().astype(int)
    return range(int(bounds[rank]), int(bounds[rank + 1]))


def all_gather(value: Any) -> list[Any]:
    """Every process's ``value``, in rank order."""
    if world()[1] == 1:
        return [value]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def broadcast(value: Any) -> Any:
    """Process 0's ``value`` on every process."""
    if world()[1] == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()


def records(directory: Path) -> dict[int, dict[str, Any]]:
    """The shards that processes of an interrupted build finished, by index (from their ``shard-NNNNN.json``)."""
    found = {}
    for path in sorted(Path(directory).glob("shard-*.json")):
        try:
            entry = json.loads(path.read_text())
            found[int(path.stem.split("-")[1])] = entry
        except (ValueError, KeyError, OSError):
            continue  # unreadable: the shard is recomputed
    return found


def clear_records(directory: Path) -> None:
    for path in Path(directory).glob("shard-*.json"):
        path.unlink(missing_ok=True)


def write_record(directory: Path, index: int, entry: dict[str, Any], fingerprint: str) -> None:
    """Record a finished shard (after its file is whole), with the fingerprint of the build it belongs to."""
    name = RECORD.format(index)
    write_text(directory / name, json.dumps({**entry, "fingerprint": fingerprint}), tmp=directory / f".{name}.tmp")


def _verified_records(
    directory: Path, manifest: dict[str, Any], done: dict[int, dict[str, Any]], belongs: Callable[[int, dict], bool]
) -> dict[int, dict[str, Any]]:
    """``done`` plus the recorded shards of this build (same data fingerprint, ``belongs``) whose file has the
    recorded size and SHA-256, as manifest entries (the record's own keys dropped)."""
    fp = manifest["dataset"]["fingerprint"]
    candidates = [
        (i, e) for i, e in records(directory).items() if i not in done and e.get("fingerprint") == fp and belongs(i, e)
    ]
    bad = {j for j, _ in damaged_shards(directory, [e for _, e in candidates])}
    for j, (i, entry) in enumerate(candidates):
        if j not in bad:
            done[i] = {k: v for k, v in entry.items() if k not in ("fingerprint", "adding")}
    return done


def done_shards(directory: Path, manifest: dict[str, Any], n_shards: int) -> dict[int, dict[str, Any]]:
    """Every shard already complete: the manifest's listed ones (a one-process build lists them as it goes) and the
    recorded ones of this build whose file has the recorded size and SHA-256."""
    rows = manifest["shard_rows"]

    def belongs(i: int, entry: dict[str, Any]) -> bool:
        return i < n_shards and entry.get("start") == i * rows

    return _verified_records(directory, manifest, dict(enumerate(manifest["shards"])), belongs)


def addition_done(directory: Path, manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The shards an interrupted addition of teachers (``manifest["extending"]``) has already rewritten: those before
    its ``shards_done`` (additions by earlier versions, shard by shard in the manifest) and those recorded for this
    addition (same data, same first new column) whose file has the recorded size and SHA-256."""
    extending, shards = manifest["extending"], manifest["shards"]
    done = {i: shards[i] for i in range(extending.get("shards_done", 0))}
    first = extending["from_teacher"]

    def belongs(i: int, entry: dict[str, Any]) -> bool:
        return i < len(shards) and entry.get("adding") == first and entry.get("file") == shards[i]["file"]

    return _verified_records(directory, manifest, done, belongs)


def finish_addition(directory: Path, manifest: dict[str, Any]) -> None:
    """Once every shard of an addition is rewritten: list their new sizes, SHA-256s and times, mark the cache
    complete, write the manifest once, atomically, and delete the records."""
    done = addition_done(directory, manifest)
    missing = [i for i in range(len(manifest["shards"])) if i not in done]
    if missing:
        raise CacheError(f"{directory}: shards {missing[:5]} were not rewritten by any process; run again to finish")
    manifest["shards"] = [done[i] for i in range(len(manifest["shards"]))]
    manifest.pop("extending", None)
    manifest["complete"] = True
    write_json(directory / MANIFEST, manifest)
    clear_records(directory)


def extend_together(directory: Path, addition, progress: bool) -> dict[str, Any]:
    """Share an :class:`~.extend.Addition` among the processes (process 0 has started it): the shards still to
    rewrite are dealt out round-robin, and process 0 finishes the manifest once every one is recorded."""
    rank, size = world()
    todo = broadcast(addition.todo() if rank == 0 else None)
    built = addition.run(todo[rank::size], progress)
    barrier()
    error = None
    if rank == 0:
        try:
            finish_addition(directory, addition.manifest)
        except CacheError as err:
            error = str(err)
    error = broadcast(error)
    if error is not None:
        raise CacheError(error)
    rows, seconds = sum(all_gather(built["built_rows"])), max(all_gather(built["seconds"]))
    return summary(directory, read_manifest(directory), rows, seconds)


def build_together(
    directory: Path,
    prepare: Callable[[], dict[str, Any]],
    teachers: Sequence[Any],
    dataset,
    fields,
    digests: np.ndarray,
    views,
    options,
    progress: bool,
) -> dict[str, Any]:
    """Run ``prepare`` on process 0 (it returns a finished summary, or ``{"build": manifest}``), then build the
    missing shards on every process and let process 0 write the manifest once."""
    rank, size = world()
    plan, error = None, None
    if rank == 0:
        try:
            plan = prepare()
        except Exception as err:  # the others must hear of it, or they wait forever
            error = err
    told = broadcast(None if rank else {"plan": plan, "error": None if error is None else f"{error}"})
    if error is not None:
        raise error
    if told["error"] is not None:
        raise CacheError(f"process 0 refused the cache build: {told['error']}")
    plan = told["plan"]
    if "build" not in plan:
        return plan
    manifest = plan["build"]
    n_shards = -(-len(digests) // manifest["shard_rows"])
    todo = plan["todo"]
    mine = todo[rank::size]
    built = run_build(
        directory, teachers, dataset, fields, digests, views, manifest, options, progress, shards=mine, record=True
    )
    barrier()
    result = None
    if rank == 0:
        done = done_shards(directory, manifest, n_shards)
        missing = [i for i in range(n_shards) if i not in done]
        if missing:
            result = {"error": f"shards {missing[:5]} were not written by any process"}
        else:
            manifest["shards"] = [done[i] for i in range(n_shards)]
            manifest["complete"] = True
            write_json(directory / MANIFEST, manifest)  # once, atomically, when every shard is whole
            clear_records(directory)
            result = {"ok": True}
    result = broadcast(result)
    if "error" in result:
        raise CacheError(f"{directory}: {result['error']}")
    rows, seconds = sum(all_gather(built["built_rows"])), max(all_gather(built["seconds"]))
    return summary(directory, manifest, rows, seconds)


def plan_build(directory: Path, manifest: dict[str, Any], n_rows: int) -> dict[str, Any]:
    """Process 0's plan for an incomplete cache: the shards still to compute."""
    n_shards = -(-n_rows // manifest["shard_rows"])
    done = done_shards(directory, manifest, n_shards)
    return {"build": manifest, "todo": [i for i in range(n_shards) if i not in done]}


def local_device() -> torch.device:
    """This process's accelerator (``cuda:LOCAL_RANK``) or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
