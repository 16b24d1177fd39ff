"""Evaluation protocols (METHODS.md section 5): zero-shot classification, retrieval, teacher-student agreement.

Models are reached only through :class:`Encoder`, two methods that embed raw PIL images and strings with the model's
own preprocessing, so a teacher, a student and a test fake go through the same code. The metric functions take plain
embedding tensors, so they also score cached embeddings.

Rankings break exact ties by index, lower index first (as ``argmax`` does): results are deterministic, zero-shot
top-1 always agrees with the returned predictions, and a collapsed encoder that embeds everything alike scores at
chance level rather than perfectly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypedDict, runtime_checkable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor


@runtime_checkable
class Encoder(Protocol):
    """Anything that embeds raw inputs with its own preprocessing (a teacher adapter, a student, a test fake)."""

    def embed_images(self, images: list[Image.Image]) -> Tensor:
        """Embeds a batch of images as ``[N, d]``, L2-normalised, without gradients."""
        ...

    def embed_texts(self, texts: list[str]) -> Tensor:
        """Embeds a batch of strings as ``[N, d]``, L2-normalised, without gradients."""
        ...


# ---------------------------------------------------------------------------------------------------------------------
# Embedding
# ---------------------------------------------------------------------------------------------------------------------


def embed_images(encoder: Encoder, images: Sequence[Image.Image], batch_size: int = 64) -> Tensor:
    """Embeds ``images`` with ``encoder`` in batches of ``batch_size``.

    Returns:
        ``[N, d]`` float32 embeddings in input order, L2-normalised, on the device the encoder returned them on.
    """
    if isinstance(images, Image.Image):
        raise TypeError("images must be a sequence of PIL images, not a single image")
    return _embed_batched(encoder.embed_images, list(images), batch_size, "images")


def embed_texts(encoder: Encoder, texts: Sequence[str], batch_size: int = 256) -> Tensor:
    """Embeds ``texts`` with ``encoder`` in batches of ``batch_size``.

    Returns:
        ``[N, d]`` float32 embeddings in input order, L2-normalised, on the device the encoder returned them on.
    """
    return _embed_batched(encoder.embed_texts, _strings("texts", texts), batch_size, "texts")


def _embed_batched(fn: Callable[[list], Tensor], items: list, batch_size: int, what: str) -> Tensor:
    if not items:
        raise ValueError(f"no {what} to embed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            out = fn(batch)
            if out.ndim != 2 or out.shape[0] != len(batch):
                raise ValueError(
                    f"encoder returned shape {tuple(out.shape)} for a batch of {len(batch)} {what}; "
                    f"expected [{len(batch)}, d]"
                )
            # float32 before normalising: norms and dot products of fp16/bf16 vectors lose digits that rankings need.
            chunks.append(out.detach().float())
    # Encoders promise unit rows, but one that forgets would silently turn cosines into dot products.
    return F.normalize(torch.cat(chunks), dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Zero-shot classification
# ---------------------------------------------------------------------------------------------------------------------


def zeroshot_weights(
    encoder: Encoder, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256
) -> Tensor:
    """Builds the zero-shot classifier: one unit vector per class (METHODS.md 5).

    Class ``c``'s weight is ``normalize(mean_t normalize(embed(templates[t] filled with classnames[c])))``.
    Averaging unit vectors gives every template the same say, however long its raw text embedding came out.

    Args:
        encoder: the model whose text tower embeds the prompts.
        classnames: one name per class, in label order.
        templates: prompts, each containing ``"{}"`` where the class name goes (every occurrence is filled).
        batch_size: prompts per encoder call.

    Returns:
        ``[C, d]`` L2-normalised class weights.
    """
    classnames = _strings("classnames", classnames)
    templates = _check_templates(templates)
    # str.replace rather than str.format: a template with other literal braces must not crash or be mangled.
    prompts = [template.replace("{}", name) for name in classnames for template in templates]
    embeds = embed_texts(encoder, prompts, batch_size).view(len(classnames), len(templates), -1)
    return F.normalize(embeds.mean(dim=1), dim=-1)


@dataclass
class ZeroShotResult:
    """Zero-shot classification scores on one image set.

    Attributes:
        top1: fraction of images whose highest-scoring class is their label.
        top5: fraction whose label is among the ``min(5, C)`` highest-scoring classes.
        mean_per_class_recall: top-1 recall averaged over the classes that occur in the labels.
        predictions: ``[N]`` predicted class index per image (on CPU).
    """

    top1: float
    top5: float
    mean_per_class_recall: float
    predictions: Tensor

    def metrics(self) -> dict[str, float]:
        """The scores as a JSON-able dict of fractions in ``[0, 1]``."""
        return {"top1": self.top1, "top5": self.top5, "mean_per_class_recall": self.mean_per_class_recall}


def zeroshot_classify(image_embeds: Tensor, weights: Tensor, labels: Tensor | Sequence[int]) -> ZeroShotResult:
    """Classifies images by cosine similarity to class weights and scores the result.

    Args:
        image_embeds: ``[N, d]`` image embeddings (normalised here, so raw ones are fine).
        weights: ``[C, d]`` class weights from :func:`zeroshot_weights`.
        labels: ``[N]`` true class index per image.
    """
    images = _check_embeds("image_embeds", image_embeds)
    weights = _check_embeds("weights", weights).to(images.device)
    _check_widths("image_embeds", images, "weights", weights)
    n_classes = weights.shape[0]
    labels = _indices("labels", labels, len(images), n_classes, "classes").to(images.device)
    logits = images @ weights.T
    rank = _stable_rank(logits, labels)
    correct = rank == 0
    return ZeroShotResult(
        top1=_fraction(correct),
        top5=_fraction(rank < min(5, n_classes)),
        mean_per_class_recall=_mean_per_class_recall(correct, labels, n_classes),
        predictions=logits.argmax(dim=1).cpu(),
    )


def evaluate_zeroshot(
    encoder: Encoder,
    images: Sequence[Image.Image],
    labels: Tensor | Sequence[int],
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 64,
) -> ZeroShotResult:
    """Zero-shot classification of ``images`` end to end: build the class weights, embed the images, score.

    Args:
        encoder: the model to evaluate.
        images: the images.
        labels: true class index per image.
        classnames: one name per class, in label order.
        templates: prompts with ``"{}"`` for the class name.
        batch_size: images (and prompts) per encoder call.
    """
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    weights = zeroshot_weights(encoder, classnames, templates, batch_size)
    return zeroshot_classify(embed_images(encoder, images, batch_size), weights, labels)


def _mean_per_class_recall(correct: Tensor, labels: Tensor, n_classes: int) -> float:
    # Classes absent from the labels have no recall; counting them as 0 would punish the model for the data.
    counts = torch.bincount(labels, minlength=n_classes)
    hits = torch.bincount(labels[correct], minlength=n_classes)
    present = counts > 0
    return (hits[present].double() / counts[present]).mean().item()


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------------------------------


def retrieval_metrics(
    image_embeds: Tensor,
    text_embeds: Tensor,
    text_to_image: Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image->text and text->image recall@k (METHODS.md 5).

    Image->text counts a hit when any of the image's captions is among the ``k`` captions closest to it;
    text->image counts a hit when the caption's own image is among the ``k`` images closest to it.

    Args:
        image_embeds: ``[I, d]`` image embeddings (normalised here).
        text_embeds: ``[T, d]`` caption embeddings (normalised here).
        text_to_image: ``[T]``: caption ``j`` describes image ``text_to_image[j]``; every image needs at least one.
        ks: the cut-offs ``k``.

    Returns:
        ``{"i2t_r{k}": ..., "t2i_r{k}": ...}`` for every ``k`` (image->text keys first), fractions in ``[0, 1]``.
    """
    images = _check_embeds("image_embeds", image_embeds)
    texts = _check_embeds("text_embeds", text_embeds).to(images.device)
    _check_widths("image_embeds", images, "text_embeds", texts)
    owner = _indices("text_to_image", text_to_image, len(texts), len(images), "images").to(images.device)
    ks = _check_ks(ks)
    sim = images @ texts.T
    ranks = {"i2t": _image_to_text_ranks(sim, owner), "t2i": _stable_rank(sim.T, owner)}
    return {f"{direction}_r{k}": _fraction(rank < k) for direction, rank in ranks.items() for k in ks}


