"""What a deployed student costs and scores: teacher and student x PyTorch fp32 / ONNX fp32 / ONNX int8.

For each model and runtime: image and text latency at batch 1 and batch 64 (milliseconds per call, the median of
``--repeats`` warm runs, preprocessing excluded), the towers' size on disk, and zero-shot top-1 in English and
Chinese on the bundled test split (``top1_zh`` null for a teacher that reads English only). Writes
``runs/bench/deploy.json``::

    {"teacher": {"torch_fp32": {"image_ms_b1", "image_ms_b64", "text_ms_b1", "text_ms_b64", "size_mb", "top1_en",
                 "top1_zh"}, "onnx_fp32": {...}, "onnx_int8": {...}},
     "student": {...}}

and prints a table. Usage::

    python benchmarks/deploy.py --teacher runs/teachers/reference-KEY/model --student runs/quickstart/student
    python benchmarks/deploy.py --smoke      # tiny random models, 32 test images: seconds (tests/test_export.py)

Without ``--teacher`` the newest ``runs/teachers/reference-*/model`` is used; a model that is not there is reported
as not measured (its entries null), never trained here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vldistill.data.sources import load_data
from vldistill.evaluation import evaluate
from vldistill.export import OnnxDualEncoder, export_onnx
from vldistill.models import DualEncoder, load_teacher

RUNTIMES = ("torch_fp32", "onnx_fp32", "onnx_int8")
KEYS = ("image_ms_b1", "image_ms_b64", "text_ms_b1", "text_ms_b64", "size_mb", "top1_en", "top1_zh")
PROMPT = "a photo of a red circle."


def _median_ms(fn, repeats: int) -> float:
    for _ in range(2):  # warm-up
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 3)


def _batch(items: list, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


@torch.no_grad()
def measure(model: Any, runtime: str, images: list, eval_set: Any, langs: list[str], repeats: int) -> dict[str, Any]:
    """One model in one runtime: latencies, size and zero-shot top-1."""
    row: dict[str, Any] = {}
    for b in (1, 64):
        imgs, texts = _batch(images, b), [PROMPT] * b
        if runtime == "torch_fp32":
            px, enc = model.preprocess_images(imgs), model.tokenize(texts)
            row[f"image_ms_b{b}"] = _median_ms(lambda px=px: model.encode_image(px), repeats)
            row[f"text_ms_b{b}"] = _median_ms(lambda enc=enc: model.encode_text(**enc), repeats)
        else:
            px, enc = model.preprocess_images(imgs), model.tokenize(texts)
            row[f"image_ms_b{b}"] = _median_ms(lambda px=px: model.encode_image(px), repeats)
            row[f"text_ms_b{b}"] = _median_ms(lambda enc=enc: model.encode_text(enc), repeats)
    if runtime == "torch_fp32":
        row["size_mb"] = round(sum(p.numel() * p.element_size() for p in model.model.parameters()) / 1e6, 3)
    else:
        row["size_mb"] = round(model.size_mb(), 3)
    zs = evaluate(model, eval_set, [lang for lang in ("en", "zh") if lang in langs])["metrics"]["zeroshot"]
    row["top1_en"] = zs["en"]["top1"] if "en" in zs else None
    row["top1_zh"] = zs["zh"]["top1"] if "zh" in zs else None
    return {k: row[k] for k in KEYS}


def bench_model(
    path: Path | None, langs: list[str], work: Path, images, eval_set, repeats: int, threads: int
) -> dict[str, Any]:
    if path is None or not (Path(path) / "config.json").is_file():
        return {r: dict.fromkeys(KEYS) for r in RUNTIMES}
    model = load_teacher(path) if langs == ["en"] else DualEncoder.from_pretrained(path)
    model.eval()
    out = {"torch_fp32": measure(model, "torch_fp32", images, eval_set, langs, repeats)}
    for runtime, quantize in (("onnx_fp32", None), ("onnx_int8", "int8")):
        exported = export_onnx(model, work / f"{Path(path).name}-{runtime}", quantize=quantize)
        onnx = OnnxDualEncoder(exported, threads=threads)  # as many threads as torch: a like-for-like comparison
        out[runtime] = measure(onnx, runtime, images, eval_set, langs, repeats)
    return out


def format_table(result: dict[str, Any]) -> str:
    head = ("model", "runtime", "img b1 ms", "img b64 ms", "txt b1 ms", "txt b64 ms", "MB", "EN top-1", "ZH top-1")
    rows = [head]
    for name, runtimes in result.items():
        for runtime, r in runtimes.items():

            def cell(key, r=r):
                v = r[key]
                if v is None:
                    return "-"
                return f"{100 * v:.1f}" if key.startswith("top1") else f"{v:.2f}"

            rows.append((name, runtime, *(cell(k) for k in KEYS)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _smoke_models(work: Path) -> tuple[Path, Path]:
    from vldistill.students import build_student
    from vldistill.tokenization import train_wordpiece

    data = load_data("bundled:easyvqa", "train", ["en", "zh"], limit=128)
    texts = [s.captions[lang] for s in data.dataset.samples for lang in ("en", "zh")]
    torch.manual_seed(0)
    teacher = build_student("test-clip", train_wordpiece(texts, vocab_size=300), projection_dim=24)
    student = build_student("test-clip", train_wordpiece(texts, vocab_size=300))
    teacher.save_pretrained(work / "teacher")
    student.save_pretrained(work / "student")
    return work / "teacher", work / "student"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", help="teacher directory (default: the newest runs/teachers/reference-*/model)")
    p.add_argument("--student", default="runs/quickstart/student", help="student directory")
    p.add_argument("--output", default="runs/bench/deploy.json")
    p.add_argument("--limit", type=int, default=None, help="test images (default: the whole bundled test split)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per latency (median)")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default 2)")
    p.add_argument("--smoke", action="store_true", help="tiny random models, 32 images, 3 repeats: seconds")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.smoke:
            teacher, student = _smoke_models(work)
            limit, repeats = 32, 3
        else:
            found = sorted(Path("runs/teachers").glob("reference-*/model"), key=lambda x: x.stat().st_mtime)
            teacher = Path(args.teacher) if args.teacher else (found[-1] if found else None)
            student, limit, repeats = Path(args.student), args.limit, args.repeats
        test = load_data("bundled:easyvqa", "test", ["en", "zh"], limit=limit)
        eval_set = test.eval_set(["en", "zh"])
        images = eval_set.images[:64]
        result = {
            "teacher": bench_model(teacher, ["en"], work, images, eval_set, repeats, args.threads),
            "student": bench_model(student, ["en", "zh"], work, images, eval_set, repeats, args.threads),
        }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"teacher: {teacher or 'not found'}; student: {student}; {len(eval_set.images)} test images")
    print(format_table(result))
    for name, runtimes in result.items():
        if runtimes["torch_fp32"]["image_ms_b1"] is None:
            print(f"{name}: not measured (no model at the given path)")
    s = result["student"]
    if s["onnx_int8"]["top1_en"] is not None:
        drop = 100 * (s["torch_fp32"]["top1_en"] - s["onnx_int8"]["top1_en"])
        speed = s["torch_fp32"]["image_ms_b1"] / max(s["onnx_int8"]["image_ms_b1"], 1e-9)
        print(f"student int8 vs PyTorch fp32: EN top-1 {-drop:+.1f} points, image batch 1 {speed:.2f}x faster")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
