"""CLIP-TD and MAD through the program: the cliptd-* and mad-vqa recipes in their tiny modes with a tiny CLIP teacher
saved as a Hugging Face directory, the export (a VQA student answers with ``transformers`` alone), real-checkpoint
paths (``--teacher DIR --student DIR``), the teacher-output cache against the live teacher, and bad input refused
before training. Tiny models built from configs; never downloads."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, CLIPModel, ViltConfig, ViltForQuestionAnswering, ViltModel

from helpers import assert_same_rows, read_metrics
from vldistill.batching import teacher_texts
from vldistill.cli import main
from vldistill.config import load_recipe
from vldistill.data.sources import load_data, load_task_data
from vldistill.students import build_student, load_student
from vldistill.students.crossmodal import vilt_image_processor
from vldistill.tasks.predict import task_predictor
from vldistill.tokenization import train_wordpiece
from vldistill.train.fit import load_train_data, tokenizer_corpus
from vldistill.train.mad import AdaptationPairs

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

QUIET = ["--train.progress", "false", "--train.tensorboard", "false", "--train.log_every", "1"]
BUNDLED = {"vqa": "bundled:easyvqa-vqa", "entailment": "bundled:easyvqa-entailment", "mc": "bundled:easyvqa-mc"}
RECIPE_TASK = {"cliptd-vqa": "vqa", "cliptd-ve": "entailment", "cliptd-mc": "mc"}


def _task_texts() -> list[str]:
    texts = []
    for source, kind in (("vqa", "vqa"), ("entailment", "entailment"), ("mc", "multiple_choice")):
        data = load_task_data(BUNDLED[source], kind, split="train", limit=64)
        for sample in data.samples:
            texts += [t for v in teacher_texts(sample).values() for t in ([v] if isinstance(v, str) else v)]
    return texts


@pytest.fixture(scope="module")
def tokenizer():
    pairs = load_data("bundled:easyvqa", "train", ["en"], limit=128)
    return train_wordpiece(tokenizer_corpus(pairs, ["en"]) + _task_texts(), vocab_size=400)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny English CLIP (24-d embeddings) saved with save_pretrained: what --teacher openai/clip-... loads."""
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("teacher") / "clip"
    build_student("test-clip", tokenizer, projection_dim=24).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher_dir):
    """The tiny live runs of the three cliptd recipes, made on first use."""
    done: dict[str, Path] = {}

    def run(recipe: str) -> Path:
        if recipe not in done:
            out = tmp_path_factory.mktemp(recipe) / "run"
            assert main(["fit", recipe, "--tiny", "--teacher", str(teacher_dir), "--output", str(out), *QUIET]) == 0
            done[recipe] = out
        return done[recipe]

    return run


# ----------------------------------------------------------------------------------------------------------------------
# The recipes


@pytest.mark.parametrize("recipe", ["cliptd-vqa", "cliptd-ve", "cliptd-mc"])
def test_cliptd_recipe_tiny_mode_adds_clip_td_to_the_task_loss(runs, recipe):
    out = runs(recipe)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        for key in ("task", "clip_td", "clip_td/visual", "clip_td/text", "clip_td/w", "loss"):
            assert math.isfinite(row[key]), (key, row)
        assert 0.0 <= row["clip_td/w"] <= 1.0
        assert row["loss"] == pytest.approx(row["task"] + row["clip_td"], rel=1e-4)  # lambda = weight 1
    result = json.loads((out / "eval.json").read_text())
    headline = result["student"].get("accuracy", result["student"].get("q2a"))
    assert 0.0 <= headline <= 1.0 and result["split"]["low_shot"] == 0.5
    if recipe == "cliptd-mc":  # VCR's three: Q->A, QA->R given the right answer, Q->AR; the teacher's zero-shot too
        for who in ("student", "teacher"):
            scores = result[who]
            assert {"q2a", "qa2r", "q2ar", "count"} == set(scores) and scores["count"] == 16
            assert scores["q2ar"] <= min(scores["q2a"], scores["qa2r"])
    # the projection heads are trained and checkpointed with the run, never exported with the student
    latest = (out / "checkpoints" / "latest").read_text().strip()
    weights = load_file(out / "checkpoints" / latest / "module.safetensors")
    assert {"loss.losses.clip_td.proj_v.weight", "loss.losses.clip_td.proj_t.weight"} <= set(weights)
    exported = set(load_file(out / "student" / "model.safetensors"))
    assert not any("proj_v" in k or "proj_t" in k for k in exported)
    student = load_student(out / "student")
    assert student.kind == "crossmodal" and student.task == {"vqa": "vqa", "entailment": "entailment"}.get(
        RECIPE_TASK[recipe], "multiple_choice"
    )
    # every task's export is a ViltForQuestionAnswering whose classifier is the student's head
    labels = ViltForQuestionAnswering.from_pretrained(out / "student").config.id2label
    expected = {"entailment": ["entailment", "neutral", "contradiction"], "mc": ["score"]}.get(RECIPE_TASK[recipe])
    assert [labels[i] for i in range(len(labels))] == (expected or student.labels)


