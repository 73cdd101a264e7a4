"""Run a micro suite: measure every case the same way and write one row per case at once.

Per case: the implementation's own reasons first (unsupported), then the analytic memory
estimate against the budget (oom, predicted), then the measurements: time and peak memory
for the forward pass (no gradient) and forward+backward, FLOP rate against this run's matmul
rate, and fidelity against exact fp64 attention on the CPU. Anything that goes wrong becomes
the row's status and reason; the run goes on. Rows are appended and fsynced as each case ends,
so an interrupted run loses nothing and ``resume`` continues it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from attnbench import registry
from attnbench.inputs import make_inputs
from attnbench.measure import MIN_RUNS, matmul_gflops, peak_memory, time_call
from attnbench.results import (
    append_row,
    context,
    drop_rows,
    new_row,
    now,
    read_rows,
)
from attnbench.spec import AttentionSpec
from attnbench.suite import MicroCase, MicroSuite, Suite, TrainSuite, expand, expand_train

def resolve_device(requested: str) -> str:
    """``auto`` -> cuda when usable, else cpu; an unusable cuda is an error."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device=cuda was requested but CUDA is not available here (allowed: auto, cpu)"
        )
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"device={requested!r} (allowed: auto, cpu, cuda)")
    return requested


def available_memory(device: str) -> int:
    """Bytes the process can still allocate: MemAvailable, or the GPU's free memory."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def output_path(suite: MicroSuite, device: str, out_dir: str | Path) -> Path:
    """``<out_dir>/<suite>-<device>.jsonl``."""
    return Path(out_dir) / f"{suite.name}-{device}.jsonl"


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N) with 1 <= i <= N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r} (allowed: i/N with integers, e.g. 1/4)") from None
    if not 1 <= i <= n:
        raise ValueError(f"--shard {text!r} (allowed: 1 <= i <= N)")
    return i, n


def _spec(case: MicroCase, requires_grad: bool = False) -> AttentionSpec:
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


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64."""
    return ((got.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def copy_psnr(out: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> float:
    """PSNR (dB, data range 1) of the copied image against the warped one, valid pixels."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    mask = valid[..., None].expand_as(target)
    got = out.double().cpu().clamp(0, 1)[mask]
    return peak_signal_noise_ratio(got, target[mask], data_range=1.0).item()


REFERENCES_KEPT = 16  # exact results kept by exact_reference: one suite's inputs, ~0.5 GiB at 128²


def output_grad(shape) -> torch.Tensor:
    """The output gradient every fidelity case back-propagates (fp64, fixed seed)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def fingerprint(*tensors: torch.Tensor) -> tuple:
    """Shapes and a digest of the contents: equal for equal tensors, whatever object holds them."""
    digest = hashlib.blake2b(digest_size=16)
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return (*(tuple(t.shape) for t in tensors), str(tensors[0].dtype), digest.hexdigest())


_references: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()


def exact_reference(q, k, v, scale, with_grad: bool):
    """Exact attention's output (and, with ``with_grad``, its input gradients for
    :func:`output_grad`, flattened and concatenated) on fp64 CPU inputs.

    Every method of a suite is compared on the same inputs, so the last
    :data:`REFERENCES_KEPT` results are kept, looked up by the inputs' contents.
    """
    key = (*fingerprint(q, k, v), scale, with_grad)
    if key in _references:
        _references.move_to_end(key)
        return _references[key]
    ref_in = [t.detach().clone().requires_grad_(with_grad) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*ref_in, scale=scale)
    grads = None
    if with_grad:
        out.backward(output_grad(out.shape))
        grads = torch.cat([t.grad.flatten() for t in ref_in])
    _references[key] = out.detach(), grads
    if len(_references) > REFERENCES_KEPT:
        _references.popitem(last=False)
    return _references[key]


def measure_fidelity(impl, inputs, spec: AttentionSpec, with_grad: bool) -> dict:
    """Errors of outputs (and input gradients) against exact fp64 attention on the CPU."""
    ref, ref_grad = exact_reference(
        inputs.q, inputs.k, inputs.v, impl.params.get("scale"), with_grad
    )
    args = [
        t.detach().to(device=spec.device, dtype=spec.dtype).requires_grad_(with_grad)
        for t in (inputs.q, inputs.k, inputs.v)
    ]
    grad_spec = dataclasses.replace(spec, requires_grad=with_grad)
    out = impl.forward(*args, grad_spec)
    result = {"rel_err_out": relative_error(out, ref)}
    if inputs.target is not None:
        result["copy_psnr"] = copy_psnr(out.detach(), inputs.target, inputs.valid)
    if with_grad:
        out.backward(output_grad(ref.shape).to(device=spec.device, dtype=spec.dtype))
        got = torch.cat([t.grad.double().cpu().flatten() for t in args])
        result["rel_err_grad"] = relative_error(got, ref_grad)
    return result


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
    spec = _spec(case)
    row["label"] = impl.label_for(spec)
    reasons = impl.unsupported_reasons(spec)
    if reasons:
        row.update(status="unsupported", reason="; ".join(reasons))
        return row

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
            return row
    notes = []
    if bwd_reasons:
        notes.append("fwdbwd not measured: " + "; ".join(bwd_reasons))
    device, dtype = spec.device, spec.dtype
    max_run_time = MIN_RUNS * time_budget_s if time_budget_s else None
    try:
        inputs = make_inputs(case.family, spec, case.seed, case.sharpness)
        q, k, v = (t.to(device=device, dtype=dtype) for t in (inputs.q, inputs.k, inputs.v))
        if "fwd" in case.directions:
            with torch.no_grad():
                fwd = lambda: impl.forward(q, k, v, spec)  # noqa: E731
                if "time" in case.metrics:
                    t = time_call(fwd, device, min_run_time, max_run_time=max_run_time)
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
                        row["time_phase1_ms"] = time_call(
                            parts["phase1"], device, min_run_time, max_run_time=max_run_time
                        ).median_ms
                if "memory" in case.metrics:
                    row["mem_fwd_bytes"] = peak_memory(fwd, device)
        if backward and ("time" in case.metrics or "memory" in case.metrics):
            qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
            grad_out = torch.randn(
                case.batch, case.heads, spec.q_tokens, spec.v_channels, device=device, dtype=dtype
            )

            def fwdbwd():
                for t in (qg, kg, vg):
                    t.grad = None
                impl.forward(qg, kg, vg, grad_spec).backward(grad_out)

            if "time" in case.metrics:
                t = time_call(fwdbwd, device, min_run_time, max_run_time=max_run_time)
                row.update(
                    time_fwdbwd_ms=t.median_ms,
                    time_fwdbwd_iqr_ms=t.iqr_ms,
                    time_fwdbwd_first_ms=t.first_ms,
                    time_fwdbwd_runs=t.runs,
                )
                row["warnings"] += t.warnings("time_fwdbwd")
            if "memory" in case.metrics:
                for t in (qg, kg, vg):  # the timing runs' gradients: freed before, not inside
                    t.grad = None
                row["mem_fwdbwd_bytes"] = peak_memory(fwdbwd, device)
        if "fidelity" in case.metrics:
            row.update(measure_fidelity(impl, inputs, spec, backward))
    except (torch.OutOfMemoryError, MemoryError) as err:
        row.update(status="oom", reason=f"{type(err).__name__}: {err}".strip())
        if device == "cuda":
            torch.cuda.empty_cache()
    except Exception as err:  # a failing case becomes a row; the run goes on
        row.update(status="error", reason=f"{type(err).__name__}: {err}")
    if notes and row["status"] == "ok":
        row["reason"] = "; ".join(notes)
    for key in ("rel_err_out", "rel_err_grad", "copy_psnr", "peak_fraction", "gflops_fwd"):
        if row[key] is not None and not math.isfinite(row[key]):
            row["warnings"].append(f"{key} was {row[key]}; stored as null")
            row[key] = None
    return row


def _flops_or_none(case: MicroCase) -> int | None:
    """Useful forward FLOPs of the case, or None where they cannot be counted."""
    try:
        return registry.create(case.impl, **case.params_dict).flops(_spec(case))
    except ValueError:
        return None


def _first_size_skip(case: MicroCase, gflops: float, time_budget: float) -> str | None:
    """Why a method's first size is skipped: one call of its slower direction would take
    longer than the time budget even at this run's dense matmul rate (its FLOPs / the rate, a
    lower bound); None where it would not, or where its FLOPs cannot be counted."""
    impl = registry.create(case.impl, **case.params_dict)
    spec = _spec(case)
    grad_spec = dataclasses.replace(spec, requires_grad=True)
    backward = "fwdbwd" in case.directions and not impl.unsupported_reasons(grad_spec)
    try:
        flops = impl.flops(spec, backward=backward)
    except ValueError:
        return None
    predicted = flops / (gflops * 1e9)
    if predicted <= time_budget:
        return None
    direction = "fwd+bwd" if backward else "fwd"
    return (
        f"predicted: one {direction} call would take at least ~{predicted:.1f} s "
        f"({flops / 1e9:.3g} GFLOP at this run's matmul rate of {gflops:.3g} GFLOP/s), over "
        f"the time budget {time_budget:g} s"
    )


def _budget_key(case: MicroCase) -> tuple:
    return case.impl, case.params, case.channels, case.family, case.directions


def prepare_output(
    suite: Suite,
    device: str,
    out_dir: str | Path,
    resume: bool,
    overwrite: bool,
    retry_errors: bool = False,
) -> tuple[Path, set[str]]:
    """The results file and the case ids it already holds (with ``resume``).

    ``retry_errors`` (with ``resume``) first removes the rows whose status is ``error``, so that
    those cases run again. A train suite's checkpoints count as rows: without ``resume`` they
    are refused, with ``overwrite`` removed.
    """
    path = output_path(suite, device, out_dir)
    if path.exists() and path.stat().st_size and not (resume or overwrite):
        raise ValueError(
            f"{path} already holds rows: pass --resume to continue it, --overwrite to start it "
            "afresh, or --out to write elsewhere"
        )
    if overwrite and path.exists():
        path.unlink()
    if isinstance(suite, TrainSuite):
        from attnbench.tasks.training import checkpoint_path, checkpoint_step

        for case in expand_train(suite, device):
            checkpoint = checkpoint_path(path.parent, case)
            if not checkpoint.exists() or resume:
                continue
            if overwrite:
                checkpoint.unlink()
                continue
            step = checkpoint_step(checkpoint)
            raise ValueError(
                f"{checkpoint} holds {case.impl} seed {case.seed} stopped at step {step}: pass "
                f"--resume to continue from step {step} or --overwrite to start over"
            )
    if retry_errors and path.exists():
        drop_rows(path, "error")
    done = {r.get("case_id") for r in read_rows([path])} if resume and path.exists() else set()
    return path, done


def case_ids(suite: Suite, device: str) -> set[str]:
    """The ids of every case of ``suite`` on ``device``: rows with other ids in its results
    file come from another configuration of it."""
    cases = expand_train(suite, device) if isinstance(suite, TrainSuite) else expand(suite, device)
    return {case.case_id for case in cases}


def take_shard(cases: list, shard: tuple[int, int]) -> list:
    """The i-th of N interleaved shares of ``cases``."""
    i, n = shard
    return [c for idx, c in enumerate(cases) if idx % n == i - 1]


def run_train_suite(
    suite: TrainSuite,
    path: Path,
    done: set[str],
    shard: tuple[int, int],
    device: str,
    resume: bool,
    progress: bool,
) -> list[dict]:
    """Train every case not yet in ``path``; rank 0 appends one row per case."""
    from tqdm import tqdm

    from attnbench.tasks.training import empty_train_row, init_distributed, train_case, world

    init_distributed(device)
    rank, _ = world()
    ctx = context(device)
    todo = [c for c in take_shard(expand_train(suite, device), shard) if c.case_id not in done]
    rows = []
    bar = tqdm(todo, disable=not progress or rank != 0, unit="run", dynamic_ncols=True)
    for case in bar:
        bar.set_description(f"{case.impl} seed {case.seed}")
        row = empty_train_row(case, ctx)
        try:
            row = train_case(case, suite, row, path.parent, resume, progress)
        except (torch.OutOfMemoryError, MemoryError) as err:
            row.update(status="oom", reason=f"{type(err).__name__}: {err}".strip())
        except registry.UnsupportedError as err:
            row.update(status="unsupported", reason="; ".join(err.reasons))
        except Exception as err:  # a failing run becomes a row; the suite goes on
            row.update(status="error", reason=f"{type(err).__name__}: {err}")
        row["timestamp"] = now()
        if rank == 0:
            append_row(path, row)
        rows.append(row)
    return rows


@contextlib.contextmanager
def results_lock(path: Path):
    """Hold an exclusive lock on ``path`` (``<path>.lock``, fcntl) while a run writes it.

    Raises:
        ValueError: another process holds it; the message names that process.
    """
    lock_file = path.with_name(path.name + ".lock")
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise ValueError(
                f"{path} is being written by another run (process {holder}): wait for it to "
                "end, or pass --out to write elsewhere"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def run_suite(
    suite: Suite,
    out_dir: str | Path = "results/raw",
    **options,
) -> tuple[Path, list[dict]]:
    """Run ``suite`` (or its ``shard`` i/N share), appending rows to its results file.

    Options: ``resume``, ``overwrite``, ``retry_errors``, ``shard`` (i, N), ``device``,
    ``progress``, ``min_run_time`` (see :func:`run_unlocked`). One process writes a results
    file at a time: the first process of a run (rank 0 under torchrun) holds its lock.

    Returns:
        The results file and the rows written by this call.
    Raises:
        ValueError: the file exists and neither ``resume`` nor ``overwrite`` is set, another
        run is writing it, or a bad device or shard.
    """
    device = resolve_device(options.pop("device", None) or suite.device)
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {str(out_dir)!r} cannot hold results: {err.strerror}") from None
    if not os.access(out_dir, os.W_OK):
        raise ValueError(f"--out {str(out_dir)!r} cannot hold results: not writable")
    if int(os.environ.get("RANK", "0")) != 0:
        return run_unlocked(suite, out_dir, device=device, **options)
    with results_lock(output_path(suite, device, out_dir)):
        return run_unlocked(suite, out_dir, device=device, **options)


def run_unlocked(
    suite: Suite,
    out_dir: str | Path = "results/raw",
    *,
    resume: bool = False,
    overwrite: bool = False,
    retry_errors: bool = False,
    shard: tuple[int, int] = (1, 1),
    device: str | None = None,
    progress: bool = True,
    min_run_time: float | None = None,
) -> tuple[Path, list[dict]]:
    """:func:`run_suite` without the lock on the results file."""
    from tqdm import tqdm

    device = resolve_device(device or suite.device)
    resume = resume or retry_errors
    path, done = prepare_output(suite, device, out_dir, resume, overwrite, retry_errors)
    if isinstance(suite, TrainSuite):
        return path, run_train_suite(suite, path, done, shard, device, resume, progress)
    todo = [c for c in take_shard(expand(suite, device), shard) if c.case_id not in done]

    ctx = context(device)
    run_time = suite.timing.min_run_time if min_run_time is None else min_run_time
    wants_time = "time" in suite.metrics and todo
    peak = matmul_gflops(device=device, min_run_time=run_time) if wants_time else None
    budget = suite.memory_budget * available_memory(device)
    time_budget = suite.timing.time_budget_s
    limits: dict[tuple, tuple[int, str]] = {}  # larger maps than these are skipped
    last_ok: dict[tuple, tuple[float, float, str]] = {}  # flops, slowest median call (ms), map

    def remember(case: MicroCase, row: dict, flops: int | None) -> None:
        """Update the budgets from a finished row: exceeded, out of memory, or last good size."""
        where = f"{case.q_hw[0]}x{case.q_hw[1]}"
        key = _budget_key(case)
        size = case.q_hw[0] * case.q_hw[1] * case.kv_hw[0] * case.kv_hw[1]
        # The slower direction's median over its timed runs; a first call (compilation,
        # autotuning) only where nothing else was timed: compile time does not grow with the map.
        medians = {d: row.get(f"time_{d}_ms") or 0.0 for d in ("fwd", "fwdbwd")}
        slower = max(medians, key=medians.get)
        slowest, runs = medians[slower], row.get(f"time_{slower}_runs")
        what = f"the median of {runs} timed run{'s' * (runs != 1)}" if runs else "the median call"
        if not slowest:
            slowest = max(row.get(k) or 0.0 for k in ("time_fwd_first_ms", "time_fwdbwd_first_ms"))
            what = "the first call"
        if time_budget and slowest > time_budget * 1e3:
            limits.setdefault(
                key,
                (
                    size,
                    f"skipped: {what} at {where} took {slowest / 1e3:.1f} s, over the "
                    f"time budget {time_budget:g} s",
                ),
            )
        elif row["status"] == "oom":
            limits.setdefault(key, (size, f"skipped: out of memory at {where}"))
        elif row["status"] == "ok" and slowest and flops:
            last_ok[key] = (flops, slowest, where)

    if done:  # a resumed run starts from what the finished cases taught the budgets
        finished = {r.get("case_id"): r for r in read_rows([path])}
        for case in take_shard(expand(suite, device), shard):
            if case.case_id in finished:
                remember(case, finished[case.case_id], _flops_or_none(case))

    rows = []
    bar = tqdm(todo, disable=not progress, unit="case", dynamic_ncols=True)
    for case in bar:
        where = f"{case.q_hw[0]}x{case.q_hw[1]}"
        bar.set_description(f"{case.impl} {where}")
        key = _budget_key(case)
        size = case.q_hw[0] * case.q_hw[1] * case.kv_hw[0] * case.kv_hw[1]
        skip = limits[key][1] if key in limits and size >= limits[key][0] else None
        flops = _flops_or_none(case)
        if skip is None and time_budget and key in last_ok and flops:
            prev_flops, prev_ms, prev_where = last_ok[key]
            predicted = prev_ms * flops / prev_flops / 1e3
            if predicted > time_budget:
                skip = (
                    f"predicted: one call would take ~{predicted:.1f} s (scaled by FLOPs from "
                    f"{prev_ms / 1e3:.2f} s at {prev_where}), over the time budget "
                    f"{time_budget:g} s"
                )
        elif skip is None and time_budget and peak and key not in last_ok:  # the first size
            skip = _first_size_skip(case, peak, time_budget)
        if skip is not None:
            row = empty_row(case, ctx)
            label = registry.create(case.impl, **case.params_dict).label_for(_spec(case))
            row.update(status="unsupported", reason=skip, label=label)
        else:
            row = measure_case(case, ctx, peak, budget, run_time, time_budget)
        row["timestamp"] = now()
        append_row(path, row)
        rows.append(row)
        remember(case, row, flops)
    return path, rows


RELATIVE_ERROR_NOTE = (
    "rel. error: |output - exact| / |exact| against exact attention in fp64. On gaussian inputs "
    "exact attention averages nearly every value, so its output is tiny and a relative error "
    "of 1 or more says little; on warp-copy (values an image, queries its warped copy) the copy "
    "PSNR says how well a method copies (higher is better; full.sdpa's row is exact)."
)


def summary_table(rows: list[dict]) -> str:
    """A Markdown table of the rows, one line per case."""

    def mib(x):
        return None if x is None else x / 2**20

    if rows and rows[0]["kind"] == "train":
        records = [
            {
                "implementation": r["label"],
                "seed": r["seed"],
                "status": r["status"],
                "test L1": r.get("test_l1"),
                "SSIM": r.get("ssim"),
                "PSNR": r.get("psnr"),
                "LPIPS": r.get("lpips"),
                "hit rate": (r.get("copy_hit_rate") or {}).get("largest"),
                "steps": r.get("steps"),
                "attention MiB": mib(r.get("attn_mem_bytes")),
                "step s": r.get("step_time_s"),
                "parameters": r.get("n_params"),
            }
            for r in rows
        ]
        return markdown(records, ".4g")
    records = [
        {
            "implementation": r["label"],
            "q map": f"{r['q_h']}x{r['q_w']}",
            "kv map": f"{r['kv_h']}x{r['kv_w']}",
            "C": r["channels"],
            "inputs": r.get("inputs"),
            "sharpness": r.get("sharpness"),
            "status": r["status"],
            "fwd ms": r.get("time_fwd_ms"),
            "fwd+bwd ms": r.get("time_fwdbwd_ms"),
            "fwd MiB": mib(r.get("mem_fwd_bytes")),
            "fwd+bwd MiB": mib(r.get("mem_fwdbwd_bytes")),
            "GFLOP/s": r.get("gflops_fwd"),
            "rel. error": r.get("rel_err_out"),
            "copy PSNR dB": r.get("copy_psnr"),
        }
        for r in rows
    ]
    table = markdown(records, ".3g")
    if any(r.get("rel_err_out") is not None for r in rows):
        table += "\n\n" + RELATIVE_ERROR_NOTE
    return table


def markdown(records: list[dict], floatfmt: str) -> str:
    """A Markdown table of ``records``; all-empty columns dropped, missing values blank."""
    import pandas as pd

    frame = pd.DataFrame(records).dropna(axis=1, how="all")
    frame = frame.astype(object).where(frame.notna(), None)  # blanks, not "nan"
    return frame.to_markdown(index=False, floatfmt=floatfmt, missingval="")
