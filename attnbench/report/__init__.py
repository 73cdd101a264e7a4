"""``attnbench report``: tables and plots from the result frame of :func:`attnbench.results.load`.

:func:`write_report` writes

- ``tables/<name>.md`` and ``tables/<name>.csv`` for every table of :mod:`.tables`,
- ``plots/<name>.png`` for every plot of :mod:`.plots` and the pictures of :mod:`.pictures`
  (the PNGs an earlier report wrote there, listed in ``plots/.attnbench-plots``, that this one
  does not write are removed; nothing else in the folder is touched),
- ``report.md``: every table and plot on one page.

The same rows always give byte-identical tables and ``report.md`` (rows are sorted by content,
numbers formatted with fixed formats, and nothing depends on the time or the machine that makes
the report).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import pandas as pd

from attnbench.report.table import Table, prepare
from attnbench.report.tables import all_tables
from attnbench.report.train_tables import train_methods

__all__ = ["write_report"]

TITLE = "# attnbench results"


def picture_figures(rows: pd.DataFrame) -> list[tuple[str, object]]:
    """Figures drawn from images rather than numbers: copying outputs, GPA's selected keys.

    A grid PNG that is missing or unreadable is left out with a warning.
    """
    from attnbench.report.discovery import experiment_sections
    from attnbench.report.pictures import copying_outputs_figure, selected_keys_figure
    from attnbench.report.plots import name_for, slug
    from attnbench.tasks import TASKS

    figures = []
    shown = [name for name, task in TASKS.items() if task.outputs_figure]
    train = rows[(rows["kind"] == "train") & rows["task"].isin(shown)]
    grids = train[(train["status"] == "ok") & train["grid_png_path"].notna()]
    machines = grids.groupby("suite")["machine"].agg(set)  # per suite, as the plots name theirs
    for (machine, suite, *_), part in experiment_sections(train):
        entries = []
        for method, first in train_methods(part).iterrows():
            runs = grids[grids.set_index(["impl", "params_text", "generator_text"]).index == method]
            paths = [Path(p) for p in runs.sort_values("seed")["grid_png_path"]]
            entries += [(first["method"], path) for path in paths if path.exists()][:1]
        if not entries:
            continue
        first = part.iloc[0]
        title = (
            f"{suite}: held-out outputs per method (its lowest seed with a grid; "
            f"{first['preset']}, batch {first['batch']})"
        )
        try:
            figure = copying_outputs_figure(entries, title)
        except (ValueError, OSError) as err:
            warnings.warn(f"copying outputs of suite {suite!r} left out: {err}", stacklevel=2)
            continue
        figures.append(
            (name_for(f"{slug(suite)}-outputs", machine, machines.get(suite, set())), figure)
        )
    if rows["impl"].str.startswith("gpa.").any():
        # Both affinities: with "dot" the kept blocks scatter on this example, with "euclid"
        # (the authors' module) they gather around the true match — worth seeing side by side.
        for affinity in ("dot", "euclid"):
            figures.append(
                (f"gpa-selected-keys-{affinity}", selected_keys_figure(affinity=affinity))
            )
    return figures


def unique(names: list[str]) -> list[str]:
    """``names`` with repeats numbered (``x``, ``x-2``, ...), in order: no plot overwrites
    another."""
    numbers = pd.Series(names).groupby(names).cumcount() + 1
    return [name if n == 1 else f"{name}-{n}" for name, n in zip(names, numbers)]


def report_markdown(rows: pd.DataFrame, tables: list[Table], plot_names: list[str]) -> str:
    """The one-page report: machines, every table, every plot."""
    machines = sorted(rows["machine"].unique())
    lines = [
        TITLE,
        "",
        f"Made by `attnbench report` from {len(rows)} result rows. Rows measured on different "
        "machines, thread counts or torch versions are never combined; each section names its "
        "machine. Tables as CSV: `tables/`.",
        "",
        "Machines:",
        "",
        *[f"- {m}" for m in machines],
        "",
    ]
    for table in tables:
        lines.append(table.markdown())
    if plot_names:
        lines += ["## Plots", ""]
        lines += [f"![{name}](plots/{name}.png)\n" for name in plot_names]
    return "\n".join(lines).rstrip("\n") + "\n"


MANIFEST = ".attnbench-plots"  # in plots/: the PNG names the last report wrote there


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` whole or not at all (a temporary file beside it, renamed over it), so an
    interrupted report or a full disk never leaves half a table."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_plots(rows: pd.DataFrame, plot_dir: Path) -> tuple[list[str], list[Path]]:
    """Every figure as ``plot_dir/<name>.png``; the PNGs an earlier report wrote there (its
    manifest) that this one does not are removed, and no other file is touched."""
    from attnbench.report.plots import all_plots

    plot_dir.mkdir(parents=True, exist_ok=True)
    figures = all_plots(rows) + picture_figures(rows)
    names = unique([name for name, _ in figures])
    written = []
    for name, (_, figure) in zip(names, figures):
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=110, metadata={"Software": None})
        write_atomic(plot_dir / f"{name}.png", png.getvalue())
        written.append(plot_dir / f"{name}.png")
    manifest = plot_dir / MANIFEST
    earlier = manifest.read_text().split() if manifest.exists() else []
    for stale in sorted(set(earlier) - set(names)):
        (plot_dir / f"{stale}.png").unlink(missing_ok=True)  # a plot whose rows are gone
    write_atomic(manifest, "".join(f"{name}\n" for name in sorted(names)))
    return names, written


def write_report(rows, out: str | os.PathLike, plots: bool = True) -> list[Path]:
    """Write tables (Markdown and CSV), plots (PNG) and ``report.md`` under ``out``, each file
    atomically; nothing else under ``out`` is changed.

    Args:
        rows: the frame of :func:`attnbench.results.load` (or rows as dicts).

    Returns:
        The paths written.
    """
    rows = prepare(rows)
    out = Path(out)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    written = []
    tables = all_tables(rows)
    for table in tables:
        for suffix, text in ((".md", table.markdown()), (".csv", table.csv())):
            path = out / "tables" / f"{table.name}{suffix}"
            write_atomic(path, text)
            written.append(path)
    plot_names = []
    if plots:
        plot_names, pngs = write_plots(rows, out / "plots")
        written += pngs
    report = out / "report.md"
    write_atomic(report, report_markdown(rows, tables, plot_names))
    written.append(report)
    return written
