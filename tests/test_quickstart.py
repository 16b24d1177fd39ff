"""End-to-end: the quickstart's fast mode through the CLI, its outputs, teacher reuse, and the other commands."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModel, CLIPModel, pipeline

from vldistill.cli import main
from vldistill.data.sources import load_data
from vldistill.data.texts import load_free_texts
from vldistill.evaluation import evaluate_zeroshot
from vldistill.models import DualEncoder
from vldistill.train import quickstart as qs


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "quickstart"
    code = main(["quickstart", "--fast", "--output", str(out)])
    assert code == 0
    return out


def test_results_json_has_the_documented_shape(fast_run):
    results = json.loads((fast_run / "results.json").read_text())
    assert results["wall_seconds"] > 0
    for name, langs in (("teacher", ["en"]), ("student", ["en", "zh"]), ("baseline", ["en", "zh"])):
        entry = results[name]
        assert entry["params"] > 0 and entry["image_ms_per_image"] > 0
        assert sorted(entry["zeroshot"]) == langs and sorted(entry["retrieval"]) == langs
        for lang in langs:
            for key in ("top1", "top5"):
                assert 0.0 <= entry["zeroshot"][lang][key] <= 1.0
            assert entry["zeroshot"][lang]["top5"] >= entry["zeroshot"][lang]["top1"]
            for key in ("i2t_r1", "t2i_r1"):
                assert 0.0 <= entry["retrieval"][lang][key] <= 1.0
    # the student is at least 8x smaller than the teacher, the baseline has the same architecture
    assert results["teacher"]["params"] >= 8 * results["student"]["params"]
    assert results["baseline"]["params"] == results["student"]["params"]
    assert results["setup"]["student_steps"] == results["setup"]["baseline_steps"]
    assert set(results["targets"]) >= {"student_en_over_teacher_en", "image_speedup"}
    # the scenario: 10% of the training pairs are captioned for student and baseline; the rest is unpaired
    setup = results["setup"]
    assert setup["paired_samples"] == round(0.1 * setup["train_samples"])
    assert setup["paired_samples"] + setup["unpaired_samples"] == setup["train_samples"]
    assert setup["free_texts"] == len(load_free_texts({"en": ["bundled:easyvqa-questions"]}))  # texts alone
    assert results["all_pairs"]["params"] == results["student"]["params"]
    # the closing sentence is computed from the run
    s_en, t_en = results["student"]["zeroshot"]["en"]["top1"], results["teacher"]["zeroshot"]["en"]["top1"]
    assert f"keeps {100 * s_en / t_en:.0f}% of the teacher's English accuracy" in results["summary"]
    assert f"same {setup['paired_samples']} captioned images" in results["summary"]


def test_outputs_report_and_training_logs(fast_run):
    assert (fast_run / "report.png").stat().st_size > 10_000
    report = (fast_run / "report.md").read_text()
    assert "teacher" in report and "baseline" in report and "report.png" in report
    assert "and 107 texts without images, in DC-CLIP's unimodal stage 1" in report
    distill_rows = [json.loads(x) for x in (fast_run / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in distill_rows} == {"distill", "align"}
    assert any("fd_image" in r and "xling" in r and "fd_text_texts_en" in r for r in distill_rows)
    baseline_rows = [json.loads(x) for x in (fast_run / "baseline" / "metrics.jsonl").read_text().splitlines()]
    assert all("fd_image" not in r for r in baseline_rows) and all("clip" in r for r in baseline_rows)


def test_saved_student_loads_with_transformers_alone_and_agrees_with_the_pipeline(fast_run):
    student_dir = fast_run / "student"
    assert isinstance(AutoModel.from_pretrained(student_dir), CLIPModel)
    assert not list(student_dir.glob("*.bin"))
    test = load_data("bundled:easyvqa", "test", ["en", "zh"], limit=12)
    images = [test.dataset[i]["image"] for i in range(12)]
    labels = [test.dataset[i]["label"] for i in range(12)]
    classnames = test.classnames["zh"]
    ours = evaluate_zeroshot(DualEncoder.from_pretrained(student_dir), images, labels, classnames, ["一张{}的照片。"])
    classify = pipeline("zero-shot-image-classification", model=str(student_dir))
    theirs = [
        classify(img, candidate_labels=classnames, hypothesis_template="一张{}的照片。")[0]["label"] for img in images
    ]
    assert [classnames[i] for i in ours.predictions.tolist()] == theirs


def test_eval_command_on_the_saved_student(fast_run, capsys):
    out_file = fast_run / "eval.json"
    args = ["--data", "bundled:easyvqa", "--limit", "50", "--out", str(out_file)]
    code = main(["eval", "--model", str(fast_run / "student"), *args])
    assert code == 0
    metrics = json.loads(out_file.read_text())
    assert sorted(metrics["zeroshot"]) == ["en", "zh"]
    assert 0.0 <= metrics["zeroshot"]["zh"]["top1"] <= 1.0
    assert json.loads(capsys.readouterr().out)["params"] == metrics["params"]
    assert metrics["data"] == "bundled:easyvqa" and metrics["samples"] == 50  # it names what it evaluated


def test_reference_teacher_is_cached_and_retrained_when_its_config_changes(tmp_path, monkeypatch):
    monkeypatch.setitem(qs.FAST_TEACHER, "stages.0.steps", 3)
    train = load_data("bundled:easyvqa", "train", ["en", "zh"], limit=96)
    common = {"train.seed": 0, "train.progress": False, "data.limit_train": 96}
    first, history = qs.reference_teacher(train, common, True, tmp_path)
    assert history and len(list(tmp_path.glob("reference-*"))) == 1
    again, _ = qs.reference_teacher(train, common, True, tmp_path)
    for (name, a), (_, b) in zip(first.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert len(list(tmp_path.glob("reference-*"))) == 1  # reused, not retrained
    qs.reference_teacher(train, {**common, "train.seed": 1}, True, tmp_path)
    assert len(list(tmp_path.glob("reference-*"))) == 2  # a changed config trains a new one
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".work-*"))


def test_a_rerun_reuses_the_runs_without_the_teacher_and_retrains_the_student(fast_run, tmp_path, capsys):
    """The baseline and the all-pairs run depend on nothing a rerun changed: reused, as the teacher is; the student
    is trained again, alone, on the thread count it had beside them, and gives the same numbers."""
    import shutil

    shutil.copytree(fast_run.parent, tmp_path, dirs_exist_ok=True)  # the run and its teacher; fast_run stays as it is
    out = tmp_path / fast_run.name
    before = {
        name: (out / d / "metrics.jsonl").stat().st_mtime_ns for name, d in (("b", "baseline"), ("a", "all-pairs"))
    }
    student_before = (out / "distill" / "metrics.jsonl").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["quickstart", "--fast", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"baseline: reusing {out / 'baseline'}" in printed and f"all_pairs: reusing {out / 'all-pairs'}" in printed
    threads = qs.side_by_side_threads(3)
    if threads:  # alone, on the threads it had beside the other two
        assert f"4/5 training student on {threads} thread(s), as beside them" in printed
    assert {
        n: (out / d / "metrics.jsonl").stat().st_mtime_ns for n, d in (("b", "baseline"), ("a", "all-pairs"))
    } == before
    assert (out / "distill" / "metrics.jsonl").stat().st_mtime_ns != student_before  # trained again
    first, again = (json.loads((d / "results.json").read_text()) for d in (fast_run, out))
    for name in ("student", "baseline", "all_pairs"):
        assert again[name]["zeroshot"] == first[name]["zeroshot"], name


def test_a_run_is_reused_only_with_its_key_and_its_files(tmp_path):
    from vldistill.config import load_recipe
    from vldistill.students import build_student
    from vldistill.tokenization import train_wordpiece

    cfg = load_recipe("dcclip", {"train.output_dir": str(tmp_path / "run")}, tiny=True)
    tok = train_wordpiece(["a red circle", "a blue square"], 100)
    torch.manual_seed(0)
    student = build_student("test-clip", tok)
    key = qs.training_key(cfg, qs.student_digest(student), 1)
    assert qs.reusable_run(cfg, key) is None  # nothing there
    (tmp_path / "run").mkdir()
    student.save_pretrained(tmp_path / "run" / "student")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    assert qs.reusable_run(cfg, key) is None  # not recorded as finished
    qs.record_run(cfg, key, {"output_dir": "elsewhere", "student_dir": "elsewhere/student", "wall_seconds": 3.0})
    reused = qs.reusable_run(cfg, key)
    assert reused == {
        "output_dir": str(tmp_path / "run"),
        "student_dir": str(tmp_path / "run" / "student"),
        "wall_seconds": 3.0,
        "reused": True,
    }
    # Whatever the run depends on is in the key: another thread count, other initial weights, another config.
    assert qs.training_key(cfg, qs.student_digest(student), 2) != key
    torch.manual_seed(1)
    assert qs.training_key(cfg, qs.student_digest(build_student("test-clip", tok)), 1) != key
    other = load_recipe("dcclip", {"train.output_dir": str(tmp_path / "run"), "train.lr": 1e-3}, tiny=True)
    assert qs.reusable_run(other, qs.training_key(other, qs.student_digest(student), 1)) is None
    # Where the run is written or how it is shown is not.
    moved = load_recipe("dcclip", {"train.output_dir": str(tmp_path / "b"), "train.progress": False}, tiny=True)
    assert qs.training_key(moved, qs.student_digest(student), 1) == key
    (tmp_path / "run" / "student" / "config.json").unlink()  # its student damaged: trained again
    assert qs.reusable_run(cfg, key) is None


def test_the_code_digest_follows_the_sources(tmp_path):
    """A run trained by other code is not reused, even under the same version number."""
    import shutil
    from pathlib import Path

    package = Path(qs.__file__).resolve().parents[1]
    shutil.copytree(package, tmp_path / "vldistill", ignore=shutil.ignore_patterns("__pycache__", "recipes"))
    assert qs.code_digest(tmp_path / "vldistill") == qs.code_digest() == qs.code_digest(package)
    loop = tmp_path / "vldistill" / "train" / "loop.py"
    loop.write_text(loop.read_text() + "\n# changed\n")
    assert qs.code_digest(tmp_path / "vldistill") != qs.code_digest()


def test_quickstart_refuses_a_teacher_less_than_8x_the_student(tmp_path):
    from vldistill.students import build_student
    from vldistill.tokenization import train_wordpiece

    small = build_student("test-clip", train_wordpiece(["a red circle", "a blue square"], 100))
    small.save_pretrained(tmp_path / "small-teacher")
    with pytest.raises(ValueError, match="more than 1/8 of the teacher"):
        qs.run_quickstart(tmp_path / "out", teacher=str(tmp_path / "small-teacher"), fast=True)


def test_info_lists_every_registry(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"clip", "fd", "xling"} <= set(info["losses"])
    assert {"clip-tiny", "test-clip"} <= set(info["students"])
    assert {"dcclip", "reference-teacher"} <= set(info["recipes"])
    assert "easyvqa" in info["datasets"]
    assert {"clip", "chinese_clip", "altclip", "siglip"} <= set(info["teachers"])
    assert info["kinds"] == ["crossmodal", "dual_encoder", "seq2seq"]
    assert {"zeroshot", "vqa", "captioning", "entailment", "multiple_choice"} <= set(info["tasks"])
    assert {"test-vilt", "test-bart", "vilt", "seq2seq"} <= set(info["students"])
    assert {"easyvqa-vqa", "easyvqa-entailment", "easyvqa-mc"} <= set(info["datasets"])


def test_every_command_has_help(capsys):
    for command in ("quickstart", "fit", "eval", "info"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: vldistill " + command in capsys.readouterr().out


def test_eval_reports_a_missing_model_directory(tmp_path, capsys):
    code = main(["eval", "--model", str(tmp_path / "nope"), "--data", "bundled:easyvqa"])
    assert code == 2
    assert "nope" in capsys.readouterr().err


def test_image_timing_helper_measures_the_image_tower():
    from vldistill.students import build_student
    from vldistill.tokenization import train_wordpiece
    from vldistill.train.fit import image_ms_per_image

    model = build_student("test-clip", train_wordpiece(["a b c"], 50))
    ms = image_ms_per_image(model, [Image.new("RGB", (40, 40))] * 8, batch_size=8, repeats=2)
    assert 0 < ms < 1000


def test_speed_of_several_models_is_measured_in_turns_with_medians(monkeypatch):
    """Each round times every model once, in turn; a load spike in one round (one slow call) leaves the medians and
    so the teacher/student ratio alone. A fake clock: each encode_image call advances it by the model's cost."""
    from vldistill.train import fit

    clock, calls = [0.0], []

    class Fake:
        def __init__(self, name, seconds):
            self.name, self.seconds = name, seconds

        def preprocess_images(self, images):
            return list(images)

        def eval(self):
            return self

        def encode_image(self, pixels):
            calls.append(self.name)
            slow = self.name == "student" and len(calls) == 13  # in round 2
            clock[0] += self.seconds * (50 if slow else 1)

    monkeypatch.setattr(fit.time, "perf_counter", lambda: clock[0])
    models = {"teacher": Fake("teacher", 0.4), "student": Fake("student", 0.1)}
    ms = fit.image_ms_in_turns(models, ["img"] * 4, batch_size=4, rounds=5, repeats=2)
    assert calls[:6] == ["teacher"] * 3 + ["student"] * 3  # warm-up
    assert calls[6:] == (["teacher"] * 2 + ["student"] * 2) * 5  # then in turns
    assert ms == {"teacher": pytest.approx(100.0), "student": pytest.approx(25.0)}  # 1000 * 0.4 s / 4 images


