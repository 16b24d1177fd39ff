"""Task data through the program: ``vldistill fit`` fine-tunes a cross-modal student on the bundled VQA data and
evaluates it with the VQA task; ``data.split`` keeps held-out items out of training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from vldistill.cli import main
from vldistill.config import ConfigError, DataConfig, SplitConfig, from_dict
from vldistill.data.easyvqa_tasks import HELD_OUT_COMBOS
from vldistill.train.fit import load_eval_data, load_train_data


def _combo(sample) -> str:
    return f"{sample.attributes['color']} {sample.attributes['shape']}"


def test_domain_shift_by_combinations_never_trains_on_a_held_out_item():
    cfg = from_dict(
        DataConfig,
        {
            "train": "bundled:easyvqa-entailment",
            "eval": "bundled:easyvqa-entailment",
            "task": "entailment",
            "limit_train": 600,
            "limit_eval": 300,
            "split": {"domain_shift": "combos"},
        },
    )
    train = load_train_data(cfg)
    test = load_eval_data(cfg, train=train)
    assert len(train.dataset) > 0 and len(test.dataset) > 0
    assert not any(_combo(s) in HELD_OUT_COMBOS for s in train.dataset.samples)
    assert all(_combo(s) in HELD_OUT_COMBOS for s in test.dataset.samples)


def test_low_shot_keeps_a_seeded_fraction_of_the_training_items_and_all_the_test_items():
    base = {"train": "bundled:easyvqa-vqa", "eval": "bundled:easyvqa-vqa", "task": "vqa", "limit_train": 400}
    base["limit_eval"] = 50
    full = load_train_data(from_dict(DataConfig, base))
    cfg = from_dict(DataConfig, {**base, "split": {"low_shot": 0.1, "seed": 3}})
    few, again = load_train_data(cfg), load_train_data(cfg)
    assert len(few.dataset) == 40
    assert [s.question for s in few.dataset.samples] == [s.question for s in again.dataset.samples]
    full_keys = {(s.image, s.question) for s in full.dataset.samples}
    assert {(s.image, s.question) for s in few.dataset.samples} <= full_keys
    assert len(load_eval_data(cfg, train=few).dataset) == 50
    with pytest.raises(ConfigError, match=r"split.low_shot = 0.0: must be a number in \(0, 1\]"):
        from_dict(DataConfig, {**base, "split": {"low_shot": 0.0}})
    assert SplitConfig().low_shot is None


def test_fit_fine_tunes_a_vilt_student_on_bundled_vqa_and_evaluates_it(tmp_path: Path, capsys):
    recipe = {
        "name": "vilt-vqa",
        "student": {"preset": "test-vilt"},
        "data": {
            "train": "bundled:easyvqa-vqa",
            "eval": "bundled:easyvqa-vqa",
            "task": "vqa",
            "limit_train": 64,
            "limit_eval": 32,
            "split": {"low_shot": 0.5},
        },
        "stages": [{"steps": 3, "losses": ["task"], "trainable": ["embeddings", "encoder", "pooler", "head"]}],
        "train": {"batch_size": 8, "warmup_steps": 0, "progress": False, "tensorboard": False, "log_every": 1},
    }
    path = tmp_path / "vilt-vqa.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["fit", str(path), "--train.output_dir", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["task"] == "vqa" and result["split"]["low_shot"] == 0.5
    student = result["student"]
    assert 0.0 <= student["accuracy"] <= 1.0 and student["count"] == 32
    assert set(student["by_type"]) <= {"yes_no", "colour", "shape"}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the export answers through its own head with transformers alone
    from transformers import ViltForQuestionAnswering

    qa = ViltForQuestionAnswering.from_pretrained(out / "student")
    assert len(qa.config.id2label) == qa.classifier[-1].out_features
    assert "red" in qa.config.id2label.values()
    assert torch.isfinite(next(qa.parameters())).all()
