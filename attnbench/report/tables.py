"""Tables from result rows: what each measurement says, per machine, in Markdown and CSV.

Rows are never averaged across machines: every table is split into sections by the context that
measured it (:data:`MACHINE_KEYS`: device, processor or GPU name, thread count, torch version),
and the section heading names it. Within a section, rows are sorted by their content, never by
the order they were written, so the same rows always give byte-identical files.

A method is an implementation with its parameters as the suite gave them (``gpa.torch`` with
``phase1_res=64``) and, for training runs, the generator settings the suite overrode
(``small_attention=none``: the paper's NO); its label in a micro row is resolved for that row's
map (``d=4`` at 256x256, ``d=1`` at 64x64), so curves over map sizes follow the method, and
per-size tables show the label.
"""

from __future__ import annotations

import csv
import io
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from scipy import stats

MACHINE_KEYS = ("device", "device_name", "threads", "torch_version")
FAMILY_ORDER = ("none", "full", "xformers", "gpa", "nystrom", "performer")
BASELINE = "full.sdpa"  # what speed-ups and overtaking sizes are measured against
NO_ATTENTION = "none"  # copies nothing: the other reference of the training runs
SCALING_FIT_MAPS = 3  # the exponent is fitted over each method's largest maps
MIB = 2**20


@dataclass(frozen=True)
class Col:
    """A column: Markdown header (with unit), record key (the CSV header), number format.

    ``std`` names the record key of a spread shown after the value (``0.123 ± 0.004``).
    """

    header: str
    key: str
    fmt: str = ""
    std: str | None = None
    std_fmt: str | None = None  # default: ``fmt``


@dataclass
class Section:
    """One block of a table: a heading, its context (CSV columns), records and notes."""

    heading: str
    context: dict
    records: list[dict]
    notes: list[str] = field(default_factory=list)


@dataclass
class Table:
    """A named table: ``name`` is the file stem under ``tables/``."""

    name: str
    title: str
    about: str
    cols: list[Col]
    sections: list[Section]

    def markdown(self) -> str:
        """Heading, description, then each section as a Markdown table."""
        out = [f"## {self.title}", "", self.about, ""]
        if not self.sections:
            out += ["No rows.", ""]
        for section in self.sections:
            out += [f"### {section.heading}", "", markdown_table(self.cols, section.records), ""]
            out += [f"- {note}" for note in section.notes]
            if section.notes:
                out.append("")
        return "\n".join(out)

    def csv(self) -> str:
        """Every section's records, with its context as leading columns; numbers unrounded."""
        context_keys: list[str] = []
        for section in self.sections:
            context_keys += [k for k in section.context if k not in context_keys]
        keys = [c.key for c in self.cols] + [c.std for c in self.cols if c.std]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(context_keys + keys)
        for section in self.sections:
            for record in section.records:
                context = [section.context.get(k) for k in context_keys]
                writer.writerow([csv_value(v) for v in context + [record.get(k) for k in keys]])
        return buffer.getvalue()


def csv_value(value) -> str:
    """A CSV cell: empty for null, floats to 12 significant digits, plain text otherwise.

    12 digits keep every measured value and drop the last-bit differences that derived values
    (means, fitted exponents) may have between platforms and Python versions.
    """
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(float(f"{value:.12g}"))
    return str(value)


def cell(value, fmt: str) -> str:
    """A Markdown cell: ``-`` for null, numbers by ``fmt``, thousands separated for ints."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and not fmt:
        return f"{value:,}"
    if isinstance(value, (int, float)) and fmt:
        text = format(value, fmt)
        signed_zero = text.startswith(("-", "+")) and not text.strip("+-0.")
        return text[1:] if signed_zero else text  # no "-0.00" nor "+0.00"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(cols: list[Col], records: list[dict]) -> str:
    """A pipe table of ``records``; columns that are null in every record are left out."""
    shown = [c for c in cols if any(r.get(c.key) is not None for r in records)]
    lines = ["| " + " | ".join(c.header for c in shown) + " |"]
    lines.append("|" + "|".join("---" if c.fmt == "" else "--:" for c in shown) + "|")
    for r in records:
        cells = []
        for c in shown:
            text = cell(r.get(c.key), c.fmt)
            if c.std and r.get(c.key) is not None and r.get(c.std) is not None:
                text += " ± " + cell(r[c.std], c.std_fmt or c.fmt)
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- grouping --------------------------------------------------------------------------------


def machine_of(row: dict) -> tuple:
    """The context a row was measured in; rows of different machines are never combined."""
    return tuple(row.get(k) for k in MACHINE_KEYS)


def machine_name(machine: tuple) -> str:
    """``Intel(R) Xeon(R) Processor (cpu), 2 threads, torch 2.14.1``."""
    device, name, threads, torch_version = machine
    threads_text = {1: "1 thread", None: "threads unknown"}.get(threads, f"{threads} threads")
    return f"{name} ({device}), {threads_text}, torch {torch_version}"


def family_rank(impl: str) -> tuple:
    """Sort key: no attention, exact, GPA, then the approximations, then anything else."""
    family = impl.partition(".")[0]
    rank = FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)
    return rank, impl


def method_rank(row: dict) -> tuple:
    """Sort key of a row's method: family, implementation, parameters by value, then generator
    overrides by value."""

    def values(settings: dict) -> tuple:
        return tuple((k, *sort_key((settings[k],))) for k in sorted(settings))

    return family_rank(row["impl"]) + (
        values(row.get("params") or {}),
        values(generator_of(row)),
        row["label"],
    )


def params_text(params: dict) -> str:
    """``phase1_res=64, topk=12`` (sorted; empty for none)."""
    return ", ".join(f"{k}={params[k]}" for k in sorted(params))


def generator_of(row: dict) -> dict:
    """The generator settings a training run's suite overrode (none for other rows)."""
    return row.get("generator") or {}


