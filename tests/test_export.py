"""Deploying a student: ONNX towers that onnxruntime runs alone (fp32 equal to PyTorch, int8 agreeing on zero-shot
predictions), the ``vldistill export`` command, the model card every export carries, and quiet loading."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vldistill.cache import weights_digest
from vldistill.cli import main
from vldistill.data.sources import load_data
from vldistill.evaluation import evaluate
from vldistill.export import ONNX_SETTINGS, OnnxDualEncoder, export_onnx, read_model_card
from vldistill.export.card import flat_numbers
from vldistill.models import DualEncoder, load_teacher
from vldistill.students import build_student
from vldistill.tokenization import train_wordpiece
from vldistill.train.fit import tokenizer_corpus

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

TEXTS = [
    "a photo of a red circle.",
    "blue",
    "一张绿色三角形的照片。",
    "a very small gray rectangle on a white background",
]


@pytest.fixture(scope="module")
def data():
    return load_data("bundled:easyvqa", "train", ["en", "zh"], limit=256)


@pytest.fixture(scope="module")
def test_data():
    return load_data("bundled:easyvqa", "test", ["en", "zh"], limit=64)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, data) -> Path:
    torch.manual_seed(11)
    tok = train_wordpiece(tokenizer_corpus(data, ["en"]), vocab_size=300)
    encoder = build_student("test-clip", tok, projection_dim=24, **{"vision.hidden_size": 48})
    path = tmp_path_factory.mktemp("teacher") / "model"
    encoder.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory, teacher_dir) -> Path:
    """A tiny DC-CLIP run with its baseline, exported and evaluated by ``vldistill fit``."""
    out = tmp_path_factory.mktemp("fit") / "run"
    args = ["fit", "dcclip", "--tiny", "--teacher", str(teacher_dir), "--output", str(out), "--baseline"]
    assert main([*args, "--train.progress", "false", "--train.tensorboard", "false"]) == 0
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory, fit_run) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    student = fit_run / "student"
    return {
        "fp32": export_onnx(student, root / "fp32"),
        "int8": export_onnx(DualEncoder.from_pretrained(student), root / "int8", quantize="int8"),
    }


def test_fp32_towers_match_pytorch_at_other_batch_sizes_and_lengths(fit_run, exports, test_data):
    model = DualEncoder.from_pretrained(fit_run / "student").eval()
    onnx = OnnxDualEncoder(exports["fp32"])
    images = [test_data.dataset[i]["image"] for i in range(5)]  # traced with 2
    with torch.no_grad():
        ref_img = model.encode_image(model.preprocess_images(images)).numpy()
        enc = model.tokenize(TEXTS)  # traced with 2 texts of another length
        ref_txt = model.encode_text(**enc).numpy()
    np.testing.assert_allclose(onnx.encode_image(onnx.preprocess_images(images)), ref_img, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(onnx.encode_text(onnx.tokenize(TEXTS)), ref_txt, atol=1e-5, rtol=1e-4)
    # onnxruntime's own preprocessing (numpy + PIL + tokenizers) gives the model's inputs
    np.testing.assert_allclose(onnx.preprocess_images(images), model.preprocess_images(images).numpy(), atol=1e-5)
    np.testing.assert_array_equal(onnx.tokenize(TEXTS)["input_ids"], enc["input_ids"].numpy())
    np.testing.assert_array_equal(onnx.tokenize(TEXTS)["attention_mask"], enc["attention_mask"].numpy())
    assert onnx.encode_image(onnx.preprocess_images(images[:1])).shape == (1, model.dims.embed)  # batch 1


def test_export_directory_is_self_describing_and_runs_without_torch(exports, fit_run):
    settings = json.loads((exports["fp32"] / ONNX_SETTINGS).read_text())
    assert settings["quantization"] == "none" and settings["embed_dim"] == 24
    model = DualEncoder.from_pretrained(fit_run / "student")
    assert settings["source"]["weights_sha256"] == weights_digest(model.model)
    assert settings["image"]["image_mean"] == pytest.approx(model.image_processor.image_mean)
    assert {p.name for p in exports["int8"].iterdir()} >= {"image_encoder.onnx", "text_encoder.onnx", "tokenizer.json"}
    # the runtime class needs onnxruntime, numpy, PIL and tokenizers only: run it with torch and transformers blocked
    script = (
        "import builtins, sys\n"
        "real = builtins.__import__\n"
        "def guard(name, globals=None, locals=None, fromlist=(), level=0):\n"
        "    if level == 0 and name.split('.')[0] in ('torch', 'transformers'):\n"
        "        raise ImportError('blocked ' + name)\n"
        "    return real(name, globals, locals, fromlist, level)\n"
        "builtins.__import__ = guard\n"
        "import types, importlib.util\n"
        "pkg = types.ModuleType('vldistill'); pkg.__path__ = []; sys.modules['vldistill'] = pkg\n"
        "files = types.ModuleType('vldistill.files'); files.follow_umask = lambda p: None\n"
        "sys.modules['vldistill.files'] = files\n"
        "exp = types.ModuleType('vldistill.export'); exp.__path__ = []; sys.modules['vldistill.export'] = exp\n"
        f"path = {export_onnx.__code__.co_filename!r}\n"
        "spec = importlib.util.spec_from_file_location('vldistill.export.onnx', path)\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "from PIL import Image\n"
        f"m = mod.OnnxDualEncoder({str(exports['int8'])!r})\n"
        "x = m.embed_images([Image.new('RGB', (40, 30), (255, 0, 0))] * 3)\n"
        "t = m.embed_texts(['a red circle', '红色'])\n"
        "print(type(x).__name__, x.shape, t.shape)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "ndarray"


def test_int8_zero_shot_predictions_agree_with_pytorch_on_at_least_95_percent(fit_run, exports, test_data):
    model = DualEncoder.from_pretrained(fit_run / "student")
    eval_set = test_data.eval_set(["en", "zh"])
    ref = evaluate(model, eval_set, batch_size=64)["predictions"]
    fp32 = evaluate(OnnxDualEncoder(exports["fp32"]), eval_set, batch_size=64)["predictions"]
    int8 = evaluate(OnnxDualEncoder(exports["int8"]), eval_set, batch_size=64)["predictions"]
    for lang in ("en", "zh"):
        assert torch.equal(fp32[lang], ref[lang])
        assert (int8[lang] == ref[lang]).float().mean() >= 0.95
    size = OnnxDualEncoder(exports["int8"]).size_mb()
    assert size < OnnxDualEncoder(exports["fp32"]).size_mb()


def test_a_teacher_exports_too(teacher_dir, tmp_path, test_data):
    # an untrained random teacher's zero-shot scores are near ties, so only fp32 is compared prediction for prediction
    out = export_onnx(teacher_dir, tmp_path / "t32")
    eval_set = test_data.eval_set(["en"])
    ref = evaluate(load_teacher(teacher_dir), eval_set)["predictions"]["en"]
    assert torch.equal(evaluate(OnnxDualEncoder(out), eval_set)["predictions"]["en"], ref)
    int8 = OnnxDualEncoder(export_onnx(teacher_dir, tmp_path / "t8", quantize="int8"))
    assert int8.embed_texts(["a red circle"]).shape == (1, 24)


def test_cli_export_writes_next_to_the_model_and_names_bad_input(fit_run, tmp_path, capsys):
    assert main(["export", "--model", str(fit_run / "student"), "--format", "onnx", "--quantize", "int8"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["output"] == str(fit_run / "student" / "onnx-int8")
    assert json.loads((fit_run / "student" / "onnx-int8" / ONNX_SETTINGS).read_text())["quantization"] == "int8"
    assert main(["export", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="int4"):
        export_onnx(fit_run / "student", tmp_path / "x", quantize="int4")


# ---------------------------------------------------------------------------------------------------- model card
def test_fit_export_carries_a_model_card_matching_eval_json(fit_run, teacher_dir):
    meta, prose = read_model_card(fit_run / "student")
    ev = json.loads((fit_run / "eval.json").read_text())
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "zero-shot-image-classification"
    assert {"vldistill", "knowledge-distillation", "dcclip"} <= set(meta["tags"])
    assert meta["language"] == ["en", "zh"] and meta["datasets"] == ["bundled:easyvqa"]
    assert "base_model" not in meta  # a local teacher is not a hub id: it is named under teacher
    (teacher,) = meta["teacher"]
    assert teacher["id"] == str(teacher_dir.resolve())
    assert teacher["weights_sha256"] == weights_digest(load_teacher(teacher_dir).model)
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["split"] == "test"
    card_numbers = {m["name"]: m["value"] for m in result["metrics"]}
    assert card_numbers == flat_numbers(ev["student"])
    assert card_numbers["zeroshot.zh.top1"] == ev["student"]["zeroshot"]["zh"]["top1"]
    # prose: teacher, recipe + full config, data size, numbers with machine and date, how to load
    assert teacher["weights_sha256"] in prose and "## Recipe" in prose and "projection_dim: teacher" in prose
    assert "256 samples" in prose and "CPU threads" in prose and "Measured on `bundled:easyvqa`" in prose
    assert f"| zeroshot.en.top1 | {ev['student']['zeroshot']['en']['top1']:.4f} |" in prose
    assert "pipeline('zero-shot-image-classification'" in prose
    # the baseline export has its own card, with no teacher
    b_meta, b_prose = read_model_card(fit_run / "baseline" / "student")
    assert b_meta["teacher"] == [] and "trained without a teacher" in b_prose


def test_read_model_card_names_a_file_without_metadata(tmp_path):
    (tmp_path / "README.md").write_text("# no metadata\n")
    with pytest.raises(ValueError, match=r"README\.md: a model card opens with YAML metadata"):
        read_model_card(tmp_path)


# --------------------------------------------------------------------------------------------- quiet loading
def test_loading_a_student_prints_no_torchvision_fallback_warning(fit_run, capfd):
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    try:
        DualEncoder.from_pretrained(fit_run / "student")
    finally:
        hf_logging.set_verbosity(level)
    captured = capfd.readouterr()
    assert "torchvision" not in captured.err + captured.out


def test_cli_quiets_transformers_unless_verbose(capsys):
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    try:
        hf_logging.set_verbosity_warning()
        assert main(["--verbose", "info", "--json"]) == 0
        assert hf_logging.get_verbosity() == logging.WARNING
        assert main(["info", "--json", "--verbose"]) == 0  # accepted after the command too
        assert hf_logging.get_verbosity() == logging.WARNING
        assert main(["info", "--json"]) == 0
        assert hf_logging.get_verbosity() == logging.ERROR
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()
    capsys.readouterr()


def test_deploy_benchmark_smoke_writes_exactly_the_issue_keys(tmp_path, capsys):
    import runpy

    bench = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "deploy.py"))
    out = tmp_path / "deploy.json"
    assert bench["main"](["--smoke", "--threads", "1", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    keys = {"image_ms_b1", "image_ms_b64", "text_ms_b1", "text_ms_b64", "size_mb", "top1_en", "top1_zh"}
    assert set(result) == {"teacher", "student"}
    for name, runtimes in result.items():
        assert set(runtimes) == {"torch_fp32", "onnx_fp32", "onnx_int8"}
        for row in runtimes.values():
            assert set(row) == keys and row["image_ms_b64"] > 0 and row["size_mb"] > 0
            assert 0 <= row["top1_en"] <= 1
            assert (row["top1_zh"] is None) == (name == "teacher")  # the smoke teacher reads English only
    assert result["student"]["onnx_fp32"]["top1_en"] == result["student"]["torch_fp32"]["top1_en"]
    assert "| student | onnx_int8" in capsys.readouterr().out
