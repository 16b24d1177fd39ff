"""Streaming training data: samples read shard by shard at constant memory, each process and each DataLoader worker
reading only its own shards.

A :class:`ShardStream` is a list of shards, each read from start to end (webdataset tar shards:
:class:`~vldistill.data.webdataset.TarStream`; a streaming Hugging Face dataset: :class:`~vldistill.data.hf.HfStream`).
The trainer draws its micro-batches from :meth:`ShardStream.batches`:

- **Split by process, then by worker.** Every epoch the shard list is permuted with (seed, stage, epoch), the same
  permutation on every process; process ``r`` of ``P`` takes the shards at positions ``r, r + P, ...`` of it, and
  DataLoader worker ``w`` of ``W`` of that process every ``W``-th of those. No process or worker opens another's
  shards. A stream needs at least ``P x W`` shards (an error says so otherwise).
- **Reshuffled every epoch with the seed**: the shard order above, then a bounded shuffle buffer of
  ``data.shuffle_buffer`` samples per worker (seeded by seed, stage, epoch, process and worker). A worker holds at
  most that many encoded samples, whatever the size of the data: memory does not grow with the number of samples.
- **Endless, per worker.** When a worker has read its share of an epoch it starts its share of the next one, so
  processes with unequal shares take the same number of steps and none waits for another. An *epoch* is therefore
  one worker's pass over its own shards, not a global barrier.
- **A micro-batch is a pure function** of (seed, stage, micro-batch number, processes ``P``, workers ``W``,
  batch size): worker ``w`` fills the micro-batches ``w, w + W, ...`` (the DataLoader takes them in turn).
- **Resume replays deterministically.** A run resumed at micro-batch ``m`` of a stage starts each worker where the
  uninterrupted run's worker was: whole epochs before that point are skipped without reading when the shards'
  sample counts are known (always for tar shards), and within the current epoch the worker re-reads and drops the
  samples it had already yielded (the shuffle buffer's state depends on them; images are not decoded). So a
  resumed run sees exactly the batches an uninterrupted one would, *if it runs with the same number of processes
  and workers* (``VLDISTILL_WORKERS``); with other numbers it is deterministic but sees another order. The replay
  costs one sequential read of at most one epoch's share of the shards per worker.

Each sample's ``index`` is its row in the shards' order (shard by shard, in the listed order) when the per-shard
sample counts are known: that is the row a teacher-output cache built on the same shards stores it at. With unknown
counts (a streaming Hugging Face dataset) it is ``shard * 2**40 + position``: unique and stable, not a cache row.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .pairs import DataError

_UNKNOWN_SHIFT = 40  # index = shard << 40 | position when the per-shard counts are unknown


class ShardStream(IterableDataset):
    """Samples read shard by shard (see the module docstring). Subclasses give :attr:`n_shards`,
    :meth:`shard_samples` (a shard's raw samples, in order, nothing decoded) and :meth:`decode` (a raw sample to an
    item ``{"image", "captions", "label", "key"}``), and :meth:`shard_counts` when the counts are known.

    Iterating the stream itself yields every sample once, in the shards' order (what tools that read the data once
    need: a tokenizer's corpus, row digests); training uses :meth:`batches`.

    Args:
        shuffle_buffer: samples a worker holds to shuffle within and across its shards (0 or 1: no shuffle within
            shards; the shard order is still shuffled every epoch).
    """

    streaming = True
    languages: list[str]
    source: str

    def __init__(self, shuffle_buffer: int = 1000):
        if shuffle_buffer < 0:
            raise DataError(f"data.shuffle_buffer = {shuffle_buffer}: give 0 (no buffer) or more samples")
        self.shuffle_buffer = shuffle_buffer

    # ------------------------------------------------------------------------------------------ for subclasses
    @property
    def n_shards(self) -> int:
        raise NotImplementedError

    def shard_samples(self, shard: int) -> Iterator[Any]:
        raise NotImplementedError

    def decode(self, raw: Any, shard: int, position: int) -> dict[str, Any]:
        raise NotImplementedError

    def shard_counts(self) -> list[int] | None:
        """Samples per shard, when known (``None`` otherwise)."""
        return None

    def count_shards(self) -> list[int]:
        """Samples per shard, counted by reading the shards that are not known yet (nothing decoded)."""
        counts = self.shard_counts()
        if counts is None:
            raise NotImplementedError
        return counts

    def raw_digest(self, raw: Any, fields: Sequence[str]) -> bytes:
        """A raw sample's 16-byte row digest (its encoded image bytes, then its caption per field), the same as
        :func:`vldistill.cache.sample_digest` gives the sample read map-style."""
        raise NotImplementedError

    def row_digests(self, fields: Sequence[str], rows: Sequence[int] | None = None) -> np.ndarray:
        """``[n, 16]`` uint8 row digests of every row, or of ``rows`` (a contiguous range: one process's share of a
        cache build), by one sequential read of the shards that hold them, no image decoded. Reading every row also
        checks the shard counts the stream holds (adopted from a cache's manifest) against the data."""
        for name in fields:
            if name not in self.languages:
                raise DataError(f"languages: {self.source} has captions in {self.languages}, not {name!r}")
        if rows is not None and len(rows):
            contiguous = rows.step == 1 if isinstance(rows, range) else bool(np.all(np.diff(np.asarray(rows)) == 1))
            if not contiguous:
                raise DataError(f"{self.source}: a stream gives the digests of a contiguous range of rows only")
        known = self.shard_counts()
        counts = known if rows is not None else None
        if rows is not None and counts is None:
            counts = self.count_shards()
        first, last = (rows[0], rows[0] + len(rows)) if rows is not None else (0, None)
        out, start, found = [], 0, []
        for shard in range(self.n_shards):
            if counts is not None and (start + counts[shard] <= first or (last is not None and start >= last)):
                start += counts[shard]
                continue
            n = 0
            for raw in self.shard_samples(shard):
                if last is None or first <= start + n < last:
                    out.append(self.raw_digest(raw, fields))
                n += 1
            found.append(n)
            start += n
        if rows is None and known is not None and found != list(known):
            bad = next(i for i, (a, b) in enumerate(zip(found, known, strict=True)) if a != b)
            raise DataError(
                f"{self.source}: shard {bad} holds {found[bad]} samples, the teacher cache's manifest says "
                f"{known[bad]}: the data changed since the cache was built; rebuild the cache"
            )
        if not out:
            return np.empty((0, 16), dtype=np.uint8)
        return np.frombuffer(b"".join(out), dtype=np.uint8).reshape(len(out), 16).copy()

    # ------------------------------------------------------------------------------------------ reading in order
    def index_of(self, shard: int, position: int) -> int:
        """A sample's ``index`` (see the module docstring)."""
        offsets = self.__dict__.get("_offsets")
        if offsets is None:
            counts = self.shard_counts()
            if counts is None:
                return (shard << _UNKNOWN_SHIFT) | position
            offsets = self._offsets = [0, *itertools.accumulate(counts)][:-1]
        return offsets[shard] + position

    def item(self, raw: Any, shard: int, position: int) -> dict[str, Any]:
        return {**self.decode(raw, shard, position), "index": self.index_of(shard, position)}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for shard in range(self.n_shards):
            for position, raw in enumerate(self.shard_samples(shard)):
                yield self.item(raw, shard, position)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The ``index``-th sample in the shards' order, found by reading from the start: for checks on the first
        samples, not for training (which reads through :meth:`batches`)."""
        if index < 0:
            raise IndexError(f"{self.source}: a stream is read from its start; index {index} is not supported")
        for i, item in enumerate(self):
            if i == index:
                return item
        raise IndexError(f"{self.source}: index {index} is past the end of the stream")

    # ------------------------------------------------------------------------------------------ training order
    def share(self, seed: int, stage: int, epoch: int, rank: int, world: int, worker: int, workers: int) -> list[int]:
        """The shards one worker of one process reads in an epoch, in reading order."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + stage * 10_007 + epoch)
        order = torch.randperm(self.n_shards, generator=g).tolist()
        return order[rank::world][worker::workers]

    def worker_samples(
        self, seed: int, stage: int, rank: int, world: int, worker: int, workers: int, skip: int = 0
    ) -> Iterator[tuple[Any, int, int, int]]:
        """``(raw, shard, position, epoch)`` of one worker's endless stream, after dropping its first ``skip``."""
        if self.n_shards < world * workers:
            raise DataError(
                f"{self.source}: {self.n_shards} shards cannot be split over {world} processes x {workers} DataLoader "
                f"workers (each reads its own shards); use fewer workers (VLDISTILL_WORKERS) or more, smaller shards"
            )
        counts = self.shard_counts()
        for epoch in itertools.count():
            mine = self.share(seed, stage, epoch, rank, world, worker, workers)
            if skip and counts is not None and sum(counts[s] for s in mine) <= skip:
                skip -= sum(counts[s] for s in mine)  # a whole epoch before the resume point: nothing read
                continue
            rng = random.Random(f"{seed}/{stage}/{epoch}/{rank}/{worker}")  # str seeds: the same in every process
            read = 0
            for raw, shard, position in self._buffered(mine, rng):
                read += 1
                if skip:
                    skip -= 1
                    continue
                yield raw, shard, position, epoch
            if not read:
                raise DataError(f"{self.source}: the shards {mine} of this worker hold no samples")

    def _buffered(self, shards: Sequence[int], rng: random.Random) -> Iterator[tuple[Any, int, int]]:
        size, buffer = self.shuffle_buffer, []
        for shard in shards:
            for position, raw in enumerate(self.shard_samples(shard)):
                entry = (raw, shard, position)
                if size <= 1:
                    yield entry
                elif len(buffer) < size:
                    buffer.append(entry)
                else:
                    j = rng.randrange(size)
                    buffer[j], entry = entry, buffer[j]
                    yield entry
        rng.shuffle(buffer)
        yield from buffer

    def batches(
        self, batch_size: int, seed: int, stage: int, start: int = 0, rank: int = 0, world: int = 1, views: int = 1
    ) -> StreamBatches:
        """The micro-batches (lists of items) of one process in one stage, from micro-batch ``start`` on."""
        self.shard_counts()  # counted here, once, not in every worker
        return StreamBatches(self, batch_size, seed, stage, start, rank, world, views)


def stream_view(seed: int, index: int, epoch: int, views: int) -> int:
    """The stored view a streamed sample uses in an epoch: every view once per ``views`` epochs, from a per-sample
    offset hashed from (seed, index) (a stream keeps no per-sample table)."""
    if views <= 1:
        return 0
    mixed = (index * 0x9E3779B97F4A7C15 + seed * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    mixed ^= mixed >> 31
    return (epoch + mixed) % views


class StreamBatches(IterableDataset):
    """One process's micro-batches of a stage: worker ``w`` of ``W`` fills the micro-batches ``start + w,
    start + w + W, ...`` from the worker stream that filled them in a run started at 0 (see the module docstring).
    Items carry ``view`` (a cache's stored view, 0 without) and ``epoch``."""

    def __init__(self, stream: ShardStream, batch_size, seed, stage, start, rank, world, views):
        self.stream, self.batch_size, self.seed, self.stage = stream, batch_size, seed, stage
        self.start, self.rank, self.world, self.views = start, rank, world, views

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        original = (worker + self.start) % workers  # the worker of a run started at 0 whose batches these are
        done = (self.start + worker) // workers  # micro-batches that worker had filled before ``start``
        samples = self.stream.worker_samples(
            self.seed, self.stage, self.rank, self.world, original, workers, skip=done * self.batch_size
        )
        while True:
            chunk = list(itertools.islice(samples, self.batch_size))
            batch = []
            for raw, shard, position, epoch in chunk:
                item = self.stream.item(raw, shard, position)
                item["view"] = stream_view(self.seed, item["index"], epoch, self.views)
                item["epoch"] = epoch
                batch.append(item)
            yield batch


class StreamRows(Dataset):
    """A stream's samples as map-style rows, to build a teacher cache from a streamed source (``vldistill cache`` on
    ``hf:`` data with ``data.streaming: true``): row ``i`` is the ``i``-th sample in the shards' order, which is the
    ``index`` the same stream gives it in training once it holds the cache's shard counts.

    It holds one count per shard and one open shard reader, never a per-sample table. A row is read by continuing
    the open shard's reader, or by opening its shard and skipping (reading, not decoding) the samples before it, so
    reading rows in order, as a cache build does, reads each shard about once. With DataLoader workers each worker
    reads past the other workers' batches. The shard counts are taken from the stream, or counted once by reading
    every shard without decoding (on every process of a distributed build).
    """

    def __init__(self, stream: ShardStream):
        self.stream, self.source, self.languages = stream, stream.source, stream.languages
        self.counts = list(stream.count_shards())
        self._starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._reader: list[Any] | None = None  # [shard, next position, iterator]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict[str, Any]:  # a DataLoader worker opens its own reader
        return {**self.__dict__, "_reader": None}

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = range(len(self))[index]
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        position = index - int(self._starts[shard])
        reader = self._reader
        if reader is None or reader[0] != shard or reader[1] > position:
            reader = self._reader = [shard, 0, iter(self.stream.shard_samples(shard))]
        try:
            while reader[1] < position:
                next(reader[2])
                reader[1] += 1
            raw = next(reader[2])
        except StopIteration:
            raise DataError(
                f"{self.source}: shard {shard} ended before its sample {position} (it held {self.counts[shard]} when "
                "counted): the data changed while it was read"
            ) from None
        reader[1] += 1
        return {**self.stream.decode(raw, shard, position), "index": index}

    def row_digests(self, fields: Sequence[str], rows: Sequence[int] | None = None) -> np.ndarray:
        return self.stream.row_digests(fields, rows)

    def shard_fingerprint(self, known: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """What a cache's manifest stores of the stream's shards: each one's sample count, which a stream training
        from the cache adopts (``known`` is not used: there is no stored file fingerprint to reuse)."""
        return [{"shard": i, "rows": n} for i, n in enumerate(self.counts)]

    def __repr__(self) -> str:
        return f"StreamRows({len(self)} rows of {self.stream!r})"
