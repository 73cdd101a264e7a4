"""Tables from the result frame (:func:`attnbench.results.load`), per machine, in Markdown and CSV.

Rows are never averaged across machines: every table is split into sections by the ``machine``
column (device, processor or GPU name, thread count, torch version), and the section heading
names it. Within a section, rows are sorted by their content, never by the order they were
written, so the same rows always give byte-identical files.

A method is an implementation with its parameters as the suite gave them (``gpa.torch`` with
``phase1_res=64``) and, for training runs, the generator settings the suite overrode
(``small_attention=none``: the paper's NO); its label in a micro row is resolved for that row's
map (``d=4`` at 256x256, ``d=1`` at 64x64), so curves over map sizes follow the method, and
per-size tables show the label.

Each table is a function of the frame listed in :data:`TABLES`. A table of a new kind of row is
one such function: select the rows, group them into :class:`Section` s with
:meth:`pandas.DataFrame.groupby`, and aggregate the records with :func:`seed_stats` or pandas.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pandas as pd
from scipy import stats
from tabulate import DataRow, TableFormat

from attnbench.results import frame
from attnbench.schema import REPORT_COLUMNS

FAMILY_ORDER = ("none", "full", "xformers", "gpa", "nystrom", "performer")
BASELINE = "full.sdpa"  # what speed-ups and overtaking sizes are measured against
NO_ATTENTION = "none"  # copies nothing: the other reference of the training runs
SCALING_FIT_MAPS = 3  # the exponent is fitted over each method's largest maps
MIB = 2**20
METHOD = ["impl", "params_text", "generator_text"]  # a method across map sizes and seeds
SHAPE = [  # what makes two micro rows the same inputs apart from the method
    "tokens", "q_h", "q_w", "kv_h", "kv_w", "channels", "v_channels", "batch", "heads",
    "inputs", "sharpness",
]  # fmt: skip
TRAIN_KEY = ["machine", "suite", "task", "preset", "batch"]  # what makes training runs comparable
groups = partial(pd.DataFrame.groupby, observed=True, dropna=False)


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
    records: pd.DataFrame
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
        """Every section's records, with its context as leading columns; floats to 12
        significant digits (every measured value, without the last-bit differences that
        derived values may have between platforms)."""
        context = list(dict.fromkeys(k for s in self.sections for k in s.context))
        keys = [c.key for c in self.cols] + [c.std for c in self.cols if c.std]
        parts = [s.records.assign(**{k: [v] * len(s.records) for k, v in s.context.items()})
                 for s in self.sections]  # fmt: skip
        table = pd.concat(parts) if parts else pd.DataFrame()
        return table.reindex(columns=context + keys).to_csv(
            index=False, lineterminator="\n", float_format=lambda v: repr(float(f"{v:.12g}"))
        )


def cell(value, fmt: str) -> str:
    """A Markdown cell: ``-`` for null, numbers by ``fmt``, thousands separated for ints."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)) and not fmt:
        return f"{value:,}"
    if isinstance(value, (int, float, np.number)) and fmt:
        text = format(value, fmt)
        signed_zero = text.startswith(("-", "+")) and not text.strip("+-0.")
        return text[1:] if signed_zero else text  # no "-0.00" nor "+0.00"
    return str(value).replace("|", "\\|").replace("\n", " ")


def pipe_format(numeric: list[bool]) -> TableFormat:
    """Markdown pipe tables without padding, numbers right-aligned (``--:``)."""
    rule = "|" + "|".join("--:" if n else "---" for n in numeric) + "|"
    row = DataRow("|", "|", "|")
    return TableFormat(None, lambda *_: rule, None, None, row, row, 1, None)


