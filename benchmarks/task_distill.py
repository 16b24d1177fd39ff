"""CLIP-TD and MAD on the bundled task data: one table and ``runs/bench/task_distill.json``.

For each task (``vqa``, ``entailment``, ``multiple_choice``), regime (``low_shot_1``: 1% of the training items,
``low_shot_10``: 10%, ``domain_shift``: the held-out colour-shape combinations, ``full``) and seed, three methods
fine-tune the same cross-modal student (``vilt-small``: the same tokenizer, trained once per task on its training
texts, and the same initial weights per seed; or ``--student ID_OR_PATH``, a ViLT checkpoint with its own tokenizer
and image processor and a new task head, as the papers fine-tune a pretrained model; ``benchmarks/pretrain_vilt.py``
makes one offline) for the same steps at the same batch size on the same training items:

- ``no_kd``: the task loss alone (no teacher);
- ``clip_td``: the task loss + ``clip_td`` from the frozen teacher (``recipes/cliptd-*.yaml``);
- ``mad``: the teacher first adapted to the training items of the regime (``adapt:``, ``vldistill.train.mad``), then
  ``clip_td`` from the adapted teacher.

The seed sets the student's initialisation, the data order and the low-shot draw (``data.split.seed``), the same for
the three methods, so ``gain`` (metric minus the same seed's ``no_kd``) is paired. Metrics on the bundled test split
(under a domain shift, its held-out items only): VQA accuracy, entailment accuracy, multiple choice Q->AR accuracy
(VCR's protocol: an item counts when the student picks the right answer (Q->A) and, given it, the right rationale
(QA->R); one student trains on both kinds of sample, ``data.rationales``; Q->A and QA->R are in the JSON too).
Beside CLIP-TD and MAD, the teacher's zero-shot metric on the same test items (``teacher_zero_shot``: ``before``, the
teacher CLIP-TD distils; for MAD also ``after``, the adapted one; for multiple choice Q->A and QA->R too, under
``other``: a teacher can know one far better than the other); VQA and multiple choice only, since a similarity cannot
answer entailment's "neutral".

Beside the methods, the line the texts alone reach (``text_only``, no image, no training: a lookup of each test
question's most frequent training answer, each hypothesis's most frequent label, each question + candidate's rate of
being right; the same training items per seed) is written to ``setup.text_only``: a student at or below it has not
learnt to use the image. ``--text-only`` computes that line alone (seconds) into ``OUTPUT/text_only.json``.

The teacher is the quickstart's reference teacher (trained once and cached in ``runs/teachers/``, shared with
``vldistill quickstart`` and ``benchmarks/ablation.py``), or ``--teacher ID_OR_PATH``.

Usage::

    .venv/bin/python benchmarks/task_distill.py              # the full benchmark (sizes below)
    .venv/bin/python benchmarks/task_distill.py --smoke      # tiny sizes, 1 seed, 2 tasks: under a minute
    .venv/bin/python benchmarks/task_distill.py --tasks vqa --regimes low_shot_1 full --seeds 2
    .venv/bin/python benchmarks/task_distill.py --student dandelin/vilt-b32-mlm --teacher openai/clip-vit-base-patch32
    .venv/bin/python benchmarks/task_distill.py --first-seed 3 --eval-offset 300   # new seeds, the next test items
    .venv/bin/python benchmarks/task_distill.py --reevaluate runs/bench runs/bench-s3 --eval-limit all \
        --output runs/bench-all                    # the saved students of both, on every test item, no training

Default sizes: every training item of each task (VQA 38,575 questions, entailment 12,000 pairs, multiple choice
4,000 items; 1% of them is 385 / 120 / 40), 150 steps per run at batch 16 (VQA, entailment) or 4 (multiple choice:
4 candidates each, and with rationales half the samples are QA->R), MAD's adaptation 20 steps at batch 32 (at most
the regime's adaptation pairs), the first 300 test items of each task, one CPU thread (``--threads``). At 50 steps
every method stayed at chance; 300 steps did not fit. Measured 2026-11-30 (``runs/bench/task_distill.json``, nothing
else running): three processes, one per task (``--tasks vqa``, ``--tasks entailment``, ``--tasks multiple_choice``,
each with its own ``--output``), then ``--merge``: 35 min 37 s wall for the whole benchmark (the processes took 2,126,
1,858 and 2,137 s). Two threads on a busy machine were about 6 times slower per step than one, hence
``--threads 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from vldistill import __version__
from vldistill.config import RecipeConfig, SplitConfig, load_recipe, to_dict
from vldistill.data.sources import LabelledData, load_data, load_task_data
from vldistill.data.splits import apply_split
from vldistill.models import DualEncoder, as_teacher, load_teacher
from vldistill.students import load_student, prepare_student
from vldistill.tasks import get_task
from vldistill.tasks.metrics import vqa_accuracy
from vldistill.tasks.predict import task_predictor
from vldistill.tokenization import train_wordpiece
from vldistill.train.fit import fit_recipe, tokenizer_corpus
from vldistill.train.mad import AdaptationPairs, zero_shot
from vldistill.train.quickstart import reference_teacher_dir

TASKS = {
    "vqa": ("cliptd-vqa", "bundled:easyvqa-vqa"),
    "entailment": ("cliptd-ve", "bundled:easyvqa-entailment"),
    "multiple_choice": ("cliptd-mc", "bundled:easyvqa-mc"),
}
REGIMES = {
    "low_shot_1": SplitConfig(low_shot=0.01),
    "low_shot_10": SplitConfig(low_shot=0.1),
    "domain_shift": SplitConfig(domain_shift="combos"),
    "full": SplitConfig(),
}
METHODS = ("no_kd", "clip_td", "mad")
HEADLINE = {"vqa": "accuracy", "entailment": "accuracy", "multiple_choice": "q2ar"}
#: Reported beside the headline.
OTHER = {"multiple_choice": ("q2a", "qa2r")}

DEFAULTS = {
    "steps": 150,
    "batch_size": {"vqa": 16, "entailment": 16, "multiple_choice": 4},
    "adapt_steps": 20,
    "adapt_batch_size": 32,
    "train_limit": None,
    "eval_limit": 300,
    "seeds": 3,
}
# --smoke: a tiny student and teacher, two tasks, one seed, two steps: the whole pipeline in well under a minute.
SMOKE = {
    "steps": 2,
    "batch_size": {"vqa": 4, "entailment": 4, "multiple_choice": 4},
    "adapt_steps": 2,
    "adapt_batch_size": 4,
    "train_limit": 400,
    "eval_limit": 96,
    "seeds": 1,
    "tasks": ["vqa", "multiple_choice"],
}
SMOKE_STUDENT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
SMOKE_TEACHER = {
    "stages.0.steps": 2,
    "train.batch_size": 16,
    "student.overrides": {"vision.num_hidden_layers": 1, "text.num_hidden_layers": 1},
    "train.progress": False,
}


# ------------------------------------------------------------------------------------------------------------ data
class TaskData:
    """One task's training and test items (loaded once) and its tokenizer; the regimes are cut from them."""

    def __init__(
        self, task: str, train_limit: int | None, eval_limit: int | None, vocab_size: int, eval_offset: int = 0
    ):
        self.task = task
        kind_source = TASKS[task][1]
        self.train = load_task_data(kind_source, task, split="train", limit=train_limit)
        answers = self.train.answers or None
        # A smaller limit gives a prefix of a larger one, so the items after the first eval_offset are new ones. Without
        # a limit the bundled items come in another order (by image id), so an offset would not mean the same items.
        if eval_offset and eval_limit is None:
            raise SystemExit("--eval-offset needs --eval-limit: the offset counts items in the limited order")
        limit = None if eval_limit is None else eval_offset + eval_limit
        test = load_task_data(kind_source, task, split="test", limit=limit, answers=answers)
        if eval_offset >= len(test):
            raise SystemExit(f"--eval-offset {eval_offset}: the {task} test split has only {len(test)} items")
        self.test = test.subset(range(eval_offset, len(test))) if eval_offset else test
        self.tokenizer = train_wordpiece(tokenizer_corpus(LabelledData(self.train), []), vocab_size=vocab_size)
        self._regimes: dict[str, tuple[LabelledData, LabelledData]] = {}

    def regime(self, split: SplitConfig) -> tuple[LabelledData, LabelledData]:
        """The training items of a regime and the test items it is evaluated on (under a domain shift, the
        held-out ones only). Cut once per split and seed: the text-alone line and the runs share the draw."""
        key = repr(split)  # SplitConfig holds a list, so it is not hashable
        if key not in self._regimes:
            self._regimes[key] = self._cut(split)
        return self._regimes[key]

    def _cut(self, split: SplitConfig) -> tuple[LabelledData, LabelledData]:
        train = self.train
        if split.low_shot is not None or split.domain_shift is not None:
            train = apply_split(split, self.train, None)[0]
        test = self.test
        if split.domain_shift is not None:
            test = apply_split(replace(split, low_shot=None), self.train, self.test)[1]
        return LabelledData(train), LabelledData(test)


