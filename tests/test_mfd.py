"""Masked feature distillation: masked image encoding of the CLIP-style vision towers, the ``mfd`` loss (golden
values on hand tensors, like tests/test_losses.py) and a few trainer steps with it, resume included."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from torch import nn
from transformers import (
    AltCLIPConfig,
    AltCLIPModel,
    BertConfig,
    ChineseCLIPConfig,
    ChineseCLIPModel,
    CLIPConfig,
    CLIPModel,
    SiglipConfig,
    SiglipModel,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    ViTConfig,
)

from helpers import T, dims, n_linear, set_linear
from vldistill.batching import Collator
from vldistill.config import DataConfig, load_recipe, to_dict
from vldistill.losses import LOSSES, WeightedLoss, build_loss
from vldistill.models import DualEncoder, as_teacher, encode_batch
from vldistill.outputs import Embeddings, StepOutputs
from vldistill.students import build_student
from vldistill.tokenization import train_wordpiece
from vldistill.train.fit import load_train_data, tokenizer_corpus
from vldistill.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

LANGS = ["en", "zh"]


# ----------------------------------------------------------------------------------------------------------------------
# Masked image encoding


def _tower(hidden: int) -> dict:
    return {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2, "num_attention_heads": 2}


VISION = {**_tower(32), "image_size": 32, "patch_size": 8}  # 4 x 4 = 16 patches
TEXT = {**_tower(24), "vocab_size": 40, "bos_token_id": 1, "eos_token_id": 3, "pad_token_id": 0}


def _family(name: str) -> DualEncoder:
    torch.manual_seed(0)
    if name == "clip":
        model = CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=12))
    elif name == "chinese_clip":
        model = ChineseCLIPModel(ChineseCLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=12))
    elif name == "altclip":
        text = {**TEXT, "max_position_embeddings": 20, "project_dim": 16}
        model = AltCLIPModel(AltCLIPConfig(vision_config=VISION, text_config=text, projection_dim=12))
    elif name == "siglip":
        model = SiglipModel(SiglipConfig(vision_config=VISION, text_config={**TEXT, "projection_size": 32}))
    elif name == "vision-text-dual-encoder":
        config = VisionTextDualEncoderConfig.from_vision_text_configs(
            ViTConfig(**VISION), BertConfig(**_tower(24), vocab_size=40), projection_dim=12
        )
        model = VisionTextDualEncoderModel(config=config)
    else:
        raise AssertionError(name)
    return DualEncoder(model.eval(), tokenizer=None, image_processor=None)


MASKABLE = ["clip", "chinese_clip", "altclip"]


@pytest.fixture(scope="module", params=MASKABLE)
def maskable(request) -> DualEncoder:
    return _family(request.param)


def _pixels(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def test_mask_ratio_zero_reproduces_encode_image_exactly(maskable):
    x = _pixels()
    full, full_tokens = maskable.encode_image(x, return_tokens=True)
    masked, masked_tokens = maskable.encode_image_masked(x, 0.0, return_tokens=True)
    assert torch.equal(masked, full)
    assert torch.equal(masked_tokens, full_tokens)


@torch.no_grad()
@pytest.mark.parametrize(("ratio", "kept"), [(0.5, 8), (0.25, 12), (0.3, 11), (0.9, 1), (0.99, 1), (0.0, 16)])
def test_kept_patch_count(maskable, ratio, kept):
    # max(1, floor(16 (1 - ratio))) patches plus [CLS], the same count for every sample
    _, tokens = maskable.encode_image_masked(_pixels(), ratio, return_tokens=True)
    assert tokens.shape == (3, 1 + kept, 32)


@torch.no_grad()
def test_masked_input_is_cls_plus_a_random_ordered_subset_of_patches_per_sample(maskable):
    """What enters the transformer: [CLS] and a per-sample subset of the full input's patch rows, in order."""
    seen = []
    hook = maskable.model.vision_model.pre_layrnorm.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    x = _pixels(4)
    maskable.encode_image(x)
    maskable.encode_image_masked(x, 0.5, generator=torch.Generator().manual_seed(3))
    hook.remove()
    full, masked = seen
    assert masked.shape == (4, 1 + 8, 32)
    subsets = []
    for b in range(4):
        assert torch.equal(masked[b, 0], full[b, 0])  # [CLS] with its position embedding
        rows = [next(j for j in range(1, 17) if torch.equal(masked[b, i], full[b, j])) for i in range(1, 9)]
        assert rows == sorted(set(rows))  # distinct patches, original order
        subsets.append(tuple(rows))
    assert len(set(subsets)) > 1  # each sample draws its own subset


