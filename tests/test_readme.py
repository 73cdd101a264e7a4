"""The README's examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(after_heading: str) -> list[str]:
    text = README.read_text()
    section = text.split(f"## {after_heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_register_your_own_attention_example_runs(fresh_python):
    (code,) = python_blocks("Register your own attention")
    proc = fresh_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "mine.window(radius=1) (1, 2, 64, 16)"


def test_usage_example_runs(fresh_python):
    code = python_blocks("Usage")[0]
    proc = fresh_python(code + "\nassert out.shape == (1, 2, 1024, 96), out.shape\n")
    assert proc.returncode == 0, proc.stderr


def test_gpa_example_runs(fresh_python):
    (code,) = python_blocks("Usage")[1:]
    proc = fresh_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "gpa.torch(d=4,s=2,k=8) (1, 1, 256, 8)"


def test_results_notebook_example_runs(fresh_python):
    (code,) = python_blocks("Reports")
    proc = fresh_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:2] == ["impl", "full.naive"], proc.stdout  # methods as columns
    assert "AMD EPYC (cpu), 2 threads" in proc.stdout  # rows per machine
