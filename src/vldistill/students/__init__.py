"""Students: kinds (architectures honouring one contract, :mod:`vldistill.students.kinds`) and presets (small
factories that build one student of a kind, :data:`STUDENTS`).

Kinds: ``dual_encoder`` (:class:`~vldistill.models.DualEncoder`: CLIP-family image + text towers), ``seq2seq``
(an encoder-decoder LM aligned to the teacher, VLKD) and ``crossmodal`` (a single-stream vision-language encoder
with a task head, CLIP-TD / MAD).
"""

import json
from pathlib import Path

from ..models import DualEncoder, check_saved_model
from .crossmodal import CrossModalProcessor, CrossModalStudent
from .kinds import STUDENT_KINDS, STUDENT_OUTPUTS, StudentKind, set_trainable
from .presets import (
    CLIP_MEAN,
    CLIP_STD,
    STUDENT_MEAN,
    STUDENT_STD,
    STUDENTS,
    build_student,
    clip_from_config,
    image_processor_for,
    prepare_student,
    takes_teacher,
)
from .seq2seq import Seq2SeqOptions, Seq2SeqProcessor, Seq2SeqStudent, span_corrupt
from .vilt_small import vilt_small as vilt_small  # registers the vilt-small preset (CLIP-TD recipes)

STUDENT_KINDS.register("dual_encoder")(DualEncoder)


def load_student(directory):
    """Load a student saved by ``save_pretrained``, whatever its kind: a directory with a ``vldistill.json`` names its
    kind (seq2seq, crossmodal); any other is a Hugging Face dual encoder."""
    check_saved_model(directory)
    config = Path(directory) / "vldistill.json"
    if config.is_file():
        kind = json.loads(config.read_text(encoding="utf-8")).get("kind", "dual_encoder")
        return STUDENT_KINDS.get(kind).from_pretrained(directory)
    return DualEncoder.from_pretrained(directory)


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "STUDENTS",
    "STUDENT_KINDS",
    "STUDENT_MEAN",
    "STUDENT_OUTPUTS",
    "STUDENT_STD",
    "CrossModalProcessor",
    "CrossModalStudent",
    "DualEncoder",
    "Seq2SeqOptions",
    "Seq2SeqProcessor",
    "Seq2SeqStudent",
    "StudentKind",
    "build_student",
    "clip_from_config",
    "image_processor_for",
    "load_student",
    "prepare_student",
    "set_trainable",
    "span_corrupt",
    "takes_teacher",
]
