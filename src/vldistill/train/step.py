"""One distillation step: teacher outputs first, then the student, then the losses (:class:`DistillModule`); the
gather of every process's shard before in-batch losses; and the check that stops a run on a non-finite value."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ..batching import TeacherSource
from ..dist import process_shard
from ..losses import WeightedLoss
from ..outputs import Embeddings, StepOutputs


class DistillModule(nn.Module):
    """Student + this stage's losses: the one module Accelerate prepares (DDP syncs through ``forward``).

    Teachers are not submodules: they are frozen, never saved with the run, and may be a cache. Their outputs are
    computed first, so the student may read them (``forward(inputs, needs, teacher=...)``).
    """

    def __init__(
        self,
        student: nn.Module,
        loss: WeightedLoss,
        teachers: TeacherSource | None,
        teacher_names: Sequence[str] = (),
        free_tables: Sequence[Any] = (),
    ):
        super().__init__()
        self.student = student
        self.loss = loss
        self._teachers = teachers
        self._names = list(teacher_names)
        self._last_teachers: list[Embeddings] = []
        self._free = list(free_tables)  # per teacher, its embeddings of the free texts (vldistill.cache.FreeTextTable)

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """The weighted loss and its logged terms. Raises :class:`NonFiniteError` (on every process at once) when a
        teacher's output or the loss is not finite: training on NaN would only spread it to every weight."""
        needs = self.loss.needs
        teachers = self._teachers(batch, needs) if ("teacher" in needs and self._teachers) else []
        bad = [(j, name) for j, t in enumerate(teachers) for name in _non_finite_fields(t)]
        self._last_teachers = teachers
        if _on_any_process(bool(bad)):
            raise NonFiniteError(self._describe_teachers(bad, batch))
        for field, rows in batch.get("texts", {}).items() if teachers and self._free else ():
            for table, out in zip(self._free, teachers, strict=True):  # free texts: embedded before training
                if field in table.fields:
                    out.text[field] = table.rows(rows)
        options = {"mask_ratio": self.loss.mask_ratio} if getattr(self.loss, "mask_ratio", None) is not None else {}
        student = self.student(batch["student"], needs, teacher=teachers[0] if teachers else None, **options)
        device = _device_of(student)
        groups = {lang: g.to(device) for lang, g in batch["groups"].items()}
        # the batch's targets, and those a student's own processor builds (e.g. VQA soft scores, answer_scores)
        student_targets = batch["student"].get("targets", {}) if isinstance(batch["student"], dict) else {}
        targets = {k: t.to(device) for k, t in {**student_targets, **batch.get("targets", {})}.items()}
        out = StepOutputs(student=student, teachers=teachers, groups=groups, targets=targets)
        total, parts = self.loss(gather_outputs(out))
        if _on_any_process(not bool(torch.isfinite(total.detach()).all())):
            raise NonFiniteError(_describe_loss(total, parts, student))
        return total, parts

    def _describe_teachers(self, bad: list[tuple[int, str]], batch: dict[str, Any]) -> str:
        if not bad:
            return "a teacher gave non-finite outputs on another process"
        j = bad[0][0]
        fields = ", ".join(name for k, name in bad if k == j)
        name = self._names[j] if j < len(self._names) else f"teacher {j}"
        where = getattr(self._teachers, "where", None)
        index = batch["index"]
        value = dict(_tensors_of(self._last_teachers[j]))[bad[0][1]] if self._last_teachers else None
        if value is not None and value.shape[0] == len(index):  # only the rows that hold the NaN
            index = index[~torch.isfinite(value.detach()).reshape(len(index), -1).all(dim=1).cpu()]
        rows = f" ({where(index, j)})" if where is not None else ""
        return (
            f"teacher {j} ({name}){rows} gave non-finite values (NaN or inf) in its {fields} output; its weights or "
            f"cached outputs are damaged"
        )


class NonFiniteError(ValueError):
    """A teacher output, a loss or a gradient that is NaN or infinite: the run stops at once, before the step's
    checkpoint is written, so the last good checkpoint stays. The message names the teacher or cache shard (or the
    loss terms) and the step."""


