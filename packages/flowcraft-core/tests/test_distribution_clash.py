"""PyPI's unrelated ``flowcraft`` beside flowcraft-core: ``import flowcraft`` refuses, with the fix.

Each case imports flowcraft in a fresh interpreter whose path also holds a
``*.dist-info`` directory, as pip leaves one when it installs a distribution.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def install_metadata(site: Path, name: str, version: str, *, requires: str = "") -> None:
    """What pip leaves of an installed distribution that importlib.metadata reads."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\n"
        f"Name: {name}\nVersion: {version}\n"
        "Summary: A Nextflow pipeline assembler for genomics.\n" + requires
    )


def import_flowcraft(site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    code = "import flowcraft; print(flowcraft.Flow.__name__)"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_import_fails_with_the_repair_when_the_foreign_flowcraft_is_installed(
    tmp_path: Path,
) -> None:
    install_metadata(tmp_path, "flowcraft", "1.4.1")
    result = import_flowcraft(tmp_path)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: the PyPI distribution 'flowcraft' 1.4.1 ")
    assert "Nextflow pipeline assembler" in last
    assert "pip uninstall -y flowcraft flowcraft-core && pip install flowcraft-core" in last


def test_import_works_beside_our_own_or_other_distributions(tmp_path: Path) -> None:
    install_metadata(tmp_path, "flowcraft_core", "9.9.9")  # our own metadata again
    install_metadata(tmp_path, "flowcraftx", "9.9.9")  # another name altogether
    # A `flowcraft` of this project's own would require flowcraft-core: no clash.
    install_metadata(tmp_path, "flowcraft", "9.9.9", requires="Requires-Dist: flowcraft-core\n")
    result = import_flowcraft(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Flow"
