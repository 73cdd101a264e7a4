"""A normal (non-editable) install holds every package of the source tree."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    roots = {name: ROOT / path for name, path in config["package-dir"].items()}
    found = set()
    for name, path in roots.items():
        for init in path.rglob("__init__.py"):
            parts = init.parent.relative_to(path).parts
            found.add(".".join((name, *parts)))
    assert found - listed == set(), "packages a wheel would leave out"
    assert listed - found == set(), "listed packages that do not exist"
