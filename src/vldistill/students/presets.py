"""Student presets: Hugging Face dual encoders built from named configs or from pretrained parts.

A preset is one decorated function that returns a :class:`~vldistill.models.DualEncoder`::

    @STUDENTS.register("my-student")
    def my_student(tokenizer=None, **overrides) -> DualEncoder: ...

Presets built from a config need a tokenizer (any HF tokenizer; the quickstart trains a small English + Chinese
one). Tiny ``test-*`` presets keep the test suite fast. Sizes are in each preset's docstring.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    ViTConfig,
)

from ..config import ConfigError, RecipeConfig
from ..models import DualEncoder
from ..registry import Registry

STUDENTS = Registry("student")

# Students normalise images their own way (ViT/Inception style), deliberately not the teacher's CLIP statistics.
STUDENT_MEAN = [0.5, 0.5, 0.5]
STUDENT_STD = [0.5, 0.5, 0.5]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def image_processor_for(size: int, mean=STUDENT_MEAN, std=STUDENT_STD) -> CLIPImageProcessorPil:
    """Resize the short side to ``size``, centre-crop to ``size`` x ``size``, rescale and normalise."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(mean),
        image_std=list(std),
        do_convert_rgb=True,
    )


def _require_tokenizer(tokenizer, preset: str):
    if tokenizer is None:
        raise ValueError(
            f"student preset {preset!r} is built from a config and needs a tokenizer "
            "(student.tokenizer: a hub id or directory, or let the quickstart train one)"
        )
    if isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return tokenizer


def _special_ids(tokenizer) -> dict[str, int]:
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}
    ids["eos_token_id"] = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if ids["eos_token_id"] == 2:  # see tokenization.SPECIAL_TOKENS: id 2 switches CLIP to legacy pooling
        raise ValueError("CLIP students need an eos_token_id other than 2; use vldistill.tokenization.train_wordpiece")
    return {k: v for k, v in ids.items() if v is not None}


def _split_overrides(overrides: dict[str, Any]) -> tuple[dict, dict, dict]:
    """``vision.hidden_size=...`` / ``text.num_hidden_layers=...`` / top-level keys, from a flat or nested dict."""
    vision, text, top = {}, {}, {}
    for key, value in overrides.items():
        if key in ("vision", "text") and isinstance(value, dict):
            (vision if key == "vision" else text).update(value)
        elif key.startswith("vision."):
            vision[key.removeprefix("vision.")] = value
        elif key.startswith("text."):
            text[key.removeprefix("text.")] = value
        else:
            top[key] = value
    return vision, text, top


def clip_from_config(
    tokenizer, vision_tower: dict[str, Any], text_tower: dict[str, Any], preset: str, **overrides: Any
) -> DualEncoder:
    """Build a randomly initialised ``CLIPModel`` of the given tower sizes with its own image processor.

    ``overrides`` holds the preset's defaults merged with the user's (``projection_dim``, ``image_mean``,
    ``image_std``, ``vision.*``, ``text.*`` and any other ``CLIPConfig`` field).
    """
    tokenizer = _require_tokenizer(tokenizer, preset)
    v_over, t_over, top = _split_overrides(overrides)
    image_mean, image_std = top.pop("image_mean", STUDENT_MEAN), top.pop("image_std", STUDENT_STD)
    vision = {**vision_tower, **v_over}
    text = {**text_tower, "vocab_size": len(tokenizer), **_special_ids(tokenizer), **t_over}
    text.setdefault("max_position_embeddings", min(getattr(tokenizer, "model_max_length", 77), 77))
    config = CLIPConfig(vision_config=vision, text_config=text, **top)
    model = CLIPModel(config)
    return DualEncoder(model, tokenizer, image_processor_for(vision["image_size"], image_mean, image_std))


def _tower(hidden: int, layers: int, heads: int, **extra: Any) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "hidden_act": "gelu",
        **extra,
    }


