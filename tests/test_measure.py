"""Measurement primitives read what they should."""

import time

import pytest
import torch

from attnbench import registry
from attnbench.measure import MIN_RUNS, Timing, cpu_peak_supported, peak_memory, time_call

needs_proc = pytest.mark.skipif(not cpu_peak_supported(), reason="no /proc/self/clear_refs")


@needs_proc
@pytest.mark.parametrize("mib", [64, 256])
def test_known_allocation_is_read_within_5_percent(mib):
    n = mib * 2**20 // 4
    got = peak_memory(lambda: torch.ones(n))
    assert abs(got - n * 4) <= 0.05 * n * 4, f"read {got / 2**20:.1f} MiB for a {mib} MiB tensor"


@needs_proc
def test_naive_attention_at_64x64_reads_its_score_matrix():
    q = torch.randn(1, 1, 64 * 64, 16)
    naive = registry.create("full.naive")
    with torch.no_grad():
        got = peak_memory(lambda: naive(q, q, q))
    n2_floats = 4096 * 4096 * 4
    assert got >= n2_floats, f"read {got / 2**20:.1f} MiB, below one n² fp32 matrix (64 MiB)"


def test_time_call_reports_median_spread_and_first_call():
    calls = []
    t = time_call(lambda: calls.append(torch.ones(1000).sum()), min_run_time=0.05)
    assert t.runs >= 1 and t.median_ms > 0 and t.iqr_ms >= 0 and t.first_ms > 0
    assert len(calls) > t.runs, "the first call is made apart from the timed runs"
    assert Timing(10.0, 1.5, 20.0, 5).noisy and not Timing(10.0, 0.5, 20.0, 5).noisy


def test_slow_calls_are_timed_often_enough_for_a_spread():
    # One 30 ms call fills a 10 ms min_run_time: blocked_autorange alone gives one run, IQR 0.
    t = time_call(lambda: time.sleep(0.03), min_run_time=0.01)
    assert t.runs >= MIN_RUNS and not t.too_few_runs and t.warnings("time_fwd") == []
    # A time limit on the timed runs stops the extra runs; the warning names the count.
    t = time_call(lambda: time.sleep(0.03), min_run_time=0.01, max_run_time=0.02)
    assert t.runs == 1 and t.iqr_ms == 0
    assert t.warnings("time_fwd") == [
        "time_fwd: only 1 timed run, too few for a spread (IQR 0 ms; 3 wanted, a time limit "
        "stopped them)"
    ]


def test_a_zero_spread_from_two_runs_is_a_warning():
    (warning,) = Timing(10.0, 0.0, 20.0, 2).warnings("time_fwdbwd")
    assert warning.startswith("time_fwdbwd: only 2 timed runs, too few for a spread (IQR 0 ms")
    assert Timing(10.0, 0.5, 20.0, 3).warnings("time_fwd") == []
    assert Timing(10.0, 1.5, 20.0, 3).warnings("time_fwd") == ["time_fwd: IQR 15% of the median"]
