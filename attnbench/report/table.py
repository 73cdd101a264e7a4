"""What every table of ``attnbench report`` shares: columns, sections, tables and their Markdown
and CSV, and the frame the tables and plots read (:func:`prepare`).

Rows are never averaged across machines: every table is split into sections by the ``machine``
column (device, processor or GPU name, thread count, torch version), and the section heading
names it. Within a section, rows are sorted by their content, never by the order they were
written, so the same rows always give byte-identical files.

A method is an implementation with its parameters as the suite gave them (``gpa.torch`` with
``phase1_res=64``) and, for training runs, the generator settings the suite overrode
(``small_attention=none``: the paper's NO); its label in a micro row is resolved for that row's
map (``d=4`` at 256x256, ``d=1`` at 64x64), so curves over map sizes follow the method, and
per-size tables show the label.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pandas as pd
from tabulate import DataRow, TableFormat

from attnbench.results import frame
from attnbench.schema import REPORT_COLUMNS

FAMILY_ORDER = ("none", "full", "xformers", "gpa", "nystrom", "performer")
BASELINE = "full.sdpa"  # what speed-ups and overtaking sizes are measured against
NO_ATTENTION = "none"  # copies nothing: the other reference of the training runs
MIB = 2**20
METHOD = ["impl", "params_text", "generator_text"]  # a method across map sizes and seeds
SHAPE = [  # what makes two micro rows the same inputs apart from the method
    "tokens", "q_h", "q_w", "kv_h", "kv_w", "channels", "v_channels", "batch", "heads",
    "inputs", "sharpness",
]  # fmt: skip
HIT_RATES = {"hit_r1": "largest", "hit_r2": "largest_r2"}  # column: key in copy_hit_rate
group_by = partial(pd.DataFrame.groupby, observed=True, dropna=False)


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


# --- generator overrides and κ groups ---------------------------------------------------------


def shared_generator(part: pd.DataFrame) -> dict:
    """The generator overrides every run of a training section has (named in its heading)."""
    if part.empty:
        return {}
    first, *others = part["generator"]
    return {k: v for k, v in first.items() if all(k in o and o[k] == v for o in others)}


def own_generator(generator: dict, shared: dict) -> dict:
    """A run's generator overrides beyond those its section shares."""
    return {k: v for k, v in generator.items() if k not in shared}


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
        for key, group in group_by(gpa, ["impl", "fixed"])
        if group["topk"].nunique() >= 2
    ]
