"""The tables of training rows: one per task (:data:`attnbench.tasks.TASKS`) and GPA's κ
ablation.

A section holds the comparable runs of one suite, task, preset and batch on one machine
(:data:`TRAIN_KEY`); a record is a method's metrics over seeds (:func:`seed_stats`) and their
comparison with the references :data:`NO_ATTENTION` and :data:`BASELINE` (:func:`comparisons`).
A task's table is described by the task (:attr:`attnbench.tasks.base.Task.table`: name, title,
about text, columns) and made into a :class:`Table` by :func:`task_table`.
"""

from __future__ import annotations

import dataclasses
import re

import pandas as pd
from scipy import stats

from attnbench.report.table import (
    BASELINE,
    HIT_RATES,
    METHOD,
    MIB,
    NO_ATTENTION,
    Col,
    Section,
    Table,
    group_by,
    kappa_groups,
    own_generator,
    params_text,
    prepare,
    shared_generator,
)

TRAIN_KEY = ["machine", "suite", "task", "preset", "batch"]  # what makes training runs comparable
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
TRAIN_COL = {col.key: col for col in TRAIN_COLS}
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
TRAIN_METRICS = ("test_l1", "ssim", "psnr", "lpips", "fid", *HIT_RATES)
TESTED_METRICS = ("psnr", "hit_r1")  # compared with each reference by Welch's t-test
REFERENCES = {NO_ATTENTION: "none", BASELINE: "full"}  # implementation: its name in record keys
REASON_SPLIT = re.compile(r";\s+(?=\w+: )")  # "lpips: ...; fid: ..." -> one reason per metric


def train_rows(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["kind"] == "train"]


# --- metrics over seeds and comparisons -------------------------------------------------------


def single(values: pd.Series):
    """The one value of ``values`` (nulls aside), or None when they differ."""
    values = values.dropna().unique()
    return values[0] if len(values) == 1 else None


def seed_stats(runs: pd.DataFrame, by: list[str], metrics=TRAIN_METRICS) -> pd.DataFrame:
    """Per group of ``by``: runs ok of all runs, the mean and sample std (``<key>_std``) of
    ``metrics`` over the ok runs (seeds), and the means of steps, training time, attention
    memory (MiB) and step time (ms)."""
    counts = group_by(runs, by)["status"].agg(lambda s: f"{(s == 'ok').sum()}/{len(s)}")
    ok = runs[runs["status"] == "ok"]
    means = {k: (k, "mean") for k in metrics} | {f"{k}_std": (k, "std") for k in metrics}
    means |= {"steps_done": ("steps", "mean"), "train_s": ("train_time_s", "mean")}
    means |= {"attn_mib": ("attn_mem_bytes", "mean"), "step_ms": ("step_time_s", "mean")}
    numbers = ok.astype({k: float for k, _ in means.values()})
    table = group_by(numbers, by).agg(**means, n_params=("n_params", single))
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


# --- sections ---------------------------------------------------------------------------------


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
    """Heading and CSV context of a training section: the steps the finished runs were given
    (``max_steps``, or ``steps`` where a row has no ``max_steps``), the time budget, and the
    generator overrides every run shares."""
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
    for _, part in group_by(runs[runs["task"] == task], TRAIN_KEY):
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


def task_cols(spec) -> list[Col]:
    """The columns a task's :class:`~attnbench.tasks.base.TaskTable` names, with its headers."""
    known = {col.key: col for col in TRAIN_COLS + COMPARISON_COLS}
    headers = dict(spec.headers)
    return [
        dataclasses.replace(known[key], header=headers[key]) if key in headers else known[key]
        for key in spec.columns
    ]


def task_table(task: str, rows: pd.DataFrame) -> Table:
    """The table of ``task``'s runs, as the task describes it: one section per comparable
    group of its runs (:func:`train_sections`)."""
    from attnbench.tasks import TASKS

    spec = TASKS[task].table
    return Table(spec.name, spec.title, spec.about, task_cols(spec), train_sections(rows, task))


def task_tables(rows: pd.DataFrame) -> list[Table]:
    """The table of every task that has one, in the order of :data:`attnbench.tasks.TASKS`."""
    from attnbench.tasks import TASKS

    return [task_table(name, rows) for name, task in TASKS.items() if task.table is not None]


# --- κ ablation -------------------------------------------------------------------------------

KAPPA_TRAIN_COLS = [Col("κ", "topk", "d")] + [
    c for c in TRAIN_COLS if c.key not in ("label", "n_params")
]


def kappa_training_table(rows: pd.DataFrame) -> Table:
    """The paper's κ ablation (Fig. 7a) on the training task: metrics against κ."""
    sections = []
    for _, part in group_by(train_rows(prepare(rows)), TRAIN_KEY):
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
