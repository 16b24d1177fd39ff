"""VLKD's three objectives over the ``seq2seq`` student: ``ttdm``, ``itcl`` and ``icti``.

Dai et al., "Enabling Multimodal Generation on CLIP via Vision-Language Knowledge Distillation", ACL Findings 2022
(arXiv 2203.06386); ``METHODS.md`` section 3. The student (:class:`~vldistill.students.seq2seq.Seq2SeqStudent`)
gives ``p(x) = W_p pool(E(x))`` for every text field in ``Embeddings.text[field]`` and the infilling loss in
``extra["lm_loss"]``; the teacher gives ``t(x)`` (``text[field]``) and ``v(I)`` (``image``). The paper sums the
three with equal weights [uncertain]: give each term ``weight: 1`` in a recipe.
"""

from __future__ import annotations

from typing import Any

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
    _make_adapter,
    _normalize,
    _present,
    _select_teachers,
    _teacher,
    _text,
    contrastive_targets,
    soft_cross_entropy,
)
from .task import LanguageModelLoss

TTDM_NORMS = ("mse", "l1")
NORMALIZE = ("teacher", "both", "none")
REDUCTIONS = ("sum", "mean")
PREFIXES = ("pooled", "tokens")


def _adapters(dims: Dims, teachers: list[int], adapter: str) -> nn.ModuleList:
    """One adapter per teacher from the student's feature width to the teacher's (identity for a seq2seq student,
    whose ``W_p`` already projects to its teacher's width)."""
    _check_choice("adapter", adapter, ADAPTERS)
    return nn.ModuleList(
        _make_adapter(dims.student.embed, dims.teachers[k].embed, adapter, "embedding") for k in teachers
    )


