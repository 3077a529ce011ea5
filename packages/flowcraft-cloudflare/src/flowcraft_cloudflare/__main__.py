"""``python -m flowcraft_cloudflare``: where the companion Worker is, and deploying it.

python -m flowcraft_cloudflare path     # prints the folder (worker.mjs, wrangler.toml)
python -m flowcraft_cloudflare deploy [wrangler args...]
                                        # npx wrangler deploy --config <folder>/wrangler.toml
"""

from __future__ import annotations

import shutil
import subprocess
import sys

from flowcraft_cloudflare._client import worker_dir


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help"}:
        print(__doc__)
        return 0 if args else 2
    folder = worker_dir()
    if args[0] == "path":
        print(folder)
        return 0
    if args[0] == "deploy":
        npx = shutil.which("npx")
        if npx is None:
            print("npx is not on PATH: install Node.js to run wrangler", file=sys.stderr)
            return 1
        command = [npx, "--yes", "wrangler", "deploy", "--config", str(folder / "wrangler.toml")]
        return subprocess.run([*command, *args[1:]], check=False).returncode  # noqa: S603
    print(f"unknown command {args[0]!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
