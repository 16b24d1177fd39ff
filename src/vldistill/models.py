"""Adapters over Hugging Face dual encoders: one interface for teachers and students.

Every tower answers ``encode_image(pixel_values)`` / ``encode_text(input_ids, attention_mask)`` and can return
token features. Each :class:`DualEncoder` owns its processor (tokenizer + image processor), so a teacher and a
student never share preprocessing by accident: image size, mean/std and vocabulary may all differ.

Supported families: ``CLIPModel``, ``ChineseCLIPModel``, ``AltCLIPModel``, ``SiglipModel`` and
``VisionTextDualEncoderModel`` (any HF vision model + any HF text model).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, PreTrainedModel

from .config import ConfigError
from .dist import process_shard
from .files import follow_umask
from .outputs import Embeddings, ModelDims
from .registry import Registry

# model_type -> what the adapter needs to know about that family.
FAMILIES = Registry("model family")
for _model_type in ("clip", "chinese_clip", "altclip", "siglip", "vision-text-dual-encoder"):
    FAMILIES.register(_model_type)(_model_type)
#: Families whose vision tower :meth:`DualEncoder.encode_image_masked` can run on a subset of patches.
MASKABLE_FAMILIES = ("clip", "chinese_clip", "altclip")


def tokenize_texts(tokenizer, model_type: str, max_length: int, texts: Sequence[str]) -> dict[str, Tensor]:
    """The one tokenisation rule of every model, in training batches and in evaluation alike."""
    # SigLIP was trained with max-length padding; its pooled text token is the last position.
    padding = "max_length" if model_type == "siglip" else True
    enc = tokenizer(list(texts), padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
    mask = enc.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(enc["input_ids"])
    return {"input_ids": enc["input_ids"], "attention_mask": mask}


class ModelLoadError(OSError, ValueError):
    """A model that cannot be loaded: a directory without weights, a damaged weights file, weights holding NaN or
    inf, or a hub id that cannot be fetched. The message names the file or the id and the problem."""


_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def looks_like_path(name_or_path: str) -> bool:
    """Whether a model reference is meant as a local path, not a hub id (``org/name`` or ``name``): it starts with
    ``/``, ``./``, ``../`` or ``~``, has a backslash, two or more ``/``, or ends with ``/``."""
    text = str(name_or_path)
    return (
        text.startswith(("/", "./", "../", "~", ".\\"))
        or text in (".", "..")
        or "\\" in text
        or text.count("/") >= 2
        or text.endswith("/")
        or bool(Path(text).anchor)
    )


def check_model_source(name_or_path: str) -> bool:
    """Check a model reference before ``transformers`` reads it; ``True`` when it is a local directory.

    A local directory must hold weights, and each safetensors file in it must have a readable header that covers the
    file (a truncated or overwritten file fails here, named). A path that does not exist is an error, never a hub id.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{name_or_path}: expected a model directory (config.json, weights, ...), got a file")
        weights = sorted(f for pattern in _WEIGHT_FILES for f in path.glob(pattern))
        if not weights:
            present = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
            raise ModelLoadError(
                f"{path}: no weights file (model.safetensors) in this model directory; it holds {present}"
            )
        for file in weights:
            if file.suffix == ".safetensors":
                _check_safetensors(file)
        return True
    if looks_like_path(str(name_or_path)):
        raise FileNotFoundError(f"model directory {str(name_or_path)!r} does not exist (a path is never a hub id)")
    return False


def check_saved_model(directory: str | os.PathLike) -> None:
    """Check a saved model directory of any student kind before loading it: it exists, holds weights (in it or in
    a sub-directory, such as a seq2seq student's ``lm/``), and every safetensors file has a readable header covering
    the file; a problem is an error naming the directory or file."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(directory)!r} does not exist")
    weights = sorted(f for pattern in _WEIGHT_FILES for f in path.rglob(pattern))
    if not weights:
        raise ModelLoadError(f"{path}: no weights file (model.safetensors) in this model directory")
    for file in weights:
        if file.suffix == ".safetensors":
            _check_safetensors(file)


def _check_safetensors(file: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except Exception as err:  # SafetensorError (not an OSError): header unreadable or not covering the file
        size = file.stat().st_size
        raise ModelLoadError(f"{file} is damaged ({size} bytes; {err}): restore or re-export it") from None


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


@contextmanager
def _naming_failures(name_or_path: str, local: bool):
    """Turn ``transformers``' loading errors into one that names the file or hub id and what went wrong."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as err:
        if local:
            if type(err).__name__ == "SafetensorError":
                raise ModelLoadError(f"{name_or_path}: a weights file is damaged ({err})") from err
            raise
        if not isinstance(err, OSError):
            raise
        text = str(err)
        if _offline() or "couldn't connect" in text.lower() or "offline" in text.lower():
            why = "HF_HUB_OFFLINE is set" if _offline() else "the hub could not be reached"
            raise ModelLoadError(
                f"{name_or_path!r} is not a local directory, and it is a hub id that is not in the local hub cache "
                f"while this machine is offline ({why}): download it on a connected machine or give its local "
                f"directory"
            ) from None
        msg = f"{name_or_path!r} is not a local directory, and the hub could not give it: {text}"
        raise ModelLoadError(msg) from err


