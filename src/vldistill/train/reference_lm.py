"""The bundled VLKD run's reference LM: a small BART pretrained on text only, then aligned by VLKD.

No pretrained LM can be downloaded here, so the bundled run first makes one, the way BART was made (denoising), on
text alone, and caches it like the quickstart's reference teacher (``runs/lms/reference-lm-KEY/``, ``KEY`` a hash
of its settings, its text and the vldistill version; a changed setting trains a new one). VLKD then aligns it to
the reference teacher on image-caption pairs only (``recipes/vlkd.yaml``).

**What the LM saw** (also written to ``saw.json`` beside the model, with counts and examples). The default, English
LM: only text built from the English captions of the bundled *training* split (``bundled:easyvqa``, 4,000 captions;
144 distinct strings: 8 colours x 3 shapes x 6 phrasings). From each caption, with the colour ``c`` and shape ``s``
read from its words:

1. the caption itself (``a red circle``, ``there is a blue triangle``, ...);
2. ``a picture of a {c} {s}``;
3. three question-answer sentences ``{caption} question: {q} answer: {a}``: one colour question, one shape question
   and one yes/no question, each template drawn with a seeded generator from :data:`QUESTION_TEMPLATES`, the
   answer read from the caption's words (a yes/no question names the caption's own colour or shape, or another one,
   with equal probability, in the affirmative or negated form).

**Other languages** (``ReferenceLMConfig.languages``, default ``("en",)``: the English LM above, whose cache key the
field leaves unchanged). With ``"zh"`` among them, the LM also sees, from the Chinese caption of each training
sample (the parallel translation of its English caption, ``bundled:easyvqa``'s ``zh`` field; 144 distinct strings):

1. the Chinese caption itself (``一个红色的圆形``, ``有一个蓝色的三角形``, ...);
2. ``图片上是一个{c}的{s}`` (``{c}``/``{s}`` the caption's Chinese colour and shape words), the sentence the
   ``vlkd-zh`` recipe's caption prompt ``图片上是{mask}`` asks the LM to complete, as ``a picture of a {c} {s}``
   does for ``A picture of {mask}``.

No Chinese question-answer sentence: the bundled VQA questions are English only, so the Chinese side is evaluated by
captioning and the text skill alone. ``languages=("zh",)`` gives a Chinese-only LM, ``("zh", "en")`` a bilingual
one (the English sentences exactly as above, then the Chinese ones; the two are shuffled together in training). The
LM is never shown that a Chinese caption and an English one are translations of each other.

Every sentence is corrupted BART-style (span lengths ~ Poisson(3), 30% of the tokens, one ``[MASK]`` per span),
except that half of the question-answer sentences get exactly their answer masked; the LM reconstructs the clean
sentence. Its WordPiece tokenizer is trained on the same sentences (Chinese split into characters, every one of them
in its vocabulary). The LM never sees an image, an image embedding, an easy-vqa question or answer, or anything of the
test split. Its question templates were written for this module to resemble easy-vqa's question forms, and several
are the same strings as easy-vqa questions (e.g. ``what color is the shape?``): the zero-shot claim is that no
image-question-answer triple (nor any image) was trained on, not that the question wording is new to the LM.

The settings are a documented dataclass (:class:`ReferenceLMConfig`) rather than a recipe: text-only pretraining
has no images, no teacher and no stages, which the recipe schema and the trainer assume.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, BartConfig, BartForConditionalGeneration

from .. import __version__
from ..config import non_default
from ..data.easyvqa import COLORS, COLORS_ZH, SHAPES, SHAPES_ZH
from ..students.seq2seq_inputs import apply_spans, corruption_generator, corruption_spans
from ..tokenization import train_wordpiece

QUESTION_TEMPLATES = {
    "colour": ["what color is the shape?", "what is the color of the {s}?", "what color is the {s}?"],
    "shape": ["what shape is in the image?", "what is the {c} shape?", "what shape is it?"],
    "yes_no": [
        "is there a {x} shape?",
        "is there not a {x} shape?",
        "is there a {y}?",
        "does the image contain a {y}?",
    ],
}
"""Question templates of the text-only QA sentences: ``{c}``/``{s}`` the caption's colour/shape, ``{x}``/``{y}`` a
colour/shape that is the caption's own or another (yes/no)."""

