"""Discovery: when each method's generator learns to copy, and which is best at equal time.

A training suite whose runs evaluate on the way (``hit_curve`` points with the held-out
``psnr``) gets a section here: steps and time to copy (the first evaluation at which the
largest level's r=1 hit rate reaches 0.5), the metrics at equal steps (the end of the runs),
and the metrics at an equal training time T read from the curves — the GPA paper's criterion
(every method trained for the same time, not the same steps).

Training time is made comparable by calibration, not read from the clock: the runs of
different methods ran on different days or beside each other on a shared machine whose speed
drifts, so a method's time after s steps is s times the median step time its method has in the
calibration suite ``<suite>-step-time`` (all methods back to back in one run, same machine and
threads). A method without calibration rows uses its own runs' median step time, and the
section says so. T is the longest calibrated time that every method's runs reach; a run's
value at T is interpolated linearly between the two evaluations around it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from attnbench.report.table import BASELINE, METHOD, NO_ATTENTION, Col, Section, Table, group_by
from attnbench.report.train_tables import (
    TRAIN_KEY,
    prepare,
    train_heading,
    train_methods,
    train_rows,
    welch,
)
from attnbench.tasks.evaluation import COPY_THRESHOLD

CALIBRATION_SUFFIX = "-step-time"  # the suite that calibrates suite S is S + this
TESTED = ("psnr_t", "hit_t")  # the equal-time metrics compared with the references

DISCOVERY_COLS = [
    Col("implementation", "label"),
    Col("runs ok", "runs"),
    Col("copied", "copied"),
    Col("steps to copy", "steps_to_copy", ".0f", std="steps_to_copy_std", std_fmt=".0f"),
    Col("time to copy s", "time_to_copy", ".0f", std="time_to_copy_std", std_fmt=".0f"),
    Col("step ms", "step_ms", ".4g"),
    Col("PSNR dB (equal steps)", "psnr", ".2f", std="psnr_std"),
    Col("hit r=1 (equal steps)", "hit_r1", ".3f", std="hit_r1_std"),
    Col("steps at T", "steps_t", ".0f"),
    Col("PSNR dB at T", "psnr_t", ".2f", std="psnr_t_std"),
    Col(f"p (PSNR at T vs {BASELINE})", "psnr_t_p_vs_full", ".2g"),
    Col(f"p (PSNR at T vs {NO_ATTENTION})", "psnr_t_p_vs_none", ".2g"),
    Col("hit r=1 at T", "hit_t", ".3f", std="hit_t_std"),
    Col(f"p (hit r=1 at T vs {BASELINE})", "hit_t_p_vs_full", ".2g"),
]


def is_calibration(suite: str) -> bool:
    """Whether ``suite`` calibrates another's time axis (its rows are step times, not an
    experiment of their own: plots leave it out)."""
    return suite.endswith(CALIBRATION_SUFFIX)


def experiment_sections(train: pd.DataFrame):
    """The comparable groups of training runs (:data:`TRAIN_KEY`) that are experiments of their
    own: ``(key, rows)`` of every suite but the calibration suites."""
    for key, part in group_by(train, TRAIN_KEY):
        if not is_calibration(key[1]):
            yield key, part


def has_curves(part: pd.DataFrame) -> bool:
    """Whether the section's runs evaluated their held-out PSNR on the way."""
    points = part["hit_curve"].dropna().explode().dropna()
    return any(isinstance(p, dict) and "psnr" in p for p in points)


def calibration(train: pd.DataFrame, part: pd.DataFrame) -> tuple[pd.Series, list[str]]:
    """Each method's step time in seconds (indexed by :data:`METHOD`) for the section's time
    axis, and a note saying where it comes from."""
    first = part.iloc[0]
    suite = first["suite"] + CALIBRATION_SUFFIX
    runs = train[
        (train["suite"] == suite)
        & (train["machine"] == first["machine"])
        & (train["status"] == "ok")
    ]
    calibrated = group_by(runs, METHOD)["step_time_s"].mean().astype(float)
    own = group_by(part[part["status"] == "ok"], METHOD)["step_time_s"].mean().astype(float)
    missing = own.index.difference(calibrated.index)
    step_s = pd.concat([calibrated, own.loc[missing]])
    note = (
        f"time = steps x each method's median step time in suite {suite!r} (one run, all "
        "methods back to back, this machine)"
        if not runs.empty
        else "time = steps x each method's own median step time (no calibration suite "
        f"{suite!r} on this machine: times of runs from different days may not compare)"
    )
    notes = [note]
    if not runs.empty and len(missing):
        labels = ", ".join(train_methods(part).loc[list(missing), "method"])
        notes.append(f"not calibrated, their own step time used: {labels}")
    return step_s, notes


def curve_points(part: pd.DataFrame, step_s: pd.Series) -> pd.DataFrame:
    """Every evaluation of the section's ok runs: method, seed, step, calibrated time
    ``time``, ``hit`` (largest level, r=1) and ``psnr``."""
    ok = part[(part["status"] == "ok") & part["hit_curve"].notna()]
    records = []
    for _, run in ok.iterrows():
        method = tuple(run[k] for k in METHOD)
        for point in run["hit_curve"]:
            records.append(
                {
                    "method": method,
                    "seed": run["seed"],
                    "step": point["step"],
                    "time": point["step"] * step_s.get(method, np.nan),
                    "hit": point.get("largest"),
                    "psnr": point.get("psnr"),
                }
            )
    columns = ["method", "seed", "step", "time", "hit", "psnr"]
    return pd.DataFrame.from_records(records, columns=columns).astype({"hit": float, "psnr": float})


