"""Train small WordPiece tokenizers with the `tokenizers` library and wrap them as Hugging Face tokenizers.

Used when a student (or the quickstart's reference teacher) is built from a config and has no pretrained tokenizer.
The result is a :class:`transformers.PreTrainedTokenizerFast`, so it is saved and reloaded with the student by
``save_pretrained`` / ``AutoTokenizer.from_pretrained`` like any hub tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# [BOS]/[EOS] are not at id 2: CLIP's text tower treats eos_token_id == 2 as a legacy checkpoint and pools the
# arg-max token id instead of the first EOS, which would pick an arbitrary word.
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[MASK]", "[BOS]", "[EOS]"]


def train_wordpiece(texts: Iterable[str], vocab_size: int = 2000, max_length: int = 32) -> PreTrainedTokenizerFast:
    """Train a lower-casing WordPiece tokenizer that splits CJK text into characters.

    Args:
        texts: training corpus (captions, class names, prompt templates).
        vocab_size: upper bound of the vocabulary, special tokens included.
        max_length: ``model_max_length`` of the returned tokenizer; sequences are truncated to it.

    Returns:
        A fast tokenizer that wraps every sequence as ``[BOS] ... [EOS]`` and pads with ``[PAD]`` (id 0).
    """
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    # BertNormalizer puts spaces around CJK characters, so Chinese is tokenised per character.
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True, strip_accents=None)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator(list(texts), trainer=trainer)
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
