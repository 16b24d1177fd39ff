"""Ablation of the distillation objectives on the bundled data: one table, ``runs/bench/ablation.json`` and ``.md``.

Every objective trains the same student (``clip-tiny``, same tokenizer, the same initialisation per seed) on the same
data, for the same number of steps with the same batch size, learning rate schedule and seeds; only the objective
differs. Teachers: the quickstart's reference teacher (trained once and cached in ``runs/teachers/``, shared with
``vldistill quickstart``) and, for the two-teacher objective, a second, different one (narrower, shallower, 48px
images, another seed; also trained once and cached). Metrics on the bundled test split:

- ``en_top1`` / ``zh_top1``: zero-shot top-1 with English / Chinese class names and templates;
- ``r1``: English retrieval recall@1, the mean of image->text and text->image;
- ``agreement``: top-1 agreement of the student's English zero-shot predictions with the reference teacher's;
- ``gain``: ``en_top1`` minus the baseline's ``en_top1`` of the same seed;
- ``wall_seconds``: training + evaluation of one run on this machine.

Each is reported as mean and sample standard deviation over the seeds (std 0 for one seed).

Usage::

    .venv/bin/python benchmarks/ablation.py                  # the full ablation (see --help for the sizes)
    .venv/bin/python benchmarks/ablation.py --smoke          # tiny sizes, one seed, tiny teachers: seconds
    .venv/bin/python benchmarks/ablation.py --objectives baseline clipkd --seeds 2

The default sizes are smaller than the quickstart's: 200 instead of 300 steps per run (batch 128, all 4000 training
pairs, all 1000 test images), so that the 9 objectives x 3 seeds fit in about 35-40 minutes on a 2-core CPU
(estimated from per-step timings: ~0.18 s for the student alone, ~0.35 s with the live reference teacher, ~0.47 s
with both teachers, plus ~4 s of evaluation per run; add ~2.5 minutes if the reference teacher is not cached yet and
~1.5 minutes for the second teacher's first run). The recipes themselves run 300 steps.
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vldistill import __version__
from vldistill.config import RecipeConfig, load_recipe
from vldistill.data.sources import LabelledData, load_data
from vldistill.evaluation import EvalSet, agreement, evaluate
from vldistill.models import Teacher
from vldistill.students import prepare_student
from vldistill.tokenization import train_wordpiece
from vldistill.train.fit import fit_recipe, tokenizer_corpus
from vldistill.train.quickstart import reference_teacher

LANGS = ["en", "zh"]
METRICS = ("en_top1", "zh_top1", "r1", "agreement", "gain", "wall_seconds")

# Loss terms shared by the objectives (YAML-style, as in the recipes).
CLIP = {"name": "clip", "langs": LANGS}
FD_IMAGE = {"name": "fd", "tower": "image", "norm": "mse", "weight": 2000.0}
FD_TEXT = {"name": "fd", "tower": "text", "lang": "en", "norm": "mse", "weight": 2000.0}
MFD = {"name": "mfd", "mask_ratio": 0.5, "norm": "mse", "weight": 2000.0}
ICL = {"name": "icl", "lang": "en", "weight": 1.0}
CRD = {"name": "crd", "lang": "en", "weight": 1.0}


@dataclass(frozen=True)
class Objective:
    """One row of the table: a recipe file, or loss terms on the clipkd recipe's student, data and schedule."""

    description: str
    recipe: str = "clipkd"
    losses: tuple[dict[str, Any], ...] | None = None
    teachers: int = 1


