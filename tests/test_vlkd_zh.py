"""VLKD into Chinese (issue 10's ``vlkd-zh``): the tiny recipe aligns a Chinese-reading LM to an English-only
teacher end to end and evaluates Chinese captioning and the text skill; ``ttdm`` compares the student's feature of the
Chinese caption with the teacher's embedding of the English one (by hand); the bilingual reference LM and its
unchanged English cache key; an mBART student with its language code; Chinese captions scored per character."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import MBart50Tokenizer, MBartConfig, MBartForConditionalGeneration

import vldistill.tasks as tasks_mod
from helpers import T, dims, read_metrics
from vldistill import __version__, cli
from vldistill.config import ConfigError, load_recipe, non_default
from vldistill.data.easyvqa import CAPTION_PHRASINGS, COLORS, COLORS_ZH, SHAPES_ZH, TEMPLATES
from vldistill.losses import build_loss
from vldistill.losses.vlkd import TextTextDistance
from vldistill.models import load_teacher
from vldistill.outputs import Embeddings, StepOutputs
from vldistill.students import Seq2SeqProcessor, Seq2SeqStudent, build_student
from vldistill.students.seq2seq import lang_code_start
from vldistill.tasks.metrics import caption_scores, tokenize_caption
from vldistill.tokenization import train_wordpiece
from vldistill.train.fit import load_eval_data
from vldistill.train.reference_lm import (
    FAST,
    PICTURE_ZH,
    ReferenceLMConfig,
    bundled_captions,
    caption_words,
    caption_words_zh,
    load_reference_lm,
    reference_lm_dir,
    reference_lm_key,
    text_corpus,
)
from vldistill.train.vlkd import evaluate_generative

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

SHAPES = ["circle", "rectangle", "triangle"]
CJK = re.compile(r"[\u4e00-\u9fff]")


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny English-only CLIP saved as a Hugging Face checkpoint (embedding width 16), as in test_vlkd.py."""
    corpus = [f"a {c} {s}" for c in COLORS for s in SHAPES] + ["question answer what color is the shape picture of"]
    directory = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    build_student("test-clip", train_wordpiece(corpus * 2, vocab_size=200)).save_pretrained(directory)
    return directory


def spy(monkeypatch, cls, name: str, record) -> list[Any]:
    """Wrap ``cls.name`` so that ``record(self, args, result)`` is appended on each call."""
    seen: list[Any] = []
    real = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        seen.append(record(self, args, kwargs, result))
        return result

    monkeypatch.setattr(cls, name, wrapper)
    return seen


def plain(text: str) -> str:
    return "".join(text.split())


# ------------------------------------------------------------------------------------ the tiny recipe
def test_the_tiny_recipe_aligns_a_chinese_lm_to_an_english_teacher_and_captions_in_chinese(
    tmp_path, teacher_dir, monkeypatch
):
    batches = spy(
        monkeypatch,
        Seq2SeqProcessor,
        "__call__",
        lambda self, args, kw, out: (
            args[0],
            set(out["text"]),
            self.tokenizer.batch_decode(out["lm"]["labels"].clamp_min(0), skip_special_tokens=True),
        ),
    )
    ttdm = spy(monkeypatch, TextTextDistance, "forward", lambda self, args, kw, out: (args[0], out[0].detach()))
    scored: list[tuple[list[str], list[list[str]]]] = []
    real_scores = tasks_mod.caption_scores
    monkeypatch.setattr(
        tasks_mod, "caption_scores", lambda p, r: scored.append((list(p), [list(x) for x in r])) or real_scores(p, r)
    )
    out = tmp_path / "run"
    assert cli.main(["fit", "vlkd-zh", "--tiny", "--teacher", str(teacher_dir), "--output", str(out)]) == 0

    # icti rebuilds the CHINESE caption (data.languages [zh, en]: the first is corrupted); both are embedded
    for samples, fields, labels in batches:
        assert fields == {"zh", "en"}
        assert [plain(x) for x in labels] == [s["captions"]["zh"] for s in samples]
        assert all(CJK.search(x) for x in labels)
    # ttdm: the student's feature of the Chinese caption against the English-only teacher's embedding of the
    # parallel English caption, by hand from the step's own tensors
    for step, loss in ttdm:
        p_zh, p_en = step.student.text["zh"], step.student.text["en"]
        t_en = step.teachers[0].text["en"]
        assert set(step.teachers[0].text) == {"en"}  # the teacher reads English only
        by_hand = (p_zh - F.normalize(t_en, dim=-1)).pow(2).sum(-1).mean()
        torch.testing.assert_close(loss, by_hand.detach())
        assert not torch.allclose(by_hand, (p_en - F.normalize(t_en, dim=-1)).pow(2).sum(-1).mean())
    assert {"ttdm_zh", "itcl_zh", "icti"} <= set(read_metrics(out)[-1])

    # zero-shot Chinese captioning against the Chinese references; no VQA (its questions are English only)
    ((predictions, references),) = scored
    eval_data = load_eval_data(load_recipe("vlkd-zh", tiny=True).data, ["zh"])
    expected = [[eval_data.dataset[i]["captions"]["zh"]] for i in range(len(eval_data.dataset))]
    assert references == expected and len(predictions) == 8
    result = json.loads((out / "eval.json").read_text())
    assert result["language"] == "zh" and "vqa" not in result
    assert result["captioning"]["count"] == 8 and result["generation"]["caption_template"] == "图片上是{mask}"
    skill = result["text_skill"]
    assert skill["texts"] == "data.eval captions (zh)"
    assert skill["before"]["texts"] == skill["after"]["texts"] == 8 and skill["after"]["masked_tokens"] > 0
    # the tokenizer trained on the zh + en captions covers the prompt: no unknown character
    student = Seq2SeqStudent.from_pretrained(out / "student")
    ids = student.tokenizer("图片上是[MASK]")["input_ids"]
    assert student.tokenizer.unk_token_id not in ids and student.tokenizer.mask_token_id in ids


