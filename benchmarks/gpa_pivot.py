"""GPA against exact attention at the paper's pivot: one 256 x 256 map, C = 160.

Usage:
    .venv/bin/python benchmarks/gpa_pivot.py [--size 256] [--channels 160] [--json FILE]
    python benchmarks/gpa_pivot.py --device cuda --dtype bfloat16 --sdpa-backend flash \
        --json results/gpa_pivot-cuda-bf16.json

q = k = v = [1, 1, size², C]; GPA at the DeepFashion pivot (phase 1 at 64 x 64, cells 2 x 2,
κ = 12); every implementation runs the same inputs in this process. Prints, per
implementation: median forward time (and IQR), first call, speed-up over full.sdpa, useful
GFLOP/s and its fraction of this machine's dense matmul rate (2048³ on the CPU, 8192³ on CUDA,
where a 2048³ product lasts about as long as its launch; in the inputs' dtype), and peak memory
above the inputs against the output's bytes. For gpa.torch and gpa.cpp, phase 1 (key selection) and
phase 2 (attention over the selected blocks) are also timed apart. Then forward+backward (the
gradients of q, k and v for a fixed output gradient) of full.sdpa, gpa.torch, gpa.cpp and, on
CUDA, gpa.flex, with
useful FLOPs counted as the registry counts them (phase 1 once, phase 2 three times: no
recomputation counted).

This machine may be shared, and its speed then drifts within seconds. So the GPA backends are
also timed in interleaved rounds — the 2048³ matmul, then each backend once (forward, then
forward+backward), round after round — and each round's fraction of the matmul rate is taken
against that round's matmul: the median of those fractions is steadier than a ratio of medians
measured at different moments. gpa.cpp's forward+backward over its forward is taken per round
too.

On CUDA (``--device cuda``) every timing synchronises the device, peak memory is
``max_memory_allocated``, and ``--sdpa-backend`` pins full.sdpa to one of PyTorch's SDPA kernels
(flash needs float16 or bfloat16); its label then names the kernel. gpa.cpp and gpa.reference
are CPU-only and give ``unsupported`` rows there.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch

from attnbench import measure, registry, results
from attnbench.impls.gpa import cpp, grid_attention, select_keys
from attnbench.spec import AttentionSpec

IMPLS = ["full.sdpa", "gpa.torch", "gpa.cpp", "gpa.flex", "gpa.reference"]
INTERLEAVED = ["gpa.torch", "gpa.cpp", "gpa.flex"]
FWDBWD = {
    "cpu": ["full.sdpa", "gpa.torch", "gpa.cpp"],
    "cuda": ["full.sdpa", "gpa.torch", "gpa.flex"],
}
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}


def with_sdpa_backend(fn: Callable[[], object], backend: str | None) -> Callable[[], object]:
    """``fn`` run with SDPA restricted to ``backend`` (None: PyTorch's choice)."""
    if backend is None:
        return fn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = getattr(SDPBackend, SDPA_BACKENDS[backend])

    def pinned():
        with sdpa_kernel(kernel):
            return fn()

    return pinned


def forward_backward(impl, q, k, v, hw) -> Callable[[], object]:
    """A call of ``impl``'s forward and backward: the gradients of q, k and v."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(q.shape[:-1] + v.shape[-1:], generator=gen).to(q.device, q.dtype)

    def fn():
        out = impl(*leaves, q_hw=hw, kv_hw=hw)
        return torch.autograd.grad(out, leaves, grad)

    return fn


def interleaved_rounds(
    fns: dict[str, Callable[[], object]], rounds: int, device: str = "cpu"
) -> dict[str, list[float]]:
    """Seconds of each call of each function, calling them in turn, round after round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(measure.seconds_per_call(fn, device))
    return times


def measured_row(
    label: str, fn, flops: int, spec, peak: float, min_run_time: float, device: str
) -> dict:
    """Time and peak memory of ``fn`` as a result row; ``flops`` its useful FLOPs.

    A call that raises (a kernel that fails to compile, memory running out) gives a row with
    status ``error`` and the exception as its reason, and the other implementations still run.
    """
    try:
        t = measure.time_call(fn, device, min_run_time=min_run_time)
        mem = measure.peak_memory(fn, device)
    except Exception as e:  # noqa: BLE001 - any failure becomes the row's reason
        return {"impl": label, "status": "error", "reason": f"{type(e).__name__}: {e}"[:500]}
    return {
        "impl": label,
        "status": "ok",
        "time_ms": t.median_ms,
        "iqr_ms": t.iqr_ms,
        "first_ms": t.first_ms,
        "runs": t.runs,
        "gflop": flops / 1e9,
        "gflops": flops / t.median_ms / 1e6,
        "peak_fraction": flops / t.median_ms / 1e6 / peak,
        "mem_bytes": mem,
        "mem_over_output": mem / spec.output_bytes,
    }


def add_speedups(rows: list[dict]) -> None:
    """Give each measured row its speed-up over full.sdpa's row (None without one)."""
    sdpa_ms = next(
        (r["time_ms"] for r in rows if r["impl"].startswith("full.sdpa") and r["status"] == "ok"),
        None,
    )
    for r in rows:
        if r["status"] == "ok":
            r["speedup_vs_sdpa"] = sdpa_ms / r["time_ms"] if sdpa_ms else None


def print_rows(rows: list[dict]) -> None:
    """Print the rows: a measured row's figures, or another's status and reason."""
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['impl']:28} {r['status']}: {r['reason']}")
            continue
        speedup = "-" if r["speedup_vs_sdpa"] is None else f"{r['speedup_vs_sdpa']:.1f}x"
        print(
            f"{r['impl']:28} {r['time_ms']:10.1f} {r['iqr_ms']:6.1f} {r['first_ms']:8.0f} "
            f"{speedup:>9} {r['gflops']:8.0f} {r['peak_fraction']:8.0%} "
            f"{r['mem_bytes'] / 2**20:8.1f} {r['mem_over_output']:6.2f}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="map side (default 256)")
    parser.add_argument("--channels", type=int, default=160, help="C = Cv (default 160)")
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds per timing")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    parser.add_argument("--device", choices=sorted(MATMUL_SIZE), default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--sdpa-backend",
        choices=sorted(SDPA_BACKENDS),
        help="pin full.sdpa to this SDPA kernel (default: PyTorch's choice)",
    )
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=IMPLS,
        default=IMPLS,
        help="implementations to run (default: all; speed-ups need full.sdpa among them)",
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    n, c, device = args.size, args.channels, args.device
    dtype = DTYPES[args.dtype]
    hw = (n, n)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n * n, c, generator=gen).to(device, dtype) for _ in range(3))
    spec = AttentionSpec.from_inputs(q, k, v, hw, hw)
    matmul_size = MATMUL_SIZE[device]
    peak = measure.matmul_gflops(matmul_size, device, dtype=dtype)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {measure.device_name(device)}")
    print(f"dense {args.dtype} {matmul_size}^3 matmul: {peak:.0f} GFLOP/s")
    print(
        f"inputs 3 x [1, 1, {n * n}, {c}] {args.dtype}; "
        f"output {spec.output_bytes / 2**20:.1f} MiB\n"
    )

    def labelled(name: str, impl) -> str:
        label = impl.label_for(spec)
        return (
            f"{label} ({args.sdpa_backend})" if name == "full.sdpa" and args.sdpa_backend else label
        )

    def pinned(name: str, fn: Callable[[], object]) -> Callable[[], object]:
        return with_sdpa_backend(fn, args.sdpa_backend) if name == "full.sdpa" else fn

    # Exact attention takes minutes a call on the CPU: time it for as few runs as allowed.
    sdpa_run_time = 0.1 if device == "cpu" else args.min_run_time
    rows = []
    calls = {}
    with torch.no_grad():
        for name in args.impls:
            impl = registry.create(name)
            label = labelled(name, impl)
            reasons = impl.unsupported_reasons(spec)
            if reasons:
                rows.append({"impl": label, "status": "unsupported", "reason": "; ".join(reasons)})
                continue
            fn = pinned(name, lambda impl=impl: impl(q, k, v, q_hw=hw, kv_hw=hw))
            run_time = sdpa_run_time if name == "full.sdpa" else args.min_run_time
            rows.append(measured_row(label, fn, impl.flops(spec), spec, peak, run_time, device))
            if rows[-1]["status"] == "ok":
                calls[name] = (label, impl.flops(spec), fn)

        gpa = registry.create("gpa.torch")
        geom = gpa.geometry(spec)
        scale = gpa.scale_for(c)
        keys = select_keys(q, k, geom)
        phase_fns = {}
        if "gpa.torch" in calls:
            phase_fns["gpa.torch"] = (
                lambda: select_keys(q, k, geom),
                lambda: grid_attention(q, k, v, keys, geom),
            )
        if "gpa.cpp" in calls:
            phase_fns["gpa.cpp"] = (
                lambda: cpp.select_keys(q, k, geom),
                lambda: cpp.attend(q, k, v, keys, geom, "dot", scale, with_lse=False),
            )
        phase_times = {
            name: [measure.time_call(fn, device, args.min_run_time) for fn in fns]
            for name, fns in phase_fns.items()
        }
        phase1, phase2 = gpa.phase_flops(spec)

    bwd_rows, bwd_calls = [], {}
    for name in (n for n in FWDBWD[device] if n in args.impls):
        impl = registry.create(name)
        label = labelled(name, impl)
        grad_spec = AttentionSpec.from_inputs(*(t.requires_grad_() for t in (q, k, v)), hw, hw)
        reasons = impl.unsupported_reasons(grad_spec)
        for t in (q, k, v):
            t.requires_grad_(False)
        if reasons:
            bwd_rows.append({"impl": label, "status": "unsupported", "reason": "; ".join(reasons)})
            continue
        fn = pinned(name, forward_backward(impl, q, k, v, hw))
        flops = impl.flops(spec, backward=True)
        run_time = sdpa_run_time if name == "full.sdpa" else args.min_run_time
        bwd_rows.append(measured_row(label, fn, flops, spec, peak, run_time, device))
        if bwd_rows[-1]["status"] == "ok":
            bwd_calls[name] = (label, flops, fn)

    a, b = (torch.randn(matmul_size, matmul_size, device=device, dtype=dtype) for _ in range(2))
    timed = {"matmul": lambda: a @ b}
    for name in INTERLEAVED:
        if name in calls:
            timed[name] = lambda fn=calls[name][2]: torch.no_grad()(fn)()
        if name in bwd_calls:
            timed[name + " fwd+bwd"] = bwd_calls[name][2]
    times = interleaved_rounds(timed, args.rounds, device)

    print(
        f"{'implementation':28} {'median ms':>10} {'IQR':>6} {'first':>8} {'speed-up':>9} "
        f"{'GFLOP/s':>8} {'of peak':>8} {'mem MiB':>8} {'x out':>6}"
    )
    add_speedups(rows)
    print_rows(rows)
    phases = {}
    for name, (t1, t2) in phase_times.items():
        phases[name] = {
            "phase1_ms": t1.median_ms,
            "phase1_gflops": phase1 / t1.median_ms / 1e6,
            "phase2_ms": t2.median_ms,
            "phase2_gflops": phase2 / t2.median_ms / 1e6,
        }
        print(
            f"\n{name} phases: phase 1 {t1.median_ms:.1f} ms "
            f"({phases[name]['phase1_gflops']:.0f} GFLOP/s, {phase1 / 1e9:.2f} GFLOP), "
            f"phase 2 {t2.median_ms:.1f} ms "
            f"({phases[name]['phase2_gflops']:.0f} GFLOP/s, {phase2 / 1e9:.2f} GFLOP)"
        )
    print("\nforward+backward")
    add_speedups(bwd_rows)
    print_rows(bwd_rows)
    matmul_flops = 2 * matmul_size**3
    interleaved = {
        "rounds": args.rounds,
        "matmul_gflops_median": statistics.median(matmul_flops / t / 1e9 for t in times["matmul"]),
    }
    print(
        f"\ninterleaved, {args.rounds} rounds (matmul, then each backend once): "
        f"matmul {interleaved['matmul_gflops_median']:.0f} GFLOP/s"
    )
    for key in times:
        if key == "matmul":
            continue
        name, _, direction = key.partition(" ")
        label, flops, _ = (bwd_calls if direction else calls)[name]
        fractions = [
            (flops / t) / (matmul_flops / t_mm) for t, t_mm in zip(times[key], times["matmul"])
        ]
        entry = {
            "median_ms": statistics.median(times[key]) * 1e3,
            "peak_fraction_median": statistics.median(fractions),
        }
        interleaved[f"{label} {direction}".strip()] = entry
        print(
            f"{label + ' ' + direction:40} median {entry['median_ms']:7.1f} ms, "
            f"{entry['peak_fraction_median']:.0%} of the same round's matmul rate"
        )
    if "gpa.cpp fwd+bwd" in times:
        ratios = [b / f for b, f in zip(times["gpa.cpp fwd+bwd"], times["gpa.cpp"])]
        interleaved["gpa.cpp fwd+bwd over fwd median"] = statistics.median(ratios)
        print(
            "gpa.cpp forward+backward / forward, per round: median "
            f"{interleaved['gpa.cpp fwd+bwd over fwd median']:.2f}"
        )
    if args.json:
        context = results.context(device) | {
            "matmul_gflops": peak,
            "matmul_size": matmul_size,
            "dtype": args.dtype,
            "sdpa_backend": args.sdpa_backend,
            "size": n,
            "channels": c,
        }
        with open(args.json, "w") as f:
            json.dump(
                {
                    "context": context,
                    "rows": rows,
                    "fwdbwd_rows": bwd_rows,
                    "phases": phases,
                    "interleaved": interleaved,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
