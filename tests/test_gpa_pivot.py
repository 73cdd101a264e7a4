"""benchmarks/gpa_pivot.py: its rows, its CUDA options and its failures, run small on the CPU."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import torch.nn.functional as F

from attnbench import results
from benchmarks import gpa_pivot


def test_a_small_cpu_run_writes_rows_phases_and_rounds(tmp_path):
    out = tmp_path / "pivot.json"
    impls = ["gpa.torch", "full.sdpa", "gpa.cpp"]
    gpa_pivot.main(
        ["--size", "64", "--channels", "8", "--min-run-time", "0.01", "--rounds", "2"]
        + ["--impls", *impls, "--json", str(out)]
    )
    data = json.loads(out.read_text())
    assert data["context"]["dtype"] == "float32"
    assert data["context"]["matmul_size"] == 2048
    assert data["context"]["sdpa_backend"] is None
    for key in ("rows", "fwdbwd_rows"):
        rows = {r["impl"].split("(")[0]: r for r in data[key]}
        assert set(rows) == set(impls)
        ok = [r for r in rows.values() if r["status"] == "ok"]
        assert rows["full.sdpa"]["status"] == "ok" and rows["gpa.torch"]["status"] == "ok"
        sdpa_ms = rows["full.sdpa"]["time_ms"]
        for r in ok:  # speed-ups against full.sdpa's row, wherever it stands in the order
            assert r["speedup_vs_sdpa"] == pytest.approx(sdpa_ms / r["time_ms"])
            assert r["gflops"] == pytest.approx(r["gflop"] * 1e3 / r["time_ms"])
    assert set(data["phases"]) <= {"gpa.torch", "gpa.cpp"} and "gpa.torch" in data["phases"]
    assert data["interleaved"]["rounds"] == 2
    assert any(key.endswith(" fwd+bwd") for key in data["interleaved"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        gpa_pivot.parse_args(["--device", "cuda"])
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_an_implementation_that_raises_becomes_an_error_row():
    def fails():
        raise RuntimeError("no kernel for these inputs")

    row = gpa_pivot.measured_row("x", fails, 1, None, 1.0, 0.01, "cpu")
    reason = "RuntimeError: no kernel for these inputs"
    assert row == {"impl": "x", "status": "error", "reason": reason}


def test_the_sdpa_backend_option_pins_the_kernel():
    q = torch.randn(1, 1, 16, 8)
    fn = lambda: F.scaled_dot_product_attention(q, q, q)  # noqa: E731
    torch.testing.assert_close(gpa_pivot.with_sdpa_backend(fn, "math")(), fn())
    with pytest.raises(RuntimeError):  # no memory-efficient kernel on the CPU: pinned, not chosen
        gpa_pivot.with_sdpa_backend(fn, "efficient")()


def test_git_commit_outside_a_checkout_is_the_one_given(monkeypatch):
    def no_repository(*args, **kwargs):
        return subprocess.CompletedProcess(args, 128, "", "fatal: not a git repository")

    monkeypatch.setattr(results.subprocess, "run", no_repository)
    monkeypatch.delenv("ATTNBENCH_GIT_COMMIT", raising=False)
    assert results.git_commit() is None
    monkeypatch.setenv("ATTNBENCH_GIT_COMMIT", "abc123")
    assert results.git_commit() == "abc123"
