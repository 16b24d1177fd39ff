"""Samples of three task kinds besides image-caption pairs: visual question answering, visual entailment and
multiple choice.

A :class:`TaskDataset` holds samples of one kind (:class:`VQASample`, :class:`EntailmentSample` or
:class:`ChoiceSample`) and checks them as :class:`~vldistill.data.pairs.PairDataset` checks pairs: every image is
opened and fully decoded once at construction (each distinct image file once, however many questions share it),
every text must be non-empty, every label or index in range, so that bad data fails before training with a message
naming the file, the row and what was expected. With ``skip_bad=True`` bad samples are dropped and counted instead.

Items are dicts with fixed keys per kind (see :meth:`TaskDataset.__getitem__`). For VQA the dataset also holds an
answer vocabulary (:attr:`TaskDataset.answers`): the training target of a question is its most frequent reference
answer and ``answer_index`` is that answer's position in the vocabulary. An evaluation set is loaded with the
training vocabulary (``answers=train.answers``) so that the indices agree.

Multiple choice follows VCR: an item with rationales is two candidate-scoring problems, Q->A and QA->R (the question
with the right answer, the rationales as candidates). :meth:`TaskDataset.rationale_samples` gives the training
samples (both per item, so one head learns both); evaluation keeps the items and scores QA->R given the right answer
(:func:`rationale_item`). :meth:`TaskDataset.without_rationales` (``data.rationales: false``) keeps Q->A only.

Sources: :func:`load_task_manifest` reads a JSONL manifest with one row per item, :func:`load_task_hf` a Hugging
Face dataset (the same conventions as :func:`~vldistill.data.hf.load_hf_dataset`); both live in
:mod:`vldistill.data.task_loaders` and are re-exported here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from PIL import Image
from torch.utils.data import Dataset

from vldistill.data.pairs import CheckedRows, DataError, PairDataset, Sample, decode_image, image_at

__all__ = [
    "DEFAULT_QUESTION_TYPE",
    "ENTAILMENT_LABELS",
    "TASK_KINDS",
    "ChoiceSample",
    "EntailmentSample",
    "TaskDataset",
    "TaskSample",
    "VQASample",
    "answer_vocabulary",
    "load_task_hf",
    "load_task_manifest",
    "rationale_item",
    "target_answer",
]

TASK_KINDS = ("vqa", "entailment", "multiple_choice")
ENTAILMENT_LABELS = ("entailment", "neutral", "contradiction")
DEFAULT_QUESTION_TYPE = "other"
_LABELS_EXPECTED = "expected one of 'entailment', 'neutral', 'contradiction', or 0, 1, 2"


# ---------------------------------------------------------------------------------------------------------------
# Samples.


@dataclass(kw_only=True)
class TaskSample:
    """What every task sample has: an image, an id and optional attributes.

    Attributes:
        image: image file path (absolute after loading), or a name such as ``"data:train[3]"`` when the image is
            held in memory in ``data``.
        id: item id (default: the row number in its source).
        attributes: facts about the image, e.g. ``{"color": "red", "shape": "circle"}``; domain-shift splits by
            held-out attribute combinations need them (:mod:`vldistill.data.splits`).
        data: the image itself when it lives in memory: encoded bytes or a PIL image.
        origin: where the sample came from, e.g. ``"data/vqa.jsonl row 7"``; error messages start with it.
    """

    image: str
    id: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    data: bytes | Image.Image | None = field(default=None, repr=False, compare=False)
    origin: str = ""

    kind: ClassVar[str] = ""

    @property
    def text(self) -> str:
        """The item's text that phrasing-based splits match: the question, or the hypothesis."""
        raise NotImplementedError


@dataclass(kw_only=True)
class VQASample(TaskSample):
    """A question about an image with its reference answers (several annotators may give several answers)."""

    question: str
    answers: list[str]
    question_type: str = DEFAULT_QUESTION_TYPE

    kind: ClassVar[str] = "vqa"

    @property
    def answer(self) -> str:
        """The training target: the most frequent reference answer, ties broken by first occurrence."""
        return target_answer(self.answers)

    @property
    def text(self) -> str:
        return self.question


