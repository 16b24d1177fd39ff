"""Independent trainings side by side (vldistill.train.side_by_side) and the quickstart's use of them."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from vldistill.config import load_recipe
from vldistill.train import quickstart as qs
from vldistill.train.side_by_side import SideBySideError, run_side_by_side, side_by_side_threads


def _train(seed: int) -> list[float]:
    """A small seeded training whose result depends on every floating-point operation."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(256, 32), torch.randint(0, 4, (256,))
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [float(v) for v in torch.cat([p.detach().flatten() for p in model.parameters()])[:50]]


def test_threads_are_shared_and_side_by_side_only_where_it_helps():
    assert side_by_side_threads(3, total=2) == 1  # three jobs on two threads: one each
    assert side_by_side_threads(2, total=16) == 8
    assert side_by_side_threads(1, total=16) == 0  # one job: nothing to run beside it
    assert side_by_side_threads(3, total=1) == 0  # one thread: one after the other


def test_each_job_runs_in_its_own_process_on_its_share_and_gives_what_it_gives_alone(tmp_path, capfd):
    def job(seed):
        def run():
            print(f"job {seed} says hello")
            return {"pid": os.getpid(), "threads": torch.get_num_threads(), "weights": _train(seed)}

        return run

    got = run_side_by_side({"a": job(0), "b": job(1)}, tmp_path / "logs", threads=1)
    assert len({got["a"]["pid"], got["b"]["pid"], os.getpid()}) == 3
    assert got["a"]["threads"] == got["b"]["threads"] == 1
    # its output went to its log, not to the terminal
    assert "job 0 says hello" in (tmp_path / "logs" / "a.log").read_text()
    assert "says hello" not in capfd.readouterr().out
    # the same numbers as the same training alone, on one thread, in this process
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert got["a"]["weights"] == _train(0) and got["b"]["weights"] == _train(1)
    finally:
        torch.set_num_threads(before)
    assert not list((tmp_path / "logs").glob("*.result.json"))  # handed over, then removed


def test_a_failed_job_names_itself_its_error_and_its_log_and_stops_the_others(tmp_path):
    def fails():
        time.sleep(0.2)
        raise ValueError("row 17: an empty caption")

    def slow():
        time.sleep(60)
        return 1

    t0 = time.monotonic()
    with pytest.raises(SideBySideError) as err:
        run_side_by_side({"slow": slow, "broken": fails}, tmp_path / "logs", threads=1, poll_seconds=0.1)
    assert time.monotonic() - t0 < 30  # the slow job was stopped, not waited for
    message = str(err.value)
    assert "broken failed" in message and "row 17: an empty caption" in message
    assert str(tmp_path / "logs" / "broken.log") in message
    assert "Traceback" in (tmp_path / "logs" / "broken.log").read_text()


def test_poll_is_called_while_the_jobs_run(tmp_path):
    calls = []
    got = run_side_by_side(
        {"a": lambda: time.sleep(1.0) or "done", "b": lambda: 2},
        tmp_path,
        threads=1,
        poll=lambda: calls.append(1),
        poll_seconds=0.1,
    )
    assert got == {"a": "done", "b": 2}
    assert len(calls) >= 3


def test_without_threads_to_share_the_jobs_run_here_one_after_the_other(tmp_path, capsys):
    got = run_side_by_side({"a": lambda: print("here") or os.getpid()}, tmp_path / "logs", threads=0)
    assert got == {"a": os.getpid()}
    assert "here" in capsys.readouterr().out
    assert not (tmp_path / "logs").exists()


def test_quickstart_one_after_the_other_each_job_starts_from_the_initial_student():
    student = torch.nn.Linear(3, 2)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    seen = []

    def train():
        seen.append({k: v.clone() for k, v in student.state_dict().items()})
        with torch.no_grad():
            student.weight.add_(1.0)  # what a training does to the shared object
        return None

    first, second = qs._fresh(train, student), qs._fresh(train, student)
    first()
    second()
    for state in seen:
        assert all(torch.equal(state[k], initial[k]) for k in initial)


def test_quickstart_progress_counts_steps_over_stages(tmp_path):
    cfg = load_recipe("dcclip", {"train.output_dir": str(tmp_path / "distill")})
    other = load_recipe("dcclip", {"train.output_dir": str(tmp_path / "not-started")})
    (tmp_path / "distill").mkdir()
    rows = [{"stage": "distill", "stage_index": 0, "step": 350}, {"stage": "align", "stage_index": 1, "step": 20}]
    (tmp_path / "distill" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    total = cfg.total_steps
    assert qs._progress({"student": cfg, "baseline": other}) == (
        f"training: student {cfg.stages[0].steps + 20}/{total}, baseline 0/{total}"
    )
