"""``vldistill cache`` on several processes (``torchrun``): two CPU processes with the gloo backend build one cache.

Each process computes a disjoint set of shards; process 0 writes the manifest once, when every shard is whole. The
columns are byte-identical to a one-process build, and a two-process build killed part-way resumes (recomputing
only the shards no process finished) and finishes identical."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import save_tiny_teacher
from vldistill.cache import CachedTeachers, CacheError, read_manifest
from vldistill.cli import main
from vldistill.data.sources import load_data

pytestmark = pytest.mark.usefixtures("one_thread")
ROWS, SHARD = 48, 8  # 6 shards: 3 per process
FAULT = Path(__file__).resolve().parent / "fault_child.py"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "model", seed=5, limit=64)


def cache_args(teacher: Path, out: Path) -> list[str]:
    return [
        "cache", "--teacher", str(teacher), "--data", "bundled:easyvqa", "--languages", "en", "--limit", str(ROWS),
        "--shard-rows", str(SHARD), "--batch-size", "4", "--workers", "0", "--output", str(out),
    ]  # fmt: skip


def launch(args: list[str], fault: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(FAULT), json.dumps(fault), "--", *args] if fault else ["-m", "vldistill.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def assert_same_cache(a: Path, b: Path) -> None:
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma["complete"] and mb["complete"]
    listed = [[{k: v for k, v in e.items() if k != "mtime_ns"} for e in m["shards"]] for m in (ma, mb)]
    assert listed[0] == listed[1]  # the same files, sizes and SHA-256s, in order (written at other times)
    for shard in ma["shards"]:
        ta, tb = load_file(a / shard["file"]), load_file(b / shard["file"])
        assert ta.keys() == tb.keys()
        for name in ta:
            assert torch.equal(ta[name], tb[name]), (shard["file"], name)
        assert (a / shard["file"]).read_bytes() == (b / shard["file"]).read_bytes()
    assert not list(b.glob("shard-*.json")) and not list(b.glob(".*.tmp"))  # records and temporaries gone


@pytest.fixture(scope="module")
def one_process(teacher_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "cache"
    torch.set_num_threads(1)
    assert main(cache_args(teacher_dir, out)) == 0
    return out


def test_two_processes_build_the_cache_one_process_builds(one_process, teacher_dir, tmp_path):
    out = tmp_path / "two"
    run = launch(cache_args(teacher_dir, out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_cache(one_process, out)
    printed = [line for line in run.stdout.splitlines() if line == "{"]
    assert len(printed) == 1, "the summary is printed once, by process 0"
    summary = json.loads(run.stdout[run.stdout.index("{") :])
    assert summary["built_rows"] == ROWS and summary["shards"] == ROWS // SHARD

    again = launch(cache_args(teacher_dir, out))  # complete: reused, nothing recomputed
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout[again.stdout.index("{") :])["built_rows"] == 0


def test_a_two_process_build_killed_part_way_resumes_and_finishes_identical(one_process, teacher_dir, tmp_path):
    out = tmp_path / "killed"
    kill = {"kill": {"target": "vldistill.cache.writer:_write_shard", "call": 2, "when": "after"}}
    run = launch(cache_args(teacher_dir, out), fault=kill)
    assert run.returncode != 0
    manifest = read_manifest(out)
    assert not manifest["complete"] and manifest["shards"] == []  # the manifest is written once, at the end
    data = load_data("bundled:easyvqa", "train", ["en"], limit=ROWS).dataset
    with pytest.raises(CacheError, match="incomplete"):  # never used until the manifest says complete
        CachedTeachers(out, data, manifest["teachers"], [["en"]])
    resume_only_the_rest(out, cache_args(teacher_dir, out), one_process)


def resume_only_the_rest(out: Path, args: list[str], reference: Path) -> None:
    """A killed two-process run left 2 or more shards recorded: running again on two processes computes only the
    other shards, leaves the recorded files alone, and gives the same cache as ``reference``."""
    finished = sorted(out.glob("shard-*.json"))
    assert 2 <= len(finished) < ROWS // SHARD, [p.name for p in out.iterdir()]
    kept = {p.stem: (out / f"{p.stem}.safetensors").stat().st_mtime_ns for p in finished}
    run = launch(args)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout[run.stdout.index("{") :])
    assert summary["built_rows"] == ROWS - SHARD * len(finished)  # only the shards no process recorded
    assert all((out / f"{stem}.safetensors").stat().st_mtime_ns == t for stem, t in kept.items())
    assert_same_cache(reference, out)


def test_one_process_finishes_a_killed_two_process_build(one_process, teacher_dir, tmp_path):
    out = tmp_path / "killed"
    kill = {"kill": {"target": "vldistill.cache.writer:_write_shard", "call": 1, "when": "after"}}
    assert launch(cache_args(teacher_dir, out), fault=kill).returncode != 0
    finished = len(list(out.glob("shard-*.json")))
    assert finished >= 1
    torch.set_num_threads(1)
    assert main(cache_args(teacher_dir, out)) == 0
    assert_same_cache(one_process, out)


def test_two_processes_build_a_cache_of_tar_shards_and_share_the_shard_hashing(teacher_dir, tmp_path):
    from test_webdataset import write_shards

    spec = write_shards(tmp_path / "wds", shards=4, per_shard=6)
    args = ["cache", "--teacher", str(teacher_dir), "--data", spec, "--languages", "en", "--shard-rows", "6"]
    args += ["--batch-size", "4", "--workers", "0"]
    torch.set_num_threads(1)
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    spy = {
        "record": {"target": "vldistill.data.webdataset:shard_fingerprint", "file": str(tmp_path / "hashed"), "arg": 0}
    }
    run = launch([*args, "--output", str(tmp_path / "two")], fault=spy)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_cache(tmp_path / "one", tmp_path / "two")
    one, two = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    assert two["source_shards"] == one["source_shards"]
    hashed = [json.loads(line) for line in (tmp_path / "hashed").read_text().splitlines()]
    shares = {h["rank"]: [Path(p).name for p in h["arg"]] for h in hashed}
    assert len(hashed) == 2 and shares == {0: ["000.tar", "001.tar"], 1: ["002.tar", "003.tar"]}  # a share each
    assert [s["rows"] for s in two["source_shards"]] == [6, 6, 6, 6]


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("second") / "model"
    return save_tiny_teacher(path, seed=9, limit=64, vocab_size=250, projection_dim=16, **{"vision.hidden_size": 32})


def add_args(teacher: Path, second: Path, out: Path) -> list[str]:
    return [*cache_args(teacher, out), "--teacher", str(second)]  # the cached teacher and a new one


def test_two_processes_add_a_teacher_as_one_process_does(one_process, teacher_dir, second_teacher, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(one_process, one)
    shutil.copytree(one_process, two)
    torch.set_num_threads(1)
    assert main(add_args(teacher_dir, second_teacher, one)) == 0
    run = launch(add_args(teacher_dir, second_teacher, two))
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout[run.stdout.index("{") :])
    assert summary["built_rows"] == ROWS and len(summary["teachers"]) == 2
    assert_same_cache(one, two)
    assert {k for k in load_file(two / "shard-00005.safetensors") if k.startswith("t1.")}  # the new columns


def test_a_killed_two_process_addition_resumes_and_finishes_identical(
    one_process, teacher_dir, second_teacher, tmp_path
):
    one, killed = tmp_path / "one", tmp_path / "killed"
    shutil.copytree(one_process, one)
    shutil.copytree(one_process, killed)
    torch.set_num_threads(1)
    assert main(add_args(teacher_dir, second_teacher, one)) == 0
    kill = {"kill": {"target": "vldistill.cache.writer:_add_columns", "call": 2, "when": "after"}}
    assert launch(add_args(teacher_dir, second_teacher, killed), fault=kill).returncode != 0
    manifest = read_manifest(killed)
    assert "extending" in manifest and not manifest["complete"]  # never used half-extended
    resume_only_the_rest(killed, add_args(teacher_dir, second_teacher, killed), one)


def test_accelerate_launch_builds_the_same_cache(one_process, teacher_dir, tmp_path):
    out = tmp_path / "accelerate"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vldistill.cli", *cache_args(teacher_dir, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_cache(one_process, out)
