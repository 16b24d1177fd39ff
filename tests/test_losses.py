"""Golden-value tests for the loss catalogue.

Expected values are computed independently: by hand (closed forms in the comments) or with the formulas written out
in numpy below, never through the library's own helpers.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import T, dims, n_linear, set_linear
from vldistill.losses import LOSSES, Loss, WeightedLoss, build_loss
from vldistill.outputs import Embeddings, StepOutputs

E = math.e
CLIP_SCALE = 1 / 0.07


# ----------------------------------------------------------------------------------------------------------------------
# Independent reference formulas (numpy, float64)


def n_norm(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def n_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def n_softmax(z):
    return np.exp(n_log_softmax(z))


def n_ce(logits, targets):
    """mean_i -sum_j targets_ij log softmax(logits_i)_j."""
    return float(-(np.asarray(targets) * n_log_softmax(logits)).sum(axis=-1).mean())


def n_kl(p, logits):
    """mean_i sum_j p_ij (log p_ij - log softmax(logits_i)_j)."""
    p = np.asarray(p)
    return float((p * (np.log(p) - n_log_softmax(logits))).sum(axis=-1).mean())


def n_mse(a, b):
    return float(((np.asarray(a) - np.asarray(b)) ** 2).mean())


# ----------------------------------------------------------------------------------------------------------------------
# Builders


def approx(value: torch.Tensor | float, expected: float, tol: float = 1e-5) -> None:
    value = float(value.detach()) if isinstance(value, torch.Tensor) else value
    assert value == pytest.approx(expected, rel=tol, abs=tol)


# Fixed small tensors (B=3, d=2 student; d=3 teacher) reused by several tests.
SV = [[1.0, 0.5], [-0.3, 1.2], [0.7, -0.9]]
ST = [[0.9, 0.2], [0.1, 1.0], [0.4, -1.1]]
TV = [[1.0, 0.2, -0.1], [0.0, 1.0, 0.3], [0.5, -0.5, 1.0]]
TT = [[0.8, 0.1, 0.0], [0.2, 0.9, 0.4], [0.3, -0.6, 0.9]]
TV2 = [[0.2, 1.0], [1.0, -0.4], [-0.6, 0.3]]
TT2 = [[0.5, 0.8], [0.9, -0.2], [-0.7, 0.6]]


def test_registry_lists_every_loss():
    assert LOSSES.names() == [
        "clip", "clip_td", "crd", "fd", "icl", "icti", "itcl", "lm", "mfd", "soft_ce", "task", "ttdm", "xling",
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# clip


def test_clip_distinct_captions_equals_cross_entropy_with_arange_targets():
    torch.manual_seed(0)
    image, text = torch.randn(4, 3), torch.randn(4, 3)
    loss_fn = build_loss("clip", dims())
    out = StepOutputs(Embeddings(image=image, text={"en": text}), groups={"en": torch.tensor([3, 1, 0, 2])})
    loss, parts = loss_fn(out)

    logits = CLIP_SCALE * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    labels = torch.arange(4)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    approx(loss, float(expected))
    approx(parts["scale"], CLIP_SCALE)
    # the same with no groups at all (diagonal targets)
    approx(loss_fn(StepOutputs(Embeddings(image=image, text={"en": text})))[0], float(expected))


def test_clip_identical_captions_use_uniform_targets_over_matches():
    # Captions 0 and 1 are the same string (groups 7, 7) but got different embeddings (as under dropout).
    # s = 1. Logits L = V T^T = [[1, 0, 0], [0, 1, -1], [-1, 0, 0]]; targets Y rows [.5, .5, 0], [.5, .5, 0], [0, 0, 1].
    # image->text: log(e+2) - 1/2, log(e+1+1/e) - 1/2, log(2+1/e)
    # text->image (L^T = [[1, 0, -1], [0, 1, 0], [0, -1, 0]]): log(e+1+1/e) - 1/2, log(e+2) - 1/2, log(2+1/e)
    image = T([[1, 0], [0, 1], [-1, 0]])
    text = T([[1, 0], [0, 1], [0, -1]])
    out = StepOutputs(Embeddings(image=image, text={"en": text}), groups={"en": torch.tensor([7, 7, 3])})
    loss, _ = build_loss("clip", dims(), init_scale=1.0, learnable=False)(out)

    expected = (math.log(E + 2) + math.log(E + 1 + 1 / E) + math.log(2 + 1 / E) - 1) / 3
    approx(loss, expected)
    labels = torch.arange(3)
    logits = image @ text.T
    diagonal = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    approx(diagonal, expected - 1 / 3)  # plain diagonal CE is a different number
    assert abs(float(loss) - float(diagonal)) > 0.3


def test_clip_identical_captions_with_identical_embeddings_match_diagonal_value():
    # With equal embeddings for equal captions, soft and diagonal targets give the same value (documented).
    image = T([[1, 0], [0, 1], [-1, 0]])
    text = T([[1, 0], [1, 0], [0, 1]])
    out = StepOutputs(Embeddings(image=image, text={"en": text}), groups={"en": torch.tensor([0, 0, 1])})
    loss, _ = build_loss("clip", dims(), init_scale=1.0, learnable=False)(out)
    logits = (image @ text.T).numpy()
    approx(loss, 0.5 * (n_ce(logits, np.eye(3)) + n_ce(logits.T, np.eye(3))))


def test_clip_averages_languages_and_reports_each():
    en_groups, zh_groups = [0, 1, 2], [5, 5, 6]
    out = StepOutputs(
        Embeddings(image=T(SV), text={"en": T(ST), "zh": T(TT2)}),
        groups={"en": torch.tensor(en_groups), "zh": torch.tensor(zh_groups)},
    )
    s = 3.0
    y_zh = np.array([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]])
    l_en = s * n_norm(SV) @ n_norm(ST).T
    l_zh = s * n_norm(SV) @ n_norm(TT2).T
    en = 0.5 * (n_ce(l_en, np.eye(3)) + n_ce(l_en.T, np.eye(3)))
    zh = 0.5 * (n_ce(l_zh, y_zh) + n_ce(l_zh.T, y_zh))

    loss, parts = build_loss("clip", dims(), init_scale=s)(out)
    approx(loss, (en + zh) / 2)
    approx(parts["en"], en)
    approx(parts["zh"], zh)
    approx(parts["scale"], s)
    only_zh, parts = build_loss("clip", dims(), init_scale=s, langs=["zh"])(out)
    approx(only_zh, zh)
    assert set(parts) == {"scale"}


def test_clip_scale_is_learnable_and_capped_at_100():
    out = StepOutputs(Embeddings(image=T(SV), text={"en": T(ST)}))
    loss_fn = build_loss("clip", dims())
    assert isinstance(loss_fn.log_s, nn.Parameter)  # the trainer exports it into the student
    approx(loss_fn.log_s, math.log(CLIP_SCALE))
    loss, _ = loss_fn(out)
    loss.backward()
    assert loss_fn.log_s.grad is not None and loss_fn.log_s.grad.abs() > 0

    with torch.no_grad():
        loss_fn.log_s.fill_(math.log(200.0))  # as if an optimiser step overshot
    loss, parts = loss_fn(out)
    approx(parts["scale"], 100.0)
    approx(loss_fn.log_s, math.log(100.0))
    logits = 100.0 * n_norm(SV) @ n_norm(ST).T
    approx(loss, 0.5 * (n_ce(logits, np.eye(3)) + n_ce(logits.T, np.eye(3))), tol=1e-4)

    frozen = build_loss("clip", dims(), learnable=False)
    assert list(frozen.parameters()) == []
    with pytest.raises(ValueError, match=re.escape("init_scale=150 is not allowed; it must be a number in (0, 100]")):
        build_loss("clip", dims(), init_scale=150)


# ----------------------------------------------------------------------------------------------------------------------
# fd


@pytest.mark.parametrize(
    ("norm", "expected"),
    # Normalised rows: student [1, 0], [1, 0]; teacher [0, 1], [-1, 0]; differences [1, -1] and [2, 0].
    # mse: (1 + 2) / 2; l1: (1 + 1) / 2; smooth_l1: (0.5 + (1.5 + 0) / 2) / 2; cosine: ((1 - 0) + (1 + 1)) / 2.
    [("mse", 1.5), ("l1", 1.0), ("smooth_l1", 0.625), ("cosine", 1.5)],
)
def test_fd_pooled_norms(norm, expected):
    loss_fn = build_loss("fd", dims((2, 2, 2), (2, 2, 2)), norm=norm)
    assert isinstance(loss_fn.adapters[0], nn.Identity)
    out = StepOutputs(Embeddings(image=T([[2, 0], [1, 0]])), teachers=[Embeddings(image=T([[0, 3], [-1, 0]]))])
    loss, parts = loss_fn(out)
    approx(loss, expected)
    assert parts == {}


def test_fd_pooled_adapter_and_several_teachers_are_averaged():
    w0, b0 = [[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]], [0.0, 0.5, 0.0]
    loss_fn = build_loss("fd", dims((2, 2, 2), (3, 4, 4), (2, 4, 4)))
    set_linear(loss_fn.adapters[0], w0, b0)
    assert isinstance(loss_fn.adapters[1], nn.Identity)  # auto: same width, no adapter
    out = StepOutputs(Embeddings(image=T(SV)), teachers=[Embeddings(image=T(TV)), Embeddings(image=T(TV2))])
    loss, parts = loss_fn(out)

    d0 = n_mse(n_norm(n_linear(SV, w0, b0)), n_norm(TV))
    d1 = n_mse(n_norm(SV), n_norm(TV2))
    approx(loss, (d0 + d1) / 2)
    approx(parts["t0"], d0)
    approx(parts["t1"], d1)

    only_first = build_loss("fd", dims((2, 2, 2), (3, 4, 4), (2, 4, 4)), teacher=0)
    set_linear(only_first.adapters[0], w0, b0)
    approx(only_first(out)[0], d0)


def test_fd_text_tower_pairs_student_lang_with_teacher_lang():
    student = Embeddings(text={"en": T([[1, 0], [0, 1]]), "zh": T([[0, 1], [0, 1]])})
    out = StepOutputs(student, teachers=[Embeddings(text={"en": T([[0, 1], [0, 1]])})])
    d = dims((2, 2, 2), (2, 2, 2))
    approx(build_loss("fd", d, tower="text", lang="zh", teacher_lang="en")(out)[0], 0.0)
    # en vs en: row 0 differs by [1, -1] -> mse 1, row 1 equal -> mean 0.5
    approx(build_loss("fd", d, tower="text", lang="en")(out)[0], 0.5)


def test_fd_token_level_pools_teacher_grid_to_student_grid():
    # Student: [CLS] + 2x2 patches, width 2. Teacher: [CLS] + 4x4 patches, width 3. Adapter 2 -> 3.
    rng = np.random.default_rng(0)
    s_tok = rng.normal(size=(2, 5, 2))
    t_tok = rng.normal(size=(2, 17, 3))
    w, b = [[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]], [0.1, 0.0, -0.2]
    loss_fn = build_loss("fd", dims((2, 2, 2), (3, 3, 3)), level="token")
    assert loss_fn.needs == frozenset({"teacher", "image", "image_tokens"})
    set_linear(loss_fn.adapters[0], w, b)
    out = StepOutputs(Embeddings(image_tokens=T(s_tok)), teachers=[Embeddings(image_tokens=T(t_tok))])
    loss, _ = loss_fn(out)

    target = np.zeros((2, 5, 3))
    target[:, 0] = t_tok[:, 0]  # [CLS] -> [CLS]
    for i in range(2):
        for j in range(2):
            block = [1 + r * 4 + c for r in (2 * i, 2 * i + 1) for c in (2 * j, 2 * j + 1)]
            target[:, 1 + i * 2 + j] = t_tok[:, block].mean(axis=1)
    approx(loss, n_mse(n_linear(s_tok, w, b), target))


def test_fd_token_level_equal_grids_and_text_mask():
    rng = np.random.default_rng(1)
    s_img, t_img = rng.normal(size=(1, 5, 2)), rng.normal(size=(1, 5, 2))
    d = dims((2, 2, 2), (2, 2, 2))
    out = StepOutputs(Embeddings(image_tokens=T(s_img)), teachers=[Embeddings(image_tokens=T(t_img))])
    approx(build_loss("fd", d, level="token", norm="l1")(out)[0], float(np.abs(s_img - t_img).mean()))

    s_txt, t_txt = rng.normal(size=(2, 3, 2)), rng.normal(size=(2, 3, 2))
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    out = StepOutputs(
        Embeddings(text_tokens={"en": T(s_txt)}, text_mask={"en": torch.tensor(mask)}),
        teachers=[Embeddings(text_tokens={"en": T(t_txt)}, text_mask={"en": torch.tensor(mask)})],
    )
    per_token = ((s_txt - t_txt) ** 2).mean(axis=-1)
    expected = float((per_token * mask).sum() / mask.sum())  # padding (token 2 of row 0) left out
    loss_fn = build_loss("fd", d, tower="text", level="token")
    assert loss_fn.needs == frozenset({"teacher", "text", "text_tokens"})
    approx(loss_fn(out)[0], expected)


def test_fd_token_level_shape_errors():
    d = dims((2, 2, 2), (2, 2, 2))
    out = StepOutputs(
        Embeddings(text_tokens={"en": torch.zeros(1, 3, 2)}),
        teachers=[Embeddings(text_tokens={"en": torch.zeros(1, 4, 2)})],
    )
    with pytest.raises(ValueError, match=r"student 3 and teacher 4 .*use level='pooled'"):
        build_loss("fd", d, tower="text", level="token")(out)
    out = StepOutputs(
        Embeddings(image_tokens=torch.zeros(1, 5, 2)), teachers=[Embeddings(image_tokens=torch.zeros(1, 9, 2))]
    )
    with pytest.raises(ValueError, match=re.escape("the teacher has 9 image tokens, which is not [CLS] + a square")):
        build_loss("fd", d, level="token")(out)


def test_fd_adapter_options():
    with pytest.raises(ValueError, match="student embedding width 2 differs from the teacher embedding width 3"):
        build_loss("fd", dims((2, 2, 2), (3, 2, 2)), adapter="none")
    with pytest.raises(ValueError, match="student image token width 4 differs from the teacher image token width 8"):
        build_loss("fd", dims((2, 4, 4), (2, 8, 8)), adapter="none", level="token")
    forced = build_loss("fd", dims((2, 2, 2), (2, 2, 2)), adapter="linear")
    assert isinstance(forced.adapters[0], nn.Linear) and forced.adapters[0].weight.shape == (2, 2)
    token = build_loss("fd", dims((2, 4, 6), (2, 8, 12)), level="token", tower="text")
    assert token.adapters[0].weight.shape == (12, 6)


# ----------------------------------------------------------------------------------------------------------------------
# xling


def test_xling_hand_computed():
    student = Embeddings(text={"zh": T([[1, 0], [0, 1]]), "en": T([[0, 2], [0, 1]])})
    out = StepOutputs(student, teachers=[Embeddings(text={"en": T([[0, 2], [0, 1]])})])
    d = dims((2, 2, 2), (2, 2, 2))
    # normalised: zh rows differ from [0, 1] by [1, -1] and 0 -> 0.5; en rows equal -> 0
    loss, parts = build_loss("xling", d)(out)
    approx(loss, 0.5)
    approx(parts["zh"], 0.5)
    approx(parts["en"], 0.0)
    # raw: zh differs from [0, 2], [0, 1] by [1, -2] and 0 -> (5 / 2) / 2; en equal -> 0
    approx(build_loss("xling", d, normalize=False)(out)[0], 1.25)
    # l1 normalised: zh |[1, -1]| mean 1 and 0 -> 0.5
    approx(build_loss("xling", d, norm="l1")(out)[0], 0.5)


def test_xling_several_sources_adapter_and_teachers():
    zh, de, en = SV, ST, [[0.3, 0.3], [1.0, -0.2], [-0.5, 0.8]]
    w, b = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [0.0, 0.0, 0.5]
    loss_fn = build_loss("xling", dims((2, 2, 2), (3, 2, 2), (2, 2, 2)), langs=["zh", "de"])
    set_linear(loss_fn.adapters[0], w, b)
    out = StepOutputs(
        Embeddings(text={"zh": T(zh), "de": T(de), "en": T(en)}),
        teachers=[Embeddings(text={"en": T(TT)}), Embeddings(text={"en": T(TT2)})],
    )
    loss, _ = loss_fn(out)

    def per_teacher(adapt, target):
        d = {lang: n_mse(n_norm(adapt(x)), n_norm(target)) for lang, x in (("zh", zh), ("de", de), ("en", en))}
        return (d["zh"] + d["de"]) / 2 + d["en"]

    expected = (per_teacher(lambda x: n_linear(x, w, b), TT) + per_teacher(lambda x: x, TT2)) / 2
    approx(loss, expected)


# ----------------------------------------------------------------------------------------------------------------------
# crd


def test_crd_fixed_temperature():
    out = StepOutputs(
        Embeddings(image=T(SV), text={"en": T(ST)}), teachers=[Embeddings(image=T(TV), text={"en": T(TT)})]
    )
    loss_fn = build_loss("crd", dims((2, 2, 2), (3, 2, 2)), temperature=0.5)
    assert list(loss_fn.parameters()) == []
    loss, parts = loss_fn(out)

    teacher = 2.0 * n_norm(TV) @ n_norm(TT).T
    student = 2.0 * n_norm(SV) @ n_norm(ST).T
    i2t, t2i = n_kl(n_softmax(teacher), student), n_kl(n_softmax(teacher.T), student.T)
    approx(loss, (i2t + t2i) / 2)
    approx(parts["i2t"], i2t)
    approx(parts["t2i"], t2i)
    # identical student and teacher relations -> zero
    same = StepOutputs(
        Embeddings(image=T(SV), text={"en": T(ST)}), teachers=[Embeddings(image=T(SV), text={"en": T(ST)})]
    )
    approx(loss_fn(same)[0], 0.0)


def test_crd_model_scales_and_teacher_mean_softmax():
    # teacher 0 reports its scale (5), teacher 1 none (-> 1/0.07); the student uses its own scale (init 1/0.07)
    teachers = [
        Embeddings(image=T(TV), text={"en": T(TT)}, logit_scale=torch.tensor(5.0)),
        Embeddings(image=T(TV2), text={"en": T(TT2)}),
    ]
    out = StepOutputs(Embeddings(image=T(SV), text={"en": T(ST)}), teachers=teachers)
    loss_fn = build_loss("crd", dims((2, 2, 2), (3, 2, 2), (2, 2, 2)))
    loss, parts = loss_fn(out)

    l0 = 5.0 * n_norm(TV) @ n_norm(TT).T
    l1 = CLIP_SCALE * n_norm(TV2) @ n_norm(TT2).T
    student = CLIP_SCALE * n_norm(SV) @ n_norm(ST).T
    p = (n_softmax(l0) + n_softmax(l1)) / 2
    q = (n_softmax(l0.T) + n_softmax(l1.T)) / 2
    expected = (n_kl(p, student) + n_kl(q, student.T)) / 2
    approx(loss, expected, tol=1e-4)
    approx(parts["scale"], CLIP_SCALE)
    # the mean of softmaxes is not the mean of the per-teacher losses
    per_teacher = [(n_kl(n_softmax(lk), student) + n_kl(n_softmax(lk.T), student.T)) / 2 for lk in (l0, l1)]
    assert abs(expected - sum(per_teacher) / 2) > 1e-2

    approx(build_loss("crd", dims((2, 2, 2), (3, 2, 2), (2, 2, 2)), teacher=1)(out)[0], per_teacher[1], tol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# soft_ce


def test_soft_ce_task_plus_distill_with_duplicate_captions():
    out = StepOutputs(
        Embeddings(image=T(SV), text={"en": T(ST)}),
        teachers=[Embeddings(image=T(TV), text={"en": T(TT)}, logit_scale=torch.tensor(4.0))],
        groups={"en": torch.tensor([1, 1, 2])},
    )
    loss, parts = build_loss("soft_ce", dims((2, 2, 2), (3, 2, 2)), init_scale=2.0, learnable=False)(out)

    student = 2.0 * n_norm(SV) @ n_norm(ST).T
    teacher = 4.0 * n_norm(TV) @ n_norm(TT).T
    y = np.array([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]])
    task = (n_ce(student, y) + n_ce(student.T, y)) / 2
    distill = (n_ce(student, n_softmax(teacher)) + n_ce(student.T, n_softmax(teacher.T))) / 2
    approx(parts["task"], task)
    approx(parts["distill"], distill)
    approx(loss, task + distill)


def test_soft_ce_several_teachers_mean_softmax():
    out = StepOutputs(
        Embeddings(image=T(SV), text={"en": T(ST)}),
        teachers=[Embeddings(image=T(TV), text={"en": T(TT)}), Embeddings(image=T(TV2), text={"en": T(TT2)})],
    )
    loss, parts = build_loss("soft_ce", dims((2, 2, 2), (3, 2, 2), (2, 2, 2)), init_scale=2.0)(out)
    student = 2.0 * n_norm(SV) @ n_norm(ST).T
    l0, l1 = CLIP_SCALE * n_norm(TV) @ n_norm(TT).T, CLIP_SCALE * n_norm(TV2) @ n_norm(TT2).T
    p, q = (n_softmax(l0) + n_softmax(l1)) / 2, (n_softmax(l0.T) + n_softmax(l1.T)) / 2
    distill = (n_ce(student, p) + n_ce(student.T, q)) / 2
    task = (n_ce(student, np.eye(3)) + n_ce(student.T, np.eye(3))) / 2
    approx(parts["distill"], distill, tol=1e-4)
    approx(loss, task + distill, tol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# icl


def test_icl_student_queries_against_teacher_keys_with_adapters():
    wv, bv = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], [0.0, 0.2, 0.0]
    wt, bt = [[0.0, 1.0], [1.0, 0.0], [-0.5, 1.0]], [0.1, 0.0, 0.0]
    loss_fn = build_loss("icl", dims((2, 2, 2), (3, 2, 2), (2, 2, 2)), init_scale=2.0, learnable=False)
    set_linear(loss_fn.image_adapters[0], wv, bv)
    set_linear(loss_fn.text_adapters[0], wt, bt)
    assert isinstance(loss_fn.image_adapters[1], nn.Identity)
    out = StepOutputs(
        Embeddings(image=T(SV), text={"en": T(ST)}),
        teachers=[Embeddings(image=T(TV), text={"en": T(TT)}), Embeddings(image=T(TV2), text={"en": T(TT2)})],
    )
    loss, parts = loss_fn(out)

    # rows = student queries (CLIP-KD): image -> teacher texts, text -> teacher images
    i2t0 = n_ce(2.0 * n_norm(n_linear(SV, wv, bv)) @ n_norm(TT).T, np.eye(3))
    t2i0 = n_ce(2.0 * n_norm(n_linear(ST, wt, bt)) @ n_norm(TV).T, np.eye(3))
    i2t1 = n_ce(2.0 * n_norm(SV) @ n_norm(TT2).T, np.eye(3))
    t2i1 = n_ce(2.0 * n_norm(ST) @ n_norm(TV2).T, np.eye(3))
    approx(parts["i2t"], (i2t0 + i2t1) / 2)
    approx(parts["t2i"], (t2i0 + t2i1) / 2)
    approx(loss, (i2t0 + t2i0 + i2t1 + t2i1) / 4)


# ----------------------------------------------------------------------------------------------------------------------
# Gradients, needs, errors


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("fd", {}),
        ("fd", {"tower": "text", "norm": "smooth_l1"}),
        ("xling", {}),
        ("crd", {}),
        ("soft_ce", {}),
        ("icl", {}),
    ],
)
def test_gradients_reach_student_and_adapters_not_teacher(name, options):
    s_img, s_en, s_zh = T(SV, grad=True), T(ST, grad=True), T(TT2, grad=True)
    # a teacher that (wrongly) carries requires_grad: the loss must still not send gradients into it
    t_img, t_en = T(TV, grad=True), T(TT, grad=True)
    t_before = (t_img.detach().clone(), t_en.detach().clone())
    out = StepOutputs(
        Embeddings(image=s_img, text={"en": s_en, "zh": s_zh}),
        teachers=[Embeddings(image=t_img, text={"en": t_en})],
    )
    loss_fn = build_loss(name, dims((2, 2, 2), (3, 2, 2)), **options)
    loss, _ = loss_fn(out)
    loss.backward()

    student_grads = [g for g in (s_img.grad, s_en.grad, s_zh.grad) if g is not None]
    assert student_grads and all(g.abs().sum() > 0 for g in student_grads)
    params = list(loss_fn.parameters())
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert t_img.grad is None and t_en.grad is None
    assert torch.equal(t_img.detach(), t_before[0]) and torch.equal(t_en.detach(), t_before[1])


def test_needs():
    d = dims((2, 2, 2), (2, 2, 2))
    assert build_loss("clip", d).needs == frozenset({"image", "text"})
    assert build_loss("fd", d).needs == frozenset({"teacher", "image"})
    assert build_loss("fd", d, tower="text").needs == frozenset({"teacher", "text"})
    for name in ("xling", "crd", "soft_ce", "icl"):
        assert build_loss(name, d).needs == frozenset({"teacher", "image", "text"}), name


def test_needs_are_declared_without_building_the_loss():
    # the static declaration equals what the built loss reports, for every registered loss and a few options
    d = dims((2, 2, 2), (2, 2, 2))
    cases = [(name, {}) for name in LOSSES.names()] + [("fd", {"tower": "text", "level": "token"})]
    for name, options in cases:
        assert LOSSES.get(name).needs_for(**options) == build_loss(name, d, **options).needs, (name, options)


def test_build_loss_errors():
    d = dims((2, 2, 2), (2, 2, 2))
    with pytest.raises(KeyError, match=r"unknown loss 'nope'; registered: clip, .*crd, fd, icl, .*soft_ce, .*xling"):
        build_loss("nope", d)
    allowed = "allowed options: tower, lang, teacher_lang, norm, level, teacher, adapter"
    with pytest.raises(ValueError, match=re.escape(f"unknown option(s) 'normm' for loss 'fd'; {allowed}")):
        build_loss("fd", d, normm="mse")
    bad_norm = "loss 'fd': norm='l3' is not allowed; choose one of: 'mse', 'l1', 'smooth_l1', 'cosine'"
    with pytest.raises(ValueError, match=re.escape(bad_norm)):
        build_loss("fd", d, norm="l3")
    with pytest.raises(ValueError, match=re.escape("loss 'fd': level='word' is not allowed; choose one of: 'pooled'")):
        build_loss("fd", d, level="word")
    with pytest.raises(ValueError, match=re.escape("loss 'xling': norm='l2' is not allowed")):
        build_loss("xling", d, norm="l2")
    with pytest.raises(ValueError, match=re.escape("loss 'fd': teacher=3 is not allowed; choose null (every teacher)")):
        build_loss("fd", d, teacher=3)
    with pytest.raises(ValueError, match=re.escape("loss 'xling': langs='zh' is not allowed; it must be a non-empty")):
        build_loss("xling", d, langs="zh")
    with pytest.raises(
        ValueError, match=re.escape("loss 'xling': langs=['en'] is not allowed: it contains target_lang")
    ):
        build_loss("xling", d, langs=["en"])
    with pytest.raises(ValueError, match=re.escape("loss 'crd': temperature=-1 is not allowed")):
        build_loss("crd", d, temperature=-1)
    with pytest.raises(
        ValueError, match=re.escape("loss 'icl': this loss needs a teacher, but dims.teachers is empty")
    ):
        build_loss("icl", dims())


def test_missing_step_outputs_are_named():
    d = dims((2, 2, 2), (2, 2, 2))
    with pytest.raises(ValueError, match=re.escape("the loss was built for 1 teacher(s), but the step has 0")):
        build_loss("fd", d)(StepOutputs(Embeddings(image=T(SV))))
    out = StepOutputs(Embeddings(image=T(SV), text={"en": T(ST)}), teachers=[Embeddings(image=T(TV2), text={})])
    with pytest.raises(ValueError, match=re.escape("teacher 0 has no text embedding for language 'en'; it has: []")):
        build_loss("crd", d)(out)


# ----------------------------------------------------------------------------------------------------------------------
# WeightedLoss


def test_weighted_loss_combines_terms_and_reports_parts():
    # clip (s = 1): logits = V T^T with V = T = I_2 -> each row [1, 0] / [0, 1], CE = log(1 + e) - 1 in both directions
    # fd (identity adapter, mse): student [1, 0], [0, 1] vs teacher [0, 1], [0, 1] -> (1 + 0) / 2 = 0.5
    d = dims((2, 2, 2), (2, 2, 2))
    clip = build_loss("clip", d, init_scale=1.0, learnable=False)
    fd = build_loss("fd", d, adapter="linear")
    set_linear(fd.adapters[0], [[1, 0], [0, 1]], [0, 0])
    weighted = WeightedLoss([("clip", 2.0, clip), ("fd_image", 0.5, fd)])
    out = StepOutputs(
        Embeddings(image=T([[1, 0], [0, 1]]), text={"en": T([[1, 0], [0, 1]])}),
        teachers=[Embeddings(image=T([[0, 1], [0, 1]]))],
    )
    total, logs = weighted(out)

    clip_value = math.log(1 + E) - 1
    approx(total, 2.0 * clip_value + 0.5 * 0.5)
    assert set(logs) == {"clip", "clip/scale", "fd_image", "loss"}
    approx(logs["clip"], clip_value)
    approx(logs["clip/scale"], 1.0)
    approx(logs["fd_image"], 0.5)
    approx(logs["loss"], float(total.detach()))
    assert all(isinstance(v, float) for v in logs.values())
    assert weighted.needs == frozenset({"teacher", "image", "text"})
    assert weighted.terms == [("clip", 2.0, clip), ("fd_image", 0.5, fd)]
    assert "losses.fd_image.adapters.0.weight" in weighted.state_dict()
    assert "losses.clip.log_s" in weighted.state_dict()  # a buffer here (learnable=False), saved all the same
    assert {id(p) for p in fd.parameters()} <= {id(p) for p in weighted.parameters()}
    total.backward()
    assert fd.adapters[0].weight.grad is not None


def test_weighted_loss_needs_union_and_label_errors():
    d = dims((2, 2, 2), (2, 2, 2))
    weighted = WeightedLoss([("clip", 1.0, build_loss("clip", d)), ("fd_tok", 1.0, build_loss("fd", d, level="token"))])
    assert weighted.needs == frozenset({"teacher", "image", "text", "image_tokens"})
    clip = build_loss("clip", d)
    with pytest.raises(ValueError, match="term label 'clip' is used twice"):
        WeightedLoss([("clip", 1.0, clip), ("clip", 1.0, build_loss("clip", d))])
    with pytest.raises(ValueError, match=re.escape("term label 'fd.image' is not allowed")):
        WeightedLoss([("fd.image", 1.0, clip)])
    with pytest.raises(ValueError, match="at least one term"):
        WeightedLoss([])

    class Custom(Loss):  # needs are an open set: a new kind and a new loss may agree on a new output
        needs = frozenset({"depth_map"})

    assert WeightedLoss([("x", 1.0, Custom(d))]).needs == frozenset({"depth_map"})


def test_check_needs_names_the_loss_and_the_missing_student_output():
    from vldistill.config import ConfigError, LossConfig, StageConfig
    from vldistill.losses import check_needs
    from vldistill.students import STUDENT_OUTPUTS

    stages = [
        StageConfig(losses=[LossConfig(name="clip")]),
        StageConfig(losses=[LossConfig("fd", options={"level": "token"})]),
    ]
    check_needs(stages[:1], frozenset({"image", "text"}), "toy", STUDENT_OUTPUTS)  # clip: pooled image and text
    msg = "stages.1.losses.0 (fd): needs 'image_tokens' from the student, which a toy student does not provide"
    with pytest.raises(ConfigError, match=re.escape(msg)):
        check_needs(stages, frozenset({"image", "text"}), "toy", STUDENT_OUTPUTS)
