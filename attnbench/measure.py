"""Measurement primitives: time, peak memory and this machine's matmul rate.

- Time: ``torch.utils.benchmark.Timer.blocked_autorange`` on all intra-op threads (it
  synchronises CUDA), topped up with single calls to at least ``MIN_RUNS`` timed runs unless
  a time limit stops them; median and inter-quartile range, with the first call timed apart
  (compilation, autotuning, first-touch allocation).
- Memory on CPU: write ``5`` to ``/proc/self/clear_refs`` (resets the peak resident set to the
  current one), run, and read ``VmHWM`` minus the resident set before the run. Freed heap is
  first handed back to the system (``malloc_trim``) so that pages kept by the allocator from
  earlier runs do not hide new allocations. On CUDA: reset the peak statistics and read
  ``max_memory_allocated`` minus the allocation before the run (the GPA paper's method).
- Matmul rate: a dense 2048^3 matmul in float32 (or the size and dtype asked for), the
  denominator of ``peak_fraction``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.benchmark as benchmark

IQR_WARN_FRACTION = 0.10  # torch's Measurement warns at the same spread
MIN_RUNS = 3  # timed runs for a spread: the IQR of one run is 0, of two half their difference


@dataclass(frozen=True)
class Timing:
    """Milliseconds: median and inter-quartile range of the timed runs, and the first call."""

    median_ms: float
    iqr_ms: float
    first_ms: float
    runs: int

    @property
    def noisy(self) -> bool:
        """The spread is large: IQR above 10% of the median."""
        return self.iqr_ms > IQR_WARN_FRACTION * self.median_ms

    @property
    def too_few_runs(self) -> bool:
        """Fewer than ``MIN_RUNS`` timed runs: the IQR is no measure of the spread."""
        return self.runs < MIN_RUNS

    def warnings(self, what: str) -> list[str]:
        """A result row's warnings about this timing of ``what`` (``time_fwd``, ...)."""
        if self.too_few_runs:
            runs = f"{self.runs} timed run" + ("" if self.runs == 1 else "s")
            return [
                f"{what}: only {runs}, too few for a spread (IQR {self.iqr_ms:.3g} ms; "
                f"{MIN_RUNS} wanted, a time limit stopped them)"
            ]
        if self.noisy:
            return [f"{what}: IQR {self.iqr_ms / self.median_ms:.0%} of the median"]
        return []


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fn: Callable[[], object], device: str, number: int = 1) -> float:
    """Seconds per call of ``number`` calls of ``fn`` in a row (one block)."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(number):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / number


def time_call(
    fn: Callable[[], object],
    device: str = "cpu",
    min_run_time: float = 1.0,
    min_runs: int = MIN_RUNS,
    max_run_time: float | None = None,
) -> Timing:
    """Time ``fn()``: the first call alone, then ``blocked_autorange`` for ``min_run_time`` s.

    Where that gives fewer than ``min_runs`` timed runs (blocks longer than about a third of
    ``min_run_time``), blocks of the same number of calls are added until there are
    ``min_runs``, or until the timed runs have taken ``max_run_time`` s in all (None: no
    limit). Median and IQR are those of every run, as ``torch.utils.benchmark.Measurement``
    computes them.
    """
    first = seconds_per_call(fn, device)
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)  # seconds per call, one per block of m.number_per_run calls
    spent = sum(times) * m.number_per_run
    while len(times) < min_runs and (max_run_time is None or spent < max_run_time):
        times.append(seconds_per_call(fn, device, m.number_per_run))
        spent += times[-1] * m.number_per_run
    values = torch.tensor(sorted(times), dtype=torch.float64)
    median, p25, p75 = (values.quantile(f).item() for f in (0.5, 0.25, 0.75))
    return Timing(median * 1e3, (p75 - p25) * 1e3, first * 1e3, len(times))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_free_heap() -> None:
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def cpu_peak_supported() -> bool:
    """Whether this kernel lets a process reset and read its peak resident set."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
    except OSError:
        return False
    return True


def peak_memory(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before it.

    What ``fn`` returns is kept until the peak is read, so it counts.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del result
        return peak
    _release_free_heap()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    result = fn()
    peak = _status_kib("VmHWM") - before
    del result
    return max(0, peak) * 1024


def device_name(device: str = "cpu") -> str:
    """The accelerator's or the processor's model name."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_gflops(
    size: int = 2048,
    device: str = "cpu",
    min_run_time: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> float:
    """This machine's dense matmul rate in ``dtype``, GFLOP/s (2 size^3 FLOPs per product)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timing = time_call(lambda: a @ b, device, min_run_time)
    return 2 * size**3 / (timing.median_ms * 1e-3) / 1e9
