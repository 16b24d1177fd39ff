"""Which samples each micro-batch of a stage holds: a pure function of (seed, stage, step), so a resumed run sees
the batches an uninterrupted one would; the paired subset of a run and a teacher cache's stored views."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class StageSampler:
    """Yields the micro-batches of one stage, starting at any micro-batch: data order depends only on
    (seed, stage, epoch), so a resumed run sees exactly the batches an uninterrupted one would.

    With ``views = K > 1`` (a teacher cache with augmented views) it yields ``(index, view)`` pairs: sample ``i``
    gets view ``(epoch + offset_i) % K`` with a seeded random ``offset_i``, so every view is used once per K epochs.
    With ``epochs=True`` it yields ``(index, view, epoch)`` triples (view 0 without views): for students whose inputs
    depend on the epoch (a seq2seq student's span corruption is seeded by seed, sample and epoch).

    With ``texts = (k, m)`` every micro-batch also holds ``k`` of ``m`` free texts (``data.texts``), as keys ``n + j``
    (after the ``n`` samples: :class:`_WithTexts` reads them), in a seeded order of their own that runs through all
    ``m`` before repeating. ``pieces`` processes split each micro-batch into equal consecutive parts: each part gets
    its share of the samples followed by its share of the texts.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        stage: int,
        total: int,
        start: int = 0,
        views: int = 1,
        epochs: bool = False,
        texts: tuple[int, int] | None = None,
        pieces: int = 1,
    ):
        if n < batch_size:
            raise ValueError(f"the training set has {n} samples, fewer than train.batch_size = {batch_size}")
        self.n, self.samples, self.seed, self.stage = n, batch_size, seed, stage
        self.total, self.start = total, start
        self.per_epoch = n // batch_size
        self.views = views
        self.epochs = epochs
        self.texts, self.pieces = texts, pieces
        # the length of a micro-batch: Accelerate splits each into equal parts by it (a shorter one would be a last,
        # incomplete batch)
        self.batch_size = batch_size + (texts[0] if texts is not None else 0)
        self._text_perm: tuple[int, list[int]] = (-1, [])  # (text epoch, its order)
        if texts is not None and texts[0] % pieces:
            raise ValueError(f"{texts[0]} free texts per micro-batch do not split evenly over {pieces} processes")

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self) -> Iterator[list[int]] | Iterator[list[tuple[int, int]]]:
        epoch, perm = -1, None
        if self.views > 1:
            offsets = torch.randint(self.views, (self.n,), generator=torch.Generator().manual_seed(self.seed + 7))
            offsets = offsets.tolist()
        for m in range(self.start, self.total):
            if m // self.per_epoch != epoch:
                epoch = m // self.per_epoch
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.stage * 10_007 + epoch)
                perm = torch.randperm(self.n, generator=g).tolist()
            i = (m % self.per_epoch) * self.samples
            if self.epochs:
                keys = [
                    (j, (epoch + offsets[j]) % self.views if self.views > 1 else 0, epoch)
                    for j in perm[i : i + self.samples]
                ]
            elif self.views == 1:
                keys = perm[i : i + self.samples]
            else:
                keys = [(j, (epoch + offsets[j]) % self.views) for j in perm[i : i + self.samples]]
            yield keys if self.texts is None else self._with_texts(keys, m, epoch)

    def _with_texts(self, keys: list, m: int, epoch: int) -> list:
        """Micro-batch ``m``'s keys followed by its free texts' (interleaved in ``pieces`` parts)."""
        k, total = self.texts
        rows = []
        for p in range(m * k, (m + 1) * k):  # position p of the text stream: text epoch p // total
            if self._text_perm[0] != p // total:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.stage * 10_007 + p // total + 500_009)
                self._text_perm = (p // total, torch.randperm(total, generator=g).tolist())
            rows.append(self._text_perm[1][p % total])
        if self.epochs:
            texts = [(self.n + r, 0, epoch) for r in rows]
        elif self.views == 1:
            texts = [self.n + r for r in rows]
        else:
            texts = [(self.n + r, 0) for r in rows]
        b, t = len(keys) // self.pieces, k // self.pieces
        return [key for q in range(self.pieces) for key in keys[q * b : (q + 1) * b] + texts[q * t : (q + 1) * t]]


class _Subset(torch.utils.data.Dataset):
    """Some samples of a dataset; items keep the underlying dataset's ``index`` (what a teacher cache reads by)."""

    def __init__(self, data, indices: list[int]):
        self.data, self.indices = data, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.data[self.indices[i]]


class _WithViews(torch.utils.data.Dataset):
    """Items of ``data`` for ``(index, view)`` keys, with ``"view"`` added (and ``"epoch"`` for ``(index, view,
    epoch)`` keys)."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, view, *epoch = key
        return {**self.data[index], "view": view, **({"epoch": epoch[0]} if epoch else {})}


class _WithTexts(torch.utils.data.Dataset):
    """``data``'s samples, then the rows of a :class:`~vldistill.data.texts.FreeTexts` as keys ``len(data) + j``."""

    def __init__(self, data, texts):
        self.data, self.texts, self.n = data, texts, len(data)

    def __len__(self) -> int:
        return self.n + len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.data[i] if i < self.n else self.texts.item(i - self.n)