@STUDENTS.register("clip-tiny")
def clip_tiny(tokenizer=None, **overrides: Any) -> DualEncoder:
    """The quickstart student: ViT 32px/4 width 96 x 2 layers; text width 96 x 2 layers; 64-d embeddings.

    An 8 x 8 patch grid, like its teacher's: with 8-pixel patches (4 x 4) this student could not tell the bundled
    data's shapes apart (about 50% top-1, distilled or not)."""
    return clip_from_config(
        tokenizer,
        vision_tower=_tower(96, 2, 4, image_size=32, patch_size=4),
        text_tower=_tower(96, 2, 4),
        preset="clip-tiny",
        **{"projection_dim": 64, **overrides},
    )


@STUDENTS.register("clip-ref-teacher")
def clip_ref_teacher(tokenizer=None, **overrides: Any) -> DualEncoder:
    """The quickstart's reference teacher: ViT 64px/8 width 128 x 6; text width 256 x 4; 128-d; CLIP mean/std.

    An 8 x 8 patch grid: with 16-pixel patches (a 4 x 4 grid) a teacher trained as long learnt colours but only
    64% of shapes on the bundled data, against 86% with this one."""
    return clip_from_config(
        tokenizer,
        vision_tower=_tower(128, 6, 4, image_size=64, patch_size=8),
        text_tower=_tower(256, 4, 4),
        preset="clip-ref-teacher",
        **{"projection_dim": 128, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, **overrides},
    )


@STUDENTS.register("clip-s16")
def clip_s16(tokenizer=None, **overrides: Any) -> DualEncoder:
    """A ViT-S/16-sized CLIP student for real teachers: 224px/16 width 384 x 12; text width 384 x 6; 512-d."""
    return clip_from_config(
        tokenizer,
        vision_tower=_tower(384, 12, 6, image_size=224, patch_size=16),
        text_tower=_tower(384, 6, 6),
        preset="clip-s16",
        **{"projection_dim": 512, **overrides},
    )


@STUDENTS.register("test-clip")
def test_clip(tokenizer=None, **overrides: Any) -> DualEncoder:
    """Tiny CLIP for tests: 32px/16 width 32 x 1; text width 32 x 1; 16-d."""
    return clip_from_config(
        tokenizer,
        vision_tower=_tower(32, 1, 2, image_size=32, patch_size=16),
        text_tower=_tower(32, 1, 2),
        preset="test-clip",
        **{"projection_dim": 16, **overrides},
    )


def vtde_from_configs(tokenizer, vision_tower: dict, text_tower: dict, preset: str, **overrides) -> DualEncoder:
    """``VisionTextDualEncoderModel`` from a ViT config and a BERT config (random initialisation)."""
    tokenizer = _require_tokenizer(tokenizer, preset)
    v_over, t_over, top = _split_overrides(overrides)
    vision_cfg = ViTConfig(**{**vision_tower, **v_over})
    text_cfg = BertConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id or 0, **{**text_tower, **t_over}
    )
    image_mean, image_std = top.pop("image_mean", STUDENT_MEAN), top.pop("image_std", STUDENT_STD)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision_cfg, text_cfg, **top)
    model = VisionTextDualEncoderModel(config=config)
    return DualEncoder(model, tokenizer, image_processor_for(vision_cfg.image_size, image_mean, image_std))


@STUDENTS.register("vtde-tiny")
def vtde_tiny(tokenizer=None, **overrides: Any) -> DualEncoder:
    """VisionTextDualEncoder of a ViT (32px/8, width 96 x 2) and a BERT (width 96 x 2); 64-d embeddings."""
    return vtde_from_configs(
        tokenizer,
        _tower(96, 2, 4, image_size=32, patch_size=8),
        _tower(96, 2, 4),
        "vtde-tiny",
        **{"projection_dim": 64, **overrides},
    )


@STUDENTS.register("test-vtde")
def test_vtde(tokenizer=None, **overrides: Any) -> DualEncoder:
    """Tiny VisionTextDualEncoder for tests: ViT 32px/16 width 32 x 1, BERT width 32 x 1, 16-d."""
    return vtde_from_configs(
        tokenizer,
        _tower(32, 1, 2, image_size=32, patch_size=16),
        _tower(32, 1, 2),
        "test-vtde",
        **{"projection_dim": 16, **overrides},
    )