def test_the_vqa_student_answers_with_transformers_alone(runs):
    """`pipeline("visual-question-answering")` is gone from transformers 5 (its task was removed), so the README shows
    these lines: the saved ViltForQuestionAnswering and its processor answer exactly as the trained student."""
    directory = runs("cliptd-vqa") / "student"
    test = load_task_data(BUNDLED["vqa"], "vqa", split="test", limit=6)
    items = [test[i] for i in range(len(test))]
    expected = task_predictor(load_student(directory), "vqa")(items)

    processor = AutoProcessor.from_pretrained(directory)
    model = ViltForQuestionAnswering.from_pretrained(directory).eval()
    answers = []
    for item in items:
        inputs = processor(images=item["image"], text=item["question"], return_tensors="pt")
        with torch.no_grad():
            answers.append(model.config.id2label[model(**inputs).logits.argmax(-1).item()])
    assert answers == expected
    assert set(model.config.id2label.values()) >= {"red", "circle", "yes"}


def test_mad_vqa_adapts_the_teacher_then_distils_the_adapted_one(tmp_path, teacher_dir, capsys):
    out = tmp_path / "mad"
    assert main(["fit", "mad-vqa", "--tiny", "--teacher", str(teacher_dir), "--output", str(out), *QUIET]) == 0
    printed = capsys.readouterr().out
    assert "zero-shot task accuracy before / after adaptation" in printed
    adapt = json.loads((out / "adapt.json").read_text())
    assert adapt["teacher"] == str(teacher_dir) and adapt["field"] == "qa" and adapt["steps"] == 2
    assert adapt["pairs"] == 32  # the tiny training split: half (low_shot 0.5) of 64 questions, no test question
    for when in ("before", "after"):
        zs = adapt["zero_shot"][when]
        assert 0.0 <= zs["accuracy"] <= 1.0 and zs["count"] == 32
    # the adapted teacher is a Hugging Face CLIP that differs from the original, and it is the one distilled
    adapted = CLIPModel.from_pretrained(out / "adapted-teacher")
    original = CLIPModel.from_pretrained(teacher_dir)
    assert not torch.equal(adapted.visual_projection.weight, original.visual_projection.weight)
    assert adapt["adapted_teacher"] == str(out / "adapted-teacher")
    # the run's config is the recipe as given; the teacher the stages distilled and evaluated is the adapted one
    config = json.loads((out / "config.json").read_text())
    assert config["adapt"]["steps"] == 2 and config["teachers"][0]["name_or_path"] == str(teacher_dir)
    assert json.loads((out / "eval.json").read_text())["teacher"] == adapt["zero_shot"]["after"]
    assert {"task", "clip_td", "clip_td/w"} <= set(read_metrics(out)[-1])
    assert read_metrics(out / "adapt")[-1]["step"] == 2
    assert not (out / "adapt" / "checkpoints").exists()  # a copy of the teacher and its optimiser: removed
    # --resume reuses the complete adapted teacher
    assert (
        main(["fit", "mad-vqa", "--tiny", "--teacher", str(teacher_dir), "--output", str(out), "--resume", *QUIET]) == 0
    )
    assert torch.equal(
        CLIPModel.from_pretrained(out / "adapted-teacher").visual_projection.weight, adapted.visual_projection.weight
    )


def test_mad_on_entailment_adapts_on_entailed_hypotheses_only_and_has_no_zero_shot(tmp_path, teacher_dir):
    out = tmp_path / "mad-ve"
    data = ["--data.train", BUNDLED["entailment"], "--data.eval", BUNDLED["entailment"], "--data.task", "entailment"]
    args = ["fit", "mad-vqa", "--tiny", "--teacher", str(teacher_dir), "--output", str(out), *data, *QUIET]
    assert main([*args, "--adapt.batch_size", "4", "--baseline"]) == 0
    adapt = json.loads((out / "adapt.json").read_text())
    assert adapt["field"] == "hypothesis"
    result = json.loads((out / "eval.json").read_text())  # --baseline: the same student without any teacher
    assert 0.0 <= result["baseline"]["accuracy"] <= 1.0 and "accuracy" in result["gain_points"]
    assert "clip_td" not in read_metrics(out / "baseline")[-1]
    train = load_task_data(BUNDLED["entailment"], "entailment", split="train", limit=64)
    entailed = sum(s.label == 0 for s in train.samples)
    assert 0 < adapt["pairs"] < entailed  # the entailed ones of the low-shot half
    for when in ("before", "after"):
        assert "cannot answer the 'entailment' task" in adapt["zero_shot"][when]["not_applicable"]


