"""Feature distillation losses: ``fd`` (student features matched to the teacher's, pooled or per token), ``mfd``
(``fd`` of the image tower with part of the student's image masked) and ``xling`` (cross-lingual text distillation
on parallel captions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vldistill.outputs import Dims, Embeddings, ModelDims, StepOutputs

from .base import (
    ADAPTERS,
    LEVELS,
    LOSSES,
    NORMS,
    TOWERS,
    Loss,
    _check_bool,
    _check_choice,
    _check_lang,
    _check_langs,
    _check_ratio,
    _make_adapter,
    _masked_mean,
    _normalize,
    _present,
    _select_teachers,
    _teacher,
    _text,
    distance,
    pool_teacher_grid,
)


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

    pairs_image_text = False  # unimodal: image to image, text to text

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

    pairs_image_text = False  # unimodal: image to image, text to text

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
