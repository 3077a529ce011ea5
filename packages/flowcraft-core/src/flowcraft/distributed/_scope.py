"""Which context keys an expression may read, so a worker fetches only those.

Conservative: it may name keys the expression never reads (an extra key in a
batched read costs nothing), never the reverse. A dotted path ``a.b.c`` may be
the key ``a``, ``a.b`` or ``a.b.c`` (node outputs live under ``_outputs.<id>``).
"""

from __future__ import annotations

import functools
import re

_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\s*\.\s*[A-Za-z_][A-Za-z0-9_]*)*")
_NOT_KEYS = frozenset(
    {
        "and", "or", "not", "in", "is", "if", "else", "True", "False", "None",
        "true", "false", "null", "undefined", "result", "input",
        "len", "str", "int", "float", "bool", "abs", "min", "max", "round", "lower", "upper",
    }
)  # fmt: skip


@functools.lru_cache(maxsize=4096)
def scope_keys(expression: str) -> frozenset[str]:
    keys: set[str] = set()
    code = _strip_strings(expression)
    for match in _PATH.finditer(code):
        before = code[: match.start()].rstrip()
        if before.endswith(".") or (before and (before[-1].isalnum() or before[-1] == "_")):
            continue
        parts = [p.strip() for p in match.group(0).split(".")]
        if parts[0] in _NOT_KEYS:
            continue
        for i in range(1, len(parts) + 1):
            keys.add(".".join(parts[:i]))
    return frozenset(keys)


def _strip_strings(source: str) -> str:
    out: list[str] = []
    quote: str | None = None
    escaped = False
    for ch in source:
        if quote is None:
            if ch in "'\"`":
                quote = ch
                out.append(" ")
            else:
                out.append(ch)
        elif escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == quote:
            quote = None
            out.append(" ")
    return "".join(out)