@LOSSES.register("ttdm")
class TextTextDistance(Loss):
    """Text-text distance minimisation (TTDM): the LM's projected text feature against the teacher's text embedding.

    ``L = mean_i ||p(x_i) - t(x_i)||^2`` (``norm: mse``) or ``mean_i ||p(x_i) - t(x_i)||_1`` (``norm: l1``), where
    ``p(x) = W_p pool(E(x))`` is the student's feature of caption ``x`` (``Embeddings.text[lang]``) and ``t(x)`` the
    teacher's text embedding of the same caption. ``normalize: teacher`` (default) L2-normalises ``t(x)`` only, as
    ``METHODS.md`` writes ``t = norm(T_txt(x))``; ``both`` also normalises ``p(x)``; ``none`` neither.
    ``reduction: sum`` (default) sums over the ``d_T`` dimensions, which is the squared (or L1) norm of the formula;
    ``mean`` divides it by ``d_T`` (``F.mse_loss`` / ``F.l1_loss``). Several teachers: averaged. A student whose
    feature width differs from the teacher's (not a seq2seq student: its ``W_p`` projects to ``d_T``) goes through a
    linear adapter first, as in ``fd``.

    Source: Dai et al. 2022, VLKD, section 3.2 "Text-Text Distance Minimization" (norm and reduction [uncertain]).

    Args:
        dims: model widths; sizes the adapters.
        lang: the caption field of the student (``en``).
        teacher_lang: the teacher's field (default: ``lang``).
        norm: ``"mse"`` (squared L2) or ``"l1"``.
        normalize: ``"teacher"``, ``"both"`` or ``"none"``.
        reduction: ``"sum"`` or ``"mean"`` over dimensions.
        teacher: index of the one teacher to use; ``None``: every teacher, averaged.
        adapter: ``"auto"`` (linear only when widths differ), ``"linear"`` or ``"none"``, as in ``fd``.
    """

    pairs_image_text = False  # text against text of the same caption: usable on unpaired captions

    needs = frozenset({"teacher", "text"})

    def __init__(
        self,
        dims: Dims,
        lang: str = "en",
        teacher_lang: str | None = None,
        norm: str = "mse",
        normalize: str = "teacher",
        reduction: str = "sum",
        teacher: int | None = None,
        adapter: str = "auto",
    ):
        super().__init__(dims)
        self.lang = _check_lang("lang", lang)
        self.teacher_lang = self.lang if teacher_lang is None else _check_lang("teacher_lang", teacher_lang)
        _check_choice("norm", norm, TTDM_NORMS)
        _check_choice("normalize", normalize, NORMALIZE)
        _check_choice("reduction", reduction, REDUCTIONS)
        self.norm, self.normalize, self.reduction = norm, normalize, reduction
        self.teachers = _select_teachers(dims, teacher)
        self.adapters = _adapters(dims, self.teachers, adapter)

    def forward(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        per_teacher = []
        for adapter, k in zip(self.adapters, self.teachers, strict=True):
            p = adapter(_text(out.student, self.lang, "the student"))
            p = _normalize(p) if self.normalize == "both" else p
            t = _text(_teacher(out, k, len(self.dims.teachers)), self.teacher_lang, f"teacher {k}").detach()
            t = t if self.normalize == "none" else _normalize(t)
            diff = (p - t.to(p.dtype)).pow(2) if self.norm == "mse" else (p - t.to(p.dtype)).abs()
            per_dim = diff.sum(dim=-1) if self.reduction == "sum" else diff.mean(dim=-1)
            per_teacher.append(per_dim.mean())
        loss = torch.stack(per_teacher).mean()
        parts = {f"t{k}": v.detach() for k, v in zip(self.teachers, per_teacher, strict=True)}
        return loss, parts if len(per_teacher) > 1 else {}


@LOSSES.register("itcl")
class ImageTextContrastive(Loss):
    """Image-text contrastive learning (ITCL): symmetric InfoNCE between the LM's text features and the teacher's
    image embeddings.

    ``L = 1/2 [CE(s P V^T, Y) + CE(s V P^T, Y^T)]`` with ``P`` the L2-normalised ``p(x_i)`` of the batch's captions
    (``Embeddings.text[lang]`` of the student), ``V`` the teacher's L2-normalised image embeddings ``v(I_i)``, ``s =
    exp(log_s)`` this loss's own learnable scale (init ``1/0.07``, at most 100, as ``clip`` and ``icl``) and ``Y`` the
    duplicate-caption-aware targets of :func:`~vldistill.losses.contrastive_targets` (the identity when the batch's
    captions are distinct). Several teachers: averaged. A student feature of another width than the teacher's goes
    through a linear adapter before normalising, as in ``icl``.

    Source: Dai et al. 2022, VLKD, section 3.2 "Image-Text Contrastive Learning".

    Args:
        dims: model widths; sizes the adapters.
        lang: the caption field of the student.
        teacher: index of the one teacher to use; ``None``: every teacher, averaged.
        adapter: ``"auto"``, ``"linear"`` or ``"none"``, as in ``fd``.
        init_scale: initial ``s``.
        learnable: whether ``s`` is trained.
        temperature: fixed temperature ``tau``: ``s = 1 / tau``, not trained (overrides ``init_scale`` and
            ``learnable``).
    """

    needs = frozenset({"teacher", "text"})

    def __init__(
        self,
        dims: Dims,
        lang: str = "en",
        teacher: int | None = None,
        adapter: str = "auto",
        init_scale: float = DEFAULT_SCALE,
        learnable: bool = True,
        temperature: float | None = None,
    ):
        super().__init__(dims)
        self.lang = _check_lang("lang", lang)
        self.teachers = _select_teachers(dims, teacher)
        self.adapters = _adapters(dims, self.teachers, adapter)
        self._init_logit_scale(init_scale, learnable, temperature)

    def forward(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        text = _text(out.student, self.lang, "the student")
        targets = contrastive_targets(out.groups.get(self.lang), text.shape[0], text)
        scale = self.logit_scale()
        t2i, i2t = [], []
        for adapter, k in zip(self.adapters, self.teachers, strict=True):
            p = _normalize(adapter(text))
            t = _teacher(out, k, len(self.dims.teachers))
            v = _normalize(_present(t.image, f"the image embedding of teacher {k}").detach().to(p.dtype))
            logits = scale * p @ v.T  # rows: texts, columns: images
            t2i.append(soft_cross_entropy(logits, targets))
            i2t.append(soft_cross_entropy(logits.T, targets.T))
        t2i_mean, i2t_mean = torch.stack(t2i).mean(), torch.stack(i2t).mean()
        parts = {"t2i": t2i_mean.detach(), "i2t": i2t_mean.detach(), "scale": scale.detach()}
        return 0.5 * (t2i_mean + i2t_mean), parts


@LOSSES.register("icti")
class ImageConditionedTextInfilling(LanguageModelLoss):
    """Image-conditioned text infilling (ICTI): the decoder reconstructs a caption from its span-corrupted copy with
    the teacher's image output prepended to the encoder input.

    ``L = -1/N sum_{i, j} log P(x_{i,j} | x_{i,<j}, [W_v v(I_i); e(corrupt(x_i))])``: token cross-entropy, averaged
    over the ``N`` caption tokens of the batch, where ``corrupt`` is BART text infilling (span lengths ~ Poisson(3),
    about 30% of the tokens, one mask per span; seeded per seed, sample and epoch, see
    :func:`~vldistill.students.seq2seq_inputs.span_corrupt`), ``e`` the LM's input embedding and ``W_v v(I)`` the
    projected teacher image output: its pooled embedding (``prefix: pooled``) or its patch tokens (``prefix:
    tokens``) [uncertain]. The student computes it (``extra["lm_loss"]``) from the teacher outputs of the batch;
    this loss is the ``lm`` loss that also asks the teacher (or its cache) for image tokens when the student's prefix
    is built from them.

    Source: Dai et al. 2022, VLKD, section 3.2 "Image-Conditioned Text Infilling"; span corruption from Lewis et al.
    2020, BART, section 2.2.

    Args:
        dims: model widths (unused).
        prefix: what the student's image prefix is built from; it must be the student's own ``prefix`` option
            (``student.overrides.prefix``): ``tokens`` makes the teacher (or its cache) give image tokens.
    """

    needs = frozenset({"teacher", "lm_loss"})

    def __init__(self, dims: Dims, prefix: str = "pooled"):
        super().__init__(dims)
        _check_choice("prefix", prefix, PREFIXES)
        self.prefix = prefix
        self.needs = self.needs_for(prefix=prefix)

    @classmethod
    def needs_for(cls, prefix: str = "pooled", **options: Any) -> frozenset[str]:
        return cls.needs | ({"teacher_image_tokens"} if prefix == "tokens" else set())
