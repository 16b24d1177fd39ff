"""One entry point from a data spec string to labelled data: ``bundled:NAME``, a manifest, or ``hf:NAME``; and
:func:`load_stream` for training sources read as a stream (webdataset tar shards, streaming ``hf:`` datasets).

Bundled datasets are registered in :data:`DATASETS` (``vldistill info`` lists them); adding one is one decorated
function returning :class:`LabelledData` (image-caption pairs) or a :class:`~vldistill.data.tasks.TaskDataset`
(VQA, entailment, multiple choice). :func:`load_data` returns either; :func:`load_task_data` reads task data of
one kind from a bundled name, a JSONL manifest or ``hf:NAME``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..evaluation import EvalSet
from ..registry import Registry
from .easyvqa import load_easyvqa
from .easyvqa_tasks import easyvqa_entailment, easyvqa_mc, easyvqa_vqa
from .hf import HfStream
from .pairs import DataError, PairDataset, load_hf_dataset, load_manifest
from .streaming import ShardStream
from .tasks import TaskDataset, load_task_hf, load_task_manifest
from .webdataset import TarPairs, TarStream, is_tar_spec

DATASETS = Registry("dataset")

DEFAULT_TEMPLATES = {"en": ["a photo of a {}."], "zh": ["一张{}的照片。"]}


@dataclass
class LabelledData:
    """A dataset with what zero-shot evaluation needs besides the images.

    Attributes:
        dataset: the image-caption pairs (labels index into ``classnames``).
        classnames: language -> class names (empty when the data has no classes).
        templates: language -> prompt templates with ``{}``.
    """

    dataset: PairDataset
    classnames: dict[str, list[str]] = field(default_factory=dict)
    templates: dict[str, list[str]] = field(default_factory=dict)

    def eval_set(self, languages: Sequence[str] | None = None) -> EvalSet:
        """Images, labels, class names, templates and one caption per image, for ``evaluation.evaluate``."""
        ds = self.dataset
        languages = [lang for lang in (languages or ds.languages) if lang in ds.languages]
        items = [ds[i] for i in range(len(ds))]
        has_labels = all(item["label"] >= 0 for item in items)
        classnames = {lang: names for lang, names in self.classnames.items() if lang in languages} if has_labels else {}
        return EvalSet(
            images=[item["image"] for item in items],
            labels=torch.tensor([max(item["label"], 0) for item in items]),
            classnames=classnames,
            templates={lang: self.templates.get(lang, DEFAULT_TEMPLATES.get(lang, ["{}"])) for lang in classnames},
            captions={lang: [item["captions"][lang] for item in items] for lang in languages},
        )


@DATASETS.register("easyvqa")
def easyvqa(split: str, languages: Sequence[str], limit: int | None = None, seed: int = 0) -> LabelledData:
    """easy-VQA (PyPI): 64x64 images of one coloured shape, captions in English and Chinese derived from its own
    question-answer labels, 24 classes (colour x shape), its own train (4000) / test (1000) split."""
    bundled = load_easyvqa(split=split, languages=languages, limit=limit, seed=seed)
    return LabelledData(getattr(bundled, split), bundled.classnames, bundled.templates)


def _english_only(name: str, languages: Sequence[str] | None) -> None:
    if languages is not None and "en" not in languages:
        raise DataError(f"bundled:{name} is English only; languages {list(languages)} do not include 'en'")


@DATASETS.register("easyvqa-vqa")
def easyvqa_vqa_data(split: str, limit: int | None = None, seed: int = 0, **kw: Any) -> TaskDataset:
    """easy-VQA's own questions and 13 answers as VQA (English), question types yes_no/colour/shape, its own split
    (38,575 / 9,673 questions); the answer vocabulary is always the training split's."""
    _english_only("easyvqa-vqa", kw.pop("languages", None))
    return easyvqa_vqa(split, limit=limit, seed=seed, **kw)


