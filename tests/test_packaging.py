"""Every subpackage of runtime/ and export/ is listed in pyproject.toml, or a regular install would lose it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_packaged():
    pyproject = ROOT / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("runs from a source checkout only")
    config = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]
    found = set()
    for package, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *relative)))
    assert found <= set(config["packages"]), f"missing from [tool.setuptools] packages: {sorted(found - set(config['packages']))}"
