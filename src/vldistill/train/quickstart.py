"""``vldistill quickstart``: the main job, offline, on the bundled data.

1. builds the bundled English + Chinese dataset and trains the tokenizers (teacher: English; student: both);
2. without ``--teacher``, trains a reference teacher CLIP on the English captions and caches it under
   ``runs/teachers/`` keyed by its config (later runs reuse it; a changed config retrains it);
3. distils a student with at most 1/8 of the teacher's parameters with ``recipes/dcclip.yaml``, from a cache of the
   teacher's outputs on the train split (built once with the teacher, then read at the speed of the student);
4. trains the same student architecture without the teacher (contrastive loss only, same initialisation, steps and
   batch size) on the same pairs, and for context on every pair; the three students train side by side, one CPU
   thread each (:mod:`vldistill.train.side_by_side`: a tiny model cannot use two cores well), logs in ``logs/``.
   The two runs without the teacher are reused by a later run when nothing they depend on changed (their config,
   the initial weights and tokenizer, the thread count, vldistill's code: :func:`training_key`); the student is
   always trained;
5. evaluates teacher, student and baseline, prints a table, writes ``results.json``, saves the student in
   Hugging Face format and writes a report with a plot.

Sits on top of the library (like the trainer and the CLI).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..cache import build_recipe_cache
from ..config import load_recipe, non_default, to_dict
from ..data.sources import LabelledData, load_data
from ..data.splits import paired_indices
from ..data.texts import load_free_texts
from ..evaluation import agreement, evaluate
from ..export.card import write_student_card
from ..files import write_text
from ..models import DualEncoder, Teacher, load_teacher
from ..students import load_student, prepare_student
from ..tokenization import train_wordpiece
from .fit import EVAL_BATCH_SIZE, adapted_cosine, baseline_config, fit_recipe, image_ms_in_turns, tokenizer_corpus
from .report import write_report
from .side_by_side import run_side_by_side, side_by_side_threads

# --fast: the same pipeline on a smaller slice, for tests and a first look (< 2 minutes).
FAST_DATA = {"data.limit_train": 768, "data.limit_eval": 200}
FAST_TEACHER = {"stages.0.steps": 60, "train.batch_size": 64}
FAST_STUDENT = {"stages.0.steps": 30, "stages.1.steps": 20, "train.batch_size": 64}
# The student and its baseline may use the image-caption pairing of 10% of the training samples (400 of 4,000): a
# small captioned set beside many images and captions a user has for free (DC-CLIP's stage 1 is unimodal). The
# teacher stands for a large pretrained CLIP and has seen every pair.
PAIRED = 0.1
# Text a user has for free besides captions: the 107 distinct questions of easy-vqa's train split (no images, no
# answers). Stage 1 distils the student's text tower on them too, so it meets the colour and shape words in more
# contexts than the captions' six phrasings (the zero-shot prompts are a context the captions never show).
FREE_TEXTS = {"en": ["bundled:easyvqa-questions"]}


def run_quickstart(
    output_dir: str | Path = "runs/quickstart",
    teacher: str | None = None,
    fast: bool = False,
    seed: int = 0,
    teacher_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Run the whole quickstart and return the results dictionary (also written to ``results.json``)."""
    start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = {**(FAST_DATA if fast else {}), "train.seed": seed, "train.progress": True}

    # 1. data and tokenizers
    _say("1/5 data: bundled easy-vqa, English + Chinese captions")
    d_cfg = load_recipe("dcclip", distill_overrides(seed, out / "distill", fast))  # the teacher is not known yet
    train = load_data(d_cfg.data.train, "train", ["en", "zh"], limit=d_cfg.data.limit_train)
    test = load_data(d_cfg.data.eval, "test", ["en", "zh"], limit=d_cfg.data.limit_eval)
    free = load_free_texts(d_cfg.data.texts)  # texts without images (the easy-vqa questions), for stage 1
    corpus = tokenizer_corpus(train, ["en", "zh"], free)
    student_tok = train_wordpiece(corpus, vocab_size=d_cfg.student.vocab_size)
    n_paired = len(paired_indices(len(train.dataset), d_cfg.data.paired, seed))

    # 2. teacher
    if teacher:
        _say(f"2/5 teacher: {teacher}")
        t_path, t_history = str(teacher), []
    else:
        t_dir, t_history = reference_teacher_dir(train, common, fast, teacher_cache or out.parent / "teachers")
        t_path = str(t_dir)  # its real directory: `vldistill fit --teacher t_path` then reuses the cache below
    t_model = load_teacher(t_path)

    # 3. distilled student, from the teacher's outputs cached once for the train split; and 4. its baseline
    s_cfg = load_recipe("dcclip", distill_overrides(seed, out / "distill", fast, t_path, out / "teacher-cache"))
    student = prepare_student(s_cfg, tokenizer=student_tok, teachers=[t_model])  # projection_dim: teacher
    if student.num_parameters() * 8 > t_model.num_parameters():
        raise ValueError(
            f"the student has {student.num_parameters():,} parameters, more than 1/8 of the teacher's "
            f"{t_model.num_parameters():,}: choose a larger teacher or a smaller student preset"
        )
    _say(
        f"3/5 distil: {s_cfg.student.preset} ({student.num_parameters():,} params, embedding width "
        f"{student.dims.embed}; teacher {t_model.dims.embed}) with recipes/dcclip.yaml: stage 1 on all "
        f"{len(train.dataset)} training images and captions as unpaired data and {len(free)} questions as free "
        f"text, stage 2 on {n_paired} pairs"
    )
    cached = build_recipe_cache(s_cfg, [t_model], train.dataset, replace=True)  # reused when it is up to date
    _say(f"3/5 teacher outputs cached in {cached['cache']} ({cached['built_rows']} rows computed)")
    # 4. its no-teacher baseline (`vldistill fit --baseline`'s config: the recipe's task loss only, the same student
    # initialisation, steps and batch size, on the same pairs) and, for context, the same student trained without
    # the teacher on every pair the teacher saw. The three trainings are independent: side by side, one thread each.
    b_cfg = baseline_config(s_cfg, out / "baseline")
    a_cfg = baseline_config(
        load_recipe(raw={**to_dict(s_cfg), "data": {**to_dict(s_cfg.data), "paired": None}}), out / "all-pairs"
    )
    runs = {"student": (s_cfg, [t_model]), "baseline": (b_cfg, []), "all_pairs": (a_cfg, [])}
    # Threads for three side by side, also when fewer train: a thread count changes the order of floating-point
    # additions, and a run trained alone must give what it gives beside the others.
    threads = side_by_side_threads(len(runs))
    # The runs without the teacher are reused when nothing they depend on changed (their config, initial weights,
    # tokenizer, thread count, code), as the teacher is: a rerun after a change to the distillation recipe retrains the
    # student only.
    depends = [student_digest(student), threads or torch.get_num_threads(), torch.__version__, code_digest()]
    keys = {name: training_key(runs[name][0], *depends) for name in ("baseline", "all_pairs")}
    trained = {name: summary for name, key in keys.items() if (summary := reusable_run(runs[name][0], key))}
    what = {"baseline": f"on the {n_paired} pairs", "all_pairs": f"on all {len(train.dataset)} pairs, for context"}
    for name in keys:
        cfg = runs[name][0]
        if name in trained:
            _say(f"4/5 {name}: reusing {cfg.train.output_dir}, trained {what[name]} (delete it to retrain)")
        else:
            _say(f"4/5 {name}: the same student without the teacher {what[name]} ({cfg.total_steps} steps)")
    jobs = {
        name: functools.partial(
            fit_recipe, cfg, teachers=ts, student=student, train_data=train, evaluate_after=False, overwrite=True
        )
        for name, (cfg, ts) in runs.items()
        if name not in trained
    }
    if threads:
        how = f"side by side, {threads} thread(s) each" if len(jobs) > 1 else f"on {threads} thread(s), as beside them"
        _say(f"4/5 training {', '.join(jobs)} {how}; logs in {out / 'logs'}/")
    else:  # one after the other, in this process: each from its own copy of the initial student
        jobs = {name: _fresh(job, student) for name, job in jobs.items()}
    configs = {name: runs[name][0] for name in jobs}
    trained.update(run_side_by_side(jobs, out / "logs", threads, poll=lambda: _say(_progress(configs))))
    for name, key in keys.items():
        if not trained[name].get("reused"):
            record_run(runs[name][0], key, trained[name])
    distill, everything = trained["student"], trained["all_pairs"]
    student = load_student(distill["student_dir"])
    student.save_pretrained(out / "student")
    baseline = load_student(trained["baseline"]["student_dir"])
    all_pairs = load_student(everything["student_dir"])

    # 5. evaluation
    _say("5/5 evaluate teacher, student and baseline on the test split")
    models = {"student": student, "baseline": baseline, "all_pairs": all_pairs}
    predictions: dict[str, list[int]] = {}
    results = evaluate_models(t_model, models, train, test, s_cfg.eval.batch_size, predictions)
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    results["setup"] = {
        "fast": fast,
        "seed": seed,
        "teacher": teacher or f"reference (trained by the quickstart on all {len(train.dataset)} pairs): {t_path}",
        "train_samples": len(train.dataset),
        "paired_samples": n_paired,
        "unpaired_samples": len(train.dataset) - n_paired,
        "free_texts": len(free),
        "test_samples": len(test.dataset),
        "student_steps": s_cfg.total_steps,
        "baseline_steps": s_cfg.total_steps,
        "batch_size": s_cfg.train.batch_size,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}",
        "vldistill": __version__,
    }
    results["targets"] = target_check(results)
    results["summary"] = summary_sentence(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    card_eval = {k: {m: results[k][m] for m in ("zeroshot", "retrieval")} for k in ("student", "teacher", "baseline")}
    card = {"teachers": [t_model], "train_size": len(train.dataset), "paired_size": n_paired}
    write_student_card(out / "student", s_cfg, student, eval_result=card_eval, **card)  # its model card, README.md
    histories = {
        "teacher": t_history,
        "student (distilled)": _rows(distill),
        "baseline": _rows(trained["baseline"]),
        "all pairs, no teacher": _rows(everything),
    }
    models = {"teacher": t_model, "student": student, "baseline": baseline}
    write_report(out, results, histories, models, test, predictions)  # report.md, report.html and the pictures
    print(format_table(results), flush=True)
    print(results["summary"], flush=True)
    _say(f"wrote {out / 'results.json'}, {out / 'student'}/ and {out / 'report.md'} in {results['wall_seconds']} s")
    return results


def distill_overrides(
    seed: int,
    output_dir: str | Path,
    fast: bool = False,
    teacher: str | Path | None = None,
    teacher_cache: str | Path | None = None,
) -> dict[str, Any]:
    """The overrides of ``recipes/dcclip.yaml`` the quickstart distils its student with (``benchmarks/`` reuse
    them): seed, the paired share, and with ``teacher`` its outputs read from ``teacher_cache``."""
    out = {**(FAST_DATA if fast else {}), "train.seed": seed, "train.progress": True, **(FAST_STUDENT if fast else {})}
    out.update({"train.output_dir": str(output_dir), "data.paired": PAIRED, "data.split.seed": seed})
    out["data.texts"] = FREE_TEXTS
    if teacher is not None:
        out.update(
            {
                "teacher.name_or_path": str(teacher),
                "teacher.source": "cache",
                "teacher.cache": str(teacher_cache),
                "cache.workers": 0,  # the bundled thumbnails preprocess faster in-process than in worker processes
            }
        )
    return out


def _fresh(job, student: DualEncoder):
    """``job`` run on a copy of ``student`` as it is now (side by side, each forked process has its own copy)."""
    initial = copy.deepcopy(student.state_dict())

    def run():
        student.load_state_dict(initial)
        return job()

    return run


def _progress(runs: dict[str, Any]) -> str:
    """``student 120/400, baseline 140/400, ...``: the steps each run has logged to its ``metrics.jsonl``."""
    parts = []
    for name, cfg in runs.items():
        path = Path(cfg.train.output_dir) / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        done = 0
        if lines:
            row = json.loads(lines[-1])
            done = sum(s.steps for s in cfg.stages[: row["stage_index"]]) + row["step"]
        parts.append(f"{name} {done}/{cfg.total_steps}")
    return "training: " + ", ".join(parts)


def _rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    path = Path(summary["output_dir"]) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


# ------------------------------------------------------------------------------------------- reused runs
def training_key(cfg: Any, *depends: Any) -> str:
    """What a training run's result depends on, hashed: the settings of ``cfg`` that differ from their defaults (a
    field added to vldistill later leaves the key alone), less those that only show or place the run, and
    ``depends`` (JSON-able: what the config does not say, such as a digest of the initial weights)."""
    key_src = {k: v for k, v in non_default(cfg).items() if k not in ("tiny", "cache")}
    shown = ("output_dir", "progress", "tensorboard", "threads")
    key_src["train"] = {k: v for k, v in key_src.get("train", {}).items() if k not in shown}
    return hashlib.sha256(json.dumps([key_src, __version__, *depends], sort_keys=True).encode()).hexdigest()[:12]


def student_digest(student: DualEncoder) -> str:
    """A digest of a student's initial weights and its tokenizer's vocabulary: architecture, widths (the teacher's,
    with ``projection_dim: teacher``), seed and tokenizer in one string."""
    h = hashlib.sha256()
    for name, tensor in sorted(student.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    vocab = getattr(student, "tokenizer", None)
    if vocab is not None:
        h.update(json.dumps(sorted(vocab.get_vocab().items())).encode())
    return h.hexdigest()[:16]


def code_digest(root: str | Path | None = None) -> str:
    """A digest of vldistill's Python sources (``root``: the package's directory): a run trained by other code is
    not reused, also when the version number did not change (a checkout being worked on)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


REUSE_FILE = "quickstart-run.json"  # written last, after the run saved its student: a run without it is retrained


def reusable_run(cfg: Any, key: str) -> dict[str, Any] | None:
    """The summary of a finished run in ``cfg.train.output_dir`` trained with the same ``key``, or None."""
    out = Path(cfg.train.output_dir)
    try:
        record = json.loads((out / REUSE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if record.get("key") != key or not all((out / f).is_file() for f in ("student/config.json", "metrics.jsonl")):
        return None
    return {**record["summary"], "output_dir": str(out), "student_dir": str(out / "student"), "reused": True}


def record_run(cfg: Any, key: str, summary: dict[str, Any]) -> None:
    """Mark the finished run in ``cfg.train.output_dir`` as reusable by a later run with the same ``key``."""
    out = Path(cfg.train.output_dir)
    kept = {k: v for k, v in summary.items() if k not in ("output_dir", "student_dir")}
    write_text(out / REUSE_FILE, json.dumps({"key": key, "summary": kept}, indent=2) + "\n")  # atomic


# --------------------------------------------------------------------------------------------- the teacher
def reference_teacher(
    train: LabelledData, common: dict[str, Any], fast: bool, cache_root: str | Path
) -> tuple[Teacher, list[dict[str, Any]]]:
    """Train (or reuse) the reference teacher: a CLIP trained on the English captions only."""
    model_dir, history = reference_teacher_dir(train, common, fast, cache_root)
    return load_teacher(model_dir), history


def reference_teacher_dir(
    train: LabelledData, common: dict[str, Any], fast: bool, cache_root: str | Path
) -> tuple[Path, list[dict[str, Any]]]:
    """Train (or reuse) the reference teacher; return the directory it is saved in (``.../reference-KEY/model``,
    what ``--teacher`` names it by) and its training history."""
    overrides = {**common, **(FAST_TEACHER if fast else {})}
    cfg = load_recipe("reference-teacher", overrides)
    key = training_key(cfg)
    final = Path(cache_root) / f"reference-{key}"
    if (final / "model" / "config.json").is_file():
        _say(f"2/5 teacher: reusing the reference teacher in {final} (delete it to retrain)")
        history = [json.loads(x) for x in (final / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return final / "model", history
    _say(f"2/5 teacher: training a reference teacher (recipes/reference-teacher.yaml, {cfg.total_steps} steps)")
    work = Path(cache_root) / f".work-{key}"
    cfg = load_recipe("reference-teacher", {**overrides, "train.output_dir": str(work)})  # not part of the key
    corpus = tokenizer_corpus(train, ["en"])
    model = prepare_student(cfg, tokenizer=train_wordpiece(corpus, vocab_size=cfg.student.vocab_size))
    fit_recipe(cfg, student=model, train_data=train, evaluate_after=False, overwrite=True)  # data.languages: [en]
    tmp = Path(cache_root) / f".tmp-{key}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model")
    shutil.copy(work / "metrics.jsonl", tmp / "metrics.jsonl")
    (tmp / "recipe.json").write_text(json.dumps(to_dict(cfg), indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # the teacher appears complete or not at all
    shutil.rmtree(work, ignore_errors=True)
    history = [json.loads(x) for x in (final / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return final / "model", history


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_models(
    teacher: DualEncoder,
    models: dict[str, DualEncoder],
    train: LabelledData,
    test: LabelledData,
    batch_size: int = EVAL_BATCH_SIZE,
    keep_predictions: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """The teacher (English) and each model (English and Chinese) on the same test images; ``batch_size`` images or
    texts per encoder call. ``keep_predictions``: filled with each model's English zero-shot predictions (for the
    report's pictures, which then need not evaluate again)."""
    eval_set = test.eval_set(["en", "zh"])
    t_out = evaluate(teacher, eval_set, ["en"], batch_size=batch_size)
    speed_images = [test.dataset[i]["image"] for i in range(min(64, len(test.dataset)))]
    ms = image_ms_in_turns({"teacher": teacher, **models}, speed_images)  # in turns: the speed-up is a ratio
    results: dict[str, Any] = {"teacher": _model_entry(teacher, t_out, ms["teacher"])}
    predictions = {"teacher": t_out["predictions"]["en"].tolist()}
    fit_images = [train.dataset[i]["image"] for i in range(min(512, len(train.dataset)))]
    embedded = teacher.embed_images(fit_images), t_out["image_embeds"]  # the teacher's, once for every model
    for name, model in models.items():
        out = evaluate(model, eval_set, ["en", "zh"], batch_size=batch_size)
        entry = _model_entry(model, out, ms[name])
        entry["agreement_with_teacher"] = {"en": agreement(out["predictions"]["en"], t_out["predictions"]["en"])}
        entry["image_cosine_with_teacher"] = adapted_cosine(model, teacher, fit_images, eval_set.images, embedded)
        results[name] = entry
        predictions[name] = out["predictions"]["en"].tolist()
    if keep_predictions is not None:
        keep_predictions.update(predictions)
    return results


def summary_sentence(r: dict[str, Any]) -> str:
    """One plain sentence a newcomer understands, computed from the run, naming any target it missed."""
    t_en = r["teacher"]["zeroshot"]["en"]["top1"]
    s_en, s_zh = r["student"]["zeroshot"]["en"]["top1"], r["student"]["zeroshot"]["zh"]["top1"]
    b_en = r["baseline"]["zeroshot"]["en"]["top1"]
    speed = r["teacher"]["image_ms_per_image"] / max(r["student"]["image_ms_per_image"], 1e-9)
    ratio = r["teacher"]["params"] / r["student"]["params"]
    gain = 100 * (s_en - b_en)
    paired = r["setup"]["paired_samples"]
    text = (
        f"The distilled student keeps {100 * s_en / t_en:.0f}% of the teacher's English accuracy "
        f"({100 * s_en:.1f}% vs {100 * t_en:.1f}%) and reaches {100 * s_zh:.1f}% in Chinese, which the teacher cannot "
        f"read, with 1/{ratio:.0f} of its parameters and {speed:.1f}x faster image encoding; it "
        f"{'beats' if gain >= 0 else 'trails'} the same student trained on the same {paired} captioned images "
        f"without the teacher by {abs(gain):.1f} points."
    )
    missed = [k for k, v in r["targets"].items() if not v["met"]]
    return text + (f" Targets missed: {', '.join(missed)}." if missed else " Every target was met.")


def _model_entry(model: DualEncoder, out: dict[str, Any], image_ms: float) -> dict[str, Any]:
    return {
        "params": model.num_parameters(),
        "image_ms_per_image": round(image_ms, 4),
        "zeroshot": out["metrics"]["zeroshot"],
        "retrieval": out["metrics"]["retrieval"],
    }


def target_check(r: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, computed from this run (a benchmark, not an assertion)."""
    t_en = r["teacher"]["zeroshot"]["en"]["top1"]
    s_en, s_zh = r["student"]["zeroshot"]["en"]["top1"], r["student"]["zeroshot"]["zh"]["top1"]
    b_en = r["baseline"]["zeroshot"]["en"]["top1"]
    speed = r["teacher"]["image_ms_per_image"] / max(r["student"]["image_ms_per_image"], 1e-9)
    checks = {
        "student_en_over_teacher_en": (s_en / t_en if t_en else 0.0, 0.90),
        "student_zh_over_teacher_en": (s_zh / t_en if t_en else 0.0, 0.85),
        "student_minus_baseline_en_points": (100 * (s_en - b_en), 10.0),
        "image_speedup": (speed, 4.0),
        "param_ratio": (r["teacher"]["params"] / r["student"]["params"], 8.0),
    }
    return {k: {"value": round(v, 4), "target": t, "met": v >= t} for k, (v, t) in checks.items()}


def format_table(r: dict[str, Any]) -> str:
    rows = [("", "params", "img ms", "EN top1", "EN top5", "ZH top1", "ZH top5", "EN i2t R@1", "ZH i2t R@1", "agree")]
    for name in ("teacher", "student", "baseline", "all_pairs"):
        if name not in r:
            continue
        e = r[name]
        zs, rt = e["zeroshot"], e["retrieval"]

        def pct(d, lang, key):
            return f"{100 * d[lang][key]:.1f}" if lang in d else "-"

        agree = e.get("agreement_with_teacher", {}).get("en")
        rows.append(
            (
                name,
                f"{e['params'] / 1e6:.2f}M",
                f"{e['image_ms_per_image']:.3f}",
                pct(zs, "en", "top1"),
                pct(zs, "en", "top5"),
                pct(zs, "zh", "top1"),
                pct(zs, "zh", "top5"),
                pct(rt, "en", "i2t_r1"),
                pct(rt, "zh", "i2t_r1"),
                "-" if agree is None else f"{100 * agree:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    targets = [
        f"{k}: {v['value']} (target {v['target']}, {'met' if v['met'] else 'MISSED'})" for k, v in r["targets"].items()
    ]
    return "\n".join(["", *lines, "", *targets, f"wall: {r['wall_seconds']} s", ""])
