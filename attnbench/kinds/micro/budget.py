"""The size budget of a micro run: which larger maps of a method are not worth measuring.

A suite's ``timing.time_budget_s`` bounds one call. Once a method's slower direction has taken
longer at some map, or run out of memory, its larger maps are skipped; so is a map predicted to
take longer: scaled by FLOPs from the method's last good map, or, at its first map, its FLOPs
at the run's matmul rate (a lower bound). Skipped cases become rows with the reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from attnbench import registry
from attnbench.kinds.micro.measure import case_spec
from attnbench.kinds.micro.suite import MicroCase


def flops_of(case: MicroCase, backward: bool = False) -> int | None:
    """Useful FLOPs of the case's forward (or forward+backward), or None where they cannot be
    counted."""
    try:
        return registry.create(case.impl, **case.params_dict).flops(case_spec(case), backward)
    except ValueError:
        return None


def method_key(case: MicroCase) -> tuple:
    """What makes two cases the same method on the same kind of input, at another map."""
    return case.impl, case.params, case.channels, case.family, case.directions


def map_text(case: MicroCase) -> str:
    return f"{case.q_hw[0]}x{case.q_hw[1]}"


def map_size(case: MicroCase) -> int:
    return case.q_hw[0] * case.q_hw[1] * case.kv_hw[0] * case.kv_hw[1]


def slowest_call(row: dict) -> tuple[float, str]:
    """The slower direction's median (ms) over its timed runs, and what it was; a first call
    (compilation, autotuning) only where nothing else was timed: compile time does not grow
    with the map."""
    medians = {d: row.get(f"time_{d}_ms") or 0.0 for d in ("fwd", "fwdbwd")}
    slower = max(medians, key=medians.get)
    slowest, runs = medians[slower], row.get(f"time_{slower}_runs")
    what = f"the median of {runs} timed run{'s' * (runs != 1)}" if runs else "the median call"
    if not slowest:
        slowest = max(row.get(k) or 0.0 for k in ("time_fwd_first_ms", "time_fwdbwd_first_ms"))
        what = "the first call"
    return slowest, what


@dataclass
class SizeBudget:
    """What a run has learnt of each method's sizes; ``time_budget_s`` None: nothing skipped
    for time."""

    time_budget_s: float | None
    peak_gflops: float | None
    limits: dict[tuple, tuple[int, str]] = field(default_factory=dict)  # skip maps from this size
    last_ok: dict[tuple, tuple[int, float, str]] = field(default_factory=dict)  # flops, ms, map

    def remember(self, case: MicroCase, row: dict) -> None:
        """Learn from a finished row: over the time budget, out of memory, or a good size."""
        key, size = method_key(case), map_size(case)
        slowest, what = slowest_call(row)
        budget = self.time_budget_s
        if budget and slowest > budget * 1e3:
            reason = (
                f"skipped: {what} at {map_text(case)} took {slowest / 1e3:.1f} s, over the "
                f"time budget {budget:g} s"
            )
            self.limits.setdefault(key, (size, reason))
        elif row["status"] == "oom":
            self.limits.setdefault(key, (size, f"skipped: out of memory at {map_text(case)}"))
        elif row["status"] == "ok" and slowest:
            flops = flops_of(case)
            if flops:
                self.last_ok[key] = (flops, slowest, map_text(case))

    def skip_reason(self, case: MicroCase) -> str | None:
        """Why ``case`` is not measured, or None."""
        key = method_key(case)
        if key in self.limits and map_size(case) >= self.limits[key][0]:
            return self.limits[key][1]
        if not self.time_budget_s:
            return None
        if key in self.last_ok:
            return self.scaled_skip(case)
        return self.first_size_skip(case) if self.peak_gflops else None

    def scaled_skip(self, case: MicroCase) -> str | None:
        """Over the budget as predicted from the method's last good size, scaled by FLOPs."""
        flops = flops_of(case)
        if not flops:
            return None
        prev_flops, prev_ms, prev_where = self.last_ok[method_key(case)]
        predicted = prev_ms * flops / prev_flops / 1e3
        if predicted <= self.time_budget_s:
            return None
        return (
            f"predicted: one call would take ~{predicted:.1f} s (scaled by FLOPs from "
            f"{prev_ms / 1e3:.2f} s at {prev_where}), over the time budget "
            f"{self.time_budget_s:g} s"
        )

    def first_size_skip(self, case: MicroCase) -> str | None:
        """Over the budget at a method's first size: one call of its slower direction would
        take longer even at this run's dense matmul rate (its FLOPs / the rate)."""
        impl = registry.create(case.impl, **case.params_dict)
        grad_spec = dataclasses.replace(case_spec(case), requires_grad=True)
        backward = "fwdbwd" in case.directions and not impl.unsupported_reasons(grad_spec)
        flops = flops_of(case, backward)
        if flops is None:
            return None
        predicted = flops / (self.peak_gflops * 1e9)
        if predicted <= self.time_budget_s:
            return None
        direction = "fwd+bwd" if backward else "fwd"
        return (
            f"predicted: one {direction} call would take at least ~{predicted:.1f} s "
            f"({flops / 1e9:.3g} GFLOP at this run's matmul rate of {self.peak_gflops:.3g} "
            f"GFLOP/s), over the time budget {self.time_budget_s:g} s"
        )
