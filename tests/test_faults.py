"""Nothing lost, nothing silently wrong: the fault matrix of issue 14, each bad input and each kill point with what
must happen.

Kills are real: ``tests/fault_child.py`` runs ``vldistill fit`` in a child process that SIGKILLs itself at a chosen
point (no ``finally`` runs, as with ``kill -9``), or pauses there until the test kills it. Everything else runs in
this process on tiny ``test-clip`` recipes over 32 bundled easy-VQA samples. A full disk is simulated by making
``os.write`` fail with ENOSPC for one file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file

from helpers import assert_same_rows, read_metrics
from vldistill.cache import CachedTeachers, CacheError, build_cache, read_manifest, teacher_identity
from vldistill.cli import main
from vldistill.config import CacheConfig, ConfigError, DataConfig, load_recipe
from vldistill.data.pairs import DataError, load_manifest
from vldistill.data.sources import load_data
from vldistill.files import DiskFullError
from vldistill.models import ModelLoadError, Teacher, as_teacher, load_teacher
from vldistill.students import build_student
from vldistill.tokenization import train_wordpiece
from vldistill.train.fit import fit_recipe, load_train_data, tokenizer_corpus
from vldistill.train.loop import NonFiniteError, RunDirectory, RunError, Trainer

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

CHILD = Path(__file__).with_name("fault_child.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
N_TRAIN = 32


# ---------------------------------------------------------------------------------------------------- helpers
def write_recipe(path: Path, out: Path, steps: int = 6, teacher: str | None = None, **sections: Any) -> Path:
    """A tiny recipe: test-clip, 32 English samples, batch 8, a checkpoint every 2 steps, keeping 2."""
    raw: dict[str, Any] = {
        "name": "faults",
        "student": {"preset": "test-clip", "vocab_size": 200},
        "data": {"train": "bundled:easyvqa", "eval": None, "languages": ["en"], "limit_train": N_TRAIN},
        "stages": [{"name": "s", "steps": steps, "losses": ["clip"]}],
        "train": {
            "batch_size": 8,
            "lr": 2e-3,
            "warmup_steps": 1,
            "log_every": 1,
            "checkpoint_every": 2,
            "keep_checkpoints": 2,
            "progress": False,
            "tensorboard": False,
            "output_dir": str(out),
        },
    }
    if teacher is not None:
        raw["teacher"] = {"name_or_path": teacher, "languages": ["en"]}
        raw["stages"][0]["losses"] = ["clip", {"name": "fd", "tower": "image"}]
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def spawn(spec: dict[str, Any], *args: str) -> subprocess.Popen:
    cmd = [sys.executable, str(CHILD), json.dumps(spec), "--", *args]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_killed(spec: dict[str, Any], *args: str) -> None:
    proc = spawn(spec, *args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"the child was not killed (rc {proc.returncode}): {err[-3000:]}"


def fresh_process() -> None:
    """What a new process starts with (Accelerate's process-wide state)."""
    AcceleratorState._reset_state(True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def strict_rows(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl parsed as strict JSON: NaN and Infinity are not JSON."""

    def refuse(name: str):
        raise ValueError(f"{name} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tokenizer():
    data = load_data("bundled:easyvqa", "train", ["en"], limit=N_TRAIN)
    return train_wordpiece(tokenizer_corpus(data, ["en"]), vocab_size=200)


@pytest.fixture(scope="module")
def teacher(tokenizer) -> Teacher:
    torch.manual_seed(123)
    widths = {"vision.hidden_size": 48, "text.hidden_size": 48}
    return as_teacher(build_student("test-clip", tokenizer, projection_dim=24, **widths), ["en"])


@pytest.fixture(scope="module")
def teacher_dir(teacher: Teacher, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "model"
    teacher.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def train_data():
    return load_train_data(DataConfig(train="bundled:easyvqa", eval=None, languages=["en"], limit_train=N_TRAIN))


# ============================================================== 1. a run owns its directory: refuse, lock, resume
def test_a_new_run_refuses_a_directory_that_holds_another_run(tmp_path, capsys):
    out = tmp_path / "run"
    a = write_recipe(tmp_path / "a.yaml", out, steps=2)
    b = write_recipe(tmp_path / "b.yaml", out, steps=2, student={"overrides": {"projection_dim": 24}})
    assert main(["fit", str(a)]) == 0
    before = {p: sha256(p) for p in out.rglob("*") if p.is_file() and p.name != ".vldistill.lock"}
    capsys.readouterr()
    fresh_process()
    assert main(["fit", str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{out} holds another run (config.json, metrics.jsonl, checkpoints, student-init, student)" in err
    assert "--resume" in err and "--overwrite" in err
    assert {p: sha256(p) for p in out.rglob("*") if p.is_file() and p.name != ".vldistill.lock"} == before


def test_a_run_that_saved_nothing_does_not_block_the_next(tmp_path):
    """A run that stopped before it saved anything (here: a data error) leaves only config.json: nothing to mix."""
    out = tmp_path / "run"
    bad = write_recipe(tmp_path / "bad.yaml", out, steps=2, data={"train": str(tmp_path / "missing.jsonl")})
    assert main(["fit", str(bad)]) == 2
    assert sorted(p.name for p in out.iterdir()) == [".vldistill.lock", "config.json"]
    fresh_process()
    assert main(["fit", str(write_recipe(tmp_path / "good.yaml", out, steps=2))]) == 0
    assert json.loads((out / "config.json").read_text())["data"]["train"] == "bundled:easyvqa"


def test_resume_refuses_another_config_and_names_the_keys(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", str(write_recipe(tmp_path / "a.yaml", out, steps=2))]) == 0
    changed = write_recipe(tmp_path / "b.yaml", out, steps=3, train={"lr": 1e-3, "progress": True})
    capsys.readouterr()
    fresh_process()
    assert main(["fit", str(changed), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: the run in {out} was started with another config (2 keys differ: " in err
    assert "stages.0.steps (2 there, 3 now)" in err and "train.lr (0.002 there, 0.001 now)" in err
    assert "train.progress" not in err  # how a run is shown may change on resume
    with pytest.raises(RunError, match="resume and overwrite: choose one"):
        RunDirectory(out).claim(load_recipe(changed), resume=True, overwrite=True)


def test_a_run_is_locked_killed_after_a_checkpoint_and_resumed_as_itself(tmp_path, capsys):
    """Run A, then B (another student width) replaces it with --overwrite and is paused right after its first
    checkpoint: a second process is refused by the lock, with B's pid. Then B is killed -9 and resumed: it continues
    with its own student-init (A's would not even fit) and ends where an uninterrupted B ends."""
    out = tmp_path / "run"
    a = write_recipe(tmp_path / "a.yaml", out)
    b = write_recipe(tmp_path / "b.yaml", out, student={"overrides": {"projection_dim": 24}})
    assert main(["fit", str(a)]) == 0
    marker = tmp_path / "paused"
    target = {"target": "vldistill.train.loop:Trainer._save_checkpoint", "call": 1, "when": "after"}
    proc = spawn({"pause": {**target, "marker": str(marker)}}, "fit", str(b), "--overwrite")
    try:
        deadline = time.monotonic() + 600
        while not marker.exists():
            assert proc.poll() is None, f"the child ended (rc {proc.returncode}): {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        capsys.readouterr()
        fresh_process()
        assert main(["fit", str(b), "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"{out} is being written by another vldistill process (pid {proc.pid})" in err
    finally:
        proc.kill()  # SIGKILL
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / "latest").read_text() == "stage0-step2"

    fresh_process()
    assert main(["fit", str(b), "--resume"]) == 0
    assert f"resuming from {out / 'checkpoints' / 'stage0-step2'}" in capsys.readouterr().out
    fresh_process()
    assert (
        main(
            [
                "fit",
                str(write_recipe(tmp_path / "b2.yaml", tmp_path / "b2", student={"overrides": {"projection_dim": 24}})),
            ]
        )
        == 0
    )
    resumed, fresh = (
        load_file(out / "student" / "model.safetensors"),
        load_file(tmp_path / "b2" / "student" / "model.safetensors"),
    )
    assert resumed["visual_projection.weight"].shape[0] == 24
    assert resumed.keys() == fresh.keys()
    for name, value in fresh.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)


# ================================================ 2. history that survives kills; checkpoints half-deleted by a kill
def test_metrics_history_and_checkpoints_survive_kills(tmp_path, capsys):
    """Killed -9 while pruning (step 2's checkpoint half deleted), then killed -9 again right after resuming,
    before its first log line: the history keeps every row up to the checkpoint, the half-deleted checkpoint is gone,
    and the run ends with the rows and weights of an uninterrupted one."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", out, steps=8)
    run_killed({"kill_while_pruning": True}, "fit", str(recipe))
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "stage0-step6"
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]

    run_killed(
        {"kill": {"target": "vldistill.train.loop:Trainer._run_stage", "call": 1, "when": "before"}},
        "fit",
        str(recipe),
        "--resume",
    )
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]  # before: an empty file

    fresh_process()
    assert main(["fit", str(recipe), "--resume"]) == 0
    fresh_process()
    assert main(["fit", str(write_recipe(tmp_path / "ref.yaml", tmp_path / "ref", steps=8))]) == 0
    assert_same_rows(strict_rows(out / "metrics.jsonl"), read_metrics(tmp_path / "ref"))
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "stage0-step6", "stage1-step0"]
    for ckpt in ("stage0-step6", "stage1-step0"):
        assert sorted(p.name for p in (ckpts / ckpt).iterdir()) == ["module.safetensors", "optim.pt", "state.json"]
    got, want = (
        load_file(out / "student" / "model.safetensors"),
        load_file(tmp_path / "ref" / "student" / "model.safetensors"),
    )
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_a_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path, train_data, tokenizer):
    cfg = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "run", steps=4))
    torch.manual_seed(0)
    Trainer(cfg, build_student("test-clip", tokenizer), train_data.dataset).fit()
    metrics = tmp_path / "run" / "metrics.jsonl"
    rows = metrics.read_text().splitlines()
    metrics.write_text("\n".join(rows[:2]) + "\n" + rows[2][:15])  # killed while writing row 3
    (tmp_path / "run" / "checkpoints" / "latest").write_text("stage0-step2")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "stage1-step0")
    fresh_process()
    Trainer(cfg, build_student("test-clip", tokenizer), train_data.dataset).fit(resume=True)
    assert [r["step"] for r in strict_rows(metrics)] == [1, 2, 3, 4]


# ======================================================================== 3. a damaged cache heals; --rebuild rebuilds
@pytest.fixture
def cli_cache(tmp_path, teacher_dir, capsys):
    """``vldistill cache`` over 32 samples in 4 shards of 8 rows; returns (args, directory, summary)."""
    directory = tmp_path / "cache"
    args = ["cache", "--teacher", str(teacher_dir), "--data", "bundled:easyvqa", "--languages", "en"]
    args += ["--limit", str(N_TRAIN), "--shard-rows", "8", "--workers", "0", "--output", str(directory)]
    capsys.readouterr()
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards"] == 4 and summary["built_rows"] == N_TRAIN
    return args, directory


def _cache_summary(capsys) -> dict[str, Any]:
    out = capsys.readouterr().out
    return json.loads(out[out.index("{") :])


def _open(directory: Path, teacher_dir: Path, train_data) -> CachedTeachers:
    return CachedTeachers(directory, train_data.dataset, [teacher_identity(None, str(teacher_dir))], [["en"]])


def test_vldistill_cache_recomputes_a_truncated_shard_and_rebuild_rebuilds(cli_cache, teacher_dir, train_data, capsys):
    args, directory = cli_cache
    shard = directory / "shard-00001.safetensors"
    original = sha256(shard)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(
        CacheError,
        match=r"damaged \(shard-00001\.safetensors: \d+ bytes, the manifest says \d+\).*"
        r"run `vldistill cache`",
    ):
        _open(directory, teacher_dir, train_data)

    assert main(args) == 0
    summary = _cache_summary(capsys)
    assert summary["complete"] and summary["built_rows"] == 8
    assert len(summary["repaired"]) == 1 and summary["repaired"][0].startswith("shard-00001.safetensors: ")
    assert sha256(shard) == original  # the same teacher, the same rows: the same bytes
    _open(directory, teacher_dir, train_data)

    assert main([*args, "--rebuild"]) == 0
    assert _cache_summary(capsys)["built_rows"] == N_TRAIN


def test_a_shard_with_corrupt_bytes_is_refused_at_opening_and_recomputed(cli_cache, teacher_dir, train_data, capsys):
    """The right size, other bytes (NaN where embeddings were): found by the SHA-256 stored in the manifest when the
    cache is opened, before any step trains on it."""
    args, directory = cli_cache
    shard = directory / "shard-00002.safetensors"
    original, data = sha256(shard), bytearray(shard.read_bytes())
    data[-64:] = b"\xff" * 64  # float32 NaN, in the last tensor's bytes
    shard.write_bytes(bytes(data))
    assert [s.get("sha256") for s in read_manifest(directory)["shards"]][2] == original
    with pytest.raises(CacheError, match=r"shard-00002\.safetensors: its SHA-256 differs from the manifest's"):
        _open(directory, teacher_dir, train_data)
    capsys.readouterr()
    assert main(args) == 0
    assert _cache_summary(capsys)["built_rows"] == 8 and sha256(shard) == original


def test_opening_trusts_unchanged_shards_by_stat_and_vldistill_cache_checks_every_byte(
    cli_cache, teacher_dir, train_data, monkeypatch, capsys
):
    """Opening a cache to train costs a ``stat`` per shard (size and modification time as written), not a read of
    the cache; a shard rewritten or copied (another time) is hashed; ``vldistill cache`` hashes every shard."""
    args, directory = cli_cache
    with monkeypatch.context() as m:
        m.setattr("vldistill.cache.writer.file_sha256", lambda p: pytest.fail(f"{p} was hashed at opening"))
        _open(directory, teacher_dir, train_data)
    shard = directory / "shard-00003.safetensors"
    st, original = shard.stat(), sha256(shard)
    os.utime(shard)  # touched (a copy): hashed again at opening, the same bytes, accepted
    hashed = []
    with monkeypatch.context() as m:
        m.setattr("vldistill.cache.writer.file_sha256", lambda p: hashed.append(p.name) or original)
        _open(directory, teacher_dir, train_data)
    assert hashed == [shard.name]
    capsys.readouterr()
    assert main(args) == 0 and _cache_summary(capsys)["built_rows"] == 0  # checked, reused: its new time recorded
    with monkeypatch.context() as m:
        m.setattr("vldistill.cache.writer.file_sha256", lambda p: pytest.fail(f"{p} was hashed at opening"))
        _open(directory, teacher_dir, train_data)
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-64:] = b"\xff" * 64
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # the old time set back by hand: not caught at opening
    _open(directory, teacher_dir, train_data)
    capsys.readouterr()
    assert main(args) == 0  # vldistill cache reads every byte: found and recomputed
    assert _cache_summary(capsys)["built_rows"] == 8 and sha256(shard) == original


def test_a_teacher_giving_nan_is_never_cached(tmp_path, tokenizer, train_data):
    torch.manual_seed(1)
    bad = as_teacher(build_student("test-clip", tokenizer), ["en"])
    with torch.no_grad():
        bad.model.visual_projection.weight.fill_(float("nan"))
    options = CacheConfig(workers=0, batch_size=8, shard_rows=8)
    with pytest.raises(CacheError, match=r"gave non-finite values \(NaN or inf\) in its image output for rows"):
        build_cache(tmp_path / "c", [bad], train_data.dataset, [["en"]], options=options, progress=False)


# ============================================================================================ 4. NaN stops the run
def test_a_teacher_turning_nan_stops_the_run_at_that_step_and_keeps_the_last_checkpoint(
    tmp_path, teacher, tokenizer, train_data, monkeypatch
):
    cfg = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "run", teacher="my-teacher"))
    real, calls = teacher.encode_image, []

    def encode_image(pixel_values, return_tokens=False):
        calls.append(1)
        out = real(pixel_values, return_tokens)
        return out * float("nan") if len(calls) >= 3 else out  # the third step's batch

    monkeypatch.setattr(teacher, "encode_image", encode_image)
    saved: dict[str, str] = {}
    real_save = Trainer._save_checkpoint

    def save(self, *args, **kwargs):
        path = real_save(self, *args, **kwargs)
        saved[path.name] = sha256(path / "module.safetensors")
        return path

    monkeypatch.setattr(Trainer, "_save_checkpoint", save)
    torch.manual_seed(0)
    with pytest.raises(NonFiniteError) as info:
        Trainer(cfg, build_student("test-clip", tokenizer), train_data.dataset, [teacher]).fit()
    msg = str(info.value)
    assert msg.startswith(
        "stage 0 ('s'), step 3 of 6: teacher 0 (my-teacher) gave non-finite values (NaN or inf) in its image output"
    )
    assert msg.endswith("the run stopped, its last checkpoint is kept")
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "stage0-step2"]
    assert sha256(ckpts / "stage0-step2" / "module.safetensors") == saved["stage0-step2"]
    assert [r["step"] for r in strict_rows(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    assert not (tmp_path / "run" / "student").exists()


def test_nan_read_from_a_cache_names_the_shard_and_the_step(tmp_path, teacher, teacher_dir, tokenizer, train_data):
    """A cache whose NaN slipped past its checksum (written so by an older vldistill): the run stops at the first
    batch that reads it, naming the shard and the row."""
    directory = tmp_path / "cache"
    options = CacheConfig(workers=0, batch_size=8, shard_rows=8)
    identity = [teacher_identity(teacher, str(teacher_dir))]
    build_cache(directory, [teacher], train_data.dataset, [["en"]], identity, options=options, progress=False)
    manifest = read_manifest(directory)
    shard = directory / "shard-00003.safetensors"
    tensors = load_file(shard)
    tensors["t0.image"][5] = float("nan")
    from vldistill.files import save_safetensors

    manifest["shards"][3]["sha256"] = save_safetensors(tensors, shard, metadata={"format": manifest["format"]})
    manifest["shards"][3]["bytes"] = shard.stat().st_size
    (directory / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_recipe(
        write_recipe(tmp_path / "r.yaml", tmp_path / "run", teacher=str(teacher_dir)),
        {"teacher.source": "cache", "teacher.cache": str(directory)},
    )
    source = _open(directory, teacher_dir, train_data)
    torch.manual_seed(0)
    with pytest.raises(
        NonFiniteError,
        match=r"^stage 0 \('s'\), step \d of 6: teacher 0 \(.*model, read from the "
        r"cache .*\) \(cache .*, column t0: .*shard-00003\.safetensors row 5",
    ):
        Trainer(cfg, build_student("test-clip", tokenizer), train_data.dataset, [], source).fit()
    assert all(np.isfinite(r["loss"]) for r in strict_rows(tmp_path / "run" / "metrics.jsonl"))


def test_a_diverging_student_stops_with_a_finite_history(tmp_path, tokenizer, train_data):
    cfg = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "run", train={"lr": 1e12, "max_grad_norm": None}))
    torch.manual_seed(0)
    with pytest.raises(NonFiniteError, match=r"^stage 0 \('s'\), step \d of 6: the loss is nan"):
        Trainer(cfg, build_student("test-clip", tokenizer), train_data.dataset).fit()
    rows = strict_rows(tmp_path / "run" / "metrics.jsonl")
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_a_teacher_with_garbage_weights_is_refused_naming_its_file(tmp_path, teacher_dir, capsys):
    """A valid header, garbage bytes (0xff: NaN): before, every loss was NaN and the run ended with exit code 0."""
    bad = tmp_path / "teacher"
    shutil.copytree(teacher_dir, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    (header,) = struct.unpack("<Q", data[:8])
    weights.write_bytes(data[: 8 + header] + b"\xff" * (len(data) - 8 - header))
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", teacher=str(bad))
    assert main(["fit", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{weights}: its weights hold NaN or inf in" in err and "the weights file is damaged" in err
    assert not (tmp_path / "run" / "student").exists()


# ======================================================================================== 5. images, decoded right
def _png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG (grey [H, W] or RGB [H, W, 3]) written by hand: PIL cannot write 16-bit RGB."""
    h, w = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    colour = {1: 0, 3: 2}[channels]
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.fixture
def odd_images(tmp_path) -> dict[str, Path]:
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)[None, :].repeat(4, axis=0)
    paths = {name: tmp_path / name for name in ("grey16.png", "rgb16.png", "palette.png", "cmyk.jpg", "rotated.jpg")}
    paths["grey16.png"].write_bytes(_png16(ramp))
    paths["rgb16.png"].write_bytes(_png16(np.stack([ramp, ramp[:, ::-1], np.full_like(ramp, 30000)], axis=-1)))
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # 0: black (transparent), 1: red
    palette.paste(1, (0, 0, 4, 8))
    palette.save(paths["palette.png"], transparency=0)
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(paths["cmyk.jpg"], quality=95)  # red
    sideways = Image.new("RGB", (40, 20), (0, 0, 255))
    sideways.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: show it rotated 90 degrees clockwise
    sideways.save(paths["rotated.jpg"], exif=exif, quality=95)
    return paths


def test_odd_images_are_decoded_as_a_viewer_shows_them(tmp_path, odd_images):
    rows = [{"image": name, "caption": name} for name in odd_images]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    ds = load_manifest(tmp_path / "m.jsonl", languages=["en"])
    img = {ds.samples[i].captions["en"]: np.asarray(ds[i]["image"]).astype(int) for i in range(len(ds))}

    grey = img["grey16.png"][0, :, 0]  # 16-bit grey: 256 levels, not two
    assert grey[0] == 0 and grey[-1] == 255 and len(np.unique(grey)) == 256 and (np.diff(grey) >= 0).all()
    rgb = img["rgb16.png"][0]
    assert (rgb[:, 0] == np.arange(256)).all() and (rgb[:, 1] == np.arange(256)[::-1]).all()
    assert abs(rgb[0, 2] - round(30000 / 257)) <= 1
    palette = img["palette.png"]
    assert (palette[:, :4] == [255, 0, 0]).all() and (palette[:, 4:] == [255, 255, 255]).all()  # transparent: white
    assert (np.abs(img["cmyk.jpg"] - [255, 0, 0]) <= 8).all()
    rotated = img["rotated.jpg"]
    assert rotated.shape[:2] == (40, 20)  # upright: 20 wide, 40 high
    assert (np.abs(rotated[:16] - [255, 0, 0]) <= 40).all() and (np.abs(rotated[24:] - [0, 0, 255]) <= 40).all()


# =============================================================================== errors that name what is wrong
def test_a_manifest_row_that_is_not_utf8_is_named_and_skipped(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    good = json.dumps({"image": "red.png", "caption": "a red square"}).encode()
    bad = b'{"image": "red.png", "caption": "caf\xe9"}'  # Latin-1, not UTF-8
    (tmp_path / "m.jsonl").write_bytes(b"\n".join([good, bad, good.replace(b"square", b"box")]))
    with pytest.raises(DataError, match=r"m\.jsonl row 2: not UTF-8 text \(byte 0xe9 at byte 37 of the line\)"):
        load_manifest(tmp_path / "m.jsonl")
    ds = load_manifest(tmp_path / "m.jsonl", skip_bad=True)
    assert len(ds) == 2 and ds.skipped == 1 and "m.jsonl row 2: not UTF-8" in ds.summary()

    (tmp_path / "m.csv").write_bytes(b"image,caption\nred.png,a red square\nred.png,caf\xe9\n")
    with pytest.raises(DataError, match=r"m\.csv row 3: not UTF-8 text \(byte 0xe9 at character 4 of column "):
        load_manifest(tmp_path / "m.csv")
    assert len(load_manifest(tmp_path / "m.csv", skip_bad=True)) == 1


def test_a_jsonl_manifest_with_a_byte_order_mark_is_read(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    rows = [{"image": "red.png", "caption": "a red square", "id": i} for i in range(2)]
    (tmp_path / "m.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in rows).encode())
    assert len(load_manifest(tmp_path / "m.jsonl")) == 2


def test_skip_bad_names_the_first_bad_row_and_prints_once(tmp_path, tokenizer, capsys):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    rows = [{"image": "red.png", "caption": f"a red square {i}", "id": i} for i in range(10)]
    rows[1] = {"image": "missing.png", "caption": "gone"}  # row 2: found when the image is opened
    rows[2] = {"image": "red.png", "caption": " "}  # row 3: found while reading rows
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    cfg = load_recipe(
        write_recipe(tmp_path / "r.yaml", tmp_path / "run", steps=1),
        {"data.train": str(tmp_path / "m.jsonl"), "data.skip_bad": True, "data.limit_train": None},
    )
    fit_recipe(cfg, student=build_student("test-clip", tokenizer))
    out = capsys.readouterr().out
    assert out.count("skipped 2 bad samples of 10") == 1
    assert f"(first: {tmp_path / 'm.jsonl'} row 2: image" in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: x\nstages:\n  - steps: 3\n   losses: [clip\n", r"r\.yaml: invalid YAML at line 4, column 4: expected"),
        ("name: [x\n", r"r\.yaml: invalid YAML at line 2, column 1: "),
        ("name: x\x00\n", r"r\.yaml: not YAML text: character #x0000 at byte 7"),
    ],
)
def test_an_invalid_recipe_is_one_line_naming_file_line_and_column(tmp_path, capsys, text, expected):
    import re

    (tmp_path / "r.yaml").write_text(text, encoding="utf-8")
    assert main(["fit", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(expected, err), err


def test_invalid_override_binary_recipe_and_wrong_extension(tmp_path, capsys):
    assert main(["fit", "dcclip", "--train.lr", "[1,"]) == 2
    assert "override --train.lr '[1,': invalid YAML at line 1, column 4" in capsys.readouterr().err
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)) * 4)
    assert main(["fit", str(tmp_path / "bin.yaml")]) == 2
    assert f"{tmp_path / 'bin.yaml'}: not YAML text: byte 0x80 at offset 128 is not UTF-8" in capsys.readouterr().err
    (tmp_path / "recipe.txt").write_text("name: x\n")
    assert main(["fit", str(tmp_path / "recipe.txt")]) == 2
    err = capsys.readouterr().err
    assert f"recipe '{tmp_path / 'recipe.txt'}': expected a YAML file ending in .yaml or .yml" in err
    assert "got a '.txt' file" in err


def test_model_loading_errors_name_the_file_or_the_id(tmp_path, teacher_dir, monkeypatch):
    truncated = tmp_path / "truncated"
    shutil.copytree(teacher_dir, truncated)
    weights = truncated / "model.safetensors"
    cut = weights.read_bytes()[:-1000]  # a copy cut short
    weights.write_bytes(cut)
    with pytest.raises(ModelLoadError, match=rf"{weights} is damaged \({len(cut)} bytes; .*file not fully covered"):
        load_teacher(truncated)
    (tmp_path / "empty").mkdir()
    shutil.copy(teacher_dir / "config.json", tmp_path / "empty")
    with pytest.raises(ModelLoadError, match=r"empty: no weights file \(model\.safetensors\) in this model directory"):
        load_teacher(tmp_path / "empty")
    monkeypatch.chdir(tmp_path)
    for missing in ("runs/teacher/model", "./teacher", "../teacher", "teacher/"):
        with pytest.raises(FileNotFoundError, match=r"does not exist \(a path is never a hub id\)"):
            load_teacher(missing)
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"'someorg/somemodel' is not a local directory.*offline"):
        load_teacher("someorg/somemodel")


def test_a_full_disk_names_the_file(tmp_path, monkeypatch, capsys):
    """ENOSPC while a checkpoint's weights are written: the error says so and names the file; the previous
    checkpoint stays whole (before: ``RuntimeError: ... unexpected pos``, or nothing at all)."""
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run")
    real_write = os.write

    def write(fd, data):
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if ".tmp-stage0-step4" in target and "module.safetensors" in target:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    assert main(["fit", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' progress bars
    target = tmp_path / "run" / "checkpoints" / ".tmp-stage0-step4" / "module.safetensors"
    assert err == f"vldistill fit: error: no space left on device while writing {target}"
    latest = tmp_path / "run" / "checkpoints" / "stage0-step2"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "stage0-step2"
    assert sorted(p.name for p in latest.iterdir()) == ["module.safetensors", "optim.pt", "state.json"]
    assert isinstance(DiskFullError(target), OSError) and DiskFullError(target).errno == errno.ENOSPC


# ================================================================================== permissions and a path policy
def test_every_file_vldistill_writes_follows_the_umask(tmp_path, teacher, train_data, tokenizer):
    old = os.umask(0o002)  # group-writable: 0664 files
    try:
        cfg = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "run", steps=2))
        fit_recipe(cfg, student=build_student("test-clip", tokenizer), train_data=train_data)
        options = CacheConfig(workers=0, batch_size=8, shard_rows=16)
        build_cache(tmp_path / "cache", [teacher], train_data.dataset, [["en"]], options=options, progress=False)
        teacher.save_pretrained(tmp_path / "exported")
    finally:
        os.umask(old)
    modes = {
        str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777)
        for p in tmp_path.rglob("*")
        if p.is_file() and p.name != "r.yaml"
    }
    assert any(name.endswith(".safetensors") for name in modes)
    assert {name: mode for name, mode in modes.items() if mode != oct(0o664)} == {}


def test_image_root_only_refuses_paths_outside_the_image_root(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for path in (root / "in.png", tmp_path / "outside.png"):
        Image.new("RGB", (8, 8), "red").save(path)
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    rows = ["in.png", "../outside.png", str(tmp_path / "outside.png"), "link.png"]
    manifest = root / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": r, "caption": f"image {i}"}) for i, r in enumerate(rows)))
    assert len(load_manifest(manifest)) == 4  # the default keeps manifests that name images anywhere
    with pytest.raises(
        DataError,
        match=r"m\.jsonl row 2: image '\.\./outside\.png' resolves to .*outside\.png, "
        r"outside the image root .*data \(data\.image_root_only: true",
    ):
        load_manifest(manifest, image_root_only=True)
    kept = load_manifest(manifest, image_root_only=True, skip_bad=True)
    assert len(kept) == 1 and kept.skipped == 3
    cfg = DataConfig(train=str(manifest), eval=None, languages=["en"], image_root_only=True)
    with pytest.raises(DataError, match="outside the image root"):
        load_train_data(cfg)
    with pytest.raises(ConfigError, match="image_root_only = 'yes': expected true or false"):
        load_recipe(raw={"data": {"image_root_only": "yes"}})


def test_a_damaged_or_missing_student_of_any_kind_is_named(tmp_path):
    """Seq2seq and cross-modal students (saved directories, or checkpoints given by path) name the damaged file."""
    from vldistill.models import ModelLoadError
    from vldistill.students import build_student, load_student
    from vldistill.tokenization import train_wordpiece

    tok = train_wordpiece(["a red circle", "what colour is it?"] * 4, 80)
    vilt = build_student("test-vilt", tok, task="entailment")
    vilt.save_pretrained(tmp_path / "vilt")
    weights = next((tmp_path / "vilt").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(ModelLoadError, match=re.escape(str(weights))):
        load_student(tmp_path / "vilt")
    with pytest.raises(ModelLoadError, match=re.escape(str(weights))):
        build_student("vilt", tok, name_or_path=str(tmp_path / "vilt"), task="entailment")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_student(tmp_path / "nowhere")
    bart = build_student("test-bart", tok, teacher_width=16, teacher_image_width=16)
    bart.save_pretrained(tmp_path / "bart")
    lm_weights = next((tmp_path / "bart" / "lm").glob("*.safetensors"))
    lm_weights.write_bytes(b"\0" * 64)  # overwritten
    with pytest.raises(ModelLoadError, match=re.escape(str(lm_weights))):
        load_student(tmp_path / "bart")
