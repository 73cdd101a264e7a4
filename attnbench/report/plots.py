"""Plots from result rows, one figure per question (PNG, via seaborn on matplotlib).

Each function returns ``(name, figure)`` pairs; the caller saves them as ``plots/<name>.png``.
Every figure has a title, axes labelled with units and a legend. Figures are built on
:class:`matplotlib.figure.Figure` objects, so making a report touches no global pyplot state.
Rows of different machines never share a figure (:func:`attnbench.report.tables.machine_of`).
"""

from __future__ import annotations

import re
from collections import defaultdict

import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from matplotlib.transforms import blended_transform_factory

from attnbench.report.tables import (
    BASELINE,
    MIB,
    kappa_groups,
    machine_name,
    machine_of,
    mean_std,
    method_label,
    method_of,
    method_rank,
    micro_rows,
    partition,
    sort_key,
    timed,
    tokens,
    topk_of,
    train_key,
    train_rows,
)

STYLE = "whitegrid"
NOT_RUN_MARKER = "x"
JITTER = 1.06  # horizontal factor between the not-run markers of neighbouring methods


def slug(text: str) -> str:
    """A file-name part: lower case, runs of other characters as one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def palette(n: int) -> list:
    return sns.color_palette("tab10" if n <= 10 else "husl", n)


def name_for(base: str, machine: tuple, machines: set) -> str:
    """``base``, with the machine appended when the rows come from more than one machine."""
    return base if len(machines) == 1 else f"{base}-{slug(machine_name(machine))}"


def ordered_methods(rows: list[dict]) -> list[tuple[tuple, list[dict]]]:
    """Rows by method, in report order."""
    by_method: dict[tuple, list] = defaultdict(list)
    for r in rows:
        by_method[method_of(r)].append(r)
    return sorted(by_method.items(), key=lambda kv: method_rank(kv[1][0]))


def memory_vs_l1(rows: list[dict]) -> list[tuple[str, Figure]]:
    """Attention memory against held-out L1 with error bars over seeds (the paper's Fig. 5a)."""
    figures = []
    train = train_rows(rows)
    machines = {machine_of(r) for r in train}
    for key, part in partition(train, train_key):
        machine, suite = key[0], key[1]
        methods = ordered_methods([r for r in part if r["status"] == "ok"])
        if not methods:
            continue
        with sns.axes_style(STYLE):
            fig = new_figure(8, 5)
            ax = fig.add_subplot()
            for colour, (_, runs) in zip(palette(len(methods)), methods):
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
                    label=f"{runs[0]['label']} (n={len(runs)})",
                )
            ax.set_xlabel("attention memory, peak of the attention blocks at batch 1 (MiB)")
            ax.set_ylabel("held-out L1 (mean ± std over seeds; lower is better)")
            first = part[0]
            ax.set_title(
                f"{suite}: attention memory against held-out L1 "
                f"({first.get('preset')}, {first.get('steps')} steps)\n{machine_name(machine)}",
                fontsize=10,
            )
            ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        figures.append((name_for(f"{suite}-memory-vs-l1", machine, machines), fig))
    return figures