def equal_time(points: pd.DataFrame) -> float | None:
    """T: the longest calibrated time that every run of every method reaches."""
    if points.empty:
        return None
    reach = points.groupby(["method", "seed"])["time"].max()
    return None if reach.isna().all() else float(reach.min())


def value_at(run: pd.DataFrame, key: str, at: float) -> float | None:
    """``key`` of one run's evaluations at calibrated time ``at``: linear between the two
    evaluations around it; None outside the evaluations or where they lack the value."""
    run = run.dropna(subset=["time", key]).sort_values("time")
    if run.empty or not run["time"].iloc[0] <= at <= run["time"].iloc[-1]:
        return None
    return float(np.interp(at, run["time"], run[key]))


def at_time(points: pd.DataFrame, at: float) -> pd.DataFrame:
    """Per run (method, seed): the step, hit rate and PSNR read at calibrated time ``at``."""
    return pd.DataFrame.from_records(
        [
            {
                "method": method,
                "seed": seed,
                "steps_t": value_at(run, "step", at),
                "hit_t": value_at(run, "hit", at),
                "psnr_t": value_at(run, "psnr", at),
            }
            for (method, seed), run in points.groupby(["method", "seed"], sort=False)
        ],
        columns=["method", "seed", "steps_t", "hit_t", "psnr_t"],
    )


def run_values(part: pd.DataFrame, step_s: pd.Series, points: pd.DataFrame, at) -> pd.DataFrame:
    """Per ok run, indexed by (method, seed): steps and calibrated time to copy, the metrics at
    equal steps (its end) and at equal time ``at``."""
    ok = part[part["status"] == "ok"]
    runs = pd.DataFrame(
        {
            "method": [tuple(r) for r in ok[METHOD].itertuples(index=False)],
            "seed": ok["seed"].to_numpy(),
            "steps_to_copy": ok["steps_to_copy"].astype(float).to_numpy(),
            "psnr": ok["psnr"].astype(float).to_numpy(),
            "hit_r1": ok["hit_r1"].astype(float).to_numpy(),
        }
    )
    runs["time_to_copy"] = runs["steps_to_copy"] * runs["method"].map(step_s).astype(float)
    if at is not None:
        runs = runs.merge(at_time(points, at), on=["method", "seed"], how="left")
    return runs.set_index(["method", "seed"])


def method_stats(runs: pd.DataFrame, step_s: pd.Series, totals: pd.Series) -> pd.DataFrame:
    """Per method: runs ok of its ``totals``, runs that copied, and mean ± sample sd over seeds
    of every value of :func:`run_values`, with the equal-time metrics tested against the
    references."""
    by = runs.groupby(level="method", sort=False)
    stats = by.mean().join(by.std().add_suffix("_std"))
    sizes, copied = by.size(), by["steps_to_copy"].count()
    stats["runs"] = [f"{n}/{totals[m]}" for m, n in sizes.items()]
    stats["copied"] = [f"{copied[m]}/{n}" for m, n in sizes.items()]
    stats["step_ms"] = 1000 * stats.index.map(step_s).astype(float)
    for impl, name in ((BASELINE, "full"), (NO_ATTENTION, "none")):
        reference = [m for m in stats.index if m[0] == impl and m[1] == ""]
        for key in [k for k in TESTED if k in runs]:
            against = runs.loc[reference[0], key] if reference else pd.Series(dtype=float)
            stats[f"{key}_p_vs_{name}"] = [
                None if [m] == reference else welch(runs.loc[m, key], against)[1]
                for m in stats.index
            ]
    return stats


def discovery_section(train: pd.DataFrame, part: pd.DataFrame) -> Section:
    """The section of one suite's runs (see the module docstring)."""
    step_s, notes = calibration(train, part)
    points = curve_points(part, step_s)
    at = equal_time(points)
    totals = group_by(part, METHOD)["status"].size()
    totals.index = [tuple(m) for m in totals.index]
    stats = method_stats(run_values(part, step_s, points, at), step_s, totals)
    methods = train_methods(part)
    labels = {tuple(i): m for i, m in zip(methods.index, methods["method"])}
    records = stats.assign(label=[labels[m] for m in stats.index])
    records = records.loc[[m for m in map(tuple, methods.index) if m in records.index]]
    heading, context = train_heading(part)
    if at is not None:
        notes.insert(
            0, f"T = {at:.0f} s of calibrated training time: the longest every run reaches"
        )
    return Section(heading, context | {"equal_time_s": at}, records.reset_index(drop=True), notes)


def discovery_table(rows: pd.DataFrame) -> Table:
    """Steps and time to copy, and the metrics at equal steps and at equal time, per method."""
    train = train_rows(prepare(rows))
    sections = [
        discovery_section(train, part) for _, part in experiment_sections(train) if has_curves(part)
    ]
    return Table(
        "discovery",
        "Training: learning to copy, at equal steps and at equal time",
        "Runs that evaluate on the way (held-out PSNR and the copy hit rate every few steps). "
        f"'copied': runs whose largest level's r=1 hit rate reached {COPY_THRESHOLD:g}; steps "
        "and time to copy: the first such evaluation, mean ± sd over the runs that copied. "
        "Time is calibrated: steps x the method's step time measured for all methods in one "
        "run (the note says which), since a shared machine's speed drifts between runs. Equal "
        "steps: the held-out PSNR and hit rate at the end of the runs (tested in the task's "
        "table). Equal time: the same read from each run's curve at T, the longest calibrated "
        "time every run reaches (linear between evaluations; 'steps at T': how far each method "
        f"got), mean ± sd over seeds, with Welch's t-test against `{BASELINE}` and "
        f"`{NO_ATTENTION}`.",
        DISCOVERY_COLS,
        sections,
    )
