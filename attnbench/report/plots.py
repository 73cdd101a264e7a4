"""Plots from the result frame, one figure per question (PNG, via seaborn on matplotlib).

Each function returns ``(name, figure)`` pairs; the caller saves them as ``plots/<name>.png``.
Every figure has a title, axes labelled with units and a legend. Figures are built on
:class:`matplotlib.figure.Figure` objects, so making a report touches no global pyplot state.
Rows of different machines never share a figure. Every method the rows hold is drawn: methods
are seaborn's ``hue``, in report order.
"""

from __future__ import annotations

import re

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from attnbench.report.discovery import experiment_sections
from attnbench.report.micro_tables import (
    SERIES,
    micro_rows,
    scored_rows,
    series_heading,
    timed,
    with_series,
)
from attnbench.report.table import (
    BASELINE,
    METHOD,
    MIB,
    NO_ATTENTION,
    group_by,
    kappa_groups,
    method_label,
    prepare,
)
from attnbench.report.train_tables import train_methods, train_rows

STYLE = "whitegrid"
NOT_RUN_MARKER = "X"
MARKERS = "osD^v<>pPX*hH8d"  # filled; with tab20 colours no two methods look alike
FACET_COLUMNS = 3  # panels side by side in a figure of several input families
LEGEND = {"loc": "center left", "bbox_to_anchor": (1.01, 0.5), "fontsize": 8, "title": None}