def test_adaptation_pairs_are_the_right_texts():
    mc = load_task_data(BUNDLED["mc"], "multiple_choice", split="train", limit=4)
    pairs = AdaptationPairs(mc, "multiple_choice")
    for i in range(len(pairs)):
        item = mc[i]
        right = teacher_texts(item)["candidates"][item["answer_index"]]
        assert pairs[i]["captions"] == {"qa": right}
        assert right == f"{item['question']} {item['candidates'][item['answer_index']]}"
    vqa = load_task_data(BUNDLED["vqa"], "vqa", split="train", limit=4)
    assert [AdaptationPairs(vqa, "vqa")[i]["captions"]["qa"] for i in range(4)] == [
        teacher_texts(vqa[i])["qa"] for i in range(4)
    ]
    ve = load_task_data(BUNDLED["entailment"], "entailment", split="train", limit=12)
    kept = AdaptationPairs(ve, "entailment")
    assert len(kept) == sum(s.label == 0 for s in ve.samples) > 0
    assert all(kept.data[r]["label"] == 0 for r in kept.rows)


# ----------------------------------------------------------------------------------------------------------------------
# Real checkpoints: a ViLT and a CLIP saved with save_pretrained, given as --student DIR and --teacher DIR


@pytest.fixture(scope="module")
def vilt_dir(tmp_path_factory, tokenizer) -> Path:
    """A ViLT checkpoint as the hub has them (model, tokenizer, image processor), 48 wide: not vilt-small's 128."""
    torch.manual_seed(3)
    config = ViltConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=96,
        image_size=32,
        patch_size=16,
        max_position_embeddings=40,
    )
    path = tmp_path_factory.mktemp("vilt") / "vilt"
    ViltModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    vilt_image_processor(32, 16).save_pretrained(path)
    return path


@pytest.mark.parametrize("recipe", ["cliptd-vqa", "cliptd-mc"])
def test_a_recipe_runs_on_real_checkpoints_given_by_path(tmp_path, teacher_dir, vilt_dir, recipe):
    out = tmp_path / "run"
    args = ["fit", recipe, "--tiny", "--teacher", str(teacher_dir), "--student", str(vilt_dir), "--output", str(out)]
    assert main([*args, *QUIET]) == 0
    student = load_student(out / "student")
    assert student.vilt.config.hidden_size == 48  # the checkpoint, not vilt-small
    assert {"task", "clip_td"} <= set(read_metrics(out)[-1])
    if recipe == "cliptd-vqa":
        assert ViltForQuestionAnswering.from_pretrained(out / "student").config.hidden_size == 48


