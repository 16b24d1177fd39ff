"""Peak resident memory of the current process, measured honestly: ``VmHWM`` from ``/proc/self/status``.

Why not ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: on Linux a child started with ``subprocess`` (fork, then
exec) inherits its parent's high-water mark, so a one-line child of a parent holding 800 MB reports about 800 MB
(``ru_maxrss``), while its own ``VmHWM`` says about 13 MB. ``VmHWM`` is reset at exec, so it is the child's own
peak. Imports nothing heavy (no torch), so a probe child measures itself, not its imports.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def vm_hwm_mb(status: str | Path = "/proc/self/status") -> float:
    """Peak resident set size (``VmHWM``) of this process in MB (MiB), from ``/proc/self/status``.

    Raises:
        RuntimeError: the file has no ``VmHWM`` line (not Linux): there is no honest measure to fall back on.
    """
    try:
        text = Path(status).read_text()
    except OSError as err:
        raise RuntimeError(f"{status}: cannot read the peak resident memory (VmHWM; Linux only): {err}") from err
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise RuntimeError(f"{status}: VmHWM in {unit!r}, expected kB")
            return int(value) / 1024
    raise RuntimeError(f"{status}: no VmHWM line (Linux only): cannot measure the peak resident memory")


def ru_maxrss_mb() -> float:
    """``ru_maxrss`` of this process in MB: inherited from the parent across exec (see the module docstring); kept
    only to show the difference, never reported as a measure."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report_peak(**extra) -> None:
    """Print one JSON line with ``peak_rss_mb`` (VmHWM) and ``ru_maxrss_mb`` (for comparison), for a parent to read
    with :func:`run_measured`."""
    print(json.dumps({"peak_rss_mb": vm_hwm_mb(), "ru_maxrss_mb": ru_maxrss_mb(), **extra}), flush=True)


def run_measured(cmd: Sequence[str], **kwargs) -> dict:
    """Run ``cmd`` (a child that ends with :func:`report_peak`) and return the JSON of its last output line."""
    out = subprocess.run(list(cmd), check=True, capture_output=True, text=True, **kwargs)
    lines = [line for line in out.stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{cmd[:3]}...: printed no peak-memory JSON line; stderr: {out.stderr[-2000:]}")
    return json.loads(lines[-1])


if __name__ == "__main__":  # the probe: a child that allocates nothing
    report_peak()
    sys.exit(0)
