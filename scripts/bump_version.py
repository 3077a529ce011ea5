"""Move every published package to one new version (they are released together).

    python3 scripts/bump_version.py 0.2.0

Rewrites ``version`` in each packages/*/pyproject.toml, each adapter's
``flowcraft-core~=X.Y.Z`` pin (dependencies and test groups), and
``flowcraft.__version__``; then ``uv lock``. See RELEASING.md. Stdlib only.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSION = re.compile(r"^\d+\.\d+\.\d+((a|b|rc)\d+)?$")


def bump(new: str) -> list[Path]:
    changed: list[Path] = []
    for pyproject in sorted(ROOT.glob("packages/*/pyproject.toml")):
        text = pyproject.read_text()
        updated, count = re.subn(r'(?m)^version = "[^"]+"$', f'version = "{new}"', text, count=1)
        if count != 1:
            raise SystemExit(f"{pyproject}: no version line")
        pin = r"(flowcraft-core(?:\[[^\]]*\])?~=)[0-9][^\",\s]*"
        updated = re.sub(pin, rf"\g<1>{new}", updated)
        if updated != text:
            pyproject.write_text(updated)
            changed.append(pyproject)
    init = ROOT / "packages/flowcraft-core/src/flowcraft/__init__.py"
    text = init.read_text()
    updated, count = re.subn(r'(?m)^__version__ = "[^"]+"$', f'__version__ = "{new}"', text)
    if count != 1:
        raise SystemExit(f"{init}: no __version__ line")
    if updated != text:
        init.write_text(updated)
        changed.append(init)
    return changed


def main() -> int:
    if len(sys.argv) != 2 or not VERSION.match(sys.argv[1]):
        print(__doc__, file=sys.stderr)
        return 2
    for path in bump(sys.argv[1]):
        print("updated", path.relative_to(ROOT))
    uv = shutil.which("uv")
    if uv is None:
        print("uv is not on PATH: run `uv lock` yourself", file=sys.stderr)
        return 1
    subprocess.run([uv, "lock"], cwd=ROOT, check=True)  # noqa: S603 (fixed argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
