"""The CLIP-TD / MAD benchmark's --smoke mode end to end (tiny teacher and student, 2 tasks, 4 regimes, 3 methods, one
seed, two steps per run: well under a minute), the shape of task_distill.json, and the paired gains."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "task_distill.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vldistill_bench_task_distill", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    bench.main(["--smoke", "--output", str(out)])  # on one thread (--threads 1), then torch's setting again
    assert torch.get_num_threads() == threads
    return out


def test_smoke_run_writes_every_task_regime_and_method_in_the_issues_shape(smoke):
    result = json.loads((smoke / "task_distill.json").read_text())
    assert list(result) == ["vqa", "multiple_choice", "setup"]
    for task in ("vqa", "multiple_choice"):
        assert list(result[task]) == ["low_shot_1", "low_shot_10", "domain_shift", "full"]
        for regime, methods in result[task].items():
            assert list(methods) == ["no_kd", "clip_td", "mad"], (task, regime)
            for method, entry in methods.items():
                assert set(entry["metric"]) == {"mean", "std"} and entry["metric"]["std"] == 0.0
                assert 0.0 <= entry["metric"]["mean"] <= 1.0 and entry["wall_seconds"] > 0
                if method == "no_kd":
                    assert "gain" not in entry
                else:
                    gain = entry["metric"]["mean"] - methods["no_kd"]["metric"]["mean"]
                    assert entry["gain"] == {"mean": pytest.approx(gain), "std": 0.0}
            zs = methods["mad"]["teacher_zero_shot"]
            assert 0.0 <= zs["before"] <= 1.0 and 0.0 <= zs["after"]["mean"] <= 1.0
    setup = result["setup"]
    assert setup["seeds"] == [0] and setup["smoke"] and setup["steps"] == 2
    assert setup["teacher"].startswith("reference teacher") and setup["student"].startswith("vilt-small")
    assert setup["metric"] == {"vqa": "accuracy", "multiple_choice": "q2ar"} and "(1 used)" in setup["machine"]
    assert setup["regimes"]["low_shot_1"]["low_shot"] == 0.01 and setup["regimes"]["domain_shift"]["domain_shift"]


def test_the_three_methods_start_from_the_same_student_and_only_the_distilled_ones_distil(smoke):
    runs = smoke / "task_distill" / "vqa" / "low_shot_10"
    init = {
        m: load_file(runs / m / "seed0" / "student-init" / "model.safetensors") for m in ("no_kd", "clip_td", "mad")
    }
    for name, tensor in init["no_kd"].items():
        assert torch.equal(tensor, init["clip_td"][name]) and torch.equal(tensor, init["mad"][name])
    rows = {m: json.loads((runs / m / "seed0" / "metrics.jsonl").read_text().splitlines()[-1]) for m in init}
    assert "clip_td" not in rows["no_kd"] and "clip_td" in rows["clip_td"] and "clip_td" in rows["mad"]
    assert rows["no_kd"]["step"] == rows["clip_td"]["step"] == rows["mad"]["step"] == 2
    assert (runs / "mad" / "seed0" / "adapted-teacher" / "config.json").is_file()


def test_gains_are_paired_by_seed(bench):
    runs = {
        "no_kd": {0: {"metric": 0.5, "wall_seconds": 2.0}, 1: {"metric": 0.7, "wall_seconds": 4.0}},
        "clip_td": {0: {"metric": 0.6, "wall_seconds": 3.0}, 1: {"metric": 0.7, "wall_seconds": 5.0}},
        "mad": {
            0: {"metric": 0.4, "wall_seconds": 6.0, "teacher_zero_shot_after": 0.3},
            1: {"metric": 0.8, "wall_seconds": 8.0, "teacher_zero_shot_after": 0.5},
        },
    }
    entry = bench.summarise(runs, before=0.2, reason=None)
    assert entry["no_kd"]["metric"] == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1414213562)}
    assert entry["clip_td"]["gain"] == {"mean": pytest.approx(0.05), "std": pytest.approx(0.0707106781)}
    assert entry["mad"]["gain"] == {"mean": pytest.approx(0.0), "std": pytest.approx(0.1414213562)}
    assert entry["mad"]["wall_seconds"] == 7.0 and entry["mad"]["teacher_zero_shot"]["before"] == 0.2
    assert entry["mad"]["teacher_zero_shot"]["after"]["mean"] == pytest.approx(0.4)
    entailment = bench.summarise({"mad": {0: {"metric": 0.5, "wall_seconds": 1.0}}}, None, "no neutral")
    assert entailment["mad"]["teacher_zero_shot"] == {"not_applicable": "no neutral"}
    table = bench.format_table({"vqa": {"full": entry}, "setup": {}})
    assert "+5.0 ± 7.1" in table and "20.0 -> 40.0" in table


def test_run_configs_differ_only_in_the_method(bench, tmp_path):
    args = bench.parse_args(["--output", str(tmp_path)])
    args.split, args.regime_name = bench.REGIMES["low_shot_10"], "low_shot_10"
    configs = {m: bench.run_config("vqa", m, args.split, 1, args, "TEACHER", 20) for m in bench.METHODS}
    assert configs["no_kd"].teachers == [] and [t.name for t in configs["no_kd"].stages[0].losses] == ["task"]
    assert [t.name for t in configs["clip_td"].stages[0].losses] == ["task", "clip_td"]
    assert configs["mad"].adapt is not None and configs["mad"].adapt.batch_size == 20  # at most the pairs
    assert configs["clip_td"].adapt is None and configs["clip_td"].teachers[0].name_or_path == "TEACHER"
    for cfg in configs.values():
        assert cfg.total_steps == 150 and cfg.train.batch_size == 16 and cfg.train.seed == 1
        assert cfg.data.split.low_shot == 0.1 and cfg.data.split.seed == 1
    assert bench.parse_args([]).batch_size["multiple_choice"] == 4


def test_clip_td_options_reach_the_loss_and_parts_merge(bench, tmp_path):
    args = bench.parse_args(["--output", str(tmp_path), "--clip-td", '{"weight": 0.5, "norm": "l2", "k": 4}'])
    args.split, args.regime_name = bench.REGIMES["full"], "full"
    cfg = bench.run_config("vqa", "clip_td", args.split, 0, args, "TEACHER", 20)
    term = next(t for t in cfg.stages[0].losses if t.name == "clip_td")
    assert term.weight == 0.5 and term.options["norm"] == "l2" and term.options["k"] == 4
    assert term.options["reduction"] == "mean"  # the recipe's other options are kept
    # two parts (one task each) merge into one result with both tasks and both commands
    for name, task, wall in (("a", "vqa", 10.0), ("b", "entailment", 30.0)):
        setup = {"command": f"part {name}", "total_wall_seconds": wall, "metric": {task: "accuracy"}, "seeds": [0]}
        bench.write(
            tmp_path / name,
            {task: {"full": {"no_kd": {"metric": {"mean": 0.5, "std": 0.0}, "wall_seconds": 1.0}}}, "setup": setup},
        )
    merged = bench.merge([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    assert list(merged) == ["vqa", "entailment", "setup"]
    assert merged["setup"]["total_wall_seconds"] == 30.0 and len(merged["setup"]["parts"]) == 2
    assert merged["setup"]["metric"] == {"vqa": "accuracy", "entailment": "accuracy"}
    with pytest.raises(SystemExit, match="more than one part"):
        bench.merge([str(tmp_path / "a"), str(tmp_path / "a")], str(tmp_path / "m2"))