@STUDENTS.register("vtde")
def vtde_from_parts(tokenizer=None, vision: str | None = None, text: str | None = None, **overrides) -> DualEncoder:
    """VisionTextDualEncoder from any pretrained HF vision model and any pretrained HF text model (hub ids or dirs).

    The tokenizer comes from ``text`` (unless given) and the image processor from ``vision``.
    """
    if not vision or not text:
        raise ValueError("student preset 'vtde' needs both student.vision and student.text (hub ids or directories)")
    projection_dim = overrides.pop("projection_dim", 512)
    if overrides:
        raise ValueError(f"student preset 'vtde' got unknown options {sorted(overrides)}; allowed: projection_dim")
    model = VisionTextDualEncoderModel.from_vision_text_pretrained(vision, text, projection_dim=projection_dim)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer or text)
    return DualEncoder(model, tokenizer, AutoImageProcessor.from_pretrained(vision))


#: Teacher families whose image tower a text-only student can reuse in an exported ``VisionTextDualEncoderModel``
#: (the tower must have an ``AutoModel`` class so that ``transformers`` alone loads the export; AltCLIP's has none).
REUSABLE_VISION_FAMILIES = ("clip", "chinese_clip", "siglip", "vision-text-dual-encoder")


def text_student_on_teacher_vision(
    tokenizer, teacher: DualEncoder | None, text: dict[str, Any], preset: str, **overrides: Any
) -> DualEncoder:
    """A new text tower (BERT) with a projection into the teacher's embedding space, next to a copy of the
    teacher's own image tower and image projection, as one ``VisionTextDualEncoderModel``.

    Its image embeddings are the teacher's (same weights, same image processor); its text embeddings have the
    teacher's width, so a text-only loss (``xling``) trains them directly in the teacher's space and the saved model
    is a multilingual CLIP that ``AutoModel.from_pretrained`` loads. The logit scale is the teacher's.
    """
    tokenizer = _require_tokenizer(tokenizer, preset)
    if teacher is None:
        raise ValueError(f"student preset {preset!r} reuses the teacher's image tower and needs a teacher (teacher:)")
    if teacher.model_type not in REUSABLE_VISION_FAMILIES:
        raise NotImplementedError(
            f"student preset {preset!r} cannot reuse the image tower of a {teacher.model_type!r} teacher; supported: "
            f"{', '.join(REUSABLE_VISION_FAMILIES)} (the export must load with transformers' AutoModel)"
        )
    v_over, t_over, top = _split_overrides(overrides)
    if v_over or top:
        raise ValueError(
            f"student preset {preset!r} got options {sorted({*v_over, *top})}; it keeps the teacher's image tower and "
            "takes only text.* overrides"
        )
    vision = copy.deepcopy(teacher.model.vision_model)
    embed = teacher.dims.embed
    text_cfg = BertConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id or 0,
        max_position_embeddings=min(getattr(tokenizer, "model_max_length", 512), 512),
        **{**text, **t_over},
    )
    log_scale = getattr(teacher.model, "logit_scale", None)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision.config,
        text_cfg,
        projection_dim=embed,
        logit_scale_init_value=float(log_scale) if log_scale is not None else 2.6592,
    )
    model = VisionTextDualEncoderModel(config=config, vision_model=vision, text_model=BertModel(text_cfg))
    with torch.no_grad():
        projection = getattr(teacher.model, "visual_projection", None)
        if projection is None:  # SigLIP: the pooled head output is the embedding
            model.visual_projection.weight.copy_(torch.eye(embed))
        else:
            model.visual_projection.weight.copy_(projection.weight)
    return DualEncoder(model, tokenizer, copy.deepcopy(teacher.image_processor))


@STUDENTS.register("mclip-text")
def mclip_text(tokenizer=None, teacher: DualEncoder | None = None, **overrides: Any) -> DualEncoder:
    """Multilingual-CLIP student: the teacher's image tower unchanged + a BERT text tower (width 96 x 2) projected
    to the teacher's embedding width (see :func:`text_student_on_teacher_vision`). Needs the recipe's teacher."""
    return text_student_on_teacher_vision(tokenizer, teacher, _tower(96, 2, 4), "mclip-text", **overrides)


