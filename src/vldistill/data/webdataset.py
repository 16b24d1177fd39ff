"""Image-caption pairs in webdataset tar shards, as img2dataset writes them (CC3M, CC12M, LAION).

A spec is a local path or a brace pattern, ``wds:`` optional: ``data/cc12m/{00000..01242}.tar``. Each shard holds
samples as consecutive members sharing a key: ``KEY.jpg`` (or ``.jpeg``, ``.png``, ``.webp``), ``KEY.txt`` (the
caption, in ``language``) and optionally ``KEY.json`` (metadata; its ``label`` is used when it is an integer).

**Random access over tar shards.** :class:`TarPairs` scans each shard's tar *headers* once (``tarfile``, seeking over
the data) and keeps, per sample, the shard and the offsets and sizes of its image, caption and metadata: seven int64 (56
bytes) per sample, never an image (so 0.8 GB per process at 15M samples: not constant memory). An item reads its members
with ``os.pread`` and decodes the image. So it serves the cache build (which needs fixed rows per cache shard, whichever
process computes it) and the trainer's random batches as a map-style dataset. Why not the ``webdataset`` package here:
it streams each shard from start to end (``IterableDataset``) and has no random access; :func:`iter_shard` uses it for
sequential reading.

**Cheap, stable fingerprint.** :meth:`TarPairs.shard_fingerprint` lists every shard with its name, size, modification
time and SHA-256 (one sequential read per shard, no decoding). A cache stores it; opening the cache compares the
names and sizes, trusts the stored SHA-256 of a shard whose size and modification time are unchanged (as ``make`` and
``rsync`` do), and hashes again only the shards whose time changed (a copied dataset: one read of each shard, still no
decoding). A shard whose bytes changed (one caption edited) has another SHA-256: the cache then checks every row by
content and refuses the rows it lacks. Not caught: an edit that keeps a shard's size and whose modification time is set
back by hand.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import Dataset

from .pairs import DataError, to_rgb

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def is_tar_spec(spec: str) -> bool:
    """Whether a data spec names webdataset tar shards (``wds:...`` or a path ending in ``.tar``)."""
    return spec.startswith("wds:") or spec.endswith(".tar")


def expand_shards(spec: str) -> list[Path]:
    """The shard files of a spec (``wds:`` prefix optional, brace patterns expanded), each checked to exist."""
    pattern = spec.removeprefix("wds:")
    paths = [Path(p) for p in braceexpand(pattern)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"data spec {spec!r}: {len(missing)} of {len(paths)} tar shards not found (first: {missing[0]})"
        )
    return paths


def _key_and_ext(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{directory}/{key}" if directory else key), ext.lower()


def _index_shard(path: Path, shard: int) -> list[tuple[int, ...]]:
    """``(shard, image offset, image size, text offset, text size, json offset, json size)`` per sample of a shard,
    from its tar headers only; a sample without an image or a caption is an error naming the shard and key."""
    rows: list[tuple[int, ...]] = []
    current: dict[str, Any] = {}

    def close() -> None:
        if not current:
            return
        key = current["key"]
        if "image" not in current or "txt" not in current:
            lacking = "an image (.jpg/.png/.webp)" if "image" not in current else "a caption (.txt)"
            raise DataError(f"{path}: sample {key!r} has no {lacking}; it has {sorted(current['exts'])}")
        js = current.get("json", (-1, 0))
        rows.append((shard, *current["image"], *current["txt"], *js))

    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _key_and_ext(member.name)
                if current.get("key") != key:
                    close()
                    current = {"key": key, "exts": []}
                current["exts"].append(ext)
                where = (member.offset_data, member.size)
                if ext in IMAGE_EXTENSIONS:
                    current["image"] = where
                elif ext in ("txt", "json"):
                    current[ext] = where
            close()
    except tarfile.TarError as err:
        raise DataError(f"{path}: not a readable tar shard ({err})") from err
    return rows


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class TarPairs(Dataset):
    """Image-caption pairs read from webdataset tar shards by offset (see the module docstring).

    Items are dicts ``{"index", "image": PIL RGB, "captions": {language: str}, "label"}`` as a
    :class:`~vldistill.data.PairDataset` gives. Images are decoded when an item is read, not at construction: a bad
    image fails when it is read, naming the shard and the sample.

    Args:
        spec: the shards (``wds:`` optional, brace patterns).
        language: the language of the ``.txt`` captions.
        limit: keep the first ``limit`` samples.
    """

    def __init__(self, spec: str, language: str = "en", limit: int | None = None):
        self.source = spec
        self.shards = expand_shards(spec)
        self.languages = [language]
        rows = [row for i, path in enumerate(self.shards) for row in _index_shard(path, i)]
        if not rows:
            raise DataError(f"data spec {spec!r}: the tar shards hold no samples")
        if limit is not None:
            rows = rows[:limit]
        self._index = np.asarray(rows, dtype=np.int64)
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._index)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own files
        return {**self.__dict__, "_fds": {}}

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return os.pread(fd, size, offset)

    def raw(self, index: int) -> tuple[bytes, str, dict[str, Any]]:
        """The encoded image bytes, the caption and the metadata of a sample (nothing decoded)."""
        shard, io_, is_, to, ts, jo, js = (int(v) for v in self._index[index])
        image = self._read(shard, io_, is_)
        caption = self._read(shard, to, ts).decode("utf-8").strip()
        meta = json.loads(self._read(shard, jo, js)) if jo >= 0 else {}
        return image, caption, meta

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = range(len(self))[index]
        data, caption, meta = self.raw(index)
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                image = to_rgb(img)
        except Exception as err:
            where = self.shards[self._index[index, 0]]
            raise DataError(f"{where} sample {index}: image cannot be decoded ({err})") from err
        label = meta.get("label", -1) if isinstance(meta.get("label", -1), int) else -1
        return {"index": index, "image": image, "captions": {self.languages[0]: caption}, "label": label}

    def row_digests(self, fields: Sequence[str], rows: Sequence[int] | None = None) -> np.ndarray:
        """``[n, 16]`` uint8 row digests as :func:`vldistill.cache.sample_digest` computes them (the image's encoded
        bytes, then the caption per field), reading each row's members without decoding."""
        rows = range(len(self)) if rows is None else rows
        out = np.empty((len(rows), 16), dtype=np.uint8)
        for j, i in enumerate(rows):
            data, caption, _ = self.raw(i)
            h = hashlib.blake2b(data, digest_size=16)
            for name in fields:
                if name != self.languages[0]:
                    raise DataError(f"languages: the tar shards have captions in {self.languages}, not {name!r}")
                h.update(b"\0" + name.encode() + b"\0" + caption.encode())
            out[j] = np.frombuffer(h.digest(), dtype=np.uint8)
        return out

    def shard_fingerprint(self, known: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Per shard: name, size, modification time (ns) and SHA-256 of its bytes. A shard of ``known`` (a stored
        fingerprint) with the same name, size and time keeps its stored SHA-256 without being read."""
        stored = {(k["name"], k["bytes"], k["mtime_ns"]): k["sha256"] for k in known or []}
        out = []
        for path in self.shards:
            st = path.stat()
            key = (path.name, st.st_size, st.st_mtime_ns)
            digest = stored.get(key) or file_sha256(path)
            out.append({"name": path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest})
        return out

    def __repr__(self) -> str:
        return f"TarPairs({len(self)} samples in {len(self.shards)} shards, source={self.source!r})"


def iter_shard(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The samples of one shard in order, streamed with the ``webdataset`` package (``{"__key__", "jpg", "txt",
    ...}``, raw bytes): for sequential tools that need no random access."""
    import webdataset as wds

    yield from wds.WebDataset(str(path), shardshuffle=False)
