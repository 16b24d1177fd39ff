"""Train small WordPiece tokenizers with the `tokenizers` library and wrap them as Hugging Face tokenizers.

Used when a student (or the quickstart's reference teacher) is built from a config and has no pretrained tokenizer.
The result is a :class:`transformers.PreTrainedTokenizerFast`, so it is saved and reloaded with the student by
``save_pretrained`` / ``AutoTokenizer.from_pretrained`` like any hub tokenizer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

# [BOS]/[EOS] are not at id 2: CLIP's text tower treats eos_token_id == 2 as a legacy checkpoint and pools the
# arg-max token id instead of the first EOS, which would pick an arbitrary word.
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[MASK]", "[BOS]", "[EOS]"]


def train_wordpiece(texts: Iterable[str], vocab_size: int = 2000, max_length: int = 32) -> PreTrainedTokenizerFast:
    """Build a lower-casing WordPiece tokenizer from a corpus; CJK text is split into characters.

    Args:
        texts: training corpus (captions, class names, prompt templates).
        vocab_size: upper bound of the vocabulary, special tokens included.
        max_length: ``model_max_length`` of the returned tokenizer; sequences are truncated to it.

    Returns:
        A fast tokenizer that wraps every sequence as ``[BOS] ... [EOS]`` and pads with ``[PAD]`` (id 0).
    """
    normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True, strip_accents=None)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # BertNormalizer puts spaces around CJK characters, so Chinese is tokenised per character.
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    tok = Tokenizer(models.WordPiece(vocab=build_vocab(counts, vocab_size), unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    bos, eos = tok.token_to_id("[BOS]"), tok.token_to_id("[EOS]")
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", pair="[BOS] $A [EOS] $B [EOS]", special_tokens=[("[BOS]", bos), ("[EOS]", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


def build_vocab(word_counts: Counter[str], vocab_size: int) -> dict[str, int]:
    """A deterministic WordPiece vocabulary: special tokens, every character (alone and as ``##`` continuation),
    then whole words by frequency (ties alphabetical) up to ``vocab_size``.

    The ``tokenizers`` WordPiece trainer is not reproducible across processes (ids and even the learnt pieces follow
    hash-map order, huggingface/tokenizers#1794); a student's initialisation depends on its token ids, so the same
    corpus must always give the same vocabulary. Any word still splits into known pieces (characters at worst).
    """
    chars = sorted({c for word in word_counts for c in word})
    vocab = list(SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars]
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size = {vocab_size} is smaller than the {len(vocab)} characters of the corpus")
    seen = set(vocab)
    for word, _ in sorted(word_counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in seen:
            vocab.append(word)
            seen.add(word)
    return {token: i for i, token in enumerate(vocab)}