OBJECTIVES: dict[str, Objective] = {
    "baseline": Objective("no distillation: clip on en + zh", losses=(CLIP,), teachers=0),
    "fd": Objective("clip + fd image 2000 + fd text 2000 (CLIP-KD FD)", losses=(CLIP, FD_IMAGE, FD_TEXT)),
    "mfd": Objective("clip + mfd 2000 (mask 0.5) + fd text 2000 (CLIP-KD MFD)", losses=(CLIP, MFD, FD_TEXT)),
    "crd": Objective("clip + crd 1: recipes/tinyclip-affinity.yaml", recipe="tinyclip-affinity"),
    "icl": Objective("clip + icl 1 (CLIP-KD ICL)", losses=(CLIP, ICL)),
    "soft_ce": Objective("soft_ce (en) + clip (zh): recipes/openclip-distill.yaml", recipe="openclip-distill"),
    "clipkd": Objective("clip + crd 1 + icl 1 + fd 2000: recipes/clipkd.yaml", recipe="clipkd"),
    "dcclip": Objective("fd + xling, then clip (3:1 steps): recipes/dcclip.yaml", recipe="dcclip"),
    "two_teachers": Objective(
        "clipkd's terms averaged over two teachers (MobileCLIP-style mean)",
        losses=(CLIP, CRD, ICL, FD_IMAGE, FD_TEXT),
        teachers=2,
    ),
}

# The second teacher: the reference-teacher recipe, narrower and shallower, on 48px images, another seed.
SECOND_TEACHER = {
    "train.seed": 1,
    "student.overrides": {
        "projection_dim": 96,
        "vision.image_size": 48,
        "vision.hidden_size": 192,
        "vision.intermediate_size": 768,
        "vision.num_hidden_layers": 3,
        "text.hidden_size": 192,
        "text.intermediate_size": 768,
        "text.num_hidden_layers": 3,
    },
}
# --smoke: tiny teachers (cached under the output directory, never in runs/teachers/), a few steps everywhere.
SMOKE = {"train_limit": 64, "eval_limit": 32, "steps": 2, "batch_size": 16, "seeds": 1}
SMOKE_TEACHER = {
    "stages.0.steps": 2,
    "train.batch_size": 16,
    "student.overrides": {"vision.num_hidden_layers": 1, "text.num_hidden_layers": 1},
}


TEACHER_NAMES = ("reference", "second")


def teacher_overrides(k: int, smoke: bool) -> dict[str, Any]:
    """Overrides of the reference-teacher recipe for teacher ``k`` (0: the quickstart's, 1: the second one)."""
    overrides: dict[str, Any] = {"train.seed": 0, **(SECOND_TEACHER if k == 1 else {})}
    if smoke:
        student = {**overrides.get("student.overrides", {}), **SMOKE_TEACHER["student.overrides"]}
        overrides.update({**SMOKE_TEACHER, "student.overrides": student, "train.progress": False})
    return overrides


# ---------------------------------------------------------------------------------------------------------- runs
def run_config(name: str, steps: int, batch_size: int, seed: int, output_dir: Path, extra: dict) -> RecipeConfig:
    """The recipe of one objective at the benchmark's sizes (stage steps scaled to ``steps`` in total)."""
    obj = OBJECTIVES[name]
    overrides: dict[str, Any] = {
        **extra,
        "train.seed": seed,
        "train.batch_size": batch_size,
        "train.output_dir": str(output_dir),
        "train.progress": False,
        "train.tensorboard": False,
    }
    if obj.losses is not None:
        overrides["stages"] = [{"name": name, "steps": steps, "losses": [dict(t) for t in obj.losses]}]
        overrides["teachers"] = [{"languages": ["en"]} for _ in range(obj.teachers)]
    else:
        recipe_steps = [s.steps for s in load_recipe(obj.recipe).stages]
        split = _split(steps, recipe_steps)
        overrides.update({f"stages.{i}.steps": n for i, n in enumerate(split)})
    return load_recipe(obj.recipe, overrides)


def _split(total: int, proportions: Sequence[int]) -> list[int]:
    """``total`` steps shared among stages in the given proportions (each stage at least one step)."""
    if total < len(proportions):
        raise ValueError(f"--steps {total} is fewer than the {len(proportions)} stages of the recipe")
    whole, split = sum(proportions), []
    for i, p in enumerate(proportions[:-1]):
        room = total - sum(split) - (len(proportions) - 1 - i)  # leave at least one step for each later stage
        split.append(min(max(1, round(total * p / whole)), room))
    return [*split, total - sum(split)]