def test_ttdm_by_hand_takes_the_chinese_student_feature_and_the_english_teacher_embedding():
    # p_zh = [[1, 0], [0, 2]]; t_en = [[3, 4], [0, -1]] -> norm(t_en) = [[0.6, 0.8], [0, -1]]
    # squared L2: 0.4^2 + 0.8^2 = 0.8 and 0 + 3^2 = 9 -> mean 4.9 (the student's en feature, equal to norm(t_en),
    # would give 0: it is not read)
    d = dims((2, 2, 2), (2, 2, 2))
    p_zh = T([[1.0, 0.0], [0.0, 2.0]], grad=True)
    t_en = T([[3.0, 4.0], [0.0, -1.0]])
    student = Embeddings(text={"zh": p_zh, "en": T([[0.6, 0.8], [0.0, -1.0]])})
    teacher = Embeddings(text={"en": t_en, "zh": T([[1.0, 0.0], [0.0, 2.0]])})
    out = StepOutputs(student=student, teachers=[teacher], groups={})
    loss, _ = build_loss("ttdm", d, lang="zh", teacher_lang="en")(out)
    assert loss.item() == pytest.approx(4.9)
    loss.backward()
    torch.testing.assert_close(p_zh.grad, T([[0.4, -0.8], [0.0, 3.0]]))
    # teacher_lang defaults to lang: against norm(t_zh) = [[1, 0], [0, 1]]: 0 and 1 -> 0.5
    assert build_loss("ttdm", d, lang="zh")(out)[0].item() == pytest.approx(0.5)
    english_only = StepOutputs(student=student, teachers=[Embeddings(text={"en": t_en})], groups={})
    with pytest.raises(ValueError, match=r"teacher 0 has no text embedding for language 'zh'"):
        build_loss("ttdm", d, lang="zh")(english_only)


def test_evaluation_captions_without_the_students_language_are_a_clear_error(teacher_dir):
    cfg = load_recipe("vlkd-zh", {"eval.languages": ["en"], "teacher.name_or_path": str(teacher_dir)}, tiny=True)
    eval_data = load_eval_data(cfg.data, cfg.eval.languages)
    with pytest.raises(ConfigError, match=r"without 'zh', the student's caption language .*add 'zh' to eval.languages"):
        evaluate_generative(None, load_teacher(teacher_dir), eval_data, cfg)  # fails before the student is used