# ------------------------------------------------------------------------------------------------- texts alone
class Lookup:
    """The most frequent value seen with each key; ``fallback`` (the most frequent value overall) for new keys."""

    def __init__(self, pairs: Iterable[tuple[Hashable, Hashable]]):
        self.by_key: dict[Hashable, Counter] = defaultdict(Counter)
        overall: Counter = Counter()
        for key, value in pairs:
            self.by_key[key][value] += 1
            overall[value] += 1
        self.fallback = overall.most_common(1)[0][0] if overall else None

    def __call__(self, key: Hashable) -> Hashable:
        seen = self.by_key.get(key)
        return seen.most_common(1)[0][0] if seen else self.fallback


def _pick(rate: dict[tuple, list[int]], keys: Sequence[tuple]) -> int:
    """The candidate whose key was right most often in training (``[right, seen]``; unseen: 0); ties: the first."""
    scores = [rate[k][0] / rate[k][1] if rate.get(k) else 0.0 for k in keys]
    return max(range(len(keys)), key=lambda i: (scores[i], -i))


def text_only(task: str, train: Sequence[Any], test: Sequence[Any]) -> dict[str, float]:
    """The lookup's metrics on ``test`` (``accuracy``; multiple choice ``q2a``, ``qa2r``, ``q2ar``)."""
    if not test:
        raise ValueError(f"{task}: no test items")
    if task == "vqa":
        guess = Lookup((s.question, s.answer) for s in train)  # scored as the benchmark scores the students
        return {"accuracy": sum(vqa_accuracy(str(guess(s.question)), s.answers) for s in test) / len(test)}
    if task == "entailment":
        guess = Lookup((s.hypothesis, s.label) for s in train)
        return {"accuracy": sum(guess(s.hypothesis) == s.label for s in test) / len(test)}
    rate: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for s in train:
        right = s.candidates[s.answer_index]
        for keys, index in (
            ([(s.question, c) for c in s.candidates], s.answer_index),
            ([(s.question, right, r) for r in s.rationales], s.rationale_index),
        ):
            for i, key in enumerate(keys):
                rate[key][0] += int(i == index)
                rate[key][1] += 1
    q2a = qa2r = both = 0
    for s in test:
        a = _pick(rate, [(s.question, c) for c in s.candidates]) == s.answer_index
        right = s.candidates[s.answer_index]
        r = bool(s.rationales) and _pick(rate, [(s.question, right, x) for x in s.rationales]) == s.rationale_index
        q2a, qa2r, both = q2a + a, qa2r + r, both + (a and r)
    n = len(test)
    return {"q2a": q2a / n, "qa2r": qa2r / n, "q2ar": both / n}


