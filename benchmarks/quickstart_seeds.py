"""Does the quickstart's conclusion hold on any seed? Its three models (teacher, distilled student, no-teacher
baseline) over several seeds, as mean, std, min and max.

    python benchmarks/quickstart_seeds.py                      # seeds 0 1 2, one reference teacher for all
    python benchmarks/quickstart_seeds.py --teacher-per-seed   # also retrain the teacher with each seed
    python benchmarks/quickstart_seeds.py --fast --seeds 0 1   # the quickstart's --fast slice (a smoke run)

By default the reference teacher is trained once (seed 0, or reused from ``runs/teachers/``) and every seed
distils from it: the seed then moves the student's and the baseline's initialisation, data order and paired subset.
``--teacher-per-seed`` trains a teacher per seed as well (the spread of the teacher itself). Writes
``runs/bench/quickstart_seeds.json`` (or ``--output``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vldistill import __version__
from vldistill.train.quickstart import reference_teacher_dir, run_quickstart

MODELS = ("teacher", "student", "baseline", "all_pairs")


def _stats(values: list[float], with_range: bool = True) -> dict[str, float]:
    out = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    if with_range:
        out |= {"min": min(values), "max": max(values)}
    return {k: round(v, 4) for k, v in out.items()}


def summarise(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per model and language, zero-shot top-1 over the seeds; the gain in English points (student - baseline)."""
    out: dict[str, Any] = {}
    for model in MODELS:
        langs = ("en",) if model == "teacher" else ("en", "zh")
        present = [r for r in runs.values() if model in r]
        if present:
            out[model] = {
                f"top1_{lang}": _stats([r[model]["zeroshot"][lang]["top1"] for r in present]) for lang in langs
            }
    gains = [
        100 * (r["student"]["zeroshot"]["en"]["top1"] - r["baseline"]["zeroshot"]["en"]["top1"]) for r in runs.values()
    ]
    out["gain_en_points"] = {k: v for k, v in _stats(gains).items() if k != "max"}
    t_en = out["teacher"]["top1_en"]["mean"]
    out["student_en_over_teacher_en"] = round(out["student"]["top1_en"]["mean"] / t_en, 4)
    out["student_zh_over_teacher_en"] = round(out["student"]["top1_zh"]["mean"] / t_en, 4)
    out["per_seed"] = {
        str(seed): {m: {lang: r[m]["zeroshot"][lang]["top1"] for lang in r[m]["zeroshot"]} for m in MODELS if m in r}
        | {"wall_seconds": r["wall_seconds"]}
        for seed, r in runs.items()
    }
    return out


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    checks = {
        "gain_mean_points": (summary["gain_en_points"]["mean"], 10.0),
        "gain_min_points": (summary["gain_en_points"]["min"], 5.0),
        "student_en_over_teacher_en": (summary["student_en_over_teacher_en"], 0.90),
        "student_zh_over_teacher_en": (summary["student_zh_over_teacher_en"], 0.85),
        "teacher_en_min": (summary["teacher"]["top1_en"]["min"], 0.90),
    }
    return {k: {"value": round(v, 4), "target": t, "met": v >= t} for k, (v, t) in checks.items()}


def table(summary: dict[str, Any], seeds: list[int]) -> str:
    lines = [f"{len(seeds)} seeds {seeds}: zero-shot top-1 on the bundled test split, mean ± std [min, max]", ""]
    lines.append(f"{'model':<10} {'EN top-1':>24} {'ZH top-1':>24}")
    for model in MODELS:
        if model not in summary:
            continue
        cells = []
        for lang in ("en", "zh"):
            s = summary[model].get(f"top1_{lang}")
            cells.append(
                "-"
                if s is None
                else f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} [{100 * s['min']:.1f}, {100 * s['max']:.1f}]"
            )
        lines.append(f"{model:<10} {cells[0]:>24} {cells[1]:>24}")
    g = summary["gain_en_points"]
    lines.append("")
    lines.append(f"gain (student - baseline, EN points): {g['mean']:+.1f} ± {g['std']:.1f}, min {g['min']:+.1f}")
    for k, v in summary["targets"].items():
        lines.append(f"{k}: {v['value']} (target {v['target']}, {'met' if v['met'] else 'MISSED'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-per-seed", action="store_true", help="train a reference teacher per seed too")
    parser.add_argument("--teacher", help="distil from this teacher instead of the reference one")
    parser.add_argument("--fast", action="store_true", help="the quickstart's --fast slice (a smoke run)")
    parser.add_argument("--work", default="runs/bench/quickstart_seeds", help="where each seed's run goes")
    parser.add_argument("--output", default="runs/bench/quickstart_seeds.json")
    parser.add_argument(
        "--from-results",
        action="store_true",
        help="run nothing: summarise the results.json each seed's run left in --work (e.g. seeds run in parallel)",
    )
    args = parser.parse_args(argv)
    if len(args.seeds) < 1 or len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds: give distinct seeds")
    start = time.perf_counter()
    work = Path(args.work)
    runs: dict[int, dict[str, Any]] = {}
    teacher = args.teacher
    for seed in args.seeds:
        if args.from_results:
            runs[seed] = json.loads((work / f"seed{seed}" / "results.json").read_text())
            continue
        if teacher is None and not args.teacher_per_seed:
            from vldistill.data.sources import load_data
            from vldistill.train.quickstart import FAST_DATA

            limit = FAST_DATA["data.limit_train"] if args.fast else None
            train = load_data("bundled:easyvqa", "train", ["en", "zh"], limit=limit)
            common = {**(FAST_DATA if args.fast else {}), "train.seed": 0, "train.progress": False}
            teacher = str(reference_teacher_dir(train, common, args.fast, Path("runs/teachers"))[0])
        runs[seed] = run_quickstart(work / f"seed{seed}", teacher=teacher, fast=args.fast, seed=seed)
    summary = summarise(runs)
    summary["targets"] = targets(summary)
    summary["setup"] = {
        "seeds": args.seeds,
        "teacher": "trained per seed" if args.teacher_per_seed else f"one for all seeds: {teacher}",
        "teachers": {str(k): r["setup"]["teacher"] for k, r in runs.items()},
        "fast": args.fast,
        "paired_samples": runs[args.seeds[0]]["setup"]["paired_samples"],
        "train_samples": runs[args.seeds[0]]["setup"]["train_samples"],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}",
        "vldistill": __version__,
        "command": "python benchmarks/quickstart_seeds.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_seconds": round(time.perf_counter() - start, 1)
        if not args.from_results
        else round(sum(r["wall_seconds"] for r in runs.values()), 1),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
    print(table(summary, args.seeds))
    print(f"\nwrote {args.output} in {summary['setup']['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
