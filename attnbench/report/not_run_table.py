"""The table of every row, micro or training, whose status is not ok."""

from __future__ import annotations

import pandas as pd

from attnbench.report.table import SHAPE, Col, Section, Table, group_by, prepare, present

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
    for machine, part in group_by(failed, "machine"):
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