# ------------------------------------------------------------------------------------------- scoring
def test_chinese_captions_are_scored_per_character():
    assert tokenize_caption("一个圆形，颜色是红色。") == "一 个 圆 形 颜 色 是 红 色"  # full-width punctuation dropped
    assert tokenize_caption("一 个 红 色 的 圆 形") == tokenize_caption("一个红色的圆形") == "一 个 红 色 的 圆 形"
    assert tokenize_caption("一个red圆形") == "一 个 red 圆 形"
    assert tokenize_caption("A red circle, on the table.") == "a red circle on the table"  # English as before
    # by hand: "一个红色的圆形" (7 characters) against "一个红色的三角形" (8): clipped n-gram precisions
    # 1: 6/7 (all but 圆), 2: 4/6 (一个 个红 红色 色的), 3: 3/5, 4: 2/4; brevity penalty exp(1 - 8/7)
    # BLEU-4 = exp(-1/7) * (6/7 * 4/6 * 3/5 * 2/4) ** (1/4) = exp(-1/7) * (6/35) ** (1/4)
    by_hand = pytest.approx(2.718281828459045 ** (-1 / 7) * (6 / 35) ** 0.25, rel=1e-6)
    assert caption_scores(["一个红色的圆形"], [["一个红色的三角形"]])["bleu4"] == by_hand
    assert caption_scores(["一 个 红 色 的 圆 形"], [["一个红色的三角形"]])["bleu4"] == by_hand  # spaces change nothing
    same = caption_scores(["一个红色的圆形", "有一个蓝色的矩形"], [["一个红色的圆形"], ["有一个蓝色的矩形"]])
    assert same["bleu4"] == pytest.approx(1.0)


# -------------------------------------------------------------------------------------- the reference LM
def test_reference_lm_in_chinese_and_english_and_the_english_key_unchanged(tmp_path, teacher_dir, capsys):
    cfg = ReferenceLMConfig(**{**FAST.__dict__, "languages": ["zh", "en"], "limit_train": 16})
    assert cfg.languages == ("zh", "en")
    captions = bundled_captions(cfg)
    assert set(captions) == {"zh", "en"} and len(captions["zh"]) == len(captions["en"]) == 16
    items = text_corpus(captions, cfg.seed, cfg.languages)
    # the English sentences are exactly an English-only LM's; the Chinese ones are the captions and 图片上是...
    assert [i for i in items if i.lang == "en"] == text_corpus(captions["en"], cfg.seed)
    zh = [i for i in items if i.lang == "zh"]
    assert [i.text for i in zh if i.kind == "caption"] == captions["zh"]
    pictures = [i.text for i in zh if i.kind == "picture"]
    assert len(pictures) == 16 and {i.kind for i in zh} == {"caption", "picture"}
    for en, zh_caption, picture in zip(captions["en"], captions["zh"], pictures, strict=True):
        c, s = caption_words(en)
        assert caption_words_zh(zh_caption) == (COLORS_ZH[c], SHAPES_ZH[s])  # parallel captions
        assert picture == PICTURE_ZH.format(c=COLORS_ZH[c], s=SHAPES_ZH[s])
    assert PICTURE_ZH.startswith("图片上是")

    lm = reference_lm_dir(cfg, tmp_path / "lms", captions, log=print)
    saw = json.loads((lm.parent / "saw.json").read_text(encoding="utf-8"))
    assert saw["languages"] == ["en", "zh"] and saw["by_language"]["zh"]["captions"] == 16
    assert saw["by_language"]["zh"]["sentences"] == {"caption": 16, "picture": 16}
    assert saw["examples"]["picture_zh"][0].startswith("图片上是") and "Chinese" in saw["source"]
    model, tokenizer = load_reference_lm(lm)
    for text in [i.text for i in zh] + ["图片上是[MASK]"]:  # every Chinese character is in the vocabulary
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text
    assert model.config.model_type == "bart"
    capsys.readouterr()
    assert reference_lm_dir(cfg, tmp_path / "lms", captions, log=print) == lm
    assert "reusing" in capsys.readouterr().out

    # the languages field with its default leaves the English LM's key as it was (runs/lms/reference-lm-KEY)
    assert ReferenceLMConfig(languages=["en"]) == ReferenceLMConfig() and non_default(ReferenceLMConfig()) == {}
    english = bundled_captions(ReferenceLMConfig())
    key = reference_lm_key(ReferenceLMConfig(), english)
    if __version__ == "0.1.0":  # the version the cached runs/lms/reference-lm-29a5781f89a9 was trained with
        assert key == "29a5781f89a9"
    assert reference_lm_key(ReferenceLMConfig(), {"en": english}) == key
    assert reference_lm_key(ReferenceLMConfig(languages=("zh", "en")), bundled_captions(cfg)) != key
    with pytest.raises(ValueError, match=r"languages=\['fr'\] is not allowed"):
        ReferenceLMConfig(languages=["fr"])
    with pytest.raises(ValueError, match=r"must be a mapping language -> captions"):
        text_corpus(captions["zh"], 0, ("zh", "en"))

    # the bundled path: vlkd-zh on this LM, on image-caption pairs only, evaluated in Chinese
    out = tmp_path / "run"
    args = ["fit", "vlkd-zh", "--teacher", str(teacher_dir), "--student", str(lm), "--output", str(out)]
    args += ["--stages.0.steps", "2", "--train.batch_size", "8", "--data.limit_train", "16", "--data.limit_eval", "4"]
    args += ["--eval.generation.max_new_tokens", "12", "--train.progress", "false", "--train.tensorboard", "false"]
    assert cli.main(args) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["language"] == "zh" and result["captioning"]["count"] == 4 and "vqa" not in result
    assert result["text_skill"]["before"]["texts"] == 4


