"""One entry point from a data spec string to labelled data: ``bundled:NAME``, a manifest, or ``hf:NAME``.

Bundled datasets are registered in :data:`DATASETS` (``vldistill info`` lists them); adding one is one decorated
function returning :class:`LabelledData`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..evaluation import EvalSet
from ..registry import Registry
from .easyvqa import load_easyvqa
from .pairs import DataError, PairDataset, load_hf_dataset, load_manifest

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
) -> LabelledData:
    """Resolve a data spec (see ``DataConfig.train``) to labelled data."""
    if spec.startswith("bundled:"):
        name = spec.removeprefix("bundled:")
        try:
            factory = DATASETS.get(name)
        except KeyError as err:
            raise DataError(str(err.args[0])) from None
        data = factory(split=split, languages=list(languages or ("en", "zh")), limit=limit)
    else:
        if spec.startswith("hf:"):
            dataset = load_hf_dataset(
                spec.removeprefix("hf:"), split=split, columns=columns or None, languages=languages, skip_bad=skip_bad
            )
        elif Path(spec).suffix.lower() in (".jsonl", ".csv", ".tsv"):
            dataset = load_manifest(spec, image_root=image_root, languages=languages, skip_bad=skip_bad)
        else:
            raise DataError(f"data spec {spec!r}: expected bundled:NAME, a .jsonl/.csv manifest, or hf:NAME_OR_PATH")
        if skip_bad and dataset.skipped:
            print(dataset.summary(), flush=True)
        if limit is not None and limit < len(dataset):
            dataset = PairDataset(dataset.samples[:limit], languages=dataset.languages, source=dataset.source)
        data = LabelledData(dataset)
    if classnames:
        data.classnames = classnames
    if templates:
        data.templates = templates
    return data
