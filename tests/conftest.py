import subprocess
import sys

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run_python(code: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (this venv's), returning the finished process."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


@pytest.fixture
def fresh_python():
    return run_python


@pytest.fixture
def suite_from_text(tmp_path):
    """Load the one suite of a YAML text, written to ``tmp_path / "tiny.yaml"``."""
    from attnbench.suite import load_suites

    def load(text: str):
        path = tmp_path / "tiny.yaml"
        path.write_text(text)
        (suite,) = load_suites(path)
        return suite

    return load


@pytest.fixture
def torchrun_suite(tmp_path):
    """Run the suite of a YAML text under ``torchrun --nproc_per_node 2`` on one thread each;
    return its one row."""
    import json
    import os

    def run(text: str) -> dict:
        suite_file = tmp_path / "tiny.yaml"
        suite_file.write_text(text)
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        cmd = [torchrun, "--nproc_per_node", "2", "-m", "attnbench", "run", str(suite_file)]
        cmd += ["--out", str(tmp_path), "--no-progress"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (row,) = [
            json.loads(line) for line in (tmp_path / "tiny-cpu.jsonl").read_text().splitlines()
        ]
        return row

    return run