@dataclass(kw_only=True)
class EntailmentSample(TaskSample):
    """An image (the premise) and a hypothesis; ``label`` indexes :data:`ENTAILMENT_LABELS`."""

    hypothesis: str
    label: int

    kind: ClassVar[str] = "entailment"

    @property
    def text(self) -> str:
        return self.hypothesis


@dataclass(kw_only=True)
class ChoiceSample(TaskSample):
    """A question with candidate answers and optionally candidate rationales (as in VCR: Q->A, QA->R).

    An item with rationales holds two candidate-scoring problems (:meth:`split_rationales`): Q->A (the question, the
    candidate answers) and QA->R (the question with the right answer, the candidate rationales).

    Attributes:
        answer_index: index of the right candidate.
        rationales: candidate rationales for the right answer; empty if none.
        rationale_index: index of the right rationale; -1 if there are no rationales.
    """

    question: str
    candidates: list[str]
    answer_index: int
    rationales: list[str] = field(default_factory=list)
    rationale_index: int = -1

    kind: ClassVar[str] = "multiple_choice"

    @property
    def text(self) -> str:
        return self.question

    def split_rationales(self) -> tuple[ChoiceSample, ChoiceSample | None]:
        """The item as its Q->A sample and its QA->R sample (None without rationales), neither with rationales.

        QA->R (VCR's protocol: the rationale is chosen given the right answer): question ``question + " " +
        right answer``, candidates the rationales, ``answer_index`` the right rationale; its id and origin end in
        ``" QA->R"``. Both are ordinary candidate-scoring samples: a student and a teacher read them alike.
        """
        q2a = replace(self, rationales=[], rationale_index=-1)
        if not self.rationales:
            return q2a, None
        qa2r = replace(
            q2a,
            id=f"{self.id} QA->R" if self.id else "",
            origin=f"{self.origin} QA->R" if self.origin else "",
            question=_qa2r_question(self.question, self.candidates, self.answer_index),
            candidates=list(self.rationales),
            answer_index=self.rationale_index,
        )
        return q2a, qa2r


def _qa2r_question(question: str, candidates: Sequence[str], answer_index: int) -> str:
    """The query of a QA->R sample: the question and the right answer (the text ``teacher_texts`` puts before each
    rationale)."""
    return f"{question} {candidates[answer_index]}"


def rationale_item(item: Mapping[str, Any]) -> dict[str, Any]:
    """The QA->R sample of a multiple-choice item dict (``TaskDataset[i]``) as an item dict of its own: question +
    right answer, the rationales as candidates, the right rationale as ``answer_index``.

    Raises:
        ValueError: the item has no rationales.
    """
    rationales = list(item.get("rationales") or [])
    if not rationales:
        raise ValueError(f"multiple-choice item {item.get('index')!r} has no rationales: it has no QA->R sample")
    question = _qa2r_question(item["question"], item["candidates"], item["answer_index"])
    return {
        **item,
        "question": question,
        "candidates": rationales,
        "answer_index": item.get("rationale_index", -1),
        "rationales": [],
        "rationale_index": -1,
    }


_SAMPLE_TYPES: dict[str, type[TaskSample]] = {
    "vqa": VQASample,
    "entailment": EntailmentSample,
    "multiple_choice": ChoiceSample,
}


def target_answer(answers: Sequence[str]) -> str:
    """The most frequent of the reference answers, ties broken by first occurrence."""
    counts = Counter(answers)  # insertion-ordered, and max() keeps the first of equal counts
    return max(counts, key=counts.__getitem__)


def answer_vocabulary(samples: Iterable[VQASample]) -> list[str]:
    """Every reference answer of the samples, most frequent first, ties in alphabetical order."""
    counts = Counter(answer for sample in samples for answer in sample.answers)
    return sorted(counts, key=lambda answer: (-counts[answer], answer))


def _check_kind(kind: str, source: str) -> None:
    if kind not in TASK_KINDS:
        raise DataError(f"{source or 'dataset'}: kind {kind!r} is not one of {', '.join(TASK_KINDS)}")


# ---------------------------------------------------------------------------------------------------------------
# Checking samples.


