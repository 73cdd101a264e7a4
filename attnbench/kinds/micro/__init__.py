"""The micro-benchmark kind: time, memory, FLOP rate and fidelity of one attention call.

Its suite model and cases are :mod:`.suite`'s, the measurement of one case :mod:`.measure`'s
(with :mod:`.fidelity`), and the size budget that skips maps not worth measuring
:mod:`.budget`'s.
"""

from __future__ import annotations

from attnbench.kinds.base import Kind, RunOptions, Session, markdown_records, mib
from attnbench.kinds.micro import suite as micro_suite

RELATIVE_ERROR_NOTE = (
    "rel. error: |output - exact| / |exact| against exact attention in fp64. On gaussian inputs "
    "exact attention averages nearly every value, so its output is tiny and a relative error "
    "of 1 or more says little; on warp-copy (values an image, queries its warped copy) the copy "
    "PSNR says how well a method copies (higher is better; full.sdpa's row is exact)."
)


class MicroSession(Session):
    """A run of a micro suite: this run's matmul rate, memory budget and size budget."""

    def __init__(self, suite, options: RunOptions, todo: list) -> None:
        from attnbench.kinds.micro.budget import SizeBudget
        from attnbench.kinds.micro.measure import available_memory
        from attnbench.measure import matmul_gflops
        from attnbench.results import context

        device = options.device
        self.ctx = context(device)
        given = options.min_run_time
        self.run_time = suite.timing.min_run_time if given is None else given
        wants_time = "time" in suite.metrics and todo
        self.peak = matmul_gflops(device=device, min_run_time=self.run_time) if wants_time else None
        self.memory_budget = suite.memory_budget * available_memory(device)
        self.time_budget = suite.timing.time_budget_s
        self.sizes = SizeBudget(self.time_budget, self.peak)

    def describe(self, case) -> str:
        return f"{case.impl} {case.q_hw[0]}x{case.q_hw[1]}"

    def empty_row(self, case) -> dict:
        from attnbench.kinds.micro.measure import empty_row

        return empty_row(case, self.ctx)

    def run(self, case, row: dict) -> None:
        from attnbench import registry
        from attnbench.kinds.micro import measure

        skip = self.sizes.skip_reason(case)
        if skip is not None:
            spec = measure.case_spec(case)
            label = registry.create(case.impl, **case.params_dict).label_for(spec)
            row.update(status="unsupported", reason=skip, label=label)
            return
        args = (self.ctx, self.peak, self.memory_budget, self.run_time, self.time_budget)
        row.update(measure.measure_case(case, *args))

    def finished(self, case, row: dict) -> None:
        self.sizes.remember(case, row)


class MicroKind(Kind):
    name = "micro"
    suite_model = micro_suite.MicroSuite

    def check(self, suite, file: str) -> list[str]:
        return micro_suite.check(suite, file)

    def expand(self, suite, device: str) -> list:
        return micro_suite.expand(suite, device)

    def start(self, suite, options: RunOptions, todo: list) -> Session:
        return MicroSession(suite, options, todo)

    def summary(self, rows: list[dict]) -> str:
        return summary_table(rows)


def summary_table(rows: list[dict]) -> str:
    """A Markdown table of micro rows, one line per case."""
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
    table = markdown_records(records, ".3g")
    if any(r.get("rel_err_out") is not None for r in rows):
        table += "\n\n" + RELATIVE_ERROR_NOTE
    return table


KIND = MicroKind()