def evaluate_retrieval(
    encoder: Encoder,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    text_to_image: Tensor | Sequence[int],
    batch_size: int = 64,
) -> dict[str, float]:
    """Retrieval recall@1/5/10 of ``encoder`` on ``images`` and their ``captions``.

    Args:
        encoder: the model to evaluate.
        images: the images.
        captions: the captions, in any order.
        text_to_image: index into ``images`` of the image each caption describes.
        batch_size: images (and captions) per encoder call.
    """
    if len(captions) != len(text_to_image):
        raise ValueError(f"got {len(captions)} captions but {len(text_to_image)} text_to_image entries")
    text_embeds = embed_texts(encoder, captions, batch_size)
    return retrieval_metrics(embed_images(encoder, images, batch_size), text_embeds, text_to_image)


def _image_to_text_ranks(sim: Tensor, owner: Tensor) -> Tensor:
    """Per image: how many other images' captions rank ahead of its best caption. ``sim`` is ``[I, T]``."""
    n_images = sim.shape[0]
    own = owner[None, :] == torch.arange(n_images, device=sim.device)[:, None]
    lonely = (~own.any(dim=1)).nonzero()
    if len(lonely):
        raise ValueError(f"image {lonely[0].item()} has no caption in text_to_image; every image needs at least one")
    best = sim.masked_fill(~own, float("-inf")).argmax(dim=1)
    # The image's other captions are not competitors: only captions of other images can push its best one down.
    other_own = own.clone()
    other_own[torch.arange(n_images, device=sim.device), best] = False
    return _stable_rank(sim.masked_fill(other_own, float("-inf")), best)


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = list(ks)
    if not ks:
        raise ValueError("ks is empty")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"every k must be an integer >= 1, got {k!r}")
    return ks


