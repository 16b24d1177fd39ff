"""Throughput of the teacher-output cache, in samples per second, and the memory of training from a large cache.

Command:  .venv/bin/python benchmarks/throughput.py
          (GPU, a real CLIP:  ... --teacher openai/clip-vit-base-patch32 --limit 8192 --batch-size 256 --steps 50)
Runtime:  ~2-3 min on a 2-core CPU with the defaults (bundled data, 1024 samples, the quickstart's teacher and
          student; the 1 GB cache for the memory measure is written under runs/bench/ and deleted afterwards)
Expected: B/F >= 0.9, C/S >= 0.9, and peak RSS training from the >= 1 GB cache below 1.5x that without a cache

Measures, on the same rows and batch size:
  F  teacher forward alone (inputs preprocessed beforehand, not timed)
  B  cache build (``build_cache``: hashing the data, loading in worker processes, teacher forward, writing)
  S  student training step with no teacher (contrastive loss)
  O  distillation with the live teacher (the dcclip recipe's stage-1 losses: fd image, fd text, xling)
  C  the same distillation from the cache
(F and B are measured ``--repeats`` times, alternately, and their medians reported: two runs of F a minute apart on
the 2-core machine differed by 30%), and the peak resident memory (``VmHWM`` from ``/proc/self/status``, see
``benchmarks/memory.py``; not ``ru_maxrss``, which a child inherits from its parent across exec) of two fresh
processes running the same distillation for a few steps: one from a cache padded to at least ``--cache-gb`` GB
(extra per-row bytes that training never reads), one with the live teacher and no cache. Prints a table and writes
``runs/bench/throughput.json``.

Teacher: ``--teacher`` (hub id or directory); by default the quickstart's trained reference teacher if
``runs/teachers/`` has one, else the same architecture untrained (throughput does not depend on the weights).
Student: ``--student``, a preset name (default ``clip-tiny``, the quickstart's) or a dual-encoder directory/hub id.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vldistill import __version__
from vldistill.batching import Collator
from vldistill.cache import CachedTeachers, build_cache, read_manifest, teacher_identity
from vldistill.config import CacheConfig, load_recipe, to_dict
from vldistill.data.sources import load_data
from vldistill.models import DualEncoder, Teacher, as_teacher, encode_batch, load_teacher
from vldistill.students import STUDENTS, build_student
from vldistill.tokenization import train_wordpiece
from vldistill.train.fit import tokenizer_corpus
from vldistill.train.loop import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import report_peak, run_measured  # benchmarks/memory.py: the honest peak RSS

LANGS = ["en", "zh"]
TEACHER_LANGS = ["en"]
TARGETS = {"B_over_F": 0.9, "C_over_S": 0.9}
RSS_TARGET = 1.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", help="hub id or directory of the teacher (default: the quickstart's reference teacher)")
    p.add_argument("--student", default="clip-tiny", help="student preset, or a dual-encoder directory / hub id")
    p.add_argument("--data", default="bundled:easyvqa", help="training data spec (as data.train)")
    p.add_argument("--split", default="train")
    p.add_argument("--limit", type=int, default=1024, help="training samples used by every measure")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed training steps for S, O and C")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps before them")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data-loading worker processes of the cache build (default: 0 on a CPU, whose cores all run the teacher; "
        "min(8, cores - 1) with a GPU)",
    )
    p.add_argument(
        "--cache-gb", type=float, default=1.0, help="size of the padded cache for the memory measure (0: skip)"
    )
    p.add_argument("--rss-steps", type=int, default=10, help="training steps of each memory measure")
    p.add_argument("--repeats", type=int, default=3, help="F and B are measured this many times, alternately (medians)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--work-dir", default="runs/bench", help="caches and the JSON go here")
    p.add_argument("--keep", action="store_true", help="keep the padded cache")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)  # internal: one memory measure in a fresh process
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- models
def load_bench_teacher(args: argparse.Namespace) -> tuple[Teacher, str]:
    if args.teacher:
        return load_teacher(args.teacher, languages=TEACHER_LANGS), args.teacher
    trained = sorted(Path("runs/teachers").glob("reference-*/model"), key=lambda p: p.stat().st_mtime)
    if trained:
        return load_teacher(trained[-1], languages=TEACHER_LANGS), str(trained[-1])
    cfg = load_recipe("reference-teacher")
    data = load_data(args.data, args.split, TEACHER_LANGS, limit=args.limit)
    tok = train_wordpiece(tokenizer_corpus(data, TEACHER_LANGS), vocab_size=cfg.student.vocab_size)
    torch.manual_seed(0)
    model = build_student(cfg.student.preset, tokenizer=tok)
    return as_teacher(model, TEACHER_LANGS), f"{cfg.student.preset} (untrained: no runs/teachers/reference-*)"


def build_bench_student(args: argparse.Namespace, data) -> DualEncoder:
    if args.student in STUDENTS:
        tok = train_wordpiece(tokenizer_corpus(data, LANGS), vocab_size=load_recipe("dcclip").student.vocab_size)
        torch.manual_seed(0)
        return build_student(args.student, tokenizer=tok)
    return DualEncoder.from_pretrained(args.student)


def recipe(args: argparse.Namespace, out: Path, losses: list[Any], teacher: dict[str, Any] | None, steps: int):
    raw = {
        "name": "bench",
        "teachers": [teacher] if teacher else [],
        "student": {"preset": "clip-tiny"},  # not built from the recipe: the benchmark passes its student
        "data": {"train": args.data, "eval": None, "languages": LANGS, "limit_train": args.limit},
        "stages": [{"name": "timed", "steps": steps, "losses": losses}],
        "cache": {"workers": args.workers},
        "train": {
            "batch_size": args.batch_size,
            "warmup_steps": 0,
            "log_every": 1,
            "progress": False,
            "tensorboard": False,
            "output_dir": str(out),
        },
    }
    return load_recipe(raw=raw)


def distill_losses() -> list[dict[str, Any]]:
    return to_dict(load_recipe("dcclip").stages[0])["losses"]


STUDENT_LOSSES = [{"name": "clip", "langs": LANGS}]


# ---------------------------------------------------------------------------------------------------- measures
def teacher_forward_rate(teacher: Teacher, dataset, batch_size: int) -> float:
    """F: samples per second of the teacher's forward alone, on batches preprocessed beforehand."""
    collate = Collator(teacher, [teacher], LANGS, [TEACHER_LANGS])
    needs = frozenset({"teacher"})
    encode_batch(teacher, collate([dataset[i] for i in range(min(batch_size, len(dataset)))])["teachers"][0], needs)
    seconds = 0.0
    for start in range(0, len(dataset), batch_size):
        inputs = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])["teachers"][0]
        _sync()
        t0 = time.perf_counter()
        encode_batch(teacher, inputs, needs)
        _sync()
        seconds += time.perf_counter() - t0
    return len(dataset) / seconds


