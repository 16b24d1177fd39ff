"""Several teachers at once: each preprocesses raw inputs with its own processor; losses see all of them."""

from __future__ import annotations

import torch

from vldistill.batching import Collator
from vldistill.config import load_recipe
from vldistill.data.sources import load_data
from vldistill.models import as_teacher
from vldistill.students import CLIP_MEAN, CLIP_STD, build_student
from vldistill.tokenization import train_wordpiece
from vldistill.train.loop import Trainer


def _teachers(corpus):
    torch.manual_seed(0)
    wide = build_student(
        "test-clip",
        train_wordpiece(corpus, 300),
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        projection_dim=24,
        **{"vision.image_size": 48, "vision.hidden_size": 48, "text.hidden_size": 40},
    )
    narrow = build_student(
        "test-clip", train_wordpiece(["zebra quartz", *corpus[:50]], 200), projection_dim=12, image_mean=CLIP_MEAN
    )
    return [as_teacher(wide), as_teacher(narrow)]


def test_two_different_teachers_distil_into_one_student(tmp_path):
    data = load_data("bundled:easyvqa", "train", ["en", "zh"], limit=48)
    corpus = [s.captions[lang] for s in data.dataset.samples for lang in ("en", "zh")]
    teachers = _teachers(corpus)
    assert teachers[0].dims != teachers[1].dims and teachers[0].image_size != teachers[1].image_size

    cfg = load_recipe(
        raw={
            "teachers": [{"name_or_path": "wide"}, {"name_or_path": "narrow"}],
            "student": {"preset": "test-clip"},
            "data": {"languages": ["en", "zh"], "eval": None},
            "stages": [
                {
                    "name": "distill",
                    "steps": 3,
                    "losses": [
                        {"name": "fd", "tower": "image"},
                        {"name": "xling"},
                        {"name": "crd", "weight": 0.5},
                        {"name": "soft_ce", "weight": 0.5},
                    ],
                }
            ],
            "train": {"batch_size": 16, "output_dir": str(tmp_path), "progress": False, "tensorboard": False},
        }
    )
    student = build_student("test-clip", train_wordpiece(corpus, 300))

    # each teacher gets its own pixels and token ids from the same raw batch
    batch = Collator(student, teachers, ["en", "zh"], [["en"], ["en"]])([data.dataset[i] for i in range(4)])
    assert batch["teachers"][0]["pixel_values"].shape[-1] == 48
    assert batch["teachers"][1]["pixel_values"].shape[-1] == 32
    assert batch["student"]["pixel_values"].shape[-1] == 32
    assert not torch.equal(batch["teachers"][1]["pixel_values"], batch["student"]["pixel_values"])  # other mean/std
    assert (
        batch["teachers"][0]["text"]["en"]["input_ids"].tolist()
        != batch["teachers"][1]["text"]["en"]["input_ids"].tolist()
    )
    assert "zh" not in batch["teachers"][0]["text"]  # English-only teachers never see Chinese

    before = [p.clone() for p in student.model.parameters()]
    teacher_before = [[p.clone() for p in t.model.parameters()] for t in teachers]
    result = Trainer(cfg, student, data.dataset, teachers).fit()
    row = result.history[-1]
    # fd gives each teacher its own adapter: one part per teacher
    assert {"fd_image/t0", "fd_image/t1", "xling", "crd", "soft_ce"} <= set(row)
    assert all(torch.isfinite(torch.tensor(v)) for v in row.values() if isinstance(v, float))
    assert any(not torch.equal(a, b) for a, b in zip(before, student.model.parameters(), strict=True))
    for t, params in zip(teachers, teacher_before, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(params, t.model.parameters(), strict=True))