@torch.no_grad()
def test_masked_output_depends_on_the_mask_and_is_reproducible(maskable):
    x = _pixels()
    a = maskable.encode_image_masked(x, 0.5, generator=torch.Generator().manual_seed(1))
    b = maskable.encode_image_masked(x, 0.5, generator=torch.Generator().manual_seed(2))
    again = maskable.encode_image_masked(x, 0.5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 12)
    assert torch.equal(a, again)
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, maskable.encode_image(x))
    # without a generator the masks come from torch's global RNG (saved in the trainer's checkpoints)
    torch.manual_seed(5)
    g1 = maskable.encode_image_masked(x, 0.5)
    torch.manual_seed(5)
    assert torch.equal(g1, maskable.encode_image_masked(x, 0.5))


@torch.no_grad()
def test_shards_of_a_batch_get_the_masks_of_the_whole_batch(maskable):
    """Processes that share a seed each encode their shard with ``shard=(r, N)``: together they draw the masks one
    process draws for the whole batch, not N copies of the same masks."""
    x = _pixels(4)
    whole = maskable.encode_image_masked(x, 0.5, generator=torch.Generator().manual_seed(9))
    shards = [
        maskable.encode_image_masked(
            x[2 * r : 2 * r + 2], 0.5, generator=torch.Generator().manual_seed(9), shard=(r, 2)
        )
        for r in range(2)
    ]
    torch.testing.assert_close(torch.cat(shards), whole, rtol=1e-5, atol=1e-6)
    same_noise = maskable.encode_image_masked(x[2:], 0.5, generator=torch.Generator().manual_seed(9))
    assert not torch.allclose(same_noise, shards[1])  # without shard=, shard 1 would reuse shard 0's masks


def test_masked_encoding_has_gradients_and_checks_its_inputs():
    enc = _family("clip")
    loss = enc.encode_image_masked(_pixels(), 0.5).sum()
    loss.backward()
    assert enc.model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert enc.model.visual_projection.weight.grad.abs().sum() > 0
    for bad in (1.0, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match=re.escape(f"mask_ratio={bad!r} is not allowed; it must be a number in")):
            enc.encode_image_masked(_pixels(), bad)
    with pytest.raises(ValueError, match="does not match the model's"):
        enc.encode_image_masked(torch.zeros(1, 3, 48, 48), 0.5)


@pytest.mark.parametrize("name", ["siglip", "vision-text-dual-encoder"])
def test_unsupported_families_name_themselves(name):
    enc = _family(name)
    with pytest.raises(NotImplementedError, match=rf"clip, chinese_clip, altclip\), not for model type '{name}'"):
        enc.encode_image_masked(_pixels(), 0.5)


# ----------------------------------------------------------------------------------------------------------------------
# The mfd loss: golden values (independent numpy formulas, float64)


