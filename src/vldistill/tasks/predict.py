"""Predictors: how each student kind answers a task, as a function ``samples -> predictions`` that a task's
``evaluate`` takes (``vldistill.tasks``).

- A cross-modal student answers through its task head: the arg-max answer (VQA: the answer string from its
  vocabulary), label (entailment) or candidate (multiple choice).
- A dual encoder answers zero-shot, as CLIP does: VQA by the answer whose ``question + answer`` text is closest to the
  image, multiple choice by the closest ``question + candidate``, entailment not at all (a similarity has no
  "neutral").

Multiple choice with rationales (VCR): both answer ``(answer, rationale)`` per item, the rationale chosen given the
right answer (QA->R: the item's :func:`~vldistill.data.tasks.rationale_item`, scored as any other candidates; a dual
encoder scores ``question + right answer + rationale``).
- A seq2seq student answers VQA and writes captions by generation (VLKD), from its teacher's image outputs
  (:func:`vldistill.tasks.generation.generative_predictor`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..batching import teacher_texts
from ..data.tasks import rationale_item


def task_predictor(model: nn.Module, task: str, answers: Sequence[str] = (), teacher=None, generation=None):
    """A predictor for ``model`` on ``task`` (``vqa``, ``entailment``, ``multiple_choice``; ``captioning`` for a
    seq2seq student).

    Args:
        model: a student of any kind, or a teacher (a dual encoder).
        task: the task name.
        answers: the VQA answer vocabulary a dual encoder chooses from (a cross-modal student has its own).
        teacher: a seq2seq student's teacher (it embeds the images the student generates from).
        generation: a seq2seq student's prompts and decoding (``vldistill.config.GenerationConfig``).

    Raises:
        ValueError: the model's kind cannot answer that task.
    """
    kind = getattr(model, "kind", "")
    if kind == "seq2seq":
        from .generation import generative_predictor

        return generative_predictor(model, teacher, task, generation)
    if kind == "crossmodal":
        return _head_predictor(model, task)
    if kind == "dual_encoder":
        if task == "vqa":
            if not answers:
                raise ValueError("zero-shot VQA with a dual encoder needs the answer vocabulary (answers=)")
            return _zeroshot_vqa(model, list(answers))
        if task == "multiple_choice":
            return _zeroshot_choice(model)
    raise ValueError(f"a {kind or type(model).__name__} model cannot answer the {task!r} task here")


def _head_predictor(model: nn.Module, task: str):
    if model.task != task:
        raise ValueError(f"the student's head answers {model.task!r}, not {task!r}")
    processor = model.processor()

    @torch.no_grad()
    def best(samples: list[dict[str, Any]]) -> list[int]:
        was = model.training
        model.eval()
        try:
            inputs = processor(samples)
            inputs.pop("targets", None)  # multiple choice: report the model's own best candidate's tokens
            logits = model(inputs, frozenset({"task_logits"})).extra["task_logits"]
        finally:
            model.train(was)
        return logits.argmax(dim=-1).tolist()

    def predict(samples: list[dict[str, Any]]) -> list[Any]:
        if task == "vqa":
            return [model.labels[i] for i in best(samples)]
        if task == "entailment":
            return best(samples)
        return _with_rationales(samples, best(samples), best)

    return predict


def _with_rationales(samples: list[dict[str, Any]], answers: list[int], choose) -> list[Any]:
    """Per item its answer, or ``(answer, rationale)`` where it has rationales: ``choose`` scores the QA->R samples
    (question + right answer, the rationales as candidates) of those items together."""
    rated = [i for i, s in enumerate(samples) if s.get("rationales")]
    out: list[Any] = list(answers)
    if rated:
        for i, r in zip(rated, choose([rationale_item(samples[i]) for i in rated]), strict=True):
            out[i] = (answers[i], r)
    return out


#: Floats of ``question + answer`` embeddings a zero-shot VQA predictor keeps (64 MB): questions repeat (the bundled
#: test split asks 107 distinct ones 9,673 times), and a question's texts embed the same for every image.
ZERO_SHOT_CACHE_FLOATS = 1 << 24


def _zeroshot_vqa(model: nn.Module, answers: list[str], cache_floats: int = ZERO_SHOT_CACHE_FLOATS):
    """Zero-shot VQA: each question's ``question + answer`` embeddings are computed once and kept (least recently
    used first out, at most ``cache_floats`` floats) while the predictor lives: make a new one after ``model``
    changes."""
    cache: OrderedDict[str, torch.Tensor] = OrderedDict()
    size = 0

    @torch.no_grad()
    def predict(samples: list[dict[str, Any]]) -> list[str]:
        nonlocal size
        images = model.embed_images([s["image"] for s in samples])
        out = []
        for s, img in zip(samples, images, strict=True):
            texts = cache.get(s["question"])
            if texts is None:
                texts = cache[s["question"]] = model.embed_texts([f"{s['question']} {a}" for a in answers])
                size += texts.numel()
                while size > cache_floats and len(cache) > 1:
                    size -= cache.popitem(last=False)[1].numel()
            else:
                cache.move_to_end(s["question"])
            out.append(answers[int((texts @ img).argmax())])
        return out

    return predict


def _zeroshot_choice(model: nn.Module):
    @torch.no_grad()
    def predict(samples: list[dict[str, Any]]) -> list[Any]:
        images = model.embed_images([s["image"] for s in samples])
        out: list[Any] = []
        for s, img in zip(samples, images, strict=True):
            texts = teacher_texts(s)
            answer = int((model.embed_texts(texts["candidates"]) @ img).argmax())
            if "rationales" in texts:  # question + right answer + each rationale (QA->R given the right answer)
                out.append((answer, int((model.embed_texts(texts["rationales"]) @ img).argmax())))
            else:
                out.append(answer)
        return out

    return predict
