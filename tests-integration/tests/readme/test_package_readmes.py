"""What PyPI shows of each published package, checked without building it (CI's dists
job builds and checks the real files with scripts/check_dists.py)."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[3]


def check_dists() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_dists", ROOT / "scripts/check_dists.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHECK = check_dists()


@pytest.mark.parametrize("name", CHECK.PUBLISHED)
def test_package_is_ready_for_pypi(name: str) -> None:
    package = ROOT / "packages" / name
    readme = (package / "README.md").read_text()
    assert CHECK.relative_links(readme) == [], f"{name}/README.md: links must be absolute"
    assert (package / "LICENSE").read_bytes() == (ROOT / "LICENSE").read_bytes()
    project = tomllib.loads((package / "pyproject.toml").read_text())
    assert project["project"]["license-files"] == ["LICENSE"]
    assert "/tests" in project["tool"]["hatch"]["build"]["targets"]["sdist"]["exclude"]
    for field in ("authors", "keywords", "classifiers", "urls"):
        assert project["project"].get(field), f"{name}: no {field}"


def test_relative_links_are_found() -> None:
    text = "[a](../x) [b](https://x.org) ![c](fig.png) [d](#part) <img src='f.png'>"
    assert CHECK.relative_links(text) == ["../x", "fig.png", "#part", "f.png"]