def check_finite_weights(model: nn.Module, name_or_path: str) -> None:
    """Weights that hold NaN or inf (a damaged file with an intact header) are refused, naming the tensors."""
    bad = [name for name, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise ModelLoadError(
            f"{name_or_path}: its weights hold NaN or inf in {len(bad)} tensors (e.g. {', '.join(bad[:3])}): the "
            f"weights file is damaged"
        )


class DualEncoder(nn.Module):
    """A Hugging Face CLIP-family model together with its own tokenizer and image processor.

    Args:
        model: a loaded HF dual encoder of a supported family.
        tokenizer: its tokenizer.
        image_processor: its image processor (resizing, cropping, normalisation).
        max_length: text truncation length; defaults to the text tower's position-embedding count.
    """

    def __init__(self, model: PreTrainedModel, tokenizer, image_processor, max_length: int | None = None):
        super().__init__()
        if model.config.model_type not in FAMILIES:
            raise ValueError(
                f"model type {model.config.model_type!r} is not a supported dual encoder; "
                f"supported: {', '.join(FAMILIES.names())}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        text_cfg = getattr(model.config, "text_config", None)
        limit = getattr(text_cfg, "max_position_embeddings", None) or 77
        if model.config.model_type == "altclip":  # XLM-R style positions start after the padding index
            limit -= 2
        self.max_length = min(max_length or limit, limit)

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        revision: str | None = None,
        trust_remote_code: bool = False,
        dtype: torch.dtype | None = None,
    ) -> DualEncoder:
        """Load a model, its tokenizer and its image processor from a hub id or a local directory.

        Raises:
            FileNotFoundError: a path (absolute, relative with ``./``, ``../`` or several parts, ``~``) that does
                not exist: it is not looked up on the hub.
            ModelLoadError: a directory without weights or with a damaged safetensors file, weights holding NaN or
                inf, or a hub id that is not cached while the machine is offline; the message names the file or id.
        """
        kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
        path = str(name_or_path)
        local = check_model_source(path)
        path = str(Path(path).expanduser()) if local else path  # transformers does not expand ~
        with _naming_failures(path, local):
            model = AutoModel.from_pretrained(path, dtype=dtype, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            image_processor = AutoImageProcessor.from_pretrained(path, **kwargs)
        files = [str(f) for pattern in _WEIGHT_FILES for f in sorted(Path(path).glob(pattern))]
        check_finite_weights(model, ", ".join(files) if local else path)
        return cls(model, tokenizer, image_processor)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Save model (safetensors), tokenizer and image processor so ``transformers`` alone can load them."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        for weights in directory.glob("*.safetensors"):  # safetensors writes mode 0600 whatever the umask
            follow_umask(weights)

    # ------------------------------------------------------------------------------- the student-kind contract
    kind = "dual_encoder"
    #: What ``forward`` can fill (see ``vldistill.students.kinds``).
    provides = frozenset({"image", "text", "image_tokens", "text_tokens", "masked_image"})

    def processor(self) -> DualEncoderProcessor:
        """This model's own preprocessing, picklable (it holds the tokenizer and image processor, not the model)."""
        return DualEncoderProcessor(self)

    def param_groups(self) -> dict[str, tuple[str, ...]]:
        """``image`` (vision tower + its projection), ``text`` (text tower + its projection) and ``scale`` (the
        model's own contrastive logit scale and bias, which ``clip`` losses learn in their own parameter and copy
        back at the end of a stage)."""
        return {
            "image": ("model.vision_model.", "model.visual_projection."),
            "text": ("model.text_model.", "model.text_projection."),
            "scale": ("model.logit_scale", "model.logit_bias"),
        }

    def forward(
        self, inputs: dict, needs: frozenset[str], teacher: Embeddings | None = None, mask_ratio: float | None = None
    ) -> Embeddings:
        """Encode one preprocessed batch (see :func:`encode_batch`); a dual encoder does not read ``teacher``."""
        return encode_batch(self, inputs, needs, mask_ratio)

    # ------------------------------------------------------------------------------------------- properties
    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dims(self) -> ModelDims:
        cfg = self.model.config
        if self.model_type == "vision-text-dual-encoder":
            embed = cfg.projection_dim
        elif self.model_type == "siglip":  # no projection: the pooled head output has the tower's width
            embed = cfg.vision_config.hidden_size
        else:
            embed = cfg.projection_dim
        text_width = cfg.text_config.hidden_size
        if self.model_type == "altclip":  # AltCLIP's text tokens come out projected
            text_width = cfg.text_config.project_dim
        return ModelDims(embed=embed, image_width=cfg.vision_config.hidden_size, text_width=text_width)

    @property
    def image_size(self) -> int:
        return self.model.config.vision_config.image_size

    def logit_scale(self) -> Tensor | None:
        """The model's contrastive scale ``exp(log_s)``, if it has one."""
        log_s = getattr(self.model, "logit_scale", None)
        return None if log_s is None else log_s.exp().detach()

    def num_parameters(self) -> int:
        """Parameters of both towers and their projections (what is exported)."""
        return sum(p.numel() for p in self.model.parameters())

    # ------------------------------------------------------------------------------------------ preprocessing
    def preprocess_images(self, images: Sequence[Image.Image]) -> Tensor:
        """Raw PIL images -> ``pixel_values`` with this model's own size and normalisation."""
        if len(images) == 0:
            raise ValueError("preprocess_images got an empty list of images")
        return pixel_values(self.image_processor, list(images))

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Raw strings -> ``input_ids`` and ``attention_mask`` with this model's own tokenizer."""
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"text {i} is empty or not a string: {text!r}")
        return tokenize_texts(self.tokenizer, self.model_type, self.max_length, texts)

    # --------------------------------------------------------------------------------------------- encoding
    def encode_image(self, pixel_values: Tensor, return_tokens: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Pooled, projected image embedding ``[B, d]`` (not normalised), and token features ``[B, n, h]``."""
        out = self.model.get_image_features(pixel_values=pixel_values.to(self.device, self._dtype()))
        return (out.pooler_output, out.last_hidden_state) if return_tokens else out.pooler_output

    def encode_image_masked(
        self,
        pixel_values: Tensor,
        mask_ratio: float,
        generator: torch.Generator | None = None,
        return_tokens: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Pooled, projected embedding ``[B, d]`` of the image with a random fraction of its patches dropped.

        For masked feature distillation (CLIP-KD "MFD"): the patch and position embeddings are computed as the
        tower's own embedding layer does, then every sample keeps ``[CLS]`` and a random subset of
        ``max(1, floor(n (1 - mask_ratio)))`` of its ``n`` patches (the same count for every sample, kept in their
        original order), and only those go through ``pre_layrnorm -> encoder -> post_layernorm([CLS]) ->
        visual_projection``. With ``mask_ratio=0`` this is exactly :meth:`encode_image`.

        Implemented for the CLIP-style vision towers (``clip``, ``chinese_clip``, ``altclip``).

        Args:
            pixel_values: ``[B, 3, H, W]``, preprocessed by this model's own image processor.
            mask_ratio: fraction of patches to drop, in ``[0, 1)``.
            generator: random source for the kept subsets; ``None``: torch's global RNG (which the trainer's
                checkpoints save, so a resumed run draws the same masks).
            return_tokens: also return the last hidden states ``[B, 1 + kept, h]``.
            shard: ``(r, N)`` when this batch is shard ``r`` of ``N`` equal shards of one batch (one per process):
                the noise is drawn for all ``N * B`` rows and shard ``r``'s rows are used, so ``N`` processes that
                share a seed draw different masks for their shards, the very masks one process would draw.
        """
        if self.model_type not in MASKABLE_FAMILIES:
            raise NotImplementedError(
                f"masked image encoding (mfd) is implemented for the CLIP-style vision towers "
                f"({', '.join(MASKABLE_FAMILIES)}), not for model type {self.model_type!r}"
            )
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, int | float) or not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio={mask_ratio!r} is not allowed; it must be a number in [0, 1)")
        vision = self.model.vision_model
        emb = vision.embeddings
        pixel_values = pixel_values.to(self.device, emb.patch_embedding.weight.dtype)
        if pixel_values.shape[-2:] != (emb.image_size, emb.image_size):
            raise ValueError(
                f"input image size {tuple(pixel_values.shape[-2:])} does not match the model's "
                f"({emb.image_size}, {emb.image_size}); preprocess with this model's image processor"
            )
        positions = emb.position_embedding(emb.position_ids)  # [1, 1 + n, h]
        patches = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2) + positions[:, 1:]
        batch, n, width = patches.shape
        keep = max(1, int(n * (1 - mask_ratio) + 1e-9))
        rank, shards = shard
        noise = torch.rand(shards * batch, n, generator=generator, device=generator.device if generator else None)
        noise = noise[rank * batch : (rank + 1) * batch]
        kept = noise.to(patches.device).argsort(dim=1)[:, :keep].sort(dim=1).values
        patches = patches.gather(1, kept[:, :, None].expand(-1, -1, width))
        cls = emb.class_embedding.expand(batch, 1, -1) + positions[:, :1]
        hidden = vision.pre_layrnorm(torch.cat([cls, patches], dim=1))
        hidden = vision.encoder(inputs_embeds=hidden).last_hidden_state
        pooled = self.model.visual_projection(vision.post_layernorm(hidden[:, 0]))
        return (pooled, hidden) if return_tokens else pooled

    def encode_text(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, return_tokens: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Pooled, projected text embedding ``[B, d]`` (not normalised), and token features ``[B, L, h]``."""
        kwargs = {"input_ids": input_ids.to(self.device)}
        if attention_mask is not None and self.model_type != "siglip":
            kwargs["attention_mask"] = attention_mask.to(self.device)
        out = self.model.get_text_features(**kwargs)
        return (out.pooler_output, out.last_hidden_state) if return_tokens else out.pooler_output

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------- raw-input encoder (evaluation protocol)
    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> Tensor:
        """Raw images -> L2-normalised embeddings, for evaluation (always in eval mode)."""
        with _eval_mode(self):
            return nn.functional.normalize(self.encode_image(self.preprocess_images(images)).float(), dim=-1).cpu()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """Raw texts -> L2-normalised embeddings, for evaluation (always in eval mode)."""
        enc = self.tokenize(texts)
        with _eval_mode(self):
            return nn.functional.normalize(self.encode_text(**enc).float(), dim=-1).cpu()


def pixel_values(processor, images: Sequence[Image.Image]) -> Tensor:
    """``processor(images=images, return_tensors="pt")["pixel_values"]``, the same values, faster for the PIL image
    processors of transformers (``CLIPImageProcessorPil`` and others that keep the base ``_preprocess``).

    Those resize, crop, rescale and normalise one image at a time in Python, converting each to numpy and back to PIL
    to resize it; here an RGB image is resized by PIL directly to the size the processor computes (skipped when that
    is its own size: PIL would return a copy), other images go through the processor's own conversion and resize,
    each is cropped by the processor's method (unless it has the crop's size already), and the rescale and
    normalisation run with the same float64 multiply, float32 cast and float32 subtract and divide, once per uint8
    value and channel (a look-up table, then indexed by the batch), so the result is bitwise the processor's
    (tested). Any other processor, or a batch of images of different sizes after cropping, goes to the processor
    itself."""
    from transformers.image_processing_backends import PilBackend
    from transformers.image_transforms import get_resize_output_image_size

    def processor_itself() -> Tensor:
        return processor(images=list(images), return_tensors="pt")["pixel_values"]

    plain = isinstance(processor, PilBackend) and type(processor)._preprocess is PilBackend._preprocess
    if not images or not plain or getattr(processor, "do_pad", None):
        return processor_itself()
    size, crop = processor.size, processor.crop_size
    arrays = []
    for image in images:
        target = None
        if isinstance(image, Image.Image) and image.mode == "RGB":
            target = _resize_target(processor, image, get_resize_output_image_size)
        if target is not None:  # an RGB image: PIL resizes it directly, as the processor's resize does via numpy
            if target != (image.height, image.width):
                image = image.resize((target[1], target[0]), resample=processor.resample)
            array = np.asarray(image).transpose(2, 0, 1)
        else:
            array = processor.process_image(image, do_convert_rgb=processor.do_convert_rgb)  # [C, H, W] uint8
            if processor.do_resize:
                array = processor.resize(image=array, size=size, resample=processor.resample)
        crop_shape = (getattr(crop, "height", None), getattr(crop, "width", None))
        if processor.do_center_crop and array.shape[1:] != crop_shape:  # of the crop's size already: a no-op
            array = processor.center_crop(array, crop)
        arrays.append(array)
    if len({a.shape for a in arrays}) != 1:
        return processor_itself()
    batch = np.stack(arrays)
    if batch.dtype == np.uint8 and (processor.do_rescale or processor.do_normalize):
        # every uint8 value through the same float64 rescale, float32 cast and float32 normalisation, once: the batch
        # is then a table look-up per channel, bitwise the arithmetic below at a fraction of its time
        table = _pixel_table(processor, batch.shape[1])
        return torch.from_numpy(np.stack([table[c][batch[:, c]] for c in range(batch.shape[1])], axis=1))
    return torch.from_numpy(np.ascontiguousarray(_rescale_normalize(processor, batch)))


def _rescale_normalize(processor, batch: np.ndarray) -> np.ndarray:
    """The processor's rescale and normalisation of a ``[B, C, H, W]`` batch, in its own dtypes and order."""
    if processor.do_rescale:
        batch = (batch.astype(np.float64) * processor.rescale_factor).astype(np.float32)
    if processor.do_normalize:
        batch = batch.astype(np.float32) if not np.issubdtype(batch.dtype, np.floating) else batch
        channels = batch.shape[1]
        mean, std = processor.image_mean, processor.image_std
        mean = np.array(mean if isinstance(mean, list | tuple) else [mean] * channels, dtype=batch.dtype)
        std = np.array(std if isinstance(std, list | tuple) else [std] * channels, dtype=batch.dtype)
        batch = (batch - mean[None, :, None, None]) / std[None, :, None, None]
    return batch


