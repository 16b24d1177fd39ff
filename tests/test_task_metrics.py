"""Tests for the task metrics (vldistill.tasks.metrics).

Expected values are derived by hand from the rules of the reference implementations (the official VQA vqaEval.py,
coco-caption's BLEU and CIDEr-D, Stanford PTBTokenizer as run by coco-caption), with the arithmetic in the comments.
"""

from __future__ import annotations

import math
import sys

import pytest

from vldistill.tasks.metrics import (
    accuracy,
    caption_scores,
    multiple_choice_accuracy,
    normalize_answer,
    tokenize_caption,
    vqa_accuracy,
    vqa_score,
)

# ----------------------------------------------------------------------------------------------------------------------
# VQA answer normalisation


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Two.", "2"),  # period not before a digit deleted, lowercased, number word -> digit
        ("the dog's", "dog's"),  # the apostrophe is not in the punct list; article dropped
        ("yes!", "yes"),  # "!" touches no space -> becomes a space, then split/join drops it
        ("dont", "don't"),  # contractions table
        ("1,000", "1000"),  # digit-comma-digit: every punct mark is deleted, not spaced
        ("1,000 dogs!", "1000 dogs"),  # ... including the "!" elsewhere in the answer
        ("yes, it is", "yes it is"),  # ", " touches a space -> deleted
        ("black/white", "black white"),  # "/" touches no space -> becomes a space
        ("one-way", "1 way"),  # "-" becomes a space, then "one" is a number word
        ("x - y", "x y"),  # " -" touches a space -> deleted, double space collapses
        ("3.5", "3.5"),  # a period before a digit stays
        ("e.g.", "eg"),  # every other period is deleted
        ("(Red)", "red"),
        ("An Apple", "apple"),
        ("None", "0"),
        ("the the", ""),
        ("hes", "he's"),
        ("Im", "im"),  # the table's key "Im" is capitalised, but lookup happens after lowercasing: never matches
        ("  Yes\tplease\n", "yes please"),  # tabs and newlines become spaces, then strip
    ],
)
def test_normalize_answer_follows_official_rules(answer, expected):
    assert normalize_answer(answer) == expected


def test_normalize_answer_all_same_only_strips():
    # When all references agree, the official script only replaces newlines/tabs and strips.
    assert normalize_answer("  Two.\n", all_same=True) == "Two."
    assert normalize_answer("The Dog!", all_same=True) == "The Dog!"


# ----------------------------------------------------------------------------------------------------------------------
# VQA accuracy

TEN_REFS = ["red", "red"] + ["blue"] * 8


def test_vqa_accuracy_two_of_ten_annotators():
    # m = 2 matches. Leaving out one of the 2 "red": 1 match left -> 1/3 (2 subsets);
    # leaving out a "blue": 2 matches -> 2/3 (8 subsets). Mean = (2 * 1/3 + 8 * 2/3) / 10 = (18/3) / 10 = 0.6
    assert vqa_accuracy("red", TEN_REFS) == pytest.approx(0.6)


def test_vqa_accuracy_normalises_prediction_when_references_differ():
    # The references are not all identical, so "Red." -> "red" and scores like "red".
    assert vqa_accuracy("Red.", TEN_REFS) == pytest.approx(0.6)
    assert vqa_accuracy(" BLUE ", TEN_REFS) == pytest.approx(1.0)  # 8 matches: every subset keeps >= 7 -> 1


@pytest.mark.parametrize(
    ("n_match", "expected"),
    [
        (0, 0.0),
        (1, 0.3),  # leave out the match: 0; the 9 others: 1/3 -> (9/3) / 10
        (3, 0.9),  # leave out a match: 2/3 (3 subsets); others: 1 (7 subsets) -> (2 + 7) / 10
        (4, 1.0),  # every subset keeps >= 3 matches
    ],
)
def test_vqa_accuracy_counts(n_match, expected):
    refs = ["cat"] * n_match + ["dog", "bird", "cow", "fish", "horse", "sheep", "goat", "pig", "duck", "hen"]
    refs = refs[:10]
    assert vqa_accuracy("cat", refs) == pytest.approx(expected)


