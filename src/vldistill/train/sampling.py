"""Which samples each micro-batch of a stage holds: a pure function of (seed, stage, step), so a resumed run sees
the batches an uninterrupted one would; the paired subset of a run and a teacher cache's stored views."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch


class StageSampler:
    """Yields the micro-batches of one stage, starting at any micro-batch: data order depends only on
    (seed, stage, epoch), so a resumed run sees exactly the batches an uninterrupted one would.

    With ``views = K > 1`` (a teacher cache with augmented views) it yields ``(index, view)`` pairs: sample ``i``
    gets view ``(epoch + offset_i) % K`` with a seeded random ``offset_i``, so every view is used once per K epochs.
    With ``epochs=True`` it yields ``(index, view, epoch)`` triples (view 0 without views): for students whose inputs
    depend on the epoch (a seq2seq student's span corruption is seeded by seed, sample and epoch).

    With ``texts = (k, [m_1, m_2, ...])`` every micro-batch also holds ``k`` free texts (``data.texts``) of each
    field (language), whose rows are consecutive: ``m_1`` of the first, then ``m_2``, ...; they come as keys ``n + j``
    (after the ``n`` samples: :class:`_WithTexts` reads them), each field in a seeded order of its own that runs
    through all its texts before repeating. ``pieces`` processes split each micro-batch into equal consecutive parts:
    each part gets its share of the samples followed by its share of every field's texts.
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
        texts: tuple[int, Sequence[int]] | None = None,
        pieces: int = 1,
    ):
        if n < batch_size:
            raise ValueError(f"the training set has {n} samples, fewer than train.batch_size = {batch_size}")
        self.n, self.samples, self.seed, self.stage = n, batch_size, seed, stage
        self.total, self.start = total, start
        self.per_epoch = n // batch_size
        self.views = views
        self.epochs = epochs
        self.texts, self.pieces = (texts[0], list(texts[1])) if texts is not None else None, pieces
        # the length of a micro-batch: Accelerate splits each into equal parts by it (a shorter one would be a last,
        # incomplete batch)
        self.batch_size = batch_size + (texts[0] * len(texts[1]) if texts is not None else 0)
        self._text_perm: dict[int, tuple[int, list[int]]] = {}  # per field: (text epoch, its order)
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
                g = torch.Generator().manual_seed(self._order_seed(epoch))
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

    def _order_seed(self, epoch: int) -> int:
        """The seed of an epoch's order, one per run seed and stage (free texts: offset per field)."""
        return self.seed * 1_000_003 + self.stage * 10_007 + epoch

    def _with_texts(self, keys: list, m: int, epoch: int) -> list:
        """Micro-batch ``m``'s keys followed by its free texts' (interleaved in ``pieces`` parts)."""
        k, counts = self.texts
        fields, start = [], self.n
        for f, total in enumerate(counts):
            rows = []
            for p in range(m * k, (m + 1) * k):  # position p of this field's stream: its text epoch p // total
                if self._text_perm.get(f, (-1,))[0] != p // total:
                    seed = self._order_seed(p // total + 500_009 + f * 7_919)
                    self._text_perm[f] = (
                        p // total,
                        torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist(),
                    )
                rows.append(start + self._text_perm[f][1][p % total])
            fields.append(rows)
            start += total
        b, t = len(keys) // self.pieces, k // self.pieces
        out = []
        for q in range(self.pieces):
            out += keys[q * b : (q + 1) * b]
            for rows in fields:
                out += [self._text_key(r, epoch) for r in rows[q * t : (q + 1) * t]]
        return out

    def _text_key(self, row: int, epoch: int):
        """A free text's key in the form of the samples' keys."""
        if self.epochs:
            return (row, 0, epoch)
        return row if self.views == 1 else (row, 0)


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
