"""From raw samples to each model's inputs, and where teacher outputs come from.

:class:`Collator` turns a list of raw samples into one batch: the student's inputs (its own preprocessing) and each
teacher's (its own), plus what losses compare (caption groups) and targets. A :class:`TeacherSource` gives the
teachers' outputs for a batch: :class:`LiveTeachers` runs them, ``vldistill.cache.CachedTeachers`` reads them.
The trainer and the cache both build batches and teacher outputs through this module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .models import DualEncoder, DualEncoderProcessor, Teacher, encode_batch
from .outputs import Embeddings


def _get(sample: Any, key: str, default: Any = None) -> Any:
    return sample.get(key, default) if isinstance(sample, dict) else getattr(sample, key, default)


def teacher_texts(sample: Any) -> dict[str, str | list[str]]:
    """The texts a teacher embeds for one sample, keyed by field (DESIGN.md, "The step contract").

    Works on raw sample dicts (what datasets yield) and on the sample records of ``vldistill.data`` alike, so the
    collator, the cache's fingerprint and its build all read the same texts:

    - image-text pair: one field per caption language (``en``, ``zh``, ...);
    - VQA: ``question``, and ``qa`` (question + right answer: CLIP-TD's text target);
    - visual entailment: ``hypothesis``;
    - multiple choice: ``question``, ``candidates`` (question + each candidate answer, one text per candidate) and,
      when the item has rationales, ``rationales`` (question + right answer + each candidate rationale).
    """
    captions = _get(sample, "captions")
    if captions is not None:
        return dict(captions)
    kind = _get(sample, "kind")
    question = _get(sample, "question")
    if kind == "vqa":
        return {"question": question, "qa": f"{question} {_get(sample, 'answer')}"}
    if kind == "entailment":
        return {"hypothesis": _get(sample, "hypothesis")}
    if kind == "multiple_choice":
        candidates = list(_get(sample, "candidates"))
        out: dict[str, str | list[str]] = {"question": question, "candidates": [f"{question} {c}" for c in candidates]}
        rationales = list(_get(sample, "rationales", None) or [])
        if rationales:
            right = candidates[_get(sample, "answer_index")]
            out["rationales"] = [f"{question} {right} {r}" for r in rationales]
        return out
    raise ValueError(f"sample of unknown kind {kind!r}: expected captions, or kind vqa, entailment or multiple_choice")


def sample_targets(samples: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
    """Training targets of a batch (``StepOutputs.targets``): ``answer`` (the right answer's index in the answer
    vocabulary, the entailment label, or the right candidate) and ``rationale`` (multiple choice with rationales)."""
    kind = samples[0].get("kind")
    if kind in ("vqa", "multiple_choice"):
        out = {"answer": torch.tensor([s["answer_index"] for s in samples])}
        if kind == "multiple_choice" and samples[0].get("rationales"):
            out["rationale"] = torch.tensor([s["rationale_index"] for s in samples])
        return out
    if kind == "entailment":
        return {"answer": torch.tensor([s["label"] for s in samples])}
    return {}


class Collator:
    """Turns raw samples into each model's own inputs: the student and every teacher preprocess separately.

    Picklable (it holds processors, not models), so it runs inside DataLoader workers. One collator serves every
    sample kind: the teachers embed the fields of :func:`teacher_texts`, the student preprocesses with its own
    kind's processor, and the targets come from :func:`sample_targets`.

    Args:
        student: the student (any kind); a dual encoder embeds the caption fields ``languages``.
        teachers: the live teachers (none when the teacher outputs come from a cache).
        languages: the text fields the student reads (caption languages for a dual encoder).
        teacher_languages: per teacher, the text fields it embeds.
        views: a teacher cache's stored augmentations (``vldistill.cache.ViewTable``): each sample's image is
            first cut to the view the sampler chose for it (``sample["view"]``), so the student sees the very view
            whose teacher outputs were cached; ``batch["views"]`` tells the cache which view to read.
    """

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[DualEncoder],
        languages: Sequence[str],
        teacher_languages,
        views=None,
    ):
        self.dual = isinstance(student, DualEncoder)
        self.student = DualEncoderProcessor(student) if self.dual else student.processor()
        self.teachers = [DualEncoderProcessor(t) for t in teachers]
        self.languages = list(languages)
        self.teacher_languages = [list(langs) for langs in teacher_languages]
        self.views = views

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        free = [s for s in samples if "free_text" in s]  # free texts (data.texts): text fields of their own
        if free:
            samples = [s for s in samples if "free_text" not in s]
        images = [s["image"] for s in samples]
        if self.views is not None:
            images = [
                self.views.apply(img, s["index"], s.get("view", 0)) for img, s in zip(images, samples, strict=True)
            ]
        per_sample = [teacher_texts(s) for s in samples]
        student_fields = self.languages if self.dual else []  # other kinds read their own fields in processor()
        fields = sorted({f for langs in [student_fields, *self.teacher_languages] for f in langs})
        texts = {f: [t[f] for t in per_sample] for f in fields if all(f in t for t in per_sample)}
        missing = [f for f in fields if f not in texts]
        if missing:
            raise ValueError(f"the batch's samples have no text field {missing}; they have {sorted(per_sample[0])}")
        free_texts: dict[str, list[str]] = {}
        free_rows: dict[str, list[int]] = {}
        for s in free:
            free_texts.setdefault(s["free_field"], []).append(s["free_text"])
            free_rows.setdefault(s["free_field"], []).append(s["free_index"])
        if free and not self.dual:
            raise ValueError("free texts (data.texts) train a dual encoder's text tower; this student is not one")
        if self.dual:
            student = self.student(images, {**texts, **free_texts}, self.languages + sorted(free_texts))
        else:
            student = self.student([{**s, "image": img} for s, img in zip(samples, images, strict=True)])
        batch = {
            "index": torch.tensor([s["index"] for s in samples]),
            "views": torch.tensor([s.get("view", 0) for s in samples]),
            "labels": torch.tensor([s.get("label", -1) for s in samples]),
            "groups": {f: caption_group_ids(v) for f, v in texts.items() if isinstance(v[0], str)},
            "targets": sample_targets(samples),
            "student": student,
            "teachers": [
                proc(images, texts, langs) for proc, langs in zip(self.teachers, self.teacher_languages, strict=True)
            ],
        }
        if free:  # their teacher embeddings are read by row from a table computed before training
            batch["texts"] = {f: torch.tensor(rows) for f, rows in sorted(free_rows.items())}
        return batch


def caption_group_ids(texts: list[str]) -> Tensor:
    """Caption ids that depend on the text alone (a 64-bit hash), so that the shards of one batch on several
    processes give equal ids to equal captions when they are gathered."""
    return torch.tensor(
        [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little", signed=True) for t in texts]
    )


class TeacherSource(Protocol):
    """Where teacher outputs come from. The trainer reaches teachers only through this interface.

    A source may also have ``dims`` (each teacher's :class:`ModelDims`, when no teacher is loaded), ``views``
    (stored augmentations the collator replays on the student) and ``check_needs(needs, where)`` (fails before
    training on what it cannot give): ``vldistill.cache.CachedTeachers`` has all three.
    """

    def __call__(self, batch: dict[str, Any], needs: frozenset[str]) -> list[Embeddings]: ...


class LiveTeachers:
    """Runs each frozen teacher on its own preprocessed inputs."""

    def __init__(self, teachers: Sequence[Teacher]):
        self.teachers = list(teachers)

    def __call__(self, batch: dict[str, Any], needs: frozenset[str]) -> list[Embeddings]:
        return [encode_batch(t, inputs, needs) for t, inputs in zip(self.teachers, batch["teachers"], strict=True)]
