"""CLIP-TD's confidence w on multiple choice: the teacher's softmax probability of the right candidate, on the first 200
training items, for Q->A (question + answer) and QA->R (question + right answer + rationale), with ``clip_td``'s own
``candidate_confidence`` (the teacher's logit scale). Run from the repository root after ``run.sh`` (it needs both
teachers)::

    .venv/bin/python benchmarks/results/task-distill-2026-12-01/confidence.py

2026-12-01 03:45 UTC, the 2-core machine: reference teacher w 0.840 (Q->A), 0.265 (QA->R); the informed teacher 0.975,
0.252. Near chance on QA->R (four rationales: 0.25), w does not fall towards 0 there.
"""

import statistics

import torch
from PIL import Image

from vldistill.batching import teacher_texts
from vldistill.data.sources import load_task_data
from vldistill.losses.clip_td import candidate_confidence
from vldistill.models import DualEncoder

TEACHERS = ("runs/teachers/reference-8d3c1bd6e095/model", "runs/informed/mc1200/adapted-teacher")

data = load_task_data("bundled:easyvqa-mc", "multiple_choice", split="train", limit=None)
for name in TEACHERS:
    teacher = DualEncoder.from_pretrained(name).eval()
    scale = float(teacher.logit_scale())
    w: dict[str, list[float]] = {"q2a": [], "qa2r": []}
    with torch.no_grad():
        for item in data.samples[:200]:
            v = teacher.embed_images([Image.open(item.image).convert("RGB")])
            texts = teacher_texts(item)  # the texts clip_td's teacher embeds: Q->A candidates, QA->R rationales
            for kind, field, right in (
                ("q2a", "candidates", item.answer_index),
                ("qa2r", "rationales", item.rationale_index),
            ):
                if field in texts:
                    candidates = teacher.embed_texts(texts[field])[None]
                    w[kind].append(float(candidate_confidence(v, candidates, torch.tensor([right]), scale)))
    print(name, {kind: round(statistics.fmean(values), 3) for kind, values in w.items()})