def test_vqa_accuracy_identical_references_are_not_normalised():
    # Official quirk: ten identical references switch normalisation off for the prediction too.
    refs = ["yes"] * 10
    assert vqa_accuracy(" yes ", refs) == 1.0  # stripped only
    assert vqa_accuracy("Yes", refs) == 0.0  # no lowercasing
    assert vqa_accuracy("yes.", refs) == 0.0  # no punctuation handling


def test_vqa_accuracy_single_reference_is_normalised_exact_match():
    assert vqa_accuracy("Two.", ["2"]) == 1.0
    assert vqa_accuracy("a cat", ["The cat!"]) == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0


def test_vqa_accuracy_rejects_bad_references():
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_accuracy("yes", [])
    with pytest.raises(TypeError, match="not a single string"):
        vqa_accuracy("yes", "yes")


def test_vqa_score_is_mean_accuracy():
    # 0.6 ("red") and 1.0 ("blue") -> 0.8
    assert vqa_score(["red", "blue"], [TEN_REFS, TEN_REFS]) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="differ in length"):
        vqa_score(["red"], [TEN_REFS, TEN_REFS])
    with pytest.raises(ValueError, match="non-empty"):
        vqa_score([], [])


# ----------------------------------------------------------------------------------------------------------------------
# Caption tokenisation (expected strings are what coco-caption's Java PTBTokenizer + PUNCTUATIONS filter produce)


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
        ('The dog\'s ball, which is red, is "new".', "the dog 's ball which is red is new"),
        ("Two dogs (a brown one) can't play!", "two dogs -lrb- a brown one -rrb- ca n't play"),
        ("There are 1,000 birds; 50% fly at 5 p.m.", "there are 1,000 birds 50 % fly at 5 p.m."),
        ("Mr. Smith's black-and-white cat...", "mr. smith 's black-and-white cat"),
        ("Wow!! I'd've said 'hi', she said -- really?", "wow !! i 'd 've said hi she said really"),
        ("a\nstop  sign", "a stop sign"),
    ],
)
def test_tokenize_caption_mirrors_ptb_tokenizer(caption, expected):
    assert tokenize_caption(caption) == expected


# ----------------------------------------------------------------------------------------------------------------------
# Caption scores (pycocoevalcap)


@pytest.fixture
def coco_scorers():
    pytest.importorskip("pycocoevalcap")


def test_bleu4_exact_match_is_one(coco_scorers):
    scores = caption_scores(["A cat sits on a mat."], [["a cat sits on a mat", "a kitten on a rug"]])
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)


def test_bleu4_two_captions_by_hand(coco_scorers):
    # Image 1: "the cat sat on the mat" vs {"the cat is on the mat", "a cat sat on a mat"}
    #   1-grams 6/6 (the x2 clipped to 2 by ref 1); 2-grams 5/5 (the cat, on the, the mat | cat sat, sat on);
    #   3-grams 2/4 (cat sat on, on the mat); 4-grams 0/3.
    # Image 2: "a dog runs in a park" vs {"a dog runs in the park"}
    #   1-grams 5/6 (a x2 clipped to 1); 2-grams 3/5 (a dog, dog runs, runs in); 3-grams 2/4; 4-grams 1/3.
    # Corpus precisions: 11/12, 8/10, 4/8, 1/6. Lengths: 12 hypothesis words, closest reference lengths 6 + 6 = 12,
    # so no brevity penalty. BLEU-4 = (11/12 * 8/10 * 4/8 * 1/6) ** (1/4).
    expected = (11 / 12 * 8 / 10 * 4 / 8 * 1 / 6) ** 0.25
    scores = caption_scores(
        ["The cat sat on the mat.", "A dog runs in a park"],
        [["the cat is on the mat", "a cat sat on a mat"], ["A dog runs in the park."]],
    )
    assert scores["bleu4"] == pytest.approx(expected, abs=1e-6)


def test_bleu4_brevity_penalty_by_hand(coco_scorers):
    # "a dog runs in" vs "a dog runs in the park": every n-gram precision is 1 (4/4, 3/3, 2/2, 1/1);
    # c = 4 < r = 6, so BP = exp(1 - 6/4) = exp(-0.5).
    scores = caption_scores(["A dog runs in."], [["a dog runs in the park"]])
    assert scores["bleu4"] == pytest.approx(math.exp(-0.5), abs=1e-6)


