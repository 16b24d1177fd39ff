"""The bundled easy-VQA images as task data: VQA, visual entailment and multiple choice (English).

All three use easy-vqa's own train (4000 images) / test (1000 images) split and the colour and shape of each image
that :func:`~vldistill.data.easyvqa.image_labels` derives from easy-vqa's own question-answer labels. Every sample
carries ``attributes = {"color": ..., "shape": ...}`` of its image, for domain-shift splits.

**VQA** (:func:`easyvqa_vqa`): easy-vqa's own questions and answers, unchanged (38,575 train and 9,673 test
questions, 13 answers: yes/no, 8 colours, 3 shapes), one reference answer per question. ``question_type`` is derived
from the answer: ``yes_no`` (yes/no), ``colour`` (a colour) or ``shape`` (a shape). The answer vocabulary is always
the training split's (most frequent first, ties alphabetical), so train and test indices agree.

**Visual entailment** (:func:`easyvqa_entailment`): for every image, one hypothesis per class and ``per_class``,
so the three classes are exactly balanced. A hypothesis refers to the shape through one of four frames ("There is a
{c} {s}...", "The shape ...", "The {s} ..." / "The {c} shape ...", "The picture shows a {c} {s}..."), chosen
independently per hypothesis, and

- entailment: states the image's true colour and/or shape, optionally with a tail that is always true of easy-vqa
  images ("on a light background", "in the picture"): "There is a red circle.", "The shape is red.";
- contradiction: states a wrong colour, a wrong shape or both, plainly or together with an undecidable predicate
  (the whole is false whatever the predicate): "There is a blue circle.", "There is a blue circle made of wood.",
  "The shape is blue and was drawn by a child.", or refers to a shape the image does not have: "The triangle was
  drawn by a child." (for a circle);
- neutral: refers to the shape by its true colour and/or shape and adds a predicate that no image can decide (material,
  who drew it, the weather, its size relative to something absent): "The red shape is made of wood.",
  "The circle was drawn by a child.", "The circle is bigger than a blue triangle.". Neutral hypotheses are
  undecidable from the image by construction: the images are flat renderings with nothing of material, author,
  weather or absolute size in them.

Textual cues: whether a hypothesis is neutral shows in its text (the undecidable predicates are a closed list), so
a text-only model can tell {neutral, contradiction} (predicate present) from {entailment, contradiction} (absent).
To keep the image necessary, half of the contradictions carry an undecidable predicate too (in the same wording as
the neutral hypotheses), every class uses every frame and mentions colours and shapes (neutral ones sometimes a
wrong one, in a comparison that does not claim it is present), and the same string is entailment for one image and
contradiction for another. What remains: a hypothesis-only model can reach about 2/3 accuracy (within each group
it has to guess) against 1/3 chance; the test suite checks this bound on the generated data.

**Multiple choice** (:func:`easyvqa_mc`): for every image, one question ("What is in the image?", "What colour is
the shape?", "What shape is it?", two phrasings each), four candidate answers (the right one and three distractors;
for "what is in the image" one distractor shares the colour, one the shape, one neither; shape questions use the
two other shapes and one shape easy-vqa never draws) and four candidate rationales ("Because it is filled with red.",
"Because it has three corners.", ...): the right rationale is true of the image, the three distractors are false of
it and drawn independently of the answer distractors. Candidates and rationales are shuffled separately. Each item
is trained as two candidate-scoring samples, Q->A and QA->R (question + right answer, the 4 rationales), and
evaluated as VCR is (Q->A, QA->R given the right answer, Q->AR); ``rationales=False`` drops the rationales (Q->A).

Everything is deterministic given (split, seed): each image's items come from a generator seeded with the split,
the seed and the image id, so ``limit`` changes which images are used but not their items.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from functools import cache

import easy_vqa

from vldistill.data.easyvqa import COLORS, SHAPES, SPLITS, LabelledImage, image_labels
from vldistill.data.pairs import DataError
from vldistill.data.tasks import ChoiceSample, EntailmentSample, TaskDataset, TaskSample, VQASample

__all__ = [
    "HELD_OUT_COMBOS",
    "HELD_OUT_PHRASINGS",
    "MC_QUESTIONS",
    "UNDECIDABLE_PREDICATES",
    "easyvqa_entailment",
    "easyvqa_mc",
    "easyvqa_vqa",
    "question_type",
    "train_answers",
]

# Default domain-shift hold-outs for the bundled data (see vldistill.data.splits). Four of the 24 colour-shape
# combinations, each colour and shape still seen in training with others (about 16% of test images); and one
# phrasing of each question form that has several (the forms themselves stay in training), about a quarter to a
# third of the test items.
HELD_OUT_COMBOS = ("red circle", "green rectangle", "blue triangle", "gray circle")
HELD_OUT_PHRASINGS = {
    "vqa": ("what shape is present?", "what is the color of the *", "does the image contain a *"),
    "entailment": ("the shape *",),
    "multiple_choice": ("what does the picture show?", "which *"),
}

# Multiple choice: question type -> phrasings ({s} is the image's shape).
MC_QUESTIONS = {
    "what": ("What is in the image?", "What does the picture show?"),
    "colour": ("What colour is the shape?", "Which colour is the {s}?"),
    "shape": ("What shape is it?", "Which shape is shown?"),
}
_FAKE_SHAPES = ("star", "hexagon", "pentagon")  # never drawn by easy-vqa: shape distractors and false rationales
_SHAPE_FACTS = {  # verb phrases after "it"
    "circle": "has no corners",
    "rectangle": "has four corners",
    "triangle": "has three corners",
    "pentagon": "has five corners",
    "hexagon": "has six corners",
    "star": "has five points",
}

# Entailment: predicates no image decides, as a verb phrase and as a tail after a noun.
UNDECIDABLE_PREDICATES = (
    "is made of wood",
    "is made of paper",
    "was drawn by a child",
    "was painted on a rainy day",
    "is bigger than a coin",
    "is heavier than it looks",
)
_UNDECIDABLE_TAILS = (
    " made of wood",
    " made of paper",
    " drawn by a child",
    " painted on a rainy day",
    " that is bigger than a coin",
    " that is heavier than it looks",
)
_TRUE_TAILS = ("", " in the picture", " on a light background")  # true of every easy-vqa image
_FRAMES = ("there", "shape", "named", "picture")
_CLASSES = {"entailment": 0, "neutral": 1, "contradiction": 2}


def question_type(answer: str) -> str:
    """``yes_no``, ``colour`` or ``shape``, from the answer of an easy-vqa question."""
    if answer in ("yes", "no"):
        return "yes_no"
    if answer in COLORS:
        return "colour"
    if answer in SHAPES:
        return "shape"
    raise DataError(f"easy-vqa answer {answer!r} is not yes/no, a colour or a shape")


@cache
def train_answers() -> tuple[str, ...]:
    """easy-vqa's answers, most frequent in its training questions first, ties in alphabetical order."""
    counts = Counter(easy_vqa.get_train_questions()[1])
    return tuple(sorted(counts, key=lambda answer: (-counts[answer], answer)))