_PIXEL_TABLES: dict[tuple, np.ndarray] = {}


def _pixel_table(processor, channels: int) -> np.ndarray:
    """``[C, 256]`` float32: what :func:`_rescale_normalize` makes of each uint8 value in each channel (kept per
    setting, not on the processor: its attributes are saved with it)."""
    key = (channels, processor.do_rescale, processor.rescale_factor, processor.do_normalize)
    key += (str(processor.image_mean), str(processor.image_std))
    if key not in _PIXEL_TABLES:
        values = np.broadcast_to(np.arange(256, dtype=np.uint8), (1, channels, 1, 256))
        if len(_PIXEL_TABLES) >= 64:
            _PIXEL_TABLES.clear()
        _PIXEL_TABLES[key] = np.ascontiguousarray(_rescale_normalize(processor, values)[0, :, 0, :])
    return _PIXEL_TABLES[key]


def _resize_target(processor, image: Image.Image, output_size) -> tuple[int, int] | None:
    """``(height, width)`` the processor resizes ``image`` to (its own size when it does not resize), for the sizes
    given as a shortest edge (``output_size``: transformers' ``get_resize_output_image_size``) or as height and
    width; ``None`` for the others (the processor's own path)."""
    size, h, w = processor.size, image.height, image.width
    if not processor.do_resize:
        return h, w
    if size.shortest_edge and not size.longest_edge:
        stub = np.broadcast_to(np.uint8(0), (3, h, w))  # only its shape is read
        return tuple(output_size(stub, size.shortest_edge, False, None, "channels_first"))
    if size.height and size.width and not size.shortest_edge:
        return size.height, size.width
    return None