REFS = [
    ["a cat sleeping on a red sofa", "a cat is asleep on the couch"],
    ["a man riding a wave on a surfboard", "a surfer rides a big wave"],
    ["a plate of pasta with tomato sauce", "a bowl of spaghetti with sauce"],
]


def test_cider_rewards_matching_captions(coco_scorers):
    matching = caption_scores([refs[0] for refs in REFS], REFS)["cider"]
    partial = caption_scores(["a cat on a sofa", "a man on a wave", "a plate of food"], REFS)["cider"]
    unrelated = caption_scores(["zebras graze quietly", "two giraffes stand tall", "an elephant drinks water"], REFS)
    assert matching > partial > 0.0
    assert unrelated["cider"] == 0.0  # no n-gram shared with any reference


def test_cider_two_images_by_hand(coco_scorers):
    # 2 images, ref_len = log 2. "a" is in both images' references: idf = log 2 - log 2 = 0; "cat", "dog" and the
    # bigrams "a cat", "a dog" are in one: idf = log 2. Each prediction equals its reference, so the 1-gram and 2-gram
    # cosines are 1; there are no 3- and 4-grams (cosine 0); equal lengths give no Gaussian penalty.
    # Per image: mean(1, 1, 0, 0) / 1 reference * 10 = 5.0.
    scores = caption_scores(["A cat.", "a dog"], [["a cat"], ["a dog"]])
    assert scores["cider"] == pytest.approx(5.0)


def test_cider_of_a_single_image_is_degenerate(coco_scorers):
    # IDF over a one-image reference set is log(1) - log(1) = 0 for every n-gram: CIDEr is 0 even for an exact match.
    scores = caption_scores(["a cat sleeping on a red sofa"], [["a cat sleeping on a red sofa"]])
    assert scores["cider"] == 0.0
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)


def test_caption_scores_validates_inputs(coco_scorers):
    with pytest.raises(ValueError, match="differ in length"):
        caption_scores(["a cat"], [["a cat"], ["a dog"]])
    with pytest.raises(ValueError, match="non-empty"):
        caption_scores([], [])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        caption_scores(["a cat"], [[]])
    with pytest.raises(ValueError, match="empty after tokenisation"):
        caption_scores(["a cat"], [["..."]])


def test_caption_scores_without_pycocoevalcap_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap.bleu.bleu", None)  # makes the import fail
    with pytest.raises(ImportError, match=r'pip install "vldistill\[captioning\]"'):
        caption_scores(["a cat"], [["a cat"]])


# ----------------------------------------------------------------------------------------------------------------------
# Classification and multiple choice


def test_accuracy_visual_entailment_labels():
    # labels: 0 entailment, 1 neutral, 2 contradiction; 3 of 4 right
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(0.75)
    assert accuracy(["entailment", "neutral"], ["entailment", "contradiction"]) == pytest.approx(0.5)


def test_accuracy_rejects_bad_inputs():
    with pytest.raises(ValueError, match="non-empty"):
        accuracy([], [])
    with pytest.raises(ValueError, match="differ in length: 2 vs 3"):
        accuracy([0, 1], [0, 1, 2])


def test_multiple_choice_accuracy_vcr():
    # item:        0  1  2  3
    # answer ok:   y  y  n  y   -> q2a 3/4
    # rationale ok y  n  y  y   -> qa2r 3/4
    # both:        y  n  n  y   -> q2ar 2/4
    scores = multiple_choice_accuracy([0, 1, 2, 3], [0, 1, 0, 3], [1, 1, 1, 0], [1, 0, 1, 0])
    assert scores == pytest.approx({"q2a": 0.75, "qa2r": 0.75, "q2ar": 0.5})
    assert multiple_choice_accuracy([0, 1, 2, 3], [0, 1, 0, 3]) == pytest.approx({"q2a": 0.75})


def test_multiple_choice_accuracy_rejects_bad_inputs():
    with pytest.raises(ValueError, match="given together"):
        multiple_choice_accuracy([0], [0], qa2r_pred=[1])
    with pytest.raises(ValueError, match="rationale and answer lists differ in length"):
        multiple_choice_accuracy([0, 1], [0, 1], [1], [1])
    with pytest.raises(ValueError, match="differ in length"):
        multiple_choice_accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="non-empty"):
        multiple_choice_accuracy([], [])
