"""Result rows: one JSON object per line, written as soon as a case ends, read back tolerantly.

Every row carries its context (device, threads, versions, git commit) so that rows from
different machines are never mixed up. A metric that could not be computed is null and the
reason is in ``reason``.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import math
import os
import subprocess
import warnings
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from attnbench.schema import (
    MACHINE_KEYS,
    NUMBER_KEYS,
    REQUIRED_KEYS,
    SCHEMAS,
    STATUSES,
)


def git_commit() -> str | None:
    """The commit of the attnbench source tree (``-dirty`` if it has changes), or None.

    Where the tree is no git checkout (a copy sent to another machine, an installed wheel),
    ``ATTNBENCH_GIT_COMMIT`` names the commit it was made from, if set.
    """
    root = Path(__file__).resolve().parents[1]
    given = os.environ.get("ATTNBENCH_GIT_COMMIT") or None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return given
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return given
    return commit.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def context(device: str) -> dict:
    """The keys every row of this process shares: where and with what it was measured."""
    import torch

    from attnbench import __version__
    from attnbench.measure import device_name

    return {
        "device": device,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "attnbench_version": __version__,
        "git_commit": git_commit(),
    }


def new_row(case, kind: str, ctx: dict, dtype: str) -> dict:
    """A row for ``case`` with every required key, status ok and its kind's keys null."""
    row = {
        "suite": case.suite,
        "kind": kind,
        "case_id": case.case_id,
        "impl": case.impl,
        "params": case.params_dict,
        "label": case.impl,
        "status": "ok",
        "reason": None,
        **ctx,
        "dtype": dtype,
        "timestamp": None,
        "seed": case.seed,
        "impl_class": impl_class(case.impl),
    }
    row.update(dict.fromkeys(SCHEMAS[kind].keys))
    return row


def impl_class(name: str) -> str | None:
    """The class that implements ``name`` (``module.Class``), so that a row says which code it
    measured even where a plugin replaced a built-in; None for a name not registered."""
    from attnbench import registry

    try:
        return registry.class_path(name)
    except ValueError:
        return None


def now() -> str:
    """UTC timestamp, ISO 8601, seconds."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def append_row(path: str | os.PathLike, row: dict) -> None:
    """Append one row and make it durable (flush and fsync) before returning."""
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        raise ValueError(f"row for {row.get('label')!r} lacks required keys: {missing}")
    if row["status"] not in STATUSES:
        raise ValueError(f"status={row['status']!r} (allowed: {', '.join(STATUSES)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row, allow_nan=False) + "\n"
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a row cut off by a kill: keep it apart from this one
                line = "\n" + line
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def drop_rows(path: str | os.PathLike, status: str) -> int:
    """Remove the rows of ``status`` from ``path`` atomically (a new file renamed over it).

    Lines that do not parse stay as they are. Returns how many rows were removed.
    """
    path = Path(path)
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("status") == status:
                    dropped += 1
                    continue
            except json.JSONDecodeError:
                pass
            kept.append(line if line.endswith("\n") else line + "\n")
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return dropped


def read_rows(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Rows of every file in ``paths`` (a directory means its ``*.jsonl``), in order.

    A line that does not parse — a run killed while writing — is skipped with a warning.
    """
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        files += sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
    rows = []
    for file in files:
        with open(file) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    warnings.warn(
                        f"{file}:{number}: skipped a truncated or malformed row", stacklevel=2
                    )
    return rows


def row_problem(row) -> str | None:
    """Why ``row`` is not a result row, or None."""
    if not isinstance(row, dict):
        return f"not a JSON object but {type(row).__name__}"
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        return f"without the required keys {missing}"
    if row["kind"] not in SCHEMAS:
        return f"kind={row['kind']!r} (allowed: {', '.join(SCHEMAS)})"
    schema = SCHEMAS[row["kind"]]
    missing = [k for k in schema.required if row.get(k) is None]
    if missing:
        return f"a {row['kind']} row without {missing}"
    if row["status"] not in STATUSES:
        return f"status={row['status']!r} (allowed: {', '.join(STATUSES)})"
    wrong = [
        f"{key}={row[key]!r}"
        for key in schema.keys
        if key in schema.numbers
        and row.get(key) is not None
        and (isinstance(row[key], bool) or not isinstance(row[key], (int, float)))
    ]
    if wrong:
        return f"not numbers: {', '.join(wrong)}"
    infinite = [
        f"{key}={row[key]!r}"
        for key in schema.keys
        if key in schema.numbers and row.get(key) is not None and not math.isfinite(row[key])
    ]
    if infinite:  # NaN, Infinity or a literal beyond float range: a metric is a number or null
        listed = ", ".join(infinite)
        return f"not finite numbers (a metric that could not be computed is null): {listed}"
    return None


Paths = str | os.PathLike | Iterable[str | os.PathLike]


def results_files(paths: Paths) -> list[Path]:
    """The results files ``paths`` names, each once, in order: a path, a Path, a glob
    (``runs/*-cpu.jsonl``) or a list of them, as pandas' readers take; a directory stands for
    its ``*.jsonl``.

    Raises:
        FileNotFoundError: a path (or glob) that matches nothing, or no results file at all.
    """
    names = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    files: list[Path] = []
    for name in names:
        path = Path(name)
        matches = [path] if path.exists() else [Path(m) for m in sorted(glob.glob(str(name)))]
        if not matches:
            raise FileNotFoundError(f"results path {str(name)!r} does not exist")
        for match in matches:
            for file in sorted(match.glob("*.jsonl")) if match.is_dir() else [match]:
                if file.resolve() not in [f.resolve() for f in files]:
                    files.append(file)
    if not files:
        raise FileNotFoundError(f"no *.jsonl results file in {', '.join(map(str, names))}")
    return files