def markdown_table(cols: list[Col], records: pd.DataFrame) -> str:
    """A pipe table of ``records``; columns that are null in every record are left out."""
    shown = [c for c in cols if c.key in records and records[c.key].notna().any()]
    cells = pd.DataFrame(index=records.index)
    for c in shown:
        text = records[c.key].map(partial(cell, fmt=c.fmt), na_action=None)
        if c.std and c.std in records:
            spread = records[c.std].map(partial(cell, fmt=c.std_fmt or c.fmt))
            text = text.where(records[c.std].isna() | records[c.key].isna(), text + " ± " + spread)
        cells[c.header] = text
    return cells.to_markdown(
        index=False,
        tablefmt=pipe_format([c.fmt != "" for c in shown]),
        colalign=[None] * len(shown),
        disable_numparse=True,
    )


# --- methods and rows -------------------------------------------------------------------------


def present(value) -> bool:
    return not (value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)))


def params_text(params: Mapping) -> str:
    """``phase1_res=64, topk=12`` (sorted; empty for none)."""
    return ", ".join(f"{k}={params[k]}" for k in sorted(params))


def family_rank(impl: str) -> int:
    """No attention, exact, GPA, then the approximations, then anything else."""
    family = impl.partition(".")[0]
    return FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)


def method_rank(row) -> tuple:
    """Sort key of a row's method: family, implementation, parameters by value, then generator
    overrides by value."""

    def values(settings: dict) -> tuple:
        return tuple((k, type(v).__name__, tuple(v) if isinstance(v, list) else v)
                     for k, v in sorted(settings.items()))  # fmt: skip

    return (row.family, row.impl, values(row.params), values(row.generator), row.label)


def prepare(rows: pd.DataFrame) -> pd.DataFrame:
    """The frame with what the tables and plots derive from each row: ``params`` (as a dict),
    ``params_text``, ``generator`` and ``generator_text``, ``family``, ``order`` (the method's
    rank in report order), ``map`` and ``tokens`` of micro rows, ``hit_r1`` and ``hit_r2``.

    Accepts rows as dicts too; a frame already prepared is returned as it is.
    """
    if not isinstance(rows, pd.DataFrame):
        rows = frame(list(rows))
    if "order" in rows:
        return rows
    df = rows.reindex(columns=list(dict.fromkeys([*rows.columns, *REPORT_COLUMNS])))
    names = [c for c in df if c.startswith("params.")]
    df["params"] = [
        {k.removeprefix("params."): v for k, v in zip(names, values) if present(v)}
        for values in df[names].astype(object).itertuples(index=False)
    ]
    df["generator"] = [g if isinstance(g, dict) else {} for g in df["generator"]]
    df["params_text"] = df["params"].map(params_text)
    df["generator_text"] = df["generator"].map(params_text)
    df["family"] = df["impl"].map(family_rank)
    ranks = [method_rank(r) for r in df.itertuples()]
    df["order"] = pd.Series(ranks, index=df.index, dtype=object).map(
        {rank: i for i, rank in enumerate(sorted(set(ranks)))}
    )
    df["tokens"] = df["q_h"] * df["q_w"]
    df["map"] = (df["q_h"].astype(str) + "x" + df["q_w"].astype(str)).where(
        ((df["kv_h"] == df["q_h"]) & (df["kv_w"] == df["q_w"])).fillna(False).astype(bool),
        "q " + df["q_h"].astype(str) + "x" + df["q_w"].astype(str)
        + ", kv " + df["kv_h"].astype(str) + "x" + df["kv_w"].astype(str),
    )  # fmt: skip
    for name, level in HIT_RATES.items():
        df[name] = [h.get(level) if isinstance(h, dict) else None for h in df["copy_hit_rate"]]
        df[name] = df[name].astype(float)
    return df


def micro_rows(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["kind"] == "micro"]


def train_rows(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["kind"] == "train"]


def timed(rows: pd.DataFrame, keys=("time_fwd_ms", "mem_fwd_bytes")) -> pd.DataFrame:
    """The ok rows with any of ``keys`` measured."""
    return rows[(rows["status"] == "ok") & rows[list(keys)].notna().any(axis=1)]


