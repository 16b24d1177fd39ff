"""CLIP-TD's targeted distillation loss (``clip_td``) for a cross-modal student fine-tuned on a task."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vldistill.outputs import Dims, Embeddings, StepOutputs

from .base import (
    LOSSES,
    Loss,
    _check_bool,
    _check_choice,
    _check_positive,
    _present,
    _select_teachers,
    _teacher,
    _teacher_scale,
)

#: How the tokens to distil are chosen, per instance and modality.
SCORERS = ("attention", "similarity", "all")
#: The per-token distance.
CLIP_TD_NORMS = ("l1", "l2")
#: How the per-token distance reduces over the ``d`` dimensions.
CLIP_TD_REDUCTIONS = ("mean", "sum")
#: The two terms of the loss: the visual tokens against ``v``, the text tokens against ``t_y*``.
CLIP_TD_PARTS = ("visual", "text")
#: Text fields that hold ``t_y*``, tried in this order by ``field: auto``.
TARGET_FIELDS = ("qa", "hypothesis", "candidates")


@LOSSES.register("clip_td")
class ClipTargetedDistillation(Loss):
    """CLIP-TD: distil a frozen CLIP's image and text embeddings into a few selected tokens of a cross-modal student.

    For instance ``i`` with student token states ``h_ij`` (the fused sequence's last layer), the teacher's image
    embedding ``v_i`` and its text embedding ``t_i = t_{y*}`` of the query with the right answer::

        L = 1/B sum_i w_i [ 1/|V_i| sum_{j in V_i} D(P_v(h_ij), v_i) + 1/|T_i| sum_{j in T_i} D(P_t(h_ij), t_i) ]

    and the recipe adds the task loss: ``L_total = L_task + lambda * L`` with ``lambda`` this term's ``weight:``
    (default 1). ``parts`` keeps one of the two terms for an ablation (``[visual]``: the first sum only; ``[text]``:
    the second only); the default is both, the papers' loss.

    - ``P_v``, ``P_t``: linear heads from the student's hidden width to the teacher's embedding width. They exist
      only for distillation: they live in this loss module, are trained with the student and saved with the run's
      checkpoints, never with the exported student.
    - ``V_i`` / ``T_i``: the top-``k`` visual tokens (image patches, not the image [CLS]) and top-``k`` text tokens
      (not [CLS], not padding) of instance ``i`` by a score (``scorer``): ``attention`` (default) the last layer's
      head-averaged attention from the student's [CLS] to each token (``extra["cls_attention"]``); ``similarity``
      the cosine of the projected token ``P(h_ij)`` to its teacher target; ``all`` every token (``k`` unused). An
      instance with fewer than ``k`` tokens of a modality uses all of them.
    - ``t_{y*}``: the teacher's text embedding of query + right answer: VQA field ``qa`` (question + answer),
      entailment ``hypothesis``, multiple choice ``candidates[y*]`` (the ``[B, C, d]`` field, one vector per
      question + candidate, indexed by ``targets["answer"]``). ``field: auto`` takes the first of ``qa``,
      ``hypothesis``, ``candidates`` that the teacher outputs hold.
    - ``D``: on L2-normalised vectors (``normalize``, default; the teacher's embedding norm then does not scale the
      loss), ``l1`` (default) ``|a - b|`` or ``l2`` ``(a - b)^2``, averaged over the ``d`` dimensions
      (``reduction: mean``, default, as ``torch.nn.functional.l1_loss`` / ``mse_loss`` do) or summed, the papers'
      ``||a - b||_1`` literally (``reduction: sum``, ``d`` times larger). Why ``mean``: on the bundled tasks
      (``benchmarks/task_distill.py``, vilt-small, 10% of the training items, 300 steps, seed 0, 2026-11-30) the
      summed L1 term at ``lambda = 1`` (about 10 against a task loss of about 1.5, with a sign gradient on every one
      of the 128 dimensions) kept the task loss at chance: VQA 39.7% and entailment 33.3% against 66.0% and 65.7%
      without the teacher; with ``mean`` the same run gave 67.0% and 66.7% (one seed: a pilot that chose the default,
      not a comparison of the two; the three-seed benchmark runs ``mean`` only).
    - ``w_i``: the teacher's confidence in the right answer, detached. With candidates (multiple choice) its
      zero-shot probability of the right one, ``softmax_c(s cos(v_i, t_ic))[y*_i]`` with ``s`` the teacher's logit
      scale (or ``scale``). Without candidates (VQA with ``qa``, entailment) there is nothing to normalise over, and
      the fallback is the teacher's image-text cosine mapped to [0, 1]: ``w_i = (cos(v_i, t_i) + 1) / 2``.
      ``confidence: false`` sets ``w_i = 1``. ``above_chance: true`` (candidates only) rescales the probability so
      that a teacher at chance weighs nothing: ``w_i = max(0, (p_i - 1/C) / (1 - 1/C))`` for ``C`` candidates. The
      softmax alone does not lower the weight where the teacher does not know: on the bundled multiple choice the
      reference teacher, near chance on QA->R (30%, four rationales), gives the right rationale ``p`` = 0.27 on
      average (README "A teacher that knows the task"); off by default, the papers' softmax.
    - Instances without a right answer (``targets["answer"] = -1``) are left out when the target is a candidate.

    Sources: Wang et al., "CLIP-TD: CLIP Targeted Distillation for Vision-Language Tasks" (arXiv 2201.05729), and
    its revision "Multimodal Adaptive Distillation for Leveraging Unimodal Encoders for Vision-Language Tasks"
    (arXiv 2204.10496). The papers publish no code; the scorer, ``k``, the norm and the confidence formula are the
    **[uncertain]** choices of ``METHODS.md`` section 4, each an option with the default given there.

    Args:
        dims: model widths: ``P_v`` maps the student's ``image_width``, ``P_t`` its ``text_width``, both to the
            teacher's ``embed`` width.
        k: tokens kept per instance and modality (default 8).
        scorer: ``attention`` (default), ``similarity`` or ``all``.
        norm: ``l1`` (default) or ``l2``.
        reduction: ``mean`` (default) or ``sum`` of ``D`` over the ``d`` dimensions.
        normalize: L2-normalise the projected tokens and the teacher targets before ``D``.
        confidence: weight each instance by the teacher's confidence ``w_i``.
        field: the text field of ``t_{y*}``: ``auto``, ``qa``, ``hypothesis`` or ``candidates``.
        scale: the softmax scale ``s`` of the multiple-choice confidence; ``None``: the teacher's own.
        above_chance: rescale the multiple-choice confidence so that chance (``1/C``) and below weigh 0.
        teacher: index of the teacher whose outputs are distilled (default 0, the first).
        parts: the terms to compute, ``visual`` and / or ``text`` (default both).
    """

    @classmethod
    def needs_for(cls, scorer: str = "attention", **options: Any) -> frozenset[str]:
        needs = {"teacher", "token_states"}
        if scorer == "attention":
            needs.add("cls_attention")
        return frozenset(needs)

    needs = frozenset({"teacher", "token_states", "cls_attention"})

    def __init__(
        self,
        dims: Dims,
        k: int = 8,
        scorer: str = "attention",
        norm: str = "l1",
        reduction: str = "mean",
        normalize: bool = True,
        confidence: bool = True,
        field: str = "auto",
        scale: float | None = None,
        teacher: int = 0,
        parts: list[str] | tuple[str, ...] = CLIP_TD_PARTS,
        above_chance: bool = False,
    ):
        super().__init__(dims)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} is not allowed; it must be a positive integer")
        _check_choice("scorer", scorer, SCORERS)
        _check_choice("norm", norm, CLIP_TD_NORMS)
        _check_choice("reduction", reduction, CLIP_TD_REDUCTIONS)
        _check_choice("field", field, ("auto", *TARGET_FIELDS))
        if teacher is None:
            raise ValueError("teacher=None is not allowed; choose the index of one teacher (default 0)")
        (self.teacher_index,) = _select_teachers(dims, teacher)
        self.k, self.scorer, self.norm, self.field, self.reduction = k, scorer, norm, field, reduction
        self.normalize = _check_bool("normalize", normalize)
        self.confidence = _check_bool("confidence", confidence)
        self.above_chance = _check_bool("above_chance", above_chance)
        self.scale = None if scale is None else _check_positive("scale", scale)
        self.parts = _check_parts(parts)
        self.needs = self.needs_for(scorer=scorer)
        width = dims.teachers[self.teacher_index].embed
        self.proj_v = nn.Linear(dims.student.image_width, width)
        self.proj_t = nn.Linear(dims.student.text_width, width)

    # ------------------------------------------------------------------------------------------------------ forward
    def forward(self, out: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        extra = out.student.extra
        states = _present(extra.get("token_states"), "student token_states")
        image_mask = _present(extra.get("image_token_mask"), "student image_token_mask").bool()
        text_mask = _present(extra.get("text_token_mask"), "student text_token_mask").bool()
        attention = extra.get("cls_attention") if self.scorer == "attention" else None
        if self.scorer == "attention":
            attention = _present(attention, "student cls_attention")

        teacher = _teacher(out, self.teacher_index, len(self.dims.teachers))
        v = _present(teacher.image, f"the image embedding of teacher {self.teacher_index}").detach().float()
        t, w, valid = self._text_target(teacher, v, out.targets.get("answer"))
        if not self.confidence:
            w = torch.ones_like(w)

        states = states.float()
        terms = {}
        if "visual" in self.parts:
            terms["visual"] = self._tokens(self.proj_v(states), v, image_mask, attention)
        if "text" in self.parts:
            terms["text"] = self._tokens(self.proj_t(states), t, text_mask, attention)
        per_instance = sum(terms.values()) * w.to(states.device)
        keep = valid.to(states.device)
        if not bool(keep.any()):  # no instance with a known right candidate: nothing to distil in this batch
            return states.sum() * 0.0, {}
        loss = per_instance[keep].mean()
        parts = {name: term[keep].mean().detach() for name, term in terms.items()}
        return loss, {**parts, "w": w[keep].mean()}

    def _text_target(self, teacher: Embeddings, v: Tensor, answer: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """``t_{y*}`` ``[B, d]``, the confidence ``w`` ``[B]`` and which instances have a target ``[B]`` (bool)."""
        name = self._field(teacher)
        text = teacher.text[name].detach().float()
        batch = v.shape[0]
        if text.dim() == 2:  # one text per instance: the fallback confidence
            if self.above_chance and self.confidence:
                raise ValueError(
                    f"clip_td: above_chance=true needs candidates (the field 'candidates'), but field {name!r} holds "
                    "one text per instance, where no chance level exists; set above_chance: false"
                )
            w = (F.cosine_similarity(v, text, dim=-1) + 1) / 2
            return text, w, torch.ones(batch, dtype=torch.bool, device=v.device)
        if answer is None:
            raise ValueError(f"clip_td: field {name!r} holds one text per candidate, but targets['answer'] is missing")
        answer = answer.to(v.device).long()
        valid = answer >= 0
        index = answer.clamp(min=0)
        rows = torch.arange(batch, device=v.device)
        target = text[rows, index]
        scale = self.scale if self.scale is not None else _teacher_scale(teacher)
        return target, candidate_confidence(v, text, index, scale, self.above_chance), valid

    def _field(self, teacher: Embeddings) -> str:
        if self.field != "auto":
            if self.field not in teacher.text:
                raise ValueError(
                    f"clip_td: field={self.field!r}, but the teacher outputs have the fields {sorted(teacher.text)}"
                )
            return self.field
        for name in TARGET_FIELDS:
            if name in teacher.text:
                return name
        raise ValueError(
            f"clip_td: the teacher outputs have none of the text fields {list(TARGET_FIELDS)} (query + right answer); "
            f"they have {sorted(teacher.text)}: is data.task vqa, entailment or multiple_choice?"
        )

    def _tokens(self, projected: Tensor, target: Tensor, mask: Tensor, attention: Tensor | None) -> Tensor:
        """Per instance, the mean distance of its selected tokens' projections to its target: ``[B]``."""
        if self.normalize:
            projected, target = F.normalize(projected, dim=-1), F.normalize(target, dim=-1)
        diff = projected - target[:, None, :]
        per_dim = diff.abs() if self.norm == "l1" else diff.pow(2)
        dist = per_dim.mean(-1) if self.reduction == "mean" else per_dim.sum(-1)  # [B, N]
        chosen = select_tokens(self._scores(projected, target, attention), mask, self.k if self.scorer != "all" else 0)
        weights = chosen.to(dist.dtype)
        return (dist * weights).sum(1) / weights.sum(1).clamp(min=1)

    def _scores(self, projected: Tensor, target: Tensor, attention: Tensor | None) -> Tensor | None:
        if self.scorer == "attention":
            return attention.detach()
        if self.scorer == "similarity":
            return F.cosine_similarity(projected.detach(), target[:, None, :], dim=-1)
        return None


def candidate_confidence(
    image: Tensor, candidates: Tensor, answer: Tensor, scale: float, above_chance: bool = False
) -> Tensor:
    """CLIP-TD's confidence with candidates: the teacher's zero-shot probability of the right one,
    ``softmax_c(s cos(v_i, t_ic))[y*_i]``, ``[B]``; ``above_chance`` rescales it to ``max(0, (p - 1/C) / (1 - 1/C))``
    (with one candidate ``p`` = 1 is left as it is).

    Args:
        image: the teacher's image embeddings ``v``, ``[B, d]``.
        candidates: its text embeddings of query + each candidate, ``[B, C, d]``.
        answer: the right candidate's index per instance, ``[B]`` (non-negative).
        scale: the softmax scale ``s``.
        above_chance: weigh chance and below zero.
    """
    cos = F.cosine_similarity(image[:, None, :], candidates, dim=-1)  # [B, C]
    probs = (scale * cos).softmax(dim=-1)[torch.arange(image.shape[0], device=image.device), answer]
    count = candidates.shape[1]
    if above_chance and count > 1:  # one candidate: p = 1, nothing to rescale
        probs = ((probs - 1.0 / count) / (1.0 - 1.0 / count)).clamp(min=0.0)
    return probs


def _check_parts(parts: Any) -> tuple[str, ...]:
    if isinstance(parts, str):
        parts = [parts]
    if (
        not isinstance(parts, list | tuple)
        or not parts
        or len(set(parts)) != len(parts)
        or not all(isinstance(p, str) and p in CLIP_TD_PARTS for p in parts)
    ):
        raise ValueError(
            f"parts={parts!r} is not allowed; give a non-empty list of distinct terms from {list(CLIP_TD_PARTS)}"
        )
    return tuple(p for p in CLIP_TD_PARTS if p in parts)


def select_tokens(scores: Tensor | None, mask: Tensor, k: int) -> Tensor:
    """The top-``k`` tokens of each row by ``scores`` among those in ``mask`` (``[B, N]`` bool); every masked token
    when ``k`` is 0 or ``scores`` is ``None``, and all of a row's tokens when it has fewer than ``k``."""
    if scores is None or k <= 0:
        return mask.clone()
    ranked = scores.float().masked_fill(~mask, float("-inf"))
    top = ranked.topk(min(k, ranked.shape[1]), dim=1).indices
    chosen = torch.zeros_like(mask).scatter(1, top, True)
    return chosen & mask


__all__ = [
    "CLIP_TD_NORMS",
    "CLIP_TD_PARTS",
    "CLIP_TD_REDUCTIONS",
    "SCORERS",
    "TARGET_FIELDS",
    "ClipTargetedDistillation",
    "select_tokens",
]