def _check_args(split: str, limit: int | None) -> None:
    if split not in SPLITS:
        raise DataError(f"easy-vqa split must be one of {SPLITS}, got {split!r}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise DataError(f"easy-vqa limit must be a positive int or None, got {limit!r}")


def _ordered_images(split: str, limit: int | None, seed: int) -> list[LabelledImage]:
    """The split's images in id order, or with ``limit`` in the same seeded order as ``load_easyvqa``'s subset."""
    images = list(image_labels(split).images)
    if limit is not None:
        random.Random(f"easyvqa-subset:{split}:{seed}").shuffle(images)
    return images


def _first(items: Iterable[TaskSample], limit: int | None) -> list[TaskSample]:
    """The first ``limit`` items (all when None); a smaller limit gives a prefix of a larger one."""
    out: list[TaskSample] = []
    for item in items:
        if limit is not None and len(out) >= limit:
            break
        out.append(item)
    return out


def _attributes(image: LabelledImage) -> dict[str, str]:
    return {"color": image.color, "shape": image.shape}


def _generated(
    split: str, limit: int | None, seed: int, name: str, make: Callable[[LabelledImage, random.Random], list]
) -> list[TaskSample]:
    """Items ``make(image, rng)`` for each image in order, with a generator seeded per (name, split, seed, image)."""

    def items() -> Iterator[TaskSample]:
        for image in _ordered_images(split, limit, seed):
            yield from make(image, random.Random(f"easyvqa-{name}:{split}:{seed}:{image.image_id}"))

    return _first(items(), limit)


# ---------------------------------------------------------------------------------------------------------------
# VQA.


def easyvqa_vqa(split: str, limit: int | None = None, seed: int = 0, answers: list[str] | None = None) -> TaskDataset:
    """easy-vqa's own questions and answers as VQA samples (images decoded and kept in memory).

    Args:
        split: "train" (38,575 questions on 4,000 images) or "test" (9,673 on 1,000).
        limit: keep only this many questions: those of the images in a seeded order, all questions of an image in
            easy-vqa's order, so a smaller limit gives a subset of a larger one.
        seed: seeds the image order for ``limit``.
        answers: answer vocabulary; default the training split's (:func:`train_answers`).
    """
    _check_args(split, limit)
    questions, answer_list, image_ids = (
        easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    )
    per_image: dict[int, list[tuple[str, str]]] = {}
    for question, answer, image_id in zip(questions, answer_list, image_ids, strict=True):
        per_image.setdefault(image_id, []).append((question, answer))

    def make(image: LabelledImage, rng: random.Random) -> list[VQASample]:
        return [
            VQASample(
                image=image.path,
                id=f"{split}-{image.image_id}-{k}",
                attributes=_attributes(image),
                origin=f"easy-vqa {split} image {image.image_id} question {k}",
                question=question,
                answers=[answer],
                question_type=question_type(answer),
            )
            for k, (question, answer) in enumerate(per_image.get(image.image_id, []))
        ]

    samples = _generated(split, limit, seed, "vqa", make)
    vocabulary = list(answers) if answers is not None else list(train_answers())
    return TaskDataset(samples, "vqa", answers=vocabulary, preload=True, source=f"easy-vqa/{split}/vqa")


# ---------------------------------------------------------------------------------------------------------------
# Visual entailment.


def easyvqa_entailment(split: str, limit: int | None = None, seed: int = 0, per_class: int = 1) -> TaskDataset:
    """Hypotheses about each easy-vqa image, ``per_class`` of each of the three classes (see the module docstring).

    Args:
        split: "train" (4,000 images) or "test" (1,000).
        limit: keep only this many hypotheses: those of the images in a seeded order, so a smaller limit gives a
            subset of a larger one.
        seed: seeds the image order and the hypotheses.
        per_class: hypotheses of each class per image.
    """
    _check_args(split, limit)
    if not isinstance(per_class, int) or isinstance(per_class, bool) or per_class < 1:
        raise DataError(f"easy-vqa entailment per_class must be a positive int, got {per_class!r}")

    def make(image: LabelledImage, rng: random.Random) -> list[EntailmentSample]:
        seen: set[str] = set()
        made = []
        for k in range(per_class):
            for name, label in _CLASSES.items():
                text = _hypothesis(image.color, image.shape, name, rng)
                for _ in range(10):  # several per class may repeat a string; redraw a few times
                    if text not in seen:
                        break
                    text = _hypothesis(image.color, image.shape, name, rng)
                seen.add(text)
                made.append(
                    EntailmentSample(
                        image=image.path,
                        id=f"{split}-{image.image_id}-{name}-{k}",
                        attributes=_attributes(image),
                        origin=f"easy-vqa {split} image {image.image_id} {name} {k}",
                        hypothesis=text,
                        label=label,
                    )
                )
        rng.shuffle(made)  # no fixed label pattern in the item order
        return made

    samples = _generated(split, limit, seed, "entailment", make)
    return TaskDataset(samples, "entailment", preload=True, source=f"easy-vqa/{split}/entailment")


def _other(values: Iterable[str], but: str, rng: random.Random) -> str:
    return rng.choice([v for v in values if v != but])


def _wrong_pair(color: str, shape: str, rng: random.Random) -> tuple[str, str]:
    """A colour-shape pair that is not the image's: wrong colour, wrong shape, or both."""
    which = rng.choice(("color", "shape", "both"))
    wrong_color = _other(COLORS, color, rng) if which in ("color", "both") else color
    wrong_shape = _other(SHAPES, shape, rng) if which in ("shape", "both") else shape
    return wrong_color, wrong_shape


def _hypothesis(color: str, shape: str, label: str, rng: random.Random) -> str:
    """One hypothesis of class ``label`` about an image with this colour and shape, in a random frame."""
    frame = rng.choice(_FRAMES)
    pred = rng.choice(UNDECIDABLE_PREDICATES)
    if frame in ("there", "picture"):
        opening = "There is a" if frame == "there" else "The picture shows a"
        if label == "entailment":
            return f"{opening} {color} {shape}{rng.choice(_TRUE_TAILS)}."
        if label == "neutral":
            return f"{opening} {color} {shape}{rng.choice(_UNDECIDABLE_TAILS)}."
        c, s = _wrong_pair(color, shape, rng)
        return f"{opening} {c} {s}{rng.choice(rng.choice((_TRUE_TAILS, _UNDECIDABLE_TAILS)))}."
    wrong_color, wrong_shape = _other(COLORS, color, rng), _other(SHAPES, shape, rng)
    # Any pair but the image's own: sometimes with its true colour or shape, sometimes with neither.
    other = " ".join(rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) != (color, shape)]))
    if frame == "shape":
        options = {
            "entailment": [f"The shape is {color}.", f"The shape is a {shape}."],
            "neutral": [f"The shape is {color} and {pred}."],
            "contradiction": [f"The shape is {wrong_color}.", f"The shape is a {wrong_shape}."],
        }
        # Contradictions with an undecidable predicate, in the same wording as the neutral hypotheses.
        undecidable_contradictions = [f"The shape is {wrong_color} and {pred}."]
    else:
        options = {
            "entailment": [f"The {shape} is {color}.", f"The {color} shape is a {shape}."],
            "neutral": [f"The {shape} {pred}.", f"The {color} shape {pred}.", f"The {shape} is bigger than a {other}."],
            "contradiction": [f"The {shape} is {wrong_color}.", f"The {color} shape is a {wrong_shape}."],
        }
        # These refer to a shape the image does not have, so they are false whatever the predicate says.
        undecidable_contradictions = [
            f"The {shape} is {wrong_color} and {pred}.",
            f"The {wrong_shape} {pred}.",
            f"The {wrong_color} shape {pred}.",
            f"The {wrong_shape} is bigger than a {other}.",
        ]
    if label == "contradiction" and rng.random() < 0.5:  # the undecidable predicates in half the contradictions
        return rng.choice(undecidable_contradictions)
    return rng.choice(options[label])


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice.