def slug(text: str) -> str:
    """A file-name part: lower case, runs of other characters as one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def palette(n: int) -> list:
    """``n`` distinguishable colours (husl beyond 20 wraps its first and last hues together)."""
    return sns.color_palette("tab10" if n <= 10 else "tab20" if n <= 20 else "husl", n)


def name_for(base: str, machine: str, machines: set) -> str:
    """``base``, with the machine appended when the rows come from more than one machine."""
    return base if len(machines) == 1 else f"{base}-{slug(machine)}"


def labelled_runs(part: pd.DataFrame) -> pd.DataFrame:
    """The ok runs of a training section with their method's label (``method``) and its rank
    (``rank``, report order)."""
    methods = train_methods(part).reset_index(drop=True)[[*METHOD, "method"]]
    methods["rank"] = range(len(methods))
    ok = part[part["status"] == "ok"]
    return ok.merge(methods, on=METHOD).sort_values(["rank", "seed"])


def memory_vs_l1(rows: pd.DataFrame) -> list[tuple[str, Figure]]:
    """Attention memory against held-out L1, mean ± sd over seeds (the paper's Fig. 5a)."""
    figures = []
    train = train_rows(prepare(rows))
    machines = train.groupby("suite")["machine"].agg(set)  # per suite: its own names
    for (machine, suite, *_), part in experiment_sections(train):
        runs = labelled_runs(part).dropna(subset=["test_l1", "attn_mem_bytes"])
        if runs.empty:
            continue
        method = group_by(runs, "rank")["method"]
        runs = runs.assign(
            label=method.transform(lambda m: f"{m.iloc[0]} (n={len(m)})"),
            memory=group_by(runs, "rank")["attn_mem_bytes"].transform("mean").astype(float) / MIB,
        )
        labels = list(dict.fromkeys(runs["label"]))
        with sns.axes_style(STYLE):
            fig = new_figure(8, 5)
            ax = fig.add_subplot()
            sns.lineplot(
                runs, x="memory", y="test_l1", hue="label", hue_order=labels,
                palette=palette(len(labels)), errorbar="sd", err_style="bars", marker="o",
                linestyle="", err_kws={"capsize": 3}, ax=ax,
            )  # fmt: skip
            ax.set_xlabel("attention memory, peak of the attention blocks at batch 1 (MiB)")
            ax.set_ylabel("held-out L1, mean ± std over seeds; lower is better (1)")
            first = part.iloc[0]
            ax.set_title(
                f"{suite}: attention memory against held-out L1 "
                f"({first['preset']}, {first['steps']} steps)\n{machine}",
                fontsize=10,
            )
            sns.move_legend(ax, **LEGEND)
        figures.append((name_for(f"{slug(suite)}-memory-vs-l1", machine, machines[suite]), fig))
    return figures


def hit_curve(rows: pd.DataFrame) -> list[tuple[str, Figure]]:
    """Copy hit rate at the largest decoder level (r = 1 px) against training step, from each
    run's ``hit_curve``: one line per method, mean over seeds with a ± sd band."""
    figures = []
    train = train_rows(prepare(rows))
    machines = train.groupby("suite")["machine"].agg(set)  # per suite: its own names
    for (machine, suite, *_), part in experiment_sections(train):
        runs = labelled_runs(part).explode("hit_curve").dropna(subset=["hit_curve"])
        if runs.empty:
            continue
        points = pd.json_normalize(list(runs["hit_curve"])).assign(method=list(runs["method"]))
        points = points.reindex(
            columns=[*points.columns.drop("largest", errors="ignore"), "largest"]
        )
        points = points.dropna(subset=["step", "largest"])  # curves of PSNR alone: no hit rate
        if points.empty:
            continue
        methods = list(dict.fromkeys(points["method"]))  # report order
        with sns.axes_style(STYLE):
            fig = new_figure(8, 5)
            ax = fig.add_subplot()
            sns.lineplot(
                points, x="step", y="largest", hue="method", hue_order=methods,
                palette=palette(len(methods)), errorbar="sd", marker="o", ax=ax,
            )  # fmt: skip
            ax.set_xlabel("training step (count)")
            ax.set_ylabel("copy hit rate, largest level, r = 1 px; mean ± sd over seeds (1)")
            first = part.iloc[0]
            ax.set_title(
                f"{suite}: attention mass on the true source during training "
                f"({first['preset']}, batch {first['batch']})\n{machine}",
                fontsize=10,
            )
            sns.move_legend(ax, **LEGEND)
        figures.append((name_for(f"{slug(suite)}-hit-curve", machine, machines[suite]), fig))
    return figures


def method_names(part: pd.DataFrame) -> dict[tuple, str]:
    """Each method of a curve's rows (:data:`METHOD` values) with its label not resolved for any
    map, in report order."""
    firsts = part.sort_values("order").drop_duplicates(METHOD)
    return {tuple(r[METHOD]): method_label(r["impl"], r["params"]) for _, r in firsts.iterrows()}


def scaling_panel(
    ax, part: pd.DataFrame, key: str, ylabel: str, methods: list, colours: dict, legend: bool
) -> None:
    """``key`` of a curve's rows against tokens, log-log, a line per method; the cases not run
    marked with :data:`NOT_RUN_MARKER` at the top of the panel, above the measured curves."""
    measured = part[part["status"] == "ok"]
    not_run = part[part["status"] != "ok"]
    points = measured[measured[key] > 0]
    if not points.empty:
        sns.lineplot(
            points, x="tokens", y=key, hue="method", hue_order=methods,
            palette=colours, marker="o", ax=ax, legend=legend,
        )  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    if not not_run.empty:
        top = points[key].max() if not points.empty else 1.0
        sns.scatterplot(
            not_run.assign(**{key: top * 1.5}), x="tokens", y=key, hue="method",
            hue_order=methods, palette=colours, marker=NOT_RUN_MARKER, s=80,
            ax=ax, legend=False,
        )  # fmt: skip
    ax.set_xlabel("query map height x width (tokens)")
    ax.set_ylabel(ylabel)


def scaling_figure(curve: tuple, part: pd.DataFrame) -> Figure:
    """Forward time and memory of one curve's rows (:data:`SERIES` values ``curve``) against
    tokens, side by side."""
    names = method_names(part)
    part = part.assign(
        method=[names[m] for m in part[METHOD].itertuples(index=False, name=None)],
        time=part["time_fwd_ms"].astype(float),
        memory=part["mem_fwd_bytes"].astype(float) / MIB,
    )
    methods = list(names.values())
    colours = dict(zip(methods, palette(len(methods))))
    not_run = part["status"] != "ok"
    with sns.axes_style(STYLE):
        fig = new_figure(13, 5.5)
        axes = fig.subplots(1, 2)
        panels = (
            (axes[0], "time", "forward time, median (ms)"),
            (axes[1], "memory", "forward peak memory above the inputs (MiB)"),
        )
        # The legend goes with the last panel that has points (a suite may measure time or
        # memory alone).
        measured = [k for _, k, _ in panels if part.loc[~not_run, k].gt(0).any()]
        legend_ax = next((ax for ax, k, _ in reversed(panels) if k in measured), axes[1])
        for ax, key, ylabel in panels:
            scaling_panel(ax, part, key, ylabel, methods, colours, legend=ax is legend_ax)
        axes[0].set_title("forward time" + ("" if "time" in measured else ": not measured"))
        axes[1].set_title(
            ("forward memory" if "memory" in measured else "forward memory: not measured")
            + ("; X: not run" if not_run.any() else "")
        )
        if measured:
            sns.move_legend(legend_ax, **LEGEND)
        suite_text, _, machine_text = series_heading(curve).partition(" — ")
        fig.suptitle(f"time and memory against tokens: {suite_text}\n{machine_text}", fontsize=11)
    return fig


def scaling_name(curve: tuple) -> str:
    """The file name of :func:`scaling_figure`'s figure, before the machine: the suite and C,
    then what differs from one head of one sample of gaussian float32 self-attention."""
    machine, suite, dtype, channels, cv, batch, heads, inputs, self_attention = curve
    extra = [f"cv{cv}"] if cv != channels else []
    extra += [f"b{batch}h{heads}"] if batch * heads > 1 else []
    extra += [slug(inputs)] if inputs not in (None, "gaussian") else []
    extra += [] if self_attention else ["cross"]
    extra += [] if dtype == "float32" else [slug(dtype)]
    return "-".join([slug(suite), "time-memory", f"c{channels}", *extra])


def scaling(rows: pd.DataFrame) -> list[tuple[str, Figure]]:
    """Forward time and memory against tokens, log-log; cases not run marked at the top."""
    figures = []
    micro = with_series(micro_rows(prepare(rows)))
    machines = set(micro["machine"])
    for curve, part in group_by(micro, SERIES):
        if timed(part)["tokens"].nunique() < 3:
            continue
        machine = curve[0]
        figures.append(
            (name_for(scaling_name(curve), machine, machines), scaling_figure(curve, part))
        )
    return figures


def kappa(rows: pd.DataFrame) -> list[tuple[str, Figure]]:
    """GPA's κ ablation (the paper's Fig. 7a): held-out L1 against κ, exact and none as lines."""
    figures = []
    train = train_rows(prepare(rows))
    machines = train.groupby("suite")["machine"].agg(set)  # per suite: its own names
    for (machine, suite, *_), part in experiment_sections(train):
        ok = part[part["status"] == "ok"]
        kappas = kappa_groups(ok)
        if not kappas:
            continue
        points = pd.concat(
            group.assign(group=f"{impl} ({fixed})" if fixed else impl)
            for (impl, fixed), group in kappas
        ).dropna(subset=["test_l1"])
        lines = list(dict.fromkeys(points["group"]))
        colours = palette(len(lines) + 2)
        with sns.axes_style(STYLE):
            fig = new_figure(8, 5)
            ax = fig.add_subplot()
            sns.lineplot(
                points, x="topk", y="test_l1", hue="group", hue_order=lines,
                palette=colours[: len(lines)], errorbar="sd", err_style="bars", marker="o",
                err_kws={"capsize": 3}, ax=ax,
            )  # fmt: skip
            references = ok[(ok["params_text"] == "") & ok["impl"].isin([BASELINE, NO_ATTENTION])]
            means = references.groupby("impl")["test_l1"].mean()
            for colour, impl in zip(colours[len(lines) :], (BASELINE, NO_ATTENTION)):
                if pd.notna(means.get(impl)):
                    ax.axhline(
                        means[impl], ls="--", color=colour, label=f"{impl} (mean over seeds)"
                    )
            ax.set_xscale("log", base=2)
            ks = sorted(pd.concat(group["topk"] for _, group in kappas).unique())
            ax.set_xticks(ks, labels=[str(k) for k in ks])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("κ, key blocks kept per query cell, log scale (count)")
            ax.set_ylabel("held-out L1, mean ± std over seeds (1)")
            ax.set_title(f"{suite}: GPA's κ ablation on held-out L1\n{machine}", fontsize=10)
            ax.legend(fontsize=8)
        figures.append((name_for(f"{slug(suite)}-kappa", machine, machines[suite]), fig))
    return figures


FIDELITY_FIGURE = [*SERIES[:-2], "q_h", "q_w", "kv_h", "kv_w"]  # one figure: all input families


def with_memory(scored: pd.DataFrame) -> pd.DataFrame:
    """Scored rows with their ``memory`` in MiB (measured forward, or else the runner's
    prediction), its ``kind``, and their ``facet`` (the input family, and warp-match's
    sharpness)."""
    predicted = scored["mem_fwd_bytes"].isna()
    return scored.assign(
        memory=scored["mem_fwd_bytes"].fillna(scored["mem_predicted_bytes"]).astype(float) / MIB,
        kind=predicted.map({False: "measured forward", True: "predicted forward"}).where(
            ~predicted | scored["rel_err_grad"].isna(), "predicted forward+backward"
        ),
        facet=[
            f"{i} inputs" + ("" if pd.isna(s) else f", sharpness {s:g}")
            for i, s in zip(scored["inputs"], scored["sharpness"])
        ],
    )


def fidelity_panel(ax, points: pd.DataFrame, labels: list, kinds: list, legend) -> None:
    """One facet's relative error against memory, log-log; a marker per method, larger where
    the memory is predicted rather than measured."""
    sns.scatterplot(
        points, x="memory", y="rel_err_out", hue="label",
        hue_order=labels, style="label", style_order=labels,
        markers=dict(zip(labels, MARKERS * len(labels))), palette=palette(len(labels)),
        size="kind", sizes={k: s for k, s in zip(kinds, (36, 90))}, s=36, ax=ax,
        legend=legend,
    )  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"peak memory above the inputs, {' or '.join(kinds)} (MiB)")
    ax.set_ylabel("relative L2 error of the output (1)")


