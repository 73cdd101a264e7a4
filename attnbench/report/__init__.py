"""``attnbench report``: tables and plots from result rows.

:func:`load` reads rows from any number of files or directories; :func:`write_report` writes

- ``tables/<name>.md`` and ``tables/<name>.csv`` for every table of :mod:`.tables`,
- ``plots/<name>.png`` for every plot of :mod:`.plots` and the pictures of :mod:`.pictures`,
- ``report.md``: every table and plot on one page.

The same rows always give byte-identical tables and ``report.md`` (rows are sorted by content,
numbers formatted with fixed formats, and nothing depends on the time or the machine that makes
the report).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

from attnbench.report.tables import Table, all_tables, machine_name, machine_of, method_rank
from attnbench.results import REQUIRED_KEYS, read_rows

TITLE = "# attnbench results"


def load(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Rows of every ``*.jsonl`` file in ``paths`` (files or directories).

    A row's ``grid_png`` (relative to its results file) is resolved into ``grid_png_path``.
    A row without the required keys is skipped with a warning naming the file and the keys.

    Raises:
        FileNotFoundError: a path that does not exist, or no results file at all.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"results path {str(p)!r} does not exist")
        files += sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"no *.jsonl results file in {', '.join(map(str, paths))}")
    rows = []
    for file in files:
        for row in read_rows([file]):
            missing = [k for k in REQUIRED_KEYS if k not in row]
            if missing:
                warnings.warn(f"{file}: skipped a row without {missing}", stacklevel=2)
                continue
            if row.get("grid_png"):
                row["grid_png_path"] = str(file.parent / row["grid_png"])
            rows.append(row)
    return rows


def pictures(rows: list[dict]) -> list[tuple[str, object]]:
    """Figures drawn from images rather than numbers: copying outputs, GPA's selected keys."""
    from attnbench.report.pictures import copying_outputs_figure, selected_keys_figure
    from attnbench.report.plots import name_for, slug
    from attnbench.report.tables import partition, train_key, train_rows

    figures = []
    train = [r for r in train_rows(rows) if r["status"] == "ok" and r.get("grid_png_path")]
    machines = {machine_of(r) for r in train}
    for key, part in partition(train, train_key):
        first_seed: dict[str, dict] = {}
        for r in sorted(part, key=lambda r: method_rank(r) + (r["seed"],)):
            if Path(r["grid_png_path"]).exists():
                first_seed.setdefault(r["label"], r)
        if not first_seed:
            continue
        entries = [(label, Path(r["grid_png_path"])) for label, r in first_seed.items()]
        title = (
            f"{key[1]}: held-out outputs per method (seed {min(r['seed'] for r in part)}, "
            f"{part[0].get('preset')}, {part[0].get('steps')} steps)"
        )
        name = name_for(f"{slug(key[1])}-outputs", key[0], machines)
        figures.append((name, copying_outputs_figure(entries, title)))
    if any(r["impl"].startswith("gpa.") for r in rows):
        # Both affinities: with "dot" the kept blocks scatter on this example, with "euclid"
        # (the authors' module) they gather around the true match — worth seeing side by side.
        for affinity in ("dot", "euclid"):
            figures.append(
                (f"gpa-selected-keys-{affinity}", selected_keys_figure(affinity=affinity))
            )
    return figures


def report_markdown(rows: list[dict], tables: list[Table], plot_names: list[str]) -> str:
    """The one-page report: machines, every table, every plot."""
    machines = sorted({machine_name(machine_of(r)) for r in rows})
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


def write_report(rows: list[dict], out: str | os.PathLike, plots: bool = True) -> list[Path]:
    """Write tables (Markdown and CSV), plots (PNG) and ``report.md`` under ``out``.

    Returns:
        The paths written.
    """
    out = Path(out)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    written = []
    tables = all_tables(rows)
    for table in tables:
        for suffix, text in ((".md", table.markdown()), (".csv", table.csv())):
            path = out / "tables" / f"{table.name}{suffix}"
            path.write_text(text, encoding="utf-8")
            written.append(path)
    plot_names = []
    if plots:
        from attnbench.report.plots import all_plots

        (out / "plots").mkdir(parents=True, exist_ok=True)
        for name, figure in all_plots(rows) + pictures(rows):
            path = out / "plots" / f"{name}.png"
            figure.savefig(path, dpi=110, metadata={"Software": None})
            written.append(path)
            plot_names.append(name)
    report = out / "report.md"
    report.write_text(report_markdown(rows, tables, plot_names), encoding="utf-8")
    written.append(report)
    return written
