"""Run a suite: one results file per suite and device, one row per case, written at once.

The harness keeps the results file (``<out>/<suite>-<device>.jsonl``), its lock, resume,
retried errors and shards, and records a case that raises as a row with its status
(:func:`~attnbench.kinds.base.record_failure`); what a case measures is its kind's
(:mod:`attnbench.kinds`), which the harness never names. Rows are appended and fsynced as each
case ends, so an interrupted run loses nothing and ``resume`` continues it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from attnbench.kinds import KINDS
from attnbench.kinds.base import RunOptions, record_failure
from attnbench.results import append_row, drop_rows, now, read_rows


def resolve_device(requested: str) -> str:
    """``auto`` -> cuda when usable, else cpu; an unusable cuda is an error."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device=cuda was requested but CUDA is not available here (allowed: auto, cpu)"
        )
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"device={requested!r} (allowed: auto, cpu, cuda)")
    return requested


def output_path(suite, device: str, out_dir: str | Path) -> Path:
    """``<out_dir>/<suite>-<device>.jsonl``."""
    return Path(out_dir) / f"{suite.name}-{device}.jsonl"


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N) with 1 <= i <= N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r} (allowed: i/N with integers, e.g. 1/4)") from None
    if not 1 <= i <= n:
        raise ValueError(f"--shard {text!r} (allowed: 1 <= i <= N)")
    return i, n


def take_shard(cases: list, shard: tuple[int, int]) -> list:
    """The i-th of N interleaved shares of ``cases``."""
    i, n = shard
    return [c for idx, c in enumerate(cases) if idx % n == i - 1]


def is_main_process() -> bool:
    """False on the ranks other than 0 of a torchrun launch."""
    return int(os.environ.get("RANK", "0")) == 0


def case_ids(suite, device: str) -> set[str]:
    """The ids of every case of ``suite`` on ``device``: rows with other ids in its results
    file come from another configuration of it."""
    return {case.case_id for case in KINDS[suite.kind].expand(suite, device)}


def prepare_output(
    suite, device: str, out_dir: str | Path, resume: bool, overwrite: bool, retry_errors: bool
) -> tuple[Path, dict[str, dict]]:
    """The results file and the rows it already holds by case id (with ``resume``).

    ``retry_errors`` (with ``resume``) first removes the rows whose status is ``error``, so that
    those cases run again. Other files the suite's kind keeps beside it are refused without
    ``resume`` and removed with ``overwrite``.
    """
    path = output_path(suite, device, out_dir)
    if path.exists() and path.stat().st_size and not (resume or overwrite):
        raise ValueError(
            f"{path} already holds rows: pass --resume to continue it, --overwrite to start it "
            "afresh, or --out to write elsewhere"
        )
    if overwrite and path.exists():
        path.unlink()
    KINDS[suite.kind].claim_outputs(suite, path, device, resume, overwrite)
    if retry_errors and path.exists():
        drop_rows(path, "error")
    done = {r.get("case_id"): r for r in read_rows([path])} if resume and path.exists() else {}
    return path, done


@contextlib.contextmanager
def results_lock(path: Path):
    """Hold an exclusive lock on ``path`` (``<path>.lock``, fcntl) while a run writes it.

    Raises:
        ValueError: another process holds it; the message names that process.
    """
    lock_file = path.with_name(path.name + ".lock")
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise ValueError(
                f"{path} is being written by another run (process {holder}): wait for it to "
                "end, or pass --out to write elsewhere"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def run_suite(suite, out_dir: str | Path = "results/raw", **options) -> tuple[Path, list[dict]]:
    """Run ``suite`` (or its ``shard`` i/N share), appending rows to its results file.

    Options: ``resume``, ``overwrite``, ``retry_errors``, ``shard`` (i, N), ``device``,
    ``progress``, ``min_run_time`` (see :func:`run_unlocked`). One process writes a results
    file at a time: the first process of a run (rank 0 under torchrun) holds its lock.

    Returns:
        The results file and the rows written by this call.
    Raises:
        ValueError: the file exists and neither ``resume`` nor ``overwrite`` is set, another
        run is writing it, or a bad device or shard.
    """
    device = resolve_device(options.pop("device", None) or suite.device)
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {str(out_dir)!r} cannot hold results: {err.strerror}") from None
    if not os.access(out_dir, os.W_OK):
        raise ValueError(f"--out {str(out_dir)!r} cannot hold results: not writable")
    if not is_main_process():
        return run_unlocked(suite, out_dir, device=device, **options)
    with results_lock(output_path(suite, device, out_dir)):
        return run_unlocked(suite, out_dir, device=device, **options)


def run_unlocked(
    suite,
    out_dir: str | Path = "results/raw",
    *,
    resume: bool = False,
    overwrite: bool = False,
    retry_errors: bool = False,
    shard: tuple[int, int] = (1, 1),
    device: str | None = None,
    progress: bool = True,
    min_run_time: float | None = None,
) -> tuple[Path, list[dict]]:
    """:func:`run_suite` without the lock on the results file: the kind's session measures
    each case not yet in the file into a row; rank 0 appends it."""
    from tqdm import tqdm

    device = resolve_device(device or suite.device)
    resume = resume or retry_errors
    path, done = prepare_output(suite, device, out_dir, resume, overwrite, retry_errors)
    kind = KINDS[suite.kind]
    mine = take_shard(kind.expand(suite, device), shard)
    todo = [c for c in mine if c.case_id not in done]
    options = RunOptions(Path(out_dir), device, resume, progress, min_run_time)
    session = kind.start(suite, options, todo)
    for case in mine:  # a resumed run starts from what its finished cases taught the session
        if case.case_id in done:
            session.finished(case, done[case.case_id])
    rows = []
    bar = tqdm(todo, disable=not progress or not is_main_process(), unit=session.unit)
    for case in bar:
        bar.set_description(session.describe(case))
        row = session.empty_row(case)
        try:
            session.run(case, row)
        except Exception as err:  # a failing case becomes a row; the run goes on
            record_failure(row, err)
        row["timestamp"] = now()
        if is_main_process():
            append_row(path, row)
        rows.append(row)
        session.finished(case, row)
    return path, rows
