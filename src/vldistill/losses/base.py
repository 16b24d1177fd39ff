"""The base of every loss: the :data:`LOSSES` registry, the :class:`Loss` base class, the checks of recipe options
and the building blocks the losses share (reading the step outputs, :func:`distance`, :func:`contrastive_targets`,
soft cross-entropy and KL, teacher-grid pooling, the teachers' in-batch softmax).

The losses themselves are in :mod:`~vldistill.losses.contrastive`, :mod:`~vldistill.losses.features` and
:mod:`~vldistill.losses.task`; :mod:`~vldistill.losses.combine` builds and weights them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vldistill.outputs import Dims, Embeddings, StepOutputs, field_name
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
# The base class


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
    #: Whether the loss compares an image with a text (of the same or another sample). A stage that draws images
    #: and captions as unpaired data (``samples: all``) may only use losses where this is false.
    pairs_image_text: bool = True

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