def train_rate(cfg, student: DualEncoder, dataset, warmup: int, teachers=(), source=None) -> float:
    """Samples per second of training steps after ``warmup`` steps (from the trainer's own cumulative log)."""
    result = Trainer(cfg, copy.deepcopy(student), dataset, list(teachers), source).fit(overwrite=True)
    rows = result.history
    seen = [r["step"] * cfg.train.batch_size for r in rows]
    elapsed = [s / r["samples_per_second"] for s, r in zip(seen, rows, strict=True)]
    return (seen[-1] - seen[warmup - 1]) / (elapsed[-1] - elapsed[warmup - 1])


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_rss(args: argparse.Namespace, mode: str, spec: dict[str, Any]) -> float:
    """Peak RSS (MB) of a fresh process that trains ``--rss-steps`` steps from the cache or with the live teacher."""
    spec_file = Path(args.work_dir) / f"rss-{mode}.json"
    spec_file.write_text(json.dumps({**spec, "mode": mode}))
    cmd = [sys.executable, __file__, "--rss-child", str(spec_file), "--batch-size", str(args.batch_size)]
    cmd += ["--data", args.data, "--split", args.split, "--limit", str(args.limit), "--work-dir", args.work_dir]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return run_measured(cmd)["peak_rss_mb"]


def rss_child(args: argparse.Namespace) -> None:
    spec = json.loads(Path(args.rss_child).read_text())
    data = load_data(args.data, args.split, LANGS, limit=args.limit).dataset
    student = DualEncoder.from_pretrained(spec["student"])
    out = Path(args.work_dir) / f"rss-{spec['mode']}"
    if spec["mode"] == "cache":
        teacher = {"name_or_path": "bench", "languages": TEACHER_LANGS, "source": "cache", "cache": spec["cache"]}
        cfg = recipe(args, out, distill_losses(), teacher, spec["steps"])
        manifest = read_manifest(spec["cache"])  # the benchmark's own cache: its recorded teacher is the run's
        source = CachedTeachers(spec["cache"], data, manifest["teachers"], [TEACHER_LANGS], cfg.cache)
        Trainer(cfg, student, data, [], source).fit(overwrite=True)
    else:
        cfg = recipe(args, out, distill_losses(), {"name_or_path": spec["teacher"]}, spec["steps"])
        Trainer(cfg, student, data, [load_teacher(spec["teacher"], languages=TEACHER_LANGS)]).fit(overwrite=True)
    report_peak()  # VmHWM: this process's own peak, not the parent's carried over by exec


