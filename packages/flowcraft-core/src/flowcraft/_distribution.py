"""Refuse to load beside the unrelated PyPI project named ``flowcraft``.

This engine is published as ``flowcraft-core``. The name ``flowcraft`` on PyPI
belongs to another project (a Nextflow pipeline assembler for genomics) that
installs the same import package, ``flowcraft``, and the same ``flowcraft``
command. In one environment the two overwrite each other's files, whichever
was installed last wins each file, and uninstalling either breaks the other:
failures would surface far from their cause. So importing ``flowcraft`` while
a distribution named ``flowcraft`` is installed fails at once, saying how to
repair the environment (checked when this module is imported, first thing in
``flowcraft/__init__.py``). One metadata lookup by name (a few ms), no scan of
every installed distribution. A future ``flowcraft`` distribution of this
project would require ``flowcraft-core`` and is let through.
"""

from __future__ import annotations

import re
from importlib import metadata

FOREIGN_NAME = "flowcraft"
OUR_NAME = "flowcraft-core"
_REQUIRES_OURS = re.compile(r"^flowcraft[-_.]core\b", re.IGNORECASE)


def foreign_distribution() -> metadata.Distribution | None:
    """The installed distribution named ``flowcraft``, unless it is one of ours."""
    try:
        dist = metadata.distribution(FOREIGN_NAME)
    except metadata.PackageNotFoundError:
        return None
    if any(_REQUIRES_OURS.match(requirement) for requirement in dist.requires or ()):
        return None
    return dist


def conflict_message(dist: metadata.Distribution) -> str:
    """What went wrong and the commands that repair it."""
    version = dist.metadata["Version"] or "?"
    summary = dist.metadata["Summary"] or "an unrelated project"
    return (
        f"the PyPI distribution 'flowcraft' {version} ({summary}) is installed in this "
        f"environment. It is not this workflow engine (published as '{OUR_NAME}') but "
        "an unrelated project that installs the same import package 'flowcraft' and the "
        "same 'flowcraft' command, so the two overwrite each other's files. Repair the "
        f"environment: `pip uninstall -y flowcraft {OUR_NAME} && pip install {OUR_NAME}` "
        f"(with uv: `uv pip uninstall flowcraft {OUR_NAME} && uv pip install {OUR_NAME}`), "
        "or keep them in separate virtual environments. Never `pip install flowcraft` "
        "for this engine."
    )


def check_distribution() -> None:
    """Raise ImportError if the unrelated ``flowcraft`` distribution shares this package."""
    dist = foreign_distribution()
    if dist is not None:
        raise ImportError(conflict_message(dist), name="flowcraft")


check_distribution()
