"""The inputs side of the ``seq2seq`` student (:mod:`vldistill.students.seq2seq`): BART-style span corruption of
captions (:func:`span_corrupt`, seeded per sample and epoch by :func:`corruption_generator`) and the
:class:`Seq2SeqProcessor`, which tokenises raw samples into the student's inputs: clean texts for the text
features, and the LM's input and labels (a span-corrupted caption for ICTI, or a VQA question filled into the
student's prompt template). Also the small readers of raw samples that the ``crossmodal`` student shares.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .seq2seq import Seq2SeqOptions


# ------------------------------------------------------------------------------------------ span corruption
def span_corrupt(
    token_ids: Sequence[int],
    mask_id: int,
    ratio: float = 0.3,
    mean_span: float = 3.0,
    generator: torch.Generator | None = None,
    special_ids: Collection[int] = (),
) -> list[int]:
    """BART text infilling: replace random spans covering about ``ratio`` of the tokens, each by ONE mask token.

    Lewis et al., "BART", ACL 2020, section 2.2: span lengths ~ Poisson(``mean_span``) (3 in the paper), drawn until
    they cover ``round(ratio * m)`` of the ``m`` maskable tokens (the last one is cut to fit; zero-length spans,
    BART's mask insertions, are drawn again as length 1). Spans are placed longest first, uniformly among the
    positions where they fit without touching a special token or another span (so every mask stands for one span);
    a span that fits nowhere is split. Special tokens (``special_ids``: BOS, EOS, padding, ...) are never masked.

    Args:
        token_ids: one tokenised text, without padding.
        mask_id: the id that replaces each span.
        ratio: fraction of the maskable tokens to cover, in ``[0, 1]``.
        mean_span: mean span length (> 0).
        generator: random source; the same seed gives the same corruption.
        special_ids: ids that are never masked.

    Returns:
        The corrupted ids (shorter than ``token_ids`` by the masked tokens minus the number of spans).
    """
    ids = list(token_ids)
    return apply_spans(ids, corruption_spans(ids, ratio, mean_span, generator, special_ids), mask_id)


def apply_spans(token_ids: Sequence[int], spans: Mapping[int, int], mask_id: int) -> list[int]:
    """``token_ids`` with each span (``{start: length}``, from :func:`corruption_spans`) replaced by one mask."""
    ids, out, i = list(token_ids), [], 0
    while i < len(ids):
        if i in spans:
            out.append(mask_id)
            i += spans[i]
        else:
            out.append(ids[i])
            i += 1
    return out


def corruption_spans(
    token_ids: Sequence[int],
    ratio: float = 0.3,
    mean_span: float = 3.0,
    generator: torch.Generator | None = None,
    special_ids: Collection[int] = (),
) -> dict[int, int]:
    """The spans :func:`span_corrupt` replaces, as ``{start position: length}`` (same arguments, same draws): what a
    denoising evaluation scores, the tokens that were hidden."""
    if not 0 <= ratio <= 1 or not mean_span > 0:
        raise ValueError(f"span_corrupt needs ratio in [0, 1] and mean_span > 0; got {ratio!r}, {mean_span!r}")
    ids = list(token_ids)
    special = set(special_ids)
    target = round(ratio * sum(t not in special for t in ids))
    lengths = _span_lengths(target, mean_span, generator)
    return _place_spans(ids, special, lengths, generator)


def _span_lengths(target: int, mean_span: float, generator: torch.Generator | None) -> list[int]:
    lengths, covered = [], 0
    rate = torch.tensor([float(mean_span)])
    while covered < target:
        n = int(torch.poisson(rate, generator=generator).item())
        n = max(1, min(n, target - covered))
        lengths.append(n)
        covered += n
    return sorted(lengths, reverse=True)


def _place_spans(
    ids: list[int], special: set[int], lengths: list[int], generator: torch.Generator | None
) -> dict[int, int]:
    """Span start -> length, for non-overlapping, non-adjacent spans of non-special tokens."""
    blocked = [t in special for t in ids]  # special, masked, or next to a masked token
    starts: dict[int, int] = {}
    queue = list(lengths)
    while queue:
        want = queue.pop(0)
        n, fits = want, _fitting_starts(blocked, want)
        while not fits and n > 1:  # split: place the longest part that fits now, the rest later
            n -= 1
            fits = _fitting_starts(blocked, n)
        if not fits:
            break
        if n < want:
            queue.append(want - n)
        start = fits[int(torch.randint(len(fits), (1,), generator=generator).item())]
        starts[start] = n
        for j in range(max(0, start - 1), min(len(ids), start + n + 1)):
            blocked[j] = True
    return starts


def _fitting_starts(blocked: list[bool], n: int) -> list[int]:
    run, starts = 0, []
    for i, b in enumerate(blocked):
        run = 0 if b else run + 1
        if run >= n:
            starts.append(i - n + 1)
    return starts


def corruption_generator(seed: int, index: int, epoch: int) -> torch.Generator:
    """A generator seeded from ``(seed, sample index, epoch)``: a resumed run corrupts every sample the same way."""
    digest = hashlib.blake2b(f"{seed}:{index}:{epoch}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


# ------------------------------------------------------------------------------------------------ processor
class Seq2SeqProcessor:
    """Raw samples -> inputs of a :class:`Seq2SeqStudent` (picklable; see :meth:`__call__` for the layout).

    Args:
        tokenizer: the LM's tokenizer.
        options: the student's options (template, corruption settings, truncation).
        epoch: the epoch whose corruption to draw (:meth:`set_epoch`; a sample's own ``epoch`` key wins).
    """

    def __init__(self, tokenizer, options: Seq2SeqOptions, epoch: int = 0):
        self.tokenizer = tokenizer
        self.options = options
        self.epoch = epoch
        self.max_length = options.max_length or min(getattr(tokenizer, "model_max_length", 128) or 128, 128)
        self.mask_token = mask_token_of(tokenizer, options.mask_token)
        self.mask_id = tokenizer.convert_tokens_to_ids(self.mask_token)
        self.special_ids = set(tokenizer.all_special_ids) - {self.mask_id}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Tokenise a batch of one sample kind.

        Returns:
            ``{"index": [B] long, "text": {field: {"input_ids": [B, L], "attention_mask": [B, L]}}, "lm":
            {"input_ids": [B, L'], "attention_mask": [B, L'], "labels": [B, T] (-100 on padding)}, "targets":
            {...}}``. Image-text pairs: one text field per caption language (the clean caption); the LM input is
            the span-corrupted caption of the first language and its labels the clean caption. VQA: text field
            ``question``; the LM input is the question in ``template`` and its labels the answer; ``targets``
            holds ``answer`` ``[B]`` (``answer_index``).
        """
        if not samples:
            raise ValueError("the seq2seq processor got an empty batch")
        kind = _batch_kind(samples)
        if kind == "pair":
            return self._pairs(samples)
        if kind == "vqa":
            return self._vqa(samples)
        raise ValueError(f"the seq2seq student takes image-text pairs and vqa samples, not {kind!r} samples")

    def _pairs(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        languages = list(samples[0]["captions"])
        texts = {lang: [sample_text(s, "captions", lang) for s in samples] for lang in languages}
        clean = self.tokenizer(texts[languages[0]], truncation=True, max_length=self.max_length)["input_ids"]
        corrupted = [self._corrupt(ids, s) for ids, s in zip(clean, samples, strict=True)]
        return {
            "index": sample_indices(samples),
            "text": {lang: self.encode(t) for lang, t in texts.items()},
            "lm": {**self._pad(corrupted), "labels": _labels(self._pad(clean))},
            "targets": {},
        }

    def _vqa(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        questions = [sample_text(s, "question") for s in samples]
        prompts = [self.options.template.format(question=q, mask=self.mask_token) for q in questions]
        answers = [sample_text(s, "answer") for s in samples]
        return {
            "index": sample_indices(samples),
            "text": {"question": self.encode(questions)},
            "lm": {**self.encode(prompts), "labels": _labels(self.encode(answers))},
            "targets": {"answer": torch.tensor([int(s["answer_index"]) for s in samples], dtype=torch.long)},
        }

    def _corrupt(self, ids: list[int], sample: Mapping[str, Any]) -> list[int]:
        generator = corruption_generator(self.options.seed, int(sample["index"]), int(sample.get("epoch", self.epoch)))
        o = self.options
        return span_corrupt(ids, self.mask_id, o.mask_ratio, o.mean_span, generator, self.special_ids)

    def encode(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Tokenise, truncate and pad texts as they are (no corruption)."""
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _pad(self, ids: list[list[int]]) -> dict[str, Tensor]:
        """Pad token-id lists to one length on the tokenizer's padding side."""
        width = max(len(x) for x in ids)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            span = slice(width - len(x), width) if left else slice(0, len(x))
            input_ids[row, span] = torch.tensor(x, dtype=torch.long)
            attention_mask[row, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def mask_token_of(tokenizer, mask_token: str | None = None) -> str:
    """The token that stands for a masked span: given, the tokenizer's ``mask_token``, or T5's ``<extra_id_0>``."""
    token = mask_token or getattr(tokenizer, "mask_token", None)
    if token is None and "<extra_id_0>" in tokenizer.get_vocab():
        token = "<extra_id_0>"
    if token is None or token not in tokenizer.get_vocab():
        raise ValueError(f"the tokenizer has no mask token {token!r}; pass mask_token= (a token of its vocabulary)")
    return token


def _batch_kind(samples: Sequence[Mapping[str, Any]]) -> str:
    kinds = {s.get("kind", "pair") for s in samples}
    if len(kinds) != 1:
        raise ValueError(f"one batch holds samples of several kinds: {sorted(kinds)}")
    return kinds.pop()


def sample_text(sample: Mapping[str, Any], key: str, lang: str | None = None) -> str:
    value = sample.get(key)
    if lang is not None:
        value = (value or {}).get(lang)
    name = f"{key}[{lang!r}]" if lang is not None else key
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"sample {sample.get('index')!r}: {name} is empty or not a string: {value!r}")
    return value


def sample_indices(samples: Sequence[Mapping[str, Any]]) -> Tensor:
    return torch.tensor([int(s["index"]) for s in samples], dtype=torch.long)


def _labels(enc: Mapping[str, Tensor]) -> Tensor:
    return enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
