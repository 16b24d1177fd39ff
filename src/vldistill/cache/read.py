"""Reading a cache in training: :class:`CachedTeachers`, a drop-in ``TeacherSource`` over the cache's shards.

A random training batch is read row by row from the shard files with ``os.pread`` (one read per run of consecutive
rows), nothing else: the process neither loads nor maps what the batch does not need, so its resident memory does
not grow with the cache. (Earlier versions memory-mapped the shards; every touched page of a map stays resident until
released, and on a kernel with large page-cache folios one touched row maps its whole folio, up to the whole shard:
training from a 200k-row cache then held 41 MB more than from a 20k-row one.)
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import OrderedDict
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
from .writer import DTYPES, damaged_shards, read_header

OPEN_FILES = 64
"""Shard files a reader keeps open at once."""

_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U8": np.uint8, "I64": np.int64}
_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8, "I64": torch.int64}


class _RowTable:
    """Where each dataset row is cached: ``table[rows] -> (shard, offset)`` arrays.

    When the dataset is the one the cache was built on (row ``i`` is cached row ``i``) this is arithmetic on the row
    number and holds nothing, so training from a cache of any size keeps no per-row table; otherwise (a subset or
    reordering of the cached data, matched by content) it holds the two int64 per row it found.
    """

    def __init__(self, n: int, shard_rows: int, found: np.ndarray | None = None):
        self.n, self.shard_rows, self.found = n, shard_rows, found

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64)
        if self.found is not None:
            return self.found[rows, 0], self.found[rows, 1]
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            outside = rows[(rows < 0) | (rows >= self.n)][:5].tolist()
            raise IndexError(f"rows {outside} outside the {self.n} cached rows")
        return rows // self.shard_rows, rows % self.shard_rows


class _Shard:
    """One shard: its header parsed at opening (nothing else read), its rows read with ``os.pread``.

    Training reads a few rows per shard per batch. They are copied from the file with one ``pread`` per run of
    consecutive rows, so the process maps nothing and holds only the batch: resident memory does not grow with the
    cache, as it does with a memory map, whose every touched page (a whole large folio of the page cache on recent
    kernels) stays resident until it is released.
    """

    def __init__(self, path: Path, size: int):
        if not path.is_file() or path.stat().st_size != size:
            raise CacheError(f"shard {path} is missing or has the wrong size: the cache is damaged; rebuild it")
        self.path = path
        n, header = read_header(path)
        self.base = 8 + n
        self.columns: dict[str, tuple[int, np.dtype, tuple[int, ...]]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            self.columns[name] = (info["data_offsets"][0], np.dtype(_NUMPY[info["dtype"]]), tuple(info["shape"]))
            self.dtypes[name] = _TORCH[info["dtype"]]

    def read(self, fd: int, name: str, offsets: np.ndarray, views: np.ndarray | None) -> np.ndarray:
        """Rows ``offsets`` of tensor ``name`` (of a ``[n, K, ...]`` tensor: view ``views[i]`` of each row)."""
        begin, dtype, shape = self.columns[name]
        inner = shape[2:] if views is not None else shape[1:]
        item = int(np.prod(inner, dtype=np.int64)) * dtype.itemsize
        slot = offsets * shape[1] + views if views is not None else offsets
        positions = self.base + begin + slot.astype(np.int64) * item
        order = np.argsort(positions, kind="stable")
        sorted_pos = positions[order]
        breaks = np.nonzero(np.diff(sorted_pos) != item)[0] + 1  # runs of consecutive rows: one read each
        starts, ends = np.concatenate([[0], breaks]), np.concatenate([breaks, [len(sorted_pos)]])
        flat = np.empty((len(sorted_pos), item), dtype=np.uint8)
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            data = os.pread(fd, (b - a) * item, int(sorted_pos[a]))
            if len(data) != (b - a) * item:
                raise CacheError(f"shard {self.path} is shorter than its header says: the cache is damaged; rebuild it")
            flat[a:b] = np.frombuffer(data, dtype=np.uint8).reshape(b - a, item)
        out = np.empty_like(flat)
        out[order] = flat
        return out.view(dtype).reshape(len(offsets), *inner)


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
        damaged = damaged_shards(self.directory, manifest["shards"], quick=True)  # at opening, before training
        if damaged:
            raise CacheError(
                f"the teacher cache at {self.directory} is damaged ({'; '.join(why for _, why in damaged)}); run "
                f"`vldistill cache` with the same recipe or arguments to recompute those shards, or rebuild it "
                f"(--rebuild)"
            )
        self._fds: OrderedDict[int, int] = OrderedDict()
        entries = [manifest["teachers"][k] for k in self._columns]
        self.dims = tuple(ModelDims(**t["dims"]) for t in entries)
        self._out_dtypes = [DTYPES.get(t["dtype"], torch.float32) for t in entries]
        self._shards = [_Shard(self.directory / s["file"], s["bytes"]) for s in manifest["shards"]]
        self._rows = self._locate(dataset)
        self.views = self._view_table() if manifest["augmentation"]["views"] > 1 else None

    # ------------------------------------------------------------------------------------------ opening
    def _locate(self, dataset) -> _RowTable:
        """Shard and offset of every dataset row: by arithmetic when the dataset is the one the cache was built on
        (no table held: constant memory however many rows), else found by content digest (16 bytes per row)."""
        info = self.manifest["dataset"]
        stored = self.manifest.get("source_shards")
        # tar shards: the same shard files (name, size, SHA-256; the stored digest trusted while a shard's size and
        # time are unchanged) hold the same rows in the same order: no row is read
        same_rows = stored and hasattr(dataset, "shard_fingerprint") and len(dataset) == info["rows"]
        if same_rows and _stable(stored) is not None and _stable(dataset.shard_fingerprint(stored)) == _stable(stored):
            return _RowTable(len(dataset), self.manifest["shard_rows"])
        digests = dataset_digests(dataset, info["fields"])
        n = len(digests)
        if fingerprint(digests) == info["fingerprint"]:  # the very data it was built on: row i is cached row i
            return _RowTable(n, self.manifest["shard_rows"])
        where: dict[bytes, tuple[int, int]] = {}
        for s, shard in enumerate(self._shards):
            keys = shard.read(self._fd(s), "row_key", np.arange(shard.columns["row_key"][2][0]), None)
            for offset, key in enumerate(keys):
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
        return _RowTable(n, self.manifest["shard_rows"], np.array(found, dtype=np.int64).reshape(n, 2))

    def teacher_entries(self) -> list[dict[str, Any]]:
        """The manifest's entries of the run's teachers, in the run's order (what identifies their outputs)."""
        return [self.manifest["teachers"][k] for k in self._columns]

    def where(self, index: Tensor, teacher: int = 0) -> str:
        """The shard files and rows that hold the cached outputs of dataset rows ``index`` (for error messages)."""
        rows = index.cpu().numpy()
        shard, offset = self._rows[rows]
        files = self.manifest["shards"]
        found = [f"{files[s]['file']} row {o}" for s, o in zip(shard.tolist(), offset.tolist(), strict=True)]
        more = f" and {len(found) - 4} more" if len(found) > 4 else ""
        return f"cache {self.directory}, column t{self._columns[teacher]}: {', '.join(found[:4])}{more}"

    def _view_table(self) -> ViewTable:
        return ViewTable(self._gather("views", np.arange(len(self._rows)), None))

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
        """Rows (and views) of one tensor, read shard by shard (:meth:`_Shard.read`)."""
        if name not in self._shards[0].columns:
            raise CacheError(f"the teacher cache at {self.directory} has no {name!r}")
        shard, offset = self._rows[rows]
        _, dtype, shape = self._shards[0].columns[name]
        out = np.empty((len(rows), *shape[1 + (views is not None) :]), dtype=dtype)
        for s in np.unique(shard).tolist():
            sel = np.nonzero(shard == s)[0]
            out[sel] = self._shards[s].read(self._fd(s), name, offset[sel], None if views is None else views[sel])
        return torch.from_numpy(out).view(self._shards[0].dtypes[name])

    def _fd(self, shard: int) -> int:
        """An open descriptor of a shard's file; at most :data:`OPEN_FILES` stay open (the least recently read are
        closed)."""
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self._shards[shard].path, os.O_RDONLY)
            while len(self._fds) > OPEN_FILES:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(shard)
        return fd

    def __getstate__(self) -> dict[str, Any]:  # a copy (or a pickled one) opens its own files
        return {**self.__dict__, "_fds": OrderedDict()}

    def close(self) -> None:
        """Close the shard files (reading again reopens them)."""
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


def cached_teacher_entries(
    directory: str | os.PathLike, teachers: Sequence[dict[str, Any]], fields: Sequence[Sequence[str]]
) -> list[dict[str, Any]]:
    """The manifest entries of a cache's columns for these teachers (identities and text fields, as
    :class:`CachedTeachers` takes them), without reading the dataset: what identifies their outputs."""
    manifest = read_manifest(Path(directory))
    if manifest is None:
        raise CacheError(f"no teacher cache at {directory} (no {MANIFEST}): build it with `vldistill cache`")
    columns = _match_teachers(manifest["teachers"], list(teachers), [list(f) for f in fields])
    return [manifest["teachers"][k] for k in columns]


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


def _stable(shards: list[dict[str, Any]]) -> list[tuple[str, int, str]] | None:
    """What two tar-shard fingerprints must agree on: each shard's name, size and SHA-256, in order (``None`` for
    entries without them, such as a streamed ``hf:`` source's counts: never trusted without reading the rows)."""
    if not all("sha256" in s and "name" in s for s in shards):
        return None
    return [(s["name"], s["bytes"], s["sha256"]) for s in shards]
