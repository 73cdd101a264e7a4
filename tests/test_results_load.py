"""attnbench.results.load: result rows as a typed DataFrame, one column per key."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from attnbench.results import REQUIRED_KEYS, STATUSES, load


def row(case_id: str, **extra) -> dict:
    base = dict.fromkeys(REQUIRED_KEYS) | {
        "suite": "s",
        "kind": "micro",
        "case_id": case_id,
        "impl": "gpa.torch",
        "params": {"topk": 4},
        "label": "gpa.torch(k=4)",
        "status": "ok",
        "device": "cpu",
        "device_name": "Test CPU",
        "dtype": "float32",
        "threads": 2,
        "torch_version": "2.0",
        "timestamp": "2025-01-02T03:04:05+00:00",
        "seed": 0,
        "batch": 1,
        "heads": 1,
        "q_h": 8,
        "q_w": 8,
        "kv_h": 8,
        "kv_w": 8,
        "channels": 16,
        "time_fwd_ms": 1.5,
        "mem_fwd_bytes": 1024,
    }
    return base | extra


def write(path, rows: list, extra_lines: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra_lines)


def test_columns_are_typed(tmp_path):
    rows = [row("a", copy_psnr=None)]
    rows += [row("b", status="unsupported", time_fwd_ms=None, mem_fwd_bytes=None, copy_psnr=None)]
    write(tmp_path / "r.jsonl", rows)
    df = load([tmp_path])
    assert df["time_fwd_ms"].dtype == "float64" and df["time_fwd_ms"].isna().tolist() == [0, 1]
    assert df["q_h"].dtype == "int64" and df["seed"].dtype == "int64"
    assert df["mem_fwd_bytes"].tolist()[0] == 1024 and pd.isna(df["mem_fwd_bytes"][1])
    assert isinstance(df["status"].dtype, pd.CategoricalDtype)
    assert list(df["status"].cat.categories) == list(STATUSES)
    assert df["timestamp"][0] == pd.Timestamp("2025-01-02T03:04:05Z")
    assert df["copy_psnr"].dtype == "float64"  # a number null in every row: NaN, not objects


def test_params_become_columns(tmp_path):
    rows = [row("a"), row("b", params={"topk": 8, "phase1_res": 32}), row("c", params={})]
    write(tmp_path / "r.jsonl", rows)
    df = load([tmp_path / "r.jsonl"])
    assert "params" not in df
    assert df["params.topk"].tolist()[:2] == [4, 8] and pd.isna(df["params.topk"][2])
    assert df["params.phase1_res"].isna().tolist() == [True, False, True]


def test_bad_lines_are_skipped_with_a_warning(tmp_path):
    rows = [row("a"), row("b", time_fwd_ms="fast"), row("c", status="great"), {"impl": "x"}]
    write(tmp_path / "r.jsonl", rows, extra_lines='{"suite": "s", "ki')
    with pytest.warns(UserWarning) as caught:
        df = load([tmp_path])
    assert df["case_id"].tolist() == ["a"]
    messages = " ".join(str(w.message) for w in caught)
    assert "row 2 skipped: not numbers: time_fwd_ms='fast'" in messages
    assert "row 3 skipped: status='great'" in messages
    assert "row 4 skipped: without the required keys" in messages
    assert "skipped a truncated or malformed row" in messages


def test_machines_stay_apart(tmp_path):
    rows = [row("a", time_fwd_ms=1.0), row("a", time_fwd_ms=3.0, threads=8)]
    rows += [row("a", time_fwd_ms=5.0, device_name="Other CPU")]
    rows += [row("a", time_fwd_ms=7.0, torch_version="2.1")]
    write(tmp_path / "r.jsonl", rows)
    df = load([tmp_path])
    means = df.groupby("machine", observed=True)["time_fwd_ms"].mean()
    assert sorted(means) == [1.0, 3.0, 5.0, 7.0]  # one group per machine: nothing mixed
    assert "Test CPU (cpu), 8 threads, torch 2.0" in means.index


def test_kind_keeps_the_rows_of_one_kind(tmp_path):
    train = row("t", kind="train", task="copying", test_l1=0.1)
    write(tmp_path / "r.jsonl", [row("a"), train])
    assert load([tmp_path], kind="train")["case_id"].tolist() == ["t"]
    assert load([tmp_path], kind="micro")["case_id"].tolist() == ["a"]
    with pytest.raises(ValueError, match="kind='bogus'"):
        load([tmp_path], kind="bogus")


def test_a_case_written_twice_is_kept_once_the_newest(tmp_path):
    old = row("a", time_fwd_ms=1.0, timestamp="2025-01-01T00:00:00+00:00")
    write(tmp_path / "r.jsonl", [row("a", time_fwd_ms=2.0), old])
    with pytest.warns(UserWarning, match="more than once"):
        df = load([tmp_path])
    assert df["time_fwd_ms"].tolist() == [2.0]
