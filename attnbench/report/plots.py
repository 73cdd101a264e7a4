"""Plots from result rows, one figure per question (PNG, via seaborn on matplotlib).

Each function returns ``(name, figure)`` pairs; the caller saves them as ``plots/<name>.png``.
Every figure has a title, axes labelled with units and a legend. Figures are built on
:class:`matplotlib.figure.Figure` objects, so making a report touches no global pyplot state.
Rows of different machines never share a figure (:func:`attnbench.report.tables.machine_of`).
"""

from __future__ import annotations

import math
import re

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from matplotlib.transforms import blended_transform_factory

from attnbench.report.tables import (
    BASELINE,
    MIB,
    NO_ATTENTION,
    by_method,
    kappa_groups,
    machine_name,
    machine_of,
    mean_std,
    method_label,
    method_rank,
    micro_rows,
    partition,
    reference_runs,
    scored_rows,
    series_heading,
    series_key,
    sort_key,
    timed,
    tokens,
    topk_of,
    train_key,
    train_methods,
    train_rows,
)

STYLE = "whitegrid"
NOT_RUN_MARKER = "x"
MARKERS = "osD^v<>pPX*hH8d"  # filled; with tab20 colours no two methods look alike
JITTER = 1.06  # horizontal factor between the not-run markers of neighbouring methods
FACET_COLUMNS = 3  # panels side by side in a figure of several input families


