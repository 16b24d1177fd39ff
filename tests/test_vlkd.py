"""VLKD (issue 10): the three objectives against hand-computed values, span corruption by epoch through the trainer
and its resume, cache vs live teacher, zero-shot VQA and captioning by generation, the text skill before and after,
the text-only reference LM, the export and ``vldistill generate``, and bad input. Tiny models built from configs."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import vldistill.train.loop as loop_mod
from helpers import T, assert_same_rows, benchmark_script, dims, read_metrics
from vldistill import cli
from vldistill.cache import read_manifest, weights_digest
from vldistill.config import ConfigError, GenerationConfig, load_recipe
from vldistill.data.easyvqa import COLORS
from vldistill.losses import LOSSES, build_loss, check_needs
from vldistill.models import load_teacher
from vldistill.outputs import Embeddings, StepOutputs
from vldistill.students import STUDENT_OUTPUTS, Seq2SeqProcessor, Seq2SeqStudent, build_student
from vldistill.students.seq2seq_inputs import corruption_generator, corruption_spans
from vldistill.tasks import get_task
from vldistill.tasks.generation import generative_predictor, infill
from vldistill.tasks.text_skill import denoising_skill
from vldistill.tokenization import train_wordpiece
from vldistill.train.fit import cache_recipe, fit_recipe, load_train_data
from vldistill.train.reference_lm import FAST, caption_words, qa_sentences, reference_lm_dir, text_corpus

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ["circle", "rectangle", "triangle"]


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok():
    corpus = [f"a {c} {s}" for c in COLORS for s in SHAPES] + ["question answer what color is the shape picture of"]
    return train_wordpiece(corpus * 2, vocab_size=200)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tok) -> Path:
    """A tiny CLIP saved as a Hugging Face checkpoint (embedding width 16, image tokens of width 32)."""
    directory = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    build_student("test-clip", tok).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return load_teacher(teacher_dir)


def image(i: int) -> Image.Image:
    return Image.new("RGB", (32, 32), color=(60 * i % 256, 90 * i % 256, 30 * i % 256))


def pairs(n: int) -> list[dict[str, Any]]:
    return [{"index": i, "image": image(i), "captions": {"en": f"a {COLORS[i % 8]} circle"}} for i in range(n)]


def vqa_items(n: int) -> list[dict[str, Any]]:
    return [
        {
            "index": i,
            "image": image(i),
            "kind": "vqa",
            "question": "what color is the shape?",
            "answers": [COLORS[i % 2]],
            "answer": COLORS[i % 2],
            "answer_index": i % 2,
            "question_type": "colour",
        }
        for i in range(n)
    ]


def bart(tok, teacher, **options) -> Seq2SeqStudent:
    torch.manual_seed(0)
    return build_student("test-bart", tok, teacher=teacher, **options)


# ------------------------------------------------------------------------------------------- losses by hand
def step(p, t_text=None, t_image=None, groups=None) -> StepOutputs:
    teacher = Embeddings(
        image=None if t_image is None else T(t_image), text={} if t_text is None else {"en": T(t_text)}
    )
    return StepOutputs(student=Embeddings(text={"en": p}), teachers=[teacher], groups=groups or {})


def test_the_three_objectives_are_registered_with_static_needs():
    assert {"ttdm", "itcl", "icti"} <= set(LOSSES.names())
    assert LOSSES.get("ttdm").needs_for() == {"teacher", "text"}
    assert LOSSES.get("itcl").needs_for() == {"teacher", "text"}
    assert LOSSES.get("icti").needs_for() == {"teacher", "lm_loss"}
    assert LOSSES.get("icti").needs_for(prefix="tokens") == {"teacher", "lm_loss", "teacher_image_tokens"}
    cfg = load_recipe("vlkd")
    seq2seq = STUDENT_OUTPUTS & {"text", "text_feature", "lm_loss"}
    check_needs(cfg.stages, frozenset(seq2seq), "seq2seq", STUDENT_OUTPUTS)  # nothing missing
    with pytest.raises(ConfigError, match=r"\(icti\): needs 'lm_loss' from the student, which a dual_encoder"):
        check_needs(cfg.stages, frozenset({"image", "text"}), "dual_encoder", STUDENT_OUTPUTS)


def test_ttdm_by_hand():
    # p = [[1, 0], [0, 2]]; t = [[3, 4], [0, -1]] -> norm(t) = [[0.6, 0.8], [0, -1]]
    # squared L2 per caption: 0.4^2 + 0.8^2 = 0.8 and 0 + 3^2 = 9 -> mean 4.9; L1: 1.2 and 3 -> 2.1
    d = dims((2, 2, 2), (2, 2, 2))
    p = T([[1.0, 0.0], [0.0, 2.0]], grad=True)
    out = step(p, [[3.0, 4.0], [0.0, -1.0]])
    loss, _ = build_loss("ttdm", d)(out)
    assert loss.item() == pytest.approx(4.9)
    assert build_loss("ttdm", d, norm="l1")(out)[0].item() == pytest.approx(2.1)
    assert build_loss("ttdm", d, reduction="mean")(out)[0].item() == pytest.approx(2.45)
    # normalize both: norm(p) = [[1, 0], [0, 1]] -> 0.8 and (1 + 1)^2 = 4 -> 2.4
    assert build_loss("ttdm", d, normalize="both")(out)[0].item() == pytest.approx(2.4)
    # none: [1-3, 0-4] -> 4 + 16 = 20; [0, 3] -> 9 -> 14.5
    assert build_loss("ttdm", d, normalize="none")(out)[0].item() == pytest.approx(14.5)
    loss.backward()
    torch.testing.assert_close(p.grad, T([[0.4, -0.8], [0.0, 3.0]]))  # d/dp mean_i ||p_i - t_i||^2 = (p - t)
    with pytest.raises(ValueError, match=r"norm='cosine' is not allowed"):
        build_loss("ttdm", d, norm="cosine")
    with pytest.raises(ValueError, match=r"student has no text embedding for language 'zh'"):
        build_loss("ttdm", d, lang="zh")(out)


def test_itcl_by_hand():
    d = dims((2, 2, 2), (2, 2, 2))
    p = T([[2.0, 0.0], [0.0, 3.0]], grad=True)  # normalised: the identity
    images = [[1.0, 0.0], [0.6, 0.8]]
    # logits = P V^T = [[1, 0.6], [0, 0.8]] (rows: texts), scale 1 (temperature 1)
    t2i = (math.log(1 + math.exp(-0.4)) + math.log(1 + math.exp(-0.8))) / 2
    i2t = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(-0.2))) / 2
    loss, parts = build_loss("itcl", d, temperature=1.0)(step(p, t_image=images))
    assert loss.item() == pytest.approx(0.5 * (t2i + i2t))
    assert parts["t2i"].item() == pytest.approx(t2i) and parts["i2t"].item() == pytest.approx(i2t)
    # two identical captions: the targets are uniform over both, in both directions
    same = {"en": torch.tensor([7, 7])}

    def soft(a: float, b: float) -> float:  # CE of logits (a, b) against the uniform target (1/2, 1/2)
        z = math.log(math.exp(a) + math.exp(b))
        return 0.5 * ((z - a) + (z - b))

    expected = 0.5 * ((soft(1, 0.6) + soft(0, 0.8)) / 2 + (soft(1, 0) + soft(0.6, 0.8)) / 2)
    assert build_loss("itcl", d, temperature=1.0)(step(p, t_image=images, groups=same))[0].item() == pytest.approx(
        expected
    )
    learnable = build_loss("itcl", d)
    assert learnable.logit_scale().item() == pytest.approx(1 / 0.07) and learnable.log_s.requires_grad


def test_icti_is_the_decoders_cross_entropy_on_the_span_corrupted_caption(tok, teacher):
    student = bart(tok, teacher).eval()
    batch = pairs(4)
    inputs = student.processor()(batch)
    v = torch.randn(4, teacher.dims.embed, generator=torch.Generator().manual_seed(3))
    out = student(inputs, {"lm_loss", "text"}, Embeddings(image=v))
    loss, _ = build_loss("icti", dims((16, 32, 32), (16, 32, 32)))(StepOutputs(student=out))
    # by hand: prefix = W_v norm(v); encoder input = [prefix; embed(corrupted ids)]; CE of the clean caption tokens
    lm = inputs["lm"]
    prefix = student.prefix_projection(F.normalize(v, dim=-1)).view(4, 1, -1)
    embeds = torch.cat([prefix, student.model.get_input_embeddings()(lm["input_ids"])], dim=1)
    mask = torch.cat([torch.ones(4, 1, dtype=torch.long), lm["attention_mask"]], dim=1)
    logits = student.model(inputs_embeds=embeds, attention_mask=mask, labels=lm["labels"]).logits
    keep = lm["labels"] != -100
    by_hand = -logits.log_softmax(-1)[keep].gather(1, lm["labels"][keep][:, None]).mean()
    torch.testing.assert_close(loss, by_hand)
    torch.testing.assert_close(loss, out.extra["lm_loss"])
    # the encoder's caption is the clean one with one mask per span (spans over ~30% of the words)
    special = set(tok.all_special_ids) - {tok.mask_token_id}
    for row, sample in enumerate(batch):
        clean = lm["labels"][row][keep[row]].tolist()
        spans = corruption_spans(clean, 0.3, 3.0, corruption_generator(0, sample["index"], 0), special)
        corrupted = lm["input_ids"][row][lm["attention_mask"][row].bool()].tolist()
        assert corrupted.count(tok.mask_token_id) == len(spans) >= 1
        assert sum(spans.values()) == round(0.3 * sum(t not in special for t in clean))
    with pytest.raises(ValueError, match=r"prefix='patches' is not allowed"):
        build_loss("icti", dims((16, 32, 32), (16, 32, 32)), prefix="patches")


# ------------------------------------------------------------------------------------ corruption and resume
class Crash(Exception):
    """Stands in for a killed process."""


def _record_corruption(monkeypatch) -> list[tuple[tuple[int, ...], tuple[int, ...], list[list[int]]]]:
    seen = []
    real = Seq2SeqProcessor.__call__

    def spy(self, samples):
        out = real(self, samples)
        ids = [
            row[mask.bool()].tolist()
            for row, mask in zip(out["lm"]["input_ids"], out["lm"]["attention_mask"], strict=True)
        ]
        seen.append((tuple(s["index"] for s in samples), tuple(s.get("epoch", -1) for s in samples), ids))
        return out

    monkeypatch.setattr(Seq2SeqProcessor, "__call__", spy)
    return seen


def _crash_after(monkeypatch, k: int) -> None:
    count, real_tqdm = itertools.count(1), loop_mod.tqdm

    def tqdm(*args, **kwargs):
        bar = real_tqdm(*args, **kwargs)
        update = bar.update

        def crashing(n: int = 1):
            if next(count) == k:
                raise Crash(f"killed after step {k}")
            return update(n)

        bar.update = crashing
        return bar

    monkeypatch.setattr(loop_mod, "tqdm", tqdm)


def fit_args(teacher_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "vlkd", "--tiny", "--teacher", str(teacher_dir), "--output", str(out), *extra]


def test_span_corruption_changes_by_epoch_and_a_resumed_run_corrupts_the_same_way(tmp_path, monkeypatch, teacher_dir):
    # 32 pairs in batches of 8: 4 steps per epoch, so the 6 steps cover epochs 0 and 1
    extra = ("--stages.0.steps", "6", "--train.checkpoint_every", "2", "--data.eval", "null", "--train.log_every", "1")
    seen_a = _record_corruption(monkeypatch)
    assert cli.main(fit_args(teacher_dir, tmp_path / "a", *extra)) == 0
    assert [epochs for _, epochs, _ in seen_a] == [(e,) * 8 for e in (0, 0, 0, 0, 1, 1)]
    by_epoch = {
        (i, e): ids for indices, epochs, rows in seen_a for i, e, ids in zip(indices, epochs, rows, strict=True)
    }
    again = [i for i, e in by_epoch if e == 1]  # the 16 samples of epoch 1's two steps
    changed = [i for i in again if by_epoch[(i, 0)] != by_epoch[(i, 1)]]
    assert len(again) == 16 and len(changed) >= 8, "a second epoch corrupts the captions anew"

    monkeypatch.undo()
    _crash_after(monkeypatch, 3)
    AcceleratorState._reset_state(True)
    with pytest.raises(Crash):
        cli.main(fit_args(teacher_dir, tmp_path / "b", *extra))
    monkeypatch.undo()
    seen_b = _record_corruption(monkeypatch)
    AcceleratorState._reset_state(True)
    assert cli.main(fit_args(teacher_dir, tmp_path / "b", *extra, "--resume")) == 0
    assert seen_b == seen_a[2:]  # resumed from the step-2 checkpoint: the same batches, corrupted the same way
    a = load_file(tmp_path / "a" / "student" / "projections.safetensors")
    b = load_file(tmp_path / "b" / "student" / "projections.safetensors")
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=1e-6, atol=1e-7)
    assert_same_rows(read_metrics(tmp_path / "b"), read_metrics(tmp_path / "a"))


# --------------------------------------------------------------------------------------- cache and live teacher
@pytest.mark.parametrize("prefix", ["pooled", "tokens"])
def test_cache_and_live_teacher_give_the_same_losses(tmp_path, teacher_dir, prefix):
    def config(out: Path, cached: bool):
        overrides = {
            "teacher.name_or_path": str(teacher_dir),
            "student.overrides.prefix": prefix,
            "stages.0.losses.2.prefix": prefix,
            "stages.0.steps": 3,
            "data.eval": None,
            "train.output_dir": str(out),
            "train.log_every": 1,
            "cache.workers": 0,
        }
        if cached:
            overrides.update({"teacher.source": "cache", "teacher.cache": str(tmp_path / "cache")})
        return load_recipe("vlkd", overrides, tiny=True)

    live = fit_recipe(config(tmp_path / "live", False))
    AcceleratorState._reset_state(True)
    cfg = config(tmp_path / "cached", True)
    cache_recipe(cfg)
    # the icti term with prefix: tokens asked the cache for the teacher's patch tokens
    assert read_manifest(tmp_path / "cache")["tokens"] == (prefix == "tokens")
    AcceleratorState._reset_state(True)
    cached = fit_recipe(cfg)
    rows = read_metrics(tmp_path / "cached")
    assert {"ttdm_en", "itcl_en", "icti"} <= set(rows[-1])
    assert_same_rows(rows, read_metrics(tmp_path / "live"))
    assert live["final"]["icti"] == pytest.approx(cached["final"]["icti"], rel=1e-5)


def test_a_token_prefix_without_tokens_from_the_teacher_says_what_to_set(tmp_path, teacher_dir):
    overrides = {"teacher.name_or_path": str(teacher_dir), "student.overrides.prefix": "tokens"}
    cfg = load_recipe("vlkd", {**overrides, "data.eval": None, "train.output_dir": str(tmp_path)}, tiny=True)
    with pytest.raises(ValueError, match=r"image tokens .*icti loss's option prefix: tokens"):
        fit_recipe(cfg)


# ------------------------------------------------------------------------------------ generation and tasks
def test_infill_takes_the_fill_of_the_mask(tok):
    def decoded(text: str) -> str:  # how the LM's output reads: as its tokenizer decodes it
        return tok.decode(tok(text)["input_ids"], skip_special_tokens=True)

    before = "Question: what color is the shape? Answer: "
    # a BART-style LM writes the prompt back with the mask filled in
    assert infill(decoded("Question: what color is the shape? Answer: red"), before, "", tok) == "red"
    assert infill("red", before, "", tok) == "red"  # a T5-style LM writes only the fill
    rephrased = decoded("Question: what colour is it? Answer: dark red")
    assert infill(rephrased, before, "", tok) == "dark red"  # the anchor "answer" is found
    assert infill(decoded("A picture of a red circle."), "A picture of ", ".", tok) == "a red circle"
    assert infill("a plate of red", "A picture of ", "", tok) == "a plate of red"  # "of" alone is no anchor


def test_generation_is_batched_with_the_recipes_settings_and_scored_by_the_tasks(tok, teacher, monkeypatch):
    student = bart(tok, teacher)
    calls = []
    real = student.model.generate

    def spy(**kwargs):
        calls.append(
            {k: kwargs[k] for k in ("num_beams", "max_new_tokens", "no_repeat_ngram_size")}
            | {"batch": kwargs["inputs_embeds"].shape[0]}
        )
        return real(**kwargs)

    monkeypatch.setattr(student.model, "generate", spy)
    gen = GenerationConfig(num_beams=2, max_new_tokens=5)
    captions = get_task("captioning").evaluate(
        generative_predictor(student, teacher, "captioning", gen), pairs(6), batch_size=4
    )
    assert calls == [
        {"num_beams": 2, "max_new_tokens": 5, "no_repeat_ngram_size": 0, "batch": 4},
        {"num_beams": 2, "max_new_tokens": 5, "no_repeat_ngram_size": 0, "batch": 2},
    ]
    assert set(captions) == {"bleu4", "cider", "count"} and captions["count"] == 6

    # the answer is what fills the mask; the task normalises and scores it, per question type
    monkeypatch.setattr(
        Seq2SeqStudent,
        "generate",
        lambda self, image, prompts, **kw: ["question : what color is it? answer : Red"] * len(prompts),
    )
    result = get_task("vqa").evaluate(generative_predictor(student, teacher, "vqa"), vqa_items(4), batch_size=4)
    assert result["accuracy"] == pytest.approx(0.5) and result["by_type"] == {"colour": 0.5}


def test_text_skill_scores_the_hidden_tokens_only(tok):
    texts = ["a red circle on a light background", "there is a blue triangle", "a green rectangle shape"]

    class Oracle(torch.nn.Module):
        """Predicts every label token (or, wrong, the next id)."""

        def __init__(self, shift: int = 0):
            super().__init__()
            self.w, self.shift = torch.nn.Parameter(torch.zeros(1)), shift

        def forward(self, input_ids, attention_mask, labels):
            target = labels.clamp(min=0) + self.shift
            return type("Out", (), {"logits": F.one_hot(target, len(tok)).float() * 50})

    right = denoising_skill(Oracle(), tok, texts)
    special = set(tok.all_special_ids) - {tok.mask_token_id}
    ids = tok(texts)["input_ids"]
    hidden = sum(
        sum(corruption_spans(x, 0.3, 3.0, corruption_generator(0, i, 0), special).values()) for i, x in enumerate(ids)
    )
    assert right["masked_tokens"] == hidden and right["masked_token_accuracy"] == 1.0
    assert right["masked_token_perplexity"] == pytest.approx(1.0)
    assert denoising_skill(Oracle(shift=1), tok, texts)["masked_token_accuracy"] == 0.0
    with pytest.raises(ValueError, match="held-out text 1 is empty"):
        denoising_skill(Oracle(), tok, ["a red circle", " "])


# ------------------------------------------------------------------------------------------- the bundled run
def test_reference_lm_sees_text_only_is_cached_and_keeps_its_text_skill_report(tmp_path, teacher_dir, capsys):
    train = load_train_data(load_recipe("vlkd", {"data.limit_train": 64}).data)
    captions = [s.captions["en"] for s in train.dataset.samples]
    items = text_corpus(captions)
    assert {item.kind for item in items} == {"caption", "picture", "qa"}
    for item in items:  # every sentence is built from a training caption's own words
        assert item.kind == "picture" or any(item.text.startswith(c) for c in captions)
        if item.kind == "qa":
            colour, _ = caption_words(item.text.split(" question: ")[0])
            question = item.text.split(" question: ")[1].split(" answer: ")[0]
            if "color" in question and "is there" not in question:
                assert item.answer == colour
    import random

    assert [q.answer for q in qa_sentences("a red circle", random.Random(0))][:2] == ["red", "circle"]
    lm = reference_lm_dir(FAST, tmp_path / "lms", captions, log=print)
    saw = json.loads((lm.parent / "saw.json").read_text())
    assert saw["captions"] == 64 and saw["never"].startswith("no image")
    capsys.readouterr()
    assert reference_lm_dir(FAST, tmp_path / "lms", captions, log=print) == lm
    assert "reusing" in capsys.readouterr().out
    assert AutoModelForSeq2SeqLM.from_pretrained(lm).config.model_type == "bart"

    # aligned with VLKD on image-caption pairs only, evaluated zero-shot, text skill side by side
    out = tmp_path / "run"
    args = ["fit", "vlkd", "--teacher", str(teacher_dir), "--student.name_or_path", str(lm), "--output", str(out)]
    args += ["--stages.0.steps", "2", "--train.batch_size", "8", "--data.limit_train", "16", "--data.limit_eval", "4"]
    args += ["--eval.generation.max_new_tokens", "6", "--train.progress", "false", "--train.tensorboard", "false"]
    assert cli.main(args) == 0
    result = json.loads((out / "eval.json").read_text())
    assert set(result) >= {"captioning", "vqa", "text_skill", "generation"}
    assert result["vqa"]["count"] > 0 and set(result["vqa"]["by_type"]) <= {"yes_no", "colour", "shape"}
    skill = result["text_skill"]
    assert skill["before"]["texts"] == skill["after"]["texts"] == 4 and skill["before"]["masked_tokens"] > 0
    assert "before" in capsys.readouterr().out


# --------------------------------------------------------------------------------- real checkpoints, export
@pytest.fixture(scope="module")
def user_files(tmp_path_factory, tok) -> dict[str, Path]:
    """The user's own image-caption and VQA files, and a tiny BART saved as a checkpoint (as a hub id would be)."""
    root = tmp_path_factory.mktemp("user")
    (root / "imgs").mkdir()
    pairs_rows, vqa_rows = [], []
    for i in range(12):
        colour = ["red", "blue"][i % 2]
        Image.new("RGB", (32, 32), (200, 20, 20) if colour == "red" else (20, 20, 200)).save(root / "imgs" / f"{i}.png")
        pairs_rows.append({"image": f"imgs/{i}.png", "caption": f"a {colour} circle"})
        vqa_rows.append({"image": f"imgs/{i}.png", "question": "what color is the shape?", "answer": colour})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs_rows))
    (root / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vqa_rows))
    torch.manual_seed(0)
    lm = build_student("test-bart", tok, teacher_width=16, teacher_image_width=32)
    lm.model.save_pretrained(root / "bart")
    tok.save_pretrained(root / "bart")
    return {"root": root, "pairs": root / "pairs.jsonl", "vqa": root / "vqa.jsonl", "lm": root / "bart"}