def _text_problem(value: Any, name: str) -> str | None:
    if not isinstance(value, str):
        return f"{name} is {type(value).__name__} {value!r:.60} (expected a non-empty string)"
    if not value.strip():
        return f"empty {name} (expected a non-empty string)"
    return None


def _texts_problem(values: Any, name: str, minimum: int) -> str | None:
    if not isinstance(values, list | tuple):
        return f"{name} is {type(values).__name__} {values!r:.60} (expected a list of strings)"
    if len(values) < minimum:
        return f"{len(values)} {name} (expected at least {minimum})"
    return next((p for i, v in enumerate(values) if (p := _text_problem(v, f"{name}[{i}]"))), None)


def _index_problem(value: Any, name: str, n: int, what: str) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        return f"{name} {value!r} is out of range (expected an index 0..{n - 1} into the {n} {what})"
    return None


def _common_problem(sample: Any, kind: str) -> str | None:
    expected = _SAMPLE_TYPES[kind]
    if not isinstance(sample, expected):
        return f"got a {type(sample).__name__}, expected {expected.__name__} for kind {kind!r}"
    attributes = sample.attributes
    if not isinstance(attributes, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
    ):
        return f"attributes {attributes!r:.80} (expected a mapping of strings to strings)"
    return None


def _vqa_problem(sample: VQASample, vocabulary: Mapping[str, int] | None) -> str | None:
    problem = (
        _text_problem(sample.question, "question")
        or _texts_problem(sample.answers, "answers", 1)
        or _text_problem(sample.question_type, "question_type")
    )
    target = target_answer([answer.strip() for answer in sample.answers]) if problem is None else ""
    if problem is None and vocabulary is not None and target not in vocabulary:
        some = ", ".join(repr(a) for a in list(vocabulary)[:5])
        problem = (
            f"answer {target!r} is not in the answer vocabulary "
            f"(expected one of its {len(vocabulary)} answers: {some}{', ...' if len(vocabulary) > 5 else ''})"
        )
    return problem


def _entailment_problem(sample: EntailmentSample, vocabulary: Mapping[str, int] | None) -> str | None:
    label = sample.label
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(ENTAILMENT_LABELS):
        return f"label {label!r} is out of range ({_LABELS_EXPECTED})"
    return _text_problem(sample.hypothesis, "hypothesis")


def _choice_problem(sample: ChoiceSample, vocabulary: Mapping[str, int] | None) -> str | None:
    problem = _text_problem(sample.question, "question") or _texts_problem(sample.candidates, "candidates", 2)
    problem = problem or _index_problem(sample.answer_index, "answer", len(sample.candidates), "candidates")
    if problem is not None:
        return problem
    if not sample.rationales:
        if sample.rationale_index != -1:
            return f"rationale {sample.rationale_index!r} given but no rationales (expected -1, or a rationales list)"
        return None
    return _texts_problem(sample.rationales, "rationales", 2) or _index_problem(
        sample.rationale_index, "rationale", len(sample.rationales), "rationales"
    )


_CONTENT_CHECKS: dict[str, Callable[[Any, Mapping[str, int] | None], str | None]] = {
    "vqa": _vqa_problem,
    "entailment": _entailment_problem,
    "multiple_choice": _choice_problem,
}


def _normalised(sample: TaskSample) -> TaskSample:
    """The sample with surrounding whitespace stripped from its texts and its lists copied."""
    if isinstance(sample, VQASample):
        return replace(
            sample,
            question=sample.question.strip(),
            answers=[a.strip() for a in sample.answers],
            question_type=sample.question_type.strip(),
        )
    if isinstance(sample, EntailmentSample):
        return replace(sample, hypothesis=sample.hypothesis.strip())
    assert isinstance(sample, ChoiceSample)
    return replace(
        sample,
        question=sample.question.strip(),
        candidates=[c.strip() for c in sample.candidates],
        rationales=[r.strip() for r in sample.rationales],
    )


@dataclass
class _Rejected:
    """A row that could not even be read into a sample; ``reason`` names the row and the problem."""

    reason: str


# ---------------------------------------------------------------------------------------------------------------
# The dataset.


