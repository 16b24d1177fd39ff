"""The distillation recipes (clipkd, tinyclip-affinity, openclip-distill, mclip) in their tiny modes, the mclip export
(one Hugging Face dual encoder: the teacher's image tower + the trained multilingual text tower), temperatures set from
YAML, and bad input named by its recipe key. Tiny teachers built from configs; never downloads."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AltCLIPConfig,
    AltCLIPModel,
    AutoModel,
    ChineseCLIPConfig,
    ChineseCLIPModel,
    SiglipConfig,
    SiglipModel,
    VisionTextDualEncoderModel,
)

from helpers import assert_same_rows, read_metrics
from vldistill.cli import main
from vldistill.config import ConfigError, DataConfig, load_recipe
from vldistill.data.sources import load_data
from vldistill.losses import build_stage_loss
from vldistill.models import DualEncoder, Teacher, as_teacher, load_teacher
from vldistill.outputs import Dims, Embeddings, ModelDims, StepOutputs
from vldistill.students import build_student, image_processor_for, prepare_student
from vldistill.tokenization import train_wordpiece
from vldistill.train.fit import evaluate_model, fit_recipe, tokenizer_corpus
from vldistill.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

LANGS = ["en", "zh"]
QUIET = {"train.progress": False, "train.tensorboard": False}


@pytest.fixture(scope="module")
def train_data():
    return load_data("bundled:easyvqa", "train", LANGS, limit=256)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, train_data) -> Path:
    """A tiny English CLIP teacher (48-wide vision, 24-d embeddings) saved as a Hugging Face directory."""
    torch.manual_seed(11)
    tok = train_wordpiece(tokenizer_corpus(train_data, ["en"]), vocab_size=300)
    encoder = build_student("test-clip", tok, projection_dim=24, **{"vision.hidden_size": 48})
    path = tmp_path_factory.mktemp("teacher") / "model"
    encoder.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# The single-stage distillation recipes


@pytest.mark.parametrize(
    ("recipe", "terms"),
    [
        ("clipkd", {"clip", "crd_en", "icl_en", "fd_image", "fd_text_en"}),
        ("tinyclip-affinity", {"clip", "crd_en"}),
        ("openclip-distill", {"soft_ce_en", "clip"}),
    ],
)
def test_recipe_tiny_mode_runs_and_logs_each_term(tmp_path, teacher_dir, train_data, recipe, terms):
    cfg = load_recipe(
        recipe,
        {**QUIET, "teacher.name_or_path": str(teacher_dir), "train.output_dir": str(tmp_path), "train.log_every": 2},
        tiny=True,
    )
    summary = fit_recipe(cfg, train_data=train_data)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[-1]["step"] == cfg.total_steps
    for row in rows:
        assert terms <= set(row), f"{sorted(terms - set(row))} not logged"
        assert all(math.isfinite(row[t]) for t in terms)
    assert isinstance(AutoModel.from_pretrained(summary["student_dir"]), nn.Module)
    ev = summary["eval"]
    assert sorted(ev["student"]["zeroshot"]) == LANGS and "en" in ev["agreement"]


def test_clipkd_is_crd_1_icl_1_fd_2000_with_the_task_loss():
    cfg = load_recipe("clipkd")
    (stage,) = cfg.stages
    weights = {(t.name, t.options.get("tower")): t.weight for t in stage.losses}
    assert weights == {
        ("clip", None): 1.0,
        ("crd", None): 1.0,
        ("icl", None): 1.0,
        ("fd", "image"): 2000.0,
        ("fd", "text"): 2000.0,
    }


# ----------------------------------------------------------------------------------------------------------------------
# mclip: text-only multilingual student on the teacher's image tower, exported as one HF dual encoder


@pytest.fixture(scope="module")
def mclip_run(tmp_path_factory, teacher_dir) -> Path:
    out = tmp_path_factory.mktemp("mclip") / "run"
    code = main(
        ["fit", "mclip", "--tiny", "--teacher", str(teacher_dir), "--output", str(out), "--train.progress", "false"]
    )
    assert code == 0
    return out


def test_mclip_tiny_trains_the_text_tower_only_with_xling(mclip_run):
    rows = [json.loads(x) for x in (mclip_run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all({"xling", "xling/zh", "xling/en"} <= set(r) for r in rows)
    assert not any(k.startswith(("clip", "fd", "crd")) for r in rows for k in r)
    init, final = _student_weights(mclip_run / "student-init"), _checkpoint_student(mclip_run)
    assert not any(k.startswith("loss.") and "adapter" in k for k in _checkpoint(mclip_run))  # widths match
    changed = {k for k in init if not torch.equal(init[k], final[k])}
    assert changed and all(k.startswith(("text_model.", "text_projection.")) for k in changed)


def test_mclip_export_is_one_hf_dual_encoder_with_the_teachers_images_and_the_trained_text(mclip_run, teacher_dir):
    export = mclip_run / "student"
    assert isinstance(AutoModel.from_pretrained(export), VisionTextDualEncoderModel)
    assert not list(export.glob("*.bin"))
    student, teacher = DualEncoder.from_pretrained(export), load_teacher(teacher_dir)
    assert student.dims.embed == teacher.dims.embed

    test = load_data("bundled:easyvqa", "test", LANGS, limit=16)
    images = [test.dataset[i]["image"] for i in range(16)]
    torch.testing.assert_close(student.embed_images(images), teacher.embed_images(images), rtol=0, atol=1e-6)

    # the text tower of the export is the trained one: rebuild the student from its initial weights + the last
    # checkpoint and compare embeddings of English and Chinese captions
    trained = DualEncoder.from_pretrained(mclip_run / "student-init")
    trained.model.load_state_dict(_checkpoint_student(mclip_run))
    init = DualEncoder.from_pretrained(mclip_run / "student-init")
    texts = [test.dataset[i]["captions"][lang] for i in range(8) for lang in LANGS]
    torch.testing.assert_close(student.embed_texts(texts), trained.embed_texts(texts), rtol=0, atol=1e-6)
    assert not torch.allclose(student.embed_texts(texts), init.embed_texts(texts))


def test_mclip_export_evaluates_in_english_and_chinese(mclip_run):
    saved = json.loads((mclip_run / "eval.json").read_text())
    assert sorted(saved["student"]["zeroshot"]) == LANGS and "en" in saved["agreement"]
    metrics = evaluate_model(mclip_run / "student", DataConfig(limit_eval=48), LANGS)
    for lang in LANGS:
        assert 0.0 <= metrics["zeroshot"][lang]["top1"] <= 1.0
        assert 0.0 <= metrics["retrieval"][lang]["i2t_r1"] <= 1.0


def test_mclip_trains_from_a_teacher_cache_exactly_as_from_the_live_teacher(tmp_path, teacher_dir, mclip_run):
    """`vldistill cache mclip` then `fit mclip --teacher.source cache`: the preset still builds on the teacher's
    image tower (the teacher is loaded for it), and every logged loss equals the live run's."""
    common = ["mclip", "--tiny", "--teacher", str(teacher_dir), "--train.progress", "false"]
    cache, out = tmp_path / "cache", tmp_path / "run"
    assert main(["cache", *common, "--output", str(cache), "--workers", "0"]) == 0
    args = ["fit", *common, "--output", str(out), "--teacher.source", "cache", "--teacher.cache", str(cache)]
    assert main(args) == 0

    live = read_metrics(mclip_run)
    assert live and {"xling/zh", "xling/en", "loss"} <= set(live[0])
    assert_same_rows(read_metrics(out), live, rel=1e-4)
    test = load_data("bundled:easyvqa", "test", LANGS, limit=4).dataset
    images = [test[i]["image"] for i in range(4)]
    exported, teacher = DualEncoder.from_pretrained(out / "student"), load_teacher(teacher_dir)
    torch.testing.assert_close(exported.embed_images(images), teacher.embed_images(images), rtol=0, atol=1e-6)


