"""Image-caption pairs in webdataset tar shards, as img2dataset writes them (CC3M, CC12M, LAION).

A spec is a local path or a brace pattern, ``wds:`` optional: ``data/cc12m/{00000..01242}.tar``. Each shard holds
samples as consecutive members sharing a key: ``KEY.jpg`` (or ``.jpeg``, ``.png``, ``.webp``), ``KEY.txt`` (the
caption, in ``language``) and optionally ``KEY.json`` (metadata; its ``label`` is used when it is an integer).

**Random access over tar shards.** :class:`TarPairs` scans each shard's tar *headers* once (``tarfile``, seeking over
the data) and keeps one sample count per shard; the per-sample index of a shard (the offsets and sizes of each
sample's image, caption and metadata: seven int64) is kept for the few shards read last and scanned again when
another shard is read, so memory does not grow with the number of samples (a cache build reads the rows in order,
so each shard is scanned about once more; random access over many shards scans often). An item reads its members
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
back by hand. The fingerprint also stores each shard's sample count (``rows``), so that a stream over the same shards
finds each sample's cache row without scanning the shards.

**Streaming for training.** :class:`TarStream` reads the same shards as a stream (:mod:`vldistill.data.streaming`:
each process and DataLoader worker its own shards, a bounded shuffle buffer, reshuffled every epoch): what ``vldistill
fit`` trains on from ``wds:`` data (``data.streaming``). It holds the shard list and one count per shard, never a
per-sample index. It reads each shard from start to end with the ``webdataset`` package's tar iterators
(:func:`iter_shard`); ``webdataset.WebDataset`` itself is not used because its own node and worker splitting and its
shuffle cannot be replayed from a micro-batch number (what a resumed run needs). A sample's ``index`` is its row in the
shards' order, the row a cache built on the shards stores it at, found from the per-shard counts (from the cache's
manifest when it has them, else from one scan of the shards' tar headers, which reads no image); its ``key`` is
``SHARD/__key__``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import Dataset

from .pairs import DataError, Sample, to_rgb
from .streaming import ShardStream

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


def _check_fields(fields: Sequence[str], languages: Sequence[str]) -> None:
    for name in fields:
        if name not in languages:
            raise DataError(f"languages: the tar shards have captions in {list(languages)}, not {name!r}")


def _row_digest(image: bytes, caption: str, language: str, fields: Sequence[str]) -> bytes:
    """A tar sample's row digest: :func:`vldistill.cache.sample_digest` of its encoded image and caption."""
    from ..cache.fingerprint import sample_digest  # the cache's own hash; imported when a cache asks

    return sample_digest(Sample(language, {language: caption}, data=image), fields)


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

    INDEXED_SHARDS = 8
    """Per-sample indexes of this many shards are kept (the most recently read); the others are scanned again."""

    def __init__(self, spec: str, language: str = "en", limit: int | None = None):
        self.source = spec
        self.shards = expand_shards(spec)
        self.languages = [language]
        self._indexed: OrderedDict[int, np.ndarray] = OrderedDict()
        counts = []
        for i, path in enumerate(self.shards):
            rows = np.asarray(_index_shard(path, i), dtype=np.int64).reshape(-1, 7)
            counts.append(len(rows))
            self._keep(i, rows)
        self.shard_rows = counts  # whole shards, before ``limit``: what a fingerprint stores
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        total = int(self._starts[-1])
        if not total:
            raise DataError(f"data spec {spec!r}: the tar shards hold no samples")
        self._len = total if limit is None else min(limit, total)
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return self._len

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own files
        return {**self.__dict__, "_fds": {}}

    def _keep(self, shard: int, rows: np.ndarray) -> None:
        """Keep a shard's index as the most recently read; forget the oldest beyond :attr:`INDEXED_SHARDS`."""
        self._indexed[shard] = rows
        self._indexed.move_to_end(shard)
        while len(self._indexed) > self.INDEXED_SHARDS:
            self._indexed.popitem(last=False)

    def _row(self, index: int) -> np.ndarray:
        """The ``(shard, image offset, image size, text offset, text size, json offset, json size)`` of a sample:
        from the index of its shard, which is scanned again (its tar headers) when it is not among the
        :attr:`INDEXED_SHARDS` kept, so memory does not grow with the number of samples."""
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        rows = self._indexed.get(shard)
        if rows is None:
            rows = np.asarray(_index_shard(self.shards[shard], shard), dtype=np.int64).reshape(-1, 7)
            if len(rows) != self.shard_rows[shard]:
                raise DataError(
                    f"{self.shards[shard]}: {len(rows)} samples now, {self.shard_rows[shard]} when the data was "
                    f"opened; the shard changed while it was read"
                )
        self._keep(shard, rows)
        return rows[index - self._starts[shard]]

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return os.pread(fd, size, offset)

    def raw(self, index: int) -> tuple[bytes, str, dict[str, Any]]:
        """The encoded image bytes, the caption and the metadata of a sample (nothing decoded)."""
        shard, io_, is_, to, ts, jo, js = (int(v) for v in self._row(index))
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
            where = self.shards[int(self._row(index)[0])]
            raise DataError(f"{where} sample {index}: image cannot be decoded ({err})") from err
        label = meta.get("label", -1) if isinstance(meta.get("label", -1), int) else -1
        return {"index": index, "image": image, "captions": {self.languages[0]: caption}, "label": label}

    def row_digests(self, fields: Sequence[str], rows: Sequence[int] | None = None) -> np.ndarray:
        """``[n, 16]`` uint8 row digests as :func:`vldistill.cache.sample_digest` computes them (the image's encoded
        bytes, then the caption per field), reading each row's members without decoding."""
        _check_fields(fields, self.languages)
        rows = range(len(self)) if rows is None else rows
        out = np.empty((len(rows), 16), dtype=np.uint8)
        for j, i in enumerate(rows):
            data, caption, _ = self.raw(i)
            out[j] = np.frombuffer(_row_digest(data, caption, self.languages[0], fields), dtype=np.uint8)
        return out

    def shard_fingerprint(
        self, known: Sequence[dict[str, Any]] | None = None, subset: Sequence[int] | None = None
    ) -> list[dict[str, Any]]:
        """Per shard: name, size, modification time (ns), SHA-256 of its bytes and sample count. A shard of ``known``
        (a stored fingerprint) with the same name, size and time keeps its stored SHA-256 without being read. With
        ``subset``, only those shards (a share of the work of one process of several)."""
        chosen = range(len(self.shards)) if subset is None else subset
        return shard_fingerprint([self.shards[i] for i in chosen], known, [self.shard_rows[i] for i in chosen])

    def __repr__(self) -> str:
        return f"TarPairs({len(self)} samples in {len(self.shards)} shards, source={self.source!r})"


