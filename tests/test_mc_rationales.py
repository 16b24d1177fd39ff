"""Multiple choice as VCR: one head scores Q->A and QA->R samples, evaluation reports Q->A, QA->R (given the right
answer) and Q->AR; and the cross-modal exports of every task load and answer with ``transformers`` alone. Tiny models
built from configs; never downloads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import ViltForQuestionAnswering

from vldistill.batching import teacher_texts
from vldistill.cli import main
from vldistill.config import DataConfig, from_dict, load_recipe
from vldistill.data.easyvqa_tasks import easyvqa_mc
from vldistill.data.pairs import DataError
from vldistill.data.sources import load_task_data
from vldistill.data.tasks import load_task_manifest, rationale_item
from vldistill.students import build_student, load_student
from vldistill.students.crossmodal import HEAD_NAME, CrossModalStudent
from vldistill.tasks import get_task
from vldistill.tasks.predict import task_predictor
from vldistill.tokenization import train_wordpiece
from vldistill.train.fit import load_eval_data, load_train_data, training_samples

pytestmark = pytest.mark.usefixtures("one_thread")

MC = "bundled:easyvqa-mc"
QUIET = ["--train.progress", "false", "--train.tensorboard", "false", "--train.log_every", "1"]


@pytest.fixture(scope="module")
def tok():
    data = easyvqa_mc("train", limit=32)
    corpus = [t for s in data.samples for v in teacher_texts(s).values() for t in ([v] if isinstance(v, str) else v)]
    corpus += ["There is a red circle.", "The shape is made of wood."]
    return train_wordpiece(corpus, vocab_size=300)


# ----------------------------------------------------------------------------------------------------------------------
# The data: one item, two candidate-scoring samples


def test_an_item_with_rationales_trains_as_a_q2a_and_a_qa2r_sample():
    items = load_task_data(MC, "multiple_choice", split="train", limit=6)
    samples = items.rationale_samples()
    assert len(samples) == 2 * len(items) and samples.kind == "multiple_choice"
    for i, item in enumerate(items.samples):
        q2a, qa2r = samples[2 * i], samples[2 * i + 1]
        right = item.candidates[item.answer_index]
        assert (q2a["question"], q2a["candidates"], q2a["answer_index"]) == (
            item.question,
            item.candidates,
            item.answer_index,
        )
        assert qa2r["question"] == f"{item.question} {right}"
        assert (qa2r["candidates"], qa2r["answer_index"]) == (item.rationales, item.rationale_index)
        for s in (q2a, qa2r):  # ordinary candidate-scoring samples: the same text fields, no rationales left
            assert s["rationales"] == [] and s["rationale_index"] == -1
            assert sorted(teacher_texts(s)) == ["candidates", "question"]
            assert s["image"] is items[i]["image"]  # shared, not decoded again
        # the teacher's QA->R texts are VCR's question + right answer + rationale: the item's `rationales` field
        assert teacher_texts(qa2r)["candidates"] == teacher_texts(items[i])["rationales"]
        assert samples.samples[2 * i + 1].id == f"{item.id} QA->R"
        assert rationale_item(items[i]) == {**qa2r, "index": i}
    assert samples.rationale_samples() is samples  # the samples have no rationales: nothing more to split
    assert training_samples(items).samples == samples.samples


def test_rationales_are_on_by_default_and_can_be_switched_off(tmp_path):
    on, off = easyvqa_mc("test", limit=8), easyvqa_mc("test", limit=8, rationales=False)
    assert on.has_rationales() and not off.has_rationales()
    assert [(s.question, s.candidates, s.answer_index) for s in off.samples] == [
        (s.question, s.candidates, s.answer_index) for s in on.samples
    ]
    assert off.rationale_samples() is off and on.without_rationales().samples == off.samples
    assert load_recipe("cliptd-mc").data.rationales is True
    base = {"train": MC, "eval": MC, "task": "multiple_choice", "limit_train": 6, "limit_eval": 4}
    assert load_train_data(from_dict(DataConfig, base)).dataset.has_rationales()
    cfg = from_dict(DataConfig, {**base, "rationales": False})
    train = load_train_data(cfg)
    assert not train.dataset.has_rationales() and not load_eval_data(cfg, train=train).dataset.has_rationales()
    # a manifest read without rationales does not even read (or check) its rationale columns
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    row = {"image": "a.png", "question": "What?", "candidates": ["x", "y"], "answer": 0, "rationale": 9}
    (tmp_path / "mc.jsonl").write_text(json.dumps({**row, "rationales": ["r", "s"]}) + "\n")
    with pytest.raises(DataError, match=r"mc\.jsonl row 1: rationale 9 is out of range"):
        load_task_manifest(tmp_path / "mc.jsonl", "multiple_choice")
    assert load_task_manifest(tmp_path / "mc.jsonl", "multiple_choice", rationales=False)[0]["rationale_index"] == -1


def _manifest(tmp_path: Path, rows: list[dict]) -> Path:
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 40, 200 - 60 * i)).save(tmp_path / f"img{i}.png")
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(i: int, **change) -> dict:
    row = {
        "image": f"img{i % 3}.png",
        "question": "What shape is it?",
        "candidates": ["circle", "star", "triangle"],
        "answer": i % 3,
        "rationales": ["It has no corners.", "It has five points.", "It has three corners."],
        "rationale": i % 3,
    }
    return {**row, **change}


def test_a_user_manifest_with_rationales_gives_both_samples(tmp_path):
    path = _manifest(tmp_path, [_row(0), _row(1), _row(2, rationales=None, rationale=None)])
    items = load_task_manifest(path, "multiple_choice")
    samples = items.rationale_samples()  # the third item has no rationales: its Q->A sample alone
    assert [s["question"] for s in samples] == [
        "What shape is it?",
        "What shape is it? circle",
        "What shape is it?",
        "What shape is it? star",
        "What shape is it?",
    ]
    assert samples.samples[1].origin == f"{path} row 1 QA->R"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [_row(0), _row(1, rationales=["It has no corners.", "It has five points."])],
            "mc.jsonl row 2: 2 rationales, expected 3 like the first valid item (all items must have the same number "
            "of rationales)",
        ),
        ([_row(0), _row(1, rationale=3)], "mc.jsonl row 2: rationale 3 is out of range (expected an index 0..2 into "),
        ([_row(0, rationale=-1)], "mc.jsonl row 1: rationale -1 is out of range"),
    ],
)
def test_bad_rationales_are_refused_naming_the_row(tmp_path, rows, message):
    with pytest.raises(DataError) as err:
        load_task_manifest(_manifest(tmp_path, rows), "multiple_choice")
    assert message in str(err.value)


def test_rationales_must_be_as_many_as_candidates_to_train_both(tmp_path):
    rows = [_row(0, rationales=["a", "b"], rationale=1), _row(1, rationales=["c", "d"], rationale=0)]
    items = load_task_manifest(_manifest(tmp_path, rows), "multiple_choice")  # fine to read and evaluate
    with pytest.raises(DataError, match=r"mc\.jsonl row 1: 2 rationales but 3 candidates; .*data\.rationales: false"):
        items.rationale_samples()


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: Q->A, QA->R given the right answer, Q->AR


def _scores(student, samples: list[dict]) -> list[int]:
    inputs = student.processor()(samples)
    inputs.pop("targets")
    with torch.no_grad():
        return student(inputs, {"task_logits"}).extra["task_logits"].argmax(-1).tolist()


def test_the_student_answers_q2a_and_qa2r_and_evaluation_reports_all_three(tok):
    torch.manual_seed(0)
    student = build_student("test-vilt", tok, task="multiple_choice").eval()
    test = load_task_data(MC, "multiple_choice", split="test", limit=12)
    items = [test[i] for i in range(len(test))]
    preds = task_predictor(student, "multiple_choice")(items)
    torch.manual_seed(0)  # independent: the Q->A and QA->R samples scored one by one
    answers = [_scores(student, [s])[0] for s in items]
    rationales = [_scores(student, [rationale_item(s)])[0] for s in items]
    assert preds == list(zip(answers, rationales, strict=True))
    metrics = get_task("multiple_choice").evaluate(task_predictor(student, "multiple_choice"), test, batch_size=5)
    gold_a = [s["answer_index"] for s in items]
    gold_r = [s["rationale_index"] for s in items]
    right_a = [a == g for a, g in zip(answers, gold_a, strict=True)]
    right_r = [r == g for r, g in zip(rationales, gold_r, strict=True)]
    assert metrics == {
        "q2a": sum(right_a) / 12,
        "qa2r": sum(right_r) / 12,
        "q2ar": sum(a and r for a, r in zip(right_a, right_r, strict=True)) / 12,
        "count": 12,
    }
    # the rationale is chosen given the right answer, whatever answer the student picked
    assert all(rationale_item(s)["question"].endswith(s["candidates"][s["answer_index"]]) for s in items)
    assert "qa2r" not in get_task("multiple_choice").evaluate(
        task_predictor(student, "multiple_choice"), easyvqa_mc("test", limit=4, rationales=False)
    )


def test_q2ar_counts_an_item_only_when_both_are_right_and_mixed_items_are_counted():
    items = [
        {"answer_index": 0, "rationale_index": 1},
        {"answer_index": 2, "rationale_index": 0},
        {"answer_index": 1, "rationale_index": 1},
        {"answer_index": 1, "rationale_index": -1},  # no rationales: Q->A only
    ]
    preds = iter([(0, 1), (1, 0), (1, 0), 1])
    metrics = get_task("multiple_choice").evaluate(lambda batch: [next(preds) for _ in batch], items)
    assert metrics == {"q2a": 3 / 4, "qa2r": 2 / 3, "q2ar": 1 / 3, "rationale_count": 3, "count": 4}
    with pytest.raises(ValueError, match=r"prediction 0 is \(0, 1, 2\): expected a candidate index or"):
        get_task("multiple_choice").evaluate(lambda batch: [(0, 1, 2)] * len(batch), items)


def test_a_dual_encoder_answers_qa2r_zero_shot(tok):
    teacher = build_student("test-clip", tok).eval()
    test = load_task_data(MC, "multiple_choice", split="test", limit=4)
    items = [test[i] for i in range(len(test))]
    preds = task_predictor(teacher, "multiple_choice")(items)
    with torch.no_grad():
        for item, (answer, rationale) in zip(items, preds, strict=True):
            image = teacher.embed_images([item["image"]])[0]
            texts = teacher_texts(item)
            assert answer == int((teacher.embed_texts(texts["candidates"]) @ image).argmax())
            assert rationale == int((teacher.embed_texts(texts["rationales"]) @ image).argmax())


def test_fit_without_rationales_reports_q2a_only(tmp_path):
    out = tmp_path / "run"
    args = ["fit", "cliptd-mc", "--tiny", "--output", str(out), "--teachers", "[]", "--stages.0.losses", "[task]"]
    assert main([*args, "--data.rationales", "false", *QUIET]) == 0
    student = json.loads((out / "eval.json").read_text())["student"]
    assert set(student) == {"q2a", "count"}


def test_fit_refuses_rationales_that_cannot_be_trained_beside_the_answers(tmp_path, capsys):
    path = _manifest(tmp_path, [_row(0, rationales=["a", "b"], rationale=1), _row(1, rationales=["c", "d"])])
    args = ["fit", "cliptd-mc", "--tiny", "--teachers", "[]", "--stages.0.losses", "[task]", "--output"]
    data = ["--data.train", str(path), "--data.eval", str(path), "--data.split.low_shot", "null"]
    assert main([*args, str(tmp_path / "run"), *data, *QUIET]) == 2
    assert "mc.jsonl row 1: 2 rationales but 3 candidates" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Exports: every task a ViltForQuestionAnswering that transformers alone loads and runs

# Runs in a fresh interpreter that never imports vldistill: the saved inputs through the exported model, and the
# answers the same model gives through its own processor from the raw images and texts.
_ALONE = r"""
import json, sys
from pathlib import Path
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, ViltForQuestionAnswering