def slug(text: str) -> str:
    """A file-name part: lower case, runs of other characters as one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def palette(n: int) -> list:
    """``n`` distinguishable colours (husl beyond 20 wraps its first and last hues together)."""
    return sns.color_palette("tab10" if n <= 10 else "tab20" if n <= 20 else "husl", n)


def name_for(base: str, machine: tuple, machines: set) -> str:
    """``base``, with the machine appended when the rows come from more than one machine."""
    return base if len(machines) == 1 else f"{base}-{slug(machine_name(machine))}"


def ordered_methods(rows: list[dict]) -> list[tuple[tuple, list[dict]]]:
    """Rows by method, in report order."""
    return sorted(by_method(rows).items(), key=lambda kv: method_rank(kv[1][0]))


def memory_vs_l1(rows: list[dict]) -> list[tuple[str, Figure]]:
    """Attention memory against held-out L1 with error bars over seeds (the paper's Fig. 5a)."""
    figures = []
    train = train_rows(rows)
    machines = {machine_of(r) for r in train}
    for key, part in partition(train, train_key):
        machine, suite = key[0], key[1]
        methods = [
            (label, ok)
            for label, runs in train_methods(part)
            if (ok := [r for r in runs if r["status"] == "ok"])
        ]
        if not methods:
            continue
        with sns.axes_style(STYLE):
            fig = new_figure(8, 5)
            ax = fig.add_subplot()
            for colour, (label, runs) in zip(palette(len(methods)), methods):
                l1, l1_std = mean_std([r.get("test_l1") for r in runs])
                memory, memory_std = mean_std([r.get("attn_mem_bytes") for r in runs])
                if l1 is None or memory is None:
                    continue
                ax.errorbar(
                    memory / MIB,
                    l1,
                    yerr=l1_std or 0,
                    xerr=(memory_std or 0) / MIB,
                    fmt="o",
                    capsize=3,
                    color=colour,
                    label=f"{label} (n={len(runs)})",
                )
            ax.set_xlabel("attention memory, peak of the attention blocks at batch 1 (MiB)")
            ax.set_ylabel("held-out L1, mean ± std over seeds; lower is better (1)")
            first = part[0]
            ax.set_title(
                f"{suite}: attention memory against held-out L1 "
                f"({first.get('preset')}, {first.get('steps')} steps)\n{machine_name(machine)}",
                fontsize=10,
            )
            ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        figures.append((name_for(f"{slug(suite)}-memory-vs-l1", machine, machines), fig))
    return figures


def hit_curve(rows: list[dict]) -> list[tuple[str, Figure]]:
    """Copy hit rate at the largest decoder level (r = 1 px) against training step, from each
    run's ``hit_curve``: one line per method, mean over seeds with a ± sd band."""
    figures = []
    train = train_rows(rows)
    machines = {machine_of(r) for r in train}
    for key, part in partition(train, train_key):
        machine, suite = key[0], key[1]
        points = pd.DataFrame(
            [
                {"method": label, "step": point["step"], "hit rate": point["largest"]}
                for label, runs in train_methods(part)
                for r in runs
                if r["status"] == "ok"
                for point in r.get("hit_curve") or []
            ],
            columns=["method", "step", "hit rate"],
        ).dropna()
        if points.empty:
            continue
        methods = list(dict.fromkeys(points["method"]))  # report order
        with sns.axes_style(STYLE):
            fig = new_figure(8, 5)
            ax = fig.add_subplot()
            sns.lineplot(
                points,
                x="step",
                y="hit rate",
                hue="method",
                hue_order=methods,
                palette=palette(len(methods)),
                errorbar="sd",
                marker="o",
                ax=ax,
            )
            ax.set_xlabel("training step (count)")
            ax.set_ylabel("copy hit rate, largest level, r = 1 px; mean ± sd over seeds (1)")
            first = part[0]
            ax.set_title(
                f"{suite}: attention mass on the true source during training "
                f"({first.get('preset')}, batch {first.get('batch')})\n{machine_name(machine)}",
                fontsize=10,
            )
            sns.move_legend(ax, "center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title=None)
        figures.append((name_for(f"{slug(suite)}-hit-curve", machine, machines), fig))
    return figures


def scaling(rows: list[dict]) -> list[tuple[str, Figure]]:
    """Forward time and memory against tokens, log-log; cases not run marked at the top."""
    figures = []
    micro = micro_rows(rows)
    machines = {machine_of(r) for r in micro}
    for curve, part in partition(micro, series_key):
        machine, suite, dtype, channels, cv, batch, heads, inputs, self_attention = curve
        measured = [r for r in part if timed(r)]
        if len({tokens(r) for r in measured}) < 3:
            continue
        methods = ordered_methods(part)
        with sns.axes_style(STYLE):
            fig = new_figure(13, 5.5)
            axes = fig.subplots(1, 2)
            panels = (
                (axes[0], "time_fwd_ms", 1.0, "forward time, median (ms)"),
                (axes[1], "mem_fwd_bytes", MIB, "forward peak memory above the inputs (MiB)"),
            )
            for ax, key, unit, ylabel in panels:
                marked = False
                top = blended_transform_factory(ax.transData, ax.transAxes)
                for i, (colour, (_, rs)) in enumerate(zip(palette(len(methods)), methods)):
                    ok = sorted(
                        (tokens(r), r[key] / unit)
                        for r in rs
                        if timed(r) and r.get(key) is not None and r[key] > 0
                    )
                    label = rs[0]["label"] if len({r["label"] for r in rs}) == 1 else None
                    label = label or method_label(rs[0]["impl"], rs[0].get("params") or {})
                    if ok:
                        ax.plot(*zip(*ok), marker="o", color=colour, label=label)
                    else:  # only not-run markers: still named in the legend
                        ax.plot([], [], NOT_RUN_MARKER, color=colour, label=f"{label}: not run")
                    for n in sorted({tokens(r) for r in rs if r["status"] != "ok"}):
                        ax.plot(
                            n * JITTER ** (i - (len(methods) - 1) / 2),  # apart, not on top
                            0.97,
                            NOT_RUN_MARKER,
                            color=colour,
                            markersize=9,
                            transform=top,
                            clip_on=False,
                        )
                        marked = True
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("query map height x width (tokens)")
                ax.set_ylabel(ylabel)
                if marked:
                    ax.plot([], [], NOT_RUN_MARKER, color="0.3", label="not run (status not ok)")
            axes[0].set_title("forward time")
            axes[1].set_title("forward memory")
            axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
            suite_text, _, machine_text = series_heading(curve).partition(" — ")
            fig.suptitle(
                f"time and memory against tokens: {suite_text}\n{machine_text}", fontsize=11
            )
        extra = [f"cv{cv}"] if cv != channels else []
        extra += [f"b{batch}h{heads}"] if batch * heads > 1 else []
        extra += [slug(inputs)] if inputs not in (None, "gaussian") else []
        extra += [] if self_attention else ["cross"]
        extra += [] if dtype == "float32" else [slug(dtype)]
        base = "-".join([slug(suite), "time-memory", f"c{channels}", *extra])
        figures.append((name_for(base, machine, machines), fig))
    return figures


def kappa(rows: list[dict]) -> list[tuple[str, Figure]]:
    """GPA's κ ablation (the paper's Fig. 7a): held-out L1 against κ, exact and none as lines."""
    figures = []
    train = train_rows(rows)
    machines = {machine_of(r) for r in train}
    for key, part in partition(train, train_key):
        machine, suite = key[0], key[1]
        groups = kappa_groups([r for r in part if r["status"] == "ok"])
        if not groups:
            continue
        with sns.axes_style(STYLE):
            fig = new_figure(8, 5)
            ax = fig.add_subplot()
            colours = palette(len(groups) + 2)
            for colour, ((impl, rest), group) in zip(colours, groups):
                points = []
                for (topk,), runs in partition(group, lambda r: (topk_of(r),)):
                    mean, std = mean_std([r.get("test_l1") for r in runs])
                    if mean is not None:
                        points.append((topk, mean, std or 0))
                if not points:  # no held-out L1 in these runs
                    continue
                ks, means, stds = zip(*points)
                label = f"{impl} ({rest})" if rest else impl
                ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, color=colour, label=label)
            references = reference_runs([r for r in part if r["status"] == "ok"])
            for colour, impl in zip(colours[len(groups) :], (BASELINE, NO_ATTENTION)):
                mean, _ = mean_std([r.get("test_l1") for r in references[impl]])
                if mean is not None:
                    ax.axhline(mean, ls="--", color=colour, label=f"{impl} (mean over seeds)")
            ax.set_xscale("log", base=2)
            all_ks = sorted({topk_of(r) for _, group in groups for r in group})
            ax.set_xticks(all_ks, labels=[str(k) for k in all_ks])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("κ, key blocks kept per query cell, log scale (count)")
            ax.set_ylabel("held-out L1, mean ± std over seeds (1)")
            ax.set_title(
                f"{suite}: GPA's κ ablation on held-out L1\n{machine_name(machine)}", fontsize=10
            )
            ax.legend(fontsize=8)
        figures.append((name_for(f"{slug(suite)}-kappa", machine, machines), fig))
    return figures


def memory_of(row: dict) -> tuple[int | None, str]:
    """A fidelity row's memory and what it is: measured, or the runner's prediction, which
    covers forward+backward when the case computed gradients."""
    if row.get("mem_fwd_bytes") is not None:
        return row["mem_fwd_bytes"], "measured forward"
    backward = row.get("rel_err_grad") is not None
    return row.get("mem_predicted_bytes"), (
        "predicted forward+backward" if backward else "predicted forward"
    )


def fidelity_vs_memory(rows: list[dict]) -> list[tuple[str, Figure]]:
    """Relative error against memory per input family (warp-match per sharpness), one figure
    per suite and map."""
    figures = []
    scored = scored_rows(rows)
    machines = {machine_of(r) for r in scored}

    def key(r: dict) -> tuple:
        maps = (r["q_h"], r["q_w"], r["kv_h"], r["kv_w"])
        return series_key(r)[:-2] + maps  # every input family in one figure

    for fig_key, part in partition(scored, key):
        machine, suite, dtype, channels, cv, batch, heads, q_h, q_w, kv_h, kv_w = fig_key
        facets = sorted({(r.get("inputs"), r.get("sharpness")) for r in part}, key=sort_key)
        labels = sorted(
            {r["label"] for r in part},
            key=lambda lb: min(method_rank(r) for r in part if r["label"] == lb),
        )
        colours = dict(zip(labels, palette(len(labels))))
        markers = {lb: MARKERS[i % len(MARKERS)] for i, lb in enumerate(labels)}
        kinds = sorted({memory_of(r)[1] for r in part})
        hollow = kinds[1:]  # a second kind of memory value gets hollow markers
        columns = min(len(facets), FACET_COLUMNS)
        lines = math.ceil(len(facets) / columns)
        with sns.axes_style(STYLE):
            fig = new_figure(5 * columns + 2.5, 4.8 * lines)
            axes = list(fig.subplots(lines, columns, squeeze=False).flat)
            for ax in axes[len(facets) :]:
                ax.remove()  # the last row's empty places
            axes = axes[: len(facets)]
            for ax, (family, sharpness) in zip(axes, facets):
                same = [
                    r for r in part if (r.get("inputs"), r.get("sharpness")) == (family, sharpness)
                ]
                for r in sorted(same, key=method_rank):
                    memory, kind = memory_of(r)
                    if memory is None or memory <= 0 or r["rel_err_out"] <= 0:
                        continue
                    colour = colours[r["label"]]
                    ax.scatter(
                        memory / MIB,
                        r["rel_err_out"],
                        color="none" if kind in hollow else colour,
                        edgecolors=colour,
                        marker=markers[r["label"]],
                        label=r["label"],
                        s=36,
                    )
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
                what = kinds[0] + (f"; hollow: {', '.join(hollow)}" if hollow else "")
                ax.set_xlabel(f"peak memory above the inputs, {what} (MiB)")
                ax.set_ylabel("relative L2 error of the output (1)")
                ax.set_title(
                    f"{family} inputs" + ("" if sharpness is None else f", sharpness {sharpness:g}")
                )
            handles, names = [], []
            for ax in axes:
                for handle, name in zip(*ax.get_legend_handles_labels()):
                    if name not in names:
                        handles.append(handle)
                        names.append(name)
            fig.legend(handles, names, fontsize=8, loc="outside right center")
            where = f"{q_h}x{q_w} map" + (
                "" if (kv_h, kv_w) == (q_h, q_w) else f", kv {kv_h}x{kv_w}"
            )
            shape = f"C = {channels}" + (f", Cv = {cv}" if cv != channels else "")
            shape += f", B x H = {batch} x {heads}" if batch * heads > 1 else ""
            fig.suptitle(
                f"{suite}: fidelity against memory ({where}, {shape}, {dtype})"
                f"\n{machine_name(machine)}",
                fontsize=11,
            )
        parts = [slug(suite), "error-vs-memory", f"{q_h}x{q_w}"]
        parts += [] if (kv_h, kv_w) == (q_h, q_w) else [f"kv{kv_h}x{kv_w}"]
        parts += [f"c{channels}"] + ([f"cv{cv}"] if cv != channels else [])
        parts += [f"b{batch}h{heads}"] if batch * heads > 1 else []
        parts += [] if dtype == "float32" else [slug(dtype)]
        figures.append((name_for("-".join(parts), machine, machines), fig))
    return figures


PLOTS = (memory_vs_l1, hit_curve, scaling, kappa, fidelity_vs_memory)


def all_plots(rows: list[dict]) -> list[tuple[str, Figure]]:
    """Every plot made from rows, in report order."""
    return [item for make in PLOTS for item in make(rows)]