def method_of(row: dict) -> tuple[str, str, str]:
    """(impl, parameters as given, generator overrides): the identity of a method across map
    sizes and seeds."""
    return row["impl"], params_text(row.get("params") or {}), params_text(generator_of(row))


def method_label(impl: str, params: dict) -> str:
    """The label of a method not resolved for any map (``gpa.torch(res=64,s=2,k=12)``).

    Falls back to ``impl(k=v, ...)`` when the implementation cannot be created here (a plugin
    that is not installed on the machine that makes the report).
    """
    from attnbench import registry

    try:
        return registry.create(impl, **params).label
    except Exception:  # noqa: BLE001 - any failure means: not creatable here
        return f"{impl}({params_text(params)})" if params else impl


def by_method(rows: Iterable[dict]) -> dict[tuple, list[dict]]:
    """Rows by method (implementation and parameters as given)."""
    methods: dict[tuple, list] = defaultdict(list)
    for row in rows:
        methods[method_of(row)].append(row)
    return methods


def partition(rows: Iterable[dict], key: Callable[[dict], tuple]) -> list[tuple[tuple, list]]:
    """Rows split by ``key``, in sorted key order (None sorts first)."""
    parts: dict[tuple, list] = defaultdict(list)
    for row in rows:
        parts[key(row)].append(row)
    return sorted(parts.items(), key=lambda kv: sort_key(kv[0]))


def sort_key(values: tuple) -> tuple:
    """A key that sorts tuples mixing None, numbers, strings and nested tuples."""
    return tuple(
        (True, "tuple", sort_key(v))
        if isinstance(v, tuple)
        else (v is not None, str(type(v).__name__), v if v is not None else 0)
        for v in values
    )


def mean_std(values: list) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the non-null values (std None below two)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else None


def mib(value) -> float | None:
    """Bytes as MiB."""
    return None if value is None else value / MIB


def map_text(row: dict) -> str:
    """``256x256``, or ``q 64x64, kv 32x32`` for cross-attention between maps of other sizes."""
    q = f"{row['q_h']}x{row['q_w']}"
    if (row["kv_h"], row["kv_w"]) == (row["q_h"], row["q_w"]):
        return q
    return f"q {q}, kv {row['kv_h']}x{row['kv_w']}"


def tokens(row: dict) -> int:
    """Query tokens of a micro row."""
    return row["q_h"] * row["q_w"]


def shape_key(row: dict) -> tuple:
    """Everything that makes two micro rows the same inputs apart from the method."""
    return (
        tokens(row),
        row["q_h"],
        row["q_w"],
        row["kv_h"],
        row["kv_w"],
        row["channels"],
        row.get("v_channels"),
        row["batch"],
        row["heads"],
        row.get("inputs"),
        row.get("sharpness"),
    )


def micro_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("kind") == "micro"]


def train_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("kind") == "train"]


def timed(row: dict, keys=("time_fwd_ms", "mem_fwd_bytes")) -> bool:
    """An ok row with any of ``keys`` measured."""
    return row["status"] == "ok" and any(row.get(k) is not None for k in keys)


TIMED_KEYS = ("time_fwd_ms", "mem_fwd_bytes", "time_fwdbwd_ms", "mem_fwdbwd_bytes")


# --- micro ------------------------------------------------------------------------------------

