"""The ``clip_td`` loss against values computed by hand: the top-K token selection by each scorer, the per-token
norms, the confidence weight (multiple choice: the teacher's softmax over candidates; without candidates the
``(cos + 1) / 2`` fallback), the projection heads, and what the loss declares it needs."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from helpers import T, dims, n_linear, set_linear
from vldistill.losses import LOSSES, build_loss
from vldistill.losses.clip_td import select_tokens
from vldistill.outputs import Embeddings, StepOutputs

# One instance, hidden = teacher width = 2. Sequence: [CLS] (0), text tokens 1 and 2, image [CLS] (3), patches 4, 5.
STATES = [[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [1.0, 1.0], [3.0, 0.0]]]
TEXT_MASK = [[False, True, True, False, False, False]]
IMAGE_MASK = [[False, False, False, False, True, True]]
# [CLS] attends most to text token 2 (0.2 > 0.1) and to patch 4 (0.1 > 0.05); [CLS] itself (0.5) is never chosen.
ATTENTION = [[0.5, 0.1, 0.2, 0.05, 0.1, 0.05]]
V = [[1.0, 0.0]]  # teacher image embedding
QA = [[0.0, 2.0]]  # teacher text embedding of question + right answer: cos(v, t) = 0, so w = (0 + 1) / 2 = 0.5


def identity(loss) -> None:
    set_linear(loss.proj_v, [[1, 0], [0, 1]], [0, 0])
    set_linear(loss.proj_t, [[1, 0], [0, 1]], [0, 0])


def step(states=STATES, text_mask=TEXT_MASK, image_mask=IMAGE_MASK, attention=ATTENTION, teacher=None, answer=None):
    student = Embeddings(
        extra={
            "token_states": T(states, grad=True),
            "text_token_mask": torch.tensor(text_mask),
            "image_token_mask": torch.tensor(image_mask),
            "cls_attention": T(attention),
        }
    )
    teacher = teacher or Embeddings(image=T(V), text={"question": T([[5.0, 5.0]]), "qa": T(QA)})
    targets = {} if answer is None else {"answer": torch.tensor(answer)}
    return StepOutputs(student=student, teachers=[teacher], targets=targets)


def clip_td(**options):
    """The hand values below sum ``D`` over the 2 dimensions (``reduction: sum``) unless a case says otherwise."""
    loss = build_loss("clip_td", dims((2, 2, 2), (2, 2, 2)), normalize=False, **{"reduction": "sum", **options})
    identity(loss)
    return loss


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        # attention, k=1: text token 2 |[0,1]-[0,2]|_1 = 1; patch 4 |[1,1]-[1,0]|_1 = 1; w = 0.5 -> 0.5 * (1 + 1)
        ({"k": 1}, 1.0),
        # the same tokens without the confidence weight
        ({"k": 1, "confidence": False}, 2.0),
        # similarity, k=1: cos to the target picks text token 2 (cos 1 vs 0) and patch 5 (cos 1 vs 0.71):
        # patch 5 |[3,0]-[1,0]|_1 = 2 -> 0.5 * (1 + 2)
        ({"k": 1, "scorer": "similarity"}, 1.5),
        # all: text mean(|[1,0]-[0,2]|_1 = 3, 1) = 2, image mean(1, 2) = 1.5 -> 0.5 * 3.5
        ({"scorer": "all"}, 1.75),
        # k larger than the tokens of a modality keeps all of them (same as all)
        ({"k": 8}, 1.75),
        # l2 (squared): text mean(1 + 4, 1) = 3, image mean(1, 4) = 2.5 -> 0.5 * 5.5
        ({"scorer": "all", "norm": "l2"}, 2.75),
        # l2, attention k=1: text token 2: 1, patch 4: 1 -> 0.5 * 2
        ({"k": 1, "norm": "l2"}, 1.0),
        # the default reduction: each distance averaged over the d = 2 dimensions, half the summed 1.75 and 2.75
        ({"scorer": "all", "reduction": "mean"}, 0.875),
        ({"scorer": "all", "norm": "l2", "reduction": "mean"}, 1.375),
    ],
)
def test_golden_values_one_instance_without_candidates(options, expected):
    value, parts = clip_td(**options)(step())
    assert value.item() == pytest.approx(expected)
    assert parts["w"].item() == pytest.approx(1.0 if options.get("confidence") is False else 0.5)


def test_the_distance_is_averaged_over_the_dimensions_by_default():
    loss = build_loss("clip_td", dims((2, 2, 2), (2, 2, 2)))
    assert loss.reduction == "mean"
    with pytest.raises(ValueError, match="reduction='max' is not allowed; choose one of: 'mean', 'sum'"):
        build_loss("clip_td", dims((2, 2, 2), (2, 2, 2)), reduction="max")


def test_the_parts_are_the_unweighted_visual_and_text_means():
    _, parts = clip_td(k=1, scorer="similarity")(step())
    assert parts["visual"].item() == pytest.approx(2.0) and parts["text"].item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("parts", "expected", "logged"),
    # similarity, k=1, w = 0.5: the visual term is patch 5's 2.0, the text term token 2's 1.0 (see above)
    [(["visual"], 0.5 * 2.0, "visual"), (["text"], 0.5 * 1.0, "text"), ("visual", 0.5 * 2.0, "visual")],
)
def test_parts_keeps_one_term_for_an_ablation(parts, expected, logged):
    value, terms = clip_td(k=1, scorer="similarity", parts=parts)(step())
    assert value.item() == pytest.approx(expected)
    assert set(terms) == {logged, "w"}
    both, _ = clip_td(k=1, scorer="similarity", parts=["text", "visual"])(step())
    assert both.item() == pytest.approx(0.5 * (2.0 + 1.0))


def test_a_single_term_still_trains_only_its_own_head():
    loss = clip_td(k=1, parts=["visual"])
    value, _ = loss(step())
    value.backward()
    assert loss.proj_v.weight.grad is not None and loss.proj_t.weight.grad is None


def test_confidence_without_candidates_is_the_image_text_cosine_mapped_to_0_1():
    teacher = Embeddings(image=T([[1.0, 0.0]]), text={"qa": T([[1.0, 1.0]])})  # cos = 1/sqrt(2)
    value, parts = clip_td(k=1)(step(teacher=teacher))
    w = (1 / math.sqrt(2) + 1) / 2
    # text token 2 |[0,1]-[1,1]|_1 = 1, patch 4 |[1,1]-[1,0]|_1 = 1
    assert parts["w"].item() == pytest.approx(w)
    assert value.item() == pytest.approx(w * 2)


def test_the_hypothesis_is_the_target_of_entailment():
    teacher = Embeddings(image=T(V), text={"hypothesis": T(QA)})
    assert clip_td(k=1)(step(teacher=teacher))[0].item() == pytest.approx(1.0)


# Multiple choice: two instances, sequence [CLS] (0), one text token (1), image [CLS] (2), one patch (3).
MC_STATES = [[[9.0, 9.0], [0.0, 1.0], [5.0, 5.0], [1.0, 1.0]], [[9.0, 9.0], [1.0, 1.0], [5.0, 5.0], [0.0, 0.0]]]
MC_TEXT = [[False, True, False, False]] * 2
MC_IMAGE = [[False, False, False, True]] * 2
MC_ATTENTION = [[0.4, 0.2, 0.2, 0.2]] * 2
MC_V = [[1.0, 0.0], [0.0, 1.0]]
# [B, C, d]: instance 0's candidates have cosines (1, 0) with its image, instance 1's too.
MC_CANDIDATES = [[[1.0, 0.0], [0.0, 1.0]], [[0.0, 3.0], [1.0, 0.0]]]


def mc_step(answer, scale=None):
    teacher = Embeddings(
        image=T(MC_V),
        text={"question": T([[1.0, 1.0], [1.0, 1.0]]), "candidates": T(MC_CANDIDATES)},
        logit_scale=None if scale is None else torch.tensor(scale),
    )
    return step(MC_STATES, MC_TEXT, MC_IMAGE, MC_ATTENTION, teacher, answer)


def test_multiple_choice_weight_is_the_teachers_probability_of_the_right_candidate():
    # instance 0: right candidate 1, cos (1, 0): w0 = softmax(2 * [1, 0])[1] = 1 / (1 + e^2); target [0, 1]:
    #   text [0,1] -> 0, patch |[1,1]-[1,0]|_1 = 1 -> 1
    # instance 1: right candidate 0, cos (1, 0): w1 = e^2 / (1 + e^2); target [0, 3]:
    #   text |[1,1]-[0,3]|_1 = 3, patch |[0,0]-[0,1]|_1 = 1 -> 4
    w0, w1 = 1 / (1 + math.e**2), math.e**2 / (1 + math.e**2)
    expected = (w0 * 1 + w1 * 4) / 2
    value, parts = clip_td(scale=2.0)(mc_step([1, 0]))
    assert value.item() == pytest.approx(expected)
    assert parts["w"].item() == pytest.approx((w0 + w1) / 2)
    # the teacher's own logit scale when no scale is given
    assert clip_td()(mc_step([1, 0], scale=2.0))[0].item() == pytest.approx(expected)
    # CLIP's 1/0.07 when the teacher reports none
    w0 = 1 / (1 + math.exp(1 / 0.07))
    w1 = 1 - w0
    assert clip_td()(mc_step([1, 0]))[0].item() == pytest.approx((w0 + w1 * 4) / 2)


def test_an_instance_without_a_right_candidate_is_left_out():
    w1 = math.e**2 / (1 + math.e**2)
    value, _ = clip_td(scale=2.0)(mc_step([-1, 0]))
    assert value.item() == pytest.approx(w1 * 4)  # instance 1 alone
    none, parts = clip_td(scale=2.0)(mc_step([-1, -1]))
    assert none.item() == 0.0 and parts == {}
    none.backward()  # a zero that still belongs to the graph


def test_the_candidates_field_needs_the_answer():
    with pytest.raises(ValueError, match=re.escape("clip_td: field 'candidates' holds one text per candidate")):
        clip_td()(mc_step(None))


def test_projection_heads_and_normalisation_match_a_numpy_reference():
    wv, bv = [[1.0, 2.0], [0.0, 1.0]], [0.5, 0.3]
    wt, bt = [[0.0, 1.0], [3.0, -1.0]], [0.0, 0.2]
    loss = build_loss("clip_td", dims((2, 2, 2), (2, 2, 2)), k=1)  # normalize: true (default)
    set_linear(loss.proj_v, wv, bv)
    set_linear(loss.proj_t, wt, bt)
    out = step()
    value, _ = loss(out)

    def unit(x):
        x = np.asarray(x, dtype=np.float64)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    states = np.asarray(STATES[0])
    w = (0 + 1) / 2  # cos(v, qa) = 0
    # attention picks text token 2 and patch 4; the default reduction averages over the d = 2 dimensions
    text = np.abs(unit(n_linear(states[2], wt, bt)) - unit(QA[0])).mean()
    visual = np.abs(unit(n_linear(states[4], wv, bv)) - unit(V[0])).mean()
    assert value.item() == pytest.approx(w * (text + visual), rel=1e-6)
    value.backward()
    assert loss.proj_v.weight.grad.abs().sum() > 0 and loss.proj_t.weight.grad.abs().sum() > 0
    grad = out.student.extra["token_states"].grad[0]
    # only the chosen tokens receive gradient: text token 2 and patch 4
    assert [bool(g.abs().sum() > 0) for g in grad] == [False, False, True, False, True, False]


def test_the_projection_heads_map_the_student_width_to_the_teachers_and_are_not_the_students():
    loss = build_loss("clip_td", dims((32, 32, 32), (24, 48, 64)))
    assert (loss.proj_v.in_features, loss.proj_v.out_features) == (32, 24)
    assert (loss.proj_t.in_features, loss.proj_t.out_features) == (32, 24)
    assert sorted(name for name, _ in loss.named_parameters()) == [
        "proj_t.bias",
        "proj_t.weight",
        "proj_v.bias",
        "proj_v.weight",
    ]


def test_select_tokens():
    scores = T([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.1, 0.0]])
    mask = torch.tensor([[True, False, True, True], [False, True, False, False]])
    # row 0: the top 2 of tokens 0, 2, 3 (token 1 scores highest but is masked); row 1: its only token
    assert select_tokens(scores, mask, 2).tolist() == [[False, False, True, True], [False, True, False, False]]
    assert select_tokens(None, mask, 2).tolist() == mask.tolist()
    assert select_tokens(scores, mask, 0).tolist() == mask.tolist()


def test_needs_are_declared_by_the_scorer():
    assert LOSSES.get("clip_td").needs_for() == {"teacher", "token_states", "cls_attention"}
    assert LOSSES.get("clip_td").needs_for(scorer="similarity", k=4) == {"teacher", "token_states"}
    assert LOSSES.get("clip_td").needs_for(scorer="all") == {"teacher", "token_states"}
    d = dims((2, 2, 2), (2, 2, 2))
    for scorer in ("attention", "similarity", "all"):
        assert build_loss("clip_td", d, scorer=scorer).needs == LOSSES.get("clip_td").needs_for(scorer=scorer)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k": 0}, "loss 'clip_td': k=0 is not allowed; it must be a positive integer"),
        ({"scorer": "random"}, "loss 'clip_td': scorer='random' is not allowed; choose one of: 'attention'"),
        ({"norm": "cosine"}, "loss 'clip_td': norm='cosine' is not allowed; choose one of: 'l1', 'l2'"),
        ({"field": "question"}, "loss 'clip_td': field='question' is not allowed; choose one of: 'auto', 'qa'"),
        ({"scale": -1}, "loss 'clip_td': scale=-1 is not allowed; it must be a positive number"),
        ({"teacher": 2}, "loss 'clip_td': teacher=2 is not allowed; choose null (every teacher) or an index in 0..0"),
        ({"parts": []}, "loss 'clip_td': parts=[] is not allowed; give a non-empty list of distinct terms from"),
        ({"parts": ["image"]}, "parts=['image'] is not allowed; give a non-empty list of distinct terms from ['vis"),
        ({"parts": ["text", "text"]}, "parts=['text', 'text'] is not allowed"),
        ({"lambda": 2}, "unknown option(s) 'lambda' for loss 'clip_td'; allowed options: k, scorer, norm"),
    ],
)
def test_bad_options_name_the_key_and_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_loss("clip_td", dims((2, 2, 2), (2, 2, 2)), **options)


def test_without_a_teacher_or_the_target_field_the_error_says_what_is_missing():
    with pytest.raises(ValueError, match="this loss needs a teacher"):
        build_loss("clip_td", dims())
    pairs = Embeddings(image=T(V), text={"en": T(QA)})
    with pytest.raises(ValueError, match=r"none of the text fields \['qa', 'hypothesis', 'candidates'\]"):
        clip_td()(step(teacher=pairs))
    with pytest.raises(ValueError, match=r"field='hypothesis', but the teacher outputs have the fields"):
        clip_td(field="hypothesis")(step())


def test_above_chance_weighs_a_teacher_at_or_below_chance_zero():
    # two candidates, chance 1/2: w0 = 1 / (1 + e^2) < 1/2 -> 0; w1 = e^2 / (1 + e^2) -> (w1 - 1/2) / (1/2)
    w1 = math.e**2 / (1 + math.e**2)
    rescaled = (w1 - 0.5) / 0.5
    value, parts = clip_td(scale=2.0, above_chance=True)(mc_step([1, 0]))
    assert value.item() == pytest.approx((0.0 * 1 + rescaled * 4) / 2)  # instance 0's distance 1 weighs nothing
    assert parts["w"].item() == pytest.approx(rescaled / 2)
    # one candidate: p = 1 and no chance to rescale, so w stays 1 (no division by zero)
    one = Embeddings(image=T(MC_V), text={"candidates": T([[[1.0, 0.0]], [[0.0, 3.0]]])})
    _, parts = clip_td(scale=2.0, above_chance=True)(step(MC_STATES, MC_TEXT, MC_IMAGE, MC_ATTENTION, one, [0, 0]))
    assert parts["w"].item() == pytest.approx(1.0)
    # without candidates there is no chance level: a clear error, unless the confidence is off anyway
    with pytest.raises(ValueError, match=r"above_chance=true needs candidates .* field 'qa' holds one text"):
        clip_td(k=1, above_chance=True)(step())
    assert clip_td(k=1, above_chance=True, confidence=False)(step())[0].item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="above_chance"):
        build_loss("clip_td", dims((2, 2, 2), (2, 2, 2)), above_chance="yes")