class DualEncoderProcessor:
    """A dual encoder's own preprocessing (tokenizer + image processor); picklable, so it runs in DataLoader workers."""

    def __init__(self, model: DualEncoder):
        self.image_processor, self.tokenizer = model.image_processor, model.tokenizer
        self.model_type, self.max_length = model.model_type, model.max_length

    def __call__(self, images, texts: dict[str, list], fields) -> dict[str, Any]:
        """Images and the texts of each field (``texts[field]``: one string per sample, or one list of strings per
        sample for a candidate field, all of one length ``C``) -> model inputs. A candidate field is tokenised as
        ``B * C`` texts and carries ``candidates = C``, so that :func:`encode_batch` gives ``[B, C, d]``."""
        text = {}
        for name in fields:
            values = texts[name]
            if values and isinstance(values[0], (list, tuple)):
                counts = {len(v) for v in values}
                if len(counts) != 1:
                    raise ValueError(
                        f"text field {name!r}: every sample needs the same number of candidates, got {counts}"
                    )
                flat = [t for v in values for t in v]
                text[name] = {**tokenize_texts(self.tokenizer, self.model_type, self.max_length, flat)}
                text[name]["candidates"] = counts.pop()
            else:
                text[name] = tokenize_texts(self.tokenizer, self.model_type, self.max_length, values)
        return {"pixel_values": pixel_values(self.image_processor, images), "text": text}


