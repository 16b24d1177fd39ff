"""Task and distillation losses, one :data:`LOSSES` registry entry each.

Every loss reads one :class:`~vldistill.outputs.StepOutputs` and returns ``(scalar, parts)``, where ``parts`` are
named, detached tensors for logging. A recipe names losses and their options; :func:`build_loss` builds one and
checks the options, and :class:`WeightedLoss` is the weighted sum the trainer optimises.

Learnable state that exists only for distillation (adapters from student to teacher width, the losses' own logit
scales) lives in the loss modules, so it is saved with the training run and never with the exported student. The
trainer must hand ``WeightedLoss.parameters()`` to its optimiser along with the student's.

Adding a loss is one decorated class::

    @LOSSES.register("my_loss")
    class MyLoss(Loss):
        needs = frozenset({"teacher", "image", "text"})

        def __init__(self, dims: Dims, alpha: float = 1.0): ...

        def forward(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]: ...
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vldistill.config import ConfigError, StageConfig
from vldistill.outputs import Dims, Embeddings, ModelDims, StepOutputs, field_name
from vldistill.registry import Registry

LOSSES = Registry("loss")

#: What a loss can ask the trainer to compute besides the student's pooled embeddings.
NORMS = ("mse", "l1", "smooth_l1", "cosine")
TOWERS = ("image", "text")
LEVELS = ("pooled", "token")
ADAPTERS = ("auto", "linear", "none")
#: CLIP's initial logit scale ``1 / 0.07`` and its cap.
DEFAULT_SCALE = 1 / 0.07
MAX_SCALE = 100.0


# ----------------------------------------------------------------------------------------------------------------------
# Option checks (messages name the key, the value and what is allowed; build_loss adds the loss name)


def _check_choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(repr, allowed))}")


def _check_lang(key: str, value: Any) -> str:
    """A text field: a caption language tag (``en``; ``caption.en`` is the same field) or a field name (``qa``)."""
    if not isinstance(value, str) or not field_name(value):
        raise ValueError(f"{key}={value!r} is not allowed; it must be a language tag such as 'en' or a text field")
    return field_name(value)


def _check_langs(key: str, value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{key}={value!r} is not allowed; it must be a non-empty list of language tags such as ['zh']")
    return [_check_lang(key, lang) for lang in value]


def _check_positive(key: str, value: Any, upper: float | None = None) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    if not ok or (upper is not None and value > upper):
        bound = f"a number in (0, {upper:g}]" if upper is not None else "a positive number"
        raise ValueError(f"{key}={value!r} is not allowed; it must be {bound}")
    return float(value)


def _check_ratio(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{key}={value!r} is not allowed; it must be a number in [0, 1)")
    return float(value)


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} is not allowed; it must be true or false")
    return value


def _select_teachers(dims: Dims, teacher: Any) -> list[int]:
    """Indices of the teachers a loss uses: all of them (``None``) or one."""
    n = len(dims.teachers)
    if n == 0:
        raise ValueError("this loss needs a teacher, but dims.teachers is empty")
    if teacher is None:
        return list(range(n))
    if isinstance(teacher, bool) or not isinstance(teacher, int) or not 0 <= teacher < n:
        raise ValueError(f"teacher={teacher!r} is not allowed; choose null (every teacher) or an index in 0..{n - 1}")
    return [teacher]


def _make_adapter(student_width: int, teacher_width: int, adapter: str, what: str) -> nn.Module:
    """``nn.Linear(student_width, teacher_width)``, or identity when allowed (``adapter`` is auto/linear/none)."""
    if adapter == "linear" or (adapter == "auto" and student_width != teacher_width):
        return nn.Linear(student_width, teacher_width)
    if student_width != teacher_width:
        raise ValueError(
            f"adapter='none' is not allowed: the student {what} width {student_width} differs from the teacher "
            f"{what} width {teacher_width}; use adapter='auto' or 'linear'"
        )
    return nn.Identity()


# ----------------------------------------------------------------------------------------------------------------------
# Reading the step outputs


def _present(value: Tensor | None, what: str) -> Tensor:
    if value is None:
        raise ValueError(f"{what} is missing from the step outputs")
    return value


def _text(emb: Embeddings, lang: str, who: str) -> Tensor:
    if lang not in emb.text:
        raise ValueError(f"{who} has no text embedding for language {lang!r}; it has: {sorted(emb.text)}")
    return emb.text[lang]


def _teacher(out: StepOutputs, k: int, expected: int) -> Embeddings:
    if len(out.teachers) != expected:
        raise ValueError(f"the loss was built for {expected} teacher(s), but the step has {len(out.teachers)}")
    return out.teachers[k]


def _teacher_scale(teacher: Embeddings) -> Tensor | float:
    """The teacher's own logit scale, or CLIP's initial ``1 / 0.07`` when it reports none."""
    return teacher.logit_scale.detach() if teacher.logit_scale is not None else DEFAULT_SCALE


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks


def _normalize(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1)


def contrastive_targets(groups: Tensor | None, batch: int, like: Tensor) -> Tensor:
    """Soft targets ``Y[i, j] = [g_i == g_j] / #{k : g_k == g_i}`` for in-batch contrastive losses.

    With every caption distinct (or ``groups`` absent) this is the identity, i.e. the usual ``y = i``. When captions
    ``i`` and ``j`` are the same string, text ``j`` is as right for image ``i`` as text ``i`` is, so the target is
    uniform over all matching captions. ``Y`` is symmetric, so it serves both directions.

    Args:
        groups: ``[B]`` caption ids (equal id = identical caption), or ``None``.
        batch: ``B``.
        like: a tensor whose dtype and device the targets take.
    """
    if groups is None:
        return torch.eye(batch, dtype=like.dtype, device=like.device)
    groups = groups.to(like.device).reshape(-1)
    if groups.numel() != batch:
        raise ValueError(f"groups has {groups.numel()} entries for a batch of {batch}")
    same = (groups[:, None] == groups[None, :]).to(like.dtype)
    return same / same.sum(dim=1, keepdim=True)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``mean_i -sum_j targets[i, j] log softmax(logits[i])_j``; equals ``F.cross_entropy`` for one-hot targets."""
    return -(targets * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def kl_to_logits(target: Tensor, logits: Tensor) -> Tensor:
    """``mean_i KL(target[i] || softmax(logits[i]))`` (``batchmean``), with ``0 log 0 = 0``."""
    return (torch.xlogy(target, target) - target * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def distance(student: Tensor, teacher: Tensor, norm: str) -> Tensor:
    """Distance between feature vectors along the last dim, one value per vector.

    ``mse``: ``mean_k (s_k - t_k)^2``; ``l1``: ``mean_k |s_k - t_k|``; ``smooth_l1`` (beta 1): ``mean_k h(s_k - t_k)``
    with ``h(x) = x^2 / 2`` for ``|x| < 1`` else ``|x| - 1/2``; ``cosine``: ``1 - cos(s, t)``. Averaging these over
    vectors gives ``F.mse_loss`` / ``F.l1_loss`` / ``F.smooth_l1_loss`` with ``reduction="mean"``.
    """
    if norm == "mse":
        return (student - teacher).pow(2).mean(dim=-1)
    if norm == "l1":
        return (student - teacher).abs().mean(dim=-1)
    if norm == "smooth_l1":
        return F.smooth_l1_loss(student, teacher, reduction="none", beta=1.0).mean(dim=-1)
    if norm == "cosine":
        return 1 - F.cosine_similarity(student, teacher, dim=-1)
    raise ValueError(f"norm={norm!r} is not allowed; choose one of: {', '.join(map(repr, NORMS))}")


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1)


def _grid_side(n_patches: int, who: str) -> int:
    side = math.isqrt(n_patches)
    if n_patches == 0 or side * side != n_patches:
        raise ValueError(f"{who} has {n_patches + 1} image tokens, which is not [CLS] + a square patch grid")
    return side


def pool_teacher_grid(teacher_tokens: Tensor, n_student: int) -> Tensor:
    """Average-pool the teacher's patch grid to the student's grid size; [CLS] (token 0) maps to [CLS].

    Args:
        teacher_tokens: ``[B, 1 + g_T^2, h]``.
        n_student: the student's token count ``1 + g_S^2``.

    Returns:
        ``[B, 1 + g_S^2, h]`` (``F.adaptive_avg_pool2d`` over the ``g_T x g_T`` grid, row-major patch order).
    """
    b, n_teacher, h = teacher_tokens.shape
    g_t = _grid_side(n_teacher - 1, "the teacher")
    g_s = _grid_side(n_student - 1, "the student")
    grid = teacher_tokens[:, 1:].reshape(b, g_t, g_t, h).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(grid, g_s).permute(0, 2, 3, 1).reshape(b, g_s * g_s, h)
    return torch.cat([teacher_tokens[:, :1], pooled], dim=1)


def _teacher_softmax(
    out: StepOutputs, teachers: list[int], n_teachers: int, lang: str, scale: float | None
) -> tuple[Tensor, Tensor]:
    """Mean over teachers of ``softmax(s_T V_T T_T^T)`` (image->text rows) and of its transpose (text->image rows)."""
    i2t, t2i = [], []
    for k in teachers:
        t = _teacher(out, k, n_teachers)
        image = _normalize(_present(t.image, f"the image embedding of teacher {k}").detach())
        text = _normalize(_text(t, lang, f"teacher {k}").detach())
        logits = (scale if scale is not None else _teacher_scale(t)) * image @ text.T
        i2t.append(logits.softmax(dim=-1))
        t2i.append(logits.T.softmax(dim=-1))
    return torch.stack(i2t).mean(dim=0), torch.stack(t2i).mean(dim=0)


# ----------------------------------------------------------------------------------------------------------------------
# Losses


class Loss(nn.Module):
    """Base class: ``forward(out) -> (scalar loss, {part name: detached tensor})``.

    Attributes:
        needs: what the trainer must compute for this loss, declared statically (without building the loss) by
            :meth:`needs_for`: ``"teacher"`` (teacher outputs), outputs of the student named in
            ``vldistill.students.STUDENT_OUTPUTS`` (``"image"``, ``"text"``, ``"image_tokens"`` /
            ``"text_tokens"``: token features of student and teachers, ``"masked_image"``: the student's
            masked-image embedding, such a loss also sets ``self.mask_ratio``; ``"task_logits"``, ``"lm_loss"``, ...).
            The set is open: a new student kind and a new loss may agree on a new name.
    """

    needs: frozenset[str] = frozenset({"image", "text"})

    @classmethod
    def needs_for(cls, **options: Any) -> frozenset[str]:
        """What this loss needs with these recipe options; a loss whose needs depend on its options overrides it."""
        return cls.needs

    def __init__(self, dims: Dims):
        super().__init__()
        self.dims = dims

    def forward(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def _init_logit_scale(
        self, init_scale: float = DEFAULT_SCALE, learnable: bool = True, temperature: float | None = None
    ) -> None:
        """Give the loss its own contrastive scale ``s = exp(log_s)``, ``log_s = log(init_scale)``.

        ``log_s`` is a parameter when ``learnable``, else a buffer; either way it is saved with the loss. A
        ``temperature`` fixes ``s = 1 / temperature`` (a buffer) and overrides ``init_scale`` and ``learnable``.
        """
        if temperature is not None:
            t = _check_positive("temperature", temperature)
            if 1 / t > MAX_SCALE:
                raise ValueError(
                    f"temperature={temperature!r} is not allowed; it must be at least {1 / MAX_SCALE:g} "
                    f"(a scale of at most {MAX_SCALE:g})"
                )
            self.register_buffer("log_s", torch.tensor(math.log(1 / t)))
            return
        log_s = torch.tensor(math.log(_check_positive("init_scale", init_scale, upper=MAX_SCALE)))
        if _check_bool("learnable", learnable):
            self.log_s = nn.Parameter(log_s)
        else:
            self.register_buffer("log_s", log_s)

    def logit_scale(self) -> Tensor:
        """``s = exp(log_s)``, capped at 100.

        As in open_clip, which clamps ``log_s`` to ``log(100)`` after each optimiser step, a learnable ``log_s`` that
        an optimiser pushed past the cap is clamped back in place (without gradient) before it is used, so it keeps
        receiving gradients and can come down again.
        """
        if self.log_s.requires_grad:
            with torch.no_grad():
                self.log_s.clamp_(max=math.log(MAX_SCALE))
        return self.log_s.exp()


@LOSSES.register("clip")
class ClipLoss(Loss):
    """CLIP task loss: symmetric InfoNCE with a learnable logit scale, correct for duplicate captions.

    ``L = mean_l 1/2 [CE(s V T_l^T, Y_l) + CE(s T_l V^T, Y_l^T)]`` over languages ``l``, with ``V``, ``T_l`` the
    student's L2-normalised image and ``l``-caption embeddings, ``s = exp(log_s)`` (init ``1/0.07``, at most 100) and
    soft targets ``Y_l[i, j] = [g_i == g_j] / #{k : g_k == g_i}`` from ``out.groups[l]`` (the identity when captions
    are distinct or groups are absent). The soft targets change the loss only where identical captions get different
    embeddings (dropout, text augmentation): with equal embeddings, diagonal and soft targets give the same value.

    Source: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision" (CLIP).

    Args:
        dims: model widths (unused: the loss has no adapter).
        langs: caption languages to use; ``None``: every language in ``out.student.text``. Averaged.
        init_scale: initial ``s``.
        learnable: whether ``log_s`` is trained.
        temperature: fixed temperature ``tau``: ``s = 1 / tau``, not trained (overrides ``init_scale`` and
            ``learnable``); ``None``: the learnable scale above.
    """

    def __init__(
        self,
        dims: Dims,
        langs: Sequence[str] | None = None,
        init_scale: float = DEFAULT_SCALE,
        learnable: bool = True,
        temperature: float | None = None,
    ):
        super().__init__(dims)
        self.langs = None if langs is None else _check_langs("langs", langs)
        self._init_logit_scale(init_scale, learnable, temperature)

    def forward(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        image = _normalize(_present(out.student.image, "the student image embedding"))
        langs = self.langs if self.langs is not None else list(out.student.text)
        if not langs:
            raise ValueError("clip needs at least one student text embedding, but out.student.text is empty")
        scale = self.logit_scale()
        per_lang = {}
        for lang in langs:
            text = _normalize(_text(out.student, lang, "the student"))
            targets = contrastive_targets(out.groups.get(lang), image.shape[0], image)
            logits = scale * image @ text.T
            per_lang[lang] = 0.5 * (soft_cross_entropy(logits, targets) + soft_cross_entropy(logits.T, targets.T))
        loss = torch.stack(list(per_lang.values())).mean()
        parts = {"scale": scale.detach()}
        if len(per_lang) > 1:
            parts.update({lang: value.detach() for lang, value in per_lang.items()})
        return loss, parts


@LOSSES.register("fd")
class FeatureDistillation(Loss):
    """Feature distillation: ``L = mean ||A(f_S) - f_T||`` between student and teacher features of one tower.

    Pooled level (default): ``f_S``, ``f_T`` are the pooled, projected embeddings, both L2-normalised first (the
    adapter ``A`` is applied to the student embedding before normalising). Token level: ``f_S`` ``[B, n_S, h_S]`` and
    ``f_T`` ``[B, n_T, h_T]`` are last hidden states, not normalised; ``A`` acts on the hidden size; when the image
    token counts differ, the teacher's patch grid is average-pooled to the student's (``[CLS]`` to ``[CLS]``); text
    tokens must have equal lengths (same tokenizer) and padding is left out using ``text_mask``. The norm is one of
    :func:`distance`'s, averaged over vectors (so ``mse`` is ``F.mse_loss``). Several teachers: each has its own
    adapter and the per-teacher losses are averaged.

    Sources: Yang et al. 2024, "CLIP-KD: An Empirical Study of CLIP Model Distillation" (FD: MSE on normalised
    embeddings, weight 2000); Zhang et al. 2024, DC-CLIP stage 1 (feature distillation of both towers).

    Args:
        dims: model widths; sizes the adapters.
        tower: ``"image"`` or ``"text"``.
        lang: text tower: the student's caption language.
        teacher_lang: text tower: the teacher's caption language (default: ``lang``).
        norm: ``"mse"``, ``"l1"``, ``"smooth_l1"`` (beta 1) or ``"cosine"`` (``1 - cos``).
        level: ``"pooled"`` or ``"token"``.
        teacher: index of the one teacher to distil from; ``None``: every teacher, averaged.
        adapter: ``"auto"`` (linear only when widths differ), ``"linear"`` or ``"none"``.
    """

    def __init__(
        self,
        dims: Dims,
        tower: str = "image",
        lang: str = "en",
        teacher_lang: str | None = None,
        norm: str = "mse",
        level: str = "pooled",
        teacher: int | None = None,
        adapter: str = "auto",
    ):
        super().__init__(dims)
        _check_choice("tower", tower, TOWERS)
        _check_choice("norm", norm, NORMS)
        _check_choice("level", level, LEVELS)
        _check_choice("adapter", adapter, ADAPTERS)
        self.tower, self.norm, self.level = tower, norm, level
        self.lang = _check_lang("lang", lang)
        self.teacher_lang = self.lang if teacher_lang is None else _check_lang("teacher_lang", teacher_lang)
        self.teachers = _select_teachers(dims, teacher)
        what = "embedding" if level == "pooled" else f"{tower} token"
        self.adapters = nn.ModuleList(
            _make_adapter(self._width(dims.student), self._width(dims.teachers[k]), adapter, what)
            for k in self.teachers
        )
        self.needs = self.needs_for(tower=tower, level=level)

    @classmethod
    def needs_for(cls, tower: str = "image", level: str = "pooled", **options: Any) -> frozenset[str]:
        return frozenset({"teacher", tower, f"{tower}_tokens"} if level == "token" else {"teacher", tower})

    def _width(self, model: ModelDims) -> int:
        if self.level == "pooled":
            return model.embed
        return model.image_width if self.tower == "image" else model.text_width

    def forward(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        per_teacher = []
        for adapter, k in zip(self.adapters, self.teachers, strict=True):
            t = _teacher(out, k, len(self.dims.teachers))
            if self.level == "pooled":
                per_teacher.append(self._pooled(out.student, t, adapter, k))
            else:
                per_teacher.append(self._tokens(out.student, t, adapter, k))
        loss = torch.stack(per_teacher).mean()
        parts = {}
        if len(per_teacher) > 1:
            parts = {f"t{k}": v.detach() for k, v in zip(self.teachers, per_teacher, strict=True)}
        return loss, parts

    def _student_image(self, student: Embeddings) -> Tensor:
        """The student's pooled image feature (``mfd`` reads the masked-image one instead)."""
        return _present(student.image, "the student image embedding")

    def _pooled(self, student: Embeddings, teacher: Embeddings, adapter: nn.Module, k: int) -> Tensor:
        if self.tower == "image":
            f_s = self._student_image(student)
            f_t = _present(teacher.image, f"the image embedding of teacher {k}")
        else:
            f_s = _text(student, self.lang, "the student")
            f_t = _text(teacher, self.teacher_lang, f"teacher {k}")
        return distance(_normalize(adapter(f_s)), _normalize(f_t.detach()), self.norm).mean()

    def _tokens(self, student: Embeddings, teacher: Embeddings, adapter: nn.Module, k: int) -> Tensor:
        mask = None
        if self.tower == "image":
            f_s = _present(student.image_tokens, "the student image tokens")
            f_t = _present(teacher.image_tokens, f"the image tokens of teacher {k}").detach()
            if f_s.shape[1] != f_t.shape[1]:
                f_t = pool_teacher_grid(f_t, f_s.shape[1])
        else:
            f_s = _present(student.text_tokens.get(self.lang), f"the student {self.lang!r} text tokens")
            f_t = _present(
                teacher.text_tokens.get(self.teacher_lang), f"the {self.teacher_lang!r} text tokens of teacher {k}"
            )
            f_t = f_t.detach()
            if f_s.shape[1] != f_t.shape[1]:
                raise ValueError(
                    f"token-level text fd needs equal token counts, got student {f_s.shape[1]} and teacher "
                    f"{f_t.shape[1]} (different tokenizers?); use level='pooled'"
                )
            for m in (student.text_mask.get(self.lang), teacher.text_mask.get(self.teacher_lang)):
                if m is not None:
                    mask = m if mask is None else mask * m
        return _masked_mean(distance(adapter(f_s), f_t, self.norm), mask)


@LOSSES.register("mfd")
class MaskedFeatureDistillation(FeatureDistillation):
    """Masked feature distillation: ``fd`` of the image tower where the student sees only part of the image.

    ``L = mean_i d(norm(A(S_img(M_r(x_i)))), norm(T_img(x_i)))``: ``M_r`` drops a random fraction ``r`` of the
    student's image patches before its image tower (it keeps ``[CLS]`` and ``max(1, floor(n (1 - r)))`` of its ``n``
    patches, a fresh random subset per sample and step), ``T_img(x_i)`` is the teacher's pooled embedding of the
    full image, both L2-normalised (the adapter ``A`` maps the student's width to the teacher's before
    normalising), ``d`` one of :func:`distance`'s norms (``mse`` by default). Everything else is ``fd`` on pooled
    image embeddings: several teachers each have their own adapter and are averaged. The trainer computes the
    masked embedding (``Embeddings.image_masked``, with ``DualEncoder.encode_image_masked``) because this loss needs
    ``"masked_image"``; the student's unmasked embedding stays available to the other terms.

    Source: Yang et al. 2024, "CLIP-KD: An Empirical Study of CLIP Model Distillation" ("MFD", masked feature
    distillation; mask ratio 0.5).

    Args:
        dims: model widths; sizes the adapters.
        mask_ratio: fraction of the student's patches dropped, in ``[0, 1)``.
        norm: ``"mse"``, ``"l1"``, ``"smooth_l1"`` or ``"cosine"``.
        teacher: index of the one teacher to distil from; ``None``: every teacher, averaged.
        adapter: ``"auto"``, ``"linear"`` or ``"none"``, as in ``fd``.
    """

    def __init__(
        self,
        dims: Dims,
        mask_ratio: float = 0.5,
        norm: str = "mse",
        teacher: int | None = None,
        adapter: str = "auto",
    ):
        super().__init__(dims, tower="image", norm=norm, level="pooled", teacher=teacher, adapter=adapter)
        self.mask_ratio = _check_ratio("mask_ratio", mask_ratio)
        self.needs = self.needs_for()

    @classmethod
    def needs_for(cls, **options: Any) -> frozenset[str]:
        return frozenset({"teacher", "masked_image"})

    def _student_image(self, student: Embeddings) -> Tensor:
        return _present(student.image_masked, "the student masked-image embedding (image_masked)")


@LOSSES.register("xling")
class CrossLingualDistillation(Loss):
    """Cross-lingual text distillation on parallel captions against the teacher's target-language embedding.

    ``L = mean_{l in langs} d(A(S_txt(x_l)), t(x_tgt)) + d(A(S_txt(x_tgt)), t(x_tgt))``, where ``t(x_tgt)`` is the
    teacher's text embedding of the target-language caption (e.g. English), ``A`` the adapter, both sides
    L2-normalised when ``normalize`` and ``d`` one of :func:`distance`'s norms averaged over the batch. With one
    source language this is ``mse(S(x_zh), t(x_en)) + mse(S(x_en), t(x_en))``. Several teachers: each has its own
    adapter and the per-teacher losses are averaged.

    Sources: Carlsson et al. 2022, Multilingual-CLIP; Reimers & Gurevych 2020, "Making Monolingual Sentence
    Embeddings Multilingual using Knowledge Distillation"; Chen et al. 2022, AltCLIP stage 1 (teacher learning).

    Args:
        dims: model widths; sizes the adapters.
        langs: source languages (their captions are translations of the target-language caption).
        target_lang: the language of the teacher's caption.
        norm: ``"mse"``, ``"l1"``, ``"smooth_l1"`` or ``"cosine"``.
        normalize: L2-normalise both embeddings first.
        teacher: index of the one teacher to use; ``None``: every teacher, averaged.
        adapter: ``"auto"``, ``"linear"`` or ``"none"``, as in ``fd``.
    """

    needs = frozenset({"teacher", "image", "text"})

    def __init__(
        self,
        dims: Dims,
        langs: Sequence[str] = ("zh",),
        target_lang: str = "en",
        norm: str = "mse",
        normalize: bool = True,
        teacher: int | None = None,
        adapter: str = "auto",
    ):
        super().__init__(dims)
        self.langs = _check_langs("langs", langs)
        self.target_lang = _check_lang("target_lang", target_lang)
        if self.target_lang in self.langs:
            raise ValueError(f"langs={self.langs!r} is not allowed: it contains target_lang {self.target_lang!r}")
        _check_choice("norm", norm, NORMS)
        _check_choice("adapter", adapter, ADAPTERS)
        self.norm = norm
        self.normalize = _check_bool("normalize", normalize)
        self.teachers = _select_teachers(dims, teacher)
        self.adapters = nn.ModuleList(
            _make_adapter(dims.student.embed, dims.teachers[k].embed, adapter, "embedding") for k in self.teachers
        )

    def forward(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        per_lang: dict[str, list[Tensor]] = {lang: [] for lang in [*self.langs, self.target_lang]}
        for adapter, k in zip(self.adapters, self.teachers, strict=True):
            t = _teacher(out, k, len(self.dims.teachers))
            target = _text(t, self.target_lang, f"teacher {k}").detach()
            target = _normalize(target) if self.normalize else target
            for lang in per_lang:
                student = adapter(_text(out.student, lang, "the student"))
                student = _normalize(student) if self.normalize else student
                per_lang[lang].append(distance(student, target, self.norm).mean())
        means = {lang: torch.stack(values).mean() for lang, values in per_lang.items()}
        source = torch.stack([means[lang] for lang in self.langs]).mean()
        loss = source + means[self.target_lang]
        return loss, {lang: value.detach() for lang, value in means.items()}


@LOSSES.register("crd")
class RelationalDistillation(Loss):
    """Contrastive relational (affinity) distillation: match the student's in-batch image-text distributions.

    ``L = 1/2 [KL(P || softmax(s_S V_S T_S^T)) + KL(P' || softmax(s_S T_S V_S^T))]``, row-wise KL averaged over
    the batch, where ``P = softmax(s_T V_T T_T^T)`` (image->text rows) and ``P'`` the text->image rows of the
    teacher; all embeddings L2-normalised. ``s_T`` is the teacher's own ``logit_scale`` (``1/0.07`` if it reports
    none); ``s_S`` is this loss's own learnable scale (init ``1/0.07``, at most 100). With ``temperature`` set, both
    scales are ``1 / temperature``. Several teachers: ``P`` and ``P'`` are the means of the teachers' softmaxes.

    Sources: Yang et al. 2024, CLIP-KD ("CRD"); Wu et al. 2023, TinyCLIP (affinity mimicking); Vasu et al. 2024,
    MobileCLIP (mean of several teachers' distributions).

    Args:
        dims: model widths.
        lang: the student's caption language.
        teacher_lang: the teachers' caption language (default: ``lang``).
        temperature: fixed temperature for both sides; ``None``: the models' scales as above.
        teacher: index of the one teacher to use; ``None``: every teacher.
    """

    needs = frozenset({"teacher", "image", "text"})

    def __init__(
        self,
        dims: Dims,
        lang: str = "en",
        teacher_lang: str | None = None,
        temperature: float | None = None,
        teacher: int | None = None,
    ):
        super().__init__(dims)
        self.lang = _check_lang("lang", lang)
        self.teacher_lang = self.lang if teacher_lang is None else _check_lang("teacher_lang", teacher_lang)
        self.teachers = _select_teachers(dims, teacher)
        # The check (and message) of clip, icl and soft_ce: a temperature below 1/MAX_SCALE is refused.
        self._init_logit_scale(temperature=temperature)
        self.temperature = None if temperature is None else float(temperature)

    def forward(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        fixed = None if self.temperature is None else 1 / self.temperature
        p_i2t, p_t2i = _teacher_softmax(out, self.teachers, len(self.dims.teachers), self.teacher_lang, fixed)
        image = _normalize(_present(out.student.image, "the student image embedding"))
        text = _normalize(_text(out.student, self.lang, "the student"))
        scale = self.logit_scale() if fixed is None else fixed
        logits = scale * image @ text.T
        i2t, t2i = kl_to_logits(p_i2t, logits), kl_to_logits(p_t2i, logits.T)
        parts = {"i2t": i2t.detach(), "t2i": t2i.detach()}
        if fixed is None:
            parts["scale"] = scale.detach()
        return 0.5 * (i2t + t2i), parts


@LOSSES.register("soft_ce")
class SoftCrossEntropyDistillation(Loss):
    """CLIP task loss plus cross-entropy of the student's in-batch logits against the teacher's softmax.

    ``L = task + distill``; ``task`` is :class:`ClipLoss` on language ``lang`` (duplicate-caption aware) and
    ``distill = 1/2 [CE(s_S V_S T_S^T, P) + CE(s_S T_S V_S^T, P')]`` with soft targets ``P = softmax(s_T V_T T_T^T)``
    (rows image->text) and ``P'`` its text->image counterpart; ``s_S`` is this loss's own learnable scale (shared
    by both parts), ``s_T`` the teacher's ``logit_scale`` (``1/0.07`` if none). Several teachers: ``P``, ``P'`` are
    the means of their softmaxes. Parts ``task`` and ``distill``.

    Source: open_clip ``DistillClipLoss`` (Ilharco et al., OpenCLIP); multi-teacher mean from MobileCLIP.

    Args:
        dims: model widths.
        lang: the student's caption language.
        teacher_lang: the teachers' caption language (default: ``lang``).
        teacher: index of the one teacher to use; ``None``: every teacher.
        init_scale: initial student scale.
        learnable: whether the student scale is trained.
        temperature: fixed temperature ``tau`` for both sides, as in ``crd``: ``s_S = s_T = 1 / tau``, not trained
            (overrides ``init_scale`` and ``learnable``); ``None``: the scales above.
    """

    needs = frozenset({"teacher", "image", "text"})

    def __init__(
        self,
        dims: Dims,
        lang: str = "en",
        teacher_lang: str | None = None,
        teacher: int | None = None,
        init_scale: float = DEFAULT_SCALE,
        learnable: bool = True,
        temperature: float | None = None,
    ):
        super().__init__(dims)
        self.lang = _check_lang("lang", lang)
        self.teacher_lang = self.lang if teacher_lang is None else _check_lang("teacher_lang", teacher_lang)
        self.teachers = _select_teachers(dims, teacher)
        self._init_logit_scale(init_scale, learnable, temperature)
        self.teacher_scale = None if temperature is None else 1 / float(temperature)

    def forward(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        p_i2t, p_t2i = _teacher_softmax(
            out, self.teachers, len(self.dims.teachers), self.teacher_lang, self.teacher_scale
        )
        image = _normalize(_present(out.student.image, "the student image embedding"))
        text = _normalize(_text(out.student, self.lang, "the student"))
        scale = self.logit_scale()
        logits = scale * image @ text.T
        targets = contrastive_targets(out.groups.get(self.lang), image.shape[0], image)
        task = 0.5 * (soft_cross_entropy(logits, targets) + soft_cross_entropy(logits.T, targets.T))
        distill = 0.5 * (soft_cross_entropy(logits, p_i2t) + soft_cross_entropy(logits.T, p_t2i))
        return task + distill, {"task": task.detach(), "distill": distill.detach(), "scale": scale.detach()}


@LOSSES.register("icl")
class InteractiveContrastive(Loss):
    """Interactive contrastive learning: the student's embeddings contrasted against the teacher's other tower.

    ``L = 1/2 [CE(s A_v(V_S) T_T^T, Y) + CE(s A_t(T_S) V_T^T, Y)]``: student image queries against teacher text keys
    and student text queries against teacher image keys, all L2-normalised (adapters ``A_v``, ``A_t`` before
    normalising, when widths differ), ``s`` this loss's own learnable scale (init ``1/0.07``, at most 100), ``Y`` the
    duplicate-caption-aware targets of :func:`contrastive_targets`. Several teachers: each has its own adapters and
    the per-teacher losses are averaged.

    Source: Yang et al. 2024, CLIP-KD ("ICL").

    Args:
        dims: model widths; sizes the adapters.
        lang: the student's caption language.
        teacher_lang: the teachers' caption language (default: ``lang``).
        teacher: index of the one teacher to use; ``None``: every teacher, averaged.
        adapter: ``"auto"``, ``"linear"`` or ``"none"``, as in ``fd``.
        init_scale: initial ``s``.
        learnable: whether ``s`` is trained.
        temperature: fixed temperature ``tau``: ``s = 1 / tau``, not trained (overrides ``init_scale`` and
            ``learnable``); ``None``: the learnable scale above.
    """

    needs = frozenset({"teacher", "image", "text"})

    def __init__(
        self,
        dims: Dims,
        lang: str = "en",
        teacher_lang: str | None = None,
        teacher: int | None = None,
        adapter: str = "auto",
        init_scale: float = DEFAULT_SCALE,
        learnable: bool = True,
        temperature: float | None = None,
    ):
        super().__init__(dims)
        self.lang = _check_lang("lang", lang)
        self.teacher_lang = self.lang if teacher_lang is None else _check_lang("teacher_lang", teacher_lang)
        _check_choice("adapter", adapter, ADAPTERS)
        self.teachers = _select_teachers(dims, teacher)
        s, ts = dims.student.embed, [dims.teachers[k].embed for k in self.teachers]
        self.image_adapters = nn.ModuleList(_make_adapter(s, t, adapter, "embedding") for t in ts)
        self.text_adapters = nn.ModuleList(_make_adapter(s, t, adapter, "embedding") for t in ts)
        self._init_logit_scale(init_scale, learnable, temperature)

    def forward(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        image = _present(out.student.image, "the student image embedding")
        text = _text(out.student, self.lang, "the student")
        targets = contrastive_targets(out.groups.get(self.lang), image.shape[0], image)
        scale = self.logit_scale()
        i2t, t2i = [], []
        for a_img, a_txt, k in zip(self.image_adapters, self.text_adapters, self.teachers, strict=True):
            t = _teacher(out, k, len(self.dims.teachers))
            t_image = _normalize(_present(t.image, f"the image embedding of teacher {k}").detach())
            t_text = _normalize(_text(t, self.teacher_lang, f"teacher {k}").detach())
            i2t.append(soft_cross_entropy(scale * _normalize(a_img(image)) @ t_text.T, targets))
            t2i.append(soft_cross_entropy(scale * _normalize(a_txt(text)) @ t_image.T, targets.T))
        i2t_mean, t2i_mean = torch.stack(i2t).mean(), torch.stack(t2i).mean()
        parts = {"i2t": i2t_mean.detach(), "t2i": t2i_mean.detach(), "scale": scale.detach()}
        return 0.5 * (i2t_mean + t2i_mean), parts


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


# ----------------------------------------------------------------------------------------------------------------------
# Building and combining


def loss_options(name: str) -> list[str]:
    """The option names a registered loss accepts (its constructor's keyword arguments besides ``dims``)."""
    params = inspect.signature(LOSSES.get(name)).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and p.name != "dims"]


def build_loss(name: str, dims: Dims, **options: Any) -> Loss:
    """Build the registered loss ``name`` with recipe ``options``.

    Raises:
        KeyError: unknown loss name (the message lists the registered losses).
        ValueError: an option the loss does not take (the message lists those it does), or a bad option value (the
            message names the loss, the key, the value and what is allowed).
    """
    cls = LOSSES.get(name)
    allowed = loss_options(name)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls).parameters.values())
    unknown = [key for key in options if key not in allowed]
    if unknown and not takes_any:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for loss {name!r}; "
            f"allowed options: {', '.join(allowed) or '(none)'}"
        )
    try:
        return cls(dims, **options)
    except ValueError as err:
        raise ValueError(f"loss {name!r}: {err}") from err


class WeightedLoss(nn.Module):
    """The objective the trainer optimises: ``sum_k w_k L_k`` over labelled terms.

    Attributes:
        terms: the ``(label, weight, loss)`` triples, in order.
        losses: the same losses by label, registered as submodules: their adapters and scales are in
            ``parameters()`` and in the state dict as ``losses.<label>.<name>``, e.g.
            ``losses.fd_image.adapters.0.weight``.

    Args:
        terms: ``(label, weight, loss)`` triples, e.g. ``("fd_image", 2000.0, fd)``. Labels are unique, non-empty,
            contain neither ``.`` nor ``/`` and are not ``loss`` (the key of the total in the logs).
    """

    def __init__(self, terms: Sequence[tuple[str, float, Loss]]):
        super().__init__()
        if not terms:
            raise ValueError("WeightedLoss needs at least one term")
        self.losses = nn.ModuleDict()
        self.terms: list[tuple[str, float, Loss]] = []
        for label, weight, loss in terms:
            if not isinstance(label, str) or not label or "." in label or "/" in label or label == "loss":
                raise ValueError(
                    f"term label {label!r} is not allowed: it must be non-empty, without '.' or '/', and not 'loss'"
                )
            if label in self.losses:
                raise ValueError(f"term label {label!r} is used twice; labels must be unique")
            if not isinstance(loss, Loss):
                raise ValueError(f"term {label!r}: {type(loss).__name__} is not a vldistill Loss")
            try:
                self.losses[label] = loss
            except KeyError as err:  # a label that clashes with a ModuleDict attribute, e.g. "items"
                raise ValueError(f"term label {label!r} is not allowed: {err}") from err
            self.terms.append((label, float(weight), loss))

        ratios: set[float] = set()
        for label, _, loss in self.terms:
            if "masked_image" in loss.needs:
                if not isinstance(getattr(loss, "mask_ratio", None), float | int):
                    raise ValueError(f"term {label!r} needs 'masked_image' but has no numeric mask_ratio attribute")
                ratios.add(float(loss.mask_ratio))
        ordered = sorted(ratios)
        if len(ordered) > 1:
            raise ValueError(
                f"the terms mask the student's image with different mask_ratio values {ordered}; the trainer computes "
                "one masked view per step, so give them the same mask_ratio"
            )
        self.mask_ratio: float | None = ordered[0] if ordered else None
        """The mask ratio of the terms that need ``"masked_image"`` (``None`` when none does)."""

    @property
    def needs(self) -> frozenset[str]:
        """Union of the terms' needs."""
        return frozenset().union(*(loss.needs for _, _, loss in self.terms))

    def forward(self, out: StepOutputs) -> tuple[Tensor, dict[str, float]]:
        """Returns the weighted total and logs: ``<label>`` (unweighted), ``<label>/<part>`` and ``loss`` (total)."""
        total: Tensor | None = None
        logs: dict[str, float] = {}
        for label, weight, loss in self.terms:
            value, parts = loss(out)
            total = weight * value if total is None else total + weight * value
            logs[label] = float(value.detach())
            logs.update({f"{label}/{part}": float(v) for part, v in parts.items()})
        assert total is not None  # terms is non-empty
        logs["loss"] = float(total.detach())
        return total, logs


# --------------------------------------------------------------------------------------------- stages
def build_stage_loss(stage: StageConfig, dims: Dims, stage_index: int) -> WeightedLoss:
    """Build a stage's weighted loss; errors name the recipe key of the offending term."""
    terms = []
    for j, term in enumerate(stage.losses):
        key = f"stages.{stage_index}.losses.{j}"
        try:
            loss = build_loss(term.name, dims, **term.options)
        except KeyError as err:
            raise ConfigError(f"{key}.name: {err.args[0]}") from None
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key} ({term.name}): {err}") from None
        if "teacher" in loss.needs and not dims.teachers:
            raise ConfigError(f"{key}: loss {term.name!r} needs a teacher, but the recipe has none (set teacher:)")
        terms.append((term.label or _label(term.name, term.options), term.weight, loss))
    labels = [t[0] for t in terms]
    dupes = {lab for lab in labels if labels.count(lab) > 1}
    if dupes:
        raise ConfigError(f"stages.{stage_index}: several loss terms are labelled {sorted(dupes)}; give each a label")
    return WeightedLoss(terms)


def _label(name: str, options: dict[str, Any]) -> str:
    parts = [name] + [str(options[k]) for k in ("tower", "lang") if k in options]
    return "_".join(parts)


def stage_needs(stage: StageConfig, stage_index: int) -> list[tuple[str, frozenset[str]]]:
    """Each term's needs, declared statically (nothing is built): ``[(recipe key, needs), ...]``."""
    out = []
    for j, term in enumerate(stage.losses):
        key = f"stages.{stage_index}.losses.{j}"
        try:
            cls = LOSSES.get(term.name)
        except KeyError as err:
            raise ConfigError(f"{key}.name: {err.args[0]}") from None
        out.append((f"{key} ({term.name})", cls.needs_for(**term.options)))
    return out


def check_needs(
    stages: Sequence[StageConfig], provides: frozenset[str], kind: str, student_outputs: frozenset[str]
) -> None:
    """Fail before training when a loss needs an output that the student kind does not provide.

    Args:
        stages: the recipe's stages.
        provides: what the student kind's ``forward`` can fill.
        kind: the student kind's name (for the message).
        student_outputs: the names that are student outputs (``vldistill.students.STUDENT_OUTPUTS``); other
            needs (``teacher``) are checked against the teacher source.
    """
    for i, stage in enumerate(stages):
        for key, needs in stage_needs(stage, i):
            missing = sorted((needs & student_outputs) - provides)
            if missing:
                raise ConfigError(
                    f"{key}: needs {', '.join(map(repr, missing))} from the student, which a {kind} student does not "
                    f"provide (it provides: {', '.join(sorted(provides))})"
                )
