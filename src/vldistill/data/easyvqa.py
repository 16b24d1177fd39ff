"""The bundled dataset: easy-VQA images with English and Chinese captions and 24 zero-shot classes.

The `easy-vqa <https://pypi.org/project/easy-vqa/>`_ package ships 4000 train and 1000 test 64x64 images, each with
one shape (circle, rectangle, triangle) in one of eight colours on a light background, and questions about them.
It has no captions and no class labels, so both are derived here from its own question/answer pairs: "what shape is
in the image?" gives the shape, "what is the blue shape?" the shape and the colour, "is there not a red shape?" with
"no" the colour, and so on. Contradicting answers are an error.

easy-vqa's generator keeps each question about an image only with probability 0.32 (open questions) or 0.08 (yes/no),
so the questions leave the colour or shape of about one image in ten open (422 train, 112 test images). For those
the pixels decide, among the values the questions still allow: the colour is easy-vqa's exact palette colour, the
shape follows from how much of its bounding box it fills. On every image whose labels the questions do give, this
pixel reading agrees with them (a test checks it), so all 5000 images are kept.

Captions are short parallel sentences in English and Chinese, one per image, with the phrasing drawn per image from
a seeded generator. The phrasings differ from the zero-shot prompt templates, so zero-shot accuracy measures
more than string matching. Classes are colour x shape, colour-major: label ``3 * colour + shape``.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import NamedTuple

import easy_vqa
import numpy as np
from PIL import Image

from vldistill.data.pairs import DataError, PairDataset, Sample

__all__ = [
    "CAPTION_PHRASINGS",
    "CLASSNAMES",
    "COLORS",
    "COLORS_ZH",
    "SHAPES",
    "SHAPES_ZH",
    "TEMPLATES",
    "BundledData",
    "LabelledImage",
    "SplitLabels",
    "ZeroShotSet",
    "caption",
    "class_index",
    "image_labels",
    "load_easyvqa",
    "read_pixels",
]

SHAPES_ZH = {"circle": "圆形", "rectangle": "矩形", "triangle": "三角形"}
COLORS_ZH = {
    "red": "红色",
    "green": "绿色",
    "blue": "蓝色",
    "black": "黑色",
    "gray": "灰色",
    "teal": "青色",
    "brown": "棕色",
    "yellow": "黄色",
}
SHAPES = tuple(SHAPES_ZH)
COLORS = tuple(COLORS_ZH)
LANGUAGES = ("en", "zh")
SPLITS = ("train", "test")

# Class i is COLORS[i // 3] + SHAPES[i % 3], in the same order in both languages.
CLASSNAMES = {
    "en": [f"{color} {shape}" for color in COLORS for shape in SHAPES],
    "zh": [f"{COLORS_ZH[color]}{SHAPES_ZH[shape]}" for color in COLORS for shape in SHAPES],
}
TEMPLATES = {
    "en": [
        "a photo of a {}.",
        "a picture of a {}.",
        "an image of a {}.",
        "a rendering of a {}.",
        "a drawing of a {}.",
    ],
    "zh": [
        "一张{}的照片。",
        "一张{}的图片。",
        "{}的图像。",
        "一幅{}的渲染图。",
        "一幅{}的画。",
    ],
}
# Training captions: entry k of each language is a translation of entry k of the other ({c} colour, {s} shape).
CAPTION_PHRASINGS = {
    "en": [
        "a {c} {s}",
        "a {c} {s} on a light background",
        "a {s} that is {c}",
        "{c} {s}",
        "there is a {c} {s}",
        "a {c} {s} shape",
    ],
    "zh": [
        "一个{c}的{s}",
        "浅色背景上的一个{c}{s}",
        "一个{s}，颜色是{c}",
        "{c}{s}",
        "有一个{c}的{s}",
        "一个{c}{s}图形",
    ],
}


def class_index(color: str, shape: str) -> int:
    """Label of a colour-shape pair."""
    return COLORS.index(color) * len(SHAPES) + SHAPES.index(shape)


def caption(color: str, shape: str, phrasing: int, lang: str) -> str:
    """The caption of an image in one language, with the phrasing's index."""
    words = {"en": (color, shape), "zh": (COLORS_ZH[color], SHAPES_ZH[shape])}[lang]
    return CAPTION_PHRASINGS[lang][phrasing].format(c=words[0], s=words[1])