def n_norm(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


SV_MASKED = [[1.0, 0.5], [-0.3, 1.2], [0.7, -0.9]]  # student (masked image), d = 2
SV_FULL = [[9.0, -9.0], [9.0, 9.0], [-9.0, 9.0]]  # the student's unmasked embedding: mfd must not read it
TV = [[1.0, 0.2, -0.1], [0.0, 1.0, 0.3], [0.5, -0.5, 1.0]]  # teacher (full image), d = 3
TV2 = [[0.2, 1.0], [1.0, -0.4], [-0.6, 0.3]]  # a second teacher, d = 2


@pytest.mark.parametrize(
    ("norm", "expected"),
    # Normalised rows: student [1, 0], [1, 0]; teacher [0, 1], [-1, 0]; differences [1, -1] and [2, 0].
    # mse: (1 + 2) / 2; l1: (1 + 1) / 2; smooth_l1: (0.5 + (1.5 + 0) / 2) / 2; cosine: ((1 - 0) + (1 + 1)) / 2.
    [("mse", 1.5), ("l1", 1.0), ("smooth_l1", 0.625), ("cosine", 1.5)],
)
def test_mfd_norms_on_the_masked_embedding(norm, expected):
    loss_fn = build_loss("mfd", dims((2, 2, 2), (2, 2, 2)), norm=norm)
    assert isinstance(loss_fn.adapters[0], nn.Identity)
    student = Embeddings(image=T([[0, 1], [0, -1]]), image_masked=T([[2, 0], [1, 0]]))
    loss, parts = loss_fn(StepOutputs(student, teachers=[Embeddings(image=T([[0, 3], [-1, 0]]))]))
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert parts == {}


def test_mfd_different_widths_adapter_and_two_teachers():
    # student width 2, teacher 0 width 3 (adapter with fixed weights), teacher 1 width 2 (no adapter); averaged
    w0, b0 = [[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]], [0.0, 0.5, 0.0]
    loss_fn = build_loss("mfd", dims((2, 2, 2), (3, 4, 4), (2, 4, 4)), mask_ratio=0.25)
    set_linear(loss_fn.adapters[0], w0, b0)
    assert isinstance(loss_fn.adapters[1], nn.Identity)
    out = StepOutputs(
        Embeddings(image=T(SV_FULL), image_masked=T(SV_MASKED)),
        teachers=[Embeddings(image=T(TV)), Embeddings(image=T(TV2))],
    )
    loss, parts = loss_fn(out)
    d0 = float(((n_norm(n_linear(SV_MASKED, w0, b0)) - n_norm(TV)) ** 2).mean())
    d1 = float(((n_norm(SV_MASKED) - n_norm(TV2)) ** 2).mean())
    assert float(loss.detach()) == pytest.approx((d0 + d1) / 2, rel=1e-5)
    assert float(parts["t0"]) == pytest.approx(d0, rel=1e-5)
    assert float(parts["t1"]) == pytest.approx(d1, rel=1e-5)
    # hand check of row 0 of teacher 0: A([1, .5]) = [1, 1.5, .5]
    row = np.array([1.0, 1.5, 0.5]) / math.sqrt(3.5) - np.array(TV[0]) / math.sqrt(1.05)
    assert float(((n_norm(n_linear(SV_MASKED, w0, b0))[0] - n_norm(TV)[0]) ** 2).mean()) == pytest.approx(
        float((row**2).mean())
    )


def test_mfd_gradients_reach_masked_embedding_and_adapter_only():
    image, masked, t_img = T(SV_FULL, grad=True), T(SV_MASKED, grad=True), T(TV, grad=True)
    loss_fn = build_loss("mfd", dims((2, 2, 2), (3, 2, 2)))
    loss, _ = loss_fn(StepOutputs(Embeddings(image=image, image_masked=masked), teachers=[Embeddings(image=t_img)]))
    loss.backward()
    assert masked.grad is not None and masked.grad.abs().sum() > 0
    assert image.grad is None and t_img.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss_fn.parameters())


def test_mfd_options_needs_and_errors():
    d = dims((2, 2, 2), (3, 2, 2))
    loss_fn = build_loss("mfd", d)
    assert loss_fn.needs == frozenset({"teacher", "masked_image"})
    assert LOSSES.get("mfd").needs_for(mask_ratio=0.25) == loss_fn.needs
    assert loss_fn.mask_ratio == 0.5 and loss_fn.norm == "mse"
    with pytest.raises(ValueError, match=re.escape("loss 'mfd': mask_ratio=1 is not allowed; it must be a number in")):
        build_loss("mfd", d, mask_ratio=1)
    allowed = "allowed options: mask_ratio, norm, teacher, adapter"
    with pytest.raises(ValueError, match=re.escape(f"unknown option(s) 'tower' for loss 'mfd'; {allowed}")):
        build_loss("mfd", d, tower="text")
    with pytest.raises(ValueError, match=re.escape("loss 'mfd': adapter='none' is not allowed: the student embedding")):
        build_loss("mfd", d, adapter="none")
    with pytest.raises(ValueError, match=re.escape("the student masked-image embedding (image_masked) is missing")):
        loss_fn(StepOutputs(Embeddings(image=T(SV_MASKED)), teachers=[Embeddings(image=T(TV))]))


