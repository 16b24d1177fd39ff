"""Independent CPU trainings side by side: each in a forked process, on its share of the CPU threads.

A tiny model cannot keep several cores busy: on the 2-core development machine the quickstart's 0.5M-parameter
student trained 120 steps in 23.3 s on two threads and in 30.8 s on one, so three such trainings took 70 s one after
the other on both threads and 54 s side by side, one thread each (2026-11-30). :func:`run_side_by_side` runs
independent jobs that way. Each job runs in a child process forked from the caller (it sees the caller's objects as
they were at the fork, so a model, data or config needs no pickling), writes its output to a log file instead of the
terminal, and hands back a JSON-able result. A failed job stops the others and raises with its error and its log.

Jobs run one after the other in this process instead where side by side cannot help or cannot work: one job, fewer
than two threads to share, no ``fork`` (Windows), or a CUDA device in use (CUDA does not survive a fork).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["SideBySideError", "run_side_by_side", "side_by_side_threads"]


class SideBySideError(RuntimeError):
    """A job run side by side failed; the message has its error and the path of its log."""


def side_by_side_threads(n_jobs: int, total: int | None = None) -> int:
    """Threads per job when ``n_jobs`` share ``total`` threads (default: torch's own count, which follows
    ``OMP_NUM_THREADS``); 0 when the jobs should rather run one after the other on all of them."""
    total = torch.get_num_threads() if total is None else total
    if n_jobs < 2 or total < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return 0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return 0
    return max(1, total // n_jobs)  # 3 jobs on 2 threads: one each (3 threads on 2 cores measured fastest)


def run_side_by_side(
    jobs: Mapping[str, Callable[[], Any]],
    log_dir: str | os.PathLike,
    threads: int | None = None,
    poll: Callable[[], None] | None = None,
    poll_seconds: float = 20.0,
) -> dict[str, Any]:
    """Run each job (a callable without arguments returning something JSON-able) and return ``{name: result}``.

    ``threads``: torch threads per job (default :func:`side_by_side_threads`; 0 runs the jobs one after the other in
    this process, printing as usual: the jobs then share this process's objects, so a job that changes one the next
    job reads must start from its own copy). Side by side, job ``NAME`` writes its output to ``log_dir/NAME.log`` and
    ``poll`` (for example a progress line) is called every ``poll_seconds`` while any job runs.
    """
    threads = side_by_side_threads(len(jobs)) if threads is None else threads
    if threads == 0:
        return {name: job() for name, job in jobs.items()}
    logs = Path(log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    for name in jobs:
        (logs / f"{name}.result.json").unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()  # what is buffered now would otherwise be written again by every child
    ctx = multiprocessing.get_context("fork")
    procs = {
        name: ctx.Process(target=_child, args=(job, threads, logs / f"{name}.log", logs / f"{name}.result.json"))
        for name, job in jobs.items()
    }
    try:
        for proc in procs.values():
            proc.start()
        while any(p.is_alive() for p in procs.values()):
            deadline = time.monotonic() + poll_seconds
            for name, proc in procs.items():
                proc.join(max(0.0, deadline - time.monotonic()))
                if proc.exitcode not in (None, 0):
                    raise SideBySideError(_failure(name, proc.exitcode, logs / f"{name}.log"))
            if poll is not None and any(p.is_alive() for p in procs.values()):
                poll()
    finally:  # an error, or Ctrl-C: no child outlives the call
        for proc in procs.values():
            if proc.is_alive():
                proc.terminate()
        for proc in procs.values():
            proc.join()
    results = {}
    for name, proc in procs.items():
        path = logs / f"{name}.result.json"
        if proc.exitcode != 0 or not path.is_file():
            raise SideBySideError(_failure(name, proc.exitcode, logs / f"{name}.log"))
        results[name] = json.loads(path.read_text())
        path.unlink()
    return results


def _child(job: Callable[[], Any], threads: int, log: Path, result: Path) -> None:
    """In the forked process: output to the log, ``threads`` torch threads, the job, its result written atomically."""
    out = open(log, "w", buffering=1, encoding="utf-8")  # noqa: SIM115 (open until the process ends)
    os.dup2(out.fileno(), 1)  # what C code and subprocesses write
    os.dup2(out.fileno(), 2)
    sys.stdout = sys.stderr = out  # what Python writes, wherever sys.stdout pointed (e.g. a test's capture)
    torch.set_num_threads(threads)
    try:
        value = job()
        tmp = result.with_name(f".tmp-{result.name}")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, result)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # not the caller's exit handlers: they belong to the parent
    sys.stdout.flush()
    sys.stderr.flush()


def _failure(name: str, code: int | None, log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    error = next((line for line in reversed(lines) if line.strip()), "no output")
    how = f"exit code {code}" if code is not None and code >= 0 else f"killed by signal {-(code or 0)}"
    return f"{name} failed ({how}): {error.strip()} (its whole output: {log})"