@dataclass(frozen=True)
class ZeroShotSet:
    """What a zero-shot classification evaluator needs for one language.

    Attributes:
        dataset: labelled images.
        classnames: class index -> name in ``language``.
        templates: prompt templates, each with one ``{}`` for the class name.
        language: language tag of the class names and templates.
    """

    dataset: PairDataset
    classnames: list[str]
    templates: list[str]
    language: str


@dataclass
class BundledData:
    """The bundled easy-VQA data.

    Attributes:
        train: 4000 images (fewer with ``limit``), None when only the test split was loaded.
        test: 1000 images (fewer with ``limit``), None when only the train split was loaded.
        classnames: language -> the 24 class names, aligned across languages.
        templates: language -> zero-shot prompt templates, each with one ``{}``.
    """

    train: PairDataset | None
    test: PairDataset | None
    classnames: dict[str, list[str]]
    templates: dict[str, list[str]]

    def eval_set(self, language: str = "en", split: str = "test") -> ZeroShotSet:
        """The zero-shot classification set of one split in one language."""
        dataset = getattr(self, split, None) if split in SPLITS else None
        if dataset is None:
            raise DataError(
                f"easy-vqa split {split!r} was not loaded; loaded: {[s for s in SPLITS if getattr(self, s)]}"
            )
        if language not in self.classnames:
            raise DataError(f"easy-vqa language {language!r} was not loaded; loaded: {list(self.classnames)}")
        return ZeroShotSet(dataset, self.classnames[language], self.templates[language], language)


def load_easyvqa(
    split: str | None = None,
    languages: Sequence[str] = LANGUAGES,
    limit: int | None = None,
    seed: int = 0,
) -> BundledData:
    """Loads the bundled easy-VQA data with decoded images in memory (about 60 MB for both splits).

    Args:
        split: "train" or "test" to load only that split (the other field is None); None loads both.
        languages: caption, class-name and template languages, a subset of ("en", "zh").
        limit: keep only this many images per split: the first ``limit`` after a shuffle seeded by ``seed``, so a
            smaller limit gives a subset of a larger one.
        seed: seeds the subset and the choice of caption phrasing per image.
    """
    languages = [languages] if isinstance(languages, str) else list(languages)
    unknown = [lang for lang in languages if lang not in LANGUAGES]
    if not languages or unknown or len(set(languages)) != len(languages):
        raise DataError(f"easy-vqa languages must be distinct tags from {LANGUAGES}, got {languages}")
    if split is not None and split not in SPLITS:
        raise DataError(f"easy-vqa split must be one of {SPLITS} or None, got {split!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DataError(f"easy-vqa limit must be a positive int or None, got {limit!r}")
    loaded = {name: _split_dataset(name, languages, limit, seed) for name in SPLITS if split in (None, name)}
    return BundledData(
        train=loaded.get("train"),
        test=loaded.get("test"),
        classnames={lang: list(CLASSNAMES[lang]) for lang in languages},
        templates={lang: list(TEMPLATES[lang]) for lang in languages},
    )


def _split_dataset(split: str, languages: Sequence[str], limit: int | None, seed: int) -> PairDataset:
    images = image_labels(split).images
    # Phrasings are drawn for all images in id order, so an image's caption does not depend on `limit`.
    phrasing_rng = random.Random(f"easyvqa-captions:{split}:{seed}")
    phrasings = [phrasing_rng.randrange(len(CAPTION_PHRASINGS["en"])) for _ in images]
    order = list(range(len(images)))
    if limit is not None:
        random.Random(f"easyvqa-subset:{split}:{seed}").shuffle(order)
        order = order[:limit]
    samples = []
    for i in order:
        image = images[i]
        captions = {lang: caption(image.color, image.shape, phrasings[i], lang) for lang in languages}
        label = class_index(image.color, image.shape)
        samples.append(Sample(image.path, captions, label, origin=f"easy-vqa {split} image {image.image_id}"))
    return PairDataset(samples, languages=languages, preload=True, source=f"easy-vqa/{split}")


# ---------------------------------------------------------------------------------------------------------------
# Labels from easy-vqa's questions, with the pixels as a fallback where the questions leave a choice open.


class LabelledImage(NamedTuple):
    """An easy-vqa image with its derived labels; ``from_pixels`` names the attributes its questions left open."""

    image_id: int
    path: str
    color: str
    shape: str
    from_pixels: tuple[str, ...] = ()


class SplitLabels(NamedTuple):
    """Derived labels of one split.

    Attributes:
        images: one entry per image, in id order.
        coverage: attribute ("color"/"shape") -> source -> number of images whose attribute that source gives. Sources
            are question types (an image counts under each type that states its attribute), "elimination" (only "no"
            answers that rule out every other value) and "pixels" (the questions leave several values open).
    """

    images: tuple[LabelledImage, ...]
    coverage: dict[str, dict[str, int]]


class _QuestionForm(NamedTuple):
    kind: str  # question type, for the coverage report
    given: tuple[tuple[str, str], ...]  # attributes the question itself names, e.g. (("color", "blue"),)
    asked: str | None  # the attribute the answer states, for open questions
    negated: bool = False  # yes/no questions: True when "yes" means absent


@dataclass
class _Evidence:
    """What the questions about one image say: values stated (with the question types) and values ruled out."""

    stated: dict[str, dict[str, set[str]]] = field(default_factory=lambda: {"color": {}, "shape": {}})
    ruled_out: dict[str, set[str]] = field(default_factory=lambda: {"color": set(), "shape": set()})


_VALUES = {"color": COLORS, "shape": SHAPES}
# easy-vqa's palette (its color.py): shapes are filled with exactly these colours, anti-aliased only at the edges.
_RGB = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "yellow": (255, 255, 0),
}
# Shape area over (widest row x tallest column). On the 4791 images whose shape the questions give, triangles
# (equilateral, apex up) measure 0.525-0.684, circles 0.787-0.867, rectangles 1.000; the gaps are safety margins.
_FILL_BANDS = (("triangle", 0.45, 0.73), ("circle", 0.76, 0.92), ("rectangle", 0.96, 1.04))