class TaskDataset(CheckedRows, Dataset):
    """Samples of one task kind, checked up front.

    Items (``dataset[i]``) are dicts with these keys:

    - ``"vqa"``: ``index``, ``image`` (PIL RGB), ``kind``, ``question``, ``answers`` (all reference answers),
      ``answer`` (the most frequent one, the training target), ``answer_index`` (its index in :attr:`answers`, -1 if
      absent), ``question_type``.
    - ``"entailment"``: ``index``, ``image``, ``kind``, ``hypothesis``, ``label`` (index into
      :data:`ENTAILMENT_LABELS`).
    - ``"multiple_choice"``: ``index``, ``image``, ``kind``, ``question``, ``candidates``, ``answer_index``,
      ``rationales`` (empty if none), ``rationale_index`` (-1 if none).

    With ``preload`` the decoded images are kept (one object per distinct image file) and returned on every access:
    transforms must not modify them in place.

    Attributes:
        kind: ``"vqa"``, ``"entailment"`` or ``"multiple_choice"``.
        answers: VQA answer vocabulary (empty for the other kinds).
        samples: the kept samples, texts stripped.
        skipped: how many input samples were dropped as bad (``skip_bad=True`` only).
        skipped_reasons: one message per dropped sample, each naming the file or row and the problem.
        total: how many samples there were before dropping.
        source: name of where the samples came from, used in messages.
    """

    def __init__(
        self,
        samples: Sequence[TaskSample],
        kind: str | None = None,
        answers: Sequence[str] | None = None,
        skip_bad: bool = False,
        preload: bool = False,
        source: str = "",
    ):
        """Checks the samples and optionally decodes and keeps their images.

        Args:
            samples: the samples, all of ``kind``; they are not modified.
            kind: the task kind; None takes the first sample's.
            answers: VQA answer vocabulary; a sample whose target answer is not in it is bad. None builds it from
                the kept samples' reference answers (:func:`answer_vocabulary`).
            skip_bad: drop bad samples (and count them) instead of raising.
            preload: keep the decoded RGB images in memory.
            source: name of the origin (a file, a dataset), used in messages for samples without ``origin``.

        Raises:
            DataError: a sample is bad (without ``skip_bad``), the kind or vocabulary is invalid, or no sample is left.
        """
        self._setup(samples, kind, answers, skip_bad, preload, source)

    @classmethod
    def _from_entries(
        cls,
        entries: Sequence[TaskSample | _Rejected],
        kind: str,
        source: str,
        answers: Sequence[str] | None,
        skip_bad: bool,
        preload: bool,
    ) -> TaskDataset:
        """A dataset from parsed rows, rows that could not be read rejected (or counted) in their place."""
        dataset = cls.__new__(cls)
        dataset._setup(entries, kind, answers, skip_bad, preload, source)
        return dataset

    def _setup(
        self,
        entries: Sequence[TaskSample | _Rejected],
        kind: str | None,
        answers: Sequence[str] | None,
        skip_bad: bool,
        preload: bool,
        source: str,
    ) -> None:
        first = next((s for s in entries if isinstance(s, TaskSample)), None)
        kind = kind if kind is not None else (first.kind if first is not None else "")
        _check_kind(kind, source)
        self.kind = kind
        self._start_rows(source, len(entries))
        vocabulary = self._given_vocabulary(answers)
        kept, images = self._check(entries, vocabulary, skip_bad, preload)
        if not kept:
            raise self._none_left()
        self.samples: list[TaskSample] = kept
        if vocabulary is not None:
            self.answers = list(vocabulary)
        else:
            self.answers = answer_vocabulary(kept) if kind == "vqa" else []  # type: ignore[arg-type]
        self._answer_index = {answer: i for i, answer in enumerate(self.answers)}
        self._images: list[Image.Image] | None = images if preload else None

    def _given_vocabulary(self, answers: Sequence[str] | None) -> dict[str, int] | None:
        if answers is None:
            return None
        name = self.source or "dataset"
        if isinstance(answers, str) or not all(isinstance(a, str) and a.strip() for a in answers):
            raise DataError(f"{name}: answers must be a list of non-empty strings, got {answers!r:.80}")
        if len(set(answers)) != len(answers):
            repeated = [a for a, n in Counter(answers).items() if n > 1]
            raise DataError(f"{name}: the answer vocabulary repeats {repeated[:5]} (expected distinct answers)")
        if answers and self.kind != "vqa":
            raise DataError(f"{name}: an answer vocabulary is only for kind 'vqa', not {self.kind!r}")
        return {answer: i for i, answer in enumerate(answers)}

    def _check(
        self,
        entries: Sequence[TaskSample | _Rejected],
        vocabulary: Mapping[str, int] | None,
        skip_bad: bool,
        preload: bool,
    ) -> tuple[list[TaskSample], list[Image.Image]]:
        """Checks the content of every sample, then decodes each distinct image once, then keeps or rejects in order.

        Multiple-choice items must all have as many candidates (and rationales, where given) as the first valid one.
        """
        problems: list[str | None] = []
        jobs: dict[Any, int] = {}  # decode key -> index into `to_decode`
        to_decode: list[Sample] = []
        keys: list[Any] = []
        for i, entry in enumerate(entries):
            if isinstance(entry, _Rejected):
                problems.append(entry.reason)
                keys.append(None)
                continue
            problem = _common_problem(entry, self.kind) or _CONTENT_CHECKS[self.kind](entry, vocabulary)
            problems.append(None if problem is None else f"{self._where(i, entry)}: {problem}")
            key = None
            if problem is None:
                # One decode per distinct file; in-memory images are decoded one by one.
                key = ("file", entry.image) if entry.data is None else ("row", i)
                if key not in jobs:
                    jobs[key] = len(to_decode)
                    to_decode.append(Sample(entry.image, {}, data=entry.data))
            keys.append(key)
        decoded = list(PairDataset._decode_all(to_decode, preload))
        return self._keep(entries, problems, [None if k is None else decoded[jobs[k]] for k in keys], skip_bad)

    def _keep(
        self,
        entries: Sequence[TaskSample | _Rejected],
        problems: list[str | None],
        decoded: list[Image.Image | DataError | None],
        skip_bad: bool,
    ) -> tuple[list[TaskSample], list[Image.Image]]:
        kept: list[TaskSample] = []
        images: list[Image.Image] = []
        counts: dict[str, int] = {}  # multiple choice: "candidates"/"rationales" -> count of the first valid item
        for i, (entry, problem, image) in enumerate(zip(entries, problems, decoded, strict=True)):
            if problem is None and isinstance(image, DataError):
                problem = f"{self._where(i, entry)}: {image}"
            if problem is None and isinstance(entry, ChoiceSample):
                problem = _count_problem(entry, counts)
                problem = None if problem is None else f"{self._where(i, entry)}: {problem}"
            if problem is not None:
                self._reject(problem, skip_bad)
                continue
            assert isinstance(entry, TaskSample)
            if isinstance(entry, ChoiceSample):
                counts.setdefault("candidates", len(entry.candidates))
                if entry.rationales:
                    counts.setdefault("rationales", len(entry.rationales))
            kept.append(_normalised(entry))
            if isinstance(image, Image.Image):
                images.append(image)
        return kept, images

    def _noun(self) -> str:
        return f"{self.kind} samples"

    def subset(self, indices: Iterable[int]) -> TaskDataset:
        """The items at ``indices`` (in that order), with the same answer vocabulary; no image is decoded again.

        Raises:
            IndexError: an index is out of range.
            ValueError: no index is given.
        """
        picks = [range(len(self.samples))[i] for i in indices]  # normalises negative indices, raises IndexError
        if not picks:
            raise ValueError(f"{self.source or 'dataset'}: a subset needs at least one index")
        images = [self._images[i] for i in picks] if self._images is not None else None
        return self._derived([self.samples[i] for i in picks], images, self.source)

    def _derived(self, samples: list[TaskSample], images: list[Image.Image] | None, source: str) -> TaskDataset:
        """A dataset of already checked samples (no check, no decoding), with this one's vocabulary."""
        new = TaskDataset.__new__(TaskDataset)
        new.kind, new.source, new.answers = self.kind, source, list(self.answers)
        new.skipped, new.skipped_reasons, new.total = 0, [], len(samples)
        new.samples = samples
        new._answer_index = dict(self._answer_index)
        new._images = images
        return new

    def has_rationales(self) -> bool:
        """Whether any item holds rationales (multiple choice: QA->R and Q->AR can be trained and measured)."""
        return any(isinstance(s, ChoiceSample) and s.rationales for s in self.samples)

    def without_rationales(self) -> TaskDataset:
        """Multiple choice: the same items without their rationales (Q->A only: ``data.rationales: false``); any
        other dataset unchanged."""
        if not self.has_rationales():
            return self
        samples = [replace(s, rationales=[], rationale_index=-1) for s in self.samples]  # type: ignore[call-arg]
        return self._derived(samples, self._images, self.source)

    def rationale_samples(self) -> TaskDataset:
        """The training samples of a multiple-choice dataset with rationales: per item its Q->A sample, then its
        QA->R sample (:meth:`ChoiceSample.split_rationales`), both without rationales, so every sample has the same
        text fields and one head scores both (an item without rationales gives its Q->A sample alone). Images are
        shared, not decoded again. Any other dataset (and one without rationales) is returned unchanged, so calling
        this twice changes nothing.

        Raises:
            DataError: the items have another number of rationales than of candidates (naming the first such item):
                a batch of candidate-scoring samples has one number of candidates.
        """
        if not self.has_rationales():
            return self
        samples: list[TaskSample] = []
        keep: list[int] = []
        for i, sample in enumerate(self.samples):
            assert isinstance(sample, ChoiceSample)
            if sample.rationales and len(sample.rationales) != len(sample.candidates):
                raise DataError(
                    f"{self._where(i, sample)}: {len(sample.rationales)} rationales but {len(sample.candidates)} "
                    "candidates; training on QA->R samples beside Q->A ones needs as many rationales as candidate "
                    "answers (one head scores both in the same batches); set data.rationales: false to train and "
                    "evaluate Q->A only"
                )
            for part in sample.split_rationales():
                if part is not None:
                    samples.append(part)
                    keep.append(i)
        images = [self._images[i] for i in keep] if self._images is not None else None
        return self._derived(samples, images, f"{self.source} (Q->A and QA->R samples)" if self.source else "")

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = range(len(self.samples))[index]  # normalises negative indices and raises IndexError
        sample = self.samples[index]
        image = image_at(self, index, sample, _decode)
        return {"index": index, "image": image, "kind": self.kind, **self._fields(sample)}

    def _fields(self, sample: TaskSample) -> dict[str, Any]:
        if isinstance(sample, VQASample):
            answer = sample.answer
            return {
                "question": sample.question,
                "answers": list(sample.answers),
                "answer": answer,
                "answer_index": self._answer_index.get(answer, -1),
                "question_type": sample.question_type,
            }
        if isinstance(sample, EntailmentSample):
            return {"hypothesis": sample.hypothesis, "label": sample.label}
        assert isinstance(sample, ChoiceSample)
        return {
            "question": sample.question,
            "candidates": list(sample.candidates),
            "answer_index": sample.answer_index,
            "rationales": list(sample.rationales),
            "rationale_index": sample.rationale_index,
        }

    def __repr__(self) -> str:
        vocab = f", {len(self.answers)} answers" if self.kind == "vqa" else ""
        return f"TaskDataset({len(self)} {self.kind} samples{vocab}, source={self.source!r})"


def _decode(sample: TaskSample) -> Image.Image:
    return decode_image(Sample(sample.image, {}, data=sample.data))


def _count_problem(sample: ChoiceSample, counts: Mapping[str, int]) -> str | None:
    """Whether a multiple-choice item has as many candidates (and rationales) as the first valid item."""
    for name, values in (("candidates", sample.candidates), ("rationales", sample.rationales)):
        expected = counts.get(name)
        if values and expected is not None and len(values) != expected:
            return (
                f"{len(values)} {name}, expected {expected} like the first valid item "
                f"(all items must have the same number of {name})"
            )
    return None


# The loaders live in vldistill.data.task_loaders, which builds on this module: imported last, after everything they
# take from here is defined, so that `from vldistill.data.tasks import load_task_hf` keeps working.
from vldistill.data.task_loaders import load_task_hf, load_task_manifest  # noqa: E402
