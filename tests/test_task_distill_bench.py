"""The CLIP-TD / MAD benchmark's --smoke mode end to end (tiny teacher and student, 2 tasks, 4 regimes, 3 methods, one
seed, two steps per run: well under a minute), the shape of task_distill.json, and the paired gains."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import ViltConfig, ViltModel

from helpers import benchmark_script
from vldistill.data.sources import load_task_data
from vldistill.students.crossmodal import vilt_image_processor
from vldistill.tokenization import train_wordpiece


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("task_distill") as module:
        yield module


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
            # CLIP-TD distils the unadapted teacher: its zero-shot is MAD's "before", on the same test items
            assert methods["clip_td"]["teacher_zero_shot"]["before"] == zs["before"]
            if task == "multiple_choice":  # the teacher's Q->A and QA->R beside the students'
                assert set(zs["other"]) == {"q2a", "qa2r"} and set(methods["no_kd"]) >= {"q2a", "qa2r"}
                assert 0.0 <= zs["other"]["q2a"]["after"]["mean"] <= 1.0
    setup = result["setup"]
    assert setup["seeds"] == [0] and setup["smoke"] and setup["steps"] == 2
    assert setup["teacher"].startswith("reference teacher") and setup["student"].startswith("vilt-small")
    assert setup["metric"] == {"vqa": "accuracy", "multiple_choice": "q2ar"} and "(1 used)" in setup["machine"]
    assert setup["regimes"]["low_shot_1"]["low_shot"] == 0.01 and setup["regimes"]["domain_shift"]["domain_shift"]
    for task in ("vqa", "multiple_choice"):  # the line the texts alone reach, per regime, beside the methods
        assert list(setup["text_only"][task]) == ["low_shot_1", "low_shot_10", "domain_shift", "full"]
        for line in setup["text_only"][task].values():
            assert 0.0 <= line["mean"] <= 1.0 and len(line["per_seed"]) == 1 and line["std"] == 0.0


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


def test_a_vilt_checkpoint_is_fine_tuned_instead_of_vilt_small_with_its_own_tokenizer(bench, smoke, tmp_path):
    questions = [s.question for s in load_task_data("bundled:easyvqa-vqa", "vqa", split="train", limit=300).samples]
    tokenizer = train_wordpiece(questions, vocab_size=200)
    torch.manual_seed(0)
    config = ViltConfig(
        vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
        image_size=32, patch_size=16, max_position_embeddings=40,
    )  # fmt: skip
    checkpoint = tmp_path / "vilt"
    ViltModel(config).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    vilt_image_processor(32, 16).save_pretrained(checkpoint)
    out = tmp_path / "bench"
    args = ["--smoke", "--tasks", "vqa", "--regimes", "low_shot_10", "--methods", "no_kd", "clip_td"]
    result = bench.main(
        [*args, "--student", str(checkpoint), "--teacher-cache", str(smoke / "teachers"), "--output", str(out)]
    )
    assert result["setup"]["student"] == str(checkpoint)
    for method in ("no_kd", "clip_td"):
        init = out / "task_distill" / "vqa" / "low_shot_10" / method / "seed0" / "student-init"
        assert json.loads((init / "config.json").read_text())["hidden_size"] == 48  # the checkpoint, not vilt-small
        assert json.loads((init / "tokenizer.json").read_text()) == json.loads(tokenizer.backend_tokenizer.to_str())
        assert 0.0 <= result["vqa"]["low_shot_10"][method]["metric"]["mean"] <= 1.0


def vqa(question, answer, answers=None):
    return SimpleNamespace(question=question, answer=answer, answers=answers or [answer])


def test_text_alone_answers_each_question_with_its_most_frequent_training_answer(bench):
    train = [vqa("q1", "a"), vqa("q1", "a"), vqa("q1", "b"), vqa("q2", "c"), vqa("q3", "a")]
    # q1 -> a (2 of 3), q2 -> c, an unseen q4 -> a (the most frequent answer overall)
    assert bench.text_only("vqa", train, [vqa("q1", "a"), vqa("q2", "c"), vqa("q4", "a")]) == {"accuracy": 1.0}
    assert bench.text_only("vqa", train, [vqa("q1", "b"), vqa("q2", "c"), vqa("q4", "c")]) == {"accuracy": 1 / 3}
    hyp = [SimpleNamespace(hypothesis=h, label=y) for h, y in [("h1", 0), ("h1", 0), ("h2", 2)]]
    test = [SimpleNamespace(hypothesis=h, label=y) for h, y in [("h1", 0), ("h2", 1), ("h9", 0)]]
    assert bench.text_only("entailment", hyp, test) == {"accuracy": pytest.approx(2 / 3)}
    # scored by VQA accuracy against every reference answer, as the students are: "a" matches 2 of 4 annotators
    assert bench.text_only("vqa", train, [vqa("q1", "a", ["a", "a", "b", "b"])])["accuracy"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="vqa: no test items"):
        bench.text_only("vqa", train, [])


def test_text_only_writes_the_line_of_every_task_and_regime_without_training(bench, tmp_path):
    result = bench.main(["--smoke", "--text-only", "--output", str(tmp_path)])
    assert json.loads((tmp_path / "text_only.json").read_text()) == json.loads(json.dumps(result))
    assert list(result) == ["vqa", "multiple_choice", "setup"] and not (tmp_path / "task_distill.json").exists()
    for task in ("vqa", "multiple_choice"):
        assert list(result[task]) == ["low_shot_1", "low_shot_10", "domain_shift", "full"]
        assert all(0.0 <= line["mean"] <= 1.0 for line in result[task].values())


def test_first_seed_and_eval_offset_give_new_seeds_and_the_test_items_after_the_first_ones(bench, tmp_path):
    args = bench.parse_args(["--smoke", "--seeds", "2", "--first-seed", "3", "--eval-offset", "10", "--eval-limit=5"])
    assert args.seed_list == [3, 4]
    data = bench.task_data("vqa", args)
    first = load_task_data("bundled:easyvqa-vqa", "vqa", split="test", limit=15, answers=data.train.answers)
    assert [s.question for s in data.test.samples] == [s.question for s in first.samples[10:]]
    assert [s.image for s in data.test.samples] == [s.image for s in first.samples[10:]]
    result = bench.main(["--smoke", "--text-only", "--first-seed", "3", "--seeds", "2", "--output", str(tmp_path)])
    assert result["setup"]["seeds"] == [3, 4]
    whole = bench.task_data("vqa", bench.parse_args(["--smoke"]))
    assert (
        result["vqa"]["low_shot_1"]["per_seed"] == bench.text_only_line("vqa", whole, "low_shot_1", [3, 4])["per_seed"]
    )
    # the low-shot draw follows the seed: seeds 3 and 4 are not seed 0's draw
    draws = [data.regime(bench.replace(bench.REGIMES["low_shot_10"], seed=s))[0].dataset.samples for s in (0, 3, 4)]
    assert draws[1] != draws[0] and draws[2] != draws[0]
    with pytest.raises(SystemExit):
        bench.parse_args(["--eval-offset", "-1"])
    with pytest.raises(SystemExit, match="only"):
        bench.task_data("vqa", bench.parse_args(["--smoke", "--eval-offset", "10000000"]))
    with pytest.raises(SystemExit, match="needs --eval-limit"):
        bench.TaskData("vqa", 400, None, 1000, eval_offset=5)


def test_runs_on_later_seeds_train_those_seeds_and_score_the_teacher_before_mad(bench, smoke, tmp_path):
    argv = ["--smoke", "--tasks", "vqa", "--regimes", "low_shot_10", "--methods", "no_kd", "mad", "--first-seed", "1"]
    result = bench.main(
        [*argv, "--eval-offset", "10", "--output", str(tmp_path), "--teacher-cache", str(smoke / "teachers")]
    )
    entry = result["vqa"]["low_shot_10"]
    assert list(entry["no_kd"]["per_seed"]) == ["1"] and list(entry["mad"]["per_seed"]) == ["1"]
    assert entry["mad"]["teacher_zero_shot"]["before"] is not None
    assert result["setup"]["seeds"] == [1] and result["setup"]["eval_offset"] == 10
    config = json.loads((tmp_path / "task_distill/vqa/low_shot_10/no_kd/seed1/config.json").read_text())
    assert config["train"]["seed"] == 1 and config["data"]["split"]["seed"] == 1
    # parts of one table must agree on the seeds
    other = json.loads((tmp_path / "task_distill.json").read_text())
    other["setup"]["seeds"] = [0]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "task_distill.json").write_text(json.dumps({"entailment": {}, "setup": other["setup"]}))
    with pytest.raises(SystemExit, match="differ in seeds"):
        bench.merge([str(tmp_path), str(tmp_path / "b")], str(tmp_path / "merged"))


def test_text_alone_on_multiple_choice_scores_each_candidate_by_how_often_it_was_right(bench):
    def item(candidates, answer, rationales=(), rationale=-1):
        return SimpleNamespace(
            question="q", candidates=list(candidates), answer_index=answer, rationales=list(rationales),
            rationale_index=rationale,
        )  # fmt: skip

    # "x" was right 2 of 2 times, "y" 0 of 2, "z" never seen; rationale "r1" right 1 of 1 after answer "x"
    train = [item("xy", 0, ["r1", "r2"], 0), item("yx", 1)]
    test = [
        item("yx", 1, ["r2", "r1"], 1),  # picks x (right) and r1 (right)
        item("zx", 1, ["r1", "r3"], 1),  # picks x (right), then r1 over the unseen r3: wrong
        item("zy", 0),  # z (unseen, 0) ties with y (0 of 2): the first, z, is right; no rationales
    ]
    assert bench.text_only("multiple_choice", train, test) == {
        "q2a": 1.0, "qa2r": pytest.approx(1 / 3), "q2ar": pytest.approx(1 / 3)
    }  # fmt: skip


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
    assert entry["clip_td"]["teacher_zero_shot"] == {"before": 0.2}  # the teacher it distils
    assert "teacher_zero_shot" not in entry["no_kd"]
    table = bench.format_table({"vqa": {"full": entry}, "setup": {}})
    assert "+5.0 ± 7.1" in table and "20.0 -> 40.0" in table


def test_multiple_choice_reports_the_teachers_q2a_and_qa2r_beside_the_students(bench):
    def run(metric, q2a, qa2r, **extra):
        return {"metric": metric, "wall_seconds": 1.0, "other": {"q2a": q2a, "qa2r": qa2r}, **extra}

    after = {"teacher_zero_shot_after": 0.3, "teacher_zero_shot_after_other": {"q2a": 0.9, "qa2r": 0.3}}
    runs = {
        "no_kd": {0: run(0.39, 0.44, 0.74)},
        "clip_td": {0: run(0.35, 0.45, 0.63)},
        "mad": {0: run(0.34, 0.41, 0.76, **after)},
    }
    entry = bench.summarise(runs, before=0.277, reason=None, before_other={"q2a": 0.883, "qa2r": 0.3})
    assert entry["clip_td"]["teacher_zero_shot"] == {
        "before": 0.277, "other": {"q2a": {"before": 0.883}, "qa2r": {"before": 0.3}}
    }  # fmt: skip
    mad = entry["mad"]["teacher_zero_shot"]
    assert mad["other"]["q2a"] == {"before": 0.883, "after": {"mean": pytest.approx(0.9), "std": 0.0}}
    assert entry["no_kd"]["q2a"] == {"mean": 0.44, "std": 0.0, "per_seed": {"0": 0.44}}
    assert entry["clip_td"]["q2a"]["gain"] == {"mean": pytest.approx(0.01), "std": 0.0}  # paired with no_kd's seed
    assert entry["mad"]["qa2r"]["gain"]["mean"] == pytest.approx(0.02)
    table = bench.format_table({"multiple_choice": {"low_shot_1": entry}, "setup": {}})
    clip_td = next(line for line in table.splitlines() if " clip_td " in line)
    assert "27.7, q2a 88.3, qa2r 30.0" in clip_td and "q2a 45.0 qa2r 63.0" in clip_td
    assert "27.7 -> 30.0, q2a 88.3 -> 90.0" in next(line for line in table.splitlines() if " mad " in line)


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
        setup["text_only"] = {task: {"full": {"mean": wall / 100, "std": 0.0, "per_seed": [wall / 100]}}}
        bench.write(
            tmp_path / name,
            {task: {"full": {"no_kd": {"metric": {"mean": 0.5, "std": 0.0}, "wall_seconds": 1.0}}}, "setup": setup},
        )
    merged = bench.merge([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    assert list(merged) == ["vqa", "entailment", "setup"]
    assert merged["setup"]["total_wall_seconds"] == 30.0 and len(merged["setup"]["parts"]) == 2
    assert merged["setup"]["metric"] == {"vqa": "accuracy", "entailment": "accuracy"}
    lines = merged["setup"]["text_only"]  # each part's line of the texts alone, kept
    assert {task: line["full"]["mean"] for task, line in lines.items()} == {"vqa": 0.1, "entailment": 0.3}
    with pytest.raises(SystemExit, match="more than one part"):
        bench.merge([str(tmp_path / "a"), str(tmp_path / "a")], str(tmp_path / "m2"))


def test_reevaluate_scores_the_saved_students_again_and_reproduces_the_runs_on_the_same_items(bench, smoke, tmp_path):
    original = json.loads((smoke / "task_distill.json").read_text())
    again = bench.main(["--smoke", "--reevaluate", str(smoke), "--output", str(tmp_path / "again")])
    for task in ("vqa", "multiple_choice"):
        for regime, methods in original[task].items():
            for method, entry in methods.items():
                new = again[task][regime][method]
                assert new["per_seed"] == entry["per_seed"], (task, regime, method)  # the same students, same items
                assert new["wall_seconds"] == entry["wall_seconds"]  # the training's, as the run recorded it
                assert new.get("teacher_zero_shot") == entry.get("teacher_zero_shot"), (task, regime, method)
                for name in ("q2a", "qa2r"):
                    assert new.get(name) == entry.get(name)
    assert again["setup"]["reevaluated"]["sources"] == [str(smoke)]
    assert again["setup"]["text_only"] == original["setup"]["text_only"]
    assert bench.parse_args(["--eval-limit", "all"]).eval_limit is None
    with pytest.raises(SystemExit):
        bench.parse_args(["--eval-limit", "0"])


def test_reevaluate_combines_the_seeds_of_several_runs_into_one_paired_row(bench, smoke, tmp_path):
    later = tmp_path / "seed1"
    argv = ["--smoke", "--tasks", "vqa", "--regimes", "low_shot_10", "--methods", "no_kd", "clip_td", "--first-seed"]
    bench.main([*argv, "1", "--output", str(later), "--teacher-cache", str(smoke / "teachers")])
    out = tmp_path / "both"
    result = bench.main(["--smoke", "--reevaluate", str(smoke), str(later), "--eval-limit", "50", "--output", str(out)])
    entry = result["vqa"]["low_shot_10"]
    assert list(entry["no_kd"]["per_seed"]) == ["0", "1"] and list(entry["clip_td"]["per_seed"]) == ["0", "1"]
    assert list(entry["mad"]["per_seed"]) == ["0"]  # only the first output ran MAD
    paired = [entry["clip_td"]["per_seed"][s] - entry["no_kd"]["per_seed"][s] for s in ("0", "1")]
    assert entry["clip_td"]["gain"]["mean"] == pytest.approx(sum(paired) / 2)
    assert result["setup"]["seeds"] == [0, 1] and result["setup"]["eval_items"] == {"vqa": 50, "multiple_choice": 50}
    assert len(result["setup"]["text_only"]["vqa"]["low_shot_10"]["per_seed"]) == 2
    assert json.loads((out / "task_distill.json").read_text()) == result
    # what cannot make one table
    with pytest.raises(SystemExit, match="scored once"):
        bench.main(["--smoke", "--reevaluate", str(smoke), str(smoke), "--output", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="another directory"):
        bench.main(["--smoke", "--reevaluate", str(smoke), "--output", str(smoke)])
    with pytest.raises(SystemExit, match=r"no task_distill\.json"):
        bench.main(["--smoke", "--reevaluate", str(tmp_path), "--output", str(tmp_path / "x")])
    steps = json.loads((later / "task_distill.json").read_text())
    steps["setup"]["steps"] = 3
    bench.write(tmp_path / "other", steps)
    with pytest.raises(SystemExit, match="differ in steps"):
        bench.main(["--smoke", "--reevaluate", str(smoke), str(tmp_path / "other"), "--output", str(tmp_path / "x")])
    shutil.rmtree(later / "task_distill" / "vqa" / "low_shot_10" / "clip_td" / "seed1" / "student")
    with pytest.raises(SystemExit, match="holds no saved student"):
        bench.main(["--smoke", "--reevaluate", str(later), "--output", str(tmp_path / "x")])