def image_labels(split: str) -> SplitLabels:
    """Colour and shape of every image of a split, derived from easy-vqa's questions (cached in-process).

    Raises:
        DataError: the questions contradict each other or the pixels, or use a form this parser does not know.
    """
    if split not in SPLITS:
        raise DataError(f"easy-vqa split must be one of {SPLITS}, got {split!r}")
    return _parse_split(split)


@cache
def _parse_split(split: str) -> SplitLabels:
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    evidence = _collect_evidence(split, paths)
    coverage: dict[str, Counter[str]] = {"color": Counter(), "shape": Counter()}
    images = []
    for image_id in sorted(paths):
        where = f"easy-vqa {split} image {image_id}"
        facts = evidence.get(image_id, _Evidence())
        labels = {attr: _from_questions(where, attr, facts) for attr in _VALUES}
        if any(value is None for value, _ in labels.values()):
            # The generator keeps each question with probability 0.32 (open) or 0.08 (yes/no), so about one image
            # in ten is left open by its questions; its pixels decide, but only among the values the questions allow.
            with Image.open(paths[image_id]) as img:
                seen = dict(zip(("color", "shape"), read_pixels(img, where), strict=True))
            for attr, (value, _) in labels.items():
                if value is None:
                    if seen[attr] in facts.ruled_out[attr]:
                        raise DataError(f"{where}: its pixels show {attr} {seen[attr]!r}, which a question rules out")
                    labels[attr] = (seen[attr], {"pixels"})
        for attr, (_, sources) in labels.items():
            coverage[attr].update(sources)
        from_pixels = tuple(attr for attr, (_, sources) in labels.items() if "pixels" in sources)
        images.append(LabelledImage(image_id, paths[image_id], labels["color"][0], labels["shape"][0], from_pixels))
    return SplitLabels(tuple(images), {attr: dict(counts) for attr, counts in coverage.items()})


def _collect_evidence(split: str, paths: dict[int, str]) -> dict[int, _Evidence]:
    questions, answers, image_ids = (
        easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    )
    forms = _question_forms()
    evidence: dict[int, _Evidence] = {}
    for question, answer, image_id in zip(questions, answers, image_ids, strict=True):
        where = f"easy-vqa {split} image {image_id}"
        if image_id not in paths:
            raise DataError(f"{where}: question {question!r} is about an image that has no file")
        form = forms.get(question)
        if form is None:
            raise DataError(f"{where}: unknown question form {question!r}")
        facts = evidence.setdefault(image_id, _Evidence())
        if form.asked is None:
            if answer not in ("yes", "no"):
                raise DataError(f"{where}: {question!r} answered {answer!r}, not yes/no")
            ((attr, value),) = form.given
            if (answer == "yes") != form.negated:
                facts.stated[attr].setdefault(value, set()).add(form.kind)
            else:
                facts.ruled_out[attr].add(value)
            continue
        if answer not in _VALUES[form.asked]:
            raise DataError(f"{where}: {question!r} answered {answer!r}, not a {form.asked}")
        facts.stated[form.asked].setdefault(answer, set()).add(form.kind)
        for attr, value in form.given:
            facts.stated[attr].setdefault(value, set()).add(form.kind)
    return evidence


