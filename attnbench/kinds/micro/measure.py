"""Measure one micro case: admit it, then its time, memory and fidelity steps, into one row.

Per case: the implementation's own reasons first (unsupported), then the analytic memory
estimate against the budget (oom, predicted), then the measurements: time and peak memory of
the forward pass (no gradient) and of forward+backward, the FLOP rate against this run's matmul
rate, and fidelity against exact fp64 attention on the CPU. Anything that goes wrong becomes
the row's status and reason, with what was measured before it kept.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from attnbench import registry
from attnbench.inputs import make_inputs
from attnbench.kinds.base import record_failure
from attnbench.kinds.micro.fidelity import measure_fidelity
from attnbench.kinds.micro.suite import MicroCase
from attnbench.measure import MIN_RUNS, Timing, peak_memory, time_call
from attnbench.results import new_row
from attnbench.spec import AttentionSpec

FINITE_KEYS = (
    "rel_err_out", "rel_err_grad", "copy_psnr", "peak_fraction", "gflops_fwd", "attn_recall",
    "attn_recall_p10",
)  # fmt: skip


def case_spec(case: MicroCase, requires_grad: bool = False) -> AttentionSpec:
    """The attention call a micro case measures."""
    return AttentionSpec(
        batch=case.batch,
        heads=case.heads,
        q_tokens=case.q_hw[0] * case.q_hw[1],
        kv_tokens=case.kv_hw[0] * case.kv_hw[1],
        channels=case.channels,
        v_channels=case.v_channels,
        q_hw=case.q_hw,
        kv_hw=case.kv_hw,
        dtype=getattr(torch, case.dtype),
        device=case.device,
        requires_grad=requires_grad,
    )


def empty_row(case: MicroCase, ctx: dict) -> dict:
    """Every key a micro row has, metrics null until measured."""
    row = new_row(case, "micro", ctx, case.dtype)
    row.update(
        batch=case.batch,
        heads=case.heads,
        q_h=case.q_hw[0],
        q_w=case.q_hw[1],
        kv_h=case.kv_hw[0],
        kv_w=case.kv_hw[1],
        channels=case.channels,
        v_channels=case.v_channels,
        inputs=case.family,
        sharpness=case.sharpness if case.family == "warp-match" else None,
        directions=list(case.directions),
        warnings=[],
    )
    return row


def available_memory(device: str) -> int:
    """Bytes the process can still allocate: MemAvailable, or the GPU's free memory."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


@dataclass(frozen=True)
class Timer:
    """Times a call on ``device``: timed runs for at least ``min_run_time`` s and
    :data:`~attnbench.measure.MIN_RUNS` runs, unless they take ``max_run_time`` s."""

    device: str
    min_run_time: float
    max_run_time: float | None = None

    def __call__(self, fn) -> Timing:
        return time_call(fn, self.device, self.min_run_time, max_run_time=self.max_run_time)


def admit(impl, case: MicroCase, spec: AttentionSpec, budget_bytes: float, row: dict):
    """Whether the case can run: sets the row's status where it cannot (unsupported, or
    predicted out of memory). Returns (measure the backward?, notes for the row's reason)."""
    reasons = impl.unsupported_reasons(spec)
    if reasons:
        row.update(status="unsupported", reason="; ".join(reasons))
        return False, []
    want_bwd = "fwdbwd" in case.directions
    grad_spec = dataclasses.replace(spec, requires_grad=True)
    bwd_reasons = impl.unsupported_reasons(grad_spec) if want_bwd else []
    backward = want_bwd and not bwd_reasons
    estimate = impl.memory_bytes(spec, backward=backward)
    if estimate is not None:
        row["mem_predicted_bytes"] = estimate
        needed = estimate + spec.input_bytes * (2 if backward else 1)
        if needed > budget_bytes:
            row.update(
                status="oom",
                reason=f"predicted: needs {needed / 2**30:.2f} GiB, over the memory budget "
                f"{budget_bytes / 2**30:.2f} GiB",
            )
    notes = ["fwdbwd not measured: " + "; ".join(bwd_reasons)] if bwd_reasons else []
    return backward, notes