CASE_COLS = [  # what a micro row measured; Cv only where it differs from C
    Col("implementation", "label"),
    Col("map", "map"),
    Col("C", "channels", "d"),
    Col("Cv", "v_channels", "d"),
    Col("B x H", "batch_heads"),
]
MICRO_COLS = [
    *CASE_COLS,
    Col("inputs", "inputs"),
    Col("fwd ms", "time_fwd_ms", ".4g", std="time_fwd_iqr_ms", std_fmt=".2g"),
    Col("fwd+bwd ms", "time_fwdbwd_ms", ".4g", std="time_fwdbwd_iqr_ms", std_fmt=".2g"),
    Col("fwd MiB", "mem_fwd_mib", ".4g"),
    Col("fwd+bwd MiB", "mem_fwdbwd_mib", ".4g"),
    Col("GFLOP/s (fwd)", "gflops_fwd", ".4g"),
    Col("% of matmul peak", "peak_percent", ".1f"),
    Col(f"fwd speed-up vs {BASELINE} (x)", "speedup_fwd", ".3g"),
    Col(f"fwd+bwd speed-up vs {BASELINE} (x)", "speedup_fwdbwd", ".3g"),
]


def micro_table(rows: list[dict]) -> Table:
    """Time, memory and FLOP rate per case, with the speed-up over the exact baseline."""
    sections = []
    ok = [r for r in micro_rows(rows) if timed(r, TIMED_KEYS)]
    for (machine, suite, dtype), part in partition(
        ok, lambda r: (machine_of(r), r["suite"], r["dtype"])
    ):
        baseline = {shape_key(r): r for r in part if r["impl"] == BASELINE}
        records = []
        for r in sorted(part, key=lambda r: sort_key(shape_key(r)) + method_rank(r)):
            base = baseline.get(shape_key(r), {})
            fraction = r.get("peak_fraction")
            records.append(
                {
                    **case_record(r),
                    "inputs": other_than(r.get("inputs"), "gaussian"),
                    "time_fwd_ms": r.get("time_fwd_ms"),
                    "time_fwd_iqr_ms": r.get("time_fwd_iqr_ms"),
                    "time_fwdbwd_ms": r.get("time_fwdbwd_ms"),
                    "time_fwdbwd_iqr_ms": r.get("time_fwdbwd_iqr_ms"),
                    "mem_fwd_mib": mib(r.get("mem_fwd_bytes")),
                    "mem_fwdbwd_mib": mib(r.get("mem_fwdbwd_bytes")),
                    "gflops_fwd": r.get("gflops_fwd"),
                    "peak_percent": None if fraction is None else 100 * fraction,
                    "speedup_fwd": ratio(base.get("time_fwd_ms"), r.get("time_fwd_ms")),
                    "speedup_fwdbwd": ratio(base.get("time_fwdbwd_ms"), r.get("time_fwdbwd_ms")),
                }
            )
        sections.append(
            Section(
                f"{suite} — {machine_name(machine)}, {dtype}",
                {"machine": machine_name(machine), "suite": suite, "dtype": dtype},
                records,
            )
        )
    return Table(
        "micro",
        "Time and memory per case",
        "Median time (± interquartile range) forward and forward+backward, peak memory above the "
        "inputs, useful GFLOP/s of the forward and its share of this machine's dense fp32 matmul "
        f"rate (percent), and the speed-up over `{BASELINE}` on the same inputs.",
        MICRO_COLS,
        sections,
    )


def case_record(row: dict) -> dict:
    """The :data:`CASE_COLS` of a micro row."""
    return {
        "label": row["label"],
        "map": map_text(row),
        "channels": row["channels"],
        "v_channels": other_than(row.get("v_channels"), row["channels"]),
        "batch_heads": f"{row['batch']} x {row['heads']}",
    }


def other_than(value, usual):
    """``value``, or None (a column left out) where it is the usual one."""
    return None if value == usual else value


def ratio(numerator, denominator) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


# --- scaling ----------------------------------------------------------------------------------

SCALING_COLS = [
    Col("implementation", "method"),
    Col("maps measured", "maps"),
    Col("time exponent", "time_exponent", ".2f"),
    Col("memory exponent", "memory_exponent", ".2f"),
    Col(f"faster than {BASELINE} from", "time_overtakes"),
    Col(f"less memory than {BASELINE} from", "memory_overtakes"),
]


def fit_exponent(points: list[tuple[int, float]]) -> float | None:
    """Slope of log(value) against log(tokens) over the largest :data:`SCALING_FIT_MAPS` maps."""
    points = sorted((n, v) for n, v in points if v is not None and v > 0)[-SCALING_FIT_MAPS:]
    if len(points) < 2:
        return None
    x = [math.log(n) for n, _ in points]
    y = [math.log(v) for _, v in points]
    return statistics.linear_regression(x, y).slope


