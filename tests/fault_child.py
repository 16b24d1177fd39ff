"""A ``vldistill`` command run in a child process with a fault injected: what ``tests/test_faults.py`` kills.

Usage: ``python tests/fault_child.py SPEC -- VLDISTILL_ARGS...`` where ``SPEC`` is JSON with one of:

- ``{"kill": {"target": "MODULE:QUALNAME", "call": N, "when": "before" | "after"}}``: the process kills itself
  with SIGKILL (no cleanup, no ``finally``, as ``kill -9`` would) before or after the N-th call of the function.
- ``{"pause": {...the same..., "marker": PATH}}``: instead of dying it writes its pid to ``marker`` and sleeps
  until the test kills it.
- ``{"kill_while_pruning": true}``: SIGKILL while an old checkpoint folder is being deleted, after its
  ``state.json`` is gone and before the rest is.
- ``{"record": {"target": "MODULE:QUALNAME", "file": PATH, "arg": N}}``: no fault; every call appends a JSON line
  ``{"rank": RANK, "arg": ...}`` to ``PATH`` with the call's positional argument ``N`` (default 1: the first after
  ``self``) as a list (what a process read, say; paths as strings).

Not a test module (pytest collects ``test_*.py`` only).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _patch(target: str, call: int, when: str, action) -> None:
    module_name, qualname = target.split(":")
    owner = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    real = getattr(owner, name)
    count = 0

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        nonlocal count
        count += 1
        if count == call and when == "before":
            action()
        out = real(*args, **kwargs)
        if count == call and when == "after":
            action()
        return out

    setattr(owner, name, wrapper)


def _pause(marker: str):
    def action() -> None:
        Path(marker).write_text(str(os.getpid()))
        while True:
            time.sleep(1)

    return action


def _record(target: str, file: str, arg: int = 1) -> None:
    module_name, qualname = target.split(":")
    owner = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    real = getattr(owner, name)

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        with open(file, "a") as f:
            line = {"rank": int(os.environ.get("RANK", "0")), "arg": list(args[arg])}
            f.write(json.dumps(line, default=str) + "\n")
        return real(*args, **kwargs)

    setattr(owner, name, wrapper)


def _kill_while_pruning() -> None:
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.is_dir() and path.parent.name == "checkpoints" and path.name.startswith(("stage", ".del-stage")):
            (path / "state.json").unlink(missing_ok=True)
            _die()
        return real(path, *args, **kwargs)

    shutil.rmtree = rmtree


def main() -> int:
    spec = json.loads(sys.argv[1])
    args = sys.argv[sys.argv.index("--") + 1 :]
    if "kill" in spec:
        _patch(**spec["kill"], action=_die)
    if "pause" in spec:
        pause = dict(spec["pause"])
        _patch(**{k: v for k, v in pause.items() if k != "marker"}, action=_pause(pause["marker"]))
    if "record" in spec:
        _record(**spec["record"])
    if spec.get("kill_while_pruning"):
        _kill_while_pruning()
    from vldistill.cli import main as cli

    return cli(args)


if __name__ == "__main__":
    sys.exit(main())
