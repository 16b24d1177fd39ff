"""benchmarks/dcclip_stage2.py: each variant changes only what its name says; its teachers come from the runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from vldistill.config import load_recipe, to_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import dcclip_stage2 as bench


def _recipe() -> dict:
    return to_dict(load_recipe("dcclip"))


def _without(raw: dict, *paths: tuple) -> dict:
    """``raw`` with the given (stage, key) entries removed, to compare the rest."""
    out = json.loads(json.dumps(raw))
    for stage, key in paths:
        out["stages"][stage].pop(key, None)
    return out


def test_recipe_variant_is_the_recipe():
    assert bench.variant_config(_recipe(), "recipe") == _recipe()


def test_stage2_learning_rate_and_towers_change_alone():
    lr = bench.variant_config(_recipe(), "s2_lr=5e-5")
    assert lr["stages"][1]["lr"] == 5e-5
    assert _without(lr, (1, "lr")) == _without(_recipe(), (1, "lr"))
    text = bench.variant_config(_recipe(), "s2_text")
    assert text["stages"][1]["trainable"] == ["text"] and _recipe()["stages"][1]["trainable"] == ["image", "text"]
    assert _without(text, (1, "trainable")) == _without(_recipe(), (1, "trainable"))


def test_loss_variants():
    crd = bench.variant_config(_recipe(), "s2_crd")
    assert [loss["name"] for loss in crd["stages"][1]["losses"]] == ["clip", "crd"]
    load_recipe(raw=crd)  # a valid recipe: crd compares images with texts, and stage 2 is paired
    cosine = bench.variant_config(_recipe(), "fd_cosine")
    assert {loss["options"]["norm"] for loss in cosine["stages"][0]["losses"]} == {"cosine"}
    load_recipe(raw=cosine)


def test_no_stage2_keeps_the_total_steps():
    raw = bench.variant_config(_recipe(), "no_s2")
    assert len(raw["stages"]) == 1
    assert load_recipe(raw=raw).total_steps == load_recipe("dcclip").total_steps


def test_unknown_variant_and_missing_runs_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown variant 's2_lr'"):
        bench.variant_config(_recipe(), "s2_lr")
    with pytest.raises(FileNotFoundError, match=r"quickstart_seeds\.py --teacher-per-seed"):
        bench.teachers_by_seed(tmp_path, [0])
    (tmp_path / "seed0").mkdir()
    setup = {"setup": {"teacher": "reference (trained by the quickstart on all 4000 pairs): runs/t/reference-1/model"}}
    (tmp_path / "seed0" / "results.json").write_text(json.dumps(setup))
    assert bench.teachers_by_seed(tmp_path, [0]) == {0: Path("runs/t/reference-1/model")}


def test_free_text_and_stage1_step_variants_combine():
    raw = _recipe()
    raw["data"]["texts"] = {"en": ["bundled:easyvqa-questions"]}  # as the quickstart gives it
    no_texts = bench.variant_config(json.loads(json.dumps(raw)), "no_texts")
    assert no_texts["data"]["texts"] == {} and no_texts["stages"] == raw["stages"]
    both = bench.variant_config(json.loads(json.dumps(raw)), "no_texts+s1_steps=350")
    assert both["data"]["texts"] == {} and both["stages"][0]["steps"] == 350
    assert _without(both, (0, "steps")) == _without(no_texts, (0, "steps"))
    load_recipe(raw=both)
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        bench.variant_config(_recipe(), "no_texts+nope")