@pytest.mark.parametrize(
    "command", [["quickstart", "--fast"], ["eval", "--model", "runs/quickstart/student", "--data", "bundled:easyvqa"]]
)
def test_single_process_commands_refuse_to_run_on_several(command, tmp_path, monkeypatch, capsys):
    """Under torchrun every process would do, and write, the same work: only `fit` trains on several processes."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(command) == 2
    err = capsys.readouterr().err
    assert f"vldistill {command[0]} runs on one process, but this is one of 4 (WORLD_SIZE)" in err
    assert not list(tmp_path.iterdir())


def test_the_report_reuses_the_evaluations_predictions_and_the_teachers_embeddings(tmp_path, monkeypatch):
    """``evaluate_models`` embeds the teacher's images once for every model and hands its English predictions to the
    report, which then evaluates nothing again; both give what computing them anew gives."""
    from vldistill.students import build_student
    from vldistill.tokenization import train_wordpiece
    from vldistill.train import report
    from vldistill.train.fit import adapted_cosine

    train = load_data("bundled:easyvqa", "train", ["en", "zh"], limit=48)
    test = load_data("bundled:easyvqa", "test", ["en", "zh"], limit=24)
    tok = train_wordpiece([c for i in range(48) for c in train.dataset[i]["captions"].values()], vocab_size=200)
    torch.manual_seed(0)
    teacher, student = build_student("test-clip", tok), build_student("test-clip", tok)
    kept: dict = {}
    results = qs.evaluate_models(teacher, {"student": student}, train, test, 16, kept)
    fit = [train.dataset[i]["image"] for i in range(48)]
    alone = adapted_cosine(student, teacher, fit, test.eval_set(["en", "zh"]).images)  # the teacher embedded here
    assert results["student"]["image_cosine_with_teacher"] == pytest.approx(alone, abs=1e-5)
    again = report.zeroshot_predictions({"teacher": teacher, "student": student}, test.eval_set(["en"]), "en", 16)
    assert kept == again
    monkeypatch.setattr(report, "zeroshot_predictions", lambda *a: pytest.fail("evaluated again"))
    results["setup"], results["wall_seconds"] = {"machine": "m", "teacher": "t", "paired_samples": 4}, 1.0
    results["baseline"] = results["student"]
    results["targets"] = qs.target_check(results)
    results["summary"] = qs.summary_sentence(results)
    out = report.write_report(tmp_path, results, {"student": []}, {"teacher": teacher, "student": student}, test, kept)
    assert (tmp_path / "report-classes.png").is_file() and out["md"].is_file()
