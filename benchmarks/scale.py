"""Scale: a synthetic webdataset of tiny image-caption pairs, its teacher-output cache, and training from it.

Command:  .venv/bin/python benchmarks/scale.py                    (200,000 samples; the full measure)
          .venv/bin/python benchmarks/scale.py --smoke            (2,000 samples; what tests/test_scale_bench.py runs)
Runtime:  the full measure 8 min 17 s on an idle 2-core CPU (2026-11-30; writing the shards 78 s, the two 200k
          builds 3 min each); the smoke run ~40 s
Expected: rss_200k_mb / rss_20k_mb < 1.2 (training streams at constant memory); open_200k_s close to open_20k_s
          (opening a cache reads its manifest and stats its shards, not the data); build_2proc_sps >= 0.9 x
          build_1proc_sps on 2 cores. Measured (README "Scaling out"): RSS 393 / 395 MB (ratio 1.004), opening
          0.044 / 0.072 s, builds 1,085 vs 1,783 samples/s (2 processes 1.64x one), identical caches

Writes ``--samples`` pairs (16x16 PNG, one caption, a label in ``.json``) as webdataset tar shards of ``--per-shard``
samples under ``WORK/wds/``, as img2dataset lays them out, then measures:

  build_1proc_sps       ``vldistill cache`` on the full set, one process with every core's thread (``python -m
                        vldistill.cli cache``, ``OMP_NUM_THREADS`` = the cores): wall time of the command, start-up in
  build_2proc_sps       the same cache built anew by two processes with one thread each (``torchrun
                        --nproc_per_node 2``, gloo): wall time of the launch, start-up in; the two caches are compared
                        shard by shard (``build_identical``)
  open_20k_s/200k_s     opening the cache for a streamed training run: the stream over the shards and the cache
                        matched to it (counts and shard fingerprint from the manifest), in a fresh process
  rss_20k_mb/200k_mb    peak resident memory (``VmHWM``, see ``benchmarks/memory.py``) of a fresh process that opens
                        the cache and trains the same ``--steps`` steps from it, streaming the shards
  train_from_cache_sps  samples/s of that training on the full set

"Small set" is the first tenth of the shards (20k samples in the full measure, 200 in the smoke run); the keys keep
the full measure's names. Cache shards hold ``--per-shard`` rows (``cache.shard_rows``), so the two processes of a
build share 200 cache shards in the full measure. The teacher and student are tiny untrained ``test-clip`` models:
the measure is of the data path (reading, decoding, the cache), not of a model. Writes ``runs/bench/scale.json``
(``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from memory import report_peak, run_measured  # noqa: E402

COLORS = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]
SHAPES = ["square", "circle", "triangle", "star"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=200_000, help="image-caption pairs in the synthetic webdataset")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--smoke", action="store_true", help="2,000 samples, 50 per shard, few steps (a quick check)")
    p.add_argument("--steps", type=int, default=60, help="training steps of each memory and throughput measure")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--work-dir", default="runs/bench/scale", help="shards and caches go here (deleted unless --keep)")
    p.add_argument("--out", default="runs/bench/scale.json")
    p.add_argument("--keep", action="store_true", help="keep the shards and caches")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one training measure in a fresh process
    args = p.parse_args(argv)
    if args.smoke:
        args.samples, args.per_shard, args.steps = 2000, 50, 8
    if args.samples < 10 * args.per_shard or args.samples % (10 * args.per_shard):
        p.error(f"--samples {args.samples}: give a multiple of 10 x --per-shard ({10 * args.per_shard})")
    return args


def caption(i: int) -> str:
    return f"a {COLORS[i % 8]} {SHAPES[(i // 8) % 4]} number {i}"


def write_webdataset(directory: Path, samples: int, per_shard: int) -> int:
    """``{00000..NNNNN}.tar`` of 16x16 PNGs (each distinct: its number in the pixels), ``.txt`` and ``.json``."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    shards = samples // per_shard
    for s in range(shards):
        path = directory / f"{s:05d}.tar"
        with tarfile.open(path.with_suffix(".tmp"), "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                image = Image.new("RGB", (16, 16), COLORS[i % 8] if COLORS[i % 8] != "purple" else (128, 0, 128))
                image.putpixel((0, 0), (i & 255, (i >> 8) & 255, (i >> 16) & 255))  # distinct content per sample
                buf = io.BytesIO()
                image.save(buf, "PNG")
                members = {"png": buf.getvalue(), "txt": caption(i).encode(), "json": json.dumps({"label": i % 32})}
                for ext, data in members.items():
                    data = data.encode() if isinstance(data, str) else data
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        os.replace(path.with_suffix(".tmp"), path)
    return shards


def spec(work: Path, shards: int) -> str:
    return f"wds:{work}/wds/{{00000..{shards - 1:05d}}}.tar"


def make_models(work: Path) -> Path:
    """A tiny teacher saved to ``WORK/teacher`` (its tokenizer trained on the caption words)."""
    import torch

    from vldistill.students import build_student
    from vldistill.tokenization import train_wordpiece

    torch.manual_seed(0)
    words = [caption(i) for i in range(64)] + [f"number {i}" for i in range(1000)]
    tok = train_wordpiece(words, vocab_size=300)
    path = work / "teacher"
    build_student("test-clip", tok, projection_dim=32, **{"vision.hidden_size": 48}).save_pretrained(path)
    return path


def recipe(work: Path, data: str, teacher: Path, cache: Path, steps: int, batch_size: int, out: str, shard_rows: int):
    from vldistill.config import load_recipe

    return load_recipe(
        raw={
            "name": "scale",
            "student": {"preset": "test-clip"},
            "teacher": {"name_or_path": str(teacher), "languages": ["en"], "source": "cache", "cache": str(cache)},
            "cache": {"batch_size": 256, "workers": 0, "shard_rows": shard_rows},
            "data": {"train": data, "eval": None, "languages": ["en"], "shuffle_buffer": 1000},
            "stages": [{"steps": steps, "losses": [{"name": "fd", "tower": "image"}, "clip"]}],
            "train": {
                "batch_size": batch_size,
                "warmup_steps": 1,
                "log_every": max(1, steps // 2),
                "checkpoint_every": 0,
                "progress": False,
                "tensorboard": False,
                "output_dir": str(work / out),
            },
        }
    )


def build_rate(work: Path, data: str, teacher: Path, out: Path, samples: int, shard_rows: int, nproc: int) -> float:
    """``vldistill cache`` launched as a command: ``nproc`` 1 is ``python -m vldistill.cli cache`` with one thread
    per core, otherwise ``torchrun --nproc_per_node NPROC`` with the cores shared out (one thread each on 2 cores).
    Samples/s of the command's wall time, process start-up included."""
    cores = os.cpu_count() or 1
    launch = [sys.executable, "-m", "vldistill.cli"]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        launch += ["-m", "vldistill.cli"]
    cmd = [*launch, "cache", "--teacher", str(teacher), "--data", data, "--languages", "en", "--batch-size", "256"]
    cmd += ["--workers", "0", "--shard-rows", str(shard_rows), "--output", str(out)]
    threads = str(max(1, cores // nproc))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"the {nproc}-process cache build failed: {done.stderr[-3000:]}")
    return samples / (time.perf_counter() - t0)


def same_shards(a: Path, b: Path) -> bool:
    """Whether two caches hold byte-identical shards (the manifests list the same files, sizes and SHA-256s)."""
    from vldistill.cache import read_manifest

    def listed(path: Path) -> list[tuple[str, int, str]]:
        return [(s["file"], s["bytes"], s["sha256"]) for s in read_manifest(path)["shards"]]

    return listed(a) == listed(b)


def train_child(args: argparse.Namespace) -> None:
    """In a fresh process: open the cache for a streamed run (timed), train ``--steps`` steps, report VmHWM."""
    job = json.loads(args.child)
    import torch

    from vldistill.cache import open_recipe_cache, read_manifest, recipe_cache_dir
    from vldistill.data.sources import load_stream
    from vldistill.students import build_student, load_student
    from vldistill.train.fit import fit_recipe

    work = Path(job["work"])
    paths = (Path(job["teacher"]), Path(job["cache"]))
    cfg = recipe(work, job["data"], *paths, job["steps"], job["batch_size"], job["out"], job["shard_rows"])
    t0 = time.perf_counter()
    stream = load_stream(cfg.data.train, languages=["en"], shuffle_buffer=cfg.data.shuffle_buffer).dataset
    stream.adopt_counts(read_manifest(recipe_cache_dir(cfg))["source_shards"])
    source = open_recipe_cache(cfg, stream)
    open_s = time.perf_counter() - t0
    torch.manual_seed(0)
    student = build_student("test-clip", load_student(job["teacher"]).tokenizer)
    t0 = time.perf_counter()
    result = fit_recipe(cfg, student=student, teacher_source=source, evaluate_after=False, overwrite=True)
    train_s = time.perf_counter() - t0
    sps = float(result["final"].get("samples_per_second", 0.0))
    report_peak(open_s=open_s, train_s=train_s, samples_per_second=sps, rows=len(stream))


def measure_training(args, work: Path, data: str, teacher: Path, cache: Path, out: str) -> dict[str, Any]:
    job = {"work": str(work), "data": data, "teacher": str(teacher), "cache": str(cache), "out": out}
    job.update(steps=args.steps, batch_size=args.batch_size, shard_rows=args.per_shard)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return run_measured([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)], env=env)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        train_child(args)
        return {}
    work = Path(args.work_dir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    shards = write_webdataset(work / "wds", args.samples, args.per_shard)
    write_s = time.perf_counter() - t0
    small_shards, small = shards // 10, args.samples // 10
    teacher = make_models(work)
    small_data, full_data = spec(work, small_shards), spec(work, shards)

    small_cfg = recipe(work, small_data, teacher, work / "cache-small", 1, 1, "run-small", args.per_shard)
    from vldistill.train.fit import cache_recipe

    cache_recipe(small_cfg)  # the small set's cache, for the memory and opening measures
    t0 = time.perf_counter()
    build_1 = build_rate(work, full_data, teacher, work / "cache-full", args.samples, args.per_shard, 1)
    build_full_s = time.perf_counter() - t0
    build_2 = build_rate(work, full_data, teacher, work / "cache-full-2proc", args.samples, args.per_shard, 2)
    identical = same_shards(work / "cache-full", work / "cache-full-2proc")
    shutil.rmtree(work / "cache-full-2proc", ignore_errors=True)

    run_small = measure_training(args, work, small_data, teacher, work / "cache-small", "run-small")
    run_full = measure_training(args, work, full_data, teacher, work / "cache-full", "run-full")
    result = {
        "samples": args.samples,
        "small_samples": small,
        "shards": shards,
        "per_shard": args.per_shard,
        "build_1proc_sps": round(build_1, 1),
        "build_2proc_sps": round(build_2, 1),
        "build_full_s": round(build_full_s, 1),
        "build_2proc_over_1proc": round(build_2 / build_1, 3),
        "build_identical": identical,
        "train_from_cache_sps": round(run_full["samples_per_second"], 1),
        "rss_20k_mb": round(run_small["peak_rss_mb"], 1),
        "rss_200k_mb": round(run_full["peak_rss_mb"], 1),
        "rss_ratio": round(run_full["peak_rss_mb"] / run_small["peak_rss_mb"], 3),
        "open_20k_s": round(run_small["open_s"], 3),
        "open_200k_s": round(run_full["open_s"], 3),
        "write_s": round(write_s, 1),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "smoke": args.smoke,
        "cpus": os.cpu_count(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print_table(result)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def print_table(r: dict[str, Any]) -> None:
    small, full = f"{r['small_samples']:,}", f"{r['samples']:,}"
    rows = [
        ("cache build, 1 process x 2 threads (samples/s)", f"{r['build_1proc_sps']:.0f}", f"on {full}, start-up in"),
        ("cache build, 2 processes x 1 thread (samples/s)", f"{r['build_2proc_sps']:.0f}", f"on {full}, start-up in"),
        ("2 processes / 1 process (target >= 0.9)", f"{r['build_2proc_over_1proc']:.3f}", ""),
        ("the two caches byte-identical", str(r["build_identical"]), "shard files, sizes, SHA-256"),
        ("training from the cache, streamed (samples/s)", f"{r['train_from_cache_sps']:.0f}", f"on {full}"),
        ("peak RSS, training", f"{r['rss_20k_mb']:.0f} MB / {r['rss_200k_mb']:.0f} MB", f"{small} / {full}"),
        ("RSS ratio (must stay < 1.2)", f"{r['rss_ratio']:.3f}", ""),
        ("opening the cache (s)", f"{r['open_20k_s']:.3f} / {r['open_200k_s']:.3f}", f"{small} / {full}"),
    ]
    width = max(len(a) for a, _, _ in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>20}  {note}")


if __name__ == "__main__":
    main()