# ---------------------------------------------------------------------------------------------------------------------
# Teacher-student agreement
# ---------------------------------------------------------------------------------------------------------------------


def agreement(pred_a: Tensor, pred_b: Tensor) -> float:
    """Fraction of samples on which two models make the same top-1 prediction.

    Args:
        pred_a: ``[N]`` predicted class indices of one model (e.g. ``ZeroShotResult.predictions``).
        pred_b: ``[N]`` those of the other model.
    """
    pred_a, pred_b = torch.as_tensor(pred_a), torch.as_tensor(pred_b)
    if pred_a.ndim != 1 or pred_a.shape != pred_b.shape or len(pred_a) == 0:
        raise ValueError(
            f"predictions must be two non-empty [N] tensors of equal length, got shapes {tuple(pred_a.shape)} "
            f"and {tuple(pred_b.shape)}"
        )
    return _fraction(pred_a.cpu() == pred_b.cpu())


def mean_cosine(a: Tensor, b: Tensor) -> float:
    """Mean cosine similarity between matching rows of ``a`` and ``b`` (both ``[N, d]``; normalised here)."""
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = _check_embeds("a", a)
    b = _check_embeds("b", b).to(a.device)
    return (a * b).sum(dim=-1).double().mean().item()


# ---------------------------------------------------------------------------------------------------------------------
# A whole evaluation set in one call
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """Labelled images with class names, templates and captions per language, checked on construction.

    Attributes:
        images: the images, in order.
        labels: ``[N]`` class index of each image (a list of ints is converted).
        classnames: language -> class names in label order; the same number of classes in every language.
        templates: language -> zero-shot templates with ``"{}"``; exactly the languages of ``classnames``.
        captions: language -> one caption per image (caption ``i`` describes image ``i``), for retrieval.
    """

    images: list[Image.Image]
    labels: Tensor
    classnames: dict[str, list[str]] = field(default_factory=dict)
    templates: dict[str, list[str]] = field(default_factory=dict)
    captions: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.images)
        if n == 0:
            raise ValueError("EvalSet has no images")
        if set(self.classnames) != set(self.templates):
            raise ValueError(
                f"classnames and templates must cover the same languages, got {sorted(self.classnames)} "
                f"and {sorted(self.templates)}"
            )
        n_classes = {lang: len(_strings(f"classnames[{lang!r}]", names)) for lang, names in self.classnames.items()}
        if len(set(n_classes.values())) > 1:
            raise ValueError(f"every language needs the same number of class names, got {n_classes}")
        for lang, templates in self.templates.items():
            _check_templates(templates, f"templates[{lang!r}]")
        # Without class names any non-negative label is acceptable; the range check waits for zero-shot.
        upper = next(iter(n_classes.values()), torch.iinfo(torch.long).max)
        self.labels = _indices("labels", self.labels, n, upper, "classes")
        for lang, captions in self.captions.items():
            if len(_strings(f"captions[{lang!r}]", captions)) != n:
                raise ValueError(f"captions[{lang!r}] has {len(captions)} captions for {n} images; need one per image")

    @property
    def languages(self) -> list[str]:
        """Every language with class names or captions, class-name languages first."""
        return list(dict.fromkeys([*self.classnames, *self.captions]))


class EvalOutput(TypedDict):
    """What :func:`evaluate` returns.

    Attributes:
        metrics: ``{"zeroshot": {lang: ZeroShotResult.metrics()}, "retrieval": {lang: retrieval_metrics()}}``;
            JSON-able.
        predictions: language -> ``[N]`` zero-shot predictions, for :func:`agreement` with another model.
        image_embeds: ``[N, d]`` normalised image embeddings, for :func:`mean_cosine` with another model.
    """

    metrics: dict[str, dict[str, dict[str, float]]]
    predictions: dict[str, Tensor]
    image_embeds: Tensor


