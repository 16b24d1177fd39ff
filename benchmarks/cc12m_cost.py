"""What building the teacher-output cache of CC12M costs, estimated from the cache-build throughput measured here.

Command:  .venv/bin/python benchmarks/cc12m_cost.py        (after benchmarks/throughput.py: reads its JSON)
Runtime:  about half a minute on a 2-core CPU (it counts the FLOPs of one forward of each teacher, ViT-L/14 included)
Expected: a table of FLOPs per pair, and the cache build's time for 12.4M pairs on this machine and on GPUs

How the estimate is made (an estimate, not a measurement: nothing here runs a real teacher over real data):

1. ``benchmarks/throughput.py`` measured B, the cache build's samples/s with the quickstart's reference teacher on
   this machine (hashing, decoding, preprocessing, the forward and writing, end to end).
2. The FLOPs of one teacher forward per pair (image + one caption) are counted with
   ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and attention) for the reference teacher and for
   CLIP ViT-B/32, ViT-B/16 and ViT-L/14 built from their published configs (random weights; 224 px, 77 positions).
3. This machine's build rate in FLOP/s is B x (reference FLOPs per pair). A larger teacher is assumed to build at the
   same FLOP/s: time = pairs x FLOPs per pair / that rate. This holds while the forward dominates; it flatters the
   small reference teacher's data path (64 px PNGs) against CC12M's JPEGs at 224 px, whose decoding and resizing
   cost roughly 3-5 ms per image per core (not measured here) and need data-loading workers on a GPU node.
4. On GPUs: time = pairs x FLOPs per pair / (GPUs x bf16 peak x utilisation), with the utilisation given by
   ``--utilisation`` (default 0.4, the target ``benchmarks/gpu_speed.py`` sets for a student step; a teacher's
   inference at batch 256 is usually at least as efficient). Peaks are the data-sheet dense bf16 figures.

Writes ``runs/bench/cc12m_cost.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from gpu_speed import VIT_B16, VIT_B32, VIT_L14, build_clip  # noqa: E402

CC12M_PAIRS = 12_423_374  # the published URL list; fewer download in practice (about 10-11M)
GPUS = {"A100": 312.0, "H100 SXM": 989.0}
CLIPS = {"ViT-B/32": VIT_B32, "ViT-B/16": VIT_B16, "ViT-L/14": VIT_L14}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--throughput", default="runs/bench/throughput.json", help="benchmarks/throughput.py's output")
    p.add_argument("--pairs", type=int, default=CC12M_PAIRS)
    p.add_argument("--utilisation", type=float, default=0.4, help="assumed fraction of the bf16 peak on a GPU")
    p.add_argument("--gpus", type=int, default=8, help="GPUs of the node the GPU rows assume")
    p.add_argument("--workers", type=int, default=8, help="data-loading workers per GPU (decoding)")
    p.add_argument("--decode-ms", type=float, default=4.0, help="assumed ms to decode and resize one JPEG, one core")
    p.add_argument("--out", default="runs/bench/cc12m_cost.json")
    p.add_argument("--teachers", nargs="+", default=list(CLIPS), choices=list(CLIPS), help="CLIP sizes to cost")
    return p.parse_args(argv)


def forward_flops(model, image_size: int, text_len: int) -> int:
    """FLOPs of one forward of ``model`` over one image and one caption."""
    pixels = torch.zeros(1, 3, image_size, image_size)
    ids = torch.ones(1, text_len, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_image(pixels)
        model.encode_text(input_ids=ids, attention_mask=torch.ones_like(ids))
    return counter.get_total_flops()


def reference_flops(name: str) -> int:
    from vldistill.models import load_teacher

    teacher = load_teacher(name, languages=["en"])
    size = teacher.model.config.vision_config.image_size
    text_len = 16  # the bundled captions ("a red circle") are under 16 WordPiece tokens
    return forward_flops(teacher, size, text_len)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    measured = json.loads(Path(args.throughput).read_text())
    b_rate, reference = measured["B"], measured["setup"]["teacher"]
    torch.manual_seed(0)
    per_pair = {f"reference ({Path(reference).parent.name})": reference_flops(reference)}
    for name in args.teachers:
        spec = CLIPS[name]
        per_pair[name] = forward_flops(build_clip(spec), spec["vision"]["image_size"], 77)
    rate = b_rate * next(iter(per_pair.values()))  # FLOP/s of this machine's cache build
    rows = []
    for name, flops in per_pair.items():
        total = args.pairs * flops
        row = {"teacher": name, "flop_per_pair": flops, "gflop_per_pair": round(flops / 1e9, 3)}
        row["this_machine_days"] = total / rate / 86400
        for gpu, peak in GPUS.items():
            row[f"{args.gpus}x {gpu} minutes"] = total / (args.gpus * peak * 1e12 * args.utilisation) / 60
        rows.append(row)
    result = {
        "pairs": args.pairs,
        "measured_build_samples_per_second": b_rate,
        "measured_with": reference,
        "this_machine_build_gflops": round(rate / 1e9, 2),
        "utilisation_assumed": args.utilisation,
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"cache build measured here: {b_rate:.0f} pairs/s = {rate / 1e9:.1f} GFLOP/s ({reference})")
    head = f"{'teacher':<28} {'GFLOP/pair':>10} {'this machine, days':>19}"
    head += "".join(f" {f'{args.gpus}x {g}, min':>16}" for g in GPUS)
    print(head)
    for row in rows:
        line = f"{row['teacher']:<28} {row['gflop_per_pair']:>10.2f} {row['this_machine_days']:>19.1f}"
        line += "".join(f" {row[f'{args.gpus}x {g} minutes']:>16.1f}" for g in GPUS)
        print(line)
    print(f"({args.pairs:,} pairs; GPU columns assume {args.utilisation:.0%} of the dense bf16 peak and no data stall)")
    decode = args.pairs * args.decode_ms / 1000 / 3600
    print(
        f"decoding and resizing {args.pairs:,} JPEGs at {args.decode_ms} ms each (assumed, not measured here): "
        f"{decode:.1f} core-hours, {decode * 60 / (args.gpus * args.workers):.1f} min on {args.gpus} x "
        f"{args.workers} loading workers"
    )
    result["decode_core_hours"] = round(decode, 2)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