def overtakes(mine: dict[int, float], base: dict[int, float], maps: dict[int, str]) -> str | None:
    """The smallest size from which ``mine`` is below ``base`` at every larger common size."""
    common = sorted(n for n in mine if n in base and mine[n] is not None and base[n] is not None)
    if not common:
        return None
    below = [mine[n] < base[n] for n in common]
    if not below[-1]:
        return f"not up to {common[-1]:,} tokens"
    first = len(below)
    while first > 0 and below[first - 1]:
        first -= 1
    n = common[first]
    prefix = "<= " if first == 0 else ""
    return f"{prefix}{n:,} tokens ({maps[n]})"


def series_key(row: dict) -> tuple:
    """What the points of one curve over map sizes share: all but the map itself."""
    self_attention = (row["kv_h"], row["kv_w"]) == (row["q_h"], row["q_w"])
    return (
        machine_of(row),
        row["suite"],
        row["dtype"],
        row["channels"],
        row.get("v_channels", row["channels"]),
        row["batch"],
        row["heads"],
        row.get("inputs"),
        self_attention,
    )


def series_heading(key: tuple) -> str:
    """``micro, C = 64, B x H = 1 x 1, gaussian inputs — <machine>, float32``."""
    machine, suite, dtype, c, cv, batch, heads, inputs, self_attention = key
    parts = [suite, f"C = {c}" + (f", Cv = {cv}" if cv != c else ""), f"B x H = {batch} x {heads}"]
    parts += [f"{inputs} inputs"] if inputs else []
    parts += [] if self_attention else ["cross-attention"]
    return f"{', '.join(parts)} — {machine_name(machine)}, {dtype}"


def scaling_table(rows: list[dict]) -> Table:
    """Fitted exponents of time and memory against tokens, and where each method overtakes."""
    sections = []
    ok = [r for r in micro_rows(rows) if timed(r)]
    for key, part in partition(ok, series_key):
        methods = sorted(by_method(part).values(), key=lambda rs: method_rank(rs[0]))

        def series(rs: list[dict], name: str) -> dict[int, float]:
            return {tokens(r): r[name] for r in rs if r.get(name) is not None}

        base = next((rs for rs in methods if rs[0]["impl"] == BASELINE), [])
        records = []
        for rs in methods:
            sizes = sorted(series(rs, "time_fwd_ms"))
            if len(sizes) < 3:
                continue
            maps = {tokens(r): map_text(r) for r in rs}
            is_base = rs is base
            records.append(
                {
                    "method": method_label(rs[0]["impl"], rs[0].get("params") or {}),
                    "maps": f"{len(sizes)}: {maps[sizes[0]]} to {maps[sizes[-1]]}",
                    "time_exponent": fit_exponent(list(series(rs, "time_fwd_ms").items())),
                    "memory_exponent": fit_exponent(list(series(rs, "mem_fwd_bytes").items())),
                    "time_overtakes": None
                    if is_base
                    else overtakes(series(rs, "time_fwd_ms"), series(base, "time_fwd_ms"), maps),
                    "memory_overtakes": None
                    if is_base
                    else overtakes(
                        series(rs, "mem_fwd_bytes"), series(base, "mem_fwd_bytes"), maps
                    ),
                }
            )
        if not records:
            continue
        machine, suite, dtype, c, cv, batch, heads, inputs, self_attention = key
        context = {"machine": machine_name(machine), "suite": suite, "dtype": dtype}
        context |= {"channels": c, "v_channels": cv, "batch": batch, "heads": heads}
        context |= {"inputs": inputs, "self_attention": self_attention}
        sections.append(Section(series_heading(key), context, records))
    return Table(
        "scaling",
        "Scaling with the number of tokens",
        "Exponent p of time ∝ tokens^p and memory ∝ tokens^p (forward; least squares in log-log "
        f"over each method's largest {SCALING_FIT_MAPS} maps; exact attention is 2, linear "
        f"methods 1), and the smallest map from which a method stays faster than, or needs less "
        f"memory than, `{BASELINE}` at every larger map both measured. Methods with fewer than "
        "three measured maps are left out.",
        SCALING_COLS,
        sections,
    )


# --- fidelity ---------------------------------------------------------------------------------

ERROR_COLS = [
    Col("relative error (output)", "rel_err_out", ".3g"),
    Col("relative error (input gradients)", "rel_err_grad", ".3g"),
    Col("copy PSNR dB", "copy_psnr", ".2f"),
]
SHARPNESS_COL = Col("sharpness", "sharpness", "g")  # warp-match's s; left out elsewhere
FIDELITY_COLS = [*CASE_COLS, SHARPNESS_COL, *ERROR_COLS]


