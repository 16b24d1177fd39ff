"""Student kinds: the contract every student honours, whatever its architecture.

A *kind* is a student class (``dual_encoder``, ``seq2seq``, ``crossmodal``); a *preset* (``vldistill.students``
``STUDENTS``) is a small factory that builds one student of a kind. The trainer, the cache and the losses reach a
student only through this contract:

- ``kind``: the registered name; ``provides``: the outputs its ``forward`` can fill (the names a loss ``needs``).
- ``processor()``: a picklable callable ``samples -> inputs`` (its own tokenizer and image processing: a student
  never shares preprocessing with a teacher by accident). ``samples`` are raw sample dicts (see
  ``vldistill.data``).
- ``forward(inputs, needs, teacher=None)``: an :class:`~vldistill.outputs.Embeddings` with at least what ``needs``
  asks for. Teacher outputs are computed before the student, so a student may read them (``teacher``: the first
  teacher's :class:`~vldistill.outputs.Embeddings` of the same batch, e.g. VLKD's image prefix).
- ``param_groups()``: group name -> parameter-name prefixes. Together the groups cover every parameter exactly once
  (checked by :func:`set_trainable`), so ``stages.N.trainable`` can freeze nothing that it does not name.
- ``save_pretrained(directory)``: Hugging Face artefacts that load with ``transformers`` alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import nn

from ..registry import Registry

STUDENT_KINDS = Registry("student kind")

#: Outputs a student kind may provide (what losses may need from a student); kinds may add their own names.
STUDENT_OUTPUTS = frozenset(
    {
        "image",  # pooled image embedding [B, d]
        "text",  # pooled text embedding per field [B, d]
        "image_tokens",  # image-tower token features [B, n, h]
        "text_tokens",  # text-tower token features per field [B, L, h]
        "masked_image",  # pooled embedding of the image with a fraction of its patches dropped
        "token_states",  # cross-modal: last hidden states of the fused sequence [B, N, h]
        "cls_attention",  # cross-modal: last layer's head-averaged [CLS] -> token attention [B, N]
        "task_logits",  # a task head's logits [B, A] (answers, labels or candidates)
        "lm_loss",  # seq2seq: token cross-entropy of the decoder reconstructing its targets
        "text_feature",  # seq2seq: the projected pooled encoder state p(x) [B, d_T]
    }
)


class StudentKind(nn.Module):
    """Base class of a student kind (see the module docstring for the contract)."""

    kind: ClassVar[str] = ""
    provides: ClassVar[frozenset[str]] = frozenset()

    def processor(self) -> Any:
        raise NotImplementedError

    def param_groups(self) -> dict[str, tuple[str, ...]]:
        raise NotImplementedError

    def save_pretrained(self, directory) -> None:
        raise NotImplementedError


def group_of(name: str, groups: dict[str, tuple[str, ...]]) -> list[str]:
    """The groups whose prefixes match parameter ``name`` (exactly one for a well-formed kind)."""
    return [g for g, prefixes in groups.items() if name.startswith(tuple(prefixes))]


def set_trainable(student: nn.Module, trainable: Sequence[str], key: str = "trainable") -> list[nn.Parameter]:
    """Train the parameters of the named groups and freeze every other one; return the trainable parameters.

    Raises:
        ValueError: a name that is not one of the student's groups (the message lists them), or a student whose
            groups leave a parameter out or claim it twice (a bug in the kind: nothing is frozen silently).
    """
    groups = student.param_groups()
    unknown = [t for t in trainable if t not in groups]
    if unknown:
        kind = getattr(student, "kind", type(student).__name__)
        raise ValueError(f"{key}: {unknown} are not parameter groups of a {kind} student; it has {sorted(groups)}")
    params = []
    for name, p in student.named_parameters():
        owners = group_of(name, groups)
        if len(owners) != 1:
            raise ValueError(f"parameter {name!r} belongs to {len(owners)} groups of {sorted(groups)}; expected one")
        p.requires_grad_(owners[0] in trainable)
        if p.requires_grad:
            params.append(p)
    return params
