"""Which context keys an expression may read, so a worker fetches only those.

Conservative: it may name keys the expression never reads (an extra key in a
batched read costs nothing), never the reverse. A dotted path ``a.b.c`` may be
the key ``a``, ``a.b`` or ``a.b.c`` (node outputs live under ``_outputs.<id>``),
or node ``a``'s output ``_outputs.a`` (a bare node id names its output);
``context.a`` and ``context["a-b"]`` name the keys ``a`` and ``a-b`` (and those
nodes' outputs), and a hyphenated path such as ``take-order.total`` may be a
hyphenated node id.
"""

from __future__ import annotations

import functools
import re

_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\s*\.\s*[A-Za-z_][A-Za-z0-9_]*)*")
_HYPHENATED = re.compile(r"[A-Za-z_$][\w$]*(?:-[\w$]+)+(?:\.[\w$-]+)*")
_CONTEXT_ITEM = re.compile(r"\bcontext\s*\[\s*(?:\"([^\"\\]*)\"|'([^'\\]*)')\s*\]")
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
        if parts[0] == "context" and len(parts) > 1:
            keys.add("context")
            parts = parts[1:]
        if parts[0] in _NOT_KEYS:
            continue
        _add(keys, parts)
    for match in _HYPHENATED.finditer(code):
        _add(keys, match.group(0).split("."))
    for match in _CONTEXT_ITEM.finditer(expression):
        keys.add(match.group(1) if match.group(1) is not None else match.group(2))
        keys.add("_outputs." + (match.group(1) if match.group(1) is not None else match.group(2)))
    return frozenset(keys)


def _add(keys: set[str], parts: list[str]) -> None:
    for i in range(1, len(parts) + 1):
        keys.add(".".join(parts[:i]))
    if not parts[0].startswith("_"):
        keys.add("_outputs." + parts[0])


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
