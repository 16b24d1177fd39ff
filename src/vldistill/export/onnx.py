"""A dual encoder's image and text towers as ONNX models that onnxruntime runs alone.

``export_onnx(model_dir, out_dir)`` writes::

    image_encoder.onnx      pixel_values [batch, 3, H, W] float32 -> image_embeds [batch, d] (projected, not normalised)
    text_encoder.onnx       input_ids, attention_mask [batch, sequence] int64 -> text_embeds [batch, d]
    tokenizer.json ...      the model's own tokenizer (the ``tokenizers`` library reads tokenizer.json alone)
    preprocessor_config.json  the model's own image processor (Hugging Face format)
    vldistill_onnx.json     everything needed to use the towers without torch or transformers: image size, resize,
                            crop, rescale, mean and std; the text padding rule, maximum length and pad id; the
                            embedding width, the logit scale, the opset, the quantisation and the source model with the
                            SHA-256 of its weights

Batch size (and, for text, sequence length) are dynamic axes. :class:`OnnxDualEncoder` runs the export with
onnxruntime, numpy, PIL and ``tokenizers`` only, and answers ``embed_images`` / ``embed_texts`` like any
:class:`~vldistill.evaluation.Encoder`, so the same zero-shot evaluation scores it.

Why ``torch.onnx.export`` with the TorchScript tracer (``dynamo=False``), not the dynamo exporter or optimum:

- the dynamo exporter needs ``onnxscript``, one more dependency; the tracer needs none beyond ``onnx``, handles the
  text tower's attention mask with ``dynamic_axes``, and its export matches PyTorch to ~1e-6 (``tests/test_export.py``
  checks it on other batch sizes and sequence lengths than it was traced with);
- optimum's CLIP export is one graph for both towers and another dependency tied to transformers' releases; a tower
  per file lets a server embed images without loading the text tower;
- both towers are traced through the same :class:`~vldistill.models.DualEncoder` calls (``encode_image`` /
  ``encode_text``) that training and evaluation use, so each supported family exports the embedding it is evaluated
  with.

int8 is onnxruntime's **dynamic** quantisation (``quantize_dynamic``): the weights of every ``MatMul`` are stored as
int8 with one scale per output channel, activations are quantised per batch at run time. Per-channel, and the token
embeddings (``Gather``) left in fp32, because on the tiny test student of ``tests/test_export.py`` per-tensor scales
or quantised embeddings changed about a quarter of the Chinese zero-shot predictions of its test batch, per-channel
MatMuls about 2% (measured while writing that test, 2026-11-30; a trained student is measured by
``benchmarks/deploy.py``).
Dynamic rather than
static because a transformer tower's work is in its MatMuls, whose activation ranges vary from input to input, and
because it needs no calibration slice that every export would have to be given (static quantisation with a slice of
the training images is the next thing to try when the dynamic one loses too much; ``benchmarks/deploy.py`` measures
the loss). The patch-embedding convolution stays fp32 (one layer).

Runtimes not installable here (TensorRT, Core ML, mobile) start from these fp32 files: TensorRT builds an engine
from an ONNX file (``trtexec --onnx=image_encoder.onnx``), onnxruntime-mobile runs them as they are, and Core ML's
``coremltools`` converts the PyTorch towers (its recent versions no longer read ONNX).
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..files import follow_umask

#: The settings file written beside the towers.
ONNX_SETTINGS = "vldistill_onnx.json"
IMAGE_ONNX, TEXT_ONNX = "image_encoder.onnx", "text_encoder.onnx"
OPSET = 17
FORMAT = 1


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{module} is not installed: the ONNX export needs the deploy extra (pip install 'vldistill[deploy]')"
        ) from None


def export_onnx(
    model: Any,
    output_dir: str | Path,
    quantize: str | None = None,
    sample_images: Sequence[Image.Image] | None = None,
) -> Path:
    """Export the image and the text tower of a dual encoder (student or teacher) as ONNX.

    Args:
        model: a :class:`~vldistill.models.DualEncoder` or the directory / hub id of one.
        output_dir: where to write (created; files of an earlier export there are replaced).
        quantize: ``None`` (fp32) or ``"int8"`` (onnxruntime dynamic quantisation of the towers' weights).
        sample_images: images to trace with (default: a grey image of the model's size).

    Returns:
        ``output_dir``.

    Raises:
        ValueError: ``quantize`` is not ``None`` or ``"int8"``, or the model is not a dual encoder.
        ImportError: ``onnx`` / ``onnxruntime`` are not installed (the ``deploy`` extra).
    """
    import torch

    from ..cache.identity import weights_digest
    from ..models import DualEncoder

    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize {quantize!r}: expected int8 (or no --quantize for fp32)")
    torch_onnx = torch.onnx
    _require("onnx")
    source = str(model) if not isinstance(model, DualEncoder) else getattr(model.model, "name_or_path", "") or ""
    if not isinstance(model, DualEncoder):
        model = DualEncoder.from_pretrained(model)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    size = model.image_size
    images = list(sample_images or [Image.new("RGB", (size, size), (128, 128, 128))] * 2)
    pixel_values = model.preprocess_images(images[:2])
    enc = model.tokenize(["a photo of a circle.", "a photo"])
    image_tower, text_tower, uses_mask = _towers(model)
    text_inputs = ("input_ids", "attention_mask") if uses_mask else ("input_ids",)
    tmp = out / ".fp32" if quantize else out
    tmp.mkdir(exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():  # the tracer's warnings concern shapes the axes make dynamic
        warnings.simplefilter("ignore")
        torch_onnx.export(
            image_tower,
            (pixel_values,),
            str(tmp / IMAGE_ONNX),
            input_names=["pixel_values"],
            output_names=["image_embeds"],
            dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
        axes = {name: {0: "batch", 1: "sequence"} for name in text_inputs}
        torch_onnx.export(
            text_tower,
            tuple(enc[name] for name in text_inputs),
            str(tmp / TEXT_ONNX),
            input_names=list(text_inputs),
            output_names=["text_embeds"],
            dynamic_axes={**axes, "text_embeds": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    if quantize:
        for name in (IMAGE_ONNX, TEXT_ONNX):
            _quantize_int8(tmp / name, out / name)
        shutil.rmtree(tmp)
    model.tokenizer.save_pretrained(out)
    model.image_processor.save_pretrained(out)
    settings = _settings(model, source, weights_digest(model.model), quantize, text_inputs)
    (out / ONNX_SETTINGS).write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for file in out.iterdir():
        follow_umask(file)
    return out


def _quantize_int8(src: Path, dst: Path) -> None:
    quantization = _require("onnxruntime.quantization")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "consider pre-processing": a hint for static quantisation of CNNs
    try:
        quantization.quantize_dynamic(
            str(src),
            str(dst),
            weight_type=quantization.QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
        )
    finally:
        root.setLevel(level)


def _settings(model: Any, source: str, digest: str, quantize: str | None, text_inputs: Sequence[str]) -> dict:
    proc = model.image_processor
    size = proc.size.get("shortest_edge") or min(proc.size.get("height", 0), proc.size.get("width", 0))
    crop = proc.crop_size if getattr(proc, "do_center_crop", False) else None
    tok = model.tokenizer
    scale = model.logit_scale()
    return {
        "format": FORMAT,
        "source": {"model": source, "weights_sha256": digest, "model_type": model.model_type},
        "quantization": quantize or "none",
        "opset": OPSET,
        "embed_dim": model.dims.embed,
        "logit_scale": None if scale is None else float(scale),
        "image": {
            "input": "pixel_values",
            "size": {"shortest_edge": int(size)} if "shortest_edge" in proc.size else dict(proc.size),
            "crop_size": None if crop is None else {"height": int(crop["height"]), "width": int(crop["width"])},
            "resample": int(getattr(proc, "resample", 3)),
            "do_resize": bool(getattr(proc, "do_resize", True)),
            "rescale_factor": float(getattr(proc, "rescale_factor", 1 / 255)) if proc.do_rescale else 1.0,
            "do_normalize": bool(getattr(proc, "do_normalize", True)),
            "image_mean": [float(x) for x in proc.image_mean],
            "image_std": [float(x) for x in proc.image_std],
        },
        "text": {
            "inputs": list(text_inputs),
            "tokenizer": "tokenizer.json",
            "padding": "max_length" if model.model_type == "siglip" else "longest",
            "max_length": int(model.max_length),
            "pad_token": tok.pad_token,
            "pad_token_id": int(tok.pad_token_id if tok.pad_token_id is not None else 0),
        },
    }


def _towers(model: Any) -> tuple[Any, Any, bool]:
    """The two towers as modules to trace, and whether the text tower reads an attention mask (defined here so that
    running an export never imports torch)."""
    from torch import nn

    uses_mask = model.model_type != "siglip"  # SigLIP reads no attention mask (max-length padding)

    class ImageTower(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model.encode_image(pixel_values)

    class TextTower(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask=None):
            return self.model.encode_text(input_ids, attention_mask if uses_mask else None)

    return ImageTower(), TextTower(), uses_mask


class OnnxDualEncoder:
    """An exported dual encoder run with onnxruntime, numpy, PIL and ``tokenizers`` (no torch, no transformers).

    Args:
        directory: an :func:`export_onnx` output.
        threads: onnxruntime intra-op threads (``None``: onnxruntime's default, one per core).
    """

    def __init__(self, directory: str | Path, threads: int | None = None):
        ort = _require("onnxruntime")
        from tokenizers import Tokenizer

        self.directory = Path(directory)
        path = self.directory / ONNX_SETTINGS
        if not path.is_file():
            raise FileNotFoundError(f"{self.directory}: no {ONNX_SETTINGS} (not an export of vldistill export)")
        self.settings = json.loads(path.read_text(encoding="utf-8"))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        self.image_session = ort.InferenceSession(str(self.directory / IMAGE_ONNX), options, providers=providers)
        self.text_session = ort.InferenceSession(str(self.directory / TEXT_ONNX), options, providers=providers)
        text = self.settings["text"]
        self.tokenizer = Tokenizer.from_file(str(self.directory / text["tokenizer"]))
        self.tokenizer.enable_truncation(text["max_length"])
        pad = {"pad_id": text["pad_token_id"], "pad_token": text["pad_token"] or "[PAD]"}
        if text["padding"] == "max_length":
            pad["length"] = text["max_length"]
        self.tokenizer.enable_padding(**pad)

    # ----------------------------------------------------------------------------------------------- inputs
    def preprocess_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Images -> ``pixel_values [N, 3, H, W]`` float32, as the model's image processor makes them: RGB, shortest
        edge resized, centre crop, rescale, normalise."""
        return np.stack([self._one_image(img) for img in images]).astype(np.float32)

    def _one_image(self, image: Image.Image) -> np.ndarray:
        s = self.settings["image"]
        image = image.convert("RGB")
        if s["do_resize"]:
            w, h = image.size
            if "shortest_edge" in s["size"]:
                short = s["size"]["shortest_edge"]
                new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
            else:
                new = (s["size"]["width"], s["size"]["height"])
            if new != image.size:
                image = image.resize(new, resample=s["resample"])
        if s["crop_size"]:
            image = _center_crop(image, s["crop_size"]["height"], s["crop_size"]["width"])
        x = np.asarray(image, dtype=np.float32) * s["rescale_factor"]
        if s["do_normalize"]:
            x = (x - np.array(s["image_mean"], np.float32)) / np.array(s["image_std"], np.float32)
        return x.transpose(2, 0, 1)

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Texts -> ``input_ids`` (and ``attention_mask`` when the text tower reads it), int64."""
        encoded = self.tokenizer.encode_batch(list(texts))
        inputs = {
            "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
        }
        return {name: inputs[name] for name in self.settings["text"]["inputs"]}

    # -------------------------------------------------------------------------------------------- encoding
    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        """``pixel_values`` -> image embeddings ``[N, d]`` (not normalised)."""
        return self.image_session.run(None, {"pixel_values": np.asarray(pixel_values, np.float32)})[0]

    def encode_text(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Tokenised inputs -> text embeddings ``[N, d]`` (not normalised)."""
        names = self.settings["text"]["inputs"]
        return self.text_session.run(None, {n: np.asarray(inputs[n], np.int64) for n in names})[0]

    def embed_images(self, images: Sequence[Image.Image]):
        """Raw images -> L2-normalised embeddings (a torch tensor when torch is installed, for the evaluation)."""
        return _as_output(_normalize(self.encode_image(self.preprocess_images(images))))

    def embed_texts(self, texts: Sequence[str]):
        """Raw texts -> L2-normalised embeddings (a torch tensor when torch is installed, for the evaluation)."""
        return _as_output(_normalize(self.encode_text(self.tokenize(texts))))

    def size_mb(self) -> float:
        """Size of the two towers on disk, in MB (10^6 bytes)."""
        return sum((self.directory / f).stat().st_size for f in (IMAGE_ONNX, TEXT_ONNX)) / 1e6


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    w, h = image.size
    left, top = round((w - width) / 2.0), round((h - height) / 2.0)
    return image.crop((left, top, left + width, top + height))


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _as_output(x: np.ndarray):
    try:
        import torch
    except ImportError:
        return x
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