def run_one(
    name: str,
    seed: int,
    args: argparse.Namespace,
    train: LabelledData,
    eval_set: EvalSet,
    tokenizer,
    teachers: list[Teacher],
    teacher_predictions,
) -> dict[str, float]:
    """Train one objective with one seed, evaluate it, return its metrics (``gain`` is filled in later)."""
    out = Path(args.output) / "ablation" / name / f"seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    extra = {"data.limit_train": args.train_limit, "data.limit_eval": args.eval_limit}
    # Every objective (the baseline too) gets the same student, embedding in the reference teacher's width as in the
    # quickstart: feature terms then need no per-tower adapters (only the second teacher, narrower, gets one).
    extra["student.overrides"] = {"projection_dim": teachers[0].dims.embed}
    cfg = run_config(name, args.steps, args.batch_size, seed, out, extra)
    start = time.perf_counter()
    student = prepare_student(cfg, tokenizer=tokenizer)  # seeded by train.seed: the same init for every objective
    used = teachers[: len(cfg.teachers)]
    fit_recipe(cfg, teachers=used, student=student, train_data=train, evaluate_after=False, overwrite=True)
    result = evaluate(student, eval_set, LANGS)
    wall = time.perf_counter() - start
    zs, rt = result["metrics"]["zeroshot"], result["metrics"]["retrieval"]
    return {
        "en_top1": zs["en"]["top1"],
        "zh_top1": zs["zh"]["top1"],
        "r1": (rt["en"]["i2t_r1"] + rt["en"]["t2i_r1"]) / 2,
        "agreement": agreement(result["predictions"]["en"], teacher_predictions),
        "wall_seconds": wall,
    }


