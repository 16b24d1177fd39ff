"""The ablation benchmark's --smoke mode end to end (tiny teachers, two steps per objective, one seed): seconds."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import benchmark_script


@pytest.fixture(scope="module")
def ablation():
    with benchmark_script("ablation") as module:
        yield module


def test_smoke_run_writes_one_entry_per_objective(tmp_path, ablation):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ablation.main(["--smoke", "--output", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "ablation.json").read_text())
    expected = ["baseline", "fd", "mfd", "crd", "icl", "soft_ce", "clipkd", "dcclip", "two_teachers"]
    assert list(result["objectives"]) == expected
    for name, entry in result["objectives"].items():
        for metric in ("en_top1", "zh_top1", "r1", "agreement", "gain", "wall_seconds"):
            assert set(entry[metric]) == {"mean", "std", "values"}, (name, metric)
            assert len(entry[metric]["values"]) == 1 and entry[metric]["std"] == 0.0
        for metric in ("en_top1", "zh_top1", "r1", "agreement"):
            assert 0.0 <= entry[metric]["mean"] <= 1.0
    assert result["objectives"]["baseline"]["gain"]["mean"] == 0.0
    setup = result["setup"]
    assert setup["smoke"] and setup["seeds"] == [0] and set(setup["teachers"]) == {"reference", "second"}
    assert setup["teachers"]["reference"]["params"] != setup["teachers"]["second"]["params"]
    table = (tmp_path / "ablation.md").read_text()
    assert table.startswith("| objective | EN top-1 |") and all(f"| {name} |" in table for name in expected)
    # the runs distilled: the mfd run logged its masked term, the two-teacher run one fd part per teacher
    rows = [json.loads(x) for x in (tmp_path / "ablation/mfd/seed0/metrics.jsonl").read_text().splitlines()]
    assert "mfd" in rows[-1]
    rows = [json.loads(x) for x in (tmp_path / "ablation/two_teachers/seed0/metrics.jsonl").read_text().splitlines()]
    assert {"fd_image/t0", "fd_image/t1"} <= set(rows[-1])


def test_objective_steps_are_split_like_the_recipe(ablation, tmp_path):
    cfg = ablation.run_config("dcclip", 200, 128, 1, tmp_path, {})
    assert [s.steps for s in cfg.stages] == [183, 17]  # dcclip.yaml's 550:50
    assert cfg.train.seed == 1 and cfg.train.batch_size == 128
    cfg = ablation.run_config("two_teachers", 200, 64, 0, tmp_path, {})
    assert len(cfg.teachers) == 2 and cfg.total_steps == 200 and cfg.train.batch_size == 64
    assert ablation.run_config("baseline", 10, 8, 0, tmp_path, {}).teachers == []


def test_split_leaves_every_stage_a_step(ablation):
    assert ablation._split(2, [150, 50]) == [1, 1]
    assert ablation._split(200, [150, 50]) == [150, 50]
    assert ablation._split(3, [1, 1, 1]) == [1, 1, 1]