def _checkpoint(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(run / "checkpoints" / latest / "module.safetensors")


def _checkpoint_student(run: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("student.model."): v for k, v in _checkpoint(run).items() if k.startswith("student.model.")}


def _student_weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in DualEncoder.from_pretrained(path).model.state_dict().items()}


def _family(name: str) -> Teacher:
    """A tiny teacher of another family (vision 32 wide, 32px images, 8px patches) with a CLIP image processor."""
    torch.manual_seed(0)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision, text = {**tower, "image_size": 32, "patch_size": 8}, {**tower, "vocab_size": 40}
    if name == "chinese_clip":
        model = ChineseCLIPModel(ChineseCLIPConfig(vision_config=vision, text_config=text, projection_dim=12))
    elif name == "siglip":
        model = SiglipModel(SiglipConfig(vision_config=vision, text_config=text))
    else:
        text = {**text, "max_position_embeddings": 20, "project_dim": 16}
        model = AltCLIPModel(AltCLIPConfig(vision_config=vision, text_config=text, projection_dim=12))
    return as_teacher(DualEncoder(model, tokenizer=None, image_processor=image_processor_for(32)))


@pytest.mark.parametrize("family", ["chinese_clip", "siglip"])
def test_mclip_text_preset_reuses_other_teacher_families(tmp_path, train_data, family):
    teacher = _family(family)
    tok = train_wordpiece(tokenizer_corpus(train_data, LANGS), vocab_size=300)
    student = build_student("mclip-text", tok, teacher=teacher, **{"text.num_hidden_layers": 1})
    student.save_pretrained(tmp_path / "s")
    loaded = DualEncoder.from_pretrained(tmp_path / "s")
    assert isinstance(loaded.model, VisionTextDualEncoderModel) and loaded.dims.embed == teacher.dims.embed
    images = [train_data.dataset[i]["image"] for i in range(4)]
    torch.testing.assert_close(loaded.embed_images(images), teacher.embed_images(images), rtol=0, atol=1e-6)