def scaling(rows: list[dict]) -> list[tuple[str, Figure]]:
    """Forward time and memory against tokens, log-log; cases not run marked at the top."""
    figures = []
    micro = [r for r in micro_rows(rows) if r.get("inputs") in (None, "gaussian")]
    machines = {machine_of(r) for r in micro}
    for (machine, suite, dtype, channels, batch, heads), part in partition(
        micro,
        lambda r: (machine_of(r), r["suite"], r["dtype"], r["channels"], r["batch"], r["heads"]),
    ):
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
                ax.set_xlabel("tokens per map (query map height x width)")
                ax.set_ylabel(ylabel)
                if marked:
                    ax.plot(
                        [], [], NOT_RUN_MARKER, color="0.3", label="not run (oom / unsupported)"
                    )
            axes[0].set_title("forward time")
            axes[1].set_title("forward memory")
            axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
            fig.suptitle(
                f"{suite}: time and memory against tokens (C = {channels}, B x H = "
                f"{batch} x {heads}, {dtype})\n{machine_name(machine)}",
                fontsize=11,
            )
        base = f"{suite}-time-memory-c{channels}" + (
            f"-b{batch}h{heads}" if batch * heads > 1 else ""
        )
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
                ks, means, stds = zip(*points)
                label = f"{impl} ({rest})" if rest else impl
                ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, color=colour, label=label)
            for colour, impl in zip(colours[len(groups) :], (BASELINE, "none")):
                mean, _ = mean_std([r.get("test_l1") for r in part if r["impl"] == impl])
                if mean is not None:
                    ax.axhline(mean, ls="--", color=colour, label=f"{impl} (mean over seeds)")
            ax.set_xscale("log", base=2)
            all_ks = sorted({topk_of(r) for _, group in groups for r in group})
            ax.set_xticks(all_ks, labels=[str(k) for k in all_ks])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("κ, key blocks kept per query cell (log scale)")
            ax.set_ylabel("held-out L1 (mean ± std over seeds)")
            ax.set_title(
                f"{suite}: GPA's κ ablation on held-out L1\n{machine_name(machine)}", fontsize=10
            )
            ax.legend(fontsize=8)
        figures.append((name_for(f"{suite}-kappa", machine, machines), fig))
    return figures


def fidelity_vs_memory(rows: list[dict]) -> list[tuple[str, Figure]]:
    """Relative error against memory per input family, one figure per suite and map."""
    figures = []
    scored = [
        r for r in micro_rows(rows) if r["status"] == "ok" and r.get("rel_err_out") is not None
    ]
    machines = {machine_of(r) for r in scored}
    for (machine, suite, dtype, q_h, q_w, channels), part in partition(
        scored, lambda r: (machine_of(r), r["suite"], r["dtype"], r["q_h"], r["q_w"], r["channels"])
    ):
        predicted = any(r.get("mem_fwd_bytes") is None for r in part)
        families = sorted({r.get("inputs") for r in part}, key=lambda x: sort_key((x,)))
        labels = [rs[0]["label"] for _, rs in ordered_methods(part)]
        colours = dict(zip(labels, palette(len(labels))))
        markers = dict(zip(labels, "osD^v<>pPX*hH8d" * 2))
        with sns.axes_style(STYLE):
            fig = new_figure(5 * len(families) + 2.5, 4.8)
            axes = fig.subplots(1, len(families), squeeze=False)[0]
            for ax, family in zip(axes, families):
                for r in sorted((r for r in part if r.get("inputs") == family), key=method_rank):
                    memory = r.get("mem_fwd_bytes") or r.get("mem_predicted_bytes")
                    if not memory or r["rel_err_out"] <= 0:
                        continue
                    ax.scatter(
                        memory / MIB,
                        r["rel_err_out"],
                        color=colours[r["label"]],
                        marker=markers[r["label"]],
                        label=r["label"],
                        s=36,
                    )
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
                what = "predicted forward memory" if predicted else "forward peak memory"
                ax.set_xlabel(f"{what} (MiB)")
                ax.set_ylabel("relative L2 error of the output (1)")
                ax.set_title(f"{family} inputs")
            handles, names = [], []
            for ax in axes:
                for handle, name in zip(*ax.get_legend_handles_labels()):
                    if name not in names:
                        handles.append(handle)
                        names.append(name)
            axes[-1].legend(
                handles, names, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5)
            )
            fig.suptitle(
                f"{suite}: fidelity against memory ({q_h}x{q_w} map, C = {channels}, {dtype})"
                f"\n{machine_name(machine)}",
                fontsize=11,
            )
        base = f"{suite}-error-vs-memory-{q_h}x{q_w}-c{channels}"
        figures.append((name_for(base, machine, machines), fig))
    return figures


PLOTS = (memory_vs_l1, scaling, kappa, fidelity_vs_memory)


def all_plots(rows: list[dict]) -> list[tuple[str, Figure]]:
    """Every plot made from rows, in report order."""
    return [item for make in PLOTS for item in make(rows)]