def text_only_line(task: str, data: TaskData, regime: str, seeds: Sequence[int]) -> dict[str, Any]:
    """:func:`text_only`'s headline metric over the regime's training draw of each seed: mean, std and per seed."""
    values = []
    for seed in seeds:
        train, test = data.regime(replace(REGIMES[regime], seed=seed))
        values.append(text_only(task, train.dataset.samples, test.dataset.samples)[HEADLINE[task]])
    return {**stats(values), "per_seed": values}


# ------------------------------------------------------------------------------------------------------------ runs
def run_config(
    task: str, method: str, split: SplitConfig, seed: int, args: argparse.Namespace, teacher: str, n_pairs: int
) -> RecipeConfig:
    """The recipe of one run: ``recipes/cliptd-*.yaml`` at the benchmark's sizes, without the teacher for ``no_kd``,
    with an ``adapt:`` section for ``mad``."""
    recipe, _ = TASKS[task]
    base = load_recipe(recipe)
    overrides: dict[str, Any] = {
        "data.split": {**_split_dict(split), "seed": seed},
        "data.limit_train": args.train_limit,
        "data.limit_eval": args.eval_limit,
        "stages.0.steps": args.steps,
        "train.batch_size": args.batch_size[task],
        "train.warmup_steps": min(base.train.warmup_steps, max(args.steps // 10, 1)),
        "train.seed": seed,
        "train.progress": False,
        "train.tensorboard": False,
        "train.log_every": max(args.steps // 4, 1),
        "train.output_dir": str(Path(args.output) / "task_distill" / task / args.regime_name / method / f"seed{seed}"),
    }
    if args.student:  # a ViLT checkpoint: its own architecture, tokenizer and image processor
        overrides["student.name_or_path"] = args.student
    elif args.smoke:
        overrides["student.overrides"] = SMOKE_STUDENT
    if method == "no_kd":
        overrides["teachers"] = []
        overrides["stages.0.losses"] = [{"name": "task"}]
    else:
        overrides["teacher.name_or_path"] = teacher
        if args.clip_td:
            losses = [dict(x) for x in to_dict(base)["stages"][0]["losses"]]
            for loss in losses:
                if loss["name"] == "clip_td":
                    for key, value in args.clip_td.items():
                        (loss if key in ("weight", "label") else loss["options"])[key] = value
            overrides["stages.0.losses"] = losses
    if method == "mad":
        overrides["adapt"] = {
            "steps": args.adapt_steps,
            "batch_size": min(args.adapt_batch_size, n_pairs),
            "lr": 1e-4,
            "warmup_steps": min(10, args.adapt_steps // 5),
        }
    return load_recipe(recipe, overrides)


def zero_shot_recipe(task: str) -> RecipeConfig:
    """The recipe a teacher's zero-shot on ``task`` is scored with (before and after MAD): the task's, batches of 64."""
    return load_recipe(TASKS[task][0], {"eval.batch_size": 64})


def _split_dict(split: SplitConfig) -> dict[str, Any]:
    return {"low_shot": split.low_shot, "domain_shift": split.domain_shift, "hold_out": list(split.hold_out)}


def run_one(
    task: str,
    method: str,
    seed: int,
    args: argparse.Namespace,
    data: TaskData,
    train: LabelledData,
    test: LabelledData,
    teacher_dir: str,
    teacher,
) -> dict[str, Any]:
    """Train one method with one seed, evaluate it; returns the metric, the wall seconds and (MAD) the adapted
    teacher's zero-shot metric."""
    n_pairs = len(AdaptationPairs(train.dataset, task))
    cfg = run_config(task, method, args.split, seed, args, teacher_dir, n_pairs)
    shutil.rmtree(cfg.train.output_dir, ignore_errors=True)
    start = time.perf_counter()
    # The same initial student for the three methods (prepare_student seeds with train.seed) and one tokenizer
    # (a checkpoint's own with --student).
    tokenizer = None if args.student else data.tokenizer
    student = prepare_student(cfg, tokenizer=tokenizer, answers=data.train.answers or None)
    teachers = [] if method == "no_kd" else [teacher]
    summary = fit_recipe(
        cfg, teachers=teachers, student=student, train_data=train, evaluate_after=False, overwrite=True
    )
    predict = task_predictor(student, task)
    metrics = get_task(task).evaluate(predict, test.dataset, batch_size=cfg.eval.batch_size)
    out: dict[str, Any] = {"metric": metrics[HEADLINE[task]], "wall_seconds": time.perf_counter() - start}
    out["other"] = {name: metrics[name] for name in OTHER.get(task, ()) if name in metrics}
    if method == "mad" and task != "entailment":
        adapted = as_teacher(DualEncoder.from_pretrained(summary["adapt"]["adapted_teacher"]))
        after = zero_shot(adapted, cfg, test, data.train.answers)
        out["teacher_zero_shot_after"] = after[HEADLINE[task]]
        out["teacher_zero_shot_after_other"] = {name: after[name] for name in OTHER.get(task, ()) if name in after}
    return out


# ------------------------------------------------------------------------------------------------------ summaries
def stats(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(
    runs: dict[str, dict[int, dict[str, Any]]],
    before: float | None,
    reason: str | None,
    before_other: dict[str, float] | None = None,
) -> dict:
    """One regime's entry: per method the metric's mean and std, the gain over the same seed's ``no_kd`` (not for
    ``no_kd`` itself) and the mean wall seconds; the methods with a teacher also its zero-shot metric (``before``,
    the teacher they distil; MAD ``after`` too, the adapted one), and under ``other`` the task's other metrics
    (multiple choice: Q->A and QA->R, ``before_other``), so that a teacher is compared with the students on each."""
    entry: dict[str, Any] = {}
    base = runs.get("no_kd", {})
    for method, per_seed in runs.items():
        seeds = sorted(per_seed)
        e: dict[str, Any] = {"metric": stats([per_seed[s]["metric"] for s in seeds])}
        if method != "no_kd":
            paired = [per_seed[s]["metric"] - base[s]["metric"] for s in seeds if s in base]
            if paired:
                e["gain"] = stats(paired)
        e["wall_seconds"] = statistics.fmean(per_seed[s]["wall_seconds"] for s in seeds)
        e["per_seed"] = {str(s): per_seed[s]["metric"] for s in seeds}
        for name in per_seed[seeds[0]].get("other", {}):  # e.g. Q->A, QA->R: per seed, and paired gains too
            e[name] = stats([per_seed[s]["other"][name] for s in seeds])
            e[name]["per_seed"] = {str(s): per_seed[s]["other"][name] for s in seeds}
            paired = [v["other"][name] - base[s]["other"][name] for s, v in per_seed.items() if s in base]
            if method != "no_kd" and paired:
                e[name]["gain"] = stats(paired)
        if method == "mad":
            after = [per_seed[s]["teacher_zero_shot_after"] for s in seeds if "teacher_zero_shot_after" in per_seed[s]]
            e["teacher_zero_shot"] = (
                {"before": before, "after": stats(after)} if after else {"not_applicable": reason or "not measured"}
            )
        elif method == "clip_td" and (before is not None or reason):
            e["teacher_zero_shot"] = {"before": before} if before is not None else {"not_applicable": reason}
        if "before" in e.get("teacher_zero_shot", {}) and before_other:
            e["teacher_zero_shot"]["other"] = {name: {"before": value} for name, value in before_other.items()}
            for name, zs in e["teacher_zero_shot"]["other"].items():
                after = [per_seed[s].get("teacher_zero_shot_after_other", {}).get(name) for s in seeds]
                if None not in after:  # MAD's runs measure the adapted teacher
                    zs["after"] = stats(after)
        entry[method] = e
    return entry


def _zero_shot(zs: dict[str, Any]) -> str:
    """A teacher's zero-shot metric in the table: ``27.7``, ``27.7 -> 24.7`` (MAD: before -> after adapting) or n/a."""
    if "before" not in zs:
        return "n/a"
    before = f"{100 * zs['before']:.1f}"
    return f"{before} -> {100 * zs['after']['mean']:.1f}" if "after" in zs else before


def format_table(result: dict[str, Any]) -> str:
    """Rows task / regime / method: metric, gain over no_kd (points, mean ± std) and whether it exceeds 2 std."""
    header = [
        "task", "regime", "method", "metric %", "gain (points)", "> 2 std", "wall s", "teacher zero-shot",
        "text alone %", "other metrics %",
    ]  # fmt: skip
    text_lines = result.get("setup", {}).get("text_only", {})
    rows = []
    for task, regimes in result.items():
        if task == "setup":
            continue
        for regime, methods in regimes.items():
            line = text_lines.get(task, {}).get(regime)
            text_alone = f"{100 * line['mean']:.1f}" if line else ""
            for method, e in methods.items():
                m, g = e["metric"], e.get("gain")
                gain = f"{100 * g['mean']:+.1f} ± {100 * g['std']:.1f}" if g else "-"
                beyond = "-" if not g else ("yes" if abs(g["mean"]) > 2 * g["std"] and g["std"] > 0 else "no")
                zs = e.get("teacher_zero_shot", {})
                zs_text = ", ".join(
                    [_zero_shot(zs)] + [f"{name} {_zero_shot(other)}" for name, other in zs.get("other", {}).items()]
                )
                also = " ".join(f"{name} {100 * e[name]['mean']:.1f}" for name in OTHER.get(task, ()) if name in e)
                rows.append(
                    [task, regime, method, f"{100 * m['mean']:.1f} ± {100 * m['std']:.1f}", gain, beyond,
                     f"{e['wall_seconds']:.0f}", zs_text if zs else "", text_alone, also]
                )  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- the run
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=None, metavar="TASK")
    p.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES), metavar="REGIME")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="METHOD")
    p.add_argument("--seeds", type=int, default=None, help=f"how many seeds (default {DEFAULTS['seeds']})")
    p.add_argument("--first-seed", type=int, default=0, help="the seeds are FIRST..FIRST+N-1 (default 0)")
    p.add_argument("--steps", type=int, default=None, help=f"steps per run (default {DEFAULTS['steps']})")
    p.add_argument("--adapt-steps", type=int, default=None, help=f"MAD adaptation steps ({DEFAULTS['adapt_steps']})")
    p.add_argument("--train-limit", type=int, default=None, help="training items per task (default: all)")
    p.add_argument(
        "--eval-limit", type=_eval_limit, default=None,
        help=f"test items per task ({DEFAULTS['eval_limit']}; 'all': the whole test split)",
    )  # fmt: skip
    p.add_argument(
        "--eval-offset", type=int, default=0,
        help="skip the first N test items (e.g. 300: the next --eval-limit items, unseen by the default runs)",
    )  # fmt: skip
    p.add_argument("--teacher", default=None, help="hub id or directory of the teacher (default: the reference one)")
    p.add_argument(
        "--student", default=None, metavar="ID_OR_PATH",
        help="a ViLT checkpoint (hub id or directory, e.g. a pretrained one) to fine-tune instead of a new vilt-small",
    )  # fmt: skip
    p.add_argument("--output", default="runs/bench", help="writes OUTPUT/task_distill.json (default: runs/bench)")
    p.add_argument("--teacher-cache", default=None, help="reference teacher cache (runs/teachers; --smoke: OUTPUT)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1: see the docstring)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 seed, 2 tasks: under a minute")
    p.add_argument(
        "--text-only", action="store_true",
        help="only the line the texts alone reach (no image, no training) into OUTPUT/text_only.json: seconds",
    )  # fmt: skip
    p.add_argument(
        "--merge", nargs="+", default=None, metavar="DIR",
        help="combine the task_distill.json of runs made in parts (e.g. one process per task) into OUTPUT",
    )  # fmt: skip
    p.add_argument(
        "--reevaluate", nargs="+", default=None, metavar="DIR",
        help="score the saved students of finished runs (OUTPUT dirs) on the test items of --eval-limit /\n"
        "--eval-offset, without training; the seeds of several dirs combine into one row",
    )  # fmt: skip
    p.add_argument(
        "--clip-td", type=json.loads, default={}, metavar="JSON",
        help='options of the clip_td loss over the recipes\' (e.g. \'{"weight": 0.5, "norm": "l2"}\')',
    )  # fmt: skip
    args = p.parse_args(argv)
    sizes = {**DEFAULTS, **(SMOKE if args.smoke else {})}
    for key in ("seeds", "steps", "adapt_steps", "train_limit", "eval_limit", "tasks"):
        if getattr(args, key, None) is None:
            setattr(args, key, sizes.get(key, list(TASKS)))
    if args.eval_limit == ALL:
        args.eval_limit = None  # TaskData and data.limit_eval: no limit
    args.batch_size, args.adapt_batch_size = sizes["batch_size"], sizes["adapt_batch_size"]
    if args.steps < 1 or args.seeds < 1 or args.adapt_steps < 1 or args.threads < 1:
        p.error("--steps, --adapt-steps, --seeds and --threads must be at least 1")
    if args.first_seed < 0 or args.eval_offset < 0:
        p.error("--first-seed and --eval-offset must be at least 0")
    args.seed_list = list(range(args.first_seed, args.first_seed + args.seeds))
    return args


ALL = "all"


def _eval_limit(text: str) -> int | str:
    """``--eval-limit``: a positive count or ``all``."""
    if text == ALL:
        return ALL
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of test items or 'all', got {text!r}")
    return int(text)


def get_teacher(args: argparse.Namespace) -> tuple[str, Any, str]:
    """The teacher's directory or id, the loaded teacher and a description."""
    if args.teacher:
        return args.teacher, load_teacher(args.teacher), args.teacher
    cache = Path(args.teacher_cache or (Path(args.output) / "teachers" if args.smoke else "runs/teachers"))
    pairs = load_data("bundled:easyvqa", "train", ["en"], limit=256 if args.smoke else None)
    overrides = {"train.seed": 0, **(SMOKE_TEACHER if args.smoke else {})}
    path, _ = reference_teacher_dir(pairs, overrides, False, cache)
    return str(path), load_teacher(path), f"reference teacher (recipes/reference-teacher.yaml): {path}"


def merge(parts: Sequence[str], output: str) -> dict[str, Any]:
    """One result from runs made in parts (``--tasks`` split over processes, each with its own ``--output``): the
    tasks of every part, and a setup that keeps each part's command and wall seconds."""
    result: dict[str, Any] = {}
    setups = []
    for part in parts:
        data = json.loads((Path(part) / "task_distill.json").read_text())
        setups.append(data.pop("setup"))
        for task, regimes in data.items():
            if task in result:
                raise SystemExit(f"--merge: task {task!r} is in more than one part ({part})")
            result[task] = regimes
    for key in ("seeds", "steps", "eval_offset", "student", "teacher"):
        values = {json.dumps(s.get(key)) for s in setups}
        if len(values) > 1:
            raise SystemExit(f"--merge: the parts differ in {key} ({', '.join(sorted(values))}); one table needs one")
    setup = dict(setups[0])
    for key in ("batch_size", "metric", "train_items", "eval_items", "text_only"):
        setup[key] = {k: v for s in setups for k, v in s.get(key, {}).items()}
    setup["parts"] = [{"command": s["command"], "total_wall_seconds": s.get("total_wall_seconds")} for s in setups]
    setup["command"] = " && ".join(s["command"] for s in setups) + " (run at the same time), then --merge"
    setup["total_wall_seconds"] = max(s.get("total_wall_seconds") or 0 for s in setups)
    final = {task: result[task] for task in TASKS if task in result}
    final["setup"] = setup
    write(Path(output), final)
    print("\n" + format_table(final) + "\n", flush=True)
    print(f"[task_distill] merged {len(parts)} parts into {Path(output) / 'task_distill.json'}", flush=True)
    return final


# ------------------------------------------------------------------------------------------------ re-evaluation
#: Settings that must agree between the outputs whose students one re-evaluation combines into one table.
SAME_RUNS = ("steps", "student", "teacher", "clip_td_options", "adapt", "smoke")


def _teacher_path(setup: dict[str, Any]) -> str:
    """The teacher a finished output distilled: ``teacher_path``, or (outputs written before it was recorded) the
    path that ends the reference teacher's description, or the hub id / directory given by ``--teacher``."""
    if setup.get("teacher_path"):
        return setup["teacher_path"]
    teacher = setup["teacher"]
    return teacher.rsplit(": ", 1)[-1] if teacher.startswith("reference teacher") else teacher


def reevaluate(sources: Sequence[str], args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    """``--reevaluate``: score the students that finished runs saved (``DIR/task_distill/TASK/REGIME/METHOD/seedN/
    student``, every run listed in ``DIR/task_distill.json``) on the test items of ``--eval-limit`` /
    ``--eval-offset``, with no training, and write the table and JSON of a run. The seeds of several dirs (e.g. seeds
    0-2 and 3-5, first scored on different test items) combine into one row, scored on the same items; their
    settings (:data:`SAME_RUNS`) must agree. ``wall_seconds`` is each run's training time as its output recorded it
    (a method's mean over that output's seeds); the teacher's zero-shot metric is scored again on the new items with
    the teacher the runs distilled (MAD: the adapted teacher each run saved)."""
    start = time.perf_counter()
    out = Path(args.output)
    loaded = []
    for source in sources:
        path = Path(source)
        if path.resolve() == out.resolve():
            raise SystemExit(f"--reevaluate {source}: --output must be another directory (it would be overwritten)")
        if not (path / "task_distill.json").is_file():
            raise SystemExit(f"--reevaluate {source}: no task_distill.json there (expected a finished run's --output)")
        loaded.append((path, json.loads((path / "task_distill.json").read_text())))
    for key in SAME_RUNS:
        values = {json.dumps(result["setup"].get(key), sort_keys=True) for _, result in loaded}
        if len(values) > 1:
            joined = ", ".join(sorted(values))
            raise SystemExit(f"--reevaluate: the runs differ in {key} ({joined}); one table needs one")
    setup0 = loaded[0][1]["setup"]
    # (task, regime) -> method -> seed -> (the run's directory, its recorded wall seconds)
    found: dict[tuple[str, str], dict[str, dict[int, tuple[Path, float]]]] = {}
    for path, result in loaded:
        for task, regimes in result.items():
            if task == "setup":
                continue
            for regime, methods in regimes.items():
                for method, entry in methods.items():
                    for seed in entry.get("per_seed", {}):
                        runs = found.setdefault((task, regime), {}).setdefault(method, {})
                        if int(seed) in runs:
                            raise SystemExit(
                                f"--reevaluate: {task} {regime} {method} seed {seed} is in {runs[int(seed)][0]} and "
                                f"{path}; each run may be scored once"
                            )
                        run_dir = path / "task_distill" / task / regime / method / f"seed{seed}"
                        runs[int(seed)] = (run_dir, entry["wall_seconds"])
    if not found:
        raise SystemExit(f"--reevaluate: no runs listed in {', '.join(sources)}")
    teacher = None
    if any({"clip_td", "mad"} & set(methods) for methods in found.values()):
        teacher = load_teacher(_teacher_path(setup0))
    tasks = [t for t in TASKS if any(task == t for task, _ in found)]
    seeds = sorted({seed for methods in found.values() for runs in methods.values() for seed in runs})
    result: dict[str, Any] = {}
    setup = dict(setup0)
    setup.update(
        seeds=seeds,
        command=" ".join(["python benchmarks/task_distill.py", *(argv if argv is not None else sys.argv[1:])]),
        eval_items={},
        eval_offset=args.eval_offset,
        text_only={},
        reevaluated={
            "sources": [str(path) for path, _ in loaded],
            "commands": [r["setup"].get("command") for _, r in loaded],
            "training_wall_seconds": [r["setup"].get("total_wall_seconds") for _, r in loaded],
        },
    )
    setup["batch_size"] = {k: v for _, r in loaded for k, v in r["setup"].get("batch_size", {}).items()}
    setup["regimes"] = {k: v for _, r in loaded for k, v in r["setup"].get("regimes", {}).items()}
    setup["metric"] = {t: HEADLINE[t] for t in tasks}
    setup.pop("total_wall_seconds", None)
    for task in tasks:
        data = task_data(task, args)
        trained_on = {r["setup"].get("train_items", {}).get(task) for _, r in loaded} - {None}
        if trained_on and trained_on != {len(data.train)}:
            raise SystemExit(
                f"--reevaluate: the runs of {task} had {sorted(trained_on)} training items, this data {len(data.train)}"
                " (pass their --train-limit): the low-shot draws and the answer list would differ"
            )
        setup["eval_items"][task] = len(data.test)
        batch_size = load_recipe(TASKS[task][0]).eval.batch_size
        for regime in [r for r in REGIMES if (task, r) in found]:
            methods = found[(task, regime)]
            regime_seeds = sorted({seed for runs in methods.values() for seed in runs})
            setup["text_only"].setdefault(task, {})[regime] = text_only_line(task, data, regime, regime_seeds)
            _, test = data.regime(replace(REGIMES[regime], seed=regime_seeds[0]))
            before, reason, before_other = None, None, None
            if teacher is not None and {"clip_td", "mad"} & set(methods):
                zs = zero_shot(teacher, zero_shot_recipe(task), test, data.train.answers)
                before, reason = zs.get(HEADLINE[task]), zs.get("not_applicable")
                before_other = {name: zs[name] for name in OTHER.get(task, ()) if name in zs}
            runs: dict[str, dict[int, dict[str, Any]]] = {}
            for method in [m for m in METHODS if m in methods]:
                for seed, (run_dir, wall) in sorted(methods[method].items()):
                    _, test = data.regime(replace(REGIMES[regime], seed=seed))
                    r = score_saved(task, run_dir, test, data, batch_size)
                    runs.setdefault(method, {})[seed] = {**r, "wall_seconds": wall}
                    print(f"[task_distill] {task} {regime} {method} seed {seed}: {100 * r['metric']:.1f} on "
                          f"{len(test.dataset)} test items ({run_dir})", flush=True)  # fmt: skip
            result.setdefault(task, {})[regime] = summarise(runs, before, reason, before_other)
            setup["reevaluated"]["wall_seconds"] = round(time.perf_counter() - start, 1)
            write(out, {**result, "setup": setup})  # after every regime: an interrupted run keeps what it has
    final = {**result, "setup": setup}
    write(out, final)
    print("\n" + format_table(final) + "\n", flush=True)
    print(f"[task_distill] re-evaluated {sum(len(r) for m in found.values() for r in m.values())} saved students "
          f"into {out / 'task_distill.json'} in {time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    return final


def score_saved(task: str, run_dir: Path, test: LabelledData, data: TaskData, batch_size: int) -> dict[str, Any]:
    """One saved run's metrics on ``test`` as :func:`run_one` reports them (MAD: its adapted teacher's too)."""
    student_dir = run_dir / "student"
    if not (student_dir / "config.json").is_file():
        raise SystemExit(f"--reevaluate: {student_dir} holds no saved student (the run listed it; was it moved?)")
    student = load_student(student_dir)
    metrics = get_task(task).evaluate(task_predictor(student, task), test.dataset, batch_size=batch_size)
    out: dict[str, Any] = {"metric": metrics[HEADLINE[task]]}
    out["other"] = {name: metrics[name] for name in OTHER.get(task, ()) if name in metrics}
    adapted_dir = run_dir / "adapted-teacher"
    if adapted_dir.is_dir() and task != "entailment":
        adapted = as_teacher(DualEncoder.from_pretrained(adapted_dir))
        after = zero_shot(adapted, zero_shot_recipe(task), test, data.train.answers)
        out["teacher_zero_shot_after"] = after[HEADLINE[task]]
        out["teacher_zero_shot_after_other"] = {name: after[name] for name in OTHER.get(task, ()) if name in after}
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.output)
    if args.text_only:
        return text_only_main(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return reevaluate(args.reevaluate, args, argv) if args.reevaluate else _main(args, argv)
    finally:
        torch.set_num_threads(threads)


def task_data(task: str, args: argparse.Namespace) -> TaskData:
    """One task's :class:`TaskData` at the sizes and test-item offset of ``args``."""
    vocab_size = load_recipe(TASKS[task][0]).student.vocab_size
    return TaskData(task, args.train_limit, args.eval_limit, vocab_size, args.eval_offset)


def text_only_main(args: argparse.Namespace) -> dict[str, Any]:
    """``--text-only``: :func:`text_only_line` for each task and regime, printed and written to ``text_only.json``."""
    result: dict[str, Any] = {}
    for task in args.tasks:
        data = task_data(task, args)
        for regime in args.regimes:
            line = result.setdefault(task, {})[regime] = text_only_line(task, data, regime, args.seed_list)
            print(f"[task_distill] text alone: {task} {regime} {HEADLINE[task]} {100 * line['mean']:.1f} ± "
                  f"{100 * line['std']:.1f}", flush=True)  # fmt: skip
    result["setup"] = {
        "seeds": args.seed_list,
        "eval_items": args.eval_limit,
        "eval_offset": args.eval_offset,
        "metric": HEADLINE,
    }
    write(Path(args.output), result, "text_only.json")
    return result


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    start = time.perf_counter()
    out = Path(args.output)
    teacher_dir, teacher, teacher_name = get_teacher(args)
    result: dict[str, Any] = {}
    setup: dict[str, Any] = {
        "seeds": args.seed_list,
        "teacher": teacher_name,
        "teacher_path": teacher_dir,
        "student": args.student or "vilt-small" + (" (smoke: hidden 32 x 1 layer)" if args.smoke else ""),
        "steps": args.steps,
        "batch_size": {t: args.batch_size[t] for t in args.tasks},
        "adapt": {"steps": args.adapt_steps, "batch_size": args.adapt_batch_size, "lr": 1e-4},
        "clip_td_options": args.clip_td,
        "regimes": {r: _split_dict(REGIMES[r]) for r in args.regimes},
        "metric": {t: HEADLINE[t] for t in args.tasks},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads ({args.threads} used), torch "
        f"{torch.__version__}",
        "smoke": args.smoke,
        "command": " ".join(["python benchmarks/task_distill.py", *(argv if argv is not None else sys.argv[1:])]),
        "vldistill": __version__,
        "train_items": {},
        "eval_items": {},
        "eval_offset": args.eval_offset,
    }
    for task in args.tasks:
        data = task_data(task, args)
        setup["train_items"][task], setup["eval_items"][task] = len(data.train), len(data.test)
        for regime in args.regimes:
            args.split, args.regime_name = REGIMES[regime], regime
            line = text_only_line(task, data, regime, args.seed_list)
            setup.setdefault("text_only", {}).setdefault(task, {})[regime] = line
            runs: dict[str, dict[int, dict[str, Any]]] = {}
            before, reason, before_other = None, None, None
            for seed in args.seed_list:
                train, test = data.regime(replace(args.split, seed=seed))
                if seed == args.seed_list[0] and {"clip_td", "mad"} & set(args.methods):
                    zs = zero_shot(teacher, zero_shot_recipe(task), test, data.train.answers)
                    before, reason = zs.get(HEADLINE[task]), zs.get("not_applicable")
                    before_other = {name: zs[name] for name in OTHER.get(task, ()) if name in zs}
                for method in args.methods:
                    r = run_one(task, method, seed, args, data, train, test, teacher_dir, teacher)
                    runs.setdefault(method, {})[seed] = r
                    print(
                        f"[task_distill] {task} {regime} {method} seed {seed}: {100 * r['metric']:.1f} "
                        f"({r['wall_seconds']:.0f} s; {len(train.dataset)} training items)",
                        flush=True,
                    )
            result.setdefault(task, {})[regime] = summarise(runs, before, reason, before_other)
            setup["total_wall_seconds"] = round(time.perf_counter() - start, 1)
            write(out, {**result, "setup": setup})  # after every regime: an interrupted run keeps what it has
    setup["total_wall_seconds"] = round(time.perf_counter() - start, 1)
    final = {**result, "setup": setup}
    write(out, final)
    print("\n" + format_table(final) + "\n", flush=True)
    print(f"[task_distill] wrote {out / 'task_distill.json'} in {setup['total_wall_seconds']:.0f} s", flush=True)
    return final


def write(out: Path, result: dict[str, Any], name: str = "task_distill.json") -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out / name)


if __name__ == "__main__":
    main()