work = Path(sys.argv[1])
out = {}
for task in ("entailment", "multiple_choice"):
    directory = work / task
    model = ViltForQuestionAnswering.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    inputs = load_file(work / f"{task}-inputs.safetensors")
    torch.manual_seed(1)
    with torch.no_grad():
        logits = model(**inputs).logits
    save_file({"logits": logits.contiguous()}, work / f"{task}-logits.safetensors")
    chosen = []
    for item in json.loads((work / f"{task}-items.json").read_text()):
        image = Image.open(work / item["image"]).convert("RGB")
        scores = []
        for text in item["texts"]:
            with torch.no_grad():
                scores.append(model(**processor(images=image, text=text, return_tensors="pt")).logits[0])
        scores = torch.stack(scores)
        best = scores[:, 0].argmax() if task == "multiple_choice" else scores[0].argmax()
        chosen.append(model.config.id2label[int(scores.argmax())] if task == "entailment" else int(best))
    out[task] = {"chosen": chosen, "id2label": model.config.id2label}
out["vldistill_imported"] = any(m.startswith("vldistill") for m in sys.modules)
print(json.dumps(out))
"""


def test_entailment_and_multiple_choice_exports_answer_with_transformers_alone(tok, tmp_path):
    expected, predicted = {}, {}
    for task, source in (("entailment", "bundled:easyvqa-entailment"), ("multiple_choice", MC)):
        torch.manual_seed(4)
        student = build_student("test-vilt", tok, task=task).eval()
        test = load_task_data(source, task, split="test", limit=3)
        items = [test[i] for i in range(len(test))]
        inputs = student.processor()(items)
        inputs.pop("targets")
        torch.manual_seed(1)  # ViLT draws its patch order at random
        with torch.no_grad():
            expected[task] = student(inputs, {"task_logits"}).extra["task_logits"]
        predicted[task] = task_predictor(student, task)(items)
        student.save_pretrained(tmp_path / task)
        assert not (tmp_path / task / HEAD_NAME).exists()
        flat = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_mask")}
        if task == "multiple_choice":  # one (image, question + candidate) per row, as the student encodes them
            choices = flat["input_ids"].shape[1]
            flat["input_ids"], flat["attention_mask"] = (
                flat["input_ids"].flatten(0, 1),
                flat["attention_mask"].flatten(0, 1),
            )
            flat["pixel_values"] = flat["pixel_values"].repeat_interleave(choices, 0)
            flat["pixel_mask"] = flat["pixel_mask"].repeat_interleave(choices, 0)
        save_file({k: v.contiguous() for k, v in flat.items()}, tmp_path / f"{task}-inputs.safetensors")
        rows = []
        for i, item in enumerate(items):
            item["image"].save(tmp_path / f"{task}-{i}.png")
            texts = (
                [item["hypothesis"]]
                if task == "entailment"
                else [f"{item['question']} {c}" for c in item["candidates"]]
            )
            rows.append({"image": f"{task}-{i}.png", "texts": texts})
        (tmp_path / f"{task}-items.json").write_text(json.dumps(rows))
        # load_student loads the export back, with the same logits
        again = load_student(tmp_path / task).eval()
        torch.manual_seed(1)
        with torch.no_grad():
            torch.testing.assert_close(again(inputs, {"task_logits"}).extra["task_logits"], expected[task])

    run = subprocess.run(
        [sys.executable, "-c", _ALONE, str(tmp_path)], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    alone = json.loads(run.stdout.strip().splitlines()[-1])
    assert alone["vldistill_imported"] is False
    assert alone["entailment"]["id2label"] == {"0": "entailment", "1": "neutral", "2": "contradiction"}
    assert alone["multiple_choice"]["id2label"] == {"0": "score"}
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(tmp_path / "entailment-logits.safetensors")["logits"], expected["entailment"])
    mc_logits = load_file(tmp_path / "multiple_choice-logits.safetensors")["logits"]
    torch.testing.assert_close(mc_logits.view(expected["multiple_choice"].shape), expected["multiple_choice"])
    # through its own processor from the raw image and text, the export answers as the student does
    assert alone["entailment"]["chosen"] == [
        ("entailment", "neutral", "contradiction")[p] for p in predicted["entailment"]
    ]
    assert alone["multiple_choice"]["chosen"] == [a for a, _ in predicted["multiple_choice"]]


def _same_head(a, b) -> None:
    torch.testing.assert_close(a.head.state_dict(), b.head.state_dict(), rtol=0, atol=0)


def test_an_export_loads_without_vldistill_json_and_an_older_export_still_loads(tok, tmp_path):
    torch.manual_seed(2)
    student = build_student("test-vilt", tok, task="multiple_choice").eval()
    student.save_pretrained(tmp_path / "new")
    (tmp_path / "new" / "vldistill.json").unlink()  # a copy of the Hugging Face files alone: the head is kept
    again = CrossModalStudent.from_vilt(tmp_path / "new", task="multiple_choice")
    _same_head(again, student)
    fresh = CrossModalStudent.from_vilt(tmp_path / "new", task="entailment")  # a 1-output head is not entailment's
    assert fresh.head[3].out_features == 3
    # an export written before every task was a ViltForQuestionAnswering: a ViltModel and head.safetensors
    old = tmp_path / "old"
    student.vilt.save_pretrained(old)
    student.tokenizer.save_pretrained(old)
    student.image_processor.save_pretrained(old)
    save_file({k: v.contiguous() for k, v in student.head.state_dict().items()}, old / HEAD_NAME)
    (old / "vldistill.json").write_text(json.dumps({"kind": "crossmodal", "task": "multiple_choice", "labels": []}))
    loaded = load_student(old)
    assert loaded.task == "multiple_choice"
    _same_head(loaded, student)
    assert ViltForQuestionAnswering.from_pretrained(tmp_path / "new").config.num_labels == 1