def _from_questions(where: str, attr: str, facts: _Evidence) -> tuple[str | None, set[str]]:
    """The value of an attribute the questions give and the question types giving it; None if they leave it open."""
    stated, ruled_out = facts.stated[attr], facts.ruled_out[attr]
    if len(stated) > 1:
        raise DataError(f"{where}: inconsistent {attr} labels: {stated}")
    if stated:
        ((value, kinds),) = stated.items()
        if value in ruled_out:
            raise DataError(f"{where}: {attr} {value!r} is stated by {sorted(kinds)} but ruled out by a yes/no answer")
        return value, kinds
    candidates = [value for value in _VALUES[attr] if value not in ruled_out]
    if not candidates:
        raise DataError(f"{where}: yes/no answers rule out every {attr}")
    return (candidates[0], {"elimination"}) if len(candidates) == 1 else (None, set())


def read_pixels(image: Image.Image, where: str = "image") -> tuple[str, str]:
    """Reads the colour and shape of an easy-vqa image from its pixels.

    The colour is the palette colour most pixels have exactly. The shape follows from how much of its bounding box
    it fills, measured on the anti-aliased coverage so that small shapes measure as well as large ones.

    Raises:
        DataError: the image does not look like an easy-vqa image.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    counts = [int((codes == (r << 16 | g << 8 | b)).sum()) for r, g, b in _RGB.values()]
    best = max(range(len(counts)), key=counts.__getitem__)
    if counts[best] == 0:
        raise DataError(f"{where}: no pixel has a palette colour")
    color = COLORS[best]
    # A shape spans at most half the image's width and height, so at least three corners show the plain background.
    corners = Counter(int(codes[y, x]) for y in (0, -1) for x in (0, -1))
    bg_code, n_corners = corners.most_common(1)[0]
    if n_corners < 3:
        raise DataError(f"{where}: no uniform background in the corners")
    background = np.array([bg_code >> 16, (bg_code >> 8) & 255, bg_code & 255])
    direction = np.array(_RGB[color]) - background
    covered = np.clip((rgb - background) @ direction / float(direction @ direction), 0.0, 1.0)
    fill = covered.sum() / (covered.sum(axis=1).max() * covered.sum(axis=0).max())
    shape = next((name for name, low, high in _FILL_BANDS if low <= fill <= high), None)
    if shape is None:
        raise DataError(f"{where}: cannot tell the shape from its pixels (fill {fill:.3f} is in no band)")
    return color, shape


def _question_forms() -> dict[str, _QuestionForm]:
    """Every question easy-vqa asks (its gen_data/questions.py), mapped to what its answer says about the image."""
    forms: dict[str, _QuestionForm] = {}
    for q in ("what shape is in the image?", "what shape does the image contain?", "what shape is present?"):
        forms[q] = _QuestionForm("what shape", (), "shape")
    for color in COLORS:
        forms[f"what is the {color} shape?"] = _QuestionForm("what is the <color> shape", (("color", color),), "shape")
    for q in ("what color is the shape?", "what is the color of the shape?"):
        forms[q] = _QuestionForm("what color", (), "color")
    for shape in SHAPES:
        for q in (f"what color is the {shape}?", f"what is the color of the {shape}?"):
            forms[q] = _QuestionForm("what color is the <shape>", (("shape", shape),), "color")
    yes_no = {
        "is a {} present?": False,
        "is no {} present?": True,
        "is there a {}?": False,
        "is there not a {}?": True,
        "is there a {} in the image?": False,
        "is there not a {} in the image?": True,
        "does the image contain a {}?": False,
        "does the image not contain a {}?": True,
    }
    for template, negated in yes_no.items():
        for color in COLORS:
            forms[template.format(f"{color} shape")] = _QuestionForm("yes/no color", (("color", color),), None, negated)
        for shape in SHAPES:
            forms[template.format(shape)] = _QuestionForm("yes/no shape", (("shape", shape),), None, negated)
    return forms