def easyvqa_mc(split: str, limit: int | None = None, seed: int = 0, rationales: bool = True) -> TaskDataset:
    """One multiple-choice question per easy-vqa image, with 4 candidate answers and 4 candidate rationales.

    Args:
        split: "train" (4,000 images) or "test" (1,000).
        limit: keep only this many items (images in a seeded order; a smaller limit gives a subset of a larger one).
        seed: seeds the image order, the questions, the distractors and the shuffles.
        rationales: keep the rationales (VCR's QA->R, trained beside Q->A, and the Q->AR metric); False: Q->A only.
            The answers and their order do not depend on it.
    """
    _check_args(split, limit)
    if not isinstance(rationales, bool):
        raise DataError(f"easy-vqa multiple choice rationales must be true or false, got {rationales!r}")

    def make(image: LabelledImage, rng: random.Random) -> list[ChoiceSample]:
        kind = rng.choice(tuple(MC_QUESTIONS))
        question = rng.choice(MC_QUESTIONS[kind]).format(s=image.shape)
        right, wrong = _mc_answers(kind, image.color, image.shape, rng)
        right_r, wrong_r = _mc_rationales(kind, image.color, image.shape, rng)
        candidates, rationales = [right, *wrong], [right_r, *wrong_r]
        rng.shuffle(candidates)
        rng.shuffle(rationales)
        item = ChoiceSample(
            image=image.path,
            id=f"{split}-{image.image_id}",
            attributes=_attributes(image),
            origin=f"easy-vqa {split} image {image.image_id}",
            question=question,
            candidates=candidates,
            answer_index=candidates.index(right),
            rationales=rationales,
            rationale_index=rationales.index(right_r),
        )
        return [item]

    samples = _generated(split, limit, seed, "mc", make)
    dataset = TaskDataset(samples, "multiple_choice", preload=True, source=f"easy-vqa/{split}/multiple_choice")
    return dataset if rationales else dataset.without_rationales()