def summarise(runs: dict[str, dict[int, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Per objective: each metric's mean, sample std and per-seed values; gain against the same seed's baseline."""
    base = runs.get("baseline", {})
    table = {}
    for name, per_seed in runs.items():
        entry: dict[str, Any] = {"description": OBJECTIVES[name].description, "seeds": sorted(per_seed)}
        for metric in METRICS:
            if metric == "gain":
                values = [per_seed[s]["en_top1"] - base[s]["en_top1"] for s in sorted(per_seed) if s in base]
            else:
                values = [per_seed[s][metric] for s in sorted(per_seed)]
            entry[metric] = _stats(values)
        table[name] = entry
    return table


def _stats(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


# --------------------------------------------------------------------------------------------------------- output
def format_table(table: dict[str, dict[str, Any]], markdown: bool = False) -> str:
    header = ["objective", "EN top-1", "ZH top-1", "EN R@1", "agreement", "gain (EN)", "wall s", "losses"]
    rows = []
    for name, e in table.items():
        cells = [name]
        for metric in METRICS:
            stats = e[metric]
            scale, fmt = (1, "{:.0f}") if metric == "wall_seconds" else (100, "{:.1f}")
            if stats is None:
                cells.append("-")
            else:
                sign = "+" if metric == "gain" and stats["mean"] >= 0 else ""
                mean, std = fmt.format(scale * stats["mean"]), fmt.format(scale * stats["std"])
                cells.append(f"{sign}{mean} ± {std}")
        cells.append(e["description"])
        rows.append(cells)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for r in [header, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_outputs(out: Path, setup: dict[str, Any], table: dict[str, dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps({"setup": setup, "objectives": table}, indent=2) + "\n")
    teachers = ", ".join(f"{k}: EN top-1 {100 * v['en_top1']:.1f}" for k, v in setup["teachers"].items())
    note = (
        f"{len(setup['seeds'])} seed(s) ({', '.join(map(str, setup['seeds']))}), mean ± std; student "
        f"`{setup['student']}`; {setup['steps']} steps at batch {setup['batch_size']} on {setup['train_samples']} "
        f"training pairs; test split of {setup['eval_samples']} images; teachers: {teachers}. "
        f"{setup['machine']}; total {setup['total_wall_seconds']:.0f} s. "
        f"Command: `{setup['command']}`."
    )
    (out / "ablation.md").write_text(format_table(table, markdown=True) + "\n\n" + note + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------------- the run
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="optimiser steps per run, all stages (default: 200)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size (default: 128)")
    p.add_argument("--train-limit", type=int, default=None, help="training pairs (default: all 4000)")
    p.add_argument("--eval-limit", type=int, default=None, help="test images (default: all 1000)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per objective (default: 3)")
    p.add_argument("--objectives", nargs="+", choices=list(OBJECTIVES), default=list(OBJECTIVES), metavar="NAME")
    p.add_argument("--output", default="runs/bench", help="writes OUTPUT/ablation.{json,md} (default: runs/bench)")
    p.add_argument("--teacher-cache", default=None, help="teacher cache (default: runs/teachers; --smoke: OUTPUT)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one seed, tiny teachers: a run of seconds")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if args.steps < 2 or args.batch_size < 1 or args.seeds < 1:
        p.error("--steps must be at least 2, --batch-size and --seeds at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    out = Path(args.output)
    cache = Path(args.teacher_cache or (out / "teachers" if args.smoke else "runs/teachers"))
    train = load_data("bundled:easyvqa", "train", LANGS, limit=args.train_limit)
    test = load_data("bundled:easyvqa", "test", LANGS, limit=args.eval_limit)
    eval_set = test.eval_set(LANGS)

    # Teachers: trained once on the English captions and cached. The reference teacher's cache key is the
    # quickstart's (same recipe, seed 0, full training set), so a quickstart run and this benchmark share it.
    full = args.smoke or args.train_limit is None
    teacher_train = train if full else load_data("bundled:easyvqa", "train", LANGS)
    need = max(1, *(OBJECTIVES[name].teachers for name in args.objectives))  # agreement needs the reference
    teachers, teacher_info = [], {}
    for k in range(need):
        teacher, _ = reference_teacher(teacher_train, teacher_overrides(k, args.smoke), False, cache)
        t_out = evaluate(teacher, eval_set, ["en"])
        teachers.append(teacher)
        teacher_info[TEACHER_NAMES[k]] = {
            "params": teacher.num_parameters(),
            "en_top1": t_out["metrics"]["zeroshot"]["en"]["top1"],
        }
        if k == 0:
            teacher_predictions = t_out["predictions"]["en"]

    cfg0 = load_recipe("clipkd")
    tokenizer = train_wordpiece(tokenizer_corpus(train, LANGS), vocab_size=cfg0.student.vocab_size)
    setup = {
        "command": " ".join(["python benchmarks/ablation.py", *(argv if argv is not None else sys.argv[1:])]),
        "smoke": args.smoke,
        "student": cfg0.student.preset,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seeds": list(range(args.seeds)),
        "train_samples": len(train.dataset),
        "eval_samples": len(test.dataset),
        "teachers": teacher_info,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}",
        "vldistill": __version__,
    }
    runs: dict[str, dict[int, dict[str, float]]] = {}
    for seed in range(args.seeds):
        for name in args.objectives:
            metrics = run_one(name, seed, args, train, eval_set, tokenizer, teachers, teacher_predictions)
            runs.setdefault(name, {})[seed] = metrics
            print(
                f"[ablation] {name} seed {seed}: EN {100 * metrics['en_top1']:.1f}  ZH {100 * metrics['zh_top1']:.1f}  "
                f"R@1 {100 * metrics['r1']:.1f}  agree {100 * metrics['agreement']:.1f}  "
                f"({metrics['wall_seconds']:.0f} s)",
                flush=True,
            )
            setup["total_wall_seconds"] = time.perf_counter() - start
            write_outputs(out, setup, summarise(runs))  # after every run: an interrupted run keeps what it has
    table = summarise(runs)
    setup["total_wall_seconds"] = time.perf_counter() - start
    write_outputs(out, setup, table)
    print("\n" + format_table(table) + "\n", flush=True)
    print(f"[ablation] wrote {out / 'ablation.json'} and {out / 'ablation.md'} in {setup['total_wall_seconds']:.0f} s")
    return {"setup": setup, "objectives": table}


if __name__ == "__main__":
    main()
