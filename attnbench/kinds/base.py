"""The seam between the harness and an experiment kind.

An experiment kind (micro-benchmark, training) is one :class:`Kind`: its suite model, the
checks the model cannot express, how a suite expands into cases, how a run of the suite
measures one case into a row (a :class:`Session`), and the summary printed after a run. The
harness (:mod:`attnbench.harness`: the results file, its lock, resume, retried errors, shards)
calls these and names no kind; :func:`record_failure` is the one mapping from an exception to a
row's status.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunOptions:
    """How the harness runs a suite: continue a results file (``resume``), show progress,
    and the micro timings' ``min_run_time`` (None: the suite's)."""

    out_dir: Path
    device: str
    resume: bool = False
    progress: bool = True
    min_run_time: float | None = None


class Session:
    """One run of a suite: measures its cases one at a time, in the harness's order."""

    unit = "case"  # what the progress bar counts

    def describe(self, case) -> str:
        """A few words for the progress bar."""
        return case.impl

    def empty_row(self, case) -> dict:
        """The case's row with every key of its kind, metrics null until measured."""
        raise NotImplementedError

    def run(self, case, row: dict) -> None:
        """Measure ``case`` into ``row``. An exception it raises is recorded on the row by
        :func:`record_failure`, keeping what was filled in before it."""
        raise NotImplementedError

    def finished(self, case, row: dict) -> None:
        """Learn from a written row (a finished case of an earlier run included)."""


class Kind:
    """An experiment kind: ``name`` is the suites' ``kind:`` and the rows' ``kind``."""

    name = ""
    suite_model: type = object

    def check(self, suite, file: str) -> list[str]:
        """What the suite model cannot check: problems as 'file: key: message'."""
        return []

    def expand(self, suite, device: str) -> list:
        """The suite's cases on ``device``, in a deterministic order; each has ``case_id``."""
        raise NotImplementedError

    def claim_outputs(self, suite, path: Path, device: str, resume: bool, overwrite: bool) -> None:
        """Check (or, with ``overwrite``, remove) files of an earlier run beside the results
        file ``path`` besides its rows; ValueError when they would be lost or reused."""

    def start(self, suite, options: RunOptions, todo: list) -> Session:
        """A session that will run ``todo`` (the cases not yet in the results file)."""
        raise NotImplementedError

    def summary(self, rows: list[dict]) -> str:
        """A Markdown table of the rows of a run, printed after it."""
        raise NotImplementedError


def record_failure(row: dict, err: BaseException) -> None:
    """Set the row's status and reason for an exception: out of memory (oom), an
    implementation that cannot run the inputs (unsupported), anything else (error)."""
    import torch

    from attnbench.registry import UnsupportedError

    if isinstance(err, torch.OutOfMemoryError | MemoryError) or cpu_out_of_memory(err):
        row.update(status="oom", reason=f"{type(err).__name__}: {err}".strip())
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    elif isinstance(err, UnsupportedError):
        row.update(status="unsupported", reason="; ".join(err.reasons))
    else:
        row.update(status="error", reason=f"{type(err).__name__}: {err}")


def cpu_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is PyTorch's CPU allocator failing (a RuntimeError, not a MemoryError)."""
    return isinstance(err, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(
        err
    )


def mib(n: int | None) -> float | None:
    """Bytes as MiB, for the summaries; None stays None."""
    return None if n is None else n / 2**20


def markdown_records(records: list[dict], floatfmt: str) -> str:
    """A Markdown table of ``records``; all-empty columns dropped, missing values blank."""
    import pandas as pd

    frame = pd.DataFrame(records).dropna(axis=1, how="all")
    frame = frame.astype(object).where(frame.notna(), None)  # blanks, not "nan"
    return frame.to_markdown(index=False, floatfmt=floatfmt, missingval="")