def encode_batch(
    model: DualEncoder, inputs: dict[str, Any], needs: frozenset[str], mask_ratio: float | None = None
) -> Embeddings:
    """Run one model on its preprocessed batch inputs and collect what the losses need.

    With ``"masked_image"`` in ``needs``, a student (not a :class:`Teacher`) also encodes its images with a random
    ``mask_ratio`` of their patches dropped, into ``image_masked``; the masks come from torch's global RNG, which the
    checkpoints save, so a resumed run draws the same masks.
    """
    out = Embeddings(logit_scale=model.logit_scale())
    tokens = bool({"image_tokens", "teacher_image_tokens"} & needs)  # the latter: a seq2seq student's token prefix
    image = model.encode_image(inputs["pixel_values"], return_tokens=tokens)
    out.image, out.image_tokens = image if isinstance(image, tuple) else (image, None)
    if "masked_image" in needs and not isinstance(model, Teacher):
        if mask_ratio is None:
            raise ValueError("a loss needs 'masked_image', but encode_batch got no mask_ratio")
        out.image_masked = model.encode_image_masked(inputs["pixel_values"], mask_ratio, shard=process_shard())
    for name, enc in inputs["text"].items():
        candidates = enc.get("candidates")
        tokens = "text_tokens" in needs and candidates is None  # token features of candidate fields are not kept
        text = model.encode_text(enc["input_ids"], enc["attention_mask"], return_tokens=tokens)
        if isinstance(text, tuple):
            out.text[name], out.text_tokens[name] = text
            out.text_mask[name] = enc["attention_mask"].to(text[1].device)
        else:
            out.text[name] = text if candidates is None else text.reshape(-1, candidates, text.shape[-1])
    return out


