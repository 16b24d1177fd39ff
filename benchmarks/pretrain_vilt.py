"""Pretrain the ``vilt-small`` student on the bundled captions, as ViLT is pretrained before CLIP-TD fine-tunes it.

The papers distil CLIP into a *pretrained* ViLT; ``benchmarks/task_distill.py`` by default fine-tunes ``vilt-small``
from random weights, since no ViLT checkpoint can be downloaded here. This script makes the missing checkpoint the way
ViLT makes its own (Kim et al., 2021): image-text matching (ITM: is this caption the image's? half the pairs get the
caption of an image of another colour-shape class) and masked language modelling on the matched pairs (MLM: 15% of
the caption's tokens, at least one, replaced by ``[MASK]``, predicted from the text and the image; the mismatched
captions are masked alike but not scored, so a ``[MASK]`` does not tell ITM the pair is matched), on the training
images of the bundled data and their English captions only (the images and captions the reference teacher is trained
on; no task question, answer, hypothesis or label is seen). The tokenizer is trained on those captions and on the
three tasks' training texts, so one checkpoint serves every task.

It writes a plain ViLT checkpoint (``ViltModel`` with its pooler, the tokenizer and the image processor; no task
head), which ``task_distill.py --student DIR`` fine-tunes with a new head exactly as it would ``dandelin/vilt-b32-mlm``,
and ``pretrain.json`` (the losses and ITM accuracy on held-out test-split pairs, before and after).

Usage::

    .venv/bin/python benchmarks/pretrain_vilt.py --output runs/pretrained/vilt-small       # 3,000 steps of 64
    .venv/bin/python benchmarks/pretrain_vilt.py --smoke --output /tmp/vilt                  # seconds
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.models.vilt.modeling_vilt import ViltMLMHead

from vldistill.config import load_recipe
from vldistill.data.easyvqa import CAPTION_PHRASINGS, COLORS, SHAPES, caption
from vldistill.data.pairs import decode_image
from vldistill.data.sources import LabelledData, load_data, load_task_data
from vldistill.files import write_text
from vldistill.students.crossmodal import test_vilt
from vldistill.students.vilt_small import SMALL
from vldistill.tokenization import train_wordpiece
from vldistill.train.fit import tokenizer_corpus

TASK_SOURCES = ("bundled:easyvqa-vqa", "bundled:easyvqa-entailment", "bundled:easyvqa-mc")
KINDS = ("vqa", "entailment", "multiple_choice")
SMOKE_SIZES = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


class CaptionedImages:
    """Pixel tensors of a split's images and each image's colour-shape class (from its English caption)."""

    def __init__(self, split: str, limit: int | None, image_processor):
        data = load_data("bundled:easyvqa", split, ["en"], limit=limit)
        self.samples = list(data.dataset.samples)
        images = [decode_image(s) for s in self.samples]
        self.pixels = image_processor(images, return_tensors="pt")["pixel_values"]  # all 64 x 64: no padding
        self.classes = [s.label for s in self.samples]


def caption_of(cls: int, rng: random.Random) -> str:
    """A caption of class ``cls`` (colour-major, as :func:`vldistill.data.easyvqa.class_index`) in a random phrasing."""
    color, shape = COLORS[cls // len(SHAPES)], SHAPES[cls % len(SHAPES)]
    return caption(color, shape, rng.randrange(len(CAPTION_PHRASINGS["en"])), "en")


def make_batch(images: CaptionedImages, rows: list[int], tokenizer, rng: random.Random, mask_rate: float):
    """ITM pairs (half matched, half with another class's caption), every caption with ``mask_rate`` of its tokens (at
    least one) masked, and MLM labels on the matched ones."""
    n_classes = len(COLORS) * len(SHAPES)
    texts, matched = [], []
    for row in rows:
        cls = images.classes[row]
        ok = rng.random() < 0.5
        if not ok:
            cls = rng.choice([c for c in range(n_classes) if c != cls])
        texts.append(caption_of(cls, rng))
        matched.append(int(ok))
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    ids = enc["input_ids"].clone()
    labels = torch.full_like(ids, -100)
    special = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    for i, ok in enumerate(matched):  # every caption is masked alike, else "has a [MASK]" would give ITM away
        words = [j for j, t in enumerate(ids[i].tolist()) if t not in special]
        chosen = [j for j in words if rng.random() < mask_rate] or [rng.choice(words)]
        for j in chosen:
            if ok:  # a mismatched caption's words cannot be predicted from its image
                labels[i, j] = ids[i, j]
            ids[i, j] = tokenizer.mask_token_id
    return {
        "input_ids": ids,
        "attention_mask": enc["attention_mask"],
        "pixel_values": images.pixels[rows],
        "mlm_labels": labels,
        "itm_labels": torch.tensor(matched),
        "captions": texts,  # before masking
    }


class Pretrainer(nn.Module):
    """ViLT with ViLT's two pretraining heads: MLM over the vocabulary, ITM on the pooled [CLS]."""

    def __init__(self, vilt):
        super().__init__()
        self.vilt = vilt
        self.mlm = ViltMLMHead(vilt.config)
        self.itm = nn.Linear(vilt.config.hidden_size, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.vilt(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
        )
        text_len = batch["input_ids"].shape[1]
        mlm_logits = self.mlm(out.last_hidden_state[:, :text_len])
        itm_logits = self.itm(out.pooler_output)
        mlm = nn.functional.cross_entropy(mlm_logits.flatten(0, 1), batch["mlm_labels"].flatten(), ignore_index=-100)
        itm = nn.functional.cross_entropy(itm_logits, batch["itm_labels"])
        itm_acc = (itm_logits.argmax(-1) == batch["itm_labels"]).float().mean()
        masked = batch["mlm_labels"] != -100
        mlm_acc = (mlm_logits.argmax(-1)[masked] == batch["mlm_labels"][masked]).float().mean()
        return {"loss": mlm + itm, "mlm": mlm, "itm": itm, "itm_acc": itm_acc, "mlm_acc": mlm_acc}


@torch.no_grad()
def held_out(model: Pretrainer, images: CaptionedImages, tokenizer, batch_size: int) -> dict[str, float]:
    """ITM accuracy, MLM accuracy and losses on test-split pairs drawn with a fixed seed (the same every call)."""
    model.eval()
    rng = random.Random("held-out")
    totals: dict[str, float] = {}
    batches = 0
    for start in range(0, len(images.samples), batch_size):
        rows = list(range(start, min(start + batch_size, len(images.samples))))
        out = model(make_batch(images, rows, tokenizer, rng, 0.15))
        for key, value in out.items():
            totals[key] = totals.get(key, 0.0) + float(value)
        batches += 1
    model.train()
    return {key: value / batches for key, value in totals.items()}


def build_tokenizer(limit: int | None, vocab_size: int):
    """WordPiece on the training captions and the three tasks' training texts (questions, answers, hypotheses,
    candidates, rationales); the captions come from ``load_data`` so the corpus does not need the images."""
    pairs = load_data("bundled:easyvqa", "train", ["en"], limit=limit)
    corpus = list(tokenizer_corpus(pairs, ["en"]))
    for source, kind in zip(TASK_SOURCES, KINDS, strict=True):
        corpus += list(tokenizer_corpus(LabelledData(load_task_data(source, kind, split="train", limit=limit)), []))
    return train_wordpiece(corpus, vocab_size=vocab_size, max_length=SMALL["max_position_embeddings"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="directory of the checkpoint")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="tiny model, 200 images, a few steps")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return pretrain(args, argv)
    finally:
        torch.set_num_threads(threads)


def pretrain(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """Pretrain, save the checkpoint and ``pretrain.json``; returns what the JSON holds."""
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    limit = 200 if args.smoke else None
    steps = 3 if args.smoke else args.steps
    vocab_size = max(load_recipe(r).student.vocab_size for r in ("cliptd-vqa", "cliptd-ve", "cliptd-mc"))
    tokenizer = build_tokenizer(limit, vocab_size)
    sizes = {**SMALL, **(SMOKE_SIZES if args.smoke else {})}
    student = test_vilt(tokenizer, "multiple_choice", **sizes)
    train = CaptionedImages("train", limit, student.image_processor)
    test = CaptionedImages("test", 100 if args.smoke else 1000, student.image_processor)
    model = Pretrainer(student.vilt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    before = held_out(model, test, tokenizer, 128)
    start, log = time.perf_counter(), []
    order: list[int] = []
    for step in range(steps):
        if len(order) < args.batch_size:
            order += rng.sample(range(len(train.samples)), len(train.samples))
        rows, order = order[: args.batch_size], order[args.batch_size :]
        out = model(make_batch(train, rows, tokenizer, rng, 0.15))
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            row = {"step": step, **{k: round(v.item(), 4) for k, v in out.items()}}
            log.append(row)
            print(json.dumps(row), flush=True)
    seconds = time.perf_counter() - start
    after = held_out(model, test, tokenizer, 128)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    student.vilt.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    student.image_processor.save_pretrained(out_dir)
    result = {
        "command": "python " + " ".join(["benchmarks/pretrain_vilt.py", *(argv if argv is not None else sys.argv[1:])]),
        "steps": steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "train_images": len(train.samples),
        "held_out_images": len(test.samples),
        "sizes": sizes,
        "seconds": seconds,
        "held_out_before": before,
        "held_out_after": after,
        "log": log,
    }
    write_text(out_dir / "pretrain.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps({"before": before, "after": after, "seconds": round(seconds)}, indent=1))
    return result


if __name__ == "__main__":
    main()
