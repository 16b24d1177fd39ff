"""Helpers shared by several test modules: tensors and layers set by hand, and comparing logged metrics.

Importable as ``helpers`` because pytest puts ``tests/`` on ``sys.path`` (no ``__init__.py``, default import mode)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from vldistill.outputs import Dims, ModelDims


def T(x, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32, requires_grad=grad)


def n_linear(x, w, b):
    """``x W^T + b`` in float64 numpy: the reference for an ``nn.Linear`` set with ``set_linear``."""
    return np.asarray(x, dtype=np.float64) @ np.asarray(w, dtype=np.float64).T + np.asarray(b, dtype=np.float64)


def dims(student=(2, 2, 2), *teachers) -> Dims:
    """Dims from ``(embed, image_width, text_width)`` triples."""
    return Dims(ModelDims(*student), tuple(ModelDims(*t) for t in teachers))


def set_linear(layer: nn.Module, weight, bias) -> None:
    assert isinstance(layer, nn.Linear)
    with torch.no_grad():
        layer.weight.copy_(T(weight))
        layer.bias.copy_(T(bias))


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "samples_per_second"} for row in rows]


def assert_same_rows(rows: list[dict[str, Any]], expected: list[dict[str, Any]], rel: float = 1e-5) -> None:
    """Same logged steps and values (up to float noise), wall-clock throughput aside."""
    rows, expected = without_timing(rows), without_timing(expected)
    assert len(rows) == len(expected)
    for row, exp in zip(rows, expected, strict=True):
        assert row.keys() == exp.keys()
        for key, value in exp.items():
            if isinstance(value, str):
                assert row[key] == value
            else:
                assert row[key] == pytest.approx(value, rel=rel, abs=1e-6), f"{key} at {exp['stage']} {exp['step']}"


def save_tiny_teacher(path: Path, seed: int, limit: int, vocab_size: int = 300, **overrides: Any) -> Path:
    """A ``test-clip`` saved as a Hugging Face directory: its WordPiece trained on the first ``limit`` bundled English
    captions; ``overrides`` as for ``build_student`` (default: 24-d embeddings, a 48-wide vision tower)."""
    from vldistill.data.sources import load_data
    from vldistill.students import build_student
    from vldistill.tokenization import train_wordpiece
    from vldistill.train.fit import tokenizer_corpus

    torch.manual_seed(seed)
    tok = train_wordpiece(
        tokenizer_corpus(load_data("bundled:easyvqa", "train", ["en"], limit=limit), ["en"]), vocab_size
    )
    build_student("test-clip", tok, **{"projection_dim": 24, "vision.hidden_size": 48, **overrides}).save_pretrained(
        path
    )
    return path


# ------------------------------------------------------------------------------------------ tiny pair data
COLOURS = ["red", "blue", "green", "yellow"]
SHAPES = ["circle", "square"]


def colour_image(i: int) -> Image.Image:
    """A 32x32 image of one flat colour, ``COLOURS[i % 4]``."""
    rgb = [(200, 30, 30), (30, 30, 200), (30, 200, 30), (220, 220, 40)][i % 4]
    return Image.new("RGB", (32, 32), rgb)


def pair_items(n: int = 8) -> list[dict[str, Any]]:
    """``n`` image-caption samples as a dataset yields them (English captions, 8 labels)."""
    captions = [f"a {COLOURS[i % 4]} {SHAPES[i % 2]}" for i in range(n)]
    return [
        {"index": i, "image": colour_image(i), "captions": {"en": c}, "label": i % 8} for i, c in enumerate(captions)
    ]


def tiny_train(output_dir: Path) -> dict[str, Any]:
    """A recipe's ``train`` section for runs of a few steps on a handful of samples."""
    return {
        "batch_size": 4,
        "lr": 1e-2,
        "warmup_steps": 0,
        "log_every": 1,
        "progress": False,
        "tensorboard": False,
        "output_dir": str(output_dir),
    }


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def benchmark_script(name: str) -> Iterator[ModuleType]:
    """``benchmarks/NAME.py`` imported as a module (it is a script, not part of the package), registered in
    ``sys.modules`` while in use (dataclasses look their module up there) and removed after."""
    spec = importlib.util.spec_from_file_location(f"vldistill_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