PICTURE_ZH = "图片上是一个{c}的{s}"
"""The Chinese counterpart of ``a picture of a {c} {s}`` (what ``vlkd-zh``'s prompt ``图片上是{mask}`` completes)."""

LANGUAGES = ("en", "zh")
"""Caption languages the reference LM can be pretrained on (``bundled:easyvqa``'s)."""


@dataclass(frozen=True)
class ReferenceLMConfig:
    """Settings of the reference LM (a BART from a config, random initialisation) and of its text-only pretraining.

    Attributes:
        d_model: hidden width.
        layers: encoder layers, and as many decoder layers.
        heads: attention heads.
        ffn: feed-forward width.
        max_positions: positions (prompts and captions are short).
        vocab_size: WordPiece vocabulary size (special tokens and characters included).
        steps: optimiser steps.
        batch_size: sentences per step.
        lr: peak AdamW learning rate (linear warm-up, then cosine to zero).
        warmup_steps: warm-up steps.
        weight_decay: AdamW weight decay.
        dropout: BART dropout.
        seed: seeds the initialisation, the data order, the QA templates and the corruption.
        mask_ratio: fraction of tokens BART text infilling hides.
        mean_span: mean span length (Poisson).
        answer_mask_prob: fraction of QA sentences whose answer alone is masked (the others: random spans).
        limit_train: use only this many training captions (``None``: all 4,000).
        languages: the caption languages whose sentences the LM is pretrained on, from ``("en", "zh")`` (see the
            module docstring); default English only. A list is stored as a tuple.
    """

    d_model: int = 128
    layers: int = 3
    heads: int = 4
    ffn: int = 512
    max_positions: int = 64
    vocab_size: int = 600
    steps: int = 800
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 80
    weight_decay: float = 0.01
    dropout: float = 0.1
    seed: int = 0
    mask_ratio: float = 0.3
    mean_span: float = 3.0
    answer_mask_prob: float = 0.5
    limit_train: int | None = None
    languages: tuple[str, ...] = ("en",)

    def __post_init__(self) -> None:
        langs = (self.languages,) if isinstance(self.languages, str) else tuple(self.languages)
        if not langs or len(set(langs)) != len(langs) or any(lang not in LANGUAGES for lang in langs):
            raise ValueError(
                f"ReferenceLMConfig.languages={self.languages!r} is not allowed; give distinct languages from "
                f"{', '.join(LANGUAGES)}"
            )
        object.__setattr__(self, "languages", langs)  # a list from a command line or JSON keys as the tuple default


#: A reference LM that trains in seconds (the tests; its text skill is not meaningful).
FAST = ReferenceLMConfig(d_model=32, layers=1, heads=2, ffn=64, steps=30, batch_size=32, warmup_steps=5, dropout=0.0)


# ---------------------------------------------------------------------------------------------------- corpus
@dataclass(frozen=True)
class TextItem:
    """One pretraining sentence: ``kind`` is ``caption``, ``picture`` or ``qa`` (then ``answer`` is its answer);
    ``lang`` its language."""

    text: str
    kind: str
    answer: str | None = None
    lang: str = "en"