# ------------------------------------------------------------------------------------------------- mBART
def tiny_mbart(directory: Path) -> Path:
    """A tiny mBART-50 (tokenizer built from a unigram vocabulary of the bundled characters, no download)."""
    chars = sorted({ch for text in CAPTION_PHRASINGS["zh"] + TEMPLATES["zh"] for ch in text if ch not in "{}cs"})
    chars += sorted({ch for text in [*COLORS_ZH.values(), *SHAPES_ZH.values(), "图片上是"] for ch in text} - set(chars))
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("▁", -2.0)] + [(ch, -3.0) for ch in chars]
    tokenizer = MBart50Tokenizer(vocab=vocab)
    config = MBartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    MBartForConditionalGeneration(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_an_mbart_student_tags_chinese_and_starts_generation_in_chinese(tmp_path, teacher_dir, monkeypatch):
    lm = tiny_mbart(tmp_path / "mbart")
    batches = spy(
        monkeypatch,
        Seq2SeqProcessor,
        "__call__",
        lambda self, args, kw, out: (out["lm"]["input_ids"][:, 0].tolist(), out["lm"]["labels"][:, 0].tolist()),
    )
    generated = spy(monkeypatch, MBartForConditionalGeneration, "generate", lambda self, args, kw, out: kw)
    out = tmp_path / "run"
    args = ["fit", "vlkd-zh", "--teacher", str(teacher_dir), "--student", str(lm), "--output", str(out)]
    args += ["--student.overrides.lang_code", "zh_CN", "--stages.0.steps", "2", "--train.batch_size", "8"]
    args += ["--data.limit_train", "16", "--data.limit_eval", "4", "--eval.generation.max_new_tokens", "6"]
    args += ["--train.progress", "false", "--train.tensorboard", "false", "--train.lr", "3e-5"]
    assert cli.main(args) == 0
    student = Seq2SeqStudent.from_pretrained(out / "student")
    zh_cn = student.tokenizer.convert_tokens_to_ids("zh_CN")
    assert student.options.lang_code == "zh_CN" and student.tokenizer.src_lang == "zh_CN"
    assert batches and all(first == [zh_cn] * len(first) for batch in batches for first in batch)  # tagged zh_CN
    assert generated and all(kw["forced_bos_token_id"] == zh_cn for kw in generated)  # the decoder starts in zh
    assert lang_code_start(student.tokenizer, "zh_CN") == {"forced_bos_token_id": zh_cn}
    result = json.loads((out / "eval.json").read_text())
    assert result["language"] == "zh" and result["captioning"]["count"] == 4
    assert result["text_skill"]["before"]["texts"] == 4

    # a code the tokenizer lacks, or a code for a tokenizer without codes: errors that say so
    with pytest.raises(
        ValueError, match=r"lang_code='zh_XX' is not a language code of the tokenizer \(52 codes: zh_CN, \.\.\.\)"
    ):
        Seq2SeqStudent(student.model, student.tokenizer, 16, 32, {"lang_code": "zh_XX"})
    wordpiece = train_wordpiece(["一个红色的圆形"], vocab_size=100)
    with pytest.raises(ValueError, match=r"lang_code='zh_CN': the tokenizer .* has no language codes"):
        build_student("test-bart", wordpiece, teacher_width=16, teacher_image_width=32, lang_code="zh_CN")
