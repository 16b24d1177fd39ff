"""benchmarks/pretrain_vilt.py: ViLT's ITM + MLM pretraining of the cross-modal student, and the checkpoint it writes
(a plain ViLT that the task recipes fine-tune with a new head, as they would dandelin/vilt-b32-mlm)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from helpers import benchmark_script
from vldistill.config import load_recipe
from vldistill.students import prepare_student


@pytest.fixture(scope="module")
def pre():
    with benchmark_script("pretrain_vilt") as module:
        yield module


@pytest.fixture(scope="module")
def checkpoint(pre, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained")
    threads = torch.get_num_threads()
    result = pre.main(["--smoke", "--output", str(out)])
    assert torch.get_num_threads() == threads  # --threads 1 while it runs, then torch's setting again
    return out, result


def test_batch_pairs_and_masks(pre):
    """Mismatched pairs carry another class's caption and no MLM label; every caption has a masked word, and a matched
    caption's labels are its original tokens."""
    tokenizer = pre.build_tokenizer(limit=50, vocab_size=load_recipe("cliptd-vqa").student.vocab_size)

    class Images:  # two classes' worth of fake pixels: make_batch only indexes them
        classes = [0, 5, 5, 23] * 8
        pixels = torch.zeros(32, 3, 8, 8)

    original = {}
    rng = random.Random(0)
    batch = pre.make_batch(Images, list(range(32)), tokenizer, rng, mask_rate=0.15)
    matched = batch["itm_labels"].tolist()
    assert 0 < sum(matched) < 32  # both kinds in a batch of 32
    for i, ok in enumerate(matched):
        labels = batch["mlm_labels"][i]
        masked = labels != -100
        # every caption has a [MASK] (else its presence would tell ITM the pair is matched); only matched ones a label
        assert (batch["input_ids"][i] == tokenizer.mask_token_id).any()
        if not ok:
            assert not masked.any()
            continue
        assert masked.any()
        assert (batch["input_ids"][i][masked] == tokenizer.mask_token_id).all()
        original[i] = tokenizer.decode(torch.where(masked, labels, batch["input_ids"][i]), skip_special_tokens=True)
    # a matched caption names its image's class, a mismatched one another class; masking keeps the other tokens
    for i, ok in enumerate(matched):
        text = batch["captions"][i]
        color, shape = pre.COLORS[Images.classes[i] // len(pre.SHAPES)], pre.SHAPES[Images.classes[i] % len(pre.SHAPES)]
        assert (color in text and shape in text) == bool(ok), (text, ok)
        if ok:
            assert original[i] == text
        unmasked = batch["input_ids"][i] != tokenizer.mask_token_id
        assert torch.equal(
            batch["input_ids"][i][unmasked],
            tokenizer(text, padding="max_length", max_length=batch["input_ids"].shape[1], return_tensors="pt")[
                "input_ids"
            ][0][unmasked],
        )


def test_checkpoint_fine_tunes_with_a_new_head(checkpoint):
    """The saved directory is a ViLT with tokenizer and image processor; a task recipe builds its student from it with
    the pretrained encoder weights and the task's head, and the tokenizer covers the tasks' words."""
    out, result = checkpoint
    report = json.loads((out / "pretrain.json").read_text())
    assert report["steps"] == 3 and set(report["held_out_after"]) >= {"itm_acc", "mlm_acc", "loss"}
    assert report == json.loads(json.dumps(result))
    cfg = load_recipe("cliptd-vqa", {"student.name_or_path": str(out)})
    student = prepare_student(cfg, answers=["yes", "no", "red"])
    assert student.labels == ["yes", "no", "red"] and student.head[-1].out_features == 3
    from safetensors.torch import load_file

    saved = load_file(out / "model.safetensors")
    assert torch.equal(student.vilt.pooler.dense.weight, saved["pooler.dense.weight"])
    vocab = student.tokenizer.get_vocab()
    for word in ("what", "shape", "circle", "yes", "color"):  # questions (tasks) and captions
        assert word in vocab, word