def scored_rows(rows: list[dict]) -> list[dict]:
    """The ok micro rows with an error against exact attention."""
    return [r for r in micro_rows(rows) if r["status"] == "ok" and r.get("rel_err_out") is not None]


def fidelity_table(rows: list[dict]) -> Table:
    """Relative error against exact attention, and copy PSNR, per input family."""
    sections = []
    scored = scored_rows(rows)
    for (machine, suite, dtype, inputs), part in partition(
        scored, lambda r: (machine_of(r), r["suite"], r["dtype"], r.get("inputs"))
    ):
        part = sorted(part, key=lambda r: sort_key(shape_key(r)) + method_rank(r))
        records = [
            {
                **case_record(r),
                "sharpness": r.get("sharpness"),
                "rel_err_out": r.get("rel_err_out"),
                "rel_err_grad": r.get("rel_err_grad"),
                "copy_psnr": r.get("copy_psnr"),
            }
            for r in part
        ]
        sections.append(
            Section(
                f"{suite}, {inputs} inputs — {machine_name(machine)}, {dtype}",
                {
                    "machine": machine_name(machine),
                    "suite": suite,
                    "dtype": dtype,
                    "inputs": inputs,
                },
                records,
            )
        )
    return Table(
        "fidelity",
        "Fidelity to exact attention",
        "Relative L2 error of the output and of the input gradients against exact attention in "
        "float64, per input family: gaussian (no spatial structure), smooth (correlated fields), "
        "warp-copy (queries from an affinely warped image must find its pixels; copy PSNR of the "
        "output against the truly warped image, in dB), warp-match (the same copy with scores "
        "ranked by feature distance, sharper as the sharpness s grows: exact attention copies "
        "at about 22 dB at s = 1 and at 30 dB or more at s = 4). The error can exceed 1: on inputs "
        "without structure exact attention averages nearly all values to a small output, while "
        "a method that keeps a few keys returns a larger one.",
        FIDELITY_COLS,
        sections,
    )


# --- training ---------------------------------------------------------------------------------

TRAIN_COLS = [
    Col("implementation", "label"),
    Col("runs ok", "runs"),
    Col("test L1", "test_l1", ".4f", std="test_l1_std"),
    Col("SSIM", "ssim", ".4f", std="ssim_std"),
    Col("PSNR dB", "psnr", ".2f", std="psnr_std"),
    Col("LPIPS", "lpips", ".4f", std="lpips_std"),
    Col("FID", "fid", ".2f", std="fid_std"),
    Col("hit rate r=1", "hit_r1", ".3f", std="hit_r1_std"),
    Col("hit rate r=2", "hit_r2", ".3f", std="hit_r2_std"),
    Col("steps done", "steps_done", ".0f"),
    Col("training s", "train_s", ".0f"),
    Col("attention MiB", "attn_mib", ".3g"),
    Col("step ms", "step_ms", ".4g"),
    Col("parameters", "n_params"),
]
COMPARISON_COLS = [
    Col(f"PSNR − {NO_ATTENTION} dB", "psnr_vs_none", "+.2f"),
    Col(f"p (PSNR vs {NO_ATTENTION})", "psnr_p_vs_none", ".2g"),
    Col(f"PSNR − {BASELINE} dB", "psnr_vs_full", "+.2f"),
    Col(f"p (PSNR vs {BASELINE})", "psnr_p_vs_full", ".2g"),
    Col(f"hit r=1 − {NO_ATTENTION}", "hit_r1_vs_none", "+.3f"),
    Col(f"p (hit r=1 vs {NO_ATTENTION})", "hit_r1_p_vs_none", ".2g"),
    Col(f"hit r=1 − {BASELINE}", "hit_r1_vs_full", "+.3f"),
    Col(f"p (hit r=1 vs {BASELINE})", "hit_r1_p_vs_full", ".2g"),
]
COPYING_COLS = TRAIN_COLS + COMPARISON_COLS
HIT_RATES = {"hit_r1": "largest", "hit_r2": "largest_r2"}  # record key: key in copy_hit_rate
TRAIN_METRICS = ("test_l1", "ssim", "psnr", "lpips", "fid", *HIT_RATES)
TESTED_METRICS = ("psnr", "hit_r1")  # compared with each reference by Welch's t-test
REFERENCES = {NO_ATTENTION: "none", BASELINE: "full"}  # implementation: its name in record keys
REASON_SPLIT = re.compile(r";\s+(?=\w+: )")  # "lpips: ...; fid: ..." -> one reason per metric