def measure_forward(impl, qkv, spec, metrics, timer: Timer, peak_gflops, row: dict) -> None:
    """Time (with the FLOP rate and, where the backend can, phase 1 apart) and peak memory of
    the forward pass without gradient."""
    q, k, v = qkv
    with torch.no_grad():
        fwd = lambda: impl.forward(q, k, v, spec)  # noqa: E731
        if "time" in metrics:
            t = timer(fwd)
            flops = impl.flops(spec)
            row.update(
                time_fwd_ms=t.median_ms,
                time_fwd_iqr_ms=t.iqr_ms,
                time_fwd_first_ms=t.first_ms,
                time_fwd_runs=t.runs,
                flops_fwd=flops,
                gflops_fwd=flops / t.median_ms / 1e6,
                peak_gflops=peak_gflops,
                peak_fraction=flops / t.median_ms / 1e6 / peak_gflops,
            )
            row["warnings"] += t.warnings("time_fwd")
            parts = impl.timed_parts(q, k, v, spec)
            if "phase1" in parts:
                row["time_phase1_ms"] = timer(parts["phase1"]).median_ms
        if "memory" in metrics:
            row["mem_fwd_bytes"] = peak_memory(fwd, spec.device)


def measure_backward(impl, qkv, spec, metrics, timer: Timer, row: dict) -> None:
    """Time and peak memory of forward+backward (a fixed random output gradient)."""
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in qkv)
    grad_spec = dataclasses.replace(spec, requires_grad=True)
    grad_out = torch.randn(
        spec.batch, spec.heads, spec.q_tokens, spec.v_channels, device=spec.device, dtype=spec.dtype
    )

    def fwdbwd():
        for t in (qg, kg, vg):
            t.grad = None
        impl.forward(qg, kg, vg, grad_spec).backward(grad_out)

    if "time" in metrics:
        t = timer(fwdbwd)
        row.update(
            time_fwdbwd_ms=t.median_ms,
            time_fwdbwd_iqr_ms=t.iqr_ms,
            time_fwdbwd_first_ms=t.first_ms,
            time_fwdbwd_runs=t.runs,
        )
        row["warnings"] += t.warnings("time_fwdbwd")
    if "memory" in metrics:
        for t in (qg, kg, vg):  # the timing runs' gradients: freed before, not inside
            t.grad = None
        row["mem_fwdbwd_bytes"] = peak_memory(fwdbwd, spec.device)


def measure_case(
    case: MicroCase,
    ctx: dict,
    peak_gflops: float | None,
    budget_bytes: float,
    min_run_time: float,
    time_budget_s: float | None = None,
) -> dict:
    """One row: the case's measurements, or its status and reason.

    Each timing takes at least ``MIN_RUNS`` timed runs, unless they have taken ``MIN_RUNS``
    times ``time_budget_s`` (then the row's warning names the count).
    """
    row = empty_row(case, ctx)
    impl = registry.create(case.impl, **case.params_dict)
    spec = case_spec(case)
    row["label"] = impl.label_for(spec)
    backward, notes = admit(impl, case, spec, budget_bytes, row)
    if row["status"] != "ok":
        return row
    max_run_time = MIN_RUNS * time_budget_s if time_budget_s else None
    timer = Timer(spec.device, min_run_time, max_run_time)
    try:
        inputs = make_inputs(case.family, spec, case.seed, case.sharpness)
        qkv = [t.to(device=spec.device, dtype=spec.dtype) for t in (inputs.q, inputs.k, inputs.v)]
        if "fwd" in case.directions:
            measure_forward(impl, qkv, spec, case.metrics, timer, peak_gflops, row)
        if backward and {"time", "memory"} & set(case.metrics):
            measure_backward(impl, qkv, spec, case.metrics, timer, row)
        if "fidelity" in case.metrics:
            fidelity = measure_fidelity(impl, inputs, spec, backward)
            notes += fidelity.pop("notes")
            row.update(fidelity)
    except Exception as err:  # a failing case becomes a row; the run goes on
        record_failure(row, err)
    if notes and row["status"] == "ok":
        row["reason"] = "; ".join(notes)
    for key in FINITE_KEYS:
        if row[key] is not None and not math.isfinite(row[key]):
            row["warnings"].append(f"{key} was {row[key]}; stored as null")
            row[key] = None
    return row
