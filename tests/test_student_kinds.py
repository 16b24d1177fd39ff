"""The ``seq2seq`` (VLKD) and ``crossmodal`` (CLIP-TD) student kinds: outputs and their shapes, parameter groups,
span corruption, generation, checkpoints given by path as a hub id would be, and exports that load with
``transformers`` alone. Tiny models built from configs; the whole module runs in well under a minute."""

from __future__ import annotations

import itertools
import pickle

import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    ViltForQuestionAnswering,
    ViltImageProcessorPil,
)

from vldistill.outputs import Embeddings
from vldistill.students import (
    STUDENT_KINDS,
    CrossModalStudent,
    Seq2SeqStudent,
    build_student,
    set_trainable,
    span_corrupt,
)
from vldistill.students.seq2seq import corruption_generator
from vldistill.tokenization import train_wordpiece

pytestmark = pytest.mark.usefixtures("one_thread")

D_T, H_T = 16, 24  # the fake teacher's embedding width and image-token width
COLORS = ["red", "blue", "green", "yellow"]
SHAPES = ["circle", "square", "triangle", "star"]
ANSWERS = [*COLORS, *SHAPES]
ALL = {"text", "text_feature", "lm_loss"}
VL_ALL = {"task_logits", "token_states", "cls_attention"}


@pytest.fixture(scope="module")
def tok():
    corpus = [f"a {c} {s} on a white background" for c in COLORS for s in SHAPES]
    corpus += ["what color is the shape", "what shape is it", "question answer picture of", "一个红色的圆形"]
    return train_wordpiece(corpus, vocab_size=200)


def image(i: int, size=(32, 32)) -> Image.Image:
    return Image.new("RGB", size, color=(60 * i % 256, 90 * i % 256, 30 * i % 256))


def pairs(n: int) -> list[dict]:
    return [
        {
            "index": i,
            "image": image(i),
            "captions": {"en": f"a {COLORS[i % 4]} {SHAPES[i % 4]} on a white background", "zh": "一个红色的圆形"},
            "label": i,
        }
        for i in range(n)
    ]


def vqa(n: int, sizes=None) -> list[dict]:
    return [
        {
            "index": i,
            "image": image(i, sizes[i] if sizes else (32, 32)),
            "kind": "vqa",
            "question": "what color is the shape",
            "answers": [COLORS[i % 4]] * 3 + ["red"],
            "answer": COLORS[i % 4],
            "answer_index": i % 4,
            "question_type": "color",
        }
        for i in range(n)
    ]


def entailment(n: int) -> list[dict]:
    return [
        {"index": i, "image": image(i), "kind": "entailment", "hypothesis": f"a {COLORS[i % 4]} shape", "label": i % 3}
        for i in range(n)
    ]


def choice(n: int, candidates: int = 3) -> list[dict]:
    return [
        {
            "index": i,
            "image": image(i),
            "kind": "multiple_choice",
            "question": "what shape is it",
            "candidates": SHAPES[:candidates],
            "answer_index": i % candidates,
            "rationales": ["it has corners"] * candidates,
            "rationale_index": 0,
        }
        for i in range(n)
    ]


def fake_teacher(batch: int, seed: int = 0) -> Embeddings:
    g = torch.Generator().manual_seed(seed)
    return Embeddings(image=torch.randn(batch, D_T, generator=g), image_tokens=torch.randn(batch, 5, H_T, generator=g))


def bart(tok, **options) -> Seq2SeqStudent:
    torch.manual_seed(0)
    return build_student("test-bart", tok, teacher_width=D_T, teacher_image_width=H_T, **options)


def vilt(tok, task: str = "vqa", **options) -> CrossModalStudent:
    torch.manual_seed(0)
    answers = ANSWERS if task == "vqa" else None
    return build_student("test-vilt", tok, task=task, answers=answers, **options)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed_groups(student, before: dict[str, torch.Tensor]) -> tuple[set[str], set[str]]:
    """(groups with a changed parameter, groups with an unchanged parameter)."""
    groups = student.param_groups()
    changed, unchanged = set(), set()
    for name, p in student.named_parameters():
        (group,) = [g for g, prefixes in groups.items() if name.startswith(prefixes)]
        (unchanged if torch.equal(p, before[name]) else changed).add(group)
    return changed, unchanged