def metric(row: dict, key: str) -> float | None:
    """A run's value of a :data:`TRAIN_METRICS` key; the hit rates are those of the largest
    decoder level in its ``copy_hit_rate`` (None in failed runs and in rows written before the
    hit rate was measured)."""
    if key in HIT_RATES:
        return (row.get("copy_hit_rate") or {}).get(HIT_RATES[key])
    return row.get(key)


def train_record(label: str, runs: list[dict]) -> dict:
    """Mean ± std over the ok runs (seeds) of one method."""
    ok = [r for r in runs if r["status"] == "ok"]
    record: dict = {"label": label, "runs": f"{len(ok)}/{len(runs)}"}
    for key in TRAIN_METRICS:
        record[key], record[f"{key}_std"] = mean_std([metric(r, key) for r in ok])
    record["steps_done"] = mean_std([r.get("steps") for r in ok])[0]
    record["train_s"] = mean_std([r.get("train_time_s") for r in ok])[0]
    record["attn_mib"] = mib(mean_std([r.get("attn_mem_bytes") for r in ok])[0])
    step = mean_std([r.get("step_time_s") for r in ok])[0]
    record["step_ms"] = None if step is None else 1000 * step
    params = sorted({r.get("n_params") for r in ok if r.get("n_params") is not None})
    record["n_params"] = params[0] if len(params) == 1 else None
    return record


def welch(values: list, reference: list) -> tuple[float | None, float | None]:
    """Difference of the means of the non-null ``values`` and ``reference``, and the p-value of
    Welch's t-test (unequal variances) that the two means are equal.

    The p-value is None with fewer than two values on either side, or without spread on both.
    """
    values = [v for v in values if v is not None]
    reference = [v for v in reference if v is not None]
    if not values or not reference:
        return None, None
    difference = statistics.fmean(values) - statistics.fmean(reference)
    if min(len(values), len(reference)) < 2 or len(set(values)) == len(set(reference)) == 1:
        return difference, None  # the test needs two values a side, and spread on one
    return difference, float(stats.ttest_ind(values, reference, equal_var=False).pvalue)


def comparisons(runs: list[dict], references: dict[str, list[dict]]) -> dict:
    """:data:`TESTED_METRICS` of one method's ok runs against each reference's (:func:`welch`);
    empty for a reference itself and where the reference has no runs."""

    def values(rs: list[dict], key: str) -> list:
        return [metric(r, key) for r in rs if r["status"] == "ok"]

    record = {}
    for impl, reference in references.items():
        itself = bool(reference) and method_of(reference[0]) == method_of(runs[0])
        name = REFERENCES[impl]
        for key in TESTED_METRICS:
            difference, p = (
                (None, None) if itself else welch(values(runs, key), values(reference, key))
            )
            record[f"{key}_vs_{name}"], record[f"{key}_p_vs_{name}"] = difference, p
    return record


def shared_generator(part: list[dict]) -> dict:
    """The generator overrides every run of a training section has (named in its heading)."""
    if not part:
        return {}
    first, *others = map(generator_of, part)
    return {k: v for k, v in first.items() if all(k in o and o[k] == v for o in others)}


def own_generator(row: dict, shared: dict) -> dict:
    """A run's generator overrides beyond those its section shares."""
    return {k: v for k, v in generator_of(row).items() if k not in shared}


def train_label(row: dict, shared: dict) -> str:
    """The label of a training run's method: its implementation's, followed by its own
    generator overrides (``none (no copying at any level)``: the paper's NO)."""
    own = own_generator(row, shared)
    notes = []
    if row["impl"] == NO_ATTENTION and own.get("small_attention") == NO_ATTENTION:
        del own["small_attention"]
        notes.append("no copying at any level")
    if own:
        notes.append(params_text(own))
    return f"{row['label']} ({', '.join(notes)})" if notes else row["label"]


def train_methods(part: list[dict]) -> list[tuple[str, list[dict]]]:
    """The methods of a training section in report order, each with its label and runs."""
    shared = shared_generator(part)
    methods = sorted(by_method(part).values(), key=lambda runs: method_rank(runs[0]))
    return [(train_label(runs[0], shared), runs) for runs in methods]


def reference_runs(part: list[dict]) -> dict[str, list[dict]]:
    """The runs of each of :data:`REFERENCES` in a training section, without parameters or
    generator overrides of their own: what its methods are compared with."""
    methods = by_method(part)
    shared = params_text(shared_generator(part))
    return {impl: methods.get((impl, "", shared), []) for impl in REFERENCES}


