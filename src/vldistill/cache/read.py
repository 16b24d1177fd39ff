"""Reading a cache in training: :class:`CachedTeachers`, a drop-in ``TeacherSource`` over memory-mapped shards.

A random training batch is one numpy fancy-index per shard into a read-only memory map of the file, with nothing
loaded that the batch does not touch; mapped pages are handed back to the kernel every :data:`RELEASE_BYTES` read,
so the resident memory stays bounded however large the cache.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import CacheConfig
from ..outputs import Embeddings, ModelDims
from .fingerprint import dataset_digests, fields_key, fingerprint
from .identity import MANIFEST, CacheError, find_teacher, first_difference, identity_difference, read_manifest, short
from .views import ViewTable, augmentation_settings
from .writer import DTYPES, damaged_shards

RELEASE_BYTES = 256 << 20
"""Mapped cache pages are released (``madvise(MADV_DONTNEED)``) after this many bytes were read."""

_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U8": np.uint8, "I64": np.int64}
_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8, "I64": torch.int64}


class _Shard:
    """One shard, memory-mapped read-only: each tensor is a numpy view of the mapping (nothing is loaded)."""

    def __init__(self, path: Path, size: int):
        if not path.is_file() or path.stat().st_size != size:
            raise CacheError(f"shard {path} is missing or has the wrong size: the cache is damaged; rebuild it")
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        (n,) = struct.unpack("<Q", self.map[:8])
        header = json.loads(self.map[8 : 8 + n])
        buffer = np.frombuffer(self.map, dtype=np.uint8)
        self.arrays: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            raw = buffer[8 + n + begin : 8 + n + end]
            self.arrays[name] = raw.view(_NUMPY[info["dtype"]]).reshape(info["shape"])
            self.dtypes[name] = _TORCH[info["dtype"]]

    def release(self) -> None:
        """Drop the mapped pages from this process (the kernel's page cache keeps them for the next read)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self.map.madvise(mmap.MADV_DONTNEED)


class CachedTeachers:
    """A ``TeacherSource`` that reads the teachers' outputs from a complete cache instead of running them.

    Opening checks the cache against the run and maps every training row to its cached row; a cache that is
    incomplete, was built from another teacher, processor, dataset or augmentation setting, or lacks rows for some
    samples is refused with a :class:`CacheError` that names the field (or the number of missing rows). A batch gets
    exactly what the live teacher gives for it: ``text[field]`` ``[B, d]``, or ``[B, C, d]`` for a candidate field,
    and token features (trimmed as the live tokenizer pads) for the other fields.

    Args:
        directory: the cache directory.
        dataset: the training data the run reads (its ``index`` values are looked up).
        teachers: per teacher, the run's :func:`teacher_identity`.
        fields: per teacher, the text fields the run needs its text embeddings of (caption languages for
            image-text pairs).
        options: the run's cache settings (dtype and augmentation must match the cache's).

    Attributes:
        dims: each teacher's widths (so a run needs no loaded teacher).
        views: the stored views of each training row, or ``None`` without augmentation.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        dataset,
        teachers: Sequence[dict[str, Any]],
        fields: Sequence[Sequence[str]],
        options: CacheConfig | None = None,
    ):
        options = options or CacheConfig()
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise CacheError(f"no teacher cache at {self.directory} (no {MANIFEST}): build it with `vldistill cache`")
        if "extending" in manifest:
            adding = [t["id"] for t in manifest["teachers"][manifest["extending"]["from_teacher"] :]]
            raise CacheError(
                f"the teacher cache at {self.directory} is incomplete: adding the teachers {adding} to it was "
                f"interrupted; run `vldistill cache` with them again to finish. An incomplete cache is never used."
            )
        if not manifest["complete"]:
            raise CacheError(
                f"the teacher cache at {self.directory} is incomplete ({len(manifest['shards'])} shards of "
                f"{math.ceil(manifest['dataset']['rows'] / manifest['shard_rows'])} written: its build was "
                f"interrupted); run `vldistill cache` again to resume it. An incomplete cache is never used."
            )
        self.manifest = manifest
        self.fields = [list(names) for names in fields]
        self._columns = _match_teachers(manifest["teachers"], list(teachers), self.fields)
        diff = first_difference(manifest["augmentation"], augmentation_settings(options))
        if diff is not None:
            field, old, new = diff
            raise CacheError(
                f"augmentation.{field} (recipe: cache.{field}): the cache was built with {short(old)}, the run "
                f"asks for {short(new)}"
            )
        if manifest["dtype"] != options.dtype:
            raise CacheError(
                f"dtype (recipe: cache.dtype): the cache stores {manifest['dtype']}, the run asks for {options.dtype}"
            )
        damaged = damaged_shards(self.directory, manifest["shards"])  # at opening, before any training: see below
        if damaged:
            raise CacheError(
                f"the teacher cache at {self.directory} is damaged ({'; '.join(why for _, why in damaged)}); run "
                f"`vldistill cache` with the same recipe or arguments to recompute those shards, or rebuild it "
                f"(--rebuild)"
            )
        self._read = 0
        entries = [manifest["teachers"][k] for k in self._columns]
        self.dims = tuple(ModelDims(**t["dims"]) for t in entries)
        self._out_dtypes = [DTYPES.get(t["dtype"], torch.float32) for t in entries]
        self._shards = [_Shard(self.directory / s["file"], s["bytes"]) for s in manifest["shards"]]
        self._shard, self._offset = self._locate(dataset)
        self.views = self._view_table() if manifest["augmentation"]["views"] > 1 else None

    # ------------------------------------------------------------------------------------------ opening
    def _locate(self, dataset) -> tuple[np.ndarray, np.ndarray]:
        """Shard and offset of every dataset row, found by content digest."""
        info = self.manifest["dataset"]
        stored = self.manifest.get("source_shards")
        # tar shards: the same shard files (name, size, SHA-256; the stored digest trusted while a shard's size and
        # time are unchanged) hold the same rows in the same order: no row is read
        same_rows = stored and hasattr(dataset, "shard_fingerprint") and len(dataset) == info["rows"]
        if same_rows and _stable(dataset.shard_fingerprint(known=stored)) == _stable(stored):
            rows = np.arange(len(dataset))
            return rows // self.manifest["shard_rows"], rows % self.manifest["shard_rows"]
        digests = dataset_digests(dataset, info["fields"])
        n = len(digests)
        if fingerprint(digests) == info["fingerprint"]:  # the very data it was built on: row i is cached row i
            rows = np.arange(n)
            return rows // self.manifest["shard_rows"], rows % self.manifest["shard_rows"]
        where: dict[bytes, tuple[int, int]] = {}
        for s, shard in enumerate(self._shards):
            for offset, key in enumerate(shard.arrays["row_key"]):
                where.setdefault(key.tobytes(), (s, offset))
        found = [where.get(d.tobytes()) for d in digests]
        missing = sum(loc is None for loc in found)
        built_on = f"{info['rows']} rows of {info['source'] or 'a dataset'!r}, fingerprint {info['fingerprint'][:12]}"
        if missing == n:
            raise CacheError(
                f"dataset: the cache was built on another dataset ({built_on}): none of the {n} training samples "
                f"(fingerprint {fingerprint(digests)[:12]}) is in it"
            )
        if missing:
            raise CacheError(
                f"dataset: the cache lacks rows for {missing} of the {n} training samples (it was built on "
                f"{built_on}); rebuild it for this data"
            )
        return np.array([loc[0] for loc in found]), np.array([loc[1] for loc in found])

    def where(self, index: Tensor, teacher: int = 0) -> str:
        """The shard files and rows that hold the cached outputs of dataset rows ``index`` (for error messages)."""
        rows = index.cpu().numpy()
        shard, offset = self._shard[rows], self._offset[rows]
        files = self.manifest["shards"]
        found = [f"{files[s]['file']} row {o}" for s, o in zip(shard.tolist(), offset.tolist(), strict=True)]
        more = f" and {len(found) - 4} more" if len(found) > 4 else ""
        return f"cache {self.directory}, column t{self._columns[teacher]}: {', '.join(found[:4])}{more}"

    def _view_table(self) -> ViewTable:
        return ViewTable(self._gather("views", np.arange(len(self._shard)), None))

    def check_needs(self, needs: frozenset[str], where: str = "") -> None:
        """Fail before training when a loss needs token features the cache does not have."""
        wanted = sorted(needs & {"image_tokens", "text_tokens", "teacher_image_tokens"})
        if wanted and not self.manifest["tokens"]:
            raise CacheError(
                f"{where + ': ' if where else ''}a loss needs {wanted}, but the teacher cache at {self.directory} "
                f"has no token features; rebuild it with cache.tokens: true"
            )

    # ------------------------------------------------------------------------------------------ reading
    def __call__(self, batch: dict[str, Any], needs: frozenset[str]) -> list[Embeddings]:
        self.check_needs(needs)
        index = batch["index"]
        rows = index.cpu().numpy()
        views = batch.get("views")
        views = views.cpu().numpy() if views is not None else np.zeros(len(rows), dtype=np.int64)
        device = index.device
        outs = []
        for j, (k, names) in enumerate(zip(self._columns, self.fields, strict=True)):
            entry, dtype = self.manifest["teachers"][k], self._out_dtypes[j]
            scale = entry["logit_scale"]
            out = Embeddings(logit_scale=None if scale is None else torch.tensor(scale, dtype=dtype, device=device))
            out.image = self._get(f"t{k}.image", rows, views, device, dtype)
            if needs & {"image_tokens", "teacher_image_tokens"}:  # the latter: a seq2seq student's token prefix
                out.image_tokens = self._get(f"t{k}.image_tokens", rows, views, device, dtype)
            for name in names:
                out.text[name] = self._get(f"t{k}.text.{name}", rows, None, device, dtype)
                if "text_tokens" in needs and out.text[name].dim() == 2:  # none for a candidate field, as live
                    tokens = self._get(f"t{k}.text_tokens.{name}", rows, None, device, dtype)
                    mask = self._get(f"t{k}.text_mask.{name}", rows, None, device, torch.long)
                    if entry["padding"] == "longest":  # as the live tokenizer pads: to the batch's longest text
                        length = int(mask.sum(1).max())
                        cut = slice(-length, None) if entry["padding_side"] == "left" else slice(0, length)
                        tokens, mask = tokens[:, cut], mask[:, cut]
                    out.text_tokens[name], out.text_mask[name] = tokens, mask
            outs.append(out)
        return outs

    def _get(self, name: str, rows: np.ndarray, views: np.ndarray | None, device, dtype) -> Tensor:
        return self._gather(name, rows, views).to(device=device, dtype=dtype)

    def _gather(self, name: str, rows: np.ndarray, views: np.ndarray | None) -> Tensor:
        """Rows (and views) of one tensor, gathered shard by shard from the memory maps."""
        if name not in self._shards[0].arrays:
            raise CacheError(f"the teacher cache at {self.directory} has no {name!r}")
        shard, offset = self._shard[rows], self._offset[rows]
        first = self._shards[0].arrays[name]
        out = np.empty((len(rows), *first.shape[1 + (views is not None) :]), dtype=first.dtype)
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            array = self._shards[s].arrays[name]
            out[sel] = array[offset[sel], views[sel]] if views is not None else array[offset[sel]]
        self._read += len(rows) * max(out.nbytes // max(len(rows), 1), mmap.PAGESIZE)  # a row maps a page at least
        if self._read >= RELEASE_BYTES:  # keep the resident set bounded on caches larger than memory
            for s in self._shards:
                s.release()
            self._read = 0
        return torch.from_numpy(out).view(self._shards[0].dtypes[name])


def _match_teachers(cached: list[dict[str, Any]], run: list[dict[str, Any]], fields: list[list[str]]) -> list[int]:
    """For each of the run's teachers, the cache column that holds its outputs: a cache of several teachers serves
    any of them, in any order. A teacher the cache lacks is refused, naming what differs from the cached teacher in
    its position (or the first)."""
    columns = []
    for j, (new, names) in enumerate(zip(run, fields, strict=True)):
        k = find_teacher(cached, new, names)
        if k is not None:
            columns.append(k)
            continue
        key, same = f"teachers.{j}", find_teacher(cached, new, [])
        if same is not None:  # cached, but without some of the fields the run needs
            lacking = [name for name in names if name not in cached[same]["fields"]]
            what = "in" if fields_key(lacking) == "languages" else "of the text fields"
            raise CacheError(
                f"{key}.{fields_key(lacking)}: the run needs text embeddings {what} {lacking}, the cache has "
                f"{cached[same]['fields']} for this teacher; rebuild it with them (--rebuild)"
            )
        old = cached[min(j, len(cached) - 1)]
        field = identity_difference(old, new)
        raise CacheError(
            f"{key}.{field}: the cache was built by another teacher ({field} {short(old.get(field))}, id "
            f"{old['id']!r}) than the run's ({short(new.get(field))}, id {new['id']!r}); the cache holds "
            f"{[t['id'] for t in cached]}; `vldistill cache` adds a teacher to it"
        )
    return columns


def _stable(shards: list[dict[str, Any]]) -> list[tuple[str, int, str]]:
    """What two tar-shard fingerprints must agree on: each shard's name, size and SHA-256, in order."""
    return [(s["name"], s["bytes"], s["sha256"]) for s in shards]