def _mc_answers(kind: str, color: str, shape: str, rng: random.Random) -> tuple[str, list[str]]:
    """The right answer and three distinct wrong ones."""
    if kind == "colour":
        return color, rng.sample([c for c in COLORS if c != color], 3)
    if kind == "shape":
        return shape, [*(s for s in SHAPES if s != shape), rng.choice(_FAKE_SHAPES)]
    other_color = rng.sample([c for c in COLORS if c != color], 2)
    other_shape = rng.sample([s for s in SHAPES if s != shape], 2)
    pairs = [(color, other_shape[0]), (other_color[0], shape), (other_color[1], other_shape[1])]
    return f"a {color} {shape}", [f"a {c} {s}" for c, s in pairs]


def _mc_rationales(kind: str, color: str, shape: str, rng: random.Random) -> tuple[str, list[str]]:
    """The rationale true of the image for this question type, and three false ones."""
    other_facts = [s for s in _SHAPE_FACTS if s != shape]
    if kind == "colour":
        return f"Because it is filled with {color}.", [
            f"Because it is filled with {c}." for c in rng.sample([c for c in COLORS if c != color], 3)
        ]
    if kind == "shape":
        return f"Because it {_SHAPE_FACTS[shape]}.", [
            f"Because it {_SHAPE_FACTS[s]}." for s in rng.sample(other_facts, 3)
        ]
    other_color = rng.sample([c for c in COLORS if c != color], 2)
    other_shape = rng.sample(other_facts, 2)
    pairs = [(color, other_shape[0]), (other_color[0], shape), (other_color[1], other_shape[1])]
    return f"Because it is filled with {color} and {_SHAPE_FACTS[shape]}.", [
        f"Because it is filled with {c} and {_SHAPE_FACTS[s]}." for c, s in pairs
    ]
