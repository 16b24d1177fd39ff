"""The benchmarks' peak-memory measure (``benchmarks/memory.py``): a child's own peak, not its parent's.

On Linux ``ru_maxrss`` of a child started with ``subprocess`` carries over the parent's high-water mark across exec;
``VmHWM`` from ``/proc/self/status`` does not. The benchmarks report ``VmHWM``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from memory import run_measured, vm_hwm_mb  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="VmHWM is Linux only")


def test_a_child_allocating_nothing_reports_far_less_than_its_parent_holding_a_large_buffer():
    buffer = bytearray(600 << 20)
    buffer[::4096] = b"\1" * len(range(0, len(buffer), 4096))  # touch every page: resident, not just reserved
    parent = vm_hwm_mb()
    assert parent >= 600
    child = run_measured([sys.executable, str(BENCH / "memory.py")])
    assert child["peak_rss_mb"] < 100, child  # a bare interpreter: ~10-20 MB
    assert child["peak_rss_mb"] < parent / 5
    del buffer


def test_vm_hwm_reads_the_status_file_and_refuses_one_without_it(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t  999 kB\nVmHWM:\t   20480 kB\nVmRSS:\t  10240 kB\n")
    assert vm_hwm_mb(status) == 20.0
    status.write_text("Name:\tpython\n")
    with pytest.raises(RuntimeError, match="no VmHWM line"):
        vm_hwm_mb(status)
