"""The README's named examples (timers, history retention), run as written: each
prints what its comments say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
NAMES = ["timers_in_memory.py", "timers_distributed.py", "history_retention.py"]


def examples() -> dict[str, str]:
    """``name.py`` -> code, for each "`name.py`" line followed by a python block."""
    text = README.read_text(encoding="utf-8")
    return dict(re.findall(r"^`(\w+\.py)`[^\n]*\n\n```python\n(.*?)```", text, re.M | re.S))


def test_the_readme_names_its_examples() -> None:
    assert set(examples()) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_example_prints_what_it_says(name: str, tmp_path: Path) -> None:
    code = examples()[name]
    expected = [m.strip() for m in re.findall(r"print\(.*\)  # (.*)$", code, re.M)]
    (tmp_path / name).write_text(code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, name], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == expected
