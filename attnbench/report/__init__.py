"""``attnbench report``: tables and plots from result rows.

:func:`load` reads rows from any number of files or directories; :func:`write_report` writes

- ``tables/<name>.md`` and ``tables/<name>.csv`` for every table of :mod:`.tables`,
- ``plots/<name>.png`` for every plot of :mod:`.plots` and the pictures of :mod:`.pictures`
  (PNGs of an earlier report in that folder that this one does not write are removed),
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

from attnbench.report.tables import Table, all_tables, machine_name, machine_of
from attnbench.results import MICRO_KEYS, REQUIRED_KEYS, STATUSES, TRAIN_KEYS, read_rows

TITLE = "# attnbench results"


NUMBER_KEYS = set(MICRO_KEYS + TRAIN_KEYS) - {"task", "copy_hit_rate"}
KIND_KEYS = {
    "micro": ("q_h", "q_w", "kv_h", "kv_w", "channels", "batch", "heads"),
    "train": (),
}


def load(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Rows of every ``*.jsonl`` file in ``paths`` (files or directories), each file once.

    A row's ``grid_png`` (relative to its results file) is resolved into ``grid_png_path``.
    A line that is not a row — not an object, an unknown ``kind``, or without the keys its kind
    needs — is skipped with a warning naming the file, the row and the keys. A row seen twice
    (same machine, suite and case) is kept once: the newest.

    Raises:
        FileNotFoundError: a path that does not exist, or no results file at all.
        ValueError: the files hold no rows.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"results path {str(p)!r} does not exist")
        for file in sorted(p.glob("*.jsonl")) if p.is_dir() else [p]:
            if file.resolve() not in [f.resolve() for f in files]:
                files.append(file)
    if not files:
        raise FileNotFoundError(f"no *.jsonl results file in {', '.join(map(str, paths))}")
    newest: dict[tuple, dict] = {}
    for file in files:
        for number, row in enumerate(read_rows([file]), 1):
            problem = row_problem(row)
            if problem:
                warnings.warn(f"{file}: row {number} skipped: {problem}", stacklevel=2)
                continue
            if row.get("grid_png"):
                row["grid_png_path"] = str(file.parent / row["grid_png"])
            key = (machine_of(row), row["suite"], row["case_id"], row["seed"])
            if key in newest:
                warnings.warn(
                    f"{file}: row {number} repeats case {row['case_id']} of suite "
                    f"{row['suite']!r}; keeping the newer",
                    stacklevel=2,
                )
                if str(newest[key].get("timestamp")) > str(row.get("timestamp")):
                    continue
            newest[key] = row
    if not newest:
        raise ValueError(f"no result rows in {', '.join(map(str, files))}")
    return list(newest.values())


def row_problem(row) -> str | None:
    """Why ``row`` cannot be reported, or None."""
    if not isinstance(row, dict):
        return f"not a JSON object but {type(row).__name__}"
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        return f"without the required keys {missing}"
    if row["kind"] not in KIND_KEYS:
        return f"kind={row['kind']!r} (allowed: {', '.join(KIND_KEYS)})"
    missing = [k for k in KIND_KEYS[row["kind"]] if row.get(k) is None]
    if missing:
        return f"a {row['kind']} row without {missing}"
    if row["status"] not in STATUSES:
        return f"status={row['status']!r} (allowed: {', '.join(STATUSES)})"
    numbers = MICRO_KEYS if row["kind"] == "micro" else TRAIN_KEYS
    wrong = [
        f"{key}={row[key]!r}"
        for key in numbers
        if key in NUMBER_KEYS
        and row.get(key) is not None
        and (isinstance(row[key], bool) or not isinstance(row[key], (int, float)))
    ]
    if wrong:
        return f"not numbers: {', '.join(wrong)}"
    return None


def picture_figures(rows: list[dict]) -> list[tuple[str, object]]:
    """Figures drawn from images rather than numbers: copying outputs, GPA's selected keys.

    A grid PNG that is missing or unreadable is left out with a warning.
    """
    from attnbench.report.pictures import copying_outputs_figure, selected_keys_figure
    from attnbench.report.plots import name_for, slug
    from attnbench.report.tables import partition, train_key, train_methods, train_rows

    figures = []
    train = [r for r in train_rows(rows) if r.get("task") == "copying"]
    machines = {machine_of(r) for r in train if r["status"] == "ok" and r.get("grid_png_path")}
    for key, part in partition(train, train_key):
        entries = []
        for label, runs in train_methods(part):
            grids = [
                Path(r["grid_png_path"])
                for r in sorted(runs, key=lambda r: r["seed"])
                if r["status"] == "ok" and r.get("grid_png_path")
            ]
            entries += [(label, grid) for grid in grids if grid.exists()][:1]
        if not entries:
            continue
        title = (
            f"{key[1]}: held-out outputs per method (its lowest seed with a grid; "
            f"{part[0].get('preset')}, batch {part[0].get('batch')})"
        )
        try:
            figure = copying_outputs_figure(entries, title)
        except (ValueError, OSError) as err:
            warnings.warn(f"copying outputs of suite {key[1]!r} left out: {err}", stacklevel=2)
            continue
        figures.append((name_for(f"{slug(key[1])}-outputs", key[0], machines), figure))
    if any(r["impl"].startswith("gpa.") for r in rows):
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
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


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

        plot_dir = out / "plots"
        plot_dir.mkdir(parents=True, exist_ok=True)
        figures = all_plots(rows) + picture_figures(rows)
        plot_names = unique([name for name, _ in figures])
        for name, (_, figure) in zip(plot_names, figures):
            path = plot_dir / f"{name}.png"
            figure.savefig(path, dpi=110, metadata={"Software": None})
            written.append(path)
        for stale in sorted(set(plot_dir.glob("*.png")) - set(written)):
            stale.unlink()  # a plot of an earlier report whose rows are gone
    report = out / "report.md"
    report.write_text(report_markdown(rows, tables, plot_names), encoding="utf-8")
    written.append(report)
    return written