def valid_rows(paths: Paths) -> list[dict]:
    """The result rows of every ``*.jsonl`` file in ``paths`` (:func:`results_files`), each
    file once, as dicts.

    A row's ``grid_png`` (relative to its results file) is resolved into ``grid_png_path``.
    A line that is not a row (:func:`row_problem`: not an object, an unknown ``kind`` or
    ``status``, without the keys its kind needs, a number that is not one) is skipped with a
    warning naming the file, the row and the keys.

    Raises:
        FileNotFoundError: a path that does not exist, or no results file at all.
        ValueError: the files hold no rows.
    """
    rows = []
    files = results_files(paths)
    for file in files:
        for number, row in enumerate(read_rows([file]), 1):
            problem = row_problem(row)
            if problem:
                warnings.warn(f"{file}: row {number} skipped: {problem}", stacklevel=2)
                continue
            if row.get("grid_png"):
                row["grid_png_path"] = str(file.parent / row["grid_png"])
            rows.append(row)
    if not rows:
        raise ValueError(f"no result rows in {', '.join(map(str, files))}")
    return rows


def machine_name(machine: tuple) -> str:
    """``Intel(R) Xeon(R) Processor (cpu), 2 threads, torch 2.14.1`` for the values of
    :data:`MACHINE_KEYS`."""
    device, name, threads, torch_version = machine
    threads_text = {1: "1 thread", None: "threads unknown"}.get(threads, f"{threads} threads")
    return f"{name} ({device}), {threads_text}, torch {torch_version}"


def typed(values: pd.Series) -> pd.Series:
    """A column of JSON values as its type: integers as int64 (pandas' nullable Int64 where some
    rows have none), other numbers as float64 with NaN for null, anything else as it is."""
    kinds = {type(v) for v in values.dropna()}
    if kinds and kinds <= {int}:
        return values.astype("int64" if values.notna().all() else "Int64")
    if kinds and kinds <= {int, float}:
        return values.astype("float64")
    return values


def frame(rows: list[dict], kind: str | None = None) -> pd.DataFrame:
    """Rows (dicts as :func:`valid_rows` gives them) as a DataFrame: see :func:`load`."""
    if kind is not None and kind not in SCHEMAS:
        raise ValueError(f"kind={kind!r} (allowed: {', '.join(SCHEMAS)})")
    rows = [r for r in rows if kind in (None, r["kind"])]
    flat = [
        {k: v for k, v in r.items() if k != "params"}
        | {f"params.{k}": v for k, v in (r.get("params") or {}).items()}
        for r in rows
    ]
    df = pd.DataFrame(
        {
            key: pd.Series([r.get(key) for r in flat], dtype=object)
            for key in dict.fromkeys(
                [*(k for k in REQUIRED_KEYS if k != "params"), *(k for r in flat for k in r)]
            )
        }
    )
    for key in df:
        df[key] = typed(df[key])
        if key in NUMBER_KEYS and df[key].dtype == object:  # null in every row
            df[key] = df[key].astype("float64")
    df["status"] = pd.Categorical(df["status"], categories=STATUSES)
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True, format="ISO8601")
    machines = [tuple(r.get(k) for k in MACHINE_KEYS) for r in rows]
    order = sorted(set(machines), key=lambda m: [(v is not None, v) for v in m])
    df["machine"] = pd.Categorical(
        [machine_name(m) for m in machines],
        categories=list(dict.fromkeys(map(machine_name, order))),
    )
    key = ["machine", "suite", "case_id", "seed"]
    for _, repeat in df[df.duplicated(key)].iterrows():
        warnings.warn(
            f"case {repeat['case_id']} of suite {repeat['suite']!r} is in the rows more than "
            "once; keeping the newest",
            stacklevel=3,
        )
    newest = df.sort_values("timestamp", kind="stable").drop_duplicates(key, keep="last")
    return newest.sort_index().reset_index(drop=True)


def load(paths: Paths, kind: str | None = None) -> pd.DataFrame:
    """Every result row of ``paths`` (a file or directory of ``*.jsonl``, a glob, or a list of
    them: :func:`results_files`) as a DataFrame.

    Rows are validated as by :func:`valid_rows` (lines that are not rows are skipped with a
    warning). One column per key; ``params`` becomes one ``params.<name>`` column per
    parameter (empty where a row lacks it); integers are int64 (nullable Int64 where some rows
    lack them), other numbers float64 with NaN for null; ``status`` is a categorical of
    :data:`STATUSES`; ``timestamp`` a UTC datetime; ``machine`` names the device, processor or
    GPU, thread count and torch version in one categorical, so that grouping by it never mixes
    machines.
    A case seen twice on one machine (same suite, case and seed) is kept once: the newest.
    ``kind`` (``micro`` or ``train``) keeps the rows of that kind only.
    """
    return frame(valid_rows(paths), kind)
