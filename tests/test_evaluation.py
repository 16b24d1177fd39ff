"""Evaluation against an analytic fake encoder whose right answers are known (big_vision's habit).

The fake maps an image to the vector its colour stands for and a text to the sum of the vectors of the words it
contains, so every cosine, ranking and metric below can be worked out by hand.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from vldistill.evaluation import (
    Encoder,
    EvalSet,
    ZeroShotResult,
    agreement,
    embed_images,
    embed_texts,
    evaluate,
    evaluate_retrieval,
    evaluate_zeroshot,
    mean_cosine,
    retrieval_metrics,
    zeroshot_classify,
    zeroshot_weights,
)

CLASSES = ["cat", "dog", "car", "ship", "tree", "bird"]


class FakeEncoder:
    """Colour -> vector for images, word counts -> summed vectors for texts.

    Outputs are deliberately not unit-length, so the tests also check that evaluation normalises where the protocol
    says it must. Every call is recorded so batching and "embed the images once" can be checked.
    """

    def __init__(self, colours: dict[tuple[int, int, int], list[float]], words: dict[str, list[float]]):
        self.colours = {colour: torch.tensor(vec) for colour, vec in colours.items()}
        self.words = {word: torch.tensor(vec) for word, vec in words.items()}
        self.dim = len(next(iter(self.words.values())))
        self.image_batches: list[int] = []
        self.texts_seen: list[str] = []

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        self.image_batches.append(len(images))
        return torch.stack([self.colours[img.getpixel((0, 0))] for img in images])

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        self.texts_seen.extend(texts)
        return torch.stack([self._text(text) for text in texts])

    def _text(self, text: str) -> torch.Tensor:
        return sum((text.count(word) * vec for word, vec in self.words.items()), torch.zeros(self.dim))


def onehot(i: int, dim: int, scale: float = 1.0) -> list[float]:
    return [scale if j == i else 0.0 for j in range(dim)]


def image(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (2, 2), colour)


def ranking_vector(order: list[int]) -> list[float]:
    """An image whose cosine with class ``order[r]`` is ``0.6 - 0.1 r``: it ranks the classes in ``order``.

    The class weights will be one-hot, so the cosines are these scores exactly once the vector is unit length; a
    7th "slack" coordinate of 0.3 makes it so (0.6² + 0.5² + ... + 0.1² = 0.91).
    """
    scores = [0.0] * len(order)
    for r, c in enumerate(order):
        scores[c] = 0.6 - 0.1 * r
    return [*scores, 0.3]


def test_fake_encoder_satisfies_protocol():
    assert isinstance(FakeEncoder({}, {"a": [1.0]}), Encoder)


# --- embedding ---


def test_embed_images_batches_keeps_order_and_normalises():
    colours = {(i, 0, 0): onehot(i % 3, 3, scale=float(i + 1)) for i in range(10)}
    enc = FakeEncoder(colours, {"x": [0.0, 0.0, 1.0]})
    out = embed_images(enc, [image((i, 0, 0)) for i in range(10)], batch_size=4)
    assert enc.image_batches == [4, 4, 2]
    expected = torch.tensor([onehot(i % 3, 3) for i in range(10)])  # scales 1..10 all removed
    torch.testing.assert_close(out, expected)


def test_embed_texts_batches_and_normalises():
    enc = FakeEncoder({}, {"cat": [3.0, 0.0], "dog": [0.0, 4.0]})
    out = embed_texts(enc, ["cat", "dog", "cat dog", "dog"], batch_size=3)
    assert enc.texts_seen == ["cat", "dog", "cat dog", "dog"]
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.0, 1.0]]))


# --- zero-shot ---


def six_class_set() -> tuple[FakeEncoder, list[Image.Image], list[int]]:
    """10 images, 3 of them misclassified by construction.

    labels      0  0  0  1  1  2  2  3  4  5
    top class   0  1  0  0  1  4  2  3  4  5   -> top1 = 7/10
    image 1 ranks its label 0 last, image 5 ranks its label 2 last, image 3 ranks its label 1 second -> top5 = 8/10
    per-class recall: 2/3, 1/2, 1/2, 1, 1, 1 -> mean = (14/3) / 6 = 7/9
    """
    labels = [0, 0, 0, 1, 1, 2, 2, 3, 4, 5]
    wrong_orders = {1: [1, 2, 3, 4, 5, 0], 3: [0, 1, 2, 3, 4, 5], 5: [4, 0, 1, 3, 5, 2]}
    colours = {}
    for i, label in enumerate(labels):
        rest = [c for c in range(6) if c != label]
        colours[(20 * i, 100, 100)] = ranking_vector(wrong_orders.get(i, [label, *rest]))
    words = {name: onehot(c, 7, scale=2.0) for c, name in enumerate(CLASSES)}
    return FakeEncoder(colours, words), [image(colour) for colour in colours], labels


def test_zeroshot_known_errors():
    enc, images, labels = six_class_set()
    result = evaluate_zeroshot(enc, images, labels, CLASSES, ["a photo of a {}."], batch_size=4)
    assert result.top1 == 0.7
    assert result.top5 == 0.8
    assert result.mean_per_class_recall == pytest.approx(7 / 9)
    assert result.predictions.tolist() == [0, 1, 0, 0, 1, 4, 2, 3, 4, 5]
    assert result.metrics() == {"top1": 0.7, "top5": 0.8, "mean_per_class_recall": result.mean_per_class_recall}
    assert enc.image_batches == [4, 4, 2]


def test_zeroshot_weights_normalise_each_template_then_average():
    # "noise" pulls every prompt towards the same direction e2: the second template carries no class information.
    enc = FakeEncoder({}, {"cat": [1.0, 0.0, 0.0], "dog": [0.0, 1.0, 0.0], "noise": [0.0, 0.0, 5.0]})
    weights = zeroshot_weights(enc, ["cat", "dog"], ["a photo of a {}.", "noise {}"])
    assert enc.texts_seen == ["a photo of a cat.", "noise cat", "a photo of a dog.", "noise dog"]
    # mean(e_c, (e_c + 5 e2) / sqrt(26)), renormalised; averaging raw vectors would give (2 e_c + 5 e2) / sqrt(29).
    a, b = 1 + 1 / math.sqrt(26), 5 / math.sqrt(26)
    norm = math.hypot(a, b)
    torch.testing.assert_close(weights, torch.tensor([[a, 0.0, b], [0.0, a, b]]) / norm)
    # The shared direction lifts every class equally, so it cannot change a prediction.
    result = zeroshot_classify(torch.eye(3)[:2], weights, torch.tensor([0, 1]))
    assert result.top1 == 1.0


def test_zeroshot_fills_every_placeholder_and_keeps_other_braces():
    enc = FakeEncoder({}, {"cat": [1.0]})
    zeroshot_weights(enc, ["cat"], ["{} {x} {}"])
    assert enc.texts_seen == ["cat {x} cat"]


def test_top5_uses_all_classes_when_fewer_than_five():
    # Three classes: top-"5" is top-3, which always contains the label.
    weights = torch.eye(3)
    images = torch.tensor([[1.0, 0.2, 0.1], [1.0, 0.2, 0.1], [0.1, 0.2, 1.0]])
    result = zeroshot_classify(images, weights, torch.tensor([0, 1, 1]))
    assert result.top1 == pytest.approx(1 / 3)
    assert result.top5 == 1.0
    assert result.mean_per_class_recall == pytest.approx(0.5)  # class 0: 1/1, class 1: 0/2, class 2 absent


def test_collapsed_encoder_scores_chance_with_lower_index_first():
    # Every class weight alike: ties go to the lower class index, so class 0 is predicted and label t ranks t-th.
    # One-hot images make every dot product exactly 0.5, whatever order the matmul sums in: a true tie.
    weights = torch.ones(7, 4)
    images = torch.eye(4)[[0, 1, 2, 3, 0, 1]]
    result = zeroshot_classify(images, weights, torch.tensor([0, 1, 2, 5, 6, 6]))
    assert result.predictions.tolist() == [0] * 6
    assert result.top1 == pytest.approx(1 / 6)
    assert result.top5 == pytest.approx(3 / 6)  # labels 0, 1, 2 rank < 5
    assert result.mean_per_class_recall == pytest.approx(1 / 5)  # 5 classes present, only class 0 recalled


# --- retrieval ---

# Cosine of caption j (rows) with image k (columns); captions 0, 1 describe image 0, caption 2 image 1, 3 and 4 image 2.
SIM = [
    [0.90, 0.32, 0.10],  # t2i: own image 0 first                  -> rank 0
    [0.20, 0.50, 0.10],  # t2i: image 1 beats own image 0          -> rank 1
    [0.40, 0.30, 0.60],  # t2i: images 2 and 0 beat own image 1    -> rank 2
    [0.10, 0.20, 0.50],  # t2i: own image 2 first                  -> rank 0
    [0.35, 0.15, 0.25],  # t2i: image 0 beats own image 2          -> rank 1
]
TEXT_TO_IMAGE = [0, 0, 1, 2, 2]
# i2t, per image column: image 0's best own caption (0.90) leads -> rank 0; image 1's own 0.30 is beaten by
# captions 0 (0.32) and 1 (0.50) -> rank 2; image 2's best own 0.50 is beaten by caption 2 (0.60) -> rank 1.


def sim_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    """Images are e0, e1, e2; a 4th slack coordinate makes each caption unit length, so cosines are exactly SIM."""
    images = torch.eye(4)[:3]
    sim = torch.tensor(SIM, dtype=torch.float64)
    slack = (1 - (sim**2).sum(dim=1, keepdim=True)).sqrt()
    return images, torch.cat([sim, slack], dim=1).float()


def test_retrieval_several_captions_per_image():
    images, texts = sim_embeddings()
    metrics = retrieval_metrics(images, texts, torch.tensor(TEXT_TO_IMAGE), ks=(1, 2, 3))
    expected = {"i2t_r1": 1 / 3, "i2t_r2": 2 / 3, "i2t_r3": 1.0, "t2i_r1": 2 / 5, "t2i_r2": 4 / 5, "t2i_r3": 1.0}
    assert list(metrics) == list(expected)
    assert metrics == pytest.approx(expected)


def test_retrieval_default_ks_and_list_input():
    images, texts = sim_embeddings()
    metrics = retrieval_metrics(images, texts, TEXT_TO_IMAGE)
    assert metrics == pytest.approx(
        {"i2t_r1": 1 / 3, "i2t_r5": 1.0, "i2t_r10": 1.0, "t2i_r1": 2 / 5, "t2i_r5": 1.0, "t2i_r10": 1.0}
    )


def test_retrieval_collapsed_encoder_scores_chance_not_perfect():
    # All embeddings alike: ties go to the lower index, so item i ranks i-th in both directions.
    same = torch.eye(3)[[0, 0, 0, 0]]  # every cosine exactly 1
    metrics = retrieval_metrics(same, same, torch.arange(4), ks=(1, 2))
    assert metrics == pytest.approx({"i2t_r1": 0.25, "i2t_r2": 0.5, "t2i_r1": 0.25, "t2i_r2": 0.5})


def test_evaluate_retrieval_end_to_end():
    words = {"cat": onehot(0, 3), "dog": onehot(1, 3), "car": onehot(2, 3)}
    colours = {(c, 0, 0): onehot(c, 3, scale=2.0) for c in range(3)}
    enc = FakeEncoder(colours, words)
    images = [image((c, 0, 0)) for c in range(3)]
    # Caption 3 mentions a dog twice and a car once: it sits nearer image 1 than its own image 2.
    captions = ["a cat", "a dog", "a car", "a dog, a car, a dog"]
    metrics = evaluate_retrieval(enc, images, captions, [0, 1, 2, 2])
    # t2i ranks 0, 0, 0, 1. i2t: image 1's own caption (cos 1) leads caption 3 (cos 2/sqrt(5)); image 2's caption 2
    # (cos 1) leads; all rank 0.
    assert metrics == pytest.approx(
        {"i2t_r1": 1.0, "i2t_r5": 1.0, "i2t_r10": 1.0, "t2i_r1": 0.75, "t2i_r5": 1.0, "t2i_r10": 1.0}
    )


# --- agreement ---


def test_agreement_counts_equal_predictions():
    assert agreement(torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 1, 0, 3, 0])) == 0.6
    assert agreement(torch.tensor([2, 2]), torch.tensor([2, 2])) == 1.0


def test_mean_cosine_normalises_rows():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, -3.0], [6.0, 8.0]])
    # cosines: 1/sqrt(2), -1, 1
    assert mean_cosine(a, b) == pytest.approx((1 / math.sqrt(2) - 1 + 1) / 3)


# --- evaluate() ---


def bilingual_set() -> tuple[FakeEncoder, EvalSet]:
    """4 images showing cat, dog, car, ship; image 2 is labelled "ship" although it shows a car.

    Zero-shot: predictions 0 1 2 3 vs labels 0 1 3 3 -> top1 3/4; 4 classes so top-5 = top-4 = 1; recall over the
    classes present (0, 1, 3): 1, 1, 1/2 -> 5/6 (class 2 has no images and does not count).
    Retrieval: caption 3 is 2 cat + 1 ship, so image 0 (cos 2/sqrt(5)) beats its own image 3 (1/sqrt(5)):
    t2i ranks 0, 0, 0, 1; every image's own caption still leads its column, so i2t is perfect.
    """
    en, zh = ["cat", "dog", "car", "ship"], ["猫", "狗", "车", "船"]
    words = {word: onehot(c, 4) for names in (en, zh) for c, word in enumerate(names)}
    colours = {(c, 50, 50): onehot(c, 4, scale=3.0) for c in range(4)}
    eval_set = EvalSet(
        images=[image((c, 50, 50)) for c in range(4)],
        labels=[0, 1, 3, 3],
        classnames={"en": en, "zh": zh},
        templates={"en": ["a photo of a {}."], "zh": ["一张{}的照片。"]},
        captions={
            "en": ["a cat", "a dog", "a car", "a ship, a cat, another cat"],
            "zh": ["猫", "狗", "车", "船上一只猫，又一只猫"],
        },
    )
    return FakeEncoder(colours, words), eval_set


def test_evaluate_all_languages_embeds_images_once():
    enc, eval_set = bilingual_set()
    out = evaluate(enc, eval_set, batch_size=3)
    assert enc.image_batches == [3, 1]  # once, not once per language
    zeroshot = {"top1": 0.75, "top5": 1.0, "mean_per_class_recall": 5 / 6}
    retrieval = {"i2t_r1": 1.0, "i2t_r5": 1.0, "i2t_r10": 1.0, "t2i_r1": 0.75, "t2i_r5": 1.0, "t2i_r10": 1.0}
    for lang in ("en", "zh"):
        assert out["metrics"]["zeroshot"][lang] == pytest.approx(zeroshot)
        assert out["metrics"]["retrieval"][lang] == pytest.approx(retrieval)
        assert out["predictions"][lang].tolist() == [0, 1, 2, 3]
    assert agreement(out["predictions"]["en"], out["predictions"]["zh"]) == 1.0
    torch.testing.assert_close(out["image_embeds"], torch.eye(4))
    json.dumps(out["metrics"])  # the metrics must be writable as they are


def test_evaluate_one_language_and_zeroshot_only_language():
    enc, eval_set = bilingual_set()
    eval_set.captions.pop("zh")
    out = evaluate(enc, eval_set, languages=["zh"])
    assert set(out["metrics"]["zeroshot"]) == {"zh"}
    assert out["metrics"]["retrieval"] == {}
    assert out["metrics"]["zeroshot"]["zh"]["top1"] == pytest.approx(0.75)


# --- errors ---


def test_errors_name_the_problem():
    enc = FakeEncoder({(0, 0, 0): [1.0, 0.0]}, {"cat": [1.0, 0.0], "dog": [0.0, 1.0]})
    two = torch.eye(2)
    with pytest.raises(ValueError, match=r"labels contains 2, but there are 2 classes"):
        zeroshot_classify(two, two, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"labels contains -1"):
        zeroshot_classify(two, two, [0, -1])
    with pytest.raises(TypeError, match="integer"):
        zeroshot_classify(two, two, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"'a photo of a cat'"):
        zeroshot_weights(enc, ["cat"], ["a photo of a cat", "a {}"])
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        evaluate_zeroshot(enc, [image((0, 0, 0))] * 3, [0, 1], ["cat", "dog"], ["{}"])
    with pytest.raises(ValueError, match="no images"):
        embed_images(enc, [])
    with pytest.raises(ValueError, match="classnames is empty"):
        zeroshot_weights(enc, [], ["{}"])
    with pytest.raises(TypeError, match="single string"):
        embed_texts(enc, "a cat")
    with pytest.raises(ValueError, match="width 2 but weights has width 3"):
        zeroshot_classify(two, torch.eye(3), [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        zeroshot_classify(torch.tensor([[float("nan"), 0.0]]), two, [0])


def test_retrieval_errors():
    two = torch.eye(2)
    with pytest.raises(ValueError, match="image 1 has no caption"):
        retrieval_metrics(two, two, [0, 0])
    with pytest.raises(ValueError, match=r"text_to_image must have shape \[2\]"):
        retrieval_metrics(two, two, [0, 1, 1])
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
        retrieval_metrics(two, two, [0, 1], ks=(0,))
    with pytest.raises(ValueError, match="2 captions but 3"):
        evaluate_retrieval(FakeEncoder({}, {"a": [1.0]}), [], ["a", "b"], [0, 1, 1])


def test_agreement_and_cosine_errors():
    with pytest.raises(ValueError, match="equal length"):
        agreement(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="same shape"):
        mean_cosine(torch.ones(2, 3), torch.ones(3, 3))


def test_evalset_errors():
    images = [image((0, 0, 0))] * 2
    with pytest.raises(ValueError, match=r"captions\['en'\] has 1 captions for 2 images"):
        EvalSet(images, [0, 0], captions={"en": ["a cat"]})
    with pytest.raises(ValueError, match="same number of class names"):
        EvalSet(images, [0, 0], {"en": ["cat", "dog"], "zh": ["猫"]}, {"en": ["{}"], "zh": ["{}"]})
    with pytest.raises(ValueError, match="labels contains 2, but there are 2 classes"):
        EvalSet(images, [0, 2], {"en": ["cat", "dog"]}, {"en": ["{}"]})
    with pytest.raises(ValueError, match=r"'a cat' in templates\['en'\]"):
        EvalSet(images, [0, 1], {"en": ["cat", "dog"]}, {"en": ["a cat"]})
    with pytest.raises(ValueError, match="same languages"):
        EvalSet(images, [0, 1], {"en": ["cat", "dog"]}, {})
    enc, eval_set = bilingual_set()
    with pytest.raises(ValueError, match=r"language 'fr' has neither.*\['en', 'zh'\]"):
        evaluate(enc, eval_set, languages=["fr"])


def test_zeroshot_result_metrics_are_plain_floats():
    result = ZeroShotResult(top1=0.5, top5=1.0, mean_per_class_recall=0.25, predictions=torch.tensor([1, 0]))
    assert json.loads(json.dumps(result.metrics())) == {"top1": 0.5, "top5": 1.0, "mean_per_class_recall": 0.25}