def train_heading(suite: str, part: list[dict], machine: tuple) -> tuple[str, dict]:
    """Heading and CSV context of a training section: steps as the finished runs were given
    them (``max_steps``; ``steps`` in rows written before runs could stop early), the time
    budget, and the generator overrides every run shares."""
    first = part[0]
    ok = [r for r in part if r["status"] == "ok" and r.get("steps")]
    steps = sorted({r.get("max_steps") or r["steps"] for r in ok})
    budgets = sorted({r["budget_minutes"] for r in part if r.get("budget_minutes")})
    context = {
        "machine": machine_name(machine),
        "suite": suite,
        "task": first.get("task"),
        "preset": first.get("preset"),
        "steps": "/".join(map(str, steps)) or None,
        "budget_minutes": "/".join(f"{m:g}" for m in budgets) or None,
        "batch": first.get("batch"),
        "generator": params_text(shared_generator(part)) or None,
    }
    budget = f" or {context['budget_minutes']} min of training" if budgets else ""
    generator = f", generator {context['generator']}" if context["generator"] else ""
    heading = (
        f"{suite}: {context['task']} task, preset {context['preset']}, {context['steps']} steps"
        f"{budget}, batch {context['batch']}{generator} — {machine_name(machine)}"
    )
    return heading, context


def train_key(row: dict) -> tuple:
    """What makes training runs comparable. Not ``steps``: a failed run records where it
    stopped (or nothing), and must stay in its method's section."""
    return (machine_of(row), row["suite"], row.get("task"), row.get("preset"), row.get("batch"))


def reasons_of(runs: list[dict]) -> list[str]:
    """The distinct reasons attached to ok runs (metrics that could not be computed)."""
    reasons = set()
    for r in runs:
        if r["status"] == "ok" and r.get("reason"):
            reasons.update(part.strip() for part in REASON_SPLIT.split(r["reason"]))
    return sorted(reasons)


def copying_table(rows: list[dict]) -> Table:
    """Held-out metrics and copy hit rates as mean ± std over seeds, their differences from
    ``none`` and ``full.sdpa`` with Welch's t-test, steps, time and memory."""
    sections = []
    for key, part in partition(train_rows(rows), train_key):
        references = reference_runs(part)
        records = [
            train_record(label, runs) | comparisons(runs, references)
            for label, runs in train_methods(part)
        ]
        heading, context = train_heading(key[1], part, key[0])
        sections.append(Section(heading, context, records, notes=reasons_of(part)))
    return Table(
        "copying",
        "Training: copying through attention",
        "Held-out metrics after training, mean ± sample standard deviation over seeds (runs "
        "that diverged or failed are counted in 'runs ok' and left out of the means). The copy "
        "hit rate is the share of the largest decoder level's attention mass within 1 (r=1) or "
        "2 pixels (r=2) of each query's true source. Steps done and training time (the sum of "
        "the steps) are means over seeds: a run with a time budget may stop before its steps. "
        "Attention memory is the peak of the attention blocks alone at batch 1; step time is "
        "the mean over seeds of each run's median training step. The last columns compare PSNR "
        f"and the hit rate at r=1 with `{NO_ATTENTION}` and `{BASELINE}`: the difference of the "
        "means and the p-value of Welch's t-test (unequal variances; empty with fewer than two "
        "seeds on either side, or no spread on both). A method with its own generator overrides "
        f"(such as `{NO_ATTENTION} (no copying at any level)`, the paper's NO) is a method of its "
        "own.",
        COPYING_COLS,
        sections,
    )


# --- κ ablation -------------------------------------------------------------------------------


def topk_of(row: dict) -> int | None:
    """κ of a GPA row: its ``topk`` parameter, or the implementation's default."""
    params = row.get("params") or {}
    if "topk" in params:
        return params["topk"]
    from attnbench import registry

    try:
        return registry.get(row["impl"]).PARAMS["topk"].default
    except (KeyError, AttributeError, ValueError):  # not installed here, or no κ parameter
        return None


def kappa_groups(rows: list[dict]) -> list[tuple[tuple, list]]:
    """GPA rows by everything but κ (other parameters, and generator overrides beyond those
    all share); only groups with at least two values of κ."""
    gpa = [r for r in rows if r["impl"].startswith("gpa.") and topk_of(r) is not None]
    shared = shared_generator(gpa)

    def rest(r: dict) -> str:
        fixed = {k: v for k, v in (r.get("params") or {}).items() if k != "topk"}
        return params_text(fixed | own_generator(r, shared))

    groups = partition(gpa, lambda r: (r["impl"], rest(r)))
    return [(key, part) for key, part in groups if len({topk_of(r) for r in part}) >= 2]


KAPPA_TRAIN_COLS = [Col("κ", "topk", "d")] + [
    c for c in TRAIN_COLS if c.key not in ("label", "n_params")
]
KAPPA_FIDELITY_COLS = [
    Col("κ", "topk", "d"),
    Col("implementation", "label"),
    Col("map", "map"),
    SHARPNESS_COL,
    *ERROR_COLS,
]