# ----------------------------------------------------------------------------------------------- span corruption
BOS, EOS, MASK = 3, 4, 2
CAPTION = [BOS, *range(10, 20), EOS]  # 10 maskable tokens


def test_span_corrupt_masks_thirty_percent_with_one_mask_per_span():
    for seed in range(20):
        out = span_corrupt(CAPTION, MASK, 0.3, 3.0, torch.Generator().manual_seed(seed), {BOS, EOS})
        kept = [t for t in out if t != MASK]
        assert len(kept) == 12 - 3  # round(0.3 * 10) tokens replaced
        assert out[0] == BOS and out[-1] == EOS  # special tokens never masked
        assert kept == [t for t in CAPTION if t in kept]  # what is left keeps its order
        assert all(not (a == MASK and b == MASK) for a, b in itertools.pairwise(out))  # one mask per span
        assert len(out) == len(kept) + out.count(MASK)


def test_span_corrupt_long_span_is_one_mask_over_contiguous_tokens():
    # mean span 1000: the first Poisson draw covers the whole budget, so exactly one span of 3 tokens.
    out = span_corrupt(CAPTION, MASK, 0.3, 1000.0, torch.Generator().manual_seed(1), {BOS, EOS})
    assert out.count(MASK) == 1
    s = out.index(MASK)
    assert out == [*CAPTION[:s], MASK, *CAPTION[s + 3 :]]


def test_span_corrupt_hand_checked_edge_cases():
    g = torch.Generator().manual_seed(0)
    assert span_corrupt(CAPTION, MASK, 0.0, 3.0, g, {BOS, EOS}) == CAPTION
    assert span_corrupt([BOS, EOS], MASK, 0.3, 3.0, g, {BOS, EOS}) == [BOS, EOS]
    # Specials in the middle split the text: a span of 4 fits nowhere and is split, never across the EOS.
    assert span_corrupt([BOS, 10, 11, EOS, 12, 13, EOS], MASK, 1.0, 1000.0, g, {BOS, EOS}) == [
        BOS,
        MASK,
        EOS,
        MASK,
        EOS,
    ]
    with pytest.raises(ValueError, match="ratio"):
        span_corrupt(CAPTION, MASK, 1.5)


def test_span_corrupt_is_deterministic_per_seed_index_and_epoch():
    def run(seed, index, epoch):
        return span_corrupt(CAPTION, MASK, 0.3, 3.0, corruption_generator(seed, index, epoch), {BOS, EOS})

    assert run(0, 5, 1) == run(0, 5, 1)
    assert len({tuple(run(0, 5, epoch)) for epoch in range(8)}) > 1
    assert len({tuple(run(0, index, 0)) for index in range(8)}) > 1


# -------------------------------------------------------------------------------------------------- seq2seq
@pytest.mark.parametrize("preset", ["test-bart", "test-t5"])
def test_seq2seq_forward_gives_text_features_and_lm_loss(tok, preset):
    student = build_student(preset, tok, teacher_width=D_T, teacher_image_width=H_T)
    assert isinstance(student, STUDENT_KINDS.get("seq2seq")) and student.provides == ALL
    inputs = student.processor()(pairs(3))
    assert set(inputs) == {"index", "text", "lm", "targets"} and set(inputs["text"]) == {"en", "zh"}
    assert set(inputs["lm"]) == {"input_ids", "attention_mask", "labels"}
    assert (inputs["lm"]["input_ids"] == tok.mask_token_id).any()  # the LM input is corrupted
    out = student(inputs, ALL, fake_teacher(3))
    assert out.text["en"].shape == out.text["zh"].shape == (3, D_T)
    assert torch.equal(out.extra["text_feature"], out.text["en"])
    assert out.extra["lm_loss"].dim() == 0 and torch.isfinite(out.extra["lm_loss"])
    assert student.dims.embed == D_T and student.dims.text_width == 32
    only_text = student(inputs, {"text"})  # no teacher needed without lm_loss
    assert "lm_loss" not in only_text.extra


