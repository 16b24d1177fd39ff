"""Export: a trained dual encoder as ONNX towers for onnxruntime (:mod:`.onnx`) and the Hugging Face model card every
exported student carries (:mod:`.card`).

Library code: it never imports the training program. ``onnx`` and ``onnxruntime`` are the optional ``deploy`` extra
(``pip install 'vldistill[deploy]'``); they are imported only when an export or an ONNX model is used.
"""

from __future__ import annotations

from .card import MODEL_CARD, read_model_card, student_card, write_student_card
from .onnx import ONNX_SETTINGS, OnnxDualEncoder, export_onnx

__all__ = [
    "MODEL_CARD",
    "ONNX_SETTINGS",
    "OnnxDualEncoder",
    "export_onnx",
    "read_model_card",
    "student_card",
    "write_student_card",
]