def shard_fingerprint(
    shards: Sequence[Path], known: Sequence[dict[str, Any]] | None, rows: Sequence[int] | None
) -> list[dict[str, Any]]:
    """See :meth:`TarPairs.shard_fingerprint`; ``rows``: the sample count of each shard, when known."""
    stored = {(k["name"], k["bytes"], k["mtime_ns"]): k["sha256"] for k in known or [] if "sha256" in k}
    out = []
    for i, path in enumerate(shards):
        st = path.stat()
        key = (path.name, st.st_size, st.st_mtime_ns)
        digest = stored.get(key) or file_sha256(path)
        entry = {"name": path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        if rows is not None:
            entry["rows"] = int(rows[i])
        out.append(entry)
    return out


def iter_shard(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The samples of one shard in order (``{"__key__", "__url__", "jpg", "txt", ...}``, raw bytes), read with the
    ``webdataset`` package's tar iterators: for sequential tools that need no random access. (Not
    ``webdataset.WebDataset``: it splits its shards over the processes and workers itself, which a caller that chose
    the shard does not want, and refuses to run in a multi-node job without a node splitter.)"""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with open(path, "rb") as f:
        yield from group_by_keys(tar_file_expander([{"stream": f, "url": str(path)}]))


class TarStream(ShardStream):
    """Image-caption pairs streamed from webdataset tar shards at constant memory (see the module docstring and
    :mod:`vldistill.data.streaming`). Items are ``{"index", "key", "image": PIL RGB, "captions": {language: str},
    "label"}``, like :class:`TarPairs` items (same ``index``) plus the sample's ``key``.

    Args:
        spec: the shards (``wds:`` optional, brace patterns).
        language: the language of the ``.txt`` captions.
        shuffle_buffer: samples each worker shuffles within (``data.shuffle_buffer``).
    """

    def __init__(self, spec: str, language: str = "en", shuffle_buffer: int = 1000):
        super().__init__(shuffle_buffer)
        self.source = spec
        self.shards = expand_shards(spec)
        self.languages = [language]
        self._counts: list[int | None] = [None] * len(self.shards)

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def shard_samples(self, shard: int) -> Iterator[dict[str, Any]]:
        for sample in iter_shard(self.shards[shard]):
            image = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
            if image is None or "txt" not in sample:
                lacking = "an image (.jpg/.png/.webp)" if image is None else "a caption (.txt)"
                have = sorted(k for k in sample if not k.startswith("__"))
                raise DataError(f"{self.shards[shard]}: sample {sample['__key__']!r} has no {lacking}; it has {have}")
            yield sample

    def decode(self, raw: dict[str, Any], shard: int, position: int) -> dict[str, Any]:
        key = f"{self.shards[shard].name}/{raw['__key__']}"
        data = next(raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw)
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                image = to_rgb(img)
        except Exception as err:
            raise DataError(f"{self.shards[shard]} sample {raw['__key__']!r}: image cannot be decoded ({err})") from err
        meta = json.loads(raw["json"]) if "json" in raw else {}
        label = meta.get("label", -1) if isinstance(meta.get("label", -1), int) else -1
        caption = raw["txt"].decode("utf-8").strip()
        return {"key": key, "image": image, "captions": {self.languages[0]: caption}, "label": label}

    def shard_counts(self) -> list[int]:
        """Samples per shard: adopted from a cache's fingerprint (:meth:`adopt_counts`), else counted from the tar
        headers (no image read), once."""
        for i, count in enumerate(self._counts):
            if count is None:
                self._counts[i] = len(_index_shard(self.shards[i], i))
        return self._counts  # type: ignore[return-value]

    def adopt_counts(self, known: Sequence[dict[str, Any]] | None) -> int:
        """Take the sample counts of the shards that a stored fingerprint (a cache manifest's ``source_shards``)
        lists with the same name, size and modification time; returns how many were taken."""
        known = [k for k in known or [] if "rows" in k and "name" in k]  # tar shards' entries (not an hf: stream's)
        stored = {(k["name"], k["bytes"], k["mtime_ns"]): k["rows"] for k in known}
        taken = 0
        for i, path in enumerate(self.shards):
            st = path.stat()
            rows = stored.get((path.name, st.st_size, st.st_mtime_ns))
            if rows is not None and self._counts[i] is None:
                self._counts[i], taken = int(rows), taken + 1
        return taken

    def __len__(self) -> int:
        return sum(self.shard_counts())

    def shard_fingerprint(self, known: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """As :meth:`TarPairs.shard_fingerprint` (the same shards give the same fingerprint)."""
        self.adopt_counts(known)
        return shard_fingerprint(self.shards, known, self.shard_counts())

    def raw_digest(self, raw: dict[str, Any], fields: Sequence[str]) -> bytes:
        """As :meth:`TarPairs.row_digests` hashes a row (the image's encoded bytes, then the caption per field)."""
        data = next(raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw)
        return _row_digest(data, raw["txt"].decode("utf-8").strip(), self.languages[0], fields)

    def captions(self, languages: Sequence[str], limit: int) -> list[str]:
        """The first ``limit`` captions in the shards' order (a tokenizer's corpus), read without decoding images."""
        out: list[str] = []
        for shard in range(self.n_shards):
            for sample in self.shard_samples(shard):
                if len(out) >= limit:
                    return out
                if self.languages[0] in languages:
                    out.append(sample["txt"].decode("utf-8").strip())
        return out

    def __repr__(self) -> str:
        return f"TarStream({len(self.shards)} shards, source={self.source!r}, shuffle_buffer={self.shuffle_buffer})"