@contextmanager
def _eval_mode(module: nn.Module):
    """Evaluate without dropout, then give the module back in the mode it was in (e.g. mid-training)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class Teacher(DualEncoder):
    """A frozen dual encoder: no parameter requires grad, always in eval mode, encodes without autograd.

    ``train()`` is overridden so that putting a parent module in train mode (as trainers do) leaves the
    teacher in eval mode: dropout and batch-norm statistics of a teacher must never change.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer,
        image_processor,
        max_length: int | None = None,
        languages: Sequence[str] = ("en",),
    ):
        super().__init__(model, tokenizer, image_processor, max_length)
        self.languages = list(languages)  # caption languages its text tower understands
        self.model.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)

    @torch.no_grad()
    def encode_image(self, pixel_values: Tensor, return_tokens: bool = False):
        return super().encode_image(pixel_values, return_tokens)

    @torch.no_grad()
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, return_tokens: bool = False):
        return super().encode_text(input_ids, attention_mask, return_tokens)


def load_teacher(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
    languages: Sequence[str] = ("en",),
) -> Teacher:
    """Load a frozen teacher (model + its own processor) from a hub id or a local directory."""
    encoder = DualEncoder.from_pretrained(name_or_path, revision, trust_remote_code, dtype)
    return as_teacher(encoder, languages)


def as_teacher(encoder: DualEncoder, languages: Sequence[str] = ("en",)) -> Teacher:
    """Freeze an already-loaded dual encoder (e.g. a freshly trained reference teacher)."""
    return Teacher(encoder.model, encoder.tokenizer, encoder.image_processor, encoder.max_length, languages)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def prepare_teachers(cfg, loaded: Sequence[Teacher] | None = None) -> list[Teacher]:
    """Load the recipe's teachers (or take already loaded ones)."""
    if loaded is not None:
        return list(loaded)
    teachers = []
    for i, tcfg in enumerate(cfg.teachers):
        if not tcfg.name_or_path:
            raise ConfigError(f"teachers.{i}.name_or_path is not set: give a hub id or directory (--teacher PATH)")
        teachers.append(
            load_teacher(tcfg.name_or_path, tcfg.revision, tcfg.trust_remote_code, DTYPES[tcfg.dtype], tcfg.languages)
        )
    return teachers
