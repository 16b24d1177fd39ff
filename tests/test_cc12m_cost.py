"""``benchmarks/cc12m_cost.py``: the CC12M cache-build estimate scales a measured build rate by counted FLOPs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from vldistill.students import build_student
from vldistill.tokenization import train_wordpiece

COST = Path(__file__).resolve().parents[1] / "benchmarks" / "cc12m_cost.py"


def test_the_estimate_scales_the_measured_rate_by_flops(tmp_path):
    torch.manual_seed(0)
    tok = train_wordpiece(["a red circle", "a blue square"], vocab_size=60)
    teacher = tmp_path / "teacher" / "model"
    build_student("test-clip", tok).save_pretrained(teacher)
    measured = tmp_path / "throughput.json"
    measured.write_text(json.dumps({"B": 100.0, "setup": {"teacher": str(teacher)}}))
    out = tmp_path / "cost.json"
    cmd = [sys.executable, str(COST), "--throughput", str(measured), "--out", str(out), "--teachers", "ViT-B/32"]
    cmd += ["--pairs", "1000000"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    reference, b32 = result["rows"]
    assert b32["teacher"] == "ViT-B/32" and 14 < b32["gflop_per_pair"] < 15.5  # image 224/32 + text at 77 positions
    rate = 100.0 * reference["flop_per_pair"]  # the measured 100 pairs/s of the reference teacher, in FLOP/s
    expected_days = 1e6 * b32["flop_per_pair"] / rate / 86400
    assert abs(b32["this_machine_days"] - expected_days) < 1e-6 * expected_days
    assert b32["8x H100 SXM minutes"] < b32["8x A100 minutes"] and result["decode_core_hours"] > 0
    assert "ViT-B/32" in done.stdout