def test_mclip_text_preset_errors(train_data, teacher_dir):
    tok = train_wordpiece(tokenizer_corpus(train_data, LANGS), vocab_size=300)
    with pytest.raises(ConfigError, match=re.escape("student.preset: 'mclip-text' builds on the teacher, but none")):
        prepare_student(load_recipe("mclip", tiny=True), tokenizer=tok)
    teacher = load_teacher(teacher_dir)
    with pytest.raises(ValueError, match=re.escape("takes only text.* overrides")):
        build_student("mclip-text", tok, teacher=teacher, projection_dim=8)
    with pytest.raises(NotImplementedError, match="cannot reuse the image tower of a 'altclip' teacher"):
        build_student("mclip-text", tok, teacher=as_teacher(_family("altclip")))


# ----------------------------------------------------------------------------------------------------------------------
# Temperatures from YAML


def _dims() -> Dims:
    return Dims(ModelDims(2, 2, 2), (ModelDims(2, 2, 2),))


def _stage_loss(losses: list[dict]):
    cfg = load_recipe(raw={"teacher": {}, "stages": [{"steps": 1, "losses": losses}]})
    return build_stage_loss(cfg.stages[0], _dims(), 0)


@pytest.mark.parametrize("name", ["clip", "crd", "soft_ce", "icl"])
def test_temperature_is_a_yaml_option(name):
    weighted = _stage_loss([{"name": name, "temperature": 0.05, "weight": 0.5}])
    (_, weight, loss) = weighted.terms[0]
    assert weight == 0.5
    assert not list(loss.parameters())  # a fixed scale: nothing to learn (equal widths: no adapters either)
    if name == "crd":
        assert loss.temperature == 0.05
    else:
        assert "log_s" in dict(loss.named_buffers())
        assert float(loss.logit_scale()) == pytest.approx(20.0)


def test_bad_temperature_names_key_and_bounds():
    with pytest.raises(ConfigError, match=re.escape("stages.0.losses.0 (icl): loss 'icl': temperature=0.001 is not")):
        _stage_loss([{"name": "icl", "temperature": 0.001}])
    with pytest.raises(ConfigError, match=re.escape("loss 'clip': temperature='hot' is not allowed; it must be a")):
        _stage_loss([{"name": "clip", "temperature": "hot"}])