def evaluate(
    encoder: Encoder, eval_set: EvalSet, languages: Sequence[str] | None = None, batch_size: int = 64
) -> EvalOutput:
    """Zero-shot classification and retrieval on ``eval_set`` in each language, embedding the images once.

    A language gets zero-shot scores if the set has class names in it, and retrieval scores if it has captions in it.

    Args:
        encoder: the model to evaluate.
        eval_set: the images, labels, class names, templates and captions.
        languages: languages to evaluate; ``None`` means all of ``eval_set.languages``.
        batch_size: images (and texts) per encoder call.
    """
    languages = _pick_languages(eval_set, languages)
    image_embeds = embed_images(encoder, eval_set.images, batch_size)
    zeroshot, retrieval, predictions = {}, {}, {}
    for lang in languages:
        if lang in eval_set.classnames:
            weights = zeroshot_weights(encoder, eval_set.classnames[lang], eval_set.templates[lang], batch_size)
            result = zeroshot_classify(image_embeds, weights, eval_set.labels)
            zeroshot[lang], predictions[lang] = result.metrics(), result.predictions
        if lang in eval_set.captions:
            text_embeds = embed_texts(encoder, eval_set.captions[lang], batch_size)
            retrieval[lang] = retrieval_metrics(image_embeds, text_embeds, torch.arange(len(eval_set.images)))
    return {
        "metrics": {"zeroshot": zeroshot, "retrieval": retrieval},
        "predictions": predictions,
        "image_embeds": image_embeds,
    }


def _pick_languages(eval_set: EvalSet, languages: Sequence[str] | None) -> list[str]:
    available = eval_set.languages
    if not available:
        raise ValueError("this EvalSet has neither class names nor captions; there is nothing to evaluate")
    languages = _strings("languages", available if languages is None else languages)
    for lang in languages:
        if lang not in available:
            raise ValueError(f"language {lang!r} has neither class names nor captions in this set; it has {available}")
    return languages


# ---------------------------------------------------------------------------------------------------------------------
# Shared checks and ranking
# ---------------------------------------------------------------------------------------------------------------------


def _stable_rank(scores: Tensor, target: Tensor) -> Tensor:
    """Position of ``scores[i, target[i]]`` in row ``i`` sorted high to low, equal scores going to the lower index."""
    true = scores.gather(1, target[:, None])
    columns = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores > true) | ((scores == true) & (columns[None, :] < target[:, None]))
    return ahead.sum(dim=1)


def _fraction(hits: Tensor) -> float:
    # Integer count over integer total: 7 hits in 10 is exactly 0.7, not float32's 0.699999988.
    return hits.sum().item() / hits.numel()


def _strings(name: str, values: Sequence[str]) -> list[str]:
    # A lone str is a Sequence[str] too; iterating it would embed single characters without any error.
    if isinstance(values, str):
        raise TypeError(f"{name} must be a sequence of strings, not the single string {values!r}")
    values = list(values)
    if not values:
        raise ValueError(f"{name} is empty")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{name}[{i}] is a {type(value).__name__}, not a str: {value!r}")
    return values


def _check_templates(templates: Sequence[str], name: str = "templates") -> list[str]:
    templates = _strings(name, templates)
    for template in templates:
        if "{}" not in template:
            raise ValueError(f"template {template!r} in {name} has no '{{}}' placeholder for the class name")
    return templates


def _check_embeds(name: str, x: Tensor) -> Tensor:
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, d] matrix, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return F.normalize(x.detach().float(), dim=-1)


def _check_widths(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} has width {a.shape[1]} but {name_b} has width {b.shape[1]}")


def _indices(name: str, values: Tensor | Sequence[int], length: int, upper: int, what: str) -> Tensor:
    """Checks that ``values`` is ``[length]`` integers in ``[0, upper)``, ``upper`` being the number of ``what``."""
    idx = torch.as_tensor(values)
    if idx.ndim != 1 or len(idx) != length:
        raise ValueError(f"{name} must have shape [{length}], got {tuple(idx.shape)}")
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise TypeError(f"{name} must hold integer indices, got dtype {idx.dtype}")
    bad = idx[(idx < 0) | (idx >= upper)]
    if len(bad):
        raise ValueError(f"{name} contains {bad[0].item()}, but there are {upper} {what} (valid: 0 to {upper - 1})")
    return idx.long()
