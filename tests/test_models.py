"""Teachers, students and their Hugging Face round trips, on tiny models built from configs (never downloads).

Every teacher family is built at a tiny size, saved as a Hugging Face directory (model, tokenizer, image processor)
and loaded back through ``load_teacher``, so these tests exercise the same path as a hub checkpoint. Tower widths are
all different on purpose (vision 32, text 48, projection 24, AltCLIP text projection 40), so a ``dims`` that reads
the wrong config field fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AltCLIPConfig,
    AltCLIPModel,
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizer,
    ChineseCLIPConfig,
    ChineseCLIPImageProcessor,
    ChineseCLIPModel,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    VisionTextDualEncoderModel,
)

from vldistill.evaluation import evaluate_zeroshot, zeroshot_weights
from vldistill.losses import build_loss
from vldistill.models import FAMILIES, DualEncoder, Teacher, as_teacher, load_teacher
from vldistill.outputs import Dims, ModelDims
from vldistill.students import CLIP_MEAN, CLIP_STD, STUDENTS, build_student
from vldistill.tokenization import train_wordpiece

CLASSNAMES = ["red square", "green circle", "blue triangle", "yellow star"]
TEMPLATE = "a photo of a {}."
TEXTS = ["a red square", "a photo of a green circle on a white background", "蓝色的三角形"]
CORPUS = [TEMPLATE.replace("{}", name) for name in CLASSNAMES] + TEXTS + ["a cat and a dog", "一只猫和一只狗"]

VISION_WIDTH, TEXT_WIDTH, EMBED, ALT_TEXT_PROJECTION = 32, 48, 24, 40
IMAGE_SIZE, PATCH = 32, 16


def _tower(hidden: int) -> dict:
    return {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 1, "num_attention_heads": 2}


VISION = {**_tower(VISION_WIDTH), "image_size": IMAGE_SIZE, "patch_size": PATCH}


def _images() -> list[Image.Image]:
    """Four distinct images of different sizes: a coloured shape on a white background per class."""
    shapes = [("rectangle", (255, 0, 0)), ("ellipse", (0, 160, 0)), ("polygon", (0, 0, 255)), ("star", (230, 200, 0))]
    images = []
    for i, (shape, colour) in enumerate(shapes):
        img = Image.new("RGB", (40 + 8 * i, 36), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        box = (6, 4, 34, 32)
        if shape == "rectangle":
            draw.rectangle(box, fill=colour)
        elif shape == "ellipse":
            draw.ellipse(box, fill=colour)
        elif shape == "polygon":
            draw.polygon([(20, 4), (6, 32), (34, 32)], fill=colour)
        else:
            draw.regular_polygon((20, 18, 14), n_sides=5, rotation=36, fill=colour)
        images.append(img)
    return images


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece(CORPUS, vocab_size=300, max_length=16)


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory):
    """A BERT tokenizer from a tiny vocabulary file, as Chinese-CLIP checkpoints ship."""
    words = sorted({w for text in CORPUS for w in re.findall(r"[a-z]+", text.lower())})
    chars = sorted({c for text in CORPUS for c in text if "\u4e00" <= c <= "\u9fff"})
    vocab = tmp_path_factory.mktemp("bert_vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *words, *chars]) + "\n")
    return BertTokenizer(vocab_file=str(vocab), model_max_length=16)


def _clip_processor(size: int = IMAGE_SIZE) -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _family(name: str, tok, bert_tok):
    """(model, tokenizer, image processor, expected dims) of one teacher family at a tiny size."""
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    text = {**_tower(TEXT_WIDTH), "vocab_size": len(tok), "max_position_embeddings": 16, **ids}
    dims = ModelDims(embed=EMBED, image_width=VISION_WIDTH, text_width=TEXT_WIDTH)
    if name == "clip":
        model = CLIPModel(CLIPConfig(vision_config=VISION, text_config=text, projection_dim=EMBED))
        return model, tok, _clip_processor(), dims
    if name == "chinese_clip":
        text = {**_tower(TEXT_WIDTH), "vocab_size": len(bert_tok), "max_position_embeddings": 32, "pad_token_id": 0}
        model = ChineseCLIPModel(ChineseCLIPConfig(vision_config=VISION, text_config=text, projection_dim=EMBED))
        processor = ChineseCLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
        return model, bert_tok, processor, dims
    if name == "altclip":
        # XLM-R style text tower: its token features come out projected to project_dim.
        text = {**text, "max_position_embeddings": 20, "project_dim": ALT_TEXT_PROJECTION}
        model = AltCLIPModel(AltCLIPConfig(vision_config=VISION, text_config=text, projection_dim=EMBED))
        return model, tok, _clip_processor(), ModelDims(EMBED, VISION_WIDTH, ALT_TEXT_PROJECTION)
    if name == "siglip":
        # No projection: the pooled width is the vision width; the text head maps its tokens onto it.
        text = {**text, "projection_size": VISION_WIDTH}
        model = SiglipModel(SiglipConfig(vision_config=VISION, text_config=text))
        processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        return model, tok, processor, ModelDims(VISION_WIDTH, VISION_WIDTH, TEXT_WIDTH)
    raise AssertionError(name)


TEACHER_FAMILIES = {"clip": CLIPModel, "chinese_clip": ChineseCLIPModel, "altclip": AltCLIPModel, "siglip": SiglipModel}


@pytest.fixture(scope="module", params=sorted(TEACHER_FAMILIES))
def family(request, tmp_path_factory, tokenizer, bert_tokenizer):
    """A teacher of one family, saved as a Hugging Face directory and loaded back with ``load_teacher``."""
    name = request.param
    torch.manual_seed(0)
    model, tok, processor, dims = _family(name, tokenizer, bert_tokenizer)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    processor.save_pretrained(path)
    return name, load_teacher(path, languages=("en", "zh")), dims


def _tokens_per_image(model_type: str) -> int:
    return (IMAGE_SIZE // PATCH) ** 2 + (0 if model_type == "siglip" else 1)  # SigLIP has no [CLS] token


# ----------------------------------------------------------------------------------------------------------------------
# Teachers


def test_teacher_loads_its_family_with_its_own_processor(family):
    name, teacher, _ = family
    assert isinstance(teacher, Teacher)
    assert teacher.model_type == name
    assert type(teacher.model) is TEACHER_FAMILIES[name]
    assert teacher.languages == ["en", "zh"]
    assert teacher.image_size == IMAGE_SIZE
    assert teacher.preprocess_images(_images()).shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_teacher_embedding_shapes_match_dims(family):
    name, teacher, expected = family
    batch = _images()[:3]
    pixels = teacher.preprocess_images(batch)
    image, image_tokens = teacher.encode_image(pixels, return_tokens=True)
    enc = teacher.tokenize(TEXTS)
    text, text_tokens = teacher.encode_text(**enc, return_tokens=True)
    length = enc["input_ids"].shape[1]

    assert image.shape == (3, expected.embed)
    assert text.shape == (3, expected.embed)
    assert image_tokens.shape == (3, _tokens_per_image(name), expected.image_width)
    assert text_tokens.shape == (3, length, expected.text_width)
    # dims is what adapters are sized from: it must describe the widths the model really outputs.
    assert teacher.dims == ModelDims(image.shape[1], image_tokens.shape[2], text_tokens.shape[2])
    assert teacher.dims == expected
    assert torch.equal(teacher.encode_image(pixels), image)  # return_tokens=False gives the same pooled output


def test_teacher_is_frozen_and_stays_in_eval_mode(family):
    _, teacher, _ = family
    assert all(not p.requires_grad for p in teacher.parameters())
    parent = nn.Module()
    parent.teacher = teacher
    parent.head = nn.Linear(2, 2)
    parent.train()
    assert parent.training and parent.head.training
    assert teacher.training is False
    assert not any(module.training for module in teacher.modules())
    teacher.train(True)
    assert not any(module.training for module in teacher.modules())


def test_teacher_outputs_are_deterministic_and_gradient_free(family):
    name, teacher, _ = family
    parent = nn.Module()
    parent.teacher = teacher
    parent.train()  # the text towers of Chinese-CLIP and AltCLIP have dropout 0.1: eval mode must hold
    pixels = teacher.preprocess_images(_images())
    enc = teacher.tokenize(TEXTS)
    with torch.enable_grad():
        first = [*teacher.encode_image(pixels, return_tokens=True), *teacher.encode_text(**enc, return_tokens=True)]
        second = [*teacher.encode_image(pixels, return_tokens=True), *teacher.encode_text(**enc, return_tokens=True)]
    for a, b in zip(first, second, strict=True):
        assert not a.requires_grad
        assert torch.equal(a, b), name


def test_teacher_embeds_raw_inputs_as_unit_rows(family):
    _, teacher, dims = family
    images = teacher.embed_images(_images())
    texts = teacher.embed_texts(TEXTS)
    assert images.shape == (4, dims.embed)
    assert texts.shape == (3, dims.embed)
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(3))
    # A text's embedding must not depend on what it is batched (and padded) with.
    alone = teacher.embed_texts(TEXTS[:1])
    torch.testing.assert_close(alone, texts[:1], atol=1e-5, rtol=1e-5)


def test_teacher_tokenize_uses_its_tokenizer(family):
    name, teacher, _ = family
    enc = teacher.tokenize(TEXTS)
    padding = "max_length" if name == "siglip" else True
    direct = teacher.tokenizer(TEXTS, padding=padding, truncation=True, max_length=teacher.max_length)
    assert enc["input_ids"].tolist() == direct["input_ids"]
    assert enc["input_ids"].shape == enc["attention_mask"].shape
    assert int(enc["input_ids"].max()) < teacher.model.config.text_config.vocab_size


def test_embedding_for_evaluation_is_deterministic_in_train_mode(tokenizer):
    student = build_student("test-vtde", tokenizer=tokenizer)
    student.train()  # e.g. evaluated mid-training
    assert torch.equal(student.embed_texts(TEXTS), student.embed_texts(TEXTS))
    assert student.training  # the mode is given back


def test_as_teacher_freezes_a_built_model(tokenizer):
    student = build_student("test-clip", tokenizer=tokenizer)
    student.train()
    teacher = as_teacher(student, languages=("zh",))
    assert isinstance(teacher, Teacher)
    assert teacher.languages == ["zh"]
    assert teacher.training is False and not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())


# ----------------------------------------------------------------------------------------------------------------------
# Teacher and student each preprocess their own way


def test_teacher_and_student_preprocess_with_their_own_processors(tmp_path, tokenizer):
    teacher_tok = train_wordpiece(
        ["quiz jukebox vex: the teacher reads these first", *reversed(CORPUS)], vocab_size=200
    )
    built = build_student(
        "test-clip", tokenizer=teacher_tok, image_mean=CLIP_MEAN, image_std=CLIP_STD, **{"vision.image_size": 48}
    )
    built.save_pretrained(tmp_path)
    teacher = load_teacher(tmp_path)
    student = build_student("test-clip", tokenizer=tokenizer)

    colour = (200, 100, 50)
    image = [Image.new("RGB", (64, 40), colour)]
    t_pixels, s_pixels = teacher.preprocess_images(image), student.preprocess_images(image)
    assert t_pixels.shape == (1, 3, 48, 48)
    assert s_pixels.shape == (1, 3, 32, 32)
    rgb = torch.tensor(colour) / 255
    t_expected = (rgb - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    s_expected = (rgb - 0.5) / 0.5
    torch.testing.assert_close(t_pixels[0].mean(dim=(1, 2)), t_expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(s_pixels[0].mean(dim=(1, 2)), s_expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(t_pixels[0, :, 0, 0], t_expected, atol=1e-4, rtol=0)  # solid colour stays solid
    assert teacher.embed_images(image).shape == (1, teacher.dims.embed)  # each model accepts its own pixels

    text = ["a photo of a red square."]
    t_ids, s_ids = teacher.tokenize(text)["input_ids"], student.tokenize(text)["input_ids"]
    assert t_ids.tolist() == [teacher_tok(text[0])["input_ids"]]
    assert s_ids.tolist() == [tokenizer(text[0])["input_ids"]]
    assert t_ids.tolist() != s_ids.tolist()


@pytest.mark.parametrize("kind", ["clip", "siglip", "chinese_clip", "rescale_only", "normalize_only", "neither"])
def test_fast_pixel_values_are_bitwise_the_processors(kind):
    """vldistill's batched preprocessing gives exactly what the transformers processor gives (resized, cropped,
    rescaled, normalised), for images already at size, larger, odd-sized, grey and with alpha, and with the rescale
    or the normalisation switched off."""
    import transformers

    from vldistill.models import pixel_values

    processor = {
        "clip": lambda: transformers.CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size=48),
        "siglip": lambda: transformers.SiglipImageProcessorPil(size={"height": 40, "width": 40}),
        "chinese_clip": lambda: transformers.ChineseCLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=32),
        "rescale_only": lambda: transformers.CLIPImageProcessorPil(size={"shortest_edge": 48}, do_normalize=False),
        "normalize_only": lambda: transformers.CLIPImageProcessorPil(
            size={"shortest_edge": 48}, do_rescale=False, image_mean=[100.0, 120.5, 90.25], image_std=[50.0, 3.0, 70.0]
        ),
        "neither": lambda: transformers.CLIPImageProcessorPil(
            size={"shortest_edge": 48}, do_rescale=False, do_normalize=False
        ),
    }[kind]()
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(48, 48), (61, 90), (130, 49)]
    ]
    images += [Image.new("L", (50, 70), 90), Image.new("RGBA", (48, 60), (10, 200, 30, 128))]
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    got = pixel_values(processor, images)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    same_size = [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(3)]
    assert torch.equal(
        pixel_values(processor, same_size), processor(images=same_size, return_tensors="pt")["pixel_values"]
    )


# ----------------------------------------------------------------------------------------------------------------------
# Students: exported as plain Hugging Face artefacts

# The dual-encoder presets (the seq2seq and cross-modal kinds have their own round trips in test_student_kinds.py).
STUDENT_PRESETS = [*sorted(n for n in STUDENTS.names() if n.startswith(("test-clip", "test-vtde"))), "clip-tiny"]


@pytest.mark.parametrize("preset", STUDENT_PRESETS)
def test_student_round_trips_through_transformers(preset, tmp_path, tokenizer):
    torch.manual_seed(0)
    student = build_student(preset, tokenizer=tokenizer).eval()  # BERT towers have dropout; from_pretrained evals
    assert isinstance(student.model, CLIPModel | VisionTextDualEncoderModel)
    images = _images()
    pixels, enc = student.preprocess_images(images), student.tokenize(TEXTS)
    with torch.no_grad():
        image_before, image_tokens = student.encode_image(pixels, return_tokens=True)
        text_before, text_tokens = student.encode_text(**enc, return_tokens=True)
    assert student.dims == ModelDims(image_before.shape[1], image_tokens.shape[2], text_tokens.shape[2])
    assert text_before.shape[1] == student.dims.embed
    student.save_pretrained(tmp_path)

    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], files

    model = AutoModel.from_pretrained(tmp_path)
    assert type(model) is type(student.model)
    if isinstance(student.model, VisionTextDualEncoderModel):
        assert type(VisionTextDualEncoderModel.from_pretrained(tmp_path)) is VisionTextDualEncoderModel
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    loaded_proc = AutoImageProcessor.from_pretrained(tmp_path)
    assert loaded_tok(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]
    torch.testing.assert_close(loaded_proc(images=images, return_tensors="pt")["pixel_values"], pixels)

    reloaded = DualEncoder(model, loaded_tok, loaded_proc)
    assert reloaded.dims == student.dims
    with torch.no_grad():
        image_after = reloaded.encode_image(reloaded.preprocess_images(images))
        text_after = reloaded.encode_text(**reloaded.tokenize(TEXTS))
    torch.testing.assert_close(image_after, image_before)
    torch.testing.assert_close(text_after, text_before)
    torch.testing.assert_close(DualEncoder.from_pretrained(tmp_path).embed_texts(TEXTS), student.embed_texts(TEXTS))


def _fit_contrastive(student: DualEncoder, images, texts, steps: int = 100) -> None:
    """A few CLIP-loss steps so that each image's own caption wins clearly (no near-ties to flip)."""
    pixels, enc = student.preprocess_images(images), student.tokenize(texts)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    targets = torch.arange(len(images))
    student.train()
    for _ in range(steps):
        image = nn.functional.normalize(student.encode_image(pixels), dim=-1)
        text = nn.functional.normalize(student.encode_text(**enc), dim=-1)
        logits = student.model.logit_scale.exp() * image @ text.T
        loss = nn.functional.cross_entropy(logits, targets) + nn.functional.cross_entropy(logits.T, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    student.eval()


def test_saved_student_agrees_with_the_transformers_zero_shot_pipeline(tmp_path, tokenizer):
    torch.manual_seed(0)
    images, labels = _images(), [0, 1, 2, 3]
    student = build_student("test-clip", tokenizer=tokenizer)
    _fit_contrastive(student, images, [TEMPLATE.replace("{}", name) for name in CLASSNAMES])
    student.save_pretrained(tmp_path)

    classifier = transformers.pipeline("zero-shot-image-classification", model=str(tmp_path))
    results = classifier(images, candidate_labels=CLASSNAMES, hypothesis_template=TEMPLATE)
    by_label = [{r["label"]: r["score"] for r in res} for res in results]
    pipeline_scores = torch.tensor([[scores[name] for name in CLASSNAMES] for scores in by_label])

    ours = DualEncoder.from_pretrained(tmp_path)
    result = evaluate_zeroshot(ours, images, labels, CLASSNAMES, [TEMPLATE])
    assert result.predictions.tolist() == pipeline_scores.argmax(dim=1).tolist()
    assert result.top1 == 1.0  # the brief fit separated the classes, so agreement is not a coin toss
    # Same cosines: the pipeline's softmax(scale * cos) equals ours computed from vldistill's class weights.
    weights = zeroshot_weights(ours, CLASSNAMES, [TEMPLATE])
    ours_scores = (ours.logit_scale() * ours.embed_images(images) @ weights.T).softmax(dim=1)
    torch.testing.assert_close(ours_scores, pipeline_scores, atol=1e-4, rtol=1e-4)


def test_distillation_adapters_are_not_exported(tmp_path, tokenizer):
    student = build_student("test-clip", tokenizer=tokenizer)
    teacher_dims = ModelDims(embed=student.dims.embed + 8, image_width=64, text_width=64)
    loss = build_loss("fd", Dims(student=student.dims, teachers=(teacher_dims,)))
    assert any("adapter" in name for name, _ in loss.named_parameters())  # the loss really has one to leak
    task = nn.Module()  # what a trainer prepares: the student and the losses side by side
    task.student, task.loss = student, loss
    task.student.save_pretrained(tmp_path)

    saved = load_file(tmp_path / "model.safetensors")
    assert not [key for key in saved if "adapter" in key]
    assert set(saved) <= set(student.model.state_dict())
    assert "logit_scale" in saved and "visual_projection.weight" in saved


# ----------------------------------------------------------------------------------------------------------------------
# Errors that name the problem


def test_unsupported_model_type_is_rejected(tokenizer):
    bert = BertModel(BertConfig(**_tower(32), vocab_size=len(tokenizer)))
    with pytest.raises(ValueError, match="'bert'") as err:
        DualEncoder(bert, tokenizer, _clip_processor())
    for name in FAMILIES.names():
        assert name in str(err.value)


def test_unknown_student_preset_lists_the_registered_ones():
    with pytest.raises(KeyError, match="nope") as err:
        build_student("nope")
    for name in STUDENTS.names():
        assert name in str(err.value)


@pytest.mark.parametrize("preset", STUDENT_PRESETS)
def test_config_built_preset_needs_a_tokenizer(preset):
    with pytest.raises(ValueError, match="tokenizer"):
        build_student(preset)


def test_missing_teacher_directory_is_named(tmp_path):
    missing = tmp_path / "no" / "such" / "teacher"
    assert Path(missing).is_absolute()
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_teacher(missing)


@pytest.mark.parametrize("preset", ["clip-tiny", "vtde-tiny"])
def test_tower_overrides_nested_or_dotted_build_the_same_student(preset, tokenizer):
    # student.overrides.vision: {image_size: 64, ...} in a recipe, or vision.image_size on the command line
    nested = build_student(preset, tokenizer, vision={"image_size": 64, "patch_size": 8}, text={"num_hidden_layers": 1})
    dotted = build_student(
        preset, tokenizer, **{"vision.image_size": 64, "vision.patch_size": 8, "text.num_hidden_layers": 1}
    )
    for model in (nested, dotted):
        cfg = model.model.config
        vision = cfg.vision_config
        assert (vision.image_size, vision.patch_size) == (64, 8)
        assert cfg.text_config.num_hidden_layers == 1
        assert model.embed_images([Image.new("RGB", (64, 64))]).shape[0] == 1
    assert nested.num_parameters() == dotted.num_parameters()
