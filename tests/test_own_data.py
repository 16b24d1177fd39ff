"""The README's "Your own data" commands, run as written (plus tiny-mode sizes) on a small generated dataset:
a labelled bilingual manifest, class names in a YAML file, a teacher trained on it, a distilled student with its
no-teacher baseline, evaluation, and loading the student with transformers alone."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from vldistill.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
COLOURS = {"red": ((220, 30, 30), "红色"), "blue": ((30, 60, 220), "蓝色"), "green": ((30, 180, 40), "绿色")}
COLOURS |= {"yellow": ((230, 210, 30), "黄色"), "purple": ((140, 40, 170), "紫色")}
SHAPES = {"square": "正方形", "circle": "圆形"}
# appended to each command: the tiny mode of the recipes, small enough for 60 training images
TINY = {
    "reference-teacher": ["--tiny", "--stages.0.steps", "3", "--train.batch_size", "16"],
    "dcclip": ["--tiny", "--train.batch_size", "16", "--data.paired", "0.3"],
}


def readme_commands() -> list[list[str]]:
    block = README.read_text(encoding="utf-8").split("<!-- own-data -->")[1].split("<!-- /own-data -->")[0]
    return [shlex.split(line) for line in block.splitlines() if line.startswith("vldistill ")]


def make_dataset(root: Path) -> list[tuple[str, str]]:
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    (root / "my" / "imgs").mkdir(parents=True)
    for split, per_class in (("train", 6), ("test", 3)):
        rows = []
        for label, (colour, shape) in enumerate(classes):
            for k in range(per_class):
                name = f"imgs/{split}-{label}-{k}.png"
                img = Image.new("RGB", (64, 64), (245, 245, 245))
                box = (8 + k, 10, 50 + k, 52)
                draw = ImageDraw.Draw(img)
                (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour][0])
                img.save(root / "my" / name)
                sid = f"{split}-{label}-{k}"
                zh = f"一个{COLOURS[colour][1]}的{SHAPES[shape]}"
                rows.append({"image": name, "caption": f"a {colour} {shape}", "id": sid, "label": label})
                rows.append({"image": name, "caption": zh, "lang": "zh", "id": sid, "label": label})
        text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
        (root / "my" / f"{split}.jsonl").write_text(text, encoding="utf-8")
    en = ", ".join(f"{c} {s}" for c, s in classes)
    zh = ", ".join(f"{COLOURS[c][1]}的{SHAPES[s]}" for c, s in classes)
    (root / "my" / "classes.yaml").write_text(f"en: [{en}]\nzh: [{zh}]\n", encoding="utf-8")
    free = [f"is there a {c} shape?" for c in COLOURS] + [f"where is the {s}?" for s in SHAPES]
    (root / "my" / "texts.txt").write_text("\n".join(free) + "\n", encoding="utf-8")
    return classes


def test_the_readme_commands_run_on_a_users_labelled_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    classes = make_dataset(tmp_path)
    commands = readme_commands()
    assert [c[:3] for c in commands] == [
        ["vldistill", "fit", "reference-teacher"],
        ["vldistill", "fit", "dcclip"],
        ["vldistill", "eval", "--model"],
    ]
    for command in commands:
        extra = TINY.get(command[2], [])
        assert main(command[1:] + extra) == 0, command
    out = capsys.readouterr().out
    assert re.search(r"embedding width \d+ \(teacher: \d+\)", out), "fit prints the widths"
    assert "gain: student - baseline" in out
    assert "free texts: 7 texts.en (data.texts), per micro-batch and language: 64 in stages.0" in out
    assert "free texts: only 7 texts.en: some repeat within a micro-batch" in out
    # the teacher was exported and scored as the teacher; the student run compares the three
    assert (tmp_path / "runs/my-teacher/teacher/config.json").is_file()
    assert "teacher" in json.loads((tmp_path / "runs/my-teacher/eval.json").read_text())
    result = json.loads((tmp_path / "runs/my-student/eval.json").read_text())
    assert {"student", "baseline", "teacher", "gain_points"} <= set(result)
    assert sorted(result["student"]["zeroshot"]) == ["en", "zh"] and sorted(result["gain_points"]) == ["en", "zh"]
    s, b = result["student"]["zeroshot"]["en"]["top1"], result["baseline"]["zeroshot"]["en"]["top1"]
    assert result["gain_points"]["en"] == pytest.approx(100 * (s - b), abs=0.01)
    evaluated = json.loads(out[out.rindex('{\n  "model"') :])  # the eval command's JSON, printed last
    assert evaluated["data"] == "my/test.jsonl" and evaluated["samples"] == 3 * len(classes)
    assert sorted(evaluated["zeroshot"]) == ["en", "zh"]
    # and the student is an ordinary Hugging Face model
    from transformers import pipeline

    classify = pipeline("zero-shot-image-classification", model="runs/my-student/student")
    names = [f"{c} {s}" for c, s in classes]
    assert classify(Image.open("my/imgs/test-0-0.png"), candidate_labels=names)[0]["label"] in names


def test_eval_refuses_labelled_data_without_class_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_dataset(tmp_path)
    from vldistill.students import build_student
    from vldistill.tokenization import train_wordpiece

    build_student("test-clip", train_wordpiece(["a red square"] * 4, 60)).save_pretrained("model")
    assert main(["eval", "--model", "model", "--data", "my/test.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "--classnames: the evaluation data has labels but no class names" in err