def takes_teacher(preset: str) -> bool:
    """Whether a registered preset builds on the recipe's (first) teacher, i.e. takes a ``teacher`` argument."""
    return preset in STUDENTS and "teacher" in inspect.signature(STUDENTS.get(preset)).parameters


@STUDENTS.register("pretrained")
def pretrained_student(tokenizer=None, name_or_path: str | None = None, **overrides) -> DualEncoder:
    """An existing HF dual encoder (any supported family) trained further as the student."""
    if not name_or_path:
        raise ValueError("student preset 'pretrained' needs student.name_or_path (a hub id or a directory)")
    if overrides:
        raise ValueError(f"student preset 'pretrained' takes no overrides; got {sorted(overrides)}")
    return DualEncoder.from_pretrained(name_or_path)


def build_student(preset: str, tokenizer=None, **options: Any) -> DualEncoder:
    """Build a registered student preset; unknown presets fail with the list of registered ones."""
    return STUDENTS.get(preset)(tokenizer=tokenizer, **options)


def _takes(preset: str, name: str) -> bool:
    return preset in STUDENTS and name in inspect.signature(STUDENTS.get(preset)).parameters


def prepare_student(
    cfg: RecipeConfig,
    corpus: Sequence[str] = (),
    tokenizer=None,
    teachers: Sequence[DualEncoder] = (),
    answers: Sequence[str] | None = None,
    teacher_dims: Sequence[Any] = (),
):
    """Build the student preset; trains a tokenizer on ``corpus`` when the preset needs one and none is given.

    A preset that builds on the teacher (e.g. ``mclip-text``, which reuses its image tower, or a seq2seq student,
    whose projections take the teacher's widths) gets ``teachers[0]``. A preset that takes a checkpoint gets
    ``student.name_or_path``; one with a task head gets the task (``data.task``) and the training data's VQA answer
    vocabulary ``answers``. ``student.overrides.projection_dim: teacher`` takes the first teacher's embedding width
    (from ``teacher_dims`` when the teachers are not loaded, e.g. a run from a teacher-output cache).
    """
    from ..tokenization import train_wordpiece

    scfg = cfg.student
    options: dict[str, Any] = dict(scfg.overrides)
    if options.get("projection_dim") == "teacher":  # the student embeds in the teacher's width (no adapter needed)
        dims = list(teacher_dims) or [t.dims for t in teachers]
        if not dims:
            raise ConfigError("student.overrides.projection_dim = 'teacher': the recipe has no teacher to take it from")
        options["projection_dim"] = dims[0].embed
    if scfg.preset == "pretrained" or (scfg.name_or_path and _takes(scfg.preset, "name_or_path")):
        options["name_or_path"] = scfg.name_or_path
    if _takes(scfg.preset, "task") and cfg.data.task != "pairs":
        options.setdefault("task", cfg.data.task)
    if answers and _takes(scfg.preset, "answers") and options.get("task", cfg.data.task) == "vqa":
        options.setdefault("answers", list(answers))
    if scfg.preset == "vtde":
        options.update(vision=scfg.vision, text=scfg.text)
    if takes_teacher(scfg.preset):
        if not teachers:
            raise ConfigError(f"student.preset: {scfg.preset!r} builds on the teacher, but none is set (teacher:)")
        options["teacher"] = teachers[0]
    tok = tokenizer or scfg.tokenizer
    from_checkpoint = scfg.preset in ("pretrained", "vtde") or "name_or_path" in options
    if tok is None and not from_checkpoint:
        if not corpus:
            raise ConfigError("student.tokenizer is not set and there is no text to train one on")
        tok = train_wordpiece(corpus, vocab_size=scfg.vocab_size)
    torch.manual_seed(cfg.train.seed)
    try:
        return build_student(scfg.preset, tokenizer=tok, **options)
    except KeyError as err:
        raise ConfigError(f"student.preset: {err.args[0]}") from None