@DATASETS.register("easyvqa-entailment")
def easyvqa_entailment_data(split: str, limit: int | None = None, seed: int = 0, **kw: Any) -> TaskDataset:
    """Visual entailment on easy-VQA images (English): per image one entailed, one neutral and one contradicted
    hypothesis derived from its colour and shape (``per_class=`` for more), its own split."""
    _english_only("easyvqa-entailment", kw.pop("languages", None))
    return easyvqa_entailment(split, limit=limit, seed=seed, **kw)


@DATASETS.register("easyvqa-mc")
def easyvqa_mc_data(split: str, limit: int | None = None, seed: int = 0, **kw: Any) -> TaskDataset:
    """Multiple choice on easy-VQA images (English): per image one question with 4 candidate answers and 4 candidate
    rationales, its own split."""
    _english_only("easyvqa-mc", kw.pop("languages", None))
    return easyvqa_mc(split, limit=limit, seed=seed, **kw)


def load_data(
    spec: str,
    split: str = "train",
    languages: Sequence[str] | None = None,
    limit: int | None = None,
    image_root: str | None = None,
    columns: dict[str, str] | None = None,
    skip_bad: bool = False,
    classnames: dict[str, list[str]] | None = None,
    templates: dict[str, list[str]] | None = None,
    image_root_only: bool = False,
) -> LabelledData | TaskDataset:
    """Resolve a data spec (see ``DataConfig.train``) to labelled data.

    A ``bundled:`` name whose factory returns task data (``bundled:easyvqa-vqa``, ``-entailment``, ``-mc``) is
    returned as that :class:`~vldistill.data.tasks.TaskDataset`; :func:`load_task_data` reads task data from any
    source."""
    if spec.startswith("bundled:"):
        name = spec.removeprefix("bundled:")
        try:
            factory = DATASETS.get(name)
        except KeyError as err:
            raise DataError(str(err.args[0])) from None
        data = factory(split=split, languages=list(languages or ("en", "zh")), limit=limit)
        if isinstance(data, TaskDataset):
            return data
    else:
        if spec.startswith("hf:"):
            dataset = load_hf_dataset(
                spec.removeprefix("hf:"),
                split=split,
                columns=columns or None,
                languages=languages,
                skip_bad=skip_bad,
                image_root_only=image_root_only,
            )
        elif is_tar_spec(spec):  # webdataset tar shards: read by offset, images decoded per item
            dataset = TarPairs(spec, language=(list(languages) if languages else ["en"])[0], limit=limit)
        elif Path(spec).suffix.lower() in (".jsonl", ".csv", ".tsv"):
            dataset = load_manifest(
                spec, image_root=image_root, languages=languages, skip_bad=skip_bad, image_root_only=image_root_only
            )
        else:
            raise DataError(
                f"data spec {spec!r}: expected bundled:NAME, a .jsonl/.csv manifest, hf:NAME_OR_PATH, or webdataset "
                "tar shards (wds:PATH, PATH.tar, {00000..00099}.tar)"
            )
        if skip_bad and getattr(dataset, "skipped", 0):
            print(dataset.summary(), flush=True)
        if limit is not None and limit < len(dataset) and isinstance(dataset, PairDataset):
            dataset = PairDataset(dataset.samples[:limit], languages=dataset.languages, source=dataset.source)
        data = LabelledData(dataset)
    if classnames:
        data.classnames = classnames
    if templates:
        data.templates = templates
    return data


def streams(spec: str, streaming: bool | None) -> bool:
    """Whether training reads ``spec`` as a stream (``data.streaming``): by default (``None``) webdataset tar shards
    are streamed and everything else is read map-style; ``True`` also streams ``hf:`` datasets, and is refused for
    bundled data and manifests (held in memory anyway)."""
    if streaming is None:
        return is_tar_spec(spec)
    if streaming and not (is_tar_spec(spec) or spec.startswith("hf:")):
        raise DataError(
            f"data.streaming: true: {spec!r} cannot be streamed; webdataset tar shards (wds:PATTERN) and hf: datasets "
            "can (bundled data and manifests are read into memory)"
        )
    return streaming


