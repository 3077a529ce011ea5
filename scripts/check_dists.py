"""Build every distribution and check what PyPI would receive.

    python3 scripts/check_dists.py [--out dist] [--no-build]

Builds the workspace (``uv build --all-packages``: each sdist, then each wheel from
its sdist, so an sdist that cannot build fails here), runs ``twine check --strict``
over every file, then checks what twine does not: every published package ships the
project's LICENSE in its wheel and sdist, its sdist carries no tests, its metadata
has classifiers, project URLs, authors and keywords, its README (the PyPI page)
links only absolutely, and all of them share one version (released together, see
RELEASING.md). flowcraft-backends (test tooling) must carry PyPI's
``Private :: Do Not Upload``. Stdlib only; run by CI (ci.yml, dists) and release.yml.
"""

from __future__ import annotations

import argparse
import email
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.message import Message
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = [
    "flowcraft-core",
    "flowcraft-bullmq",
    "flowcraft-rabbitmq",
    "flowcraft-sqs",
    "flowcraft-gcp",
    "flowcraft-azure",
    "flowcraft-kafka",
    "flowcraft-cloudflare",
]
PRIVATE = ["flowcraft-backends"]
# A Markdown link or image whose target has no scheme: it resolves on GitHub, not on PyPI.
RELATIVE_LINK = re.compile(r"\]\(\s*(?![a-zA-Z][a-zA-Z0-9+.-]*:)([^)\s]*)")
RELATIVE_HTML = re.compile(r"""(?:href|src)\s*=\s*["'](?![a-zA-Z][a-zA-Z0-9+.-]*:)([^"']*)""")


def relative_links(markdown: str) -> list[str]:
    """Link targets in ``markdown`` that would break once the README is on PyPI."""
    return RELATIVE_LINK.findall(markdown) + RELATIVE_HTML.findall(markdown)


def wheel_metadata(path: Path) -> tuple[Message, list[str], zipfile.ZipFile]:
    archive = zipfile.ZipFile(path)
    names = archive.namelist()
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    return email.message_from_bytes(archive.read(meta)), names, archive


def check(out: Path) -> list[str]:
    problems: list[str] = []
    license_text = (ROOT / "LICENSE").read_bytes()
    versions: set[str] = set()
    for name in PUBLISHED + PRIVATE:
        stem = name.replace("-", "_")
        wheels = sorted(out.glob(f"{stem}-*.whl"))
        sdists = sorted(out.glob(f"{stem}-*.tar.gz"))
        if len(wheels) != 1 or len(sdists) != 1:
            problems.append(f"{name}: expected one wheel and one sdist, got {wheels + sdists}")
            continue
        meta, names, archive = wheel_metadata(wheels[0])
        classifiers = meta.get_all("Classifier") or []
        if name in PRIVATE:
            if "Private :: Do Not Upload" not in classifiers:
                problems.append(f"{name}: lacks the 'Private :: Do Not Upload' classifier")
            continue
        versions.add(str(meta["Version"]))
        licenses = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        if not licenses or archive.read(licenses[0]) != license_text:
            problems.append(f"{name}: wheel lacks the project's LICENSE")
        if meta["License-Expression"] != "MIT":
            problems.append(f"{name}: License-Expression is {meta['License-Expression']!r}")
        for field in ("Author", "Keywords", "Project-URL"):
            if not meta.get_all(field):
                problems.append(f"{name}: no {field} in the metadata")
        if not any(c.startswith("Programming Language :: Python :: 3.") for c in classifiers):
            problems.append(f"{name}: no Python version classifiers")
        if meta["Description-Content-Type"] != "text/markdown":
            problems.append(f"{name}: README is not declared as Markdown")
        body = meta.get_payload()
        assert isinstance(body, str)
        for target in relative_links(body):
            problems.append(f"{name}: README link {target!r} is relative (broken on PyPI)")
        if name == "flowcraft-core":
            init = archive.read("flowcraft/__init__.py").decode()
            if f'__version__ = "{meta["Version"]}"' not in init:
                problems.append(f"{name}: flowcraft.__version__ is not {meta['Version']}")
        with tarfile.open(sdists[0]) as sdist:
            members = sdist.getnames()
            top = members[0].split("/")[0]
            if f"{top}/LICENSE" not in members:
                problems.append(f"{name}: sdist lacks LICENSE")
            shipped_tests = [m for m in members if m.startswith(f"{top}/tests")]
            if shipped_tests:
                problems.append(f"{name}: sdist ships tests ({shipped_tests[0]}, ...)")
    if len(versions) > 1:
        problems.append(f"published packages disagree on the version: {sorted(versions)}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    parser.add_argument("--no-build", action="store_true", help="check what --out holds")
    args = parser.parse_args()
    out: Path = args.out.resolve()
    uv = shutil.which("uv")
    if uv is None:
        parser.error("uv is not on PATH")
    if not args.no_build:
        shutil.rmtree(out, ignore_errors=True)
        build = [uv, "build", "--all-packages", "--quiet", "--out-dir", str(out)]
        subprocess.run(build, cwd=ROOT, check=True)  # noqa: S603 (fixed argv)
    files = sorted(str(p) for p in out.iterdir() if p.suffix in {".whl", ".gz"})
    twine = [uv, "tool", "run", "twine", "check", "--strict", *files]
    subprocess.run(twine, check=True)  # noqa: S603 (fixed argv, our own files)
    problems = check(out)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    if not problems:
        print(f"ok: {len(files)} files; {len(PUBLISHED)} published packages checked")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