@pytest.fixture(scope="module")
def export(tmp_path_factory, teacher_dir, user_files) -> Path:
    AcceleratorState._reset_state(True)
    out = tmp_path_factory.mktemp("real")
    args = ["fit", "vlkd", "--teacher", str(teacher_dir), "--student", str(user_files["lm"]), "--output", str(out)]
    args += ["--data.train", str(user_files["pairs"]), "--data.eval", str(user_files["pairs"])]
    args += ["--eval.vqa", str(user_files["vqa"])]
    args += ["--stages.0.steps", "2", "--train.batch_size", "4", "--train.progress", "false"]
    args += [
        "--train.tensorboard",
        "false",
        "--eval.generation.max_new_tokens",
        "6",
        "--eval.generation.num_beams",
        "2",
    ]
    assert cli.main(args) == 0
    return out / "student"


def test_real_checkpoints_by_path_and_the_export(export, teacher_dir, teacher, tok):
    assert sorted(p.name for p in export.iterdir()) == [
        "README.md", "lm", "projections.safetensors", "teacher.json", "vldistill.json",
    ]  # fmt: skip
    card = json.loads((export / "teacher.json").read_text())
    assert card["teacher"]["id"] == str(teacher_dir.resolve())
    assert card["teacher"]["weights_sha256"] == weights_digest(teacher.model)
    assert card["generation"]["num_beams"] == 2
    assert set(load_file(export / "projections.safetensors")) == {
        "text_projection.weight", "prefix_projection.weight", "prefix_projection.bias",
    }  # fmt: skip
    # the LM loads with transformers alone and is still a text model: it denoises text without any image
    lm, lm_tok = AutoModelForSeq2SeqLM.from_pretrained(export / "lm"), AutoTokenizer.from_pretrained(export / "lm")
    ids = lm.generate(**lm_tok(["a red [MASK]"], return_tensors="pt"), max_new_tokens=4)
    assert isinstance(lm_tok.batch_decode(ids, skip_special_tokens=True)[0], str)
    assert 0 <= denoising_skill(lm, lm_tok, ["a red circle", "a blue circle"])["masked_token_accuracy"] <= 1
    eval_json = json.loads((export.parent / "eval.json").read_text())
    assert eval_json["vqa"]["count"] == 12 and eval_json["generation"]["num_beams"] == 2
    card = (export / "README.md").read_text()
    bleu = eval_json["captioning"]["bleu4"]
    assert "captioning.bleu4" in card and f"{bleu:.4f}" in card  # the card carries the measured numbers


