"""The data that flows from models to losses: one :class:`Embeddings` per model and batch.

The trainer fills these from the student and from each teacher (live, or later from a teacher-output cache);
losses read only these. Keeping this contract small is what lets a cache stand in for a teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class Embeddings:
    """Outputs of one model (student or teacher) on one batch of ``B`` samples.

    Attributes:
        image: pooled, projected image embedding ``[B, d]``, not normalised (losses normalise as they need).
        text: text field -> pooled, projected text embedding: ``[B, d]``, or ``[B, C, d]`` for a field with one text
            per candidate (``candidates``). Fields: a caption language tag (``en``, ``zh``: the caption in that
            language; ``caption.en`` is accepted as a spelling of ``en``), ``question``, ``qa`` (question + right
            answer), ``hypothesis``, ``candidates``.
        image_tokens: last hidden states of the image tower ``[B, n, h]`` (first token = [CLS] where the model
            has one), present only when a loss asked for token features.
        text_tokens: language -> last hidden states of the text tower ``[B, L, h]``.
        text_mask: language -> attention mask ``[B, L]`` matching ``text_tokens``.
        image_masked: student only: pooled embedding ``[B, d]`` of the image with a fraction of its patches
            dropped (masked feature distillation).
        logit_scale: the model's own contrastive scale ``s = exp(log_s)`` (a scalar tensor), when it has one.
        extra: any other named output of a student kind (the names in ``vldistill.students.STUDENT_OUTPUTS``:
            ``token_states``, ``cls_attention``, ``task_logits``, ``lm_loss``, ``text_feature``, ...).
    """

    image: Tensor | None = None
    text: dict[str, Tensor] = field(default_factory=dict)
    image_tokens: Tensor | None = None
    text_tokens: dict[str, Tensor] = field(default_factory=dict)
    text_mask: dict[str, Tensor] = field(default_factory=dict)
    image_masked: Tensor | None = None
    logit_scale: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)


def field_name(name: str) -> str:
    """The canonical name of a text field: ``caption.en`` -> ``en`` (language tags name caption fields)."""
    return name.removeprefix("caption.")


@dataclass
class StepOutputs:
    """Everything a loss sees for one training step.

    Attributes:
        student: the student's outputs (with gradients).
        teachers: one entry per teacher (no gradients); empty when training without a teacher.
        groups: language -> ``[B]`` integer ids with ``groups[l][i] == groups[l][j]`` exactly when captions
            ``i`` and ``j`` of that language are identical strings (the contrastive loss needs this).
        targets: training targets of the batch, e.g. ``answer`` ``[B]`` (index of the right answer / label /
            candidate), ``answer_scores`` ``[B, A]``; losses read targets here, never from the raw batch.
    """

    student: Embeddings
    teachers: list[Embeddings] = field(default_factory=list)
    groups: dict[str, Tensor] = field(default_factory=dict)
    targets: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelDims:
    """Widths of one model, used to size adapters.

    Attributes:
        embed: width of the pooled, projected embeddings.
        image_width: hidden size of the image tower's tokens.
        text_width: hidden size of the text tower's tokens.
    """

    embed: int
    image_width: int
    text_width: int


@dataclass(frozen=True)
class Dims:
    """Widths of the student and of every teacher, passed to each loss's constructor."""

    student: ModelDims
    teachers: tuple[ModelDims, ...] = ()
