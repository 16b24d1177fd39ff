"""The ``vilt-small`` preset: the cross-modal student of the CLIP-TD / MAD recipes.

Without ``student.name_or_path`` it builds a small ViLT from a config, sized for the bundled 64-pixel images, with a
WordPiece tokenizer the program trains on the task's texts (so the recipes run offline). With ``student.name_or_path``
(``vldistill fit ... --student dandelin/vilt-b32-mlm``, a hub id or a directory) it is the ``vilt`` preset: that
checkpoint with its own tokenizer and image processor and a new task head, so one recipe serves both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .crossmodal import CrossModalStudent, test_vilt, vilt
from .presets import STUDENTS

#: ViLT 64px/8 (an 8 x 8 patch grid, like the reference teacher's), hidden 128 x 4 layers, 4 heads, FFN 256.
SMALL = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "image_size": 64,
    "patch_size": 8,
    "max_position_embeddings": 40,
}


@STUDENTS.register("vilt-small")
def vilt_small(
    tokenizer=None,
    name_or_path: str | None = None,
    task: str = "vqa",
    answers: Sequence[str] | None = None,
    num_labels: int | None = None,
    **overrides: Any,
) -> CrossModalStudent:
    """A small ViLT built from a config (sizes in :data:`SMALL`; any ``ViltConfig`` field overrides them), or, with
    ``name_or_path``, the ViLT checkpoint there (exactly the ``vilt`` preset; size overrides are then refused).

    Options: ``task``, ``answers`` / ``num_labels`` (VQA) and ``ViltConfig`` fields.
    """
    if name_or_path:
        if overrides:
            raise ValueError(
                f"student preset 'vilt-small' got size options {sorted(overrides)} with student.name_or_path "
                f"{name_or_path!r}: a checkpoint keeps its own sizes; drop student.overrides"
            )
        return vilt(tokenizer, name_or_path, task, answers, num_labels)
    if tokenizer is None:
        raise ValueError(
            "student preset 'vilt-small' is built from a config and needs a tokenizer (student.tokenizer, or let "
            "vldistill fit train one on the task's texts); or give student.name_or_path (--student ID_OR_PATH)"
        )
    return test_vilt(tokenizer, task, answers, num_labels, **{**SMALL, **overrides})
