"""The trained WordPiece tokenizer: reproducible, bilingual, safe for CLIP's EOS pooling."""

import subprocess
import sys

from vldistill.tokenization import SPECIAL_TOKENS, build_vocab, train_wordpiece

CORPUS = ["a red circle", "a blue triangle on a light background", "一个红色的圆形", "蓝色三角形", "a photo of a {}."]


def test_vocab_is_identical_in_another_process():
    script = (
        "from vldistill.tokenization import train_wordpiece;"
        f"t = train_wordpiece({CORPUS!r}, 200); print(sorted(t.get_vocab().items()))"
    )
    here = sorted(train_wordpiece(CORPUS, 200).get_vocab().items())
    there = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert str(here) == there.strip()


def test_special_ids_and_chinese_characters():
    tok = train_wordpiece(CORPUS, 200)
    assert tok.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == SPECIAL_TOKENS
    assert tok.eos_token_id != 2  # id 2 would switch CLIP's text pooling to the legacy arg-max rule
    ids = tok("一个红色的圆形")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["[BOS]", "一", "个", "红", "色", "的", "圆", "形", "[EOS]"]


def test_unseen_words_split_into_known_pieces_not_unk():
    tok = train_wordpiece(CORPUS, 200)
    pieces = tok.convert_ids_to_tokens(tok("redcircle")["input_ids"])
    assert pieces[1] == "red" and "[UNK]" not in pieces and len(pieces) > 3


def test_build_vocab_orders_words_by_frequency_then_alphabet():
    vocab = build_vocab({"bb": 2, "ab": 2, "c": 5}, vocab_size=100)
    words = [t for t in vocab if len(t) > 1 and not t.startswith(("##", "["))]
    assert words == ["ab", "bb"]  # "c" is already there as a character; ties alphabetical
    assert list(vocab.values()) == list(range(len(vocab)))
