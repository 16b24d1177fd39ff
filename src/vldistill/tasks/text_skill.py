"""Text skill of a seq2seq LM: how well it denoises text on its own, with no image (VLKD's claim that the LM keeps its
text abilities, ``METHODS.md`` section 3).

The same evaluation runs on the LM before and after alignment, so the two figures can be put side by side. Each
held-out text is span-corrupted exactly as in training (BART text infilling, :func:`span_corrupt`), but with a fixed
seed per text (``corruption_generator(seed, i, 0)``), so every model sees the very same corrupted inputs. The LM
reads the corrupted text alone (no image prefix) and is scored, teacher-forced, on the tokens the spans hid:

- ``masked_token_accuracy``: the fraction of hidden tokens whose arg-max prediction is right (the headline figure);
- ``masked_token_perplexity``: ``exp`` of their mean cross-entropy.

Only hidden tokens count: a BART-style LM reconstructs the whole text, and copying the visible tokens is no skill.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..students.seq2seq_inputs import apply_spans, corruption_generator, corruption_spans, mask_token_of

NAME = "masked-token accuracy of denoising held-out text without an image (teacher-forced)"


@torch.no_grad()
def denoising_skill(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    mask_ratio: float = 0.3,
    mean_span: float = 3.0,
    seed: int = 0,
    max_length: int = 128,
    batch_size: int = 64,
    mask_token: str | None = None,
) -> dict[str, Any]:
    """Score an encoder-decoder LM (any HF ``*ForConditionalGeneration``) on denoising ``texts``.

    Args:
        model: the LM alone (a student's ``.model``, or one loaded with ``AutoModelForSeq2SeqLM``).
        tokenizer: its tokenizer.
        texts: held-out texts (never trained on).
        mask_ratio: fraction of each text's tokens the spans hide.
        mean_span: mean span length (Poisson).
        seed: seeds the corruption of text ``i`` with ``(seed, i, 0)``.
        max_length: truncation length.
        batch_size: texts per forward pass.
        mask_token: the token a span becomes; default the tokenizer's.

    Returns:
        ``{"masked_token_accuracy", "masked_token_perplexity", "masked_tokens", "texts", "name"}``.

    Raises:
        ValueError: no texts, an empty text, or texts so short that nothing is hidden.
    """
    if not texts:
        raise ValueError("denoising_skill needs at least one held-out text")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"held-out text {i} is empty or not a string: {text!r}")
    mask_id = tokenizer.convert_tokens_to_ids(mask_token_of(tokenizer, mask_token))
    special = set(tokenizer.all_special_ids) - {mask_id}
    clean = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    right, total, nll = 0, 0, 0.0
    try:
        for start in range(0, len(clean), batch_size):
            rows = range(start, min(start + batch_size, len(clean)))
            inputs, hidden = [], []
            for i in rows:
                spans = corruption_spans(clean[i], mask_ratio, mean_span, corruption_generator(seed, i, 0), special)
                inputs.append(apply_spans(clean[i], spans, mask_id))
                hidden.append([p for s, n in spans.items() for p in range(s, s + n)])
            enc, labels = _pad(inputs, tokenizer.pad_token_id), _pad([clean[i] for i in rows], -100)
            logits = model(
                input_ids=enc.to(device), attention_mask=(enc != tokenizer.pad_token_id).long().to(device),
                labels=labels.to(device),
            ).logits.float()  # fmt: skip
            for b, positions in enumerate(hidden):
                if not positions:
                    continue
                idx = torch.tensor(positions, device=device)
                target = labels[b].to(device)[idx]
                right += int((logits[b, idx].argmax(-1) == target).sum())
                nll += float(F.cross_entropy(logits[b, idx], target, reduction="sum"))
                total += len(positions)
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("the held-out texts are too short: span corruption hid no token")
    return {
        "name": NAME,
        "masked_token_accuracy": right / total,
        "masked_token_perplexity": math.exp(nll / total),
        "masked_tokens": total,
        "texts": len(texts),
        "mask_ratio": mask_ratio,
        "mean_span": mean_span,
        "seed": seed,
    }


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out
