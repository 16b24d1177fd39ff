"""Contrastive losses on the in-batch image-text similarities: ``clip`` (the CLIP task loss), ``crd`` (relational
distillation), ``soft_ce`` (CLIP loss plus cross-entropy against the teacher's softmax) and ``icl`` (interactive
contrastive learning against the teacher's other tower)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vldistill.outputs import Dims, StepOutputs

from .base import (
    ADAPTERS,
    DEFAULT_SCALE,
    LOSSES,
    Loss,
    _check_choice,
    _check_lang,
    _check_langs,
    _make_adapter,
    _normalize,
    _present,
    _select_teachers,
    _teacher,
    _teacher_softmax,
    _text,
    contrastive_targets,
    kl_to_logits,
    soft_cross_entropy,
)


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
