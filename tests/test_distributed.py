"""Training on several processes (``torchrun``/``accelerate launch``): two CPU processes with the gloo backend.

``train.batch_size`` is the global batch, split over the processes; the pooled embeddings are gathered before the
losses, so a two-process run logs the same losses and reaches the same weights as a one-process run. Only the main
process writes logs, checkpoints and the export. Each case launches ``torch.distributed.run`` in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from helpers import assert_same_rows, read_metrics, save_tiny_teacher
from vldistill.batching import caption_group_ids as _groups
from vldistill.cli import main
from vldistill.config import ConfigError, load_recipe
from vldistill.data.sources import load_data
from vldistill.models import load_teacher
from vldistill.students import build_student
from vldistill.tokenization import train_wordpiece
from vldistill.train.fit import tokenizer_corpus
from vldistill.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny English CLIP teacher saved as a Hugging Face directory."""
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "model", seed=5, limit=256)


def fit_args(recipe: str, teacher: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fit",
        recipe,
        "--tiny",
        "--teacher",
        str(teacher),
        "--output",
        str(out),
        "--train.progress",
        "false",
        *extra,
    ]


def launch(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd += ["-m", "vldistill.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        if name.endswith("k_proj.bias"):  # its true gradient is 0 (softmax is shift-invariant): Adam amplifies noise
            continue
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=2e-5, msg=name)


MFD = ["--stages.0.losses", "[{name: clip, langs: [en]}, {name: mfd, weight: 100.0}]"]
TEXTS = ["--data.texts", "{en: [bundled:easyvqa-questions]}"]


@pytest.mark.parametrize(
    ("recipe", "extra"),
    [("clipkd", []), ("dcclip", []), ("clipkd", MFD), ("dcclip", TEXTS)],
    ids=["clipkd", "dcclip", "mfd", "free-texts"],
)
def test_two_processes_train_like_one(tmp_path, teacher_dir, recipe, extra):
    """clipkd: in-batch losses (clip, crd, icl) and fd; dcclip: two stages, fd + xling, then clip; mfd: random
    patch masks, which each process must draw for its own shard; free texts: each process gets its half of every
    batch's samples and of its free texts."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(fit_args(recipe, teacher_dir, one, "--train.log_every", "2", *extra)) == 0
    run = launch(fit_args(recipe, teacher_dir, two, "--train.log_every", "2", *extra))
    assert run.returncode == 0, run.stderr[-3000:]

    expected = read_metrics(one)
    assert len(expected) >= 3
    if extra is TEXTS:  # the free texts' term trained in both
        assert any("fd_text_texts_en" in row for row in expected)
    assert_same_rows(read_metrics(two), expected, rel=1e-4)  # one row per logged step: the main process writes
    assert_same_weights(two / "student", one / "student")
    assert (two / "eval.json").is_file() and (two / "checkpoints" / "latest").is_file()
    assert not list((two / "checkpoints").glob(".tmp-*"))
    summaries = [line for line in run.stdout.splitlines() if line == "{"]
    assert len(summaries) == 1, "the summary must be printed once, by the main process"


def test_a_two_process_run_resumes_from_a_checkpoint_of_the_main_process(tmp_path, teacher_dir):
    """Checkpoints every 2 steps; take the run back to step 2 (as a crash would leave it) and resume on 2 processes:
    the same logged losses and weights as the uninterrupted run."""
    out = tmp_path / "run"
    args = fit_args("clipkd", teacher_dir, out, "--train.log_every", "1", "--train.checkpoint_every", "2")
    args += ["--train.keep_checkpoints", "5"]
    run = launch(args)
    assert run.returncode == 0, run.stderr[-3000:]
    uninterrupted, final = read_metrics(out), load_file(out / "student" / "model.safetensors")
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "stage0-step2", "stage0-step4", "stage1-step0"]
    for later in ("stage0-step4", "stage1-step0"):
        shutil.rmtree(ckpts / later)
    (ckpts / "latest").write_text("stage0-step2")

    run = launch([*args, "--resume"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resuming from" in run.stdout and "(stage 0, step 2)" in run.stdout
    assert_same_rows(read_metrics(out), uninterrupted, rel=1e-4)
    resumed = load_file(out / "student" / "model.safetensors")
    for name, value in final.items():
        if not name.endswith("k_proj.bias"):
            torch.testing.assert_close(resumed[name], value, rtol=1e-4, atol=2e-5, msg=name)


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path, teacher_dir):
    run = launch(fit_args("clipkd", teacher_dir, tmp_path / "run", "--train.batch_size", "31"))
    assert run.returncode != 0
    assert "train.batch_size = 31: the global batch is split evenly over the 2 processes; give a multiple of 2" in (
        run.stderr + run.stdout
    )


def test_caption_groups_depend_on_the_text_alone():
    """The shards of one batch are grouped on different processes: equal captions must get equal ids anyway."""
    first, second = _groups(["a red circle", "a blue square", "a red circle"]), _groups(["a blue square", "x"])
    assert first[0] == first[2] and first[0] != first[1]
    assert second[0] == first[1] and second[1] not in first
    assert first.dtype == torch.int64


def _trainer_with(monkeypatch, tmp_path, teacher_dir, **accelerator):
    """A Trainer whose Accelerator is replaced by a stand-in (``device``, ``num_processes``, ``distributed_type``)."""
    import vldistill.train.loop as trainer_mod

    fake = SimpleNamespace(**{"distributed_type": DistributedType.NO, "num_processes": 1, **accelerator})
    fake.device = torch.device(fake.device) if hasattr(fake, "device") else torch.device("cpu")
    monkeypatch.setattr(trainer_mod, "_accelerator", lambda mixed_precision: fake)
    cfg = load_recipe("clipkd", {"teacher.name_or_path": str(teacher_dir), "train.output_dir": str(tmp_path)}, True)
    data = load_data("bundled:easyvqa", "train", ["en", "zh"], limit=32)
    teacher = load_teacher(teacher_dir)
    student = build_student("test-clip", train_wordpiece(tokenizer_corpus(data, ["en", "zh"]), vocab_size=300))
    return Trainer(cfg, student, data.dataset, [teacher]), teacher


def test_live_teachers_are_placed_on_the_processs_device(monkeypatch, tmp_path, teacher_dir):
    """The teacher is not part of the prepared module, so Accelerate does not move it: the trainer does (a GPU in
    practice; the meta device stands in for one here)."""
    trainer, teacher = _trainer_with(monkeypatch, tmp_path, teacher_dir, device="meta")
    assert {p.device.type for p in teacher.parameters()} == {"meta"}
    assert trainer.teachers[0] is teacher


@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_sharded_accelerate_configs_are_refused(monkeypatch, tmp_path, teacher_dir, kind):
    with pytest.raises(ConfigError, match=f"accelerate is configured for {kind.value}; vldistill trains with data"):
        _trainer_with(monkeypatch, tmp_path, teacher_dir, distributed_type=kind, num_processes=2)