def test_student_flag_on_a_preset_without_checkpoints_is_refused(tmp_path, teacher_dir, vilt_dir, capsys):
    args = ["fit", "clipkd", "--tiny", "--teacher", str(teacher_dir), "--student", str(vilt_dir)]
    assert main([*args, "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--student: preset 'clip-tiny' takes no checkpoint; presets that do:" in err and "vilt-small" in err
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------------------------------
# The teacher-output cache


@pytest.mark.parametrize("recipe", ["cliptd-vqa", "cliptd-mc"])
def test_a_cache_gives_the_live_teachers_losses(tmp_path, teacher_dir, runs, recipe):
    """`vldistill cache RECIPE` then `fit RECIPE --teacher.source cache`: every logged loss (clip_td's confidence from
    the cached candidates included) equals the live run's."""
    common = [recipe, "--tiny", "--teacher", str(teacher_dir), *QUIET]
    cache, out = tmp_path / "cache", tmp_path / "run"
    assert main(["cache", *common, "--output", str(cache), "--workers", "0"]) == 0
    assert main(["fit", *common, "--output", str(out), "--teacher.source", "cache", "--teacher.cache", str(cache)]) == 0
    live = read_metrics(runs(recipe))
    assert {"clip_td", "clip_td/w"} <= set(live[0])
    assert_same_rows(read_metrics(out), live, rel=1e-4)
    if recipe == "cliptd-mc":  # one row per Q->A and per QA->R sample, both with C candidates in one field
        items = load_train_data(load_recipe(recipe, tiny=True).data).dataset
        dataset = json.loads((cache / "manifest.json").read_text())["dataset"]
        assert dataset["rows"] == 2 * len(items) and sorted(dataset["fields"]) == ["candidates", "question"]


def test_mad_cannot_read_a_cache(tmp_path, teacher_dir, capsys):
    args = ["fit", "mad-vqa", "--tiny", "--teacher", str(teacher_dir), "--output", str(tmp_path / "x")]
    assert main([*args, "--teacher.source", "cache", "--teacher.cache", str(tmp_path / "c")]) == 2
    assert "adapt: MAD adapts the recipe's first teacher and distils the adapted one" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# Bad input, refused before training


def test_clip_td_on_a_dual_encoder_student_names_the_loss_and_the_missing_outputs(tmp_path, teacher_dir, capsys):
    recipe = {
        "name": "bad",
        "teacher": {"name_or_path": str(teacher_dir)},
        "student": {"preset": "test-clip", "vocab_size": 300},
        "data": {"train": BUNDLED["vqa"], "eval": None, "task": "vqa", "languages": ["qa"], "limit_train": 32},
        "stages": [{"steps": 2, "losses": [{"name": "clip", "langs": ["qa"]}, {"name": "clip_td"}]}],
        "train": {"batch_size": 8, "progress": False, "tensorboard": False},
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["fit", str(path), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    expected = (
        "stages.0.losses.1 (clip_td): needs 'cls_attention', 'token_states' from the student, which a dual_encoder "
        "student does not provide"
    )
    assert expected in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _write_manifest(tmp_path: Path, rows: list[dict]) -> Path:
    for i in range(3):
        Image.new("RGB", (32, 32), (60 * i, 30, 200 - 60 * i)).save(tmp_path / f"img{i}.png")
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("recipe", "rows", "message"),
    [
        (
            "cliptd-ve",
            [
                {"image": "img0.png", "hypothesis": "The shape is red.", "label": "entailment"},
                {"image": "img1.png", "hypothesis": "The shape is made of wood.", "label": "maybe"},
            ],
            "items.jsonl row 2: label 'maybe' is not an entailment label (expected one of 'entailment', 'neutral', "
            "'contradiction', or 0, 1, 2)",
        ),
        (
            "cliptd-mc",
            [
                {
                    "image": "img0.png",
                    "question": "What shape?",
                    "candidates": ["circle", "star", "square"],
                    "answer": 0,
                },
                {"image": "img1.png", "question": "What shape?", "candidates": ["circle", "star"], "answer": 1},
            ],
            "items.jsonl row 2: 2 candidates, expected 3 like the first valid item",
        ),
        (
            "cliptd-mc",
            [{"image": "img2.png", "question": "What shape?", "candidates": ["circle", "star", "square"], "answer": 3}],
            "items.jsonl row 1: answer 3 is out of range (expected an index 0..2 into the 3 candidates)",
        ),
    ],
)
def test_bad_task_rows_are_refused_by_fit_with_the_row_and_what_is_allowed(
    tmp_path, teacher_dir, capsys, recipe, rows, message
):
    path = _write_manifest(tmp_path, rows)
    args = ["fit", recipe, "--tiny", "--teacher", str(teacher_dir), "--data.train", str(path), "--data.eval", str(path)]
    assert main([*args, "--output", str(tmp_path / "run"), *QUIET]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "student").exists()


def test_an_adaptation_batch_larger_than_its_pairs_is_refused(tmp_path, teacher_dir, capsys):
    args = ["fit", "mad-vqa", "--tiny", "--teacher", str(teacher_dir), "--output", str(tmp_path / "x")]
    assert main([*args, "--adapt.batch_size", "64", *QUIET]) == 2
    msg = "adapt.batch_size = 64: the training split gives only 32 adaptation pairs (items); give a batch size of at"
    assert msg in capsys.readouterr().err


def test_adapt_options_are_checked_with_their_key():
    from vldistill.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape("unknown key 'adapt.step'; allowed keys of adapt: steps, batch")):
        load_recipe("mad-vqa", {"adapt.step": 3})
    with pytest.raises(ConfigError, match=re.escape("adapt.lr = -1.0: must be positive")):
        load_recipe("mad-vqa", {"adapt.lr": -1})
    assert load_recipe("mad-vqa", tiny=True).adapt.steps == 2 and load_recipe("cliptd-vqa").adapt is None
