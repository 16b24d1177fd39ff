"""Tasks: what a model is trained and evaluated on, one registry entry each (DESIGN.md, "The extension points").

A :class:`Task` names the kind of sample it reads, the text fields the teacher embeds for it (see
``vldistill.batching.teacher_texts``), the training targets a batch carries (``StepOutputs.targets``), and an
``evaluate`` function. Evaluation takes a *predictor*, a function from a list of raw samples to predictions, so that
any model answers in its own way (a cross-modal student through its head, a seq2seq LM by generation, a dual
encoder by zero-shot scoring) and the metric code is shared:

========================  ===============  ==========================  =====================================
task                      sample kind      teacher fields              evaluate returns
========================  ===============  ==========================  =====================================
``zeroshot``              pairs            caption languages           top-1, top-5, mean per-class recall
``retrieval``             pairs            caption languages           image->text, text->image recall@k
``vqa``                   vqa              ``question``, ``qa``        VQA accuracy, overall and per type
``captioning``            pairs            caption languages           BLEU-4, CIDEr-D
``entailment``            entailment       ``hypothesis``              accuracy (+ hypothesis-only model's)
``multiple_choice``       multiple_choice  ``candidates``, ...         Q->A, QA->R, Q->AR accuracy
========================  ===============  ==========================  =====================================

Adding a task is one decorated function returning a :class:`Task`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..evaluation import evaluate as evaluate_dual_encoder
from ..registry import Registry
from .metrics import accuracy, caption_scores, multiple_choice_accuracy, vqa_accuracy

TASKS = Registry("task")

#: A predictor: raw samples (dicts, see ``vldistill.data``) -> one prediction per sample.
Predictor = Callable[[list[dict[str, Any]]], list[Any]]


@dataclass(frozen=True)
class Task:
    """One task.

    Attributes:
        name: the registered name.
        sample_kind: ``pairs``, ``vqa``, ``entailment`` or ``multiple_choice``.
        teacher_fields: the text fields the teacher embeds for it (empty: the caption languages of the data).
        targets: the names of the training targets its batches carry.
        evaluate: ``evaluate(predictor_or_model, data, **options) -> dict`` of JSON-able metrics.
    """

    name: str
    sample_kind: str
    teacher_fields: tuple[str, ...]
    targets: tuple[str, ...]
    evaluate: Callable[..., dict[str, Any]]


def get_task(name: str) -> Task:
    """The registered task ``name`` (unknown names fail with the list of registered ones)."""
    return TASKS.get(name)()


def _items(data: Any) -> list[dict[str, Any]]:
    return [data[i] for i in range(len(data))]


def _predict_batched(predict: Predictor, items: list[dict[str, Any]], batch_size: int) -> list[Any]:
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}: must be at least 1")
    out: list[Any] = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        preds = list(predict(chunk))
        if len(preds) != len(chunk):
            raise ValueError(f"the predictor returned {len(preds)} predictions for {len(chunk)} samples")
        out.extend(preds)
    return out


def _nonempty(items: list) -> list:
    if not items:
        raise ValueError("the evaluation data is empty")
    return items


# ------------------------------------------------------------------------------------------- dual encoders
@TASKS.register("zeroshot")
def zeroshot() -> Task:
    """Zero-shot classification of a dual encoder: class names in every template, averaged (METHODS.md 5)."""

    def run(model: Any, eval_set: Any, languages: Sequence[str] | None = None, batch_size: int = 64) -> dict:
        return evaluate_dual_encoder(model, eval_set, languages, batch_size)["metrics"]["zeroshot"]

    return Task("zeroshot", "pairs", (), (), run)


@TASKS.register("retrieval")
def retrieval() -> Task:
    """Image->text and text->image recall@k of a dual encoder over a test split (METHODS.md 5)."""

    def run(model: Any, eval_set: Any, languages: Sequence[str] | None = None, batch_size: int = 64) -> dict:
        return evaluate_dual_encoder(model, eval_set, languages, batch_size)["metrics"]["retrieval"]

    return Task("retrieval", "pairs", (), (), run)


# ----------------------------------------------------------------------------------------------------- VQA
@TASKS.register("vqa")
def vqa() -> Task:
    """VQA accuracy with the official answer normalisation, overall and per question type."""

    def run(predict: Predictor, data: Any, batch_size: int = 64) -> dict[str, Any]:
        items = _nonempty(_items(data))
        answers = _predict_batched(predict, items, batch_size)
        scores = [vqa_accuracy(str(a), s["answers"]) for a, s in zip(answers, items, strict=True)]
        by_type: dict[str, list[float]] = {}
        for score, item in zip(scores, items, strict=True):
            by_type.setdefault(item.get("question_type", "other"), []).append(score)
        return {
            "accuracy": sum(scores) / len(scores),
            "by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
            "count": len(scores),
        }

    return Task("vqa", "vqa", ("question", "qa"), ("answer",), run)


def answer_prior(train: Any) -> Callable[[list[dict[str, Any]]], list[str]]:
    """A predictor that always gives the most frequent training answer of the sample's question type: the floor a
    VQA model must beat to show it looks at the image."""
    counts: dict[str, Counter] = {}
    for item in _items(train):
        counts.setdefault(item.get("question_type", "other"), Counter())[item["answer"]] += 1
    overall = Counter()
    for c in counts.values():
        overall.update(c)
    best = {t: c.most_common(1)[0][0] for t, c in counts.items()}
    fallback = overall.most_common(1)[0][0]
    return lambda samples: [best.get(s.get("question_type", "other"), fallback) for s in samples]


# ---------------------------------------------------------------------------------------------- captioning
@TASKS.register("captioning")
def captioning() -> Task:
    """BLEU-4 and CIDEr-D of generated captions against every reference caption of the image (coco-caption's
    scorers; see ``vldistill.tasks.metrics.caption_scores``)."""

    def run(generate: Predictor, data: Any, language: str = "en", batch_size: int = 64) -> dict[str, Any]:
        items = _nonempty(_items(data))
        captions = _predict_batched(generate, items, batch_size)
        references = [[s["captions"][language]] for s in items]
        return {**caption_scores([str(c) for c in captions], references), "count": len(items)}

    return Task("captioning", "pairs", (), (), run)


# ---------------------------------------------------------------------------------------------- entailment
@TASKS.register("entailment")
def entailment() -> Task:
    """3-way visual-entailment accuracy; with ``train`` given, also the accuracy of a hypothesis-only text model
    (:func:`hypothesis_only_baseline`), which shows how much of a score the text alone explains."""

    def run(predict: Predictor, data: Any, train: Any = None, batch_size: int = 64) -> dict[str, Any]:
        items = _nonempty(_items(data))
        labels = [s["label"] for s in items]
        out = {"accuracy": accuracy(_predict_batched(predict, items, batch_size), labels), "count": len(items)}
        if train is not None:
            text_only = hypothesis_only_baseline(train)
            out["hypothesis_only_accuracy"] = accuracy(text_only(items), labels)
        return out

    return Task("entailment", "entailment", ("hypothesis",), ("answer",), run)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def hypothesis_only_baseline(train: Any, smoothing: float = 1.0) -> Callable[[list[dict[str, Any]]], list[int]]:
    """A text-only model of entailment: multinomial naive Bayes over the hypothesis's words (add-``smoothing``),
    fitted on the training items. It never sees an image, so its accuracy above chance (1/3) is what the hypotheses'
    wording gives away."""
    word_counts: dict[int, Counter] = {}
    label_counts: Counter = Counter()
    for item in _items(train):
        label_counts[item["label"]] += 1
        word_counts.setdefault(item["label"], Counter()).update(_words(item["hypothesis"]))
    vocab = set().union(*word_counts.values()) if word_counts else set()
    total = sum(label_counts.values())

    def log_prob(label: int, words: list[str]) -> float:
        counts, n = word_counts[label], sum(word_counts[label].values())
        denom = n + smoothing * (len(vocab) + 1)
        return math.log(label_counts[label] / total) + sum(math.log((counts[w] + smoothing) / denom) for w in words)

    def predict(samples: list[dict[str, Any]]) -> list[int]:
        out = []
        for s in samples:
            words = _words(s["hypothesis"])
            out.append(max(sorted(label_counts), key=lambda label: log_prob(label, words)))
        return out

    return predict


# ----------------------------------------------------------------------------------------- multiple choice
@TASKS.register("multiple_choice")
def multiple_choice() -> Task:
    """VCR's accuracies: Q->A, and for items with rationales QA->R (the rationale chosen given the right answer) and
    Q->AR (an item counts only when both its answer and its rationale are right).

    The predictor returns, per sample, the chosen candidate index, or for an item with rationales a pair ``(answer
    index, rationale index)`` (the predictors of ``vldistill.tasks.predict`` do). ``evaluate`` returns ``q2a`` (over
    every item), ``qa2r`` and ``q2ar`` (over the items with rationales that got a pair; ``rationale_count`` says how
    many when that is not every item) and ``count``.
    """

    def run(predict: Predictor, data: Any, batch_size: int = 64) -> dict[str, Any]:
        items = _nonempty(_items(data))
        preds = _predict_batched(predict, items, batch_size)
        for i, p in enumerate(preds):
            if isinstance(p, tuple | list) and len(p) != 2:
                raise ValueError(f"prediction {i} is {p!r}: expected a candidate index or (answer, rationale) indices")
        answers = [p[0] if isinstance(p, tuple | list) else p for p in preds]
        gold = [s["answer_index"] for s in items]
        result = multiple_choice_accuracy(answers, gold)
        rated = [
            i
            for i, (p, s) in enumerate(zip(preds, items, strict=True))
            if isinstance(p, tuple | list) and s.get("rationale_index", -1) >= 0
        ]
        if rated:
            both = multiple_choice_accuracy(
                [answers[i] for i in rated],
                [gold[i] for i in rated],
                [preds[i][1] for i in rated],
                [items[i]["rationale_index"] for i in rated],
            )
            result |= {"qa2r": both["qa2r"], "q2ar": both["q2ar"]}
            if len(rated) < len(items):
                result["rationale_count"] = len(rated)
        return {**result, "count": len(items)}

    return Task("multiple_choice", "multiple_choice", ("candidates", "rationales"), ("answer", "rationale"), run)


__all__ = [
    "TASKS",
    "Predictor",
    "Task",
    "answer_prior",
    "get_task",
    "hypothesis_only_baseline",
]
