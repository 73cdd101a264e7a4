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
