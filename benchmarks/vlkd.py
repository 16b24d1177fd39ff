"""VLKD on the bundled data: zero-shot VQA and captioning from a text-only LM aligned to a frozen CLIP.

Pipeline (all on the 2-core CPU, offline):

1. the teacher: the quickstart's reference CLIP (trained once on the English captions, cached in ``runs/teachers/``
   and shared with ``vldistill quickstart``);
2. the LM: the reference BART pretrained on text only (``vldistill.train.reference_lm``: captions of the training
   split, ``a picture of ...`` sentences and question-answer sentences built from caption words; never an image),
   cached in ``runs/lms/``;
3. the teacher's outputs on the training pairs, cached once (``runs/bench/vlkd/teacher-cache``);
4. per seed, each row below, evaluated on the bundled test split.

Rows (``runs/bench/vlkd.json`` has one entry each, every figure as mean and std over the seeds):

- ``answer_prior``: always the most frequent training answer of the question's type; captions: always the most
  frequent training caption (no model; identical over seeds);
- ``question_only``: the reference LM with its projections untrained (seeded random init): what the LM answers from
  the question alone, with an image prefix it cannot read;
- ``no_ttdm``, ``no_itcl``, ``no_icti``: VLKD (``recipes/vlkd.yaml``) with one objective left out;
- ``vlkd``: the recipe's three objectives.

Metrics: VQA accuracy (official normalisation; one reference answer per question, so exact match) overall and per
question type (``yes_no``, ``colour``, ``shape``) on a seeded subset of the test questions; BLEU-4 and CIDEr-D of the
generated captions of test images (one reference caption each); the text skill (masked-token accuracy of denoising
held-out text without an image: the test split's captions and question-answer sentences built from them) of each
row's LM, beside the reference LM's before VLKD (``text_skill_before``).

Usage::

    .venv/bin/python benchmarks/vlkd.py              # the full benchmark (11 minutes measured; see below)
    .venv/bin/python benchmarks/vlkd.py --smoke      # tiny teacher and LM, 2 steps, one seed: under a minute

Sizes (defaults), chosen to fit 45 minutes on the 2-core machine: 200 VLKD steps of batch 64 per run (4 trained
rows x 3 seeds = 12 runs), 600 test questions (the questions of the first test images in a seeded order), 300 test
images for captions, 400 held-out texts. Measured 2026-11-30 (``python benchmarks/vlkd.py --threads 1 --steps 200``,
the reference teacher and LM already cached, the 2-core machine shared with two other benchmark processes): 676 s
in all, 56-59 s per trained run; training the reference teacher (about 7.5 min) and LM (about 4.5 min) first adds
about 12 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from vldistill import __version__
from vldistill.cache import build_recipe_cache
from vldistill.config import GenerationConfig, RecipeConfig, load_recipe, to_dict
from vldistill.data.sources import LabelledData, load_data, load_task_data
from vldistill.models import Teacher, load_teacher
from vldistill.students import Seq2SeqStudent, build_student
from vldistill.tasks import answer_prior, get_task
from vldistill.tasks.metrics import caption_scores
from vldistill.tasks.predict import task_predictor
from vldistill.tasks.text_skill import NAME as TEXT_SKILL_NAME
from vldistill.tasks.text_skill import denoising_skill
from vldistill.tokenization import train_wordpiece
from vldistill.train.fit import fit_recipe
from vldistill.train.quickstart import reference_teacher_dir
from vldistill.train.reference_lm import FAST, ReferenceLMConfig, held_out_texts, reference_lm_dir

ROWS = ("answer_prior", "question_only", "no_ttdm", "no_itcl", "no_icti", "vlkd")
TRAINED = {"no_ttdm": ("itcl", "icti"), "no_itcl": ("ttdm", "icti"), "no_icti": ("ttdm", "itcl")}
TYPES = ("yes_no", "colour", "shape")
ESTIMATE = (
    "measured 2026-11-30 with the reference teacher and LM cached, one thread, the 2-core machine shared with two "
    "other benchmark processes: 676 s in all (56-59 s per trained run of 200 steps, 23 s without icti); training the "
    "reference teacher and LM first adds about 12 minutes"
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny teacher and LM, 2 steps, one seed: under a minute")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="VLKD steps per run (default 200; smoke 2)")
    p.add_argument("--batch-size", type=int, default=None, help="VLKD batch (default 64; smoke 8)")
    p.add_argument("--vqa", type=int, default=None, help="test questions (default 600; smoke 16)")
    p.add_argument("--captions", type=int, default=None, help="test images captioned (default 300; smoke 8)")
    p.add_argument("--texts", type=int, default=None, help="held-out texts of the text skill (default 400; smoke 16)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, help="rows to run (default: all)")
    p.add_argument("--output", default="runs/bench", help="where vlkd.json goes (default runs/bench)")
    p.add_argument("--teacher-cache", default="runs/teachers", help="reference teachers (shared with quickstart)")
    p.add_argument("--lm-cache", default="runs/lms", help="reference LMs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a recipe override for the trained rows, VALUE in YAML (e.g. --set 'stages.0.trainable=[prefix]')",
    )  # fmt: skip
    args = p.parse_args(argv)
    full = {"seeds": 3, "steps": 200, "batch_size": 64, "vqa": 600, "captions": 300, "texts": 400}
    smoke = {"seeds": 1, "steps": 2, "batch_size": 8, "vqa": 16, "captions": 8, "texts": 16}
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ------------------------------------------------------------------------------------------------ models
def smoke_teacher(train: LabelledData, directory: Path) -> Path:
    """A tiny untrained CLIP (seconds; its figures mean nothing): the smoke mode's teacher."""
    if not (directory / "config.json").is_file():
        tokenizer = train_wordpiece([s.captions["en"] for s in train.dataset.samples], vocab_size=200)
        torch.manual_seed(0)
        build_student("test-clip", tokenizer).save_pretrained(directory)
    return directory


