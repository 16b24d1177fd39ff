"""CLIP-TD's confidence w on multiple choice: the teacher's softmax probability of the right candidate, on the first 200
training items, for Q->A (question + answer) and QA->R (question + right answer + rationale), as ``clip_td`` computes
it (its own logit scale). Run from the repository root after ``run.sh`` (it needs both teachers)::

    .venv/bin/python benchmarks/results/task-distill-2026-12-01/confidence.py

2026-12-01 03:45 UTC, the 2-core machine: reference teacher w 0.840 (Q->A), 0.265 (QA->R); the informed teacher 0.975,
0.252. Near chance on QA->R (four rationales: 0.25), w does not fall towards 0 there.
"""

import statistics

import torch
import torch.nn.functional as F
from PIL import Image

from vldistill.data.sources import load_task_data
from vldistill.models import DualEncoder

TEACHERS = ("runs/teachers/reference-8d3c1bd6e095/model", "runs/informed/mc1200/adapted-teacher")

data = load_task_data("bundled:easyvqa-mc", "multiple_choice", split="train", limit=None)
for name in TEACHERS:
    teacher = DualEncoder.from_pretrained(name).eval()
    scale = float(teacher.logit_scale())
    w: dict[str, list[float]] = {"q2a": [], "qa2r": []}
    with torch.no_grad():
        for item in data.samples[:200]:
            v = F.normalize(teacher.embed_images([Image.open(item.image).convert("RGB")]), dim=-1)
            for kind, sample in zip(("q2a", "qa2r"), item.split_rationales(), strict=True):
                if sample is None:
                    continue
                texts = F.normalize(teacher.embed_texts([f"{sample.question} {c}" for c in sample.candidates]), dim=-1)
                w[kind].append(float((scale * v @ texts.T).softmax(-1)[0, sample.answer_index]))
    print(name, {kind: round(statistics.fmean(values), 3) for kind, values in w.items()})