def load_stream(
    spec: str,
    split: str = "train",
    languages: Sequence[str] | None = None,
    columns: dict[str, str] | None = None,
    shuffle_buffer: int = 1000,
    image_root: str | None = None,
    image_root_only: bool = False,
) -> LabelledData:
    """Training data read as a stream (:mod:`vldistill.data.streaming`): :class:`~vldistill.data.webdataset.TarStream`
    for tar shards, :class:`~vldistill.data.hf.HfStream` for ``hf:NAME_OR_PATH``. Only image-caption pairs stream."""
    stream: ShardStream
    if is_tar_spec(spec):
        langs = list(languages or ["en"])
        if len(langs) > 1:
            raise DataError(f"data spec {spec!r}: tar shards hold captions in one language, the run asks for {langs}")
        stream = TarStream(spec, language=langs[0], shuffle_buffer=shuffle_buffer)
    elif spec.startswith("hf:"):
        stream = HfStream(
            spec.removeprefix("hf:"),
            split=split,
            columns=columns or None,
            languages=languages,
            shuffle_buffer=shuffle_buffer,
            image_root=image_root,
            image_root_only=image_root_only,
        )
    else:
        raise DataError(f"data spec {spec!r}: only webdataset tar shards (wds:PATTERN) and hf: datasets stream")
    return LabelledData(stream)


def load_task_data(
    spec: str,
    kind: str,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    image_root: str | None = None,
    columns: dict[str, str] | None = None,
    skip_bad: bool = False,
    answers: Sequence[str] | None = None,
    image_root_only: bool = False,
) -> TaskDataset:
    """Resolve a data spec to task data of one kind (``"vqa"``, ``"entailment"``, ``"multiple_choice"``).

    Args:
        spec: ``bundled:NAME`` (e.g. ``bundled:easyvqa-vqa``), a ``.jsonl`` manifest, or ``hf:NAME_OR_PATH``.
        kind: the task kind; a bundled dataset of another kind is an error.
        split: split of bundled and ``hf:`` data.
        limit: keep only the first this many items (bundled: of images in a seeded order).
        seed: seeds bundled data.
        image_root: directory that relative image paths in a manifest are resolved against.
        columns: column mapping for ``hf:`` data.
        skip_bad: skip bad rows (their count is printed) instead of failing.
        answers: VQA answer vocabulary, e.g. the training set's ``answers`` for an evaluation set.
        image_root_only: refuse image paths that resolve outside the image root (``data.image_root_only``).
    """
    if spec.startswith("bundled:"):
        name = spec.removeprefix("bundled:")
        try:
            factory = DATASETS.get(name)
        except KeyError as err:
            raise DataError(str(err.args[0])) from None
        extra = {"answers": list(answers)} if answers is not None and kind == "vqa" else {}
        dataset = factory(split=split, languages=["en"], limit=limit, seed=seed, **extra)
        if not isinstance(dataset, TaskDataset) or dataset.kind != kind:
            got = dataset.kind if isinstance(dataset, TaskDataset) else "image-caption pairs"
            raise DataError(f"data spec {spec!r} holds {got} data, not {kind!r}")
        return dataset
    if spec.startswith("hf:"):
        dataset = load_task_hf(
            spec.removeprefix("hf:"),
            kind,
            split=split,
            columns=columns,
            skip_bad=skip_bad,
            answers=answers,
            image_root_only=image_root_only,
        )
    elif Path(spec).suffix.lower() in (".jsonl", ".ndjson"):
        dataset = load_task_manifest(
            spec, kind, image_root=image_root, skip_bad=skip_bad, answers=answers, image_root_only=image_root_only
        )
    else:
        raise DataError(f"task data spec {spec!r}: expected bundled:NAME, a .jsonl manifest, or hf:NAME_OR_PATH")
    if skip_bad and dataset.skipped:
        print(dataset.summary(), flush=True)
    if limit is not None and limit < len(dataset):
        dataset = dataset.subset(range(limit))
    return dataset