# ---------------------------------------------------------------------------------------------------------- run
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.workers is None:
        args.workers = min(8, (os.cpu_count() or 1) - 1) if device == "cuda" else 0
    if args.rss_child:
        rss_child(args)
        return {}
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = load_data(args.data, args.split, LANGS, limit=args.limit).dataset
    teacher, teacher_name = load_bench_teacher(args)
    teacher.to(device)
    student = build_bench_student(args, load_data(args.data, args.split, LANGS, limit=args.limit))
    print(
        f"teacher {teacher_name}: {teacher.num_parameters():,} params; student {args.student}: "
        f"{student.num_parameters():,} params; {len(data)} samples, batch {args.batch_size}, {device}",
        flush=True,
    )
    steps = args.warmup + args.steps
    identity = [teacher_identity(teacher, teacher_name)]
    options = CacheConfig(workers=args.workers, batch_size=args.batch_size)
    teacher_cfg = {"name_or_path": teacher_name, "languages": TEACHER_LANGS}
    r: dict[str, Any] = {}

    cache_dir = work / "cache"
    runs: dict[str, list[float]] = {"F": [], "B": [], "B_build_loop": []}
    for _ in range(args.repeats):  # F and B alternately: a drift of the machine's speed hits both
        runs["F"].append(teacher_forward_rate(teacher, data, args.batch_size))
        shutil.rmtree(cache_dir, ignore_errors=True)
        t0 = time.perf_counter()
        build = build_cache(cache_dir, [teacher], data, [TEACHER_LANGS], identity, options, progress=False)
        runs["B"].append(len(data) / (time.perf_counter() - t0))
        runs["B_build_loop"].append(build["samples_per_second"])  # the loop alone, without hashing the data
    for key, values in runs.items():
        r[key] = statistics.median(values)
    r["F_runs"], r["B_runs"] = [round(v, 1) for v in runs["F"]], [round(v, 1) for v in runs["B"]]
    print(f"F teacher forward:        {r['F']:10.1f} samples/s (median of {r['F_runs']})", flush=True)
    print(f"B cache build:            {r['B']:10.1f} samples/s (median of {r['B_runs']})", flush=True)
    r["S"] = train_rate(recipe(args, work / "S", STUDENT_LOSSES, None, steps), student, data, args.warmup)
    print(f"S student step:           {r['S']:10.1f} samples/s", flush=True)
    live_cfg = recipe(args, work / "O", distill_losses(), teacher_cfg, steps)
    r["O"] = train_rate(live_cfg, student, data, args.warmup, teachers=[teacher])
    print(f"O live distillation:      {r['O']:10.1f} samples/s", flush=True)
    cached_cfg = recipe(
        args, work / "C", distill_losses(), {**teacher_cfg, "source": "cache", "cache": str(cache_dir)}, steps
    )
    source = CachedTeachers(cache_dir, data, identity, [TEACHER_LANGS], cached_cfg.cache)
    r["C"] = train_rate(cached_cfg, student, data, args.warmup, source=source)
    print(f"C distillation from cache:{r['C']:10.1f} samples/s", flush=True)
    r["B_over_F"], r["C_over_S"], r["C_over_O"] = r["B"] / r["F"], r["C"] / r["S"], r["C"] / r["O"]

    if args.cache_gb > 0:
        big = work / "cache-padded"
        shutil.rmtree(big, ignore_errors=True)
        pad = math.ceil(args.cache_gb * (1 << 30) / len(data))
        build_cache(big, [teacher], data, [TEACHER_LANGS], identity, options, progress=False, pad_bytes=pad)
        r["cache_gb"] = round(sum(p.stat().st_size for p in big.iterdir()) / (1 << 30), 3)
        saved = work / "rss-models"
        shutil.rmtree(saved, ignore_errors=True)
        student.save_pretrained(saved / "student")
        teacher_path = args.teacher or str(saved / "teacher")
        if not args.teacher:
            teacher.save_pretrained(teacher_path)
        spec = {"student": str(saved / "student"), "teacher": teacher_path, "cache": str(big), "steps": args.rss_steps}
        r["rss_cache_mb"] = peak_rss(args, "cache", spec)
        r["rss_nocache_mb"] = peak_rss(args, "nocache", spec)
        r["rss_ratio"] = r["rss_cache_mb"] / r["rss_nocache_mb"]
        print(
            f"peak RSS from a {r['cache_gb']} GB cache: {r['rss_cache_mb']:.0f} MB; live teacher, no cache: "
            f"{r['rss_nocache_mb']:.0f} MB (ratio {r['rss_ratio']:.2f}, target < {RSS_TARGET})",
            flush=True,
        )
        if not args.keep:
            shutil.rmtree(big, ignore_errors=True)

    r = {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
    r["targets"] = {k: {"value": r[k], "target": t, "met": r[k] >= t} for k, t in TARGETS.items()}
    if "rss_ratio" in r:
        r["targets"]["rss_cache_over_nocache"] = {
            "value": r["rss_ratio"],
            "target": f"< {RSS_TARGET}",
            "met": r["rss_ratio"] < RSS_TARGET,
        }
    r["setup"] = {
        "teacher": teacher_name,
        "student": args.student,
        "data": args.data,
        "samples": len(data),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "build_workers": args.workers,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU",
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "vldistill": __version__,
    }
    print(
        f"B/F {r['B_over_F']:.3f} (target >= 0.9)   C/S {r['C_over_S']:.3f} (target >= 0.9)   C/O {r['C_over_O']:.3f}"
    )
    (work / "throughput.json").write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {work / 'throughput.json'}")
    return r


if __name__ == "__main__":
    main()
