"""The base losses of the task and seq2seq student kinds, against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import T, dims
from vldistill.losses import build_loss
from vldistill.outputs import Embeddings, StepOutputs


def outputs(extra: dict, targets: dict) -> StepOutputs:
    return StepOutputs(student=Embeddings(extra=extra), targets=targets)


def test_task_loss_is_cross_entropy_against_the_right_answer_by_hand():
    logits = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    loss, parts = build_loss("task", dims())(outputs({"task_logits": T(logits)}, {"answer": torch.tensor([0, 2])}))
    # CE row 0: -log(e^2 / (e^2 + 2)); row 1: -log(1 / (e + 2)); mean of the two
    expected = (-math.log(math.e**2 / (math.e**2 + 2)) - math.log(1 / (math.e + 2))) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6) and parts == {}


def test_task_loss_ignores_answers_outside_the_vocabulary():
    logits = T([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], grad=True)
    loss, _ = build_loss("task", dims())(outputs({"task_logits": logits}, {"answer": torch.tensor([0, -1])}))
    assert float(loss.detach()) == pytest.approx(-math.log(math.e**2 / (math.e**2 + 2)), rel=1e-6)
    none, _ = build_loss("task", dims())(outputs({"task_logits": logits}, {"answer": torch.tensor([-1, -1])}))
    none.backward()  # a batch with no known answer trains nothing but still backpropagates
    assert float(none.detach()) == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_soft_task_loss_is_vilts_bce_times_the_number_of_answers():
    logits, scores = T([[0.0, 0.0]]), T([[1.0, 0.0]])
    loss, _ = build_loss("task", dims(), soft=True)(outputs({"task_logits": logits}, {"answer_scores": scores}))
    # BCE with logit 0 is log 2 for either target; mean over 2 answers times 2
    assert float(loss) == pytest.approx(2 * math.log(2), rel=1e-6)


def test_lm_loss_passes_the_students_reconstruction_loss_and_needs_the_teacher():
    lm = build_loss("lm", dims((2, 2, 2), (2, 2, 2)))
    loss, _ = lm(outputs({"lm_loss": T(1.25)}, {}))
    assert float(loss) == 1.25
    assert lm.needs == frozenset({"teacher", "lm_loss"})
    with pytest.raises(ValueError, match="student lm_loss is missing from the step outputs"):
        lm(outputs({}, {}))
    with pytest.raises(ValueError, match="student task_logits is missing"):
        build_loss("task", dims())(outputs({}, {"answer": torch.tensor([0])}))
