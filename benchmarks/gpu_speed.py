"""Speed at CLIP scale: pairs per second of distillation, ViT-L/14 -> ViT-B/16, in mixed precision on a GPU.

Command:  python benchmarks/gpu_speed.py --size large             (a GPU: ViT-L/14 teacher -> ViT-B/16 student)
          python benchmarks/gpu_speed.py --size large --variants  (also which of compile / fused AdamW / TF32 help)
          python benchmarks/gpu_speed.py --size tiny              (a CPU: the test presets; what the test runs)
Runtime:  tiny: about 10 s on a CPU. On one H200 (2026-11-30, torch 2.11.0+cu130; README "Speed on a GPU"):
          base 28 s; large 37 s to its table, then 137 s for --variants (two compilations); large --compile 69 s.
Measured: the results and the output of that H200 run are in benchmarks/results/h200-2026-11-30/. Large pair, the
          defaults (eager, batch 256): F 1,778, S 1,733, O 845, C 1,619 pairs/s; C/O 1.92 (target 3; the FLOP
          bound is 2.42), C/S 0.934 (target 0.95), student step 21.7% of the bf16 peak (target 40%). With
          --compile --teacher-dtype bfloat16 at batch 512: C/O 2.13, C/S 0.974, 36.0%. A CPU run is a smoke test.

The teacher and the student are CLIP models built from their published configs with random weights (nothing is
downloaded; speed does not depend on the weights): ``large`` is OpenAI's ``clip-vit-large-patch14`` (ViT-L/14 at
224 px with its text tower, 427.6M parameters) teaching a ViT-B/16 CLIP (149.6M); ``base`` a ViT-B/16 teaching a
ViT-B/32 (151.3M); ``tiny`` the test suite's ``test-clip`` student and its wider test teacher. Images (normal noise)
and captions (random token ids, ``--text-len`` positions, each row's caption ending in the end token at a random
length, padding masked) are made once, already on the device.

Measures, each in pairs per second after ``--warmup`` untimed repetitions, over ``--steps`` timed ones:

  F  teacher forward: the frozen teacher's pooled image and text embeddings (no autograd)
  S  student step alone: vldistill's step (``DistillModule``) with the contrastive ``clip`` loss only, backward,
     gradient clipping, AdamW step
  O  distillation with the live teacher: the teacher forward, then the student step with CLIP-KD's losses (the
     ``clipkd`` recipe's: clip + crd + icl + fd image + fd text; fd's adapters are trained with the student)
  C  the same distillation step with the teacher's outputs handed over as the cache does: float32 rows in host
     memory, copied to the device each step (``CachedTeachers`` gathers them from memory-mapped shards, then copies)

Each step does what the training loop does (``vldistill.train.loop``): every logged loss term is read back as a
float, the loss and the teacher outputs are checked for NaN, gradients are clipped at norm 1. Not measured: data
loading and preprocessing (the synthetic batches are on the device already).

Precision: bf16 autocast on CUDA (fp16 on a GPU without bf16), float32 on a CPU; the weights stay float32 (as the
trainer's ``train.mixed_precision: bf16``), the teacher's too unless ``--teacher-dtype bfloat16``. Peak memory:
``torch.cuda.max_memory_allocated`` per measure (null on a CPU).

FLOPs: counted with ``torch.utils.flop_counter.FlopCounterMode`` on one eager repetition of each measure (matrix
products, convolutions and attention, forward and backward; the optimiser's and the losses' elementwise work is not
counted, so the figures slightly understate the work). Achieved TFLOP/s = FLOPs per repetition x repetitions per
second; the student step's is compared with the device's dense bf16 peak from :data:`PEAK_BF16_TFLOPS` (null for
a device not in the table). ``C_over_O_flop_bound`` is FLOPs(O) / FLOPs(C): the C/O that equal utilisation of both
would give.

Options: ``--compile`` (the towers of the student and teacher, as ``train.compile: true``), ``--fused-adamw`` /
``--no-fused-adamw`` and ``--tf32`` / ``--no-tf32``; the defaults are what the training loop does (fused AdamW and
TF32 on CUDA, no compile). ``--variants`` also measures S and C with each option alone and with all of them, and
marks those more than 2% faster than none as having helped. Writes ``runs/bench/gpu_speed.json`` (``--output``),
one entry per ``--size`` (a run replaces its size's entry and keeps the others), and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPConfig, CLIPModel

from vldistill import __version__
from vldistill.batching import LiveTeachers
from vldistill.config import load_recipe
from vldistill.files import write_text
from vldistill.losses import build_stage_loss
from vldistill.models import DualEncoder, Teacher, as_teacher, encode_batch
from vldistill.outputs import Dims, Embeddings
from vldistill.students.presets import CLIP_MEAN, CLIP_STD, image_processor_for
from vldistill.train.loop import DistillModule, compile_towers, make_optimizer

CLIP_VOCAB = 49408  # OpenAI CLIP's BPE vocabulary (49406: start of text, 49407: end of text)


def _tower(hidden: int, layers: int, heads: int, intermediate: int | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate or 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        **extra,
    }


# The published configs (OpenAI CLIP: quick_gelu, 77 text positions, BPE vocabulary of 49408).
VIT_L14 = {
    "vision": _tower(1024, 24, 16, image_size=224, patch_size=14),
    "text": _tower(768, 12, 12),
    "projection_dim": 768,
    "vocab_size": CLIP_VOCAB,
}
VIT_B16 = {
    "vision": _tower(768, 12, 12, image_size=224, patch_size=16),
    "text": _tower(512, 12, 8),
    "projection_dim": 512,
    "vocab_size": CLIP_VOCAB,
}
VIT_B32 = {**VIT_B16, "vision": _tower(768, 12, 12, image_size=224, patch_size=32)}
# The test presets (``test-clip``, and the wider teacher of tests/test_trainer.py): tiny enough for a CPU.
TEST_CLIP = {
    "vision": _tower(32, 1, 2, image_size=32, patch_size=16, hidden_act="gelu"),
    "text": _tower(32, 1, 2, hidden_act="gelu"),
    "projection_dim": 16,
    "vocab_size": 300,
}
TEST_TEACHER = {
    "vision": _tower(48, 1, 2, intermediate=96, image_size=32, patch_size=16, hidden_act="gelu"),
    "text": _tower(48, 1, 2, intermediate=96, hidden_act="gelu"),
    "projection_dim": 24,
    "vocab_size": 300,
}
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"teacher": ("test-clip teacher (48 wide)", TEST_TEACHER), "student": ("test-clip", TEST_CLIP)},
    "base": {"teacher": ("ViT-B/16", VIT_B16), "student": ("ViT-B/32", VIT_B32)},
    "large": {"teacher": ("ViT-L/14 (clip-vit-large-patch14)", VIT_L14), "student": ("ViT-B/16", VIT_B16)},
}
DEFAULTS = {  # batch size, text positions, timed steps, warm-up steps
    "tiny": {"batch_size": 16, "text_len": 16, "steps": 3, "warmup": 1},
    "base": {"batch_size": 256, "text_len": 77, "steps": 20, "warmup": 5},
    "large": {"batch_size": 256, "text_len": 77, "steps": 20, "warmup": 5},
}

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; first match of the device
# name wins, so the more specific names come first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    (r"GB200", 2500.0),
    (r"B200", 2250.0),
    (r"H200 NVL", 835.0),
    (r"H200", 989.0),  # SXM
    (r"H100 NVL", 835.0),
    (r"H100 PCIe", 756.0),
    (r"H100|H800", 989.0),  # SXM / HBM3
    (r"GH200", 989.0),
    (r"A100|A800", 312.0),
    (r"L40S", 362.0),
    (r"L40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"A6000 Ada|RTX 6000 Ada", 182.0),
    (r"RTX A6000", 155.0),
    (r"\bA10\b", 125.0),
    (r"RTX 4090", 165.0),
    (r"RTX 3090", 71.0),
    (r"MI300X", 1307.0),
    (r"MI250X", 383.0),
]
TARGETS = {"C_over_O": 3.0, "C_over_S": 0.95, "student_step_peak_fraction": 0.40}
HELPED = 1.02  # a variant "helped" when it is this much faster than none of the options


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a device named ``device_name`` (``torch.cuda.get_device_name()``); None if unknown."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="large", help="teacher -> student pair (default: large)")
    p.add_argument("--batch-size", type=int, help="pairs per step (default: 256; tiny: 16)")
    p.add_argument("--text-len", type=int, help="caption positions, at most 77 (default: 77; tiny: 16)")
    p.add_argument("--steps", type=int, help="timed repetitions of each measure (default: 20; tiny: 3)")
    p.add_argument("--warmup", type=int, help="untimed repetitions before them (default: 5; tiny: 1)")
    p.add_argument("--compile", action="store_true", help="torch.compile the towers (as train.compile: true)")
    p.add_argument(
        "--fused-adamw",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the fused AdamW kernel (default: as the training loop, on with CUDA)",
    )
    p.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="TF32 float32 matrix products on CUDA (default: as the training loop, on; no effect on a CPU)",
    )
    p.add_argument("--variants", action="store_true", help="also measure S and C with each option alone and all")
    p.add_argument("--teacher-dtype", choices=["float32", "bfloat16"], default="float32", help="teacher weights")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="runs/bench/gpu_speed.json", help="the JSON (one entry per size)")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key, least in (("batch_size", 2), ("text_len", 2), ("steps", 1), ("warmup", 1)):
        if getattr(args, key) < least:
            p.error(f"--{key.replace('_', '-')} = {getattr(args, key)}: must be at least {least}")
    if args.text_len > 77:
        p.error(f"--text-len = {args.text_len}: CLIP's text towers have 77 positions")
    return args


# ---------------------------------------------------------------------------------------------------- models
def clip_config(spec: dict[str, Any]) -> CLIPConfig:
    """A ``CLIPConfig`` of a size spec; the end-of-text token is the vocabulary's last id (pooling reads it)."""
    vocab = spec["vocab_size"]
    special = {"bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "pad_token_id": 0}
    text = {**spec["text"], "vocab_size": vocab, "max_position_embeddings": 77, **special}
    return CLIPConfig(vision_config=dict(spec["vision"]), text_config=text, projection_dim=spec["projection_dim"])


def build_clip(spec: dict[str, Any], device: str | torch.device = "cpu") -> DualEncoder:
    """A randomly initialised CLIP of ``spec`` on ``device`` (``"meta"``: shapes only, nothing allocated)."""
    with torch.device(device):
        model = CLIPModel(clip_config(spec))
    processor = image_processor_for(spec["vision"]["image_size"], CLIP_MEAN, CLIP_STD)
    return DualEncoder(model, None, processor)  # no tokenizer: the captions are token ids already


def count_parameters(spec: dict[str, Any]) -> int:
    """Parameters of a CLIP of ``spec``, built on the meta device (no memory is allocated)."""
    return build_clip(spec, "meta").num_parameters()


def synthetic_inputs(model: DualEncoder, batch: int, text_len: int, device, generator) -> dict[str, Any]:
    """Noise images at the model's size and random captions: each row ends in the end token at a random length
    (from a quarter of ``text_len`` up to it, one row at full length), then padding with attention mask 0."""
    cfg = model.model.config
    size = cfg.vision_config.image_size
    vocab, eos = cfg.text_config.vocab_size, cfg.text_config.eos_token_id
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    ids = torch.randint(1, vocab - 2, (batch, text_len), generator=generator)
    lengths = torch.randint(max(2, text_len // 4), text_len + 1, (batch,), generator=generator)
    lengths[0] = text_len
    positions = torch.arange(text_len)[None, :]
    mask = (positions < lengths[:, None]).long()
    ids = torch.where(positions == lengths[:, None] - 1, torch.full_like(ids, eos), ids * mask)
    text = {"en": {"input_ids": ids.to(device), "attention_mask": mask.to(device)}}
    return {"pixel_values": pixels.to(device), "text": text}


class HostCache:
    """Teacher outputs held as ``CachedTeachers`` hands them over: float32 rows in host memory, copied to the
    step's device on every call."""

    def __init__(self, outputs: Embeddings, dims):
        self.rows = {"image": outputs.image.float().cpu(), "en": outputs.text["en"].float().cpu()}
        self.scale = None if outputs.logit_scale is None else float(outputs.logit_scale)
        self.dims = (dims,)

    def __call__(self, batch: dict[str, Any], needs: frozenset[str]) -> list[Embeddings]:
        device = batch["index"].device
        scale = None if self.scale is None else torch.tensor(self.scale, device=device)
        out = Embeddings(logit_scale=scale, image=self.rows["image"].to(device))
        out.text["en"] = self.rows["en"].to(device)
        return [out]


# ---------------------------------------------------------------------------------------------------- losses
STUDENT_LOSSES = [{"name": "clip", "langs": ["en"]}]


def distill_losses() -> list[dict[str, Any]]:
    """The ``clipkd`` recipe's losses (CLIP-KD: clip, crd, icl, fd image, fd text), on the English captions."""
    losses = []
    for term in load_recipe("clipkd").stages[0].losses:
        options = {**term.options, "langs": ["en"]} if "langs" in term.options else term.options
        losses.append({"name": term.name, "weight": term.weight, **options})
    return losses


def stage_loss(losses: list[dict[str, Any]], dims: Dims):
    raw = {
        "name": "gpu-speed",
        "student": {"preset": "test-clip"},  # not built from the recipe: the benchmark builds its own
        "data": {"train": "bundled:easyvqa", "eval": None, "languages": ["en"]},
        "stages": [{"steps": 1, "losses": losses}],
    }
    if any(t["name"] != "clip" for t in losses):
        raw["teacher"] = {"languages": ["en"]}
    return build_stage_loss(load_recipe(raw=raw).stages[0], dims, 0)


# ---------------------------------------------------------------------------------------------------- steps
class Bench:
    """The models, the batch and the settings of one run; makes the callables that the measures repeat."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device = args, device
        pair = SIZES[args.size]
        torch.manual_seed(args.seed)
        teacher = build_clip(pair["teacher"][1], device)
        if args.teacher_dtype == "bfloat16":
            teacher.model.to(torch.bfloat16)
        self.teacher: Teacher = as_teacher(teacher, ["en"])
        self.student = build_clip(pair["student"][1], device)
        self.dims = Dims(student=self.student.dims, teachers=(self.teacher.dims,))
        gen = torch.Generator().manual_seed(args.seed)
        b = args.batch_size
        self.batch = {
            "index": torch.arange(b, device=device),
            "groups": {"en": torch.arange(b, device=device)},  # every caption distinct
            "targets": {},
            "student": synthetic_inputs(self.student, b, args.text_len, device, gen),
            "teachers": [synthetic_inputs(self.teacher, b, args.text_len, device, gen)],
        }
        if device.type == "cuda":
            self.amp = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        else:
            self.amp = None
        self.cache: HostCache | None = None

    def autocast(self):
        if self.amp is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def teacher_forward(self) -> Callable[[], Any]:
        needs = frozenset({"teacher"})
        inputs = self.batch["teachers"][0]

        def forward():
            with self.autocast():
                return encode_batch(self.teacher, inputs, needs)

        return forward

    def fill_cache(self) -> None:
        self.cache = HostCache(self.teacher_forward()(), self.teacher.dims)

    def student_step(self, kind: str, fused: bool | None) -> Callable[[], dict[str, float]]:
        """One training step of the loop: ``S`` (clip alone), ``O`` (live teacher) or ``C`` (cached outputs)."""
        if kind == "S":
            module = DistillModule(self.student, stage_loss(STUDENT_LOSSES, self.dims), None)
        else:
            source = self.cache if kind == "C" else LiveTeachers([self.teacher])
            module = DistillModule(self.student, stage_loss(distill_losses(), self.dims), source, ["teacher"])
        module.to(self.device).train()
        optimizer = _optimizer(module, fused)
        params = [p for p in module.parameters() if p.requires_grad]
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)

        def step() -> dict[str, float]:
            with self.autocast():
                total, parts = module(self.batch)
            scaler.scale(total).backward()
            logged = {k: float(v) for k, v in parts.items()}  # the loop reads every term back to log it
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            if self.amp != torch.float16 and not math.isfinite(float(norm)):
                raise FloatingPointError(f"{kind}: the gradient norm is {float(norm)}")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            return logged

        return step

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _optimizer(module: torch.nn.Module, fused: bool | None) -> torch.optim.Optimizer:
    """The loop's optimiser (``make_optimizer``: fused on CUDA), or the same groups with ``fused`` as asked."""
    optimizer = make_optimizer(module, 1e-5, 0.05)
    if fused is None or bool(optimizer.defaults.get("fused")) == fused:
        return optimizer
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    return torch.optim.AdamW(groups, lr=1e-5, fused=fused or None)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (``FlopCounterMode``: matrix products, convolutions, attention; fwd and bwd)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def measure(bench: Bench, fn: Callable[[], Any], steps: int, warmup: int) -> dict[str, Any]:
    """Pairs per second of ``fn`` over ``steps`` calls after ``warmup`` calls, and the peak device memory."""
    cuda = bench.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(bench.device)
    for _ in range(warmup):
        fn()
    bench.sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    bench.sync()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(bench.device) / 2**30 if cuda else None
    return {
        "pairs_per_second": steps * bench.args.batch_size / seconds,
        "seconds": seconds,
        "peak_memory_gib": None if peak is None else round(peak, 3),
    }


# ---------------------------------------------------------------------------------------------------------- run
def set_tf32(device: torch.device, on: bool) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def uncompile(towers: list[torch.nn.Module]) -> None:
    for tower in towers:
        tower._compiled_call_impl = None
    torch._dynamo.reset()


def run_measures(bench: Bench, fused: bool | None, kinds: str = "FSOC") -> dict[str, dict[str, Any]]:
    args = bench.args
    makers = {
        "F": bench.teacher_forward,
        "S": lambda: bench.student_step("S", fused),
        "O": lambda: bench.student_step("O", fused),
        "C": lambda: bench.student_step("C", fused),
    }
    out = {}
    for kind in kinds:
        out[kind] = measure(bench, makers[kind](), args.steps, args.warmup)
        print(f"  {kind}: {out[kind]['pairs_per_second']:10.1f} pairs/s", flush=True)
    return out


def variants(bench: Bench, cuda: bool) -> list[dict[str, Any]]:
    """S and C with none of the options, each alone, and all of them (TF32 only on CUDA)."""
    rows = []
    settings = [("none", False, False, False), ("fused AdamW", True, False, False), ("TF32", False, True, False)]
    settings += [("compile", False, False, True), ("all", True, True, True)]
    if not cuda:  # TF32 is a CUDA setting: on a CPU that row would measure nothing but noise
        settings = [s for s in settings if s[0] != "TF32"]
    for name, fused, tf32, compiled in settings:
        print(f"variant {name}:", flush=True)
        set_tf32(bench.device, tf32)
        towers = [t for m in (bench.student, bench.teacher) for t in compile_towers(m)] if compiled else []
        try:
            rates = run_measures(bench, fused, "SC")
        finally:
            uncompile(towers)
        rows.append(
            {
                "name": name,
                "fused_adamw": fused,
                "tf32": tf32 if cuda else None,
                "compile": compiled,
                "S": round(rates["S"]["pairs_per_second"], 2),
                "C": round(rates["C"]["pairs_per_second"], 2),
            }
        )
    for row in rows:
        row["S_speedup"] = round(row["S"] / rows[0]["S"], 3)
        row["C_speedup"] = round(row["C"] / rows[0]["C"], 3)
        row["helped"] = None if row is rows[0] else max(row["S_speedup"], row["C_speedup"]) >= HELPED
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    fused = args.fused_adamw if args.fused_adamw is not None else cuda  # the loop: fused when on CUDA
    tf32 = args.tf32 if args.tf32 is not None else True
    set_tf32(device, tf32)
    device_name = torch.cuda.get_device_name(device) if cuda else f"{platform.machine()} CPU"
    pair = SIZES[args.size]
    bench = Bench(args, device)
    amp = {None: "float32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[bench.amp]
    print(
        f"--size {args.size}: teacher {pair['teacher'][0]} ({bench.teacher.num_parameters():,} params) -> student "
        f"{pair['student'][0]} ({bench.student.num_parameters():,}); batch {args.batch_size}, {args.text_len} text "
        f"positions; {device_name}, {amp}",
        flush=True,
    )
    bench.fill_cache()

    # FLOPs of one eager repetition of each measure, before anything is compiled (compiled code is not counted)
    flops = {"F": count_flops(bench.teacher_forward())}
    for kind in "SOC":
        flops[kind] = count_flops(bench.student_step(kind, fused))
    towers = [t for m in (bench.student, bench.teacher) for t in compile_towers(m)] if args.compile else []
    try:
        measures = run_measures(bench, fused)
    finally:
        uncompile(towers)
    rates = {k: m["pairs_per_second"] for k, m in measures.items()}
    reps = {k: rates[k] / args.batch_size for k in rates}  # repetitions per second
    achieved = {k: flops[k] * reps[k] / 1e12 for k in rates}
    peak = peak_tflops(device_name) if cuda else None
    fraction = achieved["S"] / peak if peak else None
    r: dict[str, Any] = {
        "size": args.size,
        "device": device_name,
        "precision": amp,
        "rates": {k: round(v, 2) for k, v in rates.items()},
        "ratios": {"C_over_O": round(rates["C"] / rates["O"], 4), "C_over_S": round(rates["C"] / rates["S"], 4)},
        "peak_memory_gib": {k: m["peak_memory_gib"] for k, m in measures.items()} if cuda else None,
        "flops_per_step": flops,
        "flops_per_pair": {k: round(v / args.batch_size) for k, v in flops.items()},
        "achieved_tflops": {k: round(v, 4) for k, v in achieved.items()},
        "device_peak_tflops": peak,
        "student_step_peak_fraction": None if fraction is None else round(fraction, 4),
        "C_over_O_flop_bound": round(flops["O"] / flops["C"], 4),
        "options": {"compile": args.compile, "fused_adamw": fused, "tf32": tf32 if cuda else None},
        "teacher": {"name": pair["teacher"][0], "params": bench.teacher.num_parameters(), "dtype": args.teacher_dtype},
        "student": {"name": pair["student"][0], "params": bench.student.num_parameters()},
        "setup": {
            "batch_size": args.batch_size,
            "text_len": args.text_len,
            "steps": args.steps,
            "warmup": args.warmup,
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "vldistill": __version__,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    }
    if cuda:
        values = {"C_over_O": r["ratios"]["C_over_O"], "C_over_S": r["ratios"]["C_over_S"]}
        values["student_step_peak_fraction"] = fraction
        r["targets"] = {
            k: {"value": v, "target": TARGETS[k], "met": None if v is None else v >= TARGETS[k]}
            for k, v in values.items()
        }
        r["targets"]["C_over_O"]["applies_to"] = "--size large"
    else:
        r["targets"] = None  # the targets are for a GPU; a CPU run is a smoke test
    print_table(r)
    save(Path(args.output), r)  # saved before the variants: their compilations are the slow part, and may not finish
    print(f"wrote {args.output} (entry {args.size!r})")
    if args.variants:
        r["variants"] = variants(bench, cuda)
        print_variants(r["variants"])
        save(Path(args.output), r)
        print(f"wrote {args.output} (entry {args.size!r}, with the variants)")
    return r


def print_table(r: dict[str, Any]) -> None:
    names = {
        "F": "F teacher forward (no grad)",
        "S": "S student step alone",
        "O": "O distillation, live teacher",
        "C": "C distillation, cached outputs",
    }
    print(f"\n{'measure':32} {'pairs/s':>10} {'TFLOP/s':>9} {'GFLOP/pair':>11} {'peak GiB':>9}")
    for k, name in names.items():
        mem = r["peak_memory_gib"][k] if r["peak_memory_gib"] else None
        print(
            f"{name:32} {r['rates'][k]:10.1f} {r['achieved_tflops'][k]:9.3g} {r['flops_per_pair'][k] / 1e9:11.4g} "
            f"{'-' if mem is None else f'{mem:.2f}':>9}"
        )
    peak = r["device_peak_tflops"]
    if peak:
        step = f"{100 * r['student_step_peak_fraction']:.1f}% of {peak:g} TFLOP/s"
    else:
        step = "not compared (no peak for a CPU)" if r["precision"] == "float32" else "the device's peak is unknown"
    print(
        f"C/O {r['ratios']['C_over_O']:.3f} (target >= 3 for large; FLOP bound {r['C_over_O_flop_bound']:.2f})   "
        f"C/S {r['ratios']['C_over_S']:.3f} (target >= 0.95)   student step: {step} (target >= 40%)"
    )


def print_variants(rows: list[dict[str, Any]]) -> None:
    if rows:
        print(f"\n{'variant':14} {'S pairs/s':>10} {'x':>6} {'C pairs/s':>10} {'x':>6}  helped")
        for v in rows:
            helped = "-" if v["helped"] is None else ("yes" if v["helped"] else "no")
            print(f"{v['name']:14} {v['S']:10.1f} {v['S_speedup']:6.3f} {v['C']:10.1f} {v['C_speedup']:6.3f}  {helped}")


def save(path: Path, result: dict[str, Any]) -> None:
    """Replace this size's entry of ``path`` (atomically), keeping the other sizes' entries."""
    entries: dict[str, Any] = {}
    if path.is_file():
        try:
            entries = json.loads(path.read_text())
        except ValueError:
            entries = {}
        if not isinstance(entries, dict) or not all(k in SIZES for k in entries):
            print(f"{path}: not a gpu_speed.json (one entry per size); replacing it", file=sys.stderr)
            entries = {}
    entries[result["size"]] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(entries, indent=2) + "\n")


if __name__ == "__main__":
    main()
