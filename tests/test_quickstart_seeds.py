"""benchmarks/quickstart_seeds.py: the statistics over seeds, computed by hand on made-up runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quickstart_seeds as qss


def run(teacher: float, student: tuple[float, float], baseline: tuple[float, float]) -> dict:
    def entry(en, zh=None):
        zs = {"en": {"top1": en}} | ({"zh": {"top1": zh}} if zh is not None else {})
        return {"zeroshot": zs}

    return {"teacher": entry(teacher), "student": entry(*student), "baseline": entry(*baseline), "wall_seconds": 1.0}


def test_summary_over_seeds_by_hand():
    runs = {0: run(0.94, (0.90, 0.88), (0.70, 0.69)), 1: run(0.92, (0.86, 0.84), (0.80, 0.78))}
    s = qss.summarise(runs)
    assert s["teacher"]["top1_en"] == {"mean": 0.93, "std": pytest.approx(0.0141, abs=1e-4), "min": 0.92, "max": 0.94}
    assert s["student"]["top1_zh"]["mean"] == pytest.approx(0.86)
    # gains: 20 and 6 points -> mean 13, std sqrt(((20-13)^2 + (6-13)^2) / 1) = 9.8995, min 6
    assert s["gain_en_points"] == {"mean": 13.0, "std": pytest.approx(9.8995, abs=1e-4), "min": 6.0}
    assert s["student_en_over_teacher_en"] == pytest.approx(0.88 / 0.93, abs=1e-4)
    t = qss.targets(s)
    assert t["gain_mean_points"]["met"] and t["gain_min_points"]["met"]
    assert t["student_en_over_teacher_en"]["met"] and t["teacher_en_min"]["met"]  # 0.946 >= 0.90; 0.92 >= 0.90
    assert s["per_seed"]["1"]["baseline"] == {"en": 0.80, "zh": 0.78}
    assert "gain (student - baseline, EN points): +13.0" in qss.table(s | {"targets": t}, [0, 1])
