"""``benchmarks/scale.py --smoke``: a synthetic webdataset, its cache built on one and two processes, and training
streamed from it in fresh processes whose peak memory (VmHWM) and cache-opening time are reported under the keys
the README's table reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCALE = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"
KEYS = ["build_1proc_sps", "build_2proc_sps", "train_from_cache_sps", "rss_20k_mb", "rss_200k_mb", "open_20k_s",
        "open_200k_s", "samples"]  # fmt: skip

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="VmHWM is Linux only")


def test_smoke_run_writes_every_key_and_streams_at_constant_memory(tmp_path):
    out = tmp_path / "scale.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(SCALE), "--smoke", "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(KEYS) <= result.keys() and result["samples"] == 2000 and result["small_samples"] == 200
    assert all(result[k] > 0 for k in KEYS)
    assert result["build_identical"] is True  # two processes built the same shards as one
    assert result["rss_200k_mb"] / result["rss_20k_mb"] < 1.2  # 10x the samples, the same memory
    assert "RSS ratio" in done.stdout and not (tmp_path / "work").exists()  # the table; shards and caches removed
