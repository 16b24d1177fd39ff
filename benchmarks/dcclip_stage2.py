"""How hard should DC-CLIP's stage 2 (contrastive alignment on the few pairs) pull, in the quickstart's scenario?

Trains the quickstart's distilled student (``recipes/dcclip.yaml``, data.paired 0.1) from the teachers and teacher
caches that ``benchmarks/quickstart_seeds.py --teacher-per-seed`` left in ``--work`` (one teacher per seed), once
per variant and seed, the seeds of a variant side by side, one thread each (as the quickstart trains them), and
prints zero-shot top-1 (English, Chinese) on the bundled test split per seed and as mean ± std. Writes
``runs/bench/dcclip_stage2.json``. Variants change only what their name says:

- ``recipe``: the recipe as it is;
- ``s2_lr=X``: stage 2 at learning rate X;
- ``s2_text``: stage 2 trains the text tower only;
- ``s2_crd``: stage 2 adds ``crd`` (the teacher's in-batch image-text distribution) to its ``clip`` loss;
- ``fd_cosine``: stage 1's feature distillation with the cosine distance instead of smooth L1;
- ``no_s2``: no stage 2, stage 1 for all the steps (not DC-CLIP any more: for reference);
- ``no_texts``: no free texts (``data.texts`` empty: stage 1's term on them is left out; the tokenizer stays the
  one trained with them, so that only the term differs);
- ``s1_steps=N``: stage 1 for N steps.

Variants joined with ``+`` apply in turn (``no_texts+s1_steps=350``: the recipe before free texts came in).

Usage::

    python benchmarks/quickstart_seeds.py --teacher-per-seed          # first: teachers and caches per seed
    python benchmarks/dcclip_stage2.py --variants recipe s2_lr=5e-5 no_s2

About 3 minutes per variant on a 2-core CPU (three 600-step trainings side by side, then evaluation): 525 s for
three variants, 2026-11-30.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vldistill.config import load_recipe, to_dict
from vldistill.data.sources import load_data
from vldistill.data.texts import load_free_texts
from vldistill.evaluation import evaluate
from vldistill.models import load_teacher
from vldistill.students import load_student, prepare_student
from vldistill.tokenization import train_wordpiece
from vldistill.train.fit import fit_recipe, tokenizer_corpus
from vldistill.train.quickstart import FREE_TEXTS, distill_overrides
from vldistill.train.side_by_side import run_side_by_side


def variant_config(raw: dict[str, Any], variant: str) -> dict[str, Any]:
    """The recipe (as ``to_dict`` gives it) changed as the variant's name says (``a+b``: each in turn)."""
    if "+" in variant:
        for part in variant.split("+"):
            raw = variant_config(raw, part)
        return raw
    stages = raw["stages"]
    if variant == "recipe":
        pass
    elif variant.startswith("s2_lr="):
        stages[1]["lr"] = float(variant.split("=", 1)[1])
    elif variant == "s2_text":
        stages[1]["trainable"] = ["text"]
    elif variant == "s2_crd":
        stages[1]["losses"].append({"name": "crd", "weight": 1.0, "label": None, "options": {"lang": "en"}})
    elif variant == "fd_cosine":
        for loss in stages[0]["losses"]:
            loss["options"]["norm"] = "cosine"
    elif variant == "no_texts":
        raw["data"]["texts"] = {}
    elif variant.startswith("s1_steps="):
        stages[0]["steps"] = int(variant.split("=", 1)[1])
    elif variant == "no_s2":
        stages[0]["steps"] += stages[1]["steps"]
        raw["stages"] = stages[:1]
    else:
        raise ValueError(f"unknown variant {variant!r}: see this script's docstring")
    return raw


def teachers_by_seed(work: Path, seeds: list[int]) -> dict[int, Path]:
    """Each seed's teacher, as its quickstart run recorded it."""
    out = {}
    for seed in seeds:
        results = work / f"seed{seed}" / "results.json"
        if not results.is_file():
            raise FileNotFoundError(f"{results}: run benchmarks/quickstart_seeds.py --teacher-per-seed first")
        setup = json.loads(results.read_text())["setup"]["teacher"]
        out[seed] = Path(setup.split(": ", 1)[1])
    return out


def _stats(values: list[float]) -> dict[str, float]:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), 2), "std": round(std, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["recipe", "s2_lr=1e-4", "s2_lr=5e-5", "no_s2"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", default="runs/bench/quickstart_seeds")
    parser.add_argument("--output", default="runs/bench/dcclip_stage2.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    work = Path(args.work)
    teachers = teachers_by_seed(work, args.seeds)
    train = load_data("bundled:easyvqa", "train", ["en", "zh"])
    eval_set = load_data("bundled:easyvqa", "test", ["en", "zh"]).eval_set(["en", "zh"])
    free = load_free_texts(FREE_TEXTS)  # the quickstart's tokenizer: captions, class names, templates, free texts
    tokenizer = train_wordpiece(
        tokenizer_corpus(train, ["en", "zh"], free), vocab_size=load_recipe("dcclip").student.vocab_size
    )
    loaded = {seed: load_teacher(str(path)) for seed, path in teachers.items()}
    results: dict[str, Any] = {}
    for variant in args.variants:
        jobs = {}
        for seed, t_path in teachers.items():
            out = f"runs/bench/dcclip_stage2/{variant}/seed{seed}"
            overrides = distill_overrides(
                seed, out, teacher=t_path, teacher_cache=work / f"seed{seed}" / "teacher-cache"
            )
            overrides["train.progress"] = False
            cfg = load_recipe(raw=variant_config(to_dict(load_recipe("dcclip", overrides)), variant))
            student = prepare_student(cfg, tokenizer=tokenizer, teachers=[loaded[seed]])
            jobs[f"seed{seed}"] = functools.partial(
                fit_recipe,
                cfg,
                teachers=[loaded[seed]],
                student=student,
                train_data=train,
                evaluate_after=False,
                overwrite=True,
            )
        t0 = time.perf_counter()
        trained = run_side_by_side(jobs, f"runs/bench/dcclip_stage2/{variant}/logs")
        per_seed = {}
        for name, summary in trained.items():
            zs = evaluate(load_student(summary["student_dir"]), eval_set, ["en", "zh"])["metrics"]["zeroshot"]
            per_seed[name] = {lang: round(100 * zs[lang]["top1"], 1) for lang in ("en", "zh")}
        results[variant] = {
            "per_seed": per_seed,
            "en": _stats([v["en"] for v in per_seed.values()]),
            "zh": _stats([v["zh"] for v in per_seed.values()]),
            "wall_seconds": round(time.perf_counter() - t0, 1),
        }
        print(variant, json.dumps(results[variant]), flush=True)
    results["setup"] = {
        "seeds": args.seeds,
        "teachers": {str(k): str(v) for k, v in teachers.items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}",
        "command": "python benchmarks/dcclip_stage2.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'variant':<14} {'EN top-1':>14} {'ZH top-1':>14}   per seed EN")
    for variant in args.variants:
        r = results[variant]
        seeds = " / ".join(f"{v['en']:.1f}" for v in r["per_seed"].values())
        en, zh = r["en"], r["zh"]
        print(f"{variant:<14} {en['mean']:>7.1f} ± {en['std']:<4.1f} {zh['mean']:>7.1f} ± {zh['std']:<4.1f}   {seeds}")
    print(f"\nwrote {args.output} in {results['setup']['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
