"""benchmarks/gpu_speed.py on a CPU (the tiny pair), the published sizes of its CLIP configs, and the GPU settings of
the training loop: none of them changes a CPU run (the optimiser is not fused, nothing is compiled unless asked),
and ``train.compile: true`` trains a tiny student on a CPU."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from vldistill.config import ConfigError, DataConfig, TrainConfig, load_recipe
from vldistill.students import build_student
from vldistill.tokenization import train_wordpiece
from vldistill.train.fit import load_train_data, tokenizer_corpus
from vldistill.train.loop import DistillModule, Trainer, make_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_speed

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


# ------------------------------------------------------------------------------------------------ the benchmark
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench") / "gpu_speed.json"
    result = gpu_speed.main(
        ["--size", "tiny", "--steps", "2", "--warmup", "1", "--device", "cpu", "--output", str(out)]
    )
    return result, out


def test_tiny_run_writes_rates_ratios_and_flops(tiny) -> None:
    result, out = tiny
    entry = json.loads(out.read_text())["tiny"]
    assert entry == json.loads(json.dumps(result))
    rates = entry["rates"]
    assert set(rates) == {"F", "S", "O", "C"}
    assert all(math.isfinite(v) and v > 0 for v in rates.values())
    assert entry["ratios"]["C_over_O"] == pytest.approx(rates["C"] / rates["O"], rel=1e-3)
    assert entry["ratios"]["C_over_S"] == pytest.approx(rates["C"] / rates["S"], rel=1e-3)
    flops = entry["flops_per_step"]
    assert all(isinstance(v, int) and v > 0 for v in flops.values())
    # the live-teacher step is the teacher's forward plus the cached step: the same products, counted the same
    assert flops["O"] == flops["F"] + flops["C"]
    assert flops["C"] > flops["S"]  # the distillation losses' adapters and in-batch terms
    assert entry["C_over_O_flop_bound"] == pytest.approx(flops["O"] / flops["C"], rel=1e-3)
    batch = entry["setup"]["batch_size"]
    for k in rates:
        assert entry["achieved_tflops"][k] == pytest.approx(flops[k] * rates[k] / batch / 1e12, rel=1e-2, abs=1e-4)
    # a CPU: float32, no device memory, no peak, no targets; the loop's defaults (AdamW not fused)
    assert entry["precision"] == "float32" and entry["peak_memory_gib"] is None
    assert entry["device_peak_tflops"] is None and entry["student_step_peak_fraction"] is None
    assert entry["targets"] is None
    assert entry["options"] == {"compile": False, "fused_adamw": False, "tf32": None}
    assert entry["teacher"]["params"] > entry["student"]["params"] > 0


def test_a_run_keeps_the_other_sizes_entries(tiny, tmp_path) -> None:
    result, _ = tiny
    out = tmp_path / "gpu_speed.json"
    out.write_text(json.dumps({"large": {"size": "large", "rates": {"F": 1.0}}}))
    gpu_speed.save(out, result)
    entries = json.loads(out.read_text())
    assert set(entries) == {"large", "tiny"} and entries["large"]["rates"] == {"F": 1.0}
    out.write_text("[1, 2]")  # not a gpu_speed.json: replaced
    gpu_speed.save(out, result)
    assert set(json.loads(out.read_text())) == {"tiny"}


def test_the_measures_are_saved_before_the_variants(tmp_path, monkeypatch) -> None:
    """--variants compiles twice (the slow part on a GPU): the measured entry is on disk before they start."""
    out = tmp_path / "gpu_speed.json"

    def variants_fail(bench, cuda):
        assert json.loads(out.read_text())["tiny"]["rates"]["S"] > 0  # already written, without variants
        raise KeyboardInterrupt("stopped during the variants")

    monkeypatch.setattr(gpu_speed, "variants", variants_fail)
    argv = ["--size", "tiny", "--steps", "1", "--warmup", "1", "--device", "cpu", "--variants", "--output", str(out)]
    with pytest.raises(KeyboardInterrupt, match="during the variants"):
        gpu_speed.main(argv)
    entry = json.loads(out.read_text())["tiny"]
    assert "variants" not in entry and set(entry["rates"]) == set("FSOC")


@pytest.mark.parametrize(
    ("spec", "published"),
    [("VIT_L14", 427.6e6), ("VIT_B16", 149.6e6), ("VIT_B32", 151.3e6)],  # OpenAI CLIP checkpoints' counts
)
def test_configs_have_the_published_parameter_counts(spec: str, published: float) -> None:
    assert gpu_speed.count_parameters(getattr(gpu_speed, spec)) == pytest.approx(published, rel=1e-3)


def test_large_and_base_pairs() -> None:
    large, base = gpu_speed.SIZES["large"], gpu_speed.SIZES["base"]
    assert (large["teacher"][1], large["student"][1]) == (gpu_speed.VIT_L14, gpu_speed.VIT_B16)
    assert (base["teacher"][1], base["student"][1]) == (gpu_speed.VIT_B16, gpu_speed.VIT_B32)
    vision = gpu_speed.VIT_L14["vision"]
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["num_attention_heads"]) == (1024, 24, 16)
    assert (vision["patch_size"], vision["image_size"], vision["intermediate_size"]) == (14, 224, 4096)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("Tesla T4", None),
    ],
)
def test_device_peaks(name: str, peak: float | None) -> None:
    assert gpu_speed.peak_tflops(name) == peak


def test_bad_options_are_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        gpu_speed.parse_args(["--size", "tiny", "--text-len", "78"])
    assert "--text-len = 78: CLIP's text towers have 77 positions" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ the loop's GPU settings
LANGS = ["en", "zh"]


@pytest.fixture(scope="module")
def data():
    return load_train_data(DataConfig(train="bundled:easyvqa", eval=None, languages=LANGS, limit_train=32))


@pytest.fixture(scope="module")
def tokenizer(data):
    return train_wordpiece(tokenizer_corpus(data, LANGS), vocab_size=300)


def recipe(output_dir: Path, **train):
    raw = {
        "name": "test",
        "student": {"preset": "test-clip"},
        "data": {"train": "bundled:easyvqa", "eval": None, "languages": LANGS, "limit_train": 32},
        "stages": [{"steps": 3, "losses": ["clip"]}],
        "train": {
            "batch_size": 8,
            "log_every": 1,
            "progress": False,
            "tensorboard": False,
            "output_dir": str(output_dir),
        },
    }
    raw["train"].update(train)
    return load_recipe(raw=raw)


def test_gpu_settings_default_to_a_plain_cpu_run(tmp_path, data, tokenizer) -> None:
    assert TrainConfig().compile is False and TrainConfig().tf32 is True
    with pytest.raises(ConfigError, match=r"train\.compile = 'yes'"):
        recipe(tmp_path, compile="yes")
    torch.manual_seed(0)
    student = build_student("test-clip", tokenizer)
    optimizer = make_optimizer(student, 1e-3, 0.05)
    assert not optimizer.defaults["fused"] and optimizer.defaults["foreach"] is None  # torch's default on a CPU
    trainer = Trainer(recipe(tmp_path), student, data.dataset)
    assert trainer.accelerator.dataloader_config.non_blocking is False


def compile_usable() -> str | None:
    """None when torch.compile works here, else why not."""
    try:
        fn = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2)
        fn(torch.ones(2))
    except Exception as err:  # any failure means this build cannot compile
        return f"{type(err).__name__}: {err}"
    return None


def test_compile_trains_a_tiny_student_on_cpu(tmp_path, data, tokenizer, monkeypatch) -> None:
    why = compile_usable()
    if why:
        pytest.skip(f"torch.compile is unusable on this CPU build: {why}")
    towers_compiled: list[bool] = []  # per step: were the student's towers compiled while it ran
    forward = DistillModule.forward

    def spy(self, batch):
        model = self.student.model
        towers_compiled.append(all(t._compiled_call_impl is not None for t in (model.vision_model, model.text_model)))
        return forward(self, batch)

    monkeypatch.setattr(DistillModule, "forward", spy)
    runs = {}
    for compiled in (False, True):
        towers_compiled.clear()
        torch.manual_seed(0)
        student = build_student("test-clip", tokenizer)
        keys = list(student.state_dict())
        result = Trainer(recipe(tmp_path / str(compiled), compile=compiled), student, data.dataset).fit()
        runs[compiled] = [r["loss"] for r in result.history]
        assert towers_compiled == [compiled] * 3
        assert list(student.state_dict()) == keys  # compiled in place: the names (checkpoints, export) unchanged
        assert student.model.vision_model._compiled_call_impl is None  # given back uncompiled
        assert student.model.text_model._compiled_call_impl is None
    assert all(math.isfinite(v) for v in runs[True])
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)