def by_shape(rows: pd.DataFrame, *then: str) -> pd.DataFrame:
    """Rows sorted by their inputs, then by ``then`` (nulls first)."""
    return rows.sort_values([*SHAPE, *then], na_position="first", kind="stable")


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


def other_than(values: pd.Series, usual) -> pd.Series:
    """``values``, null (a column left out) where they are the usual ones."""
    return values.where(values != usual)


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


def case_records(rows: pd.DataFrame) -> pd.DataFrame:
    """The :data:`CASE_COLS` of micro rows."""
    return pd.DataFrame(
        {
            "label": rows["label"],
            "map": rows["map"],
            "channels": rows["channels"],
            "v_channels": other_than(rows["v_channels"], rows["channels"]),
            "batch_heads": rows["batch"].astype(str) + " x " + rows["heads"].astype(str),
        }
    )


def micro_table(rows: pd.DataFrame) -> Table:
    """Time, memory and FLOP rate per case, with the speed-up over the exact baseline."""
    sections = []
    ok = timed(micro_rows(prepare(rows)), TIMED_KEYS)
    for (machine, suite, dtype), part in groups(ok, ["machine", "suite", "dtype"]):
        base = part[part["impl"] == BASELINE].drop_duplicates(SHAPE, keep="last")
        times = ["time_fwd_ms", "time_fwdbwd_ms"]
        part = by_shape(part, "order").merge(
            base[SHAPE + times], on=SHAPE, how="left", suffixes=("", "_base")
        )
        records = case_records(part).assign(
            inputs=other_than(part["inputs"], "gaussian"),
            **{k: part[k] for k in MICRO_COLS_MEASURED},
            mem_fwd_mib=part["mem_fwd_bytes"].astype(float) / MIB,
            mem_fwdbwd_mib=part["mem_fwdbwd_bytes"].astype(float) / MIB,
            peak_percent=100 * part["peak_fraction"],
            **{
                f"speedup_{t.split('_')[1]}": (part[f"{t}_base"] / part[t]).where(part[t] > 0)
                for t in times
            },
        )
        sections.append(
            Section(
                f"{suite} — {machine}, {dtype}",
                {"machine": machine, "suite": suite, "dtype": dtype},
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


MICRO_COLS_MEASURED = (
    "time_fwd_ms", "time_fwd_iqr_ms", "time_fwdbwd_ms", "time_fwdbwd_iqr_ms", "gflops_fwd",
)  # fmt: skip


# --- scaling ----------------------------------------------------------------------------------

SCALING_COLS = [
    Col("implementation", "method"),
    Col("maps measured", "maps"),
    Col("time exponent", "time_exponent", ".2f"),
    Col("memory exponent", "memory_exponent", ".2f"),
    Col(f"faster than {BASELINE} from", "time_overtakes"),
    Col(f"less memory than {BASELINE} from", "memory_overtakes"),
]
SERIES = [  # what the points of one curve over map sizes share
    "machine", "suite", "dtype", "channels", "cv", "batch", "heads", "inputs", "self_attention",
]  # fmt: skip
SERIES_CONTEXT = [*SERIES[:4], "v_channels", *SERIES[5:]]  # their CSV names


def fit_exponent(series: pd.Series) -> float | None:
    """Slope of log(value) against log(tokens) (the index) over the largest
    :data:`SCALING_FIT_MAPS` maps."""
    series = series[series > 0].sort_index().iloc[-SCALING_FIT_MAPS:]
    if len(series) < 2:
        return None
    return float(np.polyfit(np.log(series.index.astype(float)), np.log(series), 1)[0])


def overtakes(mine: Mapping, base: Mapping, maps: Mapping) -> str | None:
    """The smallest size from which ``mine`` is below ``base`` at every larger common size."""
    both = pd.DataFrame(
        {"mine": pd.Series(mine, dtype=float), "base": pd.Series(base, dtype=float)}
    )
    below = both.dropna().sort_index().eval("mine < base")
    if below.empty:
        return None
    if not below.iloc[-1]:
        return f"not up to {below.index[-1]:,} tokens"
    above = below[~below]
    first = below.index[below.index > above.index[-1]][0] if len(above) else below.index[0]
    prefix = "" if len(above) else "<= "
    return f"{prefix}{first:,} tokens ({maps[first]})"


def with_series(rows: pd.DataFrame) -> pd.DataFrame:
    """Micro rows with what the points of one curve over map sizes share beside the map:
    ``cv`` (the value channels) and ``self_attention``."""
    return rows.assign(
        cv=rows["v_channels"].fillna(rows["channels"]).astype(int),
        self_attention=(rows["kv_h"] == rows["q_h"]) & (rows["kv_w"] == rows["q_w"]),
    )


def series_heading(key: tuple) -> str:
    """``micro, C = 64, B x H = 1 x 1, gaussian inputs — <machine>, float32``."""
    machine, suite, dtype, c, cv, batch, heads, inputs, self_attention = key
    parts = [suite, f"C = {c}" + (f", Cv = {cv}" if cv != c else ""), f"B x H = {batch} x {heads}"]
    parts += [f"{inputs} inputs"] if present(inputs) else []
    parts += [] if self_attention else ["cross-attention"]
    return f"{', '.join(parts)} — {machine}, {dtype}"


def scaling_table(rows: pd.DataFrame) -> Table:
    """Fitted exponents of time and memory against tokens, and where each method overtakes."""
    sections = []
    ok = with_series(timed(micro_rows(prepare(rows))))
    ok = ok.astype({"time_fwd_ms": float, "mem_fwd_bytes": float})
    for key, part in groups(ok, SERIES):
        # labels resolve per map: a method is its implementation, parameters and generator
        part = part.assign(order=groups(part, METHOD)["order"].transform("min"))
        time, memory = (
            part.pivot_table(index="tokens", columns="order", values=k, aggfunc="mean")
            for k in ("time_fwd_ms", "mem_fwd_bytes")
        )
        first = part.sort_values("order").drop_duplicates("order").set_index("order")
        base = next((o for o in first.index if first.at[o, "impl"] == BASELINE), None)
        records = []
        for order, method in first.iterrows():
            sizes = time[order].dropna().index if order in time else []
            if len(sizes) < 3:
                continue
            mine = part[part["order"] == order]
            maps = dict(zip(mine["tokens"], mine["map"]))
            records.append(
                {
                    "method": method_label(method["impl"], method["params"]),
                    "maps": f"{len(sizes)}: {maps[sizes[0]]} to {maps[sizes[-1]]}",
                    "time_exponent": fit_exponent(time[order].dropna()),
                    "memory_exponent": fit_exponent(memory.get(order, pd.Series(dtype=float))),
                    **{
                        f"{name}_overtakes": None
                        if order == base or base not in values or order not in values
                        else overtakes(values[order].dropna(), values[base].dropna(), maps)
                        for name, values in (("time", time), ("memory", memory))
                    },
                }
            )
        if not records:
            continue
        context = dict(zip(SERIES_CONTEXT, key))
        sections.append(Section(series_heading(key), context, pd.DataFrame(records)))
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
ERRORS = ["sharpness", "rel_err_out", "rel_err_grad", "copy_psnr"]
FIDELITY_KEY = ["machine", "suite", "dtype", "inputs"]


def scored_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The ok micro rows with an error against exact attention."""
    micro = micro_rows(rows)
    return micro[(micro["status"] == "ok") & micro["rel_err_out"].notna()]


def fidelity_table(rows: pd.DataFrame) -> Table:
    """Relative error against exact attention, and copy PSNR, per input family."""
    sections = []
    for (machine, suite, dtype, inputs), part in groups(scored_rows(prepare(rows)), FIDELITY_KEY):
        part = by_shape(part, "order")
        sections.append(
            Section(
                f"{suite}, {inputs} inputs — {machine}, {dtype}",
                dict(zip(FIDELITY_KEY, (machine, suite, dtype, inputs))),
                case_records(part).join(part[ERRORS]),
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
HIT_RATES = {"hit_r1": "largest", "hit_r2": "largest_r2"}  # column: key in copy_hit_rate
TRAIN_METRICS = ("test_l1", "ssim", "psnr", "lpips", "fid", *HIT_RATES)
TESTED_METRICS = ("psnr", "hit_r1")  # compared with each reference by Welch's t-test
REFERENCES = {NO_ATTENTION: "none", BASELINE: "full"}  # implementation: its name in record keys
REASON_SPLIT = re.compile(r";\s+(?=\w+: )")  # "lpips: ...; fid: ..." -> one reason per metric


def single(values: pd.Series):
    """The one value of ``values`` (nulls aside), or None when they differ."""
    values = values.dropna().unique()
    return values[0] if len(values) == 1 else None


def seed_stats(runs: pd.DataFrame, by: list[str], metrics=TRAIN_METRICS) -> pd.DataFrame:
    """Per group of ``by``: runs ok of all runs, the mean and sample std (``<key>_std``) of
    ``metrics`` over the ok runs (seeds), and the means of steps, training time, attention
    memory (MiB) and step time (ms)."""
    counts = groups(runs, by)["status"].agg(lambda s: f"{(s == 'ok').sum()}/{len(s)}")
    ok = runs[runs["status"] == "ok"]
    means = {k: (k, "mean") for k in metrics} | {f"{k}_std": (k, "std") for k in metrics}
    means |= {"steps_done": ("steps", "mean"), "train_s": ("train_time_s", "mean")}
    means |= {"attn_mib": ("attn_mem_bytes", "mean"), "step_ms": ("step_time_s", "mean")}
    numbers = ok.astype({k: float for k, _ in means.values()})
    table = groups(numbers, by).agg(**means, n_params=("n_params", single))
    table = table.assign(attn_mib=table["attn_mib"] / MIB, step_ms=1000 * table["step_ms"])
    return table.reindex(counts.index).assign(runs=counts)


def welch(values, reference) -> tuple[float | None, float | None]:
    """Difference of the means of the non-null ``values`` and ``reference``, and the p-value of
    Welch's t-test (unequal variances) that the two means are equal.

    The p-value is None with fewer than two values on either side, or without spread on both.
    """
    values, reference = pd.Series(values).dropna(), pd.Series(reference).dropna()
    if values.empty or reference.empty:
        return None, None
    difference = float(values.mean() - reference.mean())
    if min(len(values), len(reference)) < 2 or values.nunique() == reference.nunique() == 1:
        return difference, None  # the test needs two values a side, and spread on one
    return difference, float(stats.ttest_ind(values, reference, equal_var=False).pvalue)


def comparisons(part: pd.DataFrame, methods: pd.Index) -> pd.DataFrame:
    """:data:`TESTED_METRICS` of each method's ok runs against each reference's (:func:`welch`):
    the runs of :data:`REFERENCES` without parameters or generator overrides beyond those the
    section shares; empty for a reference itself and where the reference has no runs."""
    ok = part[part["status"] == "ok"].set_index(METHOD)
    shared = params_text(shared_generator(part))
    records = pd.DataFrame(index=methods)
    for impl, name in REFERENCES.items():
        reference = (impl, "", shared)
        for key in TESTED_METRICS:
            against = ok.loc[[reference], key] if reference in ok.index else pd.Series()
            tested = [
                (None, None) if method == reference else welch(ok.loc[[method], key], against)
                if method in ok.index else (None, None)
                for method in methods
            ]  # fmt: skip
            records[f"{key}_vs_{name}"] = [d for d, _ in tested]
            records[f"{key}_p_vs_{name}"] = [p for _, p in tested]
    return records.astype(float)


def shared_generator(part: pd.DataFrame) -> dict:
    """The generator overrides every run of a training section has (named in its heading)."""
    if part.empty:
        return {}
    first, *others = part["generator"]
    return {k: v for k, v in first.items() if all(k in o and o[k] == v for o in others)}


def own_generator(generator: dict, shared: dict) -> dict:
    """A run's generator overrides beyond those its section shares."""
    return {k: v for k, v in generator.items() if k not in shared}


def train_label(row, shared: dict) -> str:
    """The label of a training run's method: its implementation's, followed by its own
    generator overrides (``none (no copying at any level)``: the paper's NO)."""
    own = own_generator(row["generator"], shared)
    notes = []
    if row["impl"] == NO_ATTENTION and own.get("small_attention") == NO_ATTENTION:
        del own["small_attention"]
        notes.append("no copying at any level")
    if own:
        notes.append(params_text(own))
    return f"{row['label']} ({', '.join(notes)})" if notes else row["label"]


def train_methods(part: pd.DataFrame) -> pd.DataFrame:
    """One row per method of a training section (its first run), in report order, indexed by
    :data:`METHOD`, with its ``method`` label."""
    shared = shared_generator(part)
    first = part.sort_values(["order", "seed"]).drop_duplicates(METHOD)
    first = first.set_index(METHOD, drop=False)
    return first.assign(method=[train_label(r, shared) for _, r in first.iterrows()])


def train_heading(part: pd.DataFrame) -> tuple[str, dict]:
    """Heading and CSV context of a training section: steps as the finished runs were given
    them (``max_steps``; ``steps`` in rows written before runs could stop early), the time
    budget, and the generator overrides every run shares."""
    first = part.iloc[0]
    ok = part[(part["status"] == "ok") & (part["steps"] > 0)]
    steps = sorted(ok["max_steps"].fillna(ok["steps"]).astype(int).unique())
    budgets = sorted(part["budget_minutes"].dropna().loc[lambda b: b != 0].unique())
    context = {
        "machine": first["machine"],
        "suite": first["suite"],
        "task": first["task"],
        "preset": first["preset"],
        "steps": "/".join(map(str, steps)) or None,
        "budget_minutes": "/".join(f"{m:g}" for m in budgets) or None,
        "batch": first["batch"],
        "generator": params_text(shared_generator(part)) or None,
    }
    budget = f" or {context['budget_minutes']} min of training" if budgets else ""
    generator = f", generator {context['generator']}" if context["generator"] else ""
    heading = (
        f"{first['suite']}: {context['task']} task, preset {context['preset']}, "
        f"{context['steps']} steps{budget}, batch {context['batch']}{generator} — "
        f"{first['machine']}"
    )
    return heading, context


def reasons_of(part: pd.DataFrame) -> list[str]:
    """The distinct reasons attached to ok runs (metrics that could not be computed)."""
    reasons = part.loc[part["status"] == "ok", "reason"].dropna()
    return sorted(reasons.str.split(REASON_SPLIT).explode().str.strip().unique())


def days_of(part: pd.DataFrame, methods: pd.DataFrame) -> list[str]:
    """A note naming the methods run on each day, when a section's ok runs span days.

    A shared machine's speed drifts from day to day (its matmul rate, other tenants), so step
    times compare within one day's runs only; metrics do not depend on it.
    """
    ok = part[(part["status"] == "ok") & part["timestamp"].notna()]
    days = ok["timestamp"].dt.strftime("%Y-%m-%d")
    if days.nunique() < 2:
        return []
    labels = methods["method"].reindex(pd.MultiIndex.from_frame(ok[METHOD])).to_numpy()
    order = methods["method"].tolist()
    runs = pd.DataFrame({"day": days.to_numpy(), "label": labels})
    listing = "; ".join(
        f"{day}: {', '.join(sorted(set(group['label']), key=order.index))}"
        for day, group in runs.groupby("day")
    )
    return [
        f"step times come from runs of {days.nunique()} days ({listing}); this machine's "
        "speed may differ between days, so compare step times of one day's runs only"
    ]


def train_sections(rows: pd.DataFrame, task: str) -> list[Section]:
    """One section per comparable group of ``task``'s training runs: metrics over seeds
    (:func:`seed_stats`) and the comparisons with the references."""
    sections = []
    runs = train_rows(prepare(rows))
    for _, part in groups(runs[runs["task"] == task], TRAIN_KEY):
        methods = train_methods(part)
        records = (
            seed_stats(part, METHOD)
            .join(comparisons(part, methods.index))
            .assign(label=methods["method"])
            .loc[methods.index]
        )
        heading, context = train_heading(part)
        notes = days_of(part, methods) + reasons_of(part)
        sections.append(Section(heading, context, records, notes=notes))
    return sections


def copying_table(rows: pd.DataFrame) -> Table:
    """Held-out metrics and copy hit rates as mean ± std over seeds, their differences from
    ``none`` and ``full.sdpa`` with Welch's t-test, steps, time and memory."""
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
        train_sections(rows, "copying"),
    )


TRAIN_COL = {col.key: col for col in TRAIN_COLS}
POSE_COLS = [
    *(TRAIN_COL[k] for k in ("label", "runs", "fid", "ssim", "lpips", "psnr", "test_l1")),
    Col("copy score r=1", "hit_r1", ".3f", std="hit_r1_std"),
    Col("copy score r=2", "hit_r2", ".3f", std="hit_r2_std"),
    *(TRAIN_COL[k] for k in ("attn_mib", "step_ms", "steps_done", "train_s", "n_params")),
    *COMPARISON_COLS,
]


def pose_table(rows: pd.DataFrame) -> Table:
    """The paper's Table 1 for the pose-morphing runs: FID, SSIM, LPIPS, PSNR, the copy score,
    attention memory and step time as mean ± std over seeds, compared with the references."""
    return Table(
        "pose",
        "Training: pose morphing (the paper's Table 1)",
        "Held-out metrics of G(M1, B1, B2) against M2 after training, mean ± sample standard "
        "deviation over seeds (runs that diverged or failed are counted in 'runs ok' and left "
        "out of the means). FID is pytorch-fid's between the generated and the real held-out "
        "targets at the generator's resolution (biased upwards from fewer than 2,000 images: "
        "compare values of one sample count only). The copy score is the share of the largest "
        "decoder level's attention mass within 1 (r=1) or 2 pixels (r=2) of the source pixel "
        "that truly shows the same point of the figure (synthetic mannequin pairs only). "
        "Attention memory is the peak of the attention blocks alone at batch 1; step time is "
        "the mean over seeds of each run's median training step (a generator step on the pose "
        "pair and its self-supervision pair, and a discriminator step). The last columns "
        f"compare PSNR and the copy score at r=1 with `{NO_ATTENTION}` and `{BASELINE}` "
        "(difference of the means, Welch's t-test). "
        f"`{NO_ATTENTION} (no copying at any level)` is Table 1's NO.",
        POSE_COLS,
        train_sections(rows, "pose"),
    )


# --- κ ablation -------------------------------------------------------------------------------


def topk_of(impl: str, params: dict) -> int | None:
    """κ of a GPA method: its ``topk`` parameter, or the implementation's default."""
    if "topk" in params:
        return params["topk"]
    from attnbench import registry

    try:
        return registry.get(impl).PARAMS["topk"].default
    except (KeyError, AttributeError, ValueError):  # not installed here, or no κ parameter
        return None


def kappa_groups(rows: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    """GPA rows with their ``topk``, by everything but κ (``impl`` and ``fixed``: the other
    parameters, and generator overrides beyond those all share); only groups with at least two
    values of κ."""
    gpa = rows[rows["impl"].str.startswith("gpa.")]
    gpa = gpa.assign(topk=[topk_of(r.impl, r.params) for r in gpa.itertuples()]).dropna(
        subset=["topk"]
    )
    shared = shared_generator(gpa)
    gpa = gpa.assign(
        topk=gpa["topk"].astype(int),
        fixed=[
            params_text(
                {k: v for k, v in r.params.items() if k != "topk"}
                | own_generator(r.generator, shared)
            )
            for r in gpa.itertuples()
        ],  # fmt: skip
    )
    return [
        (key, group)
        for key, group in groups(gpa, ["impl", "fixed"])
        if group["topk"].nunique() >= 2
    ]


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


def kappa_training_table(rows: pd.DataFrame) -> Table:
    """The paper's κ ablation (Fig. 7a) on the training task: metrics against κ."""
    sections = []
    for _, part in groups(train_rows(prepare(rows)), TRAIN_KEY):
        for (impl, fixed), group in kappa_groups(part):
            heading, context = train_heading(part)
            records = seed_stats(group, ["topk"]).reset_index()
            fixed_text = f" ({fixed})" if fixed else ""
            sections.append(
                Section(
                    f"{impl}{fixed_text}, {heading}",
                    context | {"impl": impl, "fixed": fixed},
                    records,
                )
            )
    return Table(
        "kappa-copying",
        "κ ablation: training",
        "Held-out metrics of GPA against κ, the key blocks kept per query cell, with everything "
        "else fixed (mean ± std over seeds; the paper's Fig. 7a).",
        KAPPA_TRAIN_COLS,
        sections,
    )


def kappa_fidelity_table(rows: pd.DataFrame) -> Table:
    """Fidelity to exact attention against κ, per input family and map."""
    sections = []
    for key, part in groups(scored_rows(prepare(rows)), FIDELITY_KEY):
        machine, suite, dtype, inputs = key
        for (impl, fixed), group in kappa_groups(part):
            group = by_shape(group, "topk")
            fixed_text = f" ({fixed})" if fixed else ""
            sections.append(
                Section(
                    f"{impl}{fixed_text}, {suite}, {inputs} inputs — {machine}, {dtype}",
                    dict(zip(FIDELITY_KEY, key)) | {"impl": impl, "fixed": fixed},
                    group[["topk", "label", "map", *ERRORS]],
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


def case_text(row) -> str:
    """What a row measured, in a few words."""
    if row["kind"] == "train":
        return f"seed {row['seed']}"
    parts = [row["map"], f"C={row['channels']}"]
    if present(row["inputs"]) and row["inputs"]:
        parts.append(str(row["inputs"]))
    if present(row["sharpness"]):
        parts.append(f"sharpness {row['sharpness']:g}")
    return ", ".join(parts)


def not_run_table(rows: pd.DataFrame) -> Table:
    """Every row whose status is not ok, with its reason."""
    sections = []
    failed = prepare(rows).query("status != 'ok'")
    failed = failed.assign(status=failed["status"].astype(str))
    for machine, part in groups(failed, "machine"):
        part = part.sort_values(
            ["suite", "status", "family", "impl", "label", *SHAPE, "seed"], na_position="first"
        )
        records = part[["suite", "label", "status", "reason"]].assign(
            case=[case_text(r) for _, r in part.iterrows()]
        )
        sections.append(Section(machine, {"machine": machine}, records))
    return Table(
        "not-run",
        "Not run",
        "Every case whose status is not ok (unsupported, oom, error, diverged), with its reason.",
        NOT_RUN_COLS,
        sections,
    )


TABLES: tuple[Callable[[pd.DataFrame], Table], ...] = (
    micro_table,
    scaling_table,
    fidelity_table,
    copying_table,
    pose_table,
    kappa_training_table,
    kappa_fidelity_table,
    not_run_table,
)


def all_tables(rows: pd.DataFrame) -> list[Table]:
    """Every table, in report order."""
    rows = prepare(rows)
    return [make(rows) for make in TABLES]