def fidelity_figure(fig_key: tuple, part: pd.DataFrame, facets: list) -> Figure:
    """The panels of :func:`fidelity_vs_memory` for one suite and map (:data:`FIDELITY_FIGURE`
    values ``fig_key``), :data:`FACET_COLUMNS` to a row, with one legend."""
    machine, suite, dtype, channels, cv, batch, heads, q_h, q_w, kv_h, kv_w = fig_key
    labels = list(dict.fromkeys(part.sort_values("order")["label"]))
    kinds = sorted(part["kind"].unique())
    columns = min(len(facets), FACET_COLUMNS)
    lines = -(-len(facets) // columns)
    with sns.axes_style(STYLE):
        fig = new_figure(5 * columns + 2.5, 4.8 * lines)
        axes = list(fig.subplots(lines, columns, squeeze=False).flat)
        for ax in axes[len(facets) :]:
            ax.remove()  # the last row's empty places
        for ax, facet in zip(axes, facets):
            points = part[part["facet"] == facet]
            fidelity_panel(ax, points, labels, kinds, legend=ax is axes[0] and "full")
            ax.set_title(facet)
        handles, names = axes[0].get_legend_handles_labels()
        axes[0].get_legend().remove()
        fig.legend(handles, names, fontsize=8, loc="outside right center")
        where = f"{q_h}x{q_w} map" + ("" if (kv_h, kv_w) == (q_h, q_w) else f", kv {kv_h}x{kv_w}")
        shape = f"C = {channels}" + (f", Cv = {cv}" if cv != channels else "")
        shape += f", B x H = {batch} x {heads}" if batch * heads > 1 else ""
        fig.suptitle(
            f"{suite}: fidelity against memory ({where}, {shape}, {dtype})\n{machine}",
            fontsize=11,
        )
    return fig


def fidelity_name(fig_key: tuple) -> str:
    """The file name of :func:`fidelity_figure`'s figure, before the machine."""
    machine, suite, dtype, channels, cv, batch, heads, q_h, q_w, kv_h, kv_w = fig_key
    parts = [slug(suite), "error-vs-memory", f"{q_h}x{q_w}"]
    parts += [] if (kv_h, kv_w) == (q_h, q_w) else [f"kv{kv_h}x{kv_w}"]
    parts += [f"c{channels}"] + ([f"cv{cv}"] if cv != channels else [])
    parts += [f"b{batch}h{heads}"] if batch * heads > 1 else []
    parts += [] if dtype == "float32" else [slug(dtype)]
    return "-".join(parts)


def fidelity_vs_memory(rows: pd.DataFrame) -> list[tuple[str, Figure]]:
    """Relative error against memory per input family (warp-match per sharpness), one figure
    per suite and map; hollow markers where the memory is the runner's prediction (which
    covers forward+backward when the case computed gradients) rather than measured."""
    figures = []
    scored = with_memory(with_series(scored_rows(prepare(rows))))
    machines = set(scored["machine"])
    for fig_key, part in group_by(scored, FIDELITY_FIGURE):
        part = part.sort_values(["inputs", "sharpness", "order"], na_position="first")
        part = part[(part["memory"] > 0) & (part["rel_err_out"] > 0)]
        facets = list(dict.fromkeys(part["facet"]))
        if not facets:
            continue
        figure = fidelity_figure(fig_key, part, facets)
        figures.append((name_for(fidelity_name(fig_key), fig_key[0], machines), figure))
    return figures


def discovery_curves(rows: pd.DataFrame) -> list[tuple[str, Figure]]:
    """Hit rate and held-out PSNR against calibrated training time, per method (mean ± sd over
    seeds), with the equal time T of the discovery table marked."""
    from attnbench.report.discovery import calibration, curve_points, equal_time, has_curves

    figures = []
    train = train_rows(prepare(rows))
    machines = train.groupby("suite")["machine"].agg(set)
    for (machine, suite, *_), part in experiment_sections(train):
        if not has_curves(part):
            continue
        points = curve_points(part, calibration(train, part)[0]).dropna(subset=["time"])
        if points.empty:
            continue
        methods = train_methods(part)
        labels = dict(zip(map(tuple, methods.index), methods["method"]))
        points = points.assign(label=points["method"].map(labels))
        order = [m for m in methods["method"] if m in set(points["label"])]
        fig = discovery_figure(points, order, equal_time(points))
        fig.suptitle(f"{suite}: learning to copy against training time\n{machine}", fontsize=10)
        figures.append((name_for(f"{slug(suite)}-time-curves", machine, machines[suite]), fig))
    return figures


def discovery_figure(points: pd.DataFrame, order: list[str], at: float | None) -> Figure:
    """Two panels over calibrated time: the largest level's hit rate and the held-out PSNR."""
    with sns.axes_style(STYLE):
        fig = new_figure(11, 4.5)
        axes = fig.subplots(1, 2, sharex=True)
        panels = (
            ("hit", "copy hit rate, largest level, r = 1 px; mean ± sd over seeds (1)"),
            ("psnr", "held-out PSNR; mean ± sd over seeds (dB)"),
        )
        for ax, (key, label) in zip(axes, panels):
            sns.lineplot(
                points.dropna(subset=[key]), x="time", y=key, hue="label", hue_order=order,
                style="label", style_order=order, markers=True, dashes=False,
                palette=palette(len(order)), errorbar="sd", ax=ax, legend=ax is axes[-1],
            )  # fmt: skip
            if at is not None:
                ax.axvline(at, color="0.3", linestyle="--", linewidth=1)
                ax.annotate("T", (at, 1.0), xycoords=("data", "axes fraction"), ha="left")
            ax.set_xlabel("training time, steps x calibrated step time (s)")
            ax.set_ylabel(label)
        sns.move_legend(axes[-1], **LEGEND)
    return fig


PLOTS = (memory_vs_l1, hit_curve, discovery_curves, scaling, kappa, fidelity_vs_memory)


def all_plots(rows: pd.DataFrame) -> list[tuple[str, Figure]]:
    """Every plot made from rows, in report order."""
    rows = prepare(rows)
    return [item for make in PLOTS for item in make(rows)]
