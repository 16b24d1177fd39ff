"""Task metrics (METHODS.md section 5): VQA accuracy, captioning BLEU-4 / CIDEr-D, classification and VCR accuracy.

All functions are pure: they take predictions and references as plain Python values and return floats.

- VQA: the answer normalisation and the 10-choose-9 accuracy of the official evaluation script
  (GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, last revision "Fixed processing answers bug";
  the same code is ``open_flamingo/eval/vqa_metric.py``), reimplemented quirks included.
- Captioning: the reference scorers of the COCO caption evaluation (``pycocoevalcap``, the ``captioning`` extra), fed by
  a pure-Python stand-in for its Java ``PTBTokenizer`` (:func:`tokenize_caption`); Chinese is scored per character.
- Visual entailment (labels 0 entailment, 1 neutral, 2 contradiction): :func:`accuracy`; VCR: Q->A, QA->R and Q->AR
  with :func:`multiple_choice_accuracy`.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence

# ---------------------------------------------------------------------------------------------------------------------
# VQA answer normalisation (tables reproduced from the official vqaEval.py)
# ---------------------------------------------------------------------------------------------------------------------

# fmt: off
VQA_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
# fmt: on

VQA_MANUAL_MAP: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
VQA_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
VQA_PUNCT: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

# The official periodStrip is "(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a lookahead (not the intended lookbehind) that
# always holds at a ".", so the pattern removes every period not followed by a digit ("2.5" keeps its period, "2." not).
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
# The official script passes re.UNICODE (== 32) as the *count* argument of sub(), so it removes at most 32 periods.
_PERIOD_STRIP_COUNT = 32
_COMMA_STRIP = re.compile(r"\d,\d")


def _clean_whitespace(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    # As in the official processPunctuation: a mark next to a space, or any mark at all once the text holds a
    # digit-comma-digit ("1,000"), is deleted; otherwise it becomes a space ("yes!" -> "yes ", "a/b" -> "a b").
    # The test reads the original text, not the partly processed one.
    delete_all = _COMMA_STRIP.search(text) is not None
    out = text
    for mark in VQA_PUNCT:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    # Number words are mapped before the article filter, contractions after it, as in the official processDigitArticle.
    words = [VQA_MANUAL_MAP.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in VQA_ARTICLES]
    return " ".join(VQA_CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(answer: str, all_same: bool = False) -> str:
    """Normalises a VQA answer as the official evaluation script does.

    Newlines and tabs become spaces and the answer is stripped. Unless ``all_same``, the official punctuation rules
    follow (see ``VQA_PUNCT``; all marks are deleted when the answer holds a digit-comma-digit such as "1,000"; periods
    not followed by a digit are deleted), then lowercasing, number words to digits (``VQA_MANUAL_MAP``, "none" -> "0"),
    removal of the articles a/an/the and contraction repair (``VQA_CONTRACTIONS``, "dont" -> "don't").

    The official script skips everything but the stripping, for the references and the prediction alike, when all
    reference answers of a question are identical after stripping: pass ``all_same=True`` for that case.
    :func:`vqa_accuracy` makes the choice itself.

    Args:
        answer: A predicted or reference answer.
        all_same: Whether the question's reference answers are all identical (after stripping).

    Returns:
        The normalised answer.
    """
    text = _clean_whitespace(answer)
    if all_same:
        return text
    return _process_digit_article(_process_punctuation(text))


# ---------------------------------------------------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------------------------------------------------


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """Official VQA accuracy of one answer: ``min(#matching annotators / 3, 1)`` averaged over leave-one-out subsets.

    For each reference ``i``, the prediction scores ``min(m_i / 3, 1)`` where ``m_i`` counts the *other* references
    equal to it; the accuracy is the mean over ``i`` (for the usual 10 answers, the mean over the 10 subsets of 9).
    Comparison is exact after :func:`normalize_answer`, applied to prediction and references only when the stripped
    references are not all identical (the official rule: with ten identical references "yes", the prediction "Yes"
    scores 0; the VQA annotations are already lowercase, so normalise predictions beforehand if that matters).

    With a single reference the official formula is always 0 (no other reference is left), so this function returns
    instead the exact match of the fully normalised prediction and reference (as if ``all_same=False``).

    Args:
        prediction: The predicted answer.
        references: The annotators' answers (10 in VQA v2), duplicates included.

    Returns:
        The accuracy in ``[0, 1]``.

    Raises:
        ValueError: If there is no reference.
    """
    if isinstance(references, str):
        raise TypeError("references must be a sequence of answers, not a single string")
    if len(references) == 0:
        raise ValueError("vqa_accuracy needs at least one reference answer, got none")
    if len(references) == 1:
        return float(normalize_answer(prediction) == normalize_answer(references[0]))
    refs = [_clean_whitespace(ref) for ref in references]
    all_same = len(set(refs)) == 1
    refs = [normalize_answer(ref, all_same) for ref in refs]
    pred = normalize_answer(prediction, all_same)
    total_matches = sum(ref == pred for ref in refs)
    # Leaving out reference i removes one match exactly when reference i itself matches.
    per_subset = [min(1.0, (total_matches - (ref == pred)) / 3) for ref in refs]
    return sum(per_subset) / len(per_subset)


def vqa_score(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> float:
    """Mean :func:`vqa_accuracy` over questions.

    Args:
        predictions: One predicted answer per question.
        references_list: The reference answers of each question, in the same order.

    Returns:
        The mean accuracy in ``[0, 1]`` (the official script reports it times 100).

    Raises:
        ValueError: If the inputs are empty, differ in length, or a question has no reference.
    """
    _check_paired("predictions", predictions, "references_list", references_list)
    return sum(vqa_accuracy(p, refs) for p, refs in zip(predictions, references_list, strict=True)) / len(predictions)


# ---------------------------------------------------------------------------------------------------------------------
# Captioning: BLEU-4 and CIDEr-D with pycocoevalcap, tokenised in Python
# ---------------------------------------------------------------------------------------------------------------------

# The tokens that pycocoevalcap's PTBTokenizer wrapper removes after Stanford PTBTokenizer (tokenizer/ptbtokenizer.py).
# The bracket names are upper case there, but the wrapper runs PTBTokenizer with -lowerCase, which lowercases them too,
# so "-lrb-" and friends survive in the real pipeline; tokenize_caption keeps them likewise.
PTB_PUNCTUATIONS: frozenset[str] = frozenset(
    {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2026": "...", "\u2013": "--",
                         "\u2014": "--"})  # fmt: skip
# Words whose final period PTBTokenizer keeps (a subset of its abbreviation list: the ones met in captions).
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "inc", "co", "ltd", "corp", "mt", "prof", "ave", "rd",
    "blvd", "ft", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
})  # fmt: skip
# Words PTBTokenizer splits in two.
_SPLIT_WORDS = {
    "cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"), "wanna": ("wan", "na"),
    "lemme": ("lem", "me"), "gimme": ("gim", "me"), "'tis": ("'t", "is"), "'twas": ("'t", "was"),
}  # fmt: skip
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_PADDED = re.compile(r"(?<=\w)\.{3,}(?=\w)|-{2,}|[?!]+|[;$%*+=&]|#(?![a-z])|(?<!\d)[,:]|[,:](?!\d)")
# Tokens never split further: bracket names and clitics that stand alone ("the dog 's").
_ATOMIC = frozenset({*_BRACKETS.values(), "n't", "'s", "'re", "'ve", "'ll", "'d", "'m"})
# CJK ideographs (the ranges BERT's tokenizer treats as Chinese characters): each one is a token of its own.
_CJK = re.compile(
    "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002b73f"
    "\U0002b740-\U0002b81f\U0002b820-\U0002ceaf\U0002f800-\U0002fa1f]"
)
# Full-width (Chinese) punctuation as its ASCII counterpart, which the PTB rules then drop or keep as for English.
_FULL_WIDTH = str.maketrans({
    "\uff0c": ",", "\u3001": ",", "\u3002": ".", "\uff0e": ".", "\uff01": "!", "\uff1f": "?", "\uff1b": ";",
    "\uff1a": ":", "\uff08": "(", "\uff09": ")", "\u300a": '"', "\u300b": '"', "\u300c": '"', "\u300d": '"',
    "\u300e": '"', "\u300f": '"',
})  # fmt: skip


def _split_word(token: str) -> list[str]:
    if token in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[token])
    if token in _ATOMIC:
        return [token]
    if set(token) == {"."}:
        return ["..."]
    head: list[str] = []
    tail: list[str] = []
    if len(token) > 1 and token[0] in "'-" and token[1].isalpha() and token not in ("'n'", "'em"):
        head.append(token[0])  # an opening single quote (PTB "`") or a leading hyphen
        token = token[1:]
    if len(token) > 1 and token.endswith("."):
        # Trailing periods are split off (and dropped), except one after an abbreviation, an initial or an acronym.
        stem = token.rstrip(".")
        token = stem + "." if (len(stem) == 1 and stem.isalpha()) or "." in stem or stem in _ABBREVIATIONS else stem
        tail.append(".")
    if len(token) > 1 and token[-1] in "'-" and token != "'n'":
        tail.insert(0, token[-1])  # a closing single quote, a possessive plural's apostrophe, or a trailing hyphen
        token = token[:-1]
    clitics: list[str] = []
    while match := _CLITIC.match(token):  # "i'd've" -> "i 'd 've"
        token = match.group(1)
        clitics.insert(0, match.group(2))
    return [*head, token, *clitics, *tail]


def tokenize_caption(caption: str) -> str:
    """Tokenises a caption the way pycocoevalcap's ``PTBTokenizer`` wrapper does, in pure Python.

    The wrapper runs the Java Stanford PTBTokenizer (CoreNLP 3.4.1, ``-preserveLines -lowerCase``) and drops the
    tokens in ``PTB_PUNCTUATIONS``. This function mirrors that for plain English captions: it lowercases; turns
    curly quotes into straight ones; drops double quotes (PTB's `` and '' tokens); splits off and drops . , ; : ? !
    ... -- and opening/closing single quotes, keeping commas and colons between digits ("1,000", "10:30") and the
    period of abbreviations, initials and dotted acronyms ("mr.", "a.", "u.s."); splits off $ % * + = &, # before a
    non-letter, and runs such as "!!" (kept as tokens, as PTB does); splits clitics ("dog's" -> "dog 's", "don't" ->
    "do n't", "can't" -> "ca n't") and "cannot", "gonna" and the like; and writes brackets as PTB does after
    lowercasing ("-lrb-", "-rrb-", ...), which the wrapper's upper-case list fails to drop. Hyphenated words, slashes
    and inner periods ("black-and-white", "bag/purse", "3.5") stay whole.

    Chinese (which PTBTokenizer does not segment, and which has no spaces) is scored per character, as Chinese
    captioning evaluations often do instead of a word segmenter: every CJK ideograph becomes a token of its own
    (``一个红色的圆形`` -> ``一 个 红 色 的 圆 形``; spaces between characters, as a WordPiece LM writes them, change
    nothing), and full-width punctuation (，。、！？；：（）《》「」『』) is read as its ASCII counterpart and dropped
    like it. Text without CJK characters tokenises exactly as before.

    It was checked against the Java tokenizer on a set of captions; unusual strings (e.g. "x...y", "y'all") can
    still tokenise differently.

    Args:
        caption: A raw caption.

    Returns:
        The tokens joined by single spaces.
    """
    text = caption.replace("\n", " ").translate(_QUOTES).translate(_FULL_WIDTH).lower()
    text = _CJK.sub(lambda m: f" {m.group()} ", text)
    text = text.replace("``", " ").replace("''", " ").replace('"', " ").replace("`", "'")
    for bracket, name in _BRACKETS.items():
        text = text.replace(bracket, f" {name} ")
    text = _PADDED.sub(lambda m: " -- " if m.group().startswith("--") else f" {m.group()} ", text)
    tokens = [piece for word in text.split() for piece in _split_word(word)]
    return " ".join(token for token in tokens if token not in PTB_PUNCTUATIONS)


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr-D of generated captions with the COCO caption reference scorers (pycocoevalcap).

    Captions are tokenised with :func:`tokenize_caption` in place of the Java ``PTBTokenizer``, then scored by
    ``pycocoevalcap.bleu.bleu.Bleu(4)`` (corpus BLEU with the "closest" reference length, as coco-caption reports it)
    and ``pycocoevalcap.cider.cider.Cider()``, which is CIDEr-D (clipped n-gram counts, Gaussian length penalty with
    sigma 6, times 10). Values are as pycocoevalcap returns them; papers usually print them times 100.

    CIDEr's IDF weights come from the references passed in, so scores depend on the evaluated set: on a set of one
    image every IDF is ``log(1) - log(1) = 0`` and CIDEr is 0 whatever the captions; n-grams present in the references
    of every image weigh nothing. Compare CIDEr only across runs on the same, reasonably large, set.

    Args:
        predictions: One generated caption per image.
        references: The reference captions of each image, in the same order.

    Returns:
        ``{"bleu4": ..., "cider": ...}``.

    Raises:
        ImportError: If pycocoevalcap is not installed.
        ValueError: If the inputs are empty, differ in length, an image has no reference, or no reference has a token.
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as err:
        raise ImportError(
            'caption_scores needs pycocoevalcap, the COCO caption scorers: pip install "vldistill[captioning]"'
        ) from err
    _check_paired("predictions", predictions, "references", references)
    gts: dict[int, list[str]] = {}
    res: dict[int, list[str]] = {}
    for i, (prediction, refs) in enumerate(zip(predictions, references, strict=True)):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{i}] must be a non-empty sequence of captions, got {refs!r}")
        gts[i] = [tokenize_caption(ref) for ref in refs]
        res[i] = [tokenize_caption(prediction)]
    if not any(ref for refs in gts.values() for ref in refs):
        raise ValueError("every reference caption is empty after tokenisation: nothing to score against")
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


# ---------------------------------------------------------------------------------------------------------------------
# Classification (visual entailment) and multiple choice (VCR)
# ---------------------------------------------------------------------------------------------------------------------

VE_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")
"""SNLI-VE label names by class index."""


def _check_paired(pred_name: str, preds: Sequence, gold_name: str, gold: Sequence) -> None:
    if len(preds) == 0 or len(gold) == 0:
        raise ValueError(f"{pred_name} and {gold_name} must be non-empty, got {len(preds)} and {len(gold)} items")
    if len(preds) != len(gold):
        raise ValueError(f"{pred_name} and {gold_name} differ in length: {len(preds)} vs {len(gold)}")


def accuracy(predictions: Sequence[Hashable], targets: Sequence[Hashable]) -> float:
    """Fraction of predictions equal to their target (e.g. 3-way visual entailment, labels as in ``VE_LABELS``).

    Args:
        predictions: Predicted labels (ints or strings).
        targets: Gold labels, in the same order.

    Returns:
        The accuracy in ``[0, 1]``.

    Raises:
        ValueError: If the inputs are empty or differ in length.
    """
    _check_paired("predictions", predictions, "targets", targets)
    return sum(bool(p == t) for p, t in zip(predictions, targets, strict=True)) / len(predictions)


def multiple_choice_accuracy(
    q2a_pred: Sequence[int],
    q2a_gold: Sequence[int],
    qa2r_pred: Sequence[int] | None = None,
    qa2r_gold: Sequence[int] | None = None,
) -> dict[str, float]:
    """VCR accuracies: Q->A, and with rationales QA->R and Q->AR.

    Q->AR counts an item as right only when both its answer and its rationale are right (the VCR protocol; the
    rationale is chosen given the gold answer).

    Args:
        q2a_pred: Chosen answer index per item.
        q2a_gold: Gold answer index per item.
        qa2r_pred: Chosen rationale index per item, or None.
        qa2r_gold: Gold rationale index per item, or None.

    Returns:
        ``{"q2a": ...}``, plus ``"qa2r"`` and ``"q2ar"`` when rationales are given.

    Raises:
        ValueError: If inputs are empty or differ in length, or only one of ``qa2r_pred`` and ``qa2r_gold`` is given.
    """
    _check_paired("q2a_pred", q2a_pred, "q2a_gold", q2a_gold)
    answer_right = [bool(p == g) for p, g in zip(q2a_pred, q2a_gold, strict=True)]
    scores = {"q2a": sum(answer_right) / len(answer_right)}
    if qa2r_pred is None and qa2r_gold is None:
        return scores
    if qa2r_pred is None or qa2r_gold is None:
        raise ValueError("qa2r_pred and qa2r_gold must be given together (or both left out)")
    _check_paired("qa2r_pred", qa2r_pred, "qa2r_gold", qa2r_gold)
    if len(qa2r_pred) != len(q2a_pred):
        raise ValueError(f"rationale and answer lists differ in length: {len(qa2r_pred)} vs {len(q2a_pred)}")
    rationale_right = [bool(p == g) for p, g in zip(qa2r_pred, qa2r_gold, strict=True)]
    scores["qa2r"] = sum(rationale_right) / len(rationale_right)
    scores["q2ar"] = sum(a and r for a, r in zip(answer_right, rationale_right, strict=True)) / len(answer_right)
    return scores
