"""Result rows: one JSON object per line, written as soon as a case ends, read back tolerantly.

Every row carries its context (device, threads, versions, git commit) so that rows from
different machines are never mixed up. A metric that could not be computed is null and the
reason is in ``reason``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import warnings
from collections.abc import Iterable
from pathlib import Path

STATUSES = ("ok", "unsupported", "oom", "error", "diverged")

REQUIRED_KEYS = (
    "suite", "kind", "case_id", "impl", "params", "label", "status", "reason", "device",
    "device_name", "dtype", "threads", "torch_version", "attnbench_version", "git_commit",
    "timestamp", "seed",
)  # fmt: skip
MICRO_KEYS = (
    "batch", "heads", "q_h", "q_w", "kv_h", "kv_w", "channels", "time_fwd_ms",
    "time_fwd_iqr_ms", "time_fwdbwd_ms", "mem_fwd_bytes", "mem_fwdbwd_bytes", "flops_fwd",
    "gflops_fwd", "peak_gflops", "peak_fraction", "rel_err_out", "rel_err_grad", "copy_psnr",
)  # fmt: skip
TRAIN_KEYS = (
    "task", "steps", "train_time_s", "step_time_s", "test_l1", "test_loss", "ssim", "psnr",
    "lpips", "fid", "attn_mem_bytes", "n_params", "copy_hit_rate",
)  # fmt: skip


def git_commit() -> str | None:
    """The commit of the attnbench source tree (``-dirty`` if it has changes), or None."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
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


def new_row(case, kind: str, ctx: dict, dtype: str, metric_keys: tuple[str, ...]) -> dict:
    """A row for ``case`` with every required key, status ok and ``metric_keys`` null."""
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
    }
    row.update(dict.fromkeys(metric_keys))
    return row


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
