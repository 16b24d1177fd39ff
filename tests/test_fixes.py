"""Regression tests for five fixes: `vldistill eval` on data without every language, `eval.batch_size` reaching the
embedding calls, the quickstart's teacher cache reused by `vldistill fit`, `crd`'s temperature bound, and the
clip-tiny size stated in the recipes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

from vldistill import evaluation
from vldistill.cli import main
from vldistill.config import DataConfig, load_recipe
from vldistill.data.sources import load_data
from vldistill.losses import build_loss
from vldistill.students import build_student
from vldistill.tokenization import train_wordpiece
from vldistill.train import quickstart as qs
from vldistill.train.fit import evaluate_model, fit_recipe

ROOT = Path(__file__).resolve().parents[1]
CLASSNAMES = ["red square", "green circle", "blue triangle", "yellow star"]
COLOURS = [(255, 0, 0), (0, 160, 0), (0, 0, 255), (230, 200, 0)]


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizer():
    corpus = [f"a photo of a {name}." for name in CLASSNAMES] + [f"a {name}" for name in CLASSNAMES]
    return train_wordpiece(corpus, vocab_size=200, max_length=16)


@pytest.fixture(scope="module")
def english_manifest(tmp_path_factory) -> Path:
    """Eight tiny labelled images with English captions only (no `lang` column: English by default)."""
    root = tmp_path_factory.mktemp("english_only")
    rows = []
    for i in range(8):
        label = i % 4
        img = Image.new("RGB", (36, 36), (255, 255, 255))
        ImageDraw.Draw(img).rectangle((4 + i, 4, 30, 30 - i), fill=COLOURS[label])
        img.save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"a {CLASSNAMES[label]}", "label": label})
    path = root / "english_only.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("student") / "student"
    build_student("test-clip", tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture
def batch_sizes(monkeypatch) -> list[int]:
    """The batch size of every embedding call of the evaluation."""
    seen: list[int] = []
    real = evaluation._embed_batched

    def spy(fn, items, batch_size, what):
        seen.append(batch_size)
        return real(fn, items, batch_size, what)

    monkeypatch.setattr(evaluation, "_embed_batched", spy)
    return seen


# ---------------------------------------------------------------------------------- 1. eval: the data's languages
def test_eval_command_defaults_to_the_languages_of_an_english_only_manifest(
    student_dir, english_manifest, tmp_path, capsys
):
    out_file = tmp_path / "eval.json"
    names = "en=" + ",".join(CLASSNAMES)  # class names inline (labelled data without them is refused)
    args = ["--data", str(english_manifest), "--classnames", names, "--out", str(out_file)]
    code = main(["eval", "--model", str(student_dir), *args])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads(out_file.read_text())
    assert list(metrics["retrieval"]) == ["en"]
    assert list(metrics["zeroshot"]) == ["en"]


def test_eval_with_class_names_and_a_teacher_in_the_data_languages(student_dir, english_manifest):
    data = DataConfig(eval=str(english_manifest), classnames={"en": CLASSNAMES})
    metrics = evaluate_model(student_dir, data, teacher=str(student_dir))
    assert list(metrics["zeroshot"]) == ["en"] and list(metrics["retrieval"]) == ["en"]
    assert metrics["agreement"] == {"en": 1.0}  # the same model as its own teacher


def test_eval_refuses_an_asked_language_that_the_data_lacks(student_dir, english_manifest, capsys):
    args = ["eval", "--model", str(student_dir), "--data", str(english_manifest), "--languages", "en", "zh"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "vldistill eval: error: languages ['zh']" in err and "has no caption in 'zh'" in err and "['en']" in err


def test_eval_refuses_a_teacher_that_reads_none_of_the_data_languages(student_dir, english_manifest, capsys):
    args = ["eval", "--model", str(student_dir), "--data", str(english_manifest), "--teacher", str(student_dir)]
    args += ["--classnames", "en=" + ",".join(CLASSNAMES)]
    assert main([*args, "--teacher-languages", "zh"]) == 2
    assert "it reads ['zh']" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- 2. eval.batch_size is used
def test_evaluate_model_passes_its_batch_size_to_every_embedding_call(student_dir, english_manifest, batch_sizes):
    data = DataConfig(eval=str(english_manifest), classnames={"en": CLASSNAMES})
    evaluate_model(student_dir, data, teacher=str(student_dir), batch_size=3)
    # student and teacher: images, class prompts and captions each
    assert len(batch_sizes) == 6 and set(batch_sizes) == {3}


def test_eval_command_batch_size_flag(student_dir, english_manifest, batch_sizes):
    args = ["--data", str(english_manifest), "--classnames", "en=" + ",".join(CLASSNAMES), "--batch-size", "5"]
    assert main(["eval", "--model", str(student_dir), *args]) == 0
    assert batch_sizes and set(batch_sizes) == {5}


@pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")
def test_fit_recipe_evaluates_with_eval_batch_size(tmp_path, tokenizer, english_manifest, batch_sizes):
    manifest = str(english_manifest)
    cfg = load_recipe(
        raw={
            "name": "eval-batch",
            "student": {"preset": "test-clip"},
            "data": {"train": manifest, "eval": manifest, "languages": ["en"], "classnames": {"en": CLASSNAMES}},
            "stages": [{"steps": 1, "losses": ["clip"]}],
            "train": {"batch_size": 4, "progress": False, "tensorboard": False, "output_dir": str(tmp_path)},
            "eval": {"languages": ["en"], "batch_size": 3},
        }
    )
    summary = fit_recipe(cfg, student=build_student("test-clip", tokenizer=tokenizer))
    assert list(summary["eval"]["student"]["zeroshot"]) == ["en"]
    assert batch_sizes and set(batch_sizes) == {3}


# -------------------------------------------------- 3. the quickstart's teacher cache serves `vldistill fit` too
@pytest.mark.usefixtures("one_thread")
def test_fit_reuses_the_quickstart_teacher_cache_by_the_teacher_directory(tmp_path, monkeypatch, capsys):
    limits = {"data.limit_train": 96, "data.limit_eval": 16}
    monkeypatch.setattr(qs, "FAST_DATA", limits)
    monkeypatch.setitem(qs.FAST_TEACHER, "stages.0.steps", 3)
    monkeypatch.setitem(qs.FAST_STUDENT, "stages.0.steps", 2)
    monkeypatch.setitem(qs.FAST_STUDENT, "stages.1.steps", 1)
    monkeypatch.setattr(qs, "PAIRED", 0.7)  # 67 of the 96 pairs: at least one batch of 64
    out = tmp_path / "quickstart"
    results = qs.run_quickstart(out, fast=True)
    (teacher_dir,) = (tmp_path / "teachers").glob("reference-*/model")
    assert str(teacher_dir) in results["setup"]["teacher"]
    capsys.readouterr()

    args = ["fit", "dcclip", "--tiny", "--teacher", str(teacher_dir), "--teacher.source", "cache"]
    args += ["--teacher.cache", str(out / "teacher-cache"), "--output", str(tmp_path / "fit")]
    args += ["--train.progress", "false", "--train.tensorboard", "false", "--stages.0.steps", "1"]
    args += ["--stages.1.steps", "1", *(x for key, value in limits.items() for x in (f"--{key}", str(value)))]
    code = main(args)
    err = capsys.readouterr().err
    assert "built by another teacher" not in err
    assert code == 0, err
    assert (tmp_path / "fit" / "student" / "config.json").is_file()


def test_quickstart_passes_its_teacher_settings_as_validated_overrides(tmp_path, monkeypatch):
    """The teacher's name, source and cache and cache.workers go through load_recipe's overrides."""
    seen: list[dict] = []
    real = qs.load_recipe

    def spy(name=None, overrides=None, *args, **kwargs):
        if name == "dcclip":
            seen.append(dict(overrides or {}))
        return real(name, overrides, *args, **kwargs)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(qs, "load_recipe", spy)
    monkeypatch.setattr(qs, "load_data", lambda *a, **k: load_data("bundled:easyvqa", a[1], ["en", "zh"], limit=8))
    monkeypatch.setattr(qs, "load_teacher", lambda path: build_student("clip-ref-teacher", train_wordpiece(["a"], 50)))
    monkeypatch.setattr(qs, "build_recipe_cache", stop)
    with pytest.raises(Stop):
        qs.run_quickstart(tmp_path / "out", teacher=str(tmp_path / "my-teacher"), fast=True)
    last = seen[-1]
    assert last["teacher.name_or_path"] == str(tmp_path / "my-teacher")
    assert last["teacher.source"] == "cache" and last["teacher.cache"] == str(tmp_path / "out" / "teacher-cache")
    assert last["cache.workers"] == 0
    # the width is the recipe's own (projection_dim: teacher), resolved against the teacher, not a hidden override
    assert "student.overrides.projection_dim" not in last
    assert real("dcclip").student.overrides["projection_dim"] == "teacher"


# ------------------------------------------------------------------------------------- 4. crd's temperature bound
def test_crd_refuses_a_temperature_below_the_contrastive_losses_bound():
    from helpers import dims

    d = dims((2, 2, 2), (2, 2, 2))
    messages = {}
    for name in ("clip", "icl", "soft_ce", "crd"):
        with pytest.raises(ValueError) as info:
            build_loss(name, d, temperature=0.001)
        messages[name] = str(info.value).replace(f"loss '{name}': ", "")
    assert messages["crd"] == messages["clip"] == messages["icl"] == messages["soft_ce"]
    assert "at least 0.01 (a scale of at most 100)" in messages["crd"]
    build_loss("crd", d, temperature=0.01)  # the bound itself is allowed


# ----------------------------------------------------------------------------- 5. clip-tiny's size in the comments
SIZE = re.compile(r"(\d+)px/(\d+)")


def _preset_size(preset: str) -> tuple[int, int]:
    tokenizer = train_wordpiece(["a b"], 50)
    try:
        model = build_student(preset, tokenizer=tokenizer)
    except ValueError:  # a student with a task head (ViLT): its size does not depend on the task
        model = build_student(preset, tokenizer=tokenizer, task="entailment")
    config = getattr(model, "model", None) or getattr(model, "vilt", None)
    vision = getattr(config.config, "vision_config", config.config)
    return vision.image_size, vision.patch_size


def test_recipe_comments_state_the_presets_real_image_and_patch_size():
    checked = 0
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        preset = (yaml.safe_load(text).get("student") or {}).get("preset")
        for lineno, line in enumerate(text.splitlines(), start=1):
            code, _, comment = line.partition("#")
            named = re.search(r"preset:\s*([\w-]+)", code)
            about = named.group(1) if named else ("clip-tiny" if "clip-tiny" in comment else None)
            for px, patch in SIZE.findall(comment):
                target = about or preset
                assert target, f"{path.name}:{lineno}: {px}px/{patch} of which model?"
                assert (int(px), int(patch)) == _preset_size(target), f"{path.name}:{lineno}: {line.strip()}"
                checked += 1
    assert checked >= 2  # dcclip and clipkd state clip-tiny's size
    for lineno, line in enumerate((ROOT / "README.md").read_text(encoding="utf-8").splitlines(), start=1):
        if "clip-tiny" in line:
            for px, patch in SIZE.findall(line):
                assert (int(px), int(patch)) == _preset_size("clip-tiny"), f"README.md:{lineno}: {line.strip()}"