def test_weighted_loss_mask_ratio():
    d = dims((2, 2, 2), (2, 2, 2))
    assert WeightedLoss([("clip", 1.0, build_loss("clip", d))]).mask_ratio is None
    both = WeightedLoss([("clip", 1.0, build_loss("clip", d)), ("mfd", 2.0, build_loss("mfd", d, mask_ratio=0.3))])
    assert both.mask_ratio == 0.3 and "masked_image" in both.needs
    with pytest.raises(ValueError, match=re.escape("different mask_ratio values [0.3, 0.5]")):
        WeightedLoss([("a", 1.0, build_loss("mfd", d, mask_ratio=0.3)), ("b", 1.0, build_loss("mfd", d))])


# ----------------------------------------------------------------------------------------------------------------------
# Trainer


@pytest.fixture(scope="module")
def data():
    return load_train_data(DataConfig(train="bundled:easyvqa", eval=None, languages=LANGS, limit_train=32))


@pytest.fixture(scope="module")
def tokenizer(data):
    return train_wordpiece(tokenizer_corpus(data, LANGS), vocab_size=300)


@pytest.fixture(scope="module")
def teacher(tokenizer):
    torch.manual_seed(123)
    encoder = build_student("test-clip", tokenizer, projection_dim=24, **{"vision.hidden_size": 48})
    return as_teacher(encoder, languages=["en"])


def make_student(tokenizer) -> DualEncoder:
    torch.manual_seed(0)
    return build_student("test-clip", tokenizer, **{"vision.patch_size": 8})  # 16 patches


def test_encode_batch_fills_image_masked_for_the_student_only(tokenizer, teacher, data):
    student = make_student(tokenizer)
    batch = Collator(student, [teacher], LANGS, [["en"]])([data.dataset[i] for i in range(4)])
    needs = frozenset({"teacher", "masked_image"})
    out = encode_batch(student, batch["student"], needs, mask_ratio=0.5)
    assert out.image_masked is not None and out.image_masked.shape == out.image.shape
    assert not torch.allclose(out.image_masked, out.image)
    assert encode_batch(teacher, batch["teachers"][0], needs).image_masked is None
    assert encode_batch(student, batch["student"], frozenset({"teacher"})).image_masked is None
    with pytest.raises(ValueError, match="a loss needs 'masked_image', but encode_batch got no mask_ratio"):
        encode_batch(student, batch["student"], needs)


def _mfd_recipe(out_dir, **train):
    return load_recipe(
        raw={
            "teacher": {"languages": ["en"]},
            "student": {"preset": "test-clip"},
            "data": {"train": "bundled:easyvqa", "eval": None, "languages": LANGS, "limit_train": 32},
            "stages": [
                {
                    "steps": 4,
                    "losses": [
                        {"name": "clip"},
                        {"name": "mfd", "mask_ratio": 0.5, "weight": 100},
                        {"name": "fd", "tower": "text", "lang": "en", "weight": 100},
                    ],
                }
            ],
            "train": {
                "batch_size": 8,
                "warmup_steps": 1,
                "log_every": 1,
                "progress": False,
                "tensorboard": False,
                "output_dir": str(out_dir),
                **train,
            },
        }
    )


def test_trainer_steps_with_mfd_and_exact_resume(tmp_path, tokenizer, teacher, data):
    cfg = _mfd_recipe(tmp_path / "a", checkpoint_every=2, keep_checkpoints=3)
    a = Trainer(cfg, make_student(tokenizer), data.dataset, [teacher]).fit()
    rows = a.history
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"mfd", "fd_text_en", "clip", "loss"} <= set(r) for r in rows)
    assert all(math.isfinite(r["mfd"]) and r["mfd"] > 0 for r in rows)

    # resume from the step-2 checkpoint in a fresh directory: the masks of steps 3-4 come from the saved RNG state
    b_dir = tmp_path / "b"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "stage0-step2", b_dir / "checkpoints" / "stage0-step2")
    (b_dir / "checkpoints" / "latest").write_text("stage0-step2")
    (b_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    b_cfg = _mfd_recipe(b_dir, checkpoint_every=2, keep_checkpoints=3)
    (b_dir / "config.json").write_text(json.dumps(to_dict(b_cfg)))  # the run's own config: --resume checks it
    AcceleratorState._reset_state(True)
    b = Trainer(b_cfg, make_student(tokenizer), data.dataset, [teacher]).fit(resume=True)
    assert b.history[-1]["mfd"] == pytest.approx(rows[-1]["mfd"], rel=1e-5)
    for (name, va), vb in zip(a.student.state_dict().items(), b.student.state_dict().values(), strict=True):
        torch.testing.assert_close(vb, va, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
