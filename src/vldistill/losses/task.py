"""Losses of the student's own task: ``task`` (cross-entropy of a task head's logits) and ``lm`` (the seq2seq
student's reconstruction loss)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from vldistill.outputs import Dims, StepOutputs

from .base import LOSSES, Loss, _check_bool, _present


@LOSSES.register("task")
class TaskLoss(Loss):
    """The task loss of a student with a task head: cross-entropy of ``task_logits`` against the right answer.

    ``L = CE(z, y)`` with ``z`` the head's logits ``[B, A]`` (answers, entailment labels, or candidates ``[B, C]``)
    and ``y = targets["answer"]``. Samples whose answer is not in the vocabulary (``y = -1``) are ignored.
    With ``soft: true`` and VQA soft scores in ``targets["answer_scores"]`` ``[B, A]``, binary cross-entropy times
    the number of answers instead (what ``ViltForQuestionAnswering`` trains with).
    """

    needs = frozenset({"task_logits"})

    def __init__(self, dims: Dims, soft: bool = False):
        super().__init__(dims)
        self.soft = _check_bool("soft", soft)

    def forward(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        logits = _present(out.student.extra.get("task_logits"), "student task_logits").float()
        if self.soft:
            scores = _present(out.targets.get("answer_scores"), "targets answer_scores").float()
            return F.binary_cross_entropy_with_logits(logits, scores) * logits.shape[-1], {}
        target = _present(out.targets.get("answer"), "targets answer").long()
        if not bool((target >= 0).any()):  # no sample with a known answer: nothing to learn from this batch
            return logits.sum() * 0.0, {}
        return F.cross_entropy(logits, target, ignore_index=-1), {}


@LOSSES.register("lm")
class LanguageModelLoss(Loss):
    """The seq2seq student's reconstruction loss: the decoder's mean token cross-entropy on its targets, computed
    by the student (``extra["lm_loss"]``) with the teacher's image outputs as its encoder prefix. With span-corrupted
    captions as input this is VLKD's image-conditioned text infilling (ICTI)."""

    needs = frozenset({"teacher", "lm_loss"})

    def forward(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        return _present(out.student.extra.get("lm_loss"), "student lm_loss"), {}