def _tensors_of(emb: Embeddings) -> Iterator[tuple[str, Tensor]]:
    for name in ("image", "image_tokens", "image_masked"):
        value = getattr(emb, name, None)
        if isinstance(value, Tensor):
            yield name, value
    for group in ("text", "text_tokens"):
        for field, value in getattr(emb, group, {}).items():
            if isinstance(value, Tensor) and value.is_floating_point():
                yield f"{group}.{field}", value
    for key, value in getattr(emb, "extra", {}).items():
        if isinstance(value, Tensor) and value.is_floating_point():
            yield f"extra.{key}", value


def _non_finite_fields(emb: Embeddings) -> list[str]:
    """The names of the floating-point outputs of ``emb`` that hold a NaN or an infinity (one device sync)."""
    named = [(name, t) for name, t in _tensors_of(emb) if t.is_floating_point() and t.numel()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).tolist()
    return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]


def _on_any_process(flag: bool) -> bool:
    """``flag`` or'ed over the processes of a multi-process run, so that every process raises together (a process
    that stopped alone would leave the others waiting in a collective)."""
    if process_shard()[1] == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _collective_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _describe_loss(total: Tensor, parts: dict[str, Any], student: Embeddings) -> str:
    values = {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in parts.items() if k != "loss"}
    terms = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    outputs = _non_finite_fields(student)
    if outputs:
        why = (
            f"the student's {', '.join(outputs)} output is not finite: training diverged (lower train.lr, keep "
            f"train.max_grad_norm set) or the student's weights are damaged"
        )
    else:
        why = f"the student's and teachers' outputs are finite, the loss terms {bad or '(all)'} are not"
    return f"the loss is {float(total.detach()):.4g} ({terms}): {why}"


def _device_of(emb: Embeddings) -> torch.device:
    for value in (emb.image, *emb.text.values(), *emb.extra.values()):
        if isinstance(value, Tensor):
            return value.device
    return torch.device("cpu")


def gather_outputs(out: StepOutputs) -> StepOutputs:
    """In a multi-process run, the pooled embeddings and caption groups of every process's shard, concatenated in
    rank order: what a single process would have computed on the whole batch. Every process computes the same loss
    on it; the backward of the gather sums the gradients of each shard over processes and hands them to the shard's
    own process, so after DDP's averaging the gradients equal a single process's. Token features stay local (their
    lengths differ between shards): token-level ``fd`` becomes the mean of the shards' means, which equals the
    whole batch's for image tokens; for text tokens, whose padding is masked, the shards' token counts may differ, so
    it is close to the single-process value but not exact. One process: unchanged.

    A student with outputs of its own kind (``extra``: a task head, token states, an LM loss) keeps everything local:
    its losses are per sample (``task``, ``clip_td``, ``lm``), so each shard's mean, averaged by DDP, is the whole
    batch's mean; an in-batch contrastive term of such a student (VLKD's ``itcl``) then sees its shard's negatives
    only."""
    if process_shard()[1] == 1 or out.student.extra:
        return out
    return StepOutputs(
        student=_gather_pooled(out.student),
        teachers=[_gather_pooled(t) for t in out.teachers],
        groups={lang: _all_gather(g) for lang, g in out.groups.items()},
        targets={k: _all_gather(t) for k, t in out.targets.items()},
    )


def _gather_pooled(emb: Embeddings) -> Embeddings:
    return replace(
        emb,
        image=None if emb.image is None else _all_gather(emb.image),
        text={lang: _all_gather(t) for lang, t in emb.text.items()},
        image_masked=None if emb.image_masked is None else _all_gather(emb.image_masked),
    )


def _all_gather(x: Tensor) -> Tensor:
    return _AllGather.apply(x)  # tensors without gradient (teachers, caption groups) pass through it unchanged


class _AllGather(torch.autograd.Function):
    """Concatenate equal-sized shards from all processes; backward sums the gradient over processes (each computed
    the same loss on the whole batch) and returns this process's slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, world = process_shard()
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x.contiguous())
        ctx.start, ctx.stop = rank * x.shape[0], (rank + 1) * x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        return grad[ctx.start : ctx.stop]


# ------------------------------------------------------------------------------------------------ the run
