"""The command line: `attnbench list`, help text, and that --help stays light."""

import json
import os
import subprocess
import sys

from attnbench import cli


def test_list_json_has_the_builtins(capsys):
    assert cli.main(["list", "--format", "json", "--device", "cpu"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"full.naive", "full.sdpa", "xformers.mea", "none"} <= set(rows)
    for row in rows.values():
        assert set(row) == {"name", "family", "backend", "available", "reasons"}
    assert rows["full.sdpa"]["available"] is True and rows["full.sdpa"]["reasons"] == []
    assert rows["xformers.mea"]["available"] is False
    assert "device=cpu (supported: cuda)" in rows["xformers.mea"]["reasons"]


def test_list_table_shows_reasons(capsys):
    assert cli.main(["list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[1].split()
    assert header == ["name", "family", "backend", "available", "reasons"]
    xf = next(line for line in out.splitlines() if line.startswith("xformers.mea"))
    assert " no " in xf and "device=cpu (supported: cuda)" in xf


def test_list_pattern_without_match_fails(capsys):
    assert cli.main(["list", "nothing.*"]) == 1
    assert "no implementation matches 'nothing.*'" in capsys.readouterr().err


def test_console_script_and_module_agree():
    script = os.path.join(os.path.dirname(sys.executable), "attnbench")
    a = subprocess.run([script, "list", "--format", "json"], capture_output=True, text=True)
    b = subprocess.run(
        [sys.executable, "-m", "attnbench", "list", "--format", "json"],
        capture_output=True,
        text=True,
    )
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert json.loads(a.stdout) == json.loads(b.stdout)


def test_help_shows_examples_and_does_not_import_torch(fresh_python):
    proc = fresh_python(
        "import sys\n"
        "from attnbench import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert "examples:" in proc.stdout and "attnbench list" in proc.stdout
    assert "torch imported: False" in proc.stdout
