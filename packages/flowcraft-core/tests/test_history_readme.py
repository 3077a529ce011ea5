"""The README's run history example, run as written (in a fresh directory)."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Run history and replay", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found is not None
    return found.group(1)


def test_the_history_example_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "example.py").write_text(example(), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(tmp_path / "example.py"), run_name="__main__")
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "['items', 'price']"
    assert lines[1] == "{'user': 'ada', '_outputs.items': [12.5, 7.5]}"
    assert lines[2] == "20.0"
    assert lines[3] == "run c1: 2 steps replayed, 0 skipped, 2 changes"
    assert "step 2 price: output 20.0 -> 24.0" in out
    assert "step 2 price: context['total'] 20.0 -> 24.0" in out
    assert (tmp_path / "history.db").exists()