def caption_words(caption: str) -> tuple[str | None, str | None]:
    """The colour and shape words of a bundled caption (``None`` where there is none)."""
    words = caption.lower().replace(",", " ").split()
    colour = next((w for w in words if w in COLORS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return colour, shape


def caption_words_zh(caption: str) -> tuple[str | None, str | None]:
    """The Chinese colour and shape words of a bundled Chinese caption (``None`` where there is none)."""
    colour = next((w for w in COLORS_ZH.values() if w in caption), None)
    shape = next((w for w in SHAPES_ZH.values() if w in caption), None)
    return colour, shape


def qa_sentences(caption: str, rng: random.Random) -> list[TextItem]:
    """Three question-answer sentences about a caption, from its words alone (none without a colour and shape)."""
    c, s = caption_words(caption)
    if c is None or s is None:
        return []
    out = []
    for kind in ("colour", "shape"):
        q = rng.choice(QUESTION_TEMPLATES[kind]).format(c=c, s=s)
        out.append((q, c if kind == "colour" else s))
    template = rng.choice(QUESTION_TEMPLATES["yes_no"])
    own = rng.random() < 0.5
    x = c if own else rng.choice([o for o in COLORS if o != c])
    y = s if own else rng.choice([o for o in SHAPES if o != s])
    present = (x == c) if "{x}" in template else (y == s)
    answer = "yes" if present != ("not" in template.split()) else "no"
    out.append((template.format(x=x, y=y), answer))
    return [TextItem(f"{caption} question: {q} answer: {a}", "qa", a) for q, a in out]


Captions = Sequence[str] | Mapping[str, Sequence[str]]
"""Captions of one language (a list: English, or the one language asked for) or of several (language -> list)."""


def captions_by_language(captions: Captions, languages: Sequence[str] = ("en",)) -> dict[str, list[str]]:
    """``captions`` as ``{language: list}`` for ``languages``; a plain list is the captions of the only language.

    Raises:
        ValueError: a plain list for several languages, or a language missing from the mapping.
    """
    if isinstance(captions, Mapping):
        missing = [lang for lang in languages if lang not in captions]
        if missing:
            raise ValueError(f"reference LM: no captions in {missing}; got captions in {sorted(captions)}")
        return {lang: list(captions[lang]) for lang in languages}
    if isinstance(captions, str) or len(languages) != 1:
        raise ValueError(
            f"reference LM: captions for languages {list(languages)} must be a mapping language -> captions, "
            f"not a {type(captions).__name__}"
        )
    return {languages[0]: list(captions)}


def text_corpus(captions: Captions, seed: int = 0, languages: Sequence[str] = ("en",)) -> list[TextItem]:
    """Everything the reference LM trains on, built from ``captions`` alone (see the module docstring): the English
    sentences first (the same, in the same order, as for an English-only LM), then the Chinese ones."""
    by_lang = captions_by_language(captions, languages)
    rng = random.Random(seed)
    items: list[TextItem] = []
    for caption in by_lang.get("en", []):
        items.append(TextItem(caption, "caption"))
        c, s = caption_words(caption)
        if c is not None and s is not None:
            items.append(TextItem(f"a picture of a {c} {s}", "picture"))
        items.extend(qa_sentences(caption, rng))
    for caption in by_lang.get("zh", []):
        items.append(TextItem(caption, "caption", lang="zh"))
        c, s = caption_words_zh(caption)
        if c is not None and s is not None:
            items.append(TextItem(PICTURE_ZH.format(c=c, s=s), "picture", lang="zh"))
    return items


def held_out_texts(captions: Captions, seed: int = 1, languages: Sequence[str] = ("en",)) -> list[str]:
    """Held-out text for the text-skill figure: the captions and their QA sentences (built the same way)."""
    return [item.text for item in text_corpus(captions, seed, languages) if item.kind in ("caption", "qa")]


def what_the_lm_saw(items: Sequence[TextItem], captions: Captions, source: str) -> dict[str, Any]:
    """A plain account of the pretraining text, saved as ``saw.json`` (an English-only LM's account is as it was
    before languages existed; with other languages, ``captions`` etc. count every language, and
    ``by_language`` splits them)."""
    by_lang = captions_by_language(captions, sorted({item.lang for item in items}, key=LANGUAGES.index) or ["en"])
    kinds = Counter(item.kind for item in items)
    examples: dict[str, list[str]] = {}
    for item in items:
        key = item.kind if item.lang == "en" else f"{item.kind}_{item.lang}"
        if len(examples.setdefault(key, [])) < 4 and item.text not in examples[key]:
            examples[key].append(item.text)
    every = [c for caps in by_lang.values() for c in caps]
    saw: dict[str, Any] = {
        "source": source,
        "captions": len(every),
        "distinct_captions": len(set(every)),
        "sentences": dict(kinds),
        "distinct_sentences": len({item.text for item in items}),
        "question_templates": QUESTION_TEMPLATES,
        "examples": examples,
        "never": "no image or image embedding, no easy-vqa question or answer, nothing from the test split",
    }
    if list(by_lang) != ["en"]:
        saw["languages"] = list(by_lang)
        saw["by_language"] = {
            lang: {
                "captions": len(caps),
                "distinct_captions": len(set(caps)),
                "sentences": dict(Counter(item.kind for item in items if item.lang == lang)),
            }
            for lang, caps in by_lang.items()
        }
        if "zh" in by_lang:
            saw["picture_zh"] = PICTURE_ZH
            saw["never"] += "; no sentence pairing a Chinese caption with its English translation"
    return saw


# ---------------------------------------------------------------------------------------------------- model
def build_lm(tokenizer, cfg: ReferenceLMConfig) -> BartForConditionalGeneration:
    """A BART from a config (random initialisation; seed the RNG first)."""
    eos = tokenizer.eos_token_id
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=cfg.d_model,
        encoder_layers=cfg.layers,
        decoder_layers=cfg.layers,
        encoder_attention_heads=cfg.heads,
        decoder_attention_heads=cfg.heads,
        encoder_ffn_dim=cfg.ffn,
        decoder_ffn_dim=cfg.ffn,
        max_position_embeddings=cfg.max_positions,
        dropout=cfg.dropout,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        decoder_start_token_id=eos,  # as BART: the decoder starts from EOS
        forced_eos_token_id=eos,
    )
    return BartForConditionalGeneration(config)


def corrupt(ids: list[int], item: TextItem, tokenizer, cfg: ReferenceLMConfig, index: int, epoch: int) -> list[int]:
    """BART text infilling of one sentence; a QA sentence has its answer alone masked with ``answer_mask_prob``."""
    generator = corruption_generator(cfg.seed, index, epoch)
    mask_id = tokenizer.mask_token_id
    if item.kind == "qa" and float(torch.rand(1, generator=generator)) < cfg.answer_mask_prob:
        answer = tokenizer(item.answer, add_special_tokens=False)["input_ids"]
        start = len(ids) - 1 - len(answer)  # the answer ends the sentence, before EOS
        if ids[start : start + len(answer)] == answer:
            return apply_spans(ids, {start: len(answer)}, mask_id)
    special = set(tokenizer.all_special_ids) - {mask_id}
    return apply_spans(ids, corruption_spans(ids, cfg.mask_ratio, cfg.mean_span, generator, special), mask_id)


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def pretrain(
    items: Sequence[TextItem], tokenizer, cfg: ReferenceLMConfig, log=None
) -> tuple[BartForConditionalGeneration, list[dict[str, Any]]]:
    """Denoising pretraining on ``items``; returns the LM and its logged losses."""
    from .loop import make_optimizer, warmup_cosine  # the trainer's optimiser and schedule

    torch.manual_seed(cfg.seed)
    model = build_lm(tokenizer, cfg)
    model.train()
    clean = tokenizer([item.text for item in items], truncation=True, max_length=cfg.max_positions)["input_ids"]
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps)
    per_epoch = max(1, len(items) // cfg.batch_size)
    history, t0, perm, epoch = [], time.perf_counter(), None, -1
    for step in range(cfg.steps):
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        batch = perm[(step % per_epoch) * cfg.batch_size : (step % per_epoch + 1) * cfg.batch_size].tolist()
        inputs = _pad([corrupt(clean[i], items[i], tokenizer, cfg, i, epoch) for i in batch], tokenizer.pad_token_id)
        labels = _pad([clean[i] for i in batch], -100)
        loss = model(input_ids=inputs, attention_mask=(inputs != tokenizer.pad_token_id).long(), labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            row = {"step": step + 1, "loss": round(loss.item(), 5), "seconds": round(time.perf_counter() - t0, 1)}
            history.append(row)
            if log is not None:
                log(f"reference LM step {row['step']}/{cfg.steps}: loss {row['loss']:.4f} ({row['seconds']} s)")
    model.eval()
    return model, history


# ---------------------------------------------------------------------------------------------------- cache
def reference_lm_key(cfg: ReferenceLMConfig, captions: Captions) -> str:
    """The cache key: the settings that differ from their defaults (a setting added later keeps the key), the
    training captions (of ``cfg.languages``) and the vldistill version. An English-only LM hashes its captions as it
    did before ``languages`` existed, so its cached LM stays valid."""
    by_lang = captions_by_language(captions, cfg.languages)
    if cfg.languages == ("en",):
        text = "\n".join(by_lang["en"])
    else:
        text = json.dumps(by_lang, ensure_ascii=False, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return hashlib.sha256(json.dumps([non_default(cfg), digest, __version__], sort_keys=True).encode()).hexdigest()[:12]


def bundled_captions(cfg: ReferenceLMConfig) -> list[str] | dict[str, list[str]]:
    """The captions of the bundled training split in ``cfg.languages`` (the only text the reference LM is built
    from): a list for the English-only LM, else ``{language: list}`` (parallel: item ``i`` of each is sample ``i``)."""
    from ..data.sources import load_data

    data = load_data("bundled:easyvqa", "train", list(cfg.languages), limit=cfg.limit_train)
    by_lang = {lang: [s.captions[lang] for s in data.dataset.samples] for lang in cfg.languages}
    return by_lang["en"] if cfg.languages == ("en",) else by_lang


def reference_lm_dir(
    cfg: ReferenceLMConfig = ReferenceLMConfig(),
    cache_root: str | Path = "runs/lms",
    captions: Captions | None = None,
    log=print,
) -> Path:
    """Train (or reuse) the reference LM; return its model directory (``.../reference-lm-KEY/model``, a Hugging
    Face ``BartForConditionalGeneration`` with its tokenizer: ``--student PATH`` of a VLKD recipe).

    ``captions``: the training captions (default :func:`bundled_captions`): a list for an English-only LM (or one
    of one other language), ``{language: list}`` for ``cfg.languages``."""
    captions = captions if captions is not None else bundled_captions(cfg)
    captions = captions_by_language(captions, cfg.languages)
    key = reference_lm_key(cfg, captions)
    final = Path(cache_root) / f"reference-lm-{key}"
    if (final / "model" / "config.json").is_file():
        log(f"reference LM: reusing {final} (delete it to retrain)")
        return final / "model"
    items = text_corpus(captions, cfg.seed, cfg.languages)
    tokenizer = train_wordpiece([item.text for item in items], vocab_size=cfg.vocab_size, max_length=cfg.max_positions)
    log(f"reference LM: pretraining a BART on {len(items)} text-only sentences ({cfg.steps} steps) into {final}")
    start = time.perf_counter()
    model, history = pretrain(items, tokenizer, cfg, log)
    tmp = Path(cache_root) / f".tmp-lm-{key}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    names = {"en": "English", "zh": "Chinese"}
    source = f"bundled:easyvqa train split, {' and '.join(names[lang] for lang in cfg.languages)} captions"
    saw = what_the_lm_saw(items, captions, source)
    (tmp / "saw.json").write_text(json.dumps(saw, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    settings = {**asdict(cfg), "parameters": sum(p.numel() for p in model.parameters()), "version": __version__}
    settings["wall_seconds"] = round(time.perf_counter() - start, 1)
    (tmp / "settings.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    (tmp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # the LM appears complete or not at all
    return final / "model"


def load_reference_lm(directory: str | Path):
    """The LM and its tokenizer from :func:`reference_lm_dir`'s directory (``transformers`` alone)."""
    return AutoModelForSeq2SeqLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)


def main(argv: list[str] | None = None) -> int:
    """``python -m vldistill.train.reference_lm``: train (or reuse) the reference LM and print its directory."""
    parser = argparse.ArgumentParser(prog="python -m vldistill.train.reference_lm", description=__doc__.split("\n")[0])
    parser.add_argument("--cache-root", default="runs/lms", help="where reference LMs are kept (default runs/lms)")
    parser.add_argument("--fast", action="store_true", help="a tiny LM in seconds (not meaningful)")
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps")
    parser.add_argument(
        "--languages", nargs="+", default=None, choices=LANGUAGES,
        help="caption languages to pretrain on (default en; `zh en` for the vlkd-zh recipe's bilingual LM)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    cfg = FAST if args.fast else ReferenceLMConfig()
    if args.steps is not None:
        cfg = ReferenceLMConfig(**{**asdict(cfg), "steps": args.steps})
    if args.languages is not None:
        cfg = ReferenceLMConfig(**{**asdict(cfg), "languages": tuple(args.languages)})
    print(reference_lm_dir(cfg, args.cache_root))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