@pytest.mark.parametrize("options", [{}, {"prefix": "tokens", "pool": "mean"}, {"prefix_tokens": 3}])
def test_seq2seq_lm_loss_decreases(tok, options):
    student = bart(tok, **options)
    inputs, teacher = student.processor()(pairs(4)), fake_teacher(4)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = student(inputs, {"lm_loss"}, teacher).extra["lm_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_seq2seq_vqa_inputs(tok):
    student = bart(tok)
    inputs = student.processor()(vqa(2))
    assert set(inputs["text"]) == {"question"}
    prompt = tok.decode(inputs["lm"]["input_ids"][0], skip_special_tokens=False)
    assert "question" in prompt and "[MASK]" in prompt
    labels = inputs["lm"]["labels"][1]
    assert tok.decode(labels[labels != -100], skip_special_tokens=True) == COLORS[1]
    assert inputs["targets"]["answer"].tolist() == [0, 1]
    assert torch.isfinite(student(inputs, ALL, fake_teacher(2)).extra["lm_loss"])


def test_seq2seq_processor_pickles_and_corrupts_by_epoch(tok):
    processor = bart(tok).processor()
    clone = pickle.loads(pickle.dumps(processor))
    batch = pairs(4)
    assert torch.equal(processor(batch)["lm"]["input_ids"], clone(batch)["lm"]["input_ids"])
    clone.set_epoch(1)
    epochs = [processor(batch)["lm"]["input_ids"], clone(batch)["lm"]["input_ids"]]
    assert epochs[0].shape != epochs[1].shape or not torch.equal(*epochs)
    assert torch.equal(processor(batch)["lm"]["labels"], clone(batch)["lm"]["labels"])  # the clean caption


def test_seq2seq_set_trainable_moves_only_named_groups(tok):
    student = bart(tok)
    set_trainable(student, ["lm", "text_projection", "prefix"])  # the groups cover every parameter once
    trainable = set_trainable(student, ["text_projection"])
    assert trainable == [student.text_projection.weight]
    before = snapshot(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    out = student(student.processor()(pairs(2)), ALL, fake_teacher(2))
    (out.extra["lm_loss"] + out.text["en"].square().sum()).backward()
    optimizer.step()
    assert changed_groups(student, before) == ({"text_projection"}, {"lm", "prefix"})
    with pytest.raises(ValueError, match=r"\['lm', 'prefix', 'text_projection'\]"):
        set_trainable(student, ["image"])


def test_seq2seq_generate(tok):
    student = bart(tok)
    prompts = [student.format_prompt("what color is the shape"), "a picture of [MASK]"]
    for beams in (1, 2):
        texts = student.generate(fake_teacher(2).image, prompts, max_new_tokens=4, num_beams=beams)
        assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert student.training  # generation gives the student back in the mode it was in


def test_seq2seq_bad_inputs(tok):
    student = bart(tok)
    inputs = student.processor()(pairs(2))
    narrow = Embeddings(image=torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"width 16.*width 7"):
        student(inputs, {"lm_loss"}, narrow)
    with pytest.raises(ValueError, match="teacher's pooled image embedding"):
        student(inputs, {"lm_loss"}, None)
    with pytest.raises(ValueError, match=r"image_tokens|cannot provide"):
        student(inputs, {"image_tokens"})
    bad = vqa(2)
    bad[1]["question"] = "  "
    with pytest.raises(ValueError, match=r"sample 1: question is empty"):
        student.processor()(bad)
    with pytest.raises(ValueError, match="unknown options"):
        bart(tok, pooling="eos")
    with pytest.raises(ValueError, match="pool='cls'"):
        bart(tok, pool="cls")
    with pytest.raises(ValueError, match="needs the teacher's widths"):
        build_student("test-bart", tok)


def test_seq2seq_from_a_checkpoint_path_and_export(tok, tmp_path):
    """A real LM checkpoint given by path (as a hub id would be), the teacher a tiny CLIP; the saved LM loads with
    transformers alone and still generates text."""
    lm_dir = tmp_path / "tiny-bart"
    bart(tok).model.save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    clip = build_student("test-clip", tok)
    student = build_student("seq2seq", teacher=clip, name_or_path=str(lm_dir))
    batch = pairs(2)
    with torch.no_grad():
        image, tokens = clip.encode_image(clip.preprocess_images([s["image"] for s in batch]), return_tokens=True)
    teacher = Embeddings(image=image, image_tokens=tokens)
    inputs = student.processor()(batch)
    student.eval()
    out = student(inputs, ALL, teacher)
    assert out.text["en"].shape == (2, clip.dims.embed)

    student.save_pretrained(tmp_path / "student")
    lm = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "student" / "lm")
    lm_tok = AutoTokenizer.from_pretrained(tmp_path / "student" / "lm")
    ids = lm.generate(**lm_tok(["a red circle"], return_tensors="pt"), max_new_tokens=4)
    assert isinstance(lm_tok.batch_decode(ids, skip_special_tokens=True)[0], str)

    again = build_student("seq2seq", teacher=clip, name_or_path=str(tmp_path / "student")).eval()
    same = again(inputs, ALL, teacher)
    torch.testing.assert_close(same.extra["lm_loss"], out.extra["lm_loss"])
    torch.testing.assert_close(same.text["en"], out.text["en"])


# ------------------------------------------------------------------------------------------------ crossmodal
@pytest.mark.parametrize(
    ("task", "samples", "width"),
    [("vqa", vqa, len(ANSWERS)), ("entailment", entailment, 3), ("multiple_choice", choice, 3)],
)
def test_crossmodal_forward_outputs(tok, task, samples, width):
    student = vilt(tok, task)
    assert isinstance(student, STUDENT_KINDS.get("crossmodal")) and student.provides == VL_ALL
    inputs = student.processor()(samples(3))
    assert inputs["targets"]["answer"].shape == (3,)
    out = student(inputs, VL_ALL).extra
    assert out["task_logits"].shape == (3, width)
    batch, n, hidden = out["token_states"].shape
    text_len = inputs["input_ids"].shape[-1]
    assert (batch, hidden) == (3, 32) and n == text_len + 1 + 4  # text, image [CLS], 2 x 2 patches
    assert out["cls_attention"].shape == (3, n)
    torch.testing.assert_close(out["cls_attention"].sum(1), torch.ones(3))
    assert out["image_token_mask"].sum(1).tolist() == [4, 4, 4]
    mask = (
        inputs["attention_mask"] if task != "multiple_choice" else inputs["attention_mask"][torch.arange(3), [0, 1, 2]]
    )
    assert out["text_token_mask"].sum(1).tolist() == (mask.sum(1) - 1).tolist()


def test_crossmodal_inputs_and_padded_images(tok):
    student = vilt(tok)
    inputs = student.processor()(vqa(2, sizes=[(32, 32), (48, 32)]))  # 2 x 2 and 2 x 3 patches
    assert inputs["pixel_values"].shape == (2, 3, 32, 48) and inputs["pixel_mask"].shape == (2, 32, 48)
    assert inputs["targets"]["answer_scores"][0].tolist() == [1.0, 0, 0, 0, 0, 0, 0, 0]
    out = student(inputs, {"task_logits"}).extra
    assert out["image_token_mask"].sum(1).tolist() == [4, 6]
    assert "cls_attention" not in out
    clone = pickle.loads(pickle.dumps(student.processor()))
    assert torch.equal(clone(vqa(2))["pixel_values"], student.processor()(vqa(2))["pixel_values"])
    mc = vilt(tok, "multiple_choice").processor()(choice(2, candidates=4))
    assert mc["input_ids"].shape[:2] == (2, 4)
    first = tok.decode(mc["input_ids"][1, 2], skip_special_tokens=True)
    assert first == "what shape is it triangle"


def test_crossmodal_set_trainable_moves_only_the_head(tok):
    student = vilt(tok)
    assert sorted(student.param_groups()) == ["embeddings", "encoder", "head", "pooler"]
    set_trainable(student, list(student.param_groups()))
    set_trainable(student, ["head"])
    before = snapshot(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    inputs = student.processor()(vqa(2))
    logits = student(inputs, VL_ALL).extra["task_logits"]
    torch.nn.functional.cross_entropy(logits, inputs["targets"]["answer"]).backward()
    optimizer.step()
    assert changed_groups(student, before) == ({"head"}, {"embeddings", "encoder", "pooler"})
    with pytest.raises(ValueError, match=r"\['embeddings', 'encoder', 'head', 'pooler'\]"):
        set_trainable(student, ["fusion"])


def test_crossmodal_vqa_export_loads_as_vilt_for_question_answering(tok, tmp_path):
    student = vilt(tok).eval()
    inputs = student.processor()(vqa(3))
    torch.manual_seed(1)  # ViLT draws its patch order at random
    expected = student(inputs, {"task_logits"}).extra["task_logits"]
    student.save_pretrained(tmp_path)
    qa = ViltForQuestionAnswering.from_pretrained(tmp_path).eval()
    assert [qa.config.id2label[i] for i in range(len(ANSWERS))] == ANSWERS
    keys = ("input_ids", "attention_mask", "pixel_values", "pixel_mask")
    torch.manual_seed(1)
    with torch.no_grad():
        torch.testing.assert_close(qa(**{k: inputs[k] for k in keys}).logits, expected)
    assert isinstance(ViltImageProcessorPil.from_pretrained(tmp_path), ViltImageProcessorPil)
    again = build_student("vilt", name_or_path=str(tmp_path)).eval()
    torch.manual_seed(1)
    torch.testing.assert_close(again(inputs, {"task_logits"}).extra["task_logits"], expected)


def test_crossmodal_from_a_checkpoint_path_and_head_export(tok, tmp_path):
    """A ViLT checkpoint given by path (as a hub id would be) with a new entailment head; saved and loaded back."""
    base = vilt(tok)
    base.vilt.save_pretrained(tmp_path / "tiny-vilt")
    base.tokenizer.save_pretrained(tmp_path / "tiny-vilt")
    base.image_processor.save_pretrained(tmp_path / "tiny-vilt")
    student = build_student("vilt", name_or_path=str(tmp_path / "tiny-vilt"), task="entailment").eval()
    inputs = student.processor()(entailment(2))
    torch.manual_seed(2)
    expected = student(inputs, VL_ALL).extra["task_logits"]
    assert expected.shape == (2, 3)
    student.save_pretrained(tmp_path / "student")
    assert not (tmp_path / "student" / "head.safetensors").exists()  # the head is the ViltForQuestionAnswering's
    again = CrossModalStudent.from_pretrained(tmp_path / "student").eval()
    torch.manual_seed(2)
    torch.testing.assert_close(again(inputs, VL_ALL).extra["task_logits"], expected)


def test_crossmodal_bad_inputs(tok):
    student = vilt(tok)
    bad = vqa(2)
    bad[0]["question"] = ""
    with pytest.raises(ValueError, match=r"sample 0: question is empty"):
        student.processor()(bad)
    with pytest.raises(ValueError, match="task 'vqa' got entailment samples"):
        student.processor()(entailment(2))
    with pytest.raises(ValueError, match="answer vocabulary"):
        build_student("test-vilt", tok, task="vqa")
    with pytest.raises(ValueError, match="task='caption'"):
        build_student("test-vilt", tok, task="caption")
    with pytest.raises(ValueError, match="unknown options"):
        build_student("test-vilt", tok, task="entailment", hidden=64)
    with pytest.raises(ValueError, match=r"needs student\.name_or_path"):
        build_student("vilt", task="entailment")
