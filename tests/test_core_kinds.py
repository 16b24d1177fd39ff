"""One core for three kinds of student: the trainer runs a cross-modal (ViLT) and a seq2seq (BART) student through
the same loop as a dual encoder, trains exactly the parameter groups a recipe names, and refuses a recipe whose losses
need what the student kind does not provide, before training."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import COLOURS, SHAPES, colour_image, pair_items, tiny_train
from vldistill.batching import Collator, LiveTeachers, sample_targets, teacher_texts
from vldistill.config import ConfigError, RecipeConfig, from_dict, load_recipe, to_dict
from vldistill.models import as_teacher
from vldistill.students import STUDENT_KINDS, build_student
from vldistill.tokenization import train_wordpiece
from vldistill.train.loop import Trainer


def vqa_items(n: int = 8) -> list[dict[str, Any]]:
    answers = COLOURS
    return [
        {
            "index": i,
            "image": colour_image(i),
            "kind": "vqa",
            "question": "what colour is the shape?",
            "answers": [answers[i % 4]],
            "answer": answers[i % 4],
            "answer_index": i % 4,
            "question_type": "colour",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [f"a {c} {s}" for c in COLOURS for s in SHAPES] + ["what colour is the shape?", "question answer"]
    return train_wordpiece(corpus * 4, vocab_size=120)


@pytest.fixture(scope="module")
def teacher(tokenizer):
    torch.manual_seed(1)
    return as_teacher(build_student("test-clip", tokenizer), languages=["en"])


def recipe(tmp_path: Path, preset: str, losses: list, trainable: list[str], languages: list[str]) -> RecipeConfig:
    raw = {
        "name": "kinds",
        "student": {"preset": preset},
        "data": {"train": "bundled:easyvqa", "eval": None, "languages": languages},
        "stages": [{"steps": 2, "losses": losses, "trainable": trainable}],
        "train": tiny_train(tmp_path / "run"),
    }
    return from_dict(RecipeConfig, raw)


def _groups_of(student) -> dict[str, str]:
    groups = student.param_groups()
    return {n: next(g for g, p in groups.items() if n.startswith(tuple(p))) for n, _ in student.named_parameters()}


def _changed_groups(student, before: dict[str, torch.Tensor]) -> set[str]:
    owner = _groups_of(student)
    after = dict(student.named_parameters())
    return {owner[n] for n, v in before.items() if not torch.equal(v, after[n].detach())}


def test_the_three_kinds_are_registered():
    assert {"dual_encoder", "seq2seq", "crossmodal"} <= set(STUDENT_KINDS.names())


def test_teacher_texts_and_targets_by_sample_kind():
    item = vqa_items(1)[0]
    assert teacher_texts(item) == {"question": "what colour is the shape?", "qa": "what colour is the shape? red"}
    mc = {"kind": "multiple_choice", "question": "q?", "candidates": ["a", "b"], "answer_index": 1}
    mc |= {"rationales": ["r1", "r2"], "rationale_index": 0, "index": 0}
    assert teacher_texts(mc) == {"question": "q?", "candidates": ["q? a", "q? b"], "rationales": ["q? b r1", "q? b r2"]}
    assert teacher_texts({"kind": "entailment", "hypothesis": "h"}) == {"hypothesis": "h"}
    assert teacher_texts(pair_items(1)[0]) == {"en": "a red circle"}
    targets = sample_targets([mc, {**mc, "answer_index": 0, "rationale_index": 1}])
    assert targets["answer"].tolist() == [1, 0] and targets["rationale"].tolist() == [0, 1]


def test_teacher_embeds_one_vector_per_candidate(teacher, tokenizer):
    mc = [
        {"index": i, "image": colour_image(i), "kind": "multiple_choice", "question": "which colour?"}
        | {"candidates": COLOURS, "answer_index": i % 4, "rationales": [], "rationale_index": -1}
        for i in range(3)
    ]
    student = build_student("test-clip", tokenizer)
    batch = Collator(student, [teacher], [], [["candidates", "question"]])(mc)
    out = LiveTeachers([teacher])(batch, frozenset({"teacher"}))[0]
    assert out.text["candidates"].shape == (3, 4, teacher.dims.embed)
    assert out.text["question"].shape == (3, teacher.dims.embed)
    direct = teacher.embed_texts([f"which colour? {c}" for c in COLOURS])  # normalised
    got = torch.nn.functional.normalize(out.text["candidates"][1], dim=-1)
    assert torch.allclose(got, direct, atol=1e-5)
    assert batch["targets"]["answer"].tolist() == [0, 1, 2]


def test_a_vilt_student_trains_only_the_groups_its_recipe_names(tmp_path, tokenizer):
    torch.manual_seed(0)
    student = build_student("test-vilt", tokenizer, task="vqa", answers=COLOURS)
    assert student.kind == "crossmodal"
    cfg = recipe(tmp_path, "test-vilt", [{"name": "task"}], ["head", "pooler"], [])
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    result = Trainer(cfg, student, vqa_items()).fit()
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert _changed_groups(student, before) == {"head", "pooler"}


def test_a_bart_student_reads_the_teachers_image_and_trains_only_its_named_groups(tmp_path, tokenizer, teacher):
    torch.manual_seed(0)
    student = build_student("test-bart", tokenizer, teacher=teacher)
    assert student.kind == "seq2seq"
    cfg = recipe(tmp_path, "test-bart", [{"name": "lm"}], ["prefix"], ["en"])
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    seen = []
    real = LiveTeachers.__call__

    def spy(self, batch, needs):
        out = real(self, batch, needs)
        seen.append(out[0].image.shape)
        return out

    LiveTeachers.__call__ = spy
    try:
        result = Trainer(cfg, student, pair_items(), [teacher]).fit()
    finally:
        LiveTeachers.__call__ = real
    assert seen, "the teacher never ran before the student"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert _changed_groups(student, before) == {"prefix"}  # the LM and the text projection are untouched


def test_a_loss_the_student_kind_cannot_feed_fails_before_training(tmp_path, tokenizer):
    student = build_student("test-clip", tokenizer)
    cfg = recipe(tmp_path, "test-clip", [{"name": "task"}], ["image"], ["en"])
    msg = (
        "stages.0.losses.0 (task): needs 'task_logits' from the student, which a dual_encoder student does not provide"
    )
    with pytest.raises(ConfigError, match=re.escape(msg)):
        Trainer(cfg, student, pair_items())
    assert not (tmp_path / "run").exists()


def test_an_unknown_group_of_a_vilt_student_lists_its_groups(tmp_path, tokenizer):
    student = build_student("test-vilt", tokenizer, task="vqa", answers=COLOURS)
    cfg = recipe(tmp_path, "test-vilt", [{"name": "task"}], ["image"], [])
    with pytest.raises(ConfigError, match=r"\['image'\] are not parameter groups of a crossmodal student; it has "):
        Trainer(cfg, student, vqa_items())


def test_paired_and_unpaired_stages_draw_the_samples_they_say(tmp_path, tokenizer, teacher, monkeypatch):
    import vldistill.train.loop as loop

    seen = []

    class Spy(loop.StageSampler):
        def __init__(self, n, *args, **kwargs):
            seen.append(n)
            super().__init__(n, *args, **kwargs)

    monkeypatch.setattr(loop, "StageSampler", Spy)
    items = pair_items(16)
    cfg = recipe(tmp_path, "test-clip", [{"name": "clip"}], ["image", "text"], ["en"])
    raw = to_dict(cfg)
    raw["data"]["paired"] = 0.25  # 4 of the 16 samples keep their image-caption pairing
    raw["stages"] = [
        {"name": "unimodal", "steps": 1, "samples": "all", "losses": [{"name": "fd", "tower": "image"}]},
        {"name": "align", "steps": 1, "samples": "paired", "losses": [{"name": "clip", "langs": ["en"]}]},
    ]
    Trainer(load_recipe(raw=raw), build_student("test-clip", tokenizer), items, [teacher]).fit()
    assert seen == [16, 4]  # stage 1 draws every sample, stage 2 the paired ones only

    raw["stages"][0]["losses"] = [{"name": "clip", "langs": ["en"]}]  # a loss that pairs images with captions
    msg = "stages.0.losses.0 (clip): compares images with texts, but stages.0.samples is 'all'"
    with pytest.raises(ConfigError, match=re.escape(msg)):
        Trainer(load_recipe(raw=raw), build_student("test-clip", tokenizer), items, [teacher])


def test_the_soft_vqa_task_loss_reads_the_scores_the_students_processor_builds(tmp_path, tokenizer):
    torch.manual_seed(0)
    student = build_student("test-vilt", tokenizer, task="vqa", answers=COLOURS)
    cfg = recipe(tmp_path, "test-vilt", [{"name": "task", "options": {"soft": True}}], ["head"], [])
    result = Trainer(cfg, student, vqa_items()).fit()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