def recipe_for(row: str, seed: int, args, teacher: str, lm: str, cache: Path, out: Path) -> RecipeConfig:
    """``recipes/vlkd.yaml`` at the benchmark's sizes, with one objective left out for the ablation rows."""
    overrides: dict[str, Any] = {
        "teacher.name_or_path": teacher,
        "teacher.source": "cache",
        "teacher.cache": str(cache),
        "student.name_or_path": lm,
        "student.overrides.seed": seed,
        "stages.0.steps": args.steps,
        "train.batch_size": args.batch_size,
        "train.seed": seed,
        "train.output_dir": str(out / f"{row}-s{seed}"),
        "train.progress": False,
        "train.tensorboard": False,
        "train.warmup_steps": min(30, max(0, args.steps // 10)),
        "cache.workers": 0,
    }
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    cfg = load_recipe("vlkd", overrides)
    keep = TRAINED.get(row)
    if keep is not None:
        cfg.stages[0].losses = [term for term in cfg.stages[0].losses if term.name in keep]
    return cfg


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_row(
    predict_vqa, predict_caption, vqa_data, cap_data: LabelledData, lm=None, texts=(), batch_size: int = 64
) -> dict[str, Any]:
    """VQA accuracy (overall, per type), BLEU-4 / CIDEr-D and the text skill of one model."""
    vqa = get_task("vqa").evaluate(predict_vqa, vqa_data, batch_size=batch_size)
    items = [cap_data.dataset[i] for i in range(len(cap_data.dataset))]
    captions = [c for i in range(0, len(items), batch_size) for c in predict_caption(items[i : i + batch_size])]
    scores = caption_scores(captions, [[s["captions"]["en"]] for s in items])
    skill = None
    if lm is not None:
        skill = denoising_skill(lm.model, lm.tokenizer, texts, lm.options.mask_ratio, lm.options.mean_span)
    return {
        "vqa": {"overall": vqa["accuracy"], **{t: vqa["by_type"].get(t) for t in TYPES}},
        "bleu4": scores["bleu4"],
        "cider": scores["cider"],
        "text_skill": None if skill is None else skill["masked_token_accuracy"],
        "examples": captions[:3],
    }


def caption_prior(train: LabelledData):
    """Always the most frequent training caption (ties: the first in alphabetical order)."""
    counts = Counter(s.captions["en"] for s in train.dataset.samples)
    best = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
    return lambda samples: [best for _ in samples]


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per row: every figure as mean and std over the seeds (``None`` where a row has no such figure)."""

    def stat(values: list[float | None]) -> dict[str, float] | None:
        values = [v for v in values if v is not None]
        if not values:
            return None
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    table = {}
    for row, results in runs.items():
        table[row] = {
            "vqa": {k: stat([r["vqa"][k] for r in results]) for k in ("overall", *TYPES)},
            "bleu4": stat([r["bleu4"] for r in results]),
            "cider": stat([r["cider"] for r in results]),
            "text_skill": stat([r["text_skill"] for r in results]),
            "wall_seconds": statistics.fmean(r["wall_seconds"] for r in results),
        }
    return table


def targets(table: dict[str, Any], before: dict[str, float] | None) -> dict[str, Any]:
    """The issue's targets (benchmark figures, not assertions), from the table."""
    out: dict[str, Any] = {}
    vlkd, prior, q_only = table.get("vlkd"), table.get("answer_prior"), table.get("question_only")
    if vlkd and prior:
        for t in ("colour", "shape"):
            gap = 100 * (vlkd["vqa"][t]["mean"] - prior["vqa"][t]["mean"])
            out[f"vqa_{t}_points_over_prior"] = {"value": round(gap, 2), "target": 20.0, "met": gap >= 20.0}
    if vlkd and q_only:
        margin = vlkd["cider"]["mean"] - q_only["cider"]["mean"]
        need = 2 * max(vlkd["cider"]["std"], q_only["cider"]["std"])
        out["cider_over_question_only"] = {"value": round(margin, 4), "target": f"> {need:.4f}", "met": margin > need}
    if vlkd and before and vlkd["text_skill"]:
        ratio = vlkd["text_skill"]["mean"] / before["mean"] if before["mean"] else 0.0
        out["text_skill_after_over_before"] = {"value": round(ratio, 4), "target": ">= 0.95", "met": ratio >= 0.95}
    return out


def format_table(table: dict[str, Any], before: dict[str, float] | None) -> str:
    def pm(x: dict[str, float] | None, scale: float = 100.0, digits: int = 1) -> str:
        return "-" if x is None else f"{scale * x['mean']:.{digits}f} ± {scale * x['std']:.{digits}f}"

    head = "| row | VQA overall | yes/no | colour | shape | BLEU-4 | CIDEr-D | text skill | wall s |"
    lines = [head, "|" + "---|" * 9]
    for row, e in table.items():
        v = e["vqa"]
        cells = [pm(v["overall"]), pm(v["yes_no"]), pm(v["colour"]), pm(v["shape"])]
        cells += [pm(e["bleu4"], 100), pm(e["cider"], 1, 3), pm(e["text_skill"]), f"{e['wall_seconds']:.0f}"]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if before:
        lines.append(f"\ntext skill before VLKD (the reference LM): {pm(before)} ({TEXT_SKILL_NAME})")
    return "\n".join(lines)


def write(out: Path, payload: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vlkd.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = Path(args.output)
    work = out / "vlkd"
    say = lambda msg: print(f"[vlkd] {msg}", flush=True)  # noqa: E731

    limit = 256 if args.smoke else None
    train = load_data("bundled:easyvqa", "train", ["en"], limit=limit)
    test = load_data("bundled:easyvqa", "test", ["en"], limit=args.captions)
    vqa_data = load_task_data("bundled:easyvqa-vqa", "vqa", split="test", limit=args.vqa)
    all_test = test if args.texts <= len(test.dataset) else load_data("bundled:easyvqa", "test", ["en"])
    texts = held_out_texts([s.captions["en"] for s in all_test.dataset.samples])[: args.texts]

    if args.smoke:
        t_dir = smoke_teacher(train, work / "smoke-teacher")
        lm_cfg = FAST
    else:
        t_dir, _ = reference_teacher_dir(train, {"train.seed": 0}, False, args.teacher_cache)
        lm_cfg = ReferenceLMConfig()
    teacher: Teacher = load_teacher(t_dir)
    lm_dir = reference_lm_dir(lm_cfg, args.lm_cache, [s.captions["en"] for s in train.dataset.samples], say)
    cache = work / "teacher-cache"
    base_cfg = recipe_for("vlkd", 0, args, str(t_dir), str(lm_dir), cache, work)
    build_recipe_cache(base_cfg, [teacher], train.dataset, rebuild=True, progress=False)
    gen: GenerationConfig = base_cfg.eval.generation
    before_lm = Seq2SeqStudent.from_lm(str(lm_dir), None, teacher.dims.embed, teacher.dims.image_width)
    before_skill = denoising_skill(before_lm.model, before_lm.tokenizer, texts, 0.3, 3.0)["masked_token_accuracy"]
    before = {"mean": before_skill, "std": 0.0}  # one reference LM for every seed: no spread

    vqa_train = (
        load_task_data("bundled:easyvqa-vqa", "vqa", split="train", limit=limit)
        if "answer_prior" in args.rows
        else None
    )
    runs: dict[str, list[dict[str, Any]]] = {}
    setup = {
        "seeds": list(range(args.seeds)),
        "teacher": str(t_dir),
        "lm": str(lm_dir),
        "lm_saw": str(Path(lm_dir).parent / "saw.json"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}",
        "overrides": list(args.set),
        "threads": torch.get_num_threads(),
        "smoke": args.smoke,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "train_pairs": len(train.dataset),
        "vqa_questions": len(vqa_data),
        "caption_images": len(test.dataset),
        "held_out_texts": len(texts),
        "generation": to_dict(gen),
        "estimate": ESTIMATE,
        "command": " ".join(["python benchmarks/vlkd.py", *(argv if argv is not None else sys.argv[1:])]),
        "vldistill": __version__,
    }

    def payload() -> dict[str, Any]:
        table = summarise(runs)
        return {
            "rows": table,
            "text_skill_before": before,
            "text_skill_name": TEXT_SKILL_NAME,
            "targets": targets(table, before),
            "setup": {**setup, "total_wall_seconds": round(time.perf_counter() - start, 1)},
        }

    for seed in range(args.seeds):
        for row in args.rows:
            t0 = time.perf_counter()
            if row == "answer_prior":
                result = evaluate_row(answer_prior(vqa_train), caption_prior(train), vqa_data, test, None, (), 64)
            else:
                if row == "question_only":
                    torch.manual_seed(seed)  # the untrained projections' initialisation
                    student = Seq2SeqStudent.from_lm(
                        str(lm_dir), None, teacher.dims.embed, teacher.dims.image_width, seed=seed
                    ).eval()
                else:
                    cfg = recipe_for(row, seed, args, str(t_dir), str(lm_dir), cache, work)
                    summary = fit_recipe(
                        cfg, teachers=[teacher], train_data=train, evaluate_after=False, overwrite=True
                    )
                    student = Seq2SeqStudent.from_pretrained(summary["student_dir"]).eval()
                result = evaluate_row(
                    task_predictor(student, "vqa", teacher=teacher, generation=gen),
                    task_predictor(student, "captioning", teacher=teacher, generation=gen),
                    vqa_data,
                    test,
                    student,
                    texts,
                    gen.batch_size,
                )
            result["wall_seconds"] = time.perf_counter() - t0
            runs.setdefault(row, []).append(result)
            v = result["vqa"]
            say(
                f"{row} seed {seed}: VQA {100 * v['overall']:.1f} (yes/no {100 * (v['yes_no'] or 0):.1f}, colour "
                f"{100 * (v['colour'] or 0):.1f}, shape {100 * (v['shape'] or 0):.1f}), BLEU-4 {result['bleu4']:.3f},"
                f" CIDEr-D {result['cider']:.3f}, captions e.g. {result['examples'][:2]} "
                f"({result['wall_seconds']:.0f} s)"
            )
            write(out, payload())  # after every run: an interrupted benchmark keeps what it has
    final = payload()
    write(out, final)
    print("\n" + format_table(final["rows"], before) + "\n", flush=True)
    print(f"generation: {json.dumps(to_dict(gen))}", flush=True)
    for name, t in final["targets"].items():
        print(f"target {name}: {t['value']} (target {t['target']}: {'met' if t['met'] else 'MISSED'})", flush=True)
    say(f"wrote {out / 'vlkd.json'} in {final['setup']['total_wall_seconds']:.0f} s")
    return final


if __name__ == "__main__":
    main()
