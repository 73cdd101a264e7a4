"""The tables of micro-benchmark rows: time and memory per case, scaling with the number of
tokens, fidelity to exact attention, and fidelity against κ."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from attnbench.report.table import (
    BASELINE,
    METHOD,
    MIB,
    SHAPE,
    Col,
    Section,
    Table,
    group_by,
    kappa_groups,
    method_label,
    prepare,
    present,
)

SCALING_FIT_MAPS = 3  # the exponent is fitted over each method's largest maps
TIMED_KEYS = ("time_fwd_ms", "mem_fwd_bytes", "time_fwdbwd_ms", "mem_fwdbwd_bytes")


def micro_rows(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["kind"] == "micro"]


def timed(rows: pd.DataFrame, keys=("time_fwd_ms", "mem_fwd_bytes")) -> pd.DataFrame:
    """The ok rows with any of ``keys`` measured."""
    return rows[(rows["status"] == "ok") & rows[list(keys)].notna().any(axis=1)]


def by_shape(rows: pd.DataFrame, *then: str) -> pd.DataFrame:
    """Rows sorted by their inputs, then by ``then`` (nulls first)."""
    return rows.sort_values([*SHAPE, *then], na_position="first", kind="stable")


def other_than(values: pd.Series, usual) -> pd.Series:
    """``values``, null (a column left out) where they are the usual ones."""
    return values.where(values != usual)


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
MICRO_COLS_MEASURED = (
    "time_fwd_ms", "time_fwd_iqr_ms", "time_fwdbwd_ms", "time_fwdbwd_iqr_ms", "gflops_fwd",
)  # fmt: skip


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


def micro_records(part: pd.DataFrame) -> pd.DataFrame:
    """The :data:`MICRO_COLS` of one section's timed rows, with the speed-up over
    :data:`BASELINE` on the same inputs."""
    base = part[part["impl"] == BASELINE].drop_duplicates(SHAPE, keep="last")
    times = ["time_fwd_ms", "time_fwdbwd_ms"]
    part = by_shape(part, "order").merge(
        base[SHAPE + times], on=SHAPE, how="left", suffixes=("", "_base")
    )
    return case_records(part).assign(
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


def micro_table(rows: pd.DataFrame) -> Table:
    """Time, memory and FLOP rate per case, with the speed-up over the exact baseline."""
    sections = []
    ok = timed(micro_rows(prepare(rows)), TIMED_KEYS)
    for (machine, suite, dtype), part in group_by(ok, ["machine", "suite", "dtype"]):
        sections.append(
            Section(
                f"{suite} — {machine}, {dtype}",
                {"machine": machine, "suite": suite, "dtype": dtype},
                micro_records(part),
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


def scaling_records(part: pd.DataFrame) -> list[dict]:
    """One record per method of a curve's rows measured at three maps or more: its fitted
    exponents, and the maps from which it overtakes :data:`BASELINE`."""
    # labels resolve per map: a method is its implementation, parameters and generator
    part = part.assign(order=group_by(part, METHOD)["order"].transform("min"))
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
    return records


def scaling_table(rows: pd.DataFrame) -> Table:
    """Fitted exponents of time and memory against tokens, and where each method overtakes."""
    sections = []
    ok = with_series(timed(micro_rows(prepare(rows))))
    ok = ok.astype({"time_fwd_ms": float, "mem_fwd_bytes": float})
    for key, part in group_by(ok, SERIES):
        records = scaling_records(part)
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
    Col("attention recall", "attn_recall", ".3f"),
    Col("recall, worst 10% of queries", "attn_recall_p10", ".3f"),
]
SHARPNESS_COL = Col("sharpness", "sharpness", "g")  # warp-match's s; left out elsewhere
FIDELITY_COLS = [*CASE_COLS, SHARPNESS_COL, *ERROR_COLS]
ERRORS = ["sharpness", "rel_err_out", "rel_err_grad", "copy_psnr", "attn_recall", "attn_recall_p10"]
FIDELITY_KEY = ["machine", "suite", "dtype", "inputs"]


def scored_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The ok micro rows with an error against exact attention."""
    micro = micro_rows(rows)
    return micro[(micro["status"] == "ok") & micro["rel_err_out"].notna()]


def fidelity_table(rows: pd.DataFrame) -> Table:
    """Relative error against exact attention, and copy PSNR, per input family."""
    sections = []
    for (machine, suite, dtype, inputs), part in group_by(scored_rows(prepare(rows)), FIDELITY_KEY):
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


# --- κ ablation -------------------------------------------------------------------------------

KAPPA_FIDELITY_COLS = [
    Col("κ", "topk", "d"),
    Col("implementation", "label"),
    Col("map", "map"),
    SHARPNESS_COL,
    *ERROR_COLS,
]


def kappa_fidelity_table(rows: pd.DataFrame) -> Table:
    """Fidelity to exact attention against κ, per input family and map."""
    sections = []
    for key, part in group_by(scored_rows(prepare(rows)), FIDELITY_KEY):
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