def kappa_training_table(rows: list[dict]) -> Table:
    """The paper's κ ablation (Fig. 7a) on the training task: metrics against κ."""
    sections = []
    for key, part in partition(train_rows(rows), train_key):
        for (impl, rest), group in kappa_groups(part):
            records = []
            for topk, runs in partition(group, lambda r: (topk_of(r),)):
                records.append({"topk": topk[0], **train_record(runs[0]["label"], runs)})
            heading, context = train_heading(key[1], part, key[0])
            context |= {"impl": impl, "fixed": rest}
            fixed = f" ({rest})" if rest else ""
            sections.append(Section(f"{impl}{fixed}, {heading}", context, records))
    return Table(
        "kappa-copying",
        "κ ablation: training",
        "Held-out metrics of GPA against κ, the key blocks kept per query cell, with everything "
        "else fixed (mean ± std over seeds; the paper's Fig. 7a).",
        KAPPA_TRAIN_COLS,
        sections,
    )


def kappa_fidelity_table(rows: list[dict]) -> Table:
    """Fidelity to exact attention against κ, per input family and map."""
    sections = []
    scored = scored_rows(rows)
    for (machine, suite, dtype, inputs), part in partition(
        scored, lambda r: (machine_of(r), r["suite"], r["dtype"], r.get("inputs"))
    ):
        for (impl, rest), group in kappa_groups(part):
            group = sorted(group, key=lambda r: sort_key(shape_key(r)) + (topk_of(r),))
            records = [
                {
                    "topk": topk_of(r),
                    "label": r["label"],
                    "map": map_text(r),
                    "sharpness": r.get("sharpness"),
                    "rel_err_out": r.get("rel_err_out"),
                    "rel_err_grad": r.get("rel_err_grad"),
                    "copy_psnr": r.get("copy_psnr"),
                }
                for r in group
            ]
            fixed = f" ({rest})" if rest else ""
            sections.append(
                Section(
                    f"{impl}{fixed}, {suite}, {inputs} inputs — {machine_name(machine)}, {dtype}",
                    {
                        "machine": machine_name(machine),
                        "suite": suite,
                        "dtype": dtype,
                        "inputs": inputs,
                        "impl": impl,
                        "fixed": rest,
                    },
                    records,
                )
            )
    return Table(
        "kappa-fidelity",
        "κ ablation: fidelity",
        "Relative error of GPA against exact attention as κ grows, everything else fixed.",
        KAPPA_FIDELITY_COLS,
        sections,
    )


# --- not run ----------------------------------------------------------------------------------

NOT_RUN_COLS = [
    Col("suite", "suite"),
    Col("implementation", "label"),
    Col("case", "case"),
    Col("status", "status"),
    Col("reason", "reason"),
]


def case_text(row: dict) -> str:
    """What a row measured, in a few words."""
    if row.get("kind") == "train":
        return f"seed {row.get('seed')}"
    parts = [map_text(row), f"C={row['channels']}"]
    if row.get("inputs"):
        parts.append(str(row["inputs"]))
    if row.get("sharpness") is not None:
        parts.append(f"sharpness {row['sharpness']:g}")
    return ", ".join(parts)


def not_run_table(rows: list[dict]) -> Table:
    """Every row whose status is not ok, with its reason."""
    sections = []
    failed = [r for r in rows if r["status"] != "ok"]
    for (machine,), part in partition(failed, lambda r: (machine_of(r),)):
        part = sorted(
            part,
            key=lambda r: (
                (r["suite"], r["status"])
                + family_rank(r["impl"])
                + (r["label"],)
                + sort_key(shape_key(r) if r.get("kind") == "micro" else (r.get("seed"),))
            ),
        )
        records = [
            {
                "suite": r["suite"],
                "label": r["label"],
                "case": case_text(r),
                "status": r["status"],
                "reason": r.get("reason"),
            }
            for r in part
        ]
        sections.append(Section(machine_name(machine), {"machine": machine_name(machine)}, records))
    return Table(
        "not-run",
        "Not run",
        "Every case whose status is not ok (unsupported, oom, error, diverged), with its reason.",
        NOT_RUN_COLS,
        sections,
    )


TABLES: tuple[Callable[[list[dict]], Table], ...] = (
    micro_table,
    scaling_table,
    fidelity_table,
    copying_table,
    kappa_training_table,
    kappa_fidelity_table,
    not_run_table,
)


def all_tables(rows: list[dict]) -> list[Table]:
    """Every table, in report order."""
    return [make(rows) for make in TABLES]