def test_generate_answers_and_captions_from_the_export(export, user_files, capsys):
    image = user_files["root"] / "imgs" / "0.png"
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(export), "--image", str(image), "--question", "what color?"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["task"] == "vqa" and isinstance(answer["answer"], str)
    assert answer["prompt"] == "Question: what color? Answer: [MASK]"
    assert answer["generation"]["num_beams"] == 2 and answer["generation"]["max_new_tokens"] == 6
    assert cli.main(["generate", "--model", str(export), "--image", str(image), "--num-beams", "1"]) == 0
    caption = json.loads(capsys.readouterr().out)
    assert caption["task"] == "captioning" and "caption" in caption and caption["generation"]["num_beams"] == 1


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_a_clear_error_naming_what_and_where(export, user_files, tmp_path, tok, capsys):
    image = user_files["root"] / "imgs" / "0.png"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    other = tmp_path / "wide-teacher"
    torch.manual_seed(1)
    build_student("test-clip", tok, projection_dim=24).save_pretrained(other)

    def error(*args: str) -> str:
        capsys.readouterr()
        assert cli.main(["generate", "--model", str(export), *args]) == 2
        return capsys.readouterr().err

    assert f"--image {broken}: cannot read the image" in error("--image", str(broken))
    assert f"--image {tmp_path / 'none.png'}: no such file" in error("--image", str(tmp_path / "none.png"))
    assert "--question is empty" in error("--image", str(image), "--question", "  ")
    long = error("--image", str(image), "--question", "is it red " * 40)
    assert "--question: the prompt is" in long and "the LM reads at most 32" in long
    wide = error("--image", str(image), "--teacher", str(other))
    assert f"teacher {other} gives a pooled image embedding of width 24" in wide and "expects width 16" in wide
    torch.manual_seed(2)
    build_student("test-clip", tok).save_pretrained(tmp_path / "retrained")  # the same widths, other weights
    moved = error("--image", str(image), "--teacher", str(tmp_path / "retrained"))
    assert f"teacher {tmp_path / 'retrained'}: its weights hash" in moved and "was aligned to" in moved

    with pytest.raises(ConfigError, match=r"eval\.generation\.vqa_template = 'Q: \{question\}': must contain \{mask\}"):
        load_recipe("vlkd", {"eval.generation.vqa_template": "Q: {question}"})

    # the same checks in the library, naming the sample
    student, teacher = Seq2SeqStudent.from_pretrained(export), load_teacher(other)
    with pytest.raises(ValueError, match=r"the teacher gives a pooled image embedding of width 24"):
        generative_predictor(student, teacher, "vqa")
    own = load_teacher(json.loads((export / "teacher.json").read_text())["teacher"]["id"])
    items = vqa_items(3)
    items[2]["question"] = ""
    with pytest.raises(ValueError, match=r"sample 2: the question is empty"):
        generative_predictor(student, own, "vqa")(items)
    items[2]["question"] = "is it red " * 40
    with pytest.raises(ValueError, match=r"sample 2: the prompt is \d+ tokens long"):
        generative_predictor(student, own, "vqa")(items)
    with pytest.raises(ValueError, match="not 'entailment'"):
        generative_predictor(student, own, "entailment")


# ------------------------------------------------------------------------------------------------ benchmark
def test_benchmark_smoke_writes_the_issues_shape(tmp_path):
    with benchmark_script("vlkd") as module:
        module.main(["--smoke", "--output", str(tmp_path), "--lm-cache", str(tmp_path / "lms")])
    result = json.loads((tmp_path / "vlkd.json").read_text())
    assert list(result["rows"]) == ["answer_prior", "question_only", "no_ttdm", "no_itcl", "no_icti", "vlkd"]
    for name, row in result["rows"].items():
        assert set(row) == {"vqa", "bleu4", "cider", "text_skill", "wall_seconds"}
        assert set(row["vqa"]) == {"overall", "yes_no", "colour", "shape"}
        for figure in (row["vqa"]["overall"], row["bleu4"], row["cider"]):
            assert set(figure) == {"mean", "std"} and 0 <= figure["mean"] <= (10 if figure is row["cider"] else 1)
        assert (row["text_skill"] is None) == (name == "answer_prior")
    assert set(result["text_skill_before"]) == {"mean", "std"} and result["text_skill_name"]
    assert result["setup"]["seeds"] == [0] and {"teacher", "lm", "machine"} <= set(result["setup"])