def n_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def test_soft_ce_fixed_temperature_golden_value():
    # both sides use s = 1 / tau = 2: P = softmax(2 V_T T_T^T), student logits 2 V_S T_S^T
    sv, st = [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.6, 0.8]]
    tv, tt = [[0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [0.8, 0.6]]
    loss_fn = _stage_loss([{"name": "soft_ce", "temperature": 0.5}]).terms[0][2]
    out = StepOutputs(
        Embeddings(image=torch.tensor(sv), text={"en": torch.tensor(st)}),
        teachers=[Embeddings(image=torch.tensor(tv), text={"en": torch.tensor(tt)})],
    )
    loss, parts = loss_fn(out)
    s_logits, t_logits = 2 * np.array(sv) @ np.array(st).T, 2 * np.array(tv) @ np.array(tt).T
    p_i2t, p_t2i = np.exp(n_log_softmax(t_logits)), np.exp(n_log_softmax(t_logits.T))
    ce = lambda logits, target: float(-(target * n_log_softmax(logits)).sum(-1).mean())  # noqa: E731
    task = 0.5 * (ce(s_logits, np.eye(2)) + ce(s_logits.T, np.eye(2)))
    distill = 0.5 * (ce(s_logits, p_i2t) + ce(s_logits.T, p_t2i))
    assert float(parts["task"]) == pytest.approx(task, rel=1e-5)
    assert float(parts["distill"]) == pytest.approx(distill, rel=1e-5)
    assert float(loss) == pytest.approx(task + distill, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input, named by its recipe key


@pytest.mark.parametrize(
    "loss",
    [
        {"name": "fd", "tower": "image", "adapter": "none"},
        {"name": "mfd", "adapter": "none"},
        {"name": "xling", "adapter": "none"},
        {"name": "icl", "adapter": "none"},
    ],
)
def test_teacher_width_that_does_not_fit_without_adapter(tmp_path, train_data, teacher_dir, loss):
    cfg = load_recipe(
        raw={
            "teacher": {"name_or_path": str(teacher_dir)},
            "student": {"preset": "test-clip"},
            "data": {"eval": None, "limit_train": 32},
            "stages": [{"steps": 1, "losses": ["clip", loss]}],
            "train": {"batch_size": 8, "output_dir": str(tmp_path)},
        }
    )
    student = build_student("test-clip", train_wordpiece(tokenizer_corpus(train_data, LANGS), vocab_size=300))
    with pytest.raises(ConfigError) as info:
        Trainer(cfg, student, train_data.dataset, [load_teacher(teacher_dir)])
    msg = str(info.value)
    assert msg.startswith(f"stages.0.losses.1 ({loss['name']}): loss {loss['name']!r}: adapter='none' is not allowed")
    assert "width 16 differs from the teacher" in msg and "width 24" in msg and "use adapter='auto' or 'linear'" in msg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--stages.0.losses.1.name", "crdd"], r"stages\.0\.losses\.1\.name: unknown loss 'crdd'; registered: .*mfd"),
        (["--stages.0.losses.1.weight", "lots"], r"stages\.0\.losses\.1\.weight = 'lots': expected a number"),
        (["--stages.0.losses.1.adapter", "none"], r"stages\.0\.losses\.1 \(crd\).*unknown option\(s\) 'adapter'"),
        (["--stages.0.losses.3.adapter", "none"], r"stages\.0\.losses\.3 \(fd\): .*adapter='none' is not allowed"),
    ],
)
def test_cli_reports_bad_loss_input_with_its_key(tmp_path, capsys, teacher_dir, override, expected):
    args = ["fit", "clipkd", "--tiny", "--teacher", str(teacher_dir), "--output", str(tmp_path), *override]
    assert main([*args, "--data.limit_train", "32"]) == 2
    err = capsys.readouterr().err
    assert "vldistill fit: error: stages.0.losses." in err and re.search(expected, err), err
