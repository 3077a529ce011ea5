"""Safe evaluation of blueprint expressions: edge conditions, edge transforms, input paths.

Expressions come from blueprints, which may be written by people who must not be able to
run code on a worker, so nothing here calls ``eval``/``exec``/``compile``. Each source is
parsed once with :func:`ast.parse`, checked against a whitelist, cached, and then
interpreted per call by a :mod:`simpleeval` evaluator with fresh names.

Language (a Python expression subset):

* literals: strings, numbers, ``True``/``False``/``None``, lists, tuples, dicts
  (``[*xs]`` and ``{**d}`` spread included);
* ``==``/``!=``/``<``/``<=``/``>``/``>=``, ``in``/``not in``, ``is``/``is not``,
  ``and``/``or``/``not``, ``x if c else y``, ``+ - * / // % **``, unary ``-``/``+``;
* paths and indexing: ``result.output.status``, ``a['b']``, ``a[0]``, ``a[1:3]``;
* calls to a few pure helpers only: ``len str int float bool abs min max round lower upper``.

JavaScript spellings used by blueprints written for the TypeScript flowcraft are accepted
and translated token by token (never inside string literals): ``===`` ``!==`` ``&&``
``||`` ``!x`` ``true`` ``false`` ``null`` ``undefined``; ``.length`` on a list or string
gives its length (a dict's ``length`` key wins).

Semantics chosen:

* Paths are optional-chained, as in the original's property evaluator: a missing key,
  an index out of range, or any step through ``None`` or a scalar yields ``None``.
  ``x.items`` and ``x.keys`` read the *keys* ``"items"``/``"keys"``; Python attributes of
  values are never reached. A dotted context key such as ``_outputs.fetch`` is found by
  ``_outputs.fetch.status`` when no shorter key matches.
* An unknown top-level name is an error (a typo in a condition should not silently read
  as false); pass ``strict_names=False`` to read it as ``None`` instead. Callers that know
  a key may be absent can also put it in the scope as ``None``.
* Operators keep Python semantics: ``None < 3`` or ``'a' + 1`` fail with
  :class:`~flowcraft.errors.ExpressionError` rather than coercing like JavaScript.
* Only data is looked into: a value that is not a dict/Mapping, list, tuple or string
  is never asked for attributes, called, indexed or iterated (``in``, ``min``, ``max``
  and spreads refuse it); names containing ``__`` are refused before evaluation.
* Every refusal or failure is an :class:`~flowcraft.errors.ExpressionError` naming the
  expression; nothing else escapes :meth:`SafeEvaluator.evaluate`.
* Results may share structure with the scope; copy before mutating.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

from simpleeval import (
    DEFAULT_OPERATORS,
    EvalWithCompoundTypes,
    FeatureNotAvailable,
    InvalidExpression,
    IterableTooLong,
    NumberTooHigh,
)

from flowcraft.errors import ExpressionError

__all__ = [
    "Evaluator",
    "SafeEvaluator",
    "name_hyphenated",
    "resolve_path",
    "validate_expression",
]

_MISSING: Final = object()
_SEQUENCES: Final = (list, tuple, str)
_CONTAINERS: Final = (list, tuple, dict, Mapping)
_MESSAGE_EXPRESSION_CHARS: Final = 120
_MAX_ROUND_DIGITS: Final = 100

# The only callables; plain calls by name, no keywords (see _check_call).
_FUNCTION_NAMES: Final = frozenset(
    {"len", "str", "int", "float", "bool", "abs", "min", "max", "round", "lower", "upper"}
)


@runtime_checkable
class Evaluator(Protocol):
    """What the runtime needs from an expression evaluator (swap in your own)."""

    def evaluate(self, expression: str, scope: Mapping[str, Any]) -> Any:
        """Evaluate ``expression`` with ``scope``'s keys as names."""
        ...


# --------------------------------------------------------------------------- paths


def _lookup(mapping: Mapping[Any, Any], parts: tuple[str, ...], start: int) -> tuple[Any, int]:
    """Read ``parts[start]`` from ``mapping``, else the shortest dotted join that is a key.

    Returns the value and the index of the next part, or ``_MISSING``.
    """
    value = mapping.get(parts[start], _MISSING)
    if value is not _MISSING:
        return value, start + 1
    for stop in range(start + 2, len(parts) + 1):
        value = mapping.get(".".join(parts[start:stop]), _MISSING)
        if value is not _MISSING:
            return value, stop
    return _MISSING, len(parts)


def _walk(current: Any, parts: tuple[str, ...], start: int) -> Any:
    """Follow ``parts[start:]`` through mappings and sequences; any dead end is ``None``."""
    index = start
    count = len(parts)
    while index < count:
        # ``type(...) is dict`` first: the Mapping ABC check costs ~10x more.
        if type(current) is dict or isinstance(current, Mapping):
            value = current.get(parts[index], _MISSING)
            if value is _MISSING:
                value, index = _lookup(current, parts, index)
                if value is _MISSING:
                    return None
            else:
                index += 1
            current = value
            continue
        part = parts[index]
        if isinstance(current, _SEQUENCES):
            if part == "length":
                current = len(current)
            elif part.isascii() and part.isdigit() and not isinstance(current, str):
                position = int(part)
                current = current[position] if position < len(current) else None
            else:
                return None
        else:
            return None  # None, a number, a bool or a non-data object: JS ``undefined``
        index += 1
    return current


def _item(container: Any, key: Any) -> Any:
    """``container[key]`` on data only: a missing key or index is ``None``, never an error."""
    if type(container) is dict or isinstance(container, Mapping):
        try:
            return container.get(key)
        except TypeError as exc:
            raise TypeError(f"cannot use a {type(key).__name__} as a key") from exc
    if isinstance(container, _SEQUENCES):
        if isinstance(key, slice):
            return container[key]
        if isinstance(key, int):
            try:
                return container[key]
            except IndexError:
                return None
    return None


def resolve_path(data: Any, path: str) -> Any:
    """Read a dotted ``path`` (``"a.b.0.c"``) from JSON-like ``data``; missing is ``None``.

    Used for node input mappings. Numeric parts index lists; a key that itself contains
    dots (``"_outputs.fetch"``) is found when no shorter key matches.
    """
    if not isinstance(path, str):
        raise ExpressionError(f"a path must be a string, not {type(path).__name__}")
    return _walk(data, tuple(path.split(".")), 0)


def name_hyphenated(expression: str, names: frozenset[str]) -> str:
    """Spell each of ``names`` that holds a hyphen (node ids such as ``fetch-data``)
    as ``context["fetch-data"]``, outside string literals and not after a ``.``,
    so ``fetch-data.total > 5`` reads that node's output instead of subtracting.
    The TypeScript flowcraft reads such ids the same way."""
    hyphenated = [n for n in names if "-" in n and '"' not in n and "\\" not in n]
    if not hyphenated or not any(n in expression for n in hyphenated):
        return expression
    pattern = re.compile(
        r"(?<![\w$.])(?:"
        + "|".join(re.escape(n) for n in sorted(hyphenated, key=len, reverse=True))
        + r")(?![\w$-])"
    )
    # Rewrite the code between string literals only.
    out: list[str] = []
    code: list[str] = []
    position = 0
    for match in _TOKEN.finditer(expression):
        if match.start() > position:
            code.append(expression[position : match.start()])
        if match.lastgroup == "str":
            out.append(pattern.sub(_context_item, "".join(code)))
            code = []
            out.append(match.group())
        else:
            code.append(match.group())
        position = match.end()
    code.append(expression[position:])
    out.append(pattern.sub(_context_item, "".join(code)))
    return "".join(out)


def _context_item(match: re.Match[str]) -> str:
    return f'context["{match.group()}"]'


class _Path:
    """A whole ``a.b.c`` chain, pre-split at compile time so a lookup is one loop."""

    __slots__ = ("base", "parts")

    def __init__(self, base: ast.expr | None, parts: tuple[str, ...]) -> None:
        self.base = base
        self.parts = parts


# ------------------------------------------------------------------- JS translation

_TOKEN: Final = re.compile(
    r"""
    (?P<str>[rRbBuUfF]{0,2}(?:'''(?:\\.|[^\\])*?'''|\"\"\"(?:\\.|[^\\])*?\"\"\"
        |'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*"))
    | (?P<name>[^\W\d]\w*)
    | (?P<num>\.?\d[\w.]*)
    | (?P<comment>\#[^\n]*)
    | (?P<ws>\s+)
    | (?P<op>===|!==|&&|\|\||!=|==|<=|>=|\*\*|//|\S)
    """,
    re.VERBOSE,
)
_JS_OPERATORS: Final = {"===": "==", "!==": "!=", "&&": " and ", "||": " or "}
_JS_NAMES: Final = {"true": "True", "false": "False", "null": "None", "undefined": "None"}
_OPENERS: Final = {"(": ")", "[": "]", "{": "}"}
_PREFIXES: Final = frozenset({"!", "-", "+", "~", "not"})


def _operand_end(tokens: list[tuple[str, str]], start: int, closing: dict[int, int]) -> int:
    """Index just past the unary operand that begins at ``start`` (JS ``!`` binds tightly)."""
    count = len(tokens)
    index = start
    while index < count and tokens[index][1] in _PREFIXES:
        index += 1
    if index >= count:
        return count
    kind, text = tokens[index]
    if text in _OPENERS:
        index = closing.get(index, count - 1) + 1
    elif kind == "str":
        while index < count and tokens[index][0] == "str":
            index += 1
    else:
        index += 1
    while index < count:
        text = tokens[index][1]
        if text == "." and index + 1 < count and tokens[index + 1][0] == "name":
            index += 2
        elif text in ("(", "["):
            index = closing.get(index, count - 1) + 1
        else:
            break
    return index


def _translate(source: str, max_depth: int) -> str:
    """Rewrite JavaScript spellings to Python outside string literals; bound nesting first.

    The bracket and prefix-run checks run before :func:`ast.parse`, whose recursive
    parser must never see pathologically nested input.
    """
    tokens: list[tuple[str, str]] = []
    gaps: list[str] = []  # what separated each token from the previous one: "" or " "
    closing: dict[int, int] = {}
    open_stack: list[int] = []
    prefix_run = 0
    gap = ""
    for match in _TOKEN.finditer(source):
        kind = match.lastgroup or "op"
        text = match.group()
        if kind in ("ws", "comment"):
            gap = " "  # newlines and comments become a space: eval mode is one line
            continue
        if text in _OPENERS:
            open_stack.append(len(tokens))
            if len(open_stack) > max_depth:
                raise _Refused(f"brackets nested deeper than {max_depth}")
        elif text in (")", "]", "}") and open_stack:
            closing[open_stack.pop()] = len(tokens)
        prefix_run = prefix_run + 1 if text in _PREFIXES else 0
        if prefix_run > max_depth:
            raise _Refused(f"more than {max_depth} unary operators in a row")
        tokens.append((kind, text))
        gaps.append(gap)
        gap = ""

    closers = [0] * (len(tokens) + 1)
    pieces: list[str] = []
    previous = ""
    for index, (kind, text) in enumerate(tokens):
        pieces.append(gaps[index])
        if kind == "op" and text == "!":
            pieces.append("(not ")
            closers[_operand_end(tokens, index + 1, closing)] += 1
        elif kind == "op":
            pieces.append(_JS_OPERATORS.get(text, text))
        elif kind == "name" and previous != ".":
            pieces.append(_JS_NAMES.get(text, text))
        else:
            pieces.append(text)
        pieces.append(")" * closers[index + 1])
        previous = text
    return "".join(pieces)


# ------------------------------------------------------------------------ compile


class _Refused(Exception):
    """Internal: the expression is refused at compile time (message says why)."""


_BINARY_OPERATORS: Final = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
_ALLOWED_NODES: Final = frozenset(
    {
        ast.Expression,
        ast.BoolOp,
        ast.BinOp,
        ast.UnaryOp,
        ast.Compare,
        ast.IfExp,
        ast.Call,
        ast.Constant,
        ast.Attribute,
        ast.Subscript,
        ast.Name,
        ast.List,
        ast.Tuple,
        ast.Dict,
        ast.Slice,
        ast.Starred,
        ast.Load,
        ast.And,
        ast.Or,
        ast.Not,
        ast.USub,
        ast.UAdd,
        ast.Eq,
        ast.NotEq,
        ast.Lt,
        ast.LtE,
        ast.Gt,
        ast.GtE,
        ast.In,
        ast.NotIn,
        ast.Is,
        ast.IsNot,
        *_BINARY_OPERATORS,
    }
)
_REFUSED_NAMES: Final[dict[type[ast.AST], str]] = {
    ast.Lambda: "lambda",
    ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a generator expression",
    ast.NamedExpr: "assignment (:=)",
    ast.JoinedStr: "an f-string",
    ast.Set: "a set literal",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
    ast.BitOr: "operator |",
    ast.BitAnd: "operator &",
    ast.BitXor: "operator ^",
    ast.Invert: "operator ~",
    ast.LShift: "operator <<",
    ast.RShift: "operator >>",
    ast.MatMult: "operator @",
}
_CONSTANT_TYPES: Final = (str, int, float, bool, type(None))


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A checked, path-rewritten tree, shared read-only between threads."""

    body: ast.expr | _Path


def _check(tree: ast.Expression, max_depth: int, max_nodes: int) -> None:
    """Refuse anything outside the whitelist, iteratively (no recursion on hostile trees)."""
    stack: list[tuple[ast.AST, int, ast.AST | None]] = [(tree, 0, None)]
    nodes = 0
    while stack:
        node, depth, parent = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise _Refused(f"more than {max_nodes} syntax nodes")
        if depth > max_depth:
            raise _Refused(f"nested deeper than {max_depth}")
        kind = type(node)
        if kind not in _ALLOWED_NODES:
            what = _REFUSED_NAMES.get(kind, kind.__name__)
            raise _Refused(f"{what} is not allowed")
        if isinstance(node, ast.Name) and "__" in node.id:
            raise _Refused(f"name {node.id!r} is not allowed (contains '__')")
        if isinstance(node, ast.Attribute) and "__" in node.attr:
            raise _Refused(f"attribute {node.attr!r} is not allowed (contains '__')")
        if isinstance(node, ast.Constant) and not isinstance(node.value, _CONSTANT_TYPES):
            raise _Refused(f"{type(node.value).__name__} literals are not allowed")
        if isinstance(node, ast.Starred) and not isinstance(parent, ast.List):
            raise _Refused("'*' spread is only allowed inside a list literal")
        if isinstance(node, ast.Call):
            _check_call(node)
        stack.extend((child, depth + 1, node) for child in ast.iter_child_nodes(node))


def _check_call(node: ast.Call) -> None:
    """Only plain calls to the whitelisted helpers; no methods, no keywords."""
    if not isinstance(node.func, ast.Name):
        raise _Refused("calling methods or computed functions is not allowed")
    if node.func.id not in _FUNCTION_NAMES:
        allowed = ", ".join(sorted(_FUNCTION_NAMES))
        raise _Refused(f"function {node.func.id!r} is not allowed (allowed: {allowed})")
    if node.keywords:
        raise _Refused("keyword arguments are not allowed")


def _to_path(node: ast.Attribute) -> _Path:
    """Collapse an attribute chain into one :class:`_Path` (root name kept as first part)."""
    parts: list[str] = []
    current: ast.expr = node
    while isinstance(current, ast.Attribute):
        parts.append(current.attr)
        current = current.value
    if isinstance(current, ast.Name):
        parts.append(current.id)
        return _Path(None, tuple(reversed(parts)))
    return _Path(current, tuple(reversed(parts)))


def _rewrite_paths(tree: ast.Expression) -> None:
    """Replace every attribute chain in ``tree`` by a :class:`_Path`, in place."""
    stack: list[Any] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _Path):
            if node.base is not None:
                stack.append(node.base)
            continue
        for field, value in ast.iter_fields(node):
            if isinstance(value, ast.Attribute):
                path = _to_path(value)
                setattr(node, field, path)
                stack.append(path)
            elif isinstance(value, list):
                for position, item in enumerate(value):
                    if isinstance(item, ast.Attribute):
                        value[position] = _to_path(item)
                    if isinstance(value[position], ast.AST | _Path):
                        stack.append(value[position])
            elif isinstance(value, ast.AST):
                stack.append(value)


def _shown(expression: str) -> str:
    """The expression as quoted in error messages (long ones cut)."""
    if len(expression) > _MESSAGE_EXPRESSION_CHARS:
        expression = expression[:_MESSAGE_EXPRESSION_CHARS] + "..."
    return repr(expression)


# ---------------------------------------------------------------------- interpreter


class _Interpreter(EvalWithCompoundTypes):  # type: ignore[misc]  # simpleeval is untyped
    """simpleeval configured for data only: key lookups instead of ``getattr``, bounded ops.

    One instance per thread per :class:`SafeEvaluator` (building one costs ~10 us); the
    per-call state is ``names``, ``expr`` and the size budget.
    """

    def __init__(self, owner: SafeEvaluator) -> None:
        operators: dict[type[ast.AST], Callable[..., Any]] = {
            kind: DEFAULT_OPERATORS[kind] for kind in _ALLOWED_NODES if kind in DEFAULT_OPERATORS
        }
        operators.update(
            {
                ast.Add: self._add,
                ast.Mult: self._mult,
                ast.Pow: self._pow,
                ast.Mod: self._mod,
                ast.In: _contains,
                ast.NotIn: _not_contains,
            }
        )
        super().__init__(operators=operators, functions={}, names={})
        self.functions = {
            "len": len,
            "str": self._str,
            "int": int,
            "float": float,
            "bool": bool,
            "abs": abs,
            "min": _min,
            "max": _max,
            "round": _round,
            "lower": self._lower,
            "upper": self._upper,
        }
        assert self.functions.keys() == _FUNCTION_NAMES  # the compile-time whitelist
        # Dispatch only what the compile-time check admits; attribute chains arrive as _Path.
        inherited: dict[type[ast.AST], Callable[[Any], Any]] = self.nodes
        self.nodes: dict[Any, Callable[[Any], Any]] = {
            kind: handler
            for kind, handler in inherited.items()
            if kind in _ALLOWED_NODES and kind is not ast.Attribute
        }
        self.nodes[_Path] = self._eval_path
        self.owner = owner
        self.busy = False
        self.spent = 0

    def _eval(self, node: Any) -> Any:
        """Dispatch without simpleeval's per-node scan of every intermediate value.

        That scan hunts for modules and dangerous functions reached through ``getattr``
        and costs O(size of the data) per node; here nothing can reach them (no getattr,
        calls limited to the helpers above), and the node whitelist is checked at compile.
        """
        try:
            handler = self.nodes[type(node)]
        except KeyError:
            raise FeatureNotAvailable(f"{type(node).__name__} is not available") from None
        return handler(node)

    @staticmethod
    def _eval_constant(node: ast.Constant) -> Any:
        return node.value  # types and size checked at compile time

    def _eval_name(self, node: ast.Name) -> Any:
        value = self.names.get(node.id, _MISSING)
        return self._unknown(node.id) if value is _MISSING else value

    def _eval_path(self, node: _Path) -> Any:
        parts = node.parts
        if node.base is not None:
            return _walk(self._eval(node.base), parts, 0)
        value, index = _lookup(self.names, parts, 0)
        if value is _MISSING:
            return self._unknown(parts[0])
        return _walk(value, parts, index)

    def _eval_subscript(self, node: ast.Subscript) -> Any:
        value = _item(self._eval(node.value), self._eval(node.slice))
        if isinstance(node.slice, ast.Slice) and isinstance(value, _SEQUENCES):
            self._charge(len(value))
        return value

    def _eval_list(self, node: ast.List) -> list[Any]:
        result: list[Any] = []
        for element in node.elts:
            if isinstance(element, ast.Starred):
                spread = self._eval(element.value)
                if not isinstance(spread, list | tuple):
                    raise TypeError(f"cannot spread a {type(spread).__name__} into a list")
                self._charge(len(spread))
                result.extend(spread)
            else:
                result.append(self._eval(element))
        return result

    def _eval_dict(self, node: ast.Dict) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        for key, value in zip(node.keys, node.values, strict=True):
            if key is None:
                spread = self._eval(value)
                if not isinstance(spread, Mapping):
                    raise TypeError(f"cannot spread a {type(spread).__name__} into a dict")
                self._charge(len(spread))
                result.update(spread)
            else:
                result[self._eval(key)] = self._eval(value)
        return result

    def _unknown(self, name: str) -> Any:
        if not self.owner.strict_names:
            return None
        known = sorted(str(key) for key in self.names)
        hint = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
        raise ExpressionError(
            f"expression {_shown(self.expr)}: unknown name {name!r} (known: {hint or 'none'})",
            expression=self.expr,
        )

    def _charge(self, size: int) -> None:
        """Count items/characters built by this evaluation against ``max_size``."""
        self.spent += size
        if self.spent > self.owner.max_size:
            raise IterableTooLong(
                f"builds more than {self.owner.max_size} items or characters in total"
            )

    def _add(self, left: Any, right: Any) -> Any:
        if isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
            self._charge(len(left) + len(right))
        return left + right

    def _mult(self, left: Any, right: Any) -> Any:
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > self.owner.max_int_bits:
                raise NumberTooHigh(f"product exceeds {self.owner.max_int_bits} bits")
            return left * right
        sequence, times = (left, right) if isinstance(left, _SEQUENCES) else (right, left)
        if isinstance(sequence, _SEQUENCES) and isinstance(times, int):
            self._charge(len(sequence) * max(times, 0))
            if not isinstance(sequence, str) and any(
                isinstance(element, _CONTAINERS) for element in sequence
            ):
                raise TypeError("repeating a list that holds lists or dicts is not allowed")
        return left * right

    def _pow(self, base: Any, exponent: Any) -> Any:
        if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and base:
            bits = exponent * math.log2(abs(base))
            if bits > self.owner.max_int_bits:
                raise NumberTooHigh(f"{base} ** {exponent} exceeds {self.owner.max_int_bits} bits")
        result = base**exponent
        if isinstance(result, complex):
            raise ValueError(f"{base} ** {exponent} is not a real number")
        return result

    @staticmethod
    def _mod(left: Any, right: Any) -> Any:
        if isinstance(left, str):
            raise TypeError("'%' string formatting is not allowed")
        return operator.mod(left, right)

    def _str(self, value: Any = "") -> str:
        self._charge(_weight(value, self.owner.max_size - self.spent))
        return str(value)

    def _lower(self, value: str) -> str:
        if not isinstance(value, str):
            raise TypeError(f"lower() needs a string, not {type(value).__name__}")
        return value.lower()

    def _upper(self, value: str) -> str:
        if not isinstance(value, str):
            raise TypeError(f"upper() needs a string, not {type(value).__name__}")
        return value.upper()


def _data_container(value: Any, what: str) -> Any:
    """Refuse to iterate anything but data, so a scope object's ``__iter__`` is never run."""
    if isinstance(value, _SEQUENCES) or type(value) is dict or isinstance(value, Mapping):
        return value
    raise TypeError(f"{what} needs a string, list or dict, not {type(value).__name__}")


def _contains(item: Any, container: Any) -> bool:
    return item in _data_container(container, "'in'")


def _not_contains(item: Any, container: Any) -> bool:
    return item not in _data_container(container, "'not in'")


def _arguments(values: tuple[Any, ...], what: str) -> Any:
    """``min``/``max`` arguments: one data container, or two or more values."""
    if len(values) == 1:
        return _data_container(values[0], what)
    if not values:
        raise TypeError(f"{what} needs at least one argument")
    return values


def _min(*values: Any) -> Any:
    return min(_arguments(values, "min()"))


def _max(*values: Any) -> Any:
    return max(_arguments(values, "max()"))


def _round(number: Any, ndigits: int | None = None) -> Any:
    """``round`` with ``ndigits`` bounded (``round(5, -10**9)`` would compute ``10**10**9``)."""
    if ndigits is not None and (not isinstance(ndigits, int) or abs(ndigits) > _MAX_ROUND_DIGITS):
        raise ValueError(f"round() digits must be an int within +-{_MAX_ROUND_DIGITS}")
    return round(number, ndigits)


def _weight(value: Any, cap: int) -> int:
    """Rough size of ``str(value)``, counting no further than ``cap`` (so it stays cheap)."""
    total = 0
    stack = [value]
    while stack and total <= cap:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, Mapping):
            total += 2 * len(item) + 2
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            total += len(item) + 2
            stack.extend(item)
        else:
            total += 8
    return total


# ----------------------------------------------------------------------- evaluator


class SafeEvaluator:
    """The default :class:`Evaluator`: whitelisted syntax, data-only lookups, bounded cost.

    Limits (all per expression): ``max_length`` source characters; ``max_depth`` nesting
    of brackets, unary operators and syntax nodes; ``max_nodes`` syntax nodes;
    ``max_size`` items or characters built by ``+``, ``*``, spreads, slices and ``str()``
    in one evaluation; ``max_int_bits`` for results of integer ``*`` and ``**``.
    """

    def __init__(
        self,
        *,
        max_length: int = 4096,
        max_depth: int = 64,
        max_nodes: int = 512,
        max_size: int = 1_000_000,
        max_int_bits: int = 4096,
        strict_names: bool = True,
    ) -> None:
        self.max_length = max_length
        self.max_depth = max_depth
        self.max_nodes = max_nodes
        self.max_size = max_size
        self.max_int_bits = max_int_bits
        self.strict_names = strict_names
        self._local = threading.local()
        # Per instance (the limits are part of the result); a str key is lru_cache's fast path.
        self._cached = functools.lru_cache(maxsize=1024)(self._compile)

    def validate(self, expression: str) -> None:
        """Raise :class:`ExpressionError` unless ``expression`` parses and passes the checks."""
        self._compiled(expression)

    def evaluate(self, expression: str, scope: Mapping[str, Any]) -> Any:
        """Evaluate ``expression`` with ``scope``'s keys as names; errors are ExpressionError."""
        compiled = self._compiled(expression)
        interpreter = self._interpreter()
        interpreter.busy = True
        interpreter.names = scope
        interpreter.spent = 0
        interpreter.expr = expression
        try:
            return interpreter._eval(compiled.body)
        except ExpressionError:
            raise
        except Exception as exc:
            raise ExpressionError(
                f"expression {_shown(expression)} failed: {_describe(exc)}",
                expression=expression,
            ) from exc
        finally:
            interpreter.busy = False
            interpreter.names = {}

    def _compiled(self, expression: str) -> _Compiled:
        if not isinstance(expression, str):
            raise ExpressionError(
                f"an expression must be a string, not {type(expression).__name__}"
            )
        try:
            return self._cached(expression)
        except _Refused as exc:
            raise ExpressionError(
                f"expression {_shown(expression)} refused: {exc}", expression=expression
            ) from exc

    def _compile(self, source: str) -> _Compiled:
        """Check, translate, parse and rewrite ``source`` (called once per distinct text)."""
        if len(source) > self.max_length:
            raise _Refused(f"longer than {self.max_length} characters ({len(source)})")
        python = _translate(source, self.max_depth).strip()
        if not python:
            raise _Refused("empty expression")
        try:
            tree = ast.parse(python, mode="eval")
        except SyntaxError as exc:
            raise _Refused(f"invalid syntax ({exc.msg})") from exc
        except (RecursionError, MemoryError, ValueError) as exc:
            raise _Refused(f"cannot be parsed ({type(exc).__name__})") from exc
        _check(tree, self.max_depth, self.max_nodes)
        _rewrite_paths(tree)
        return _Compiled(tree.body)

    def _interpreter(self) -> _Interpreter:
        """This thread's interpreter, or a fresh one if it is mid-evaluation (re-entry)."""
        interpreter: _Interpreter | None = getattr(self._local, "interpreter", None)
        if interpreter is None:
            interpreter = self._local.interpreter = _Interpreter(self)
        elif interpreter.busy:
            return _Interpreter(self)
        return interpreter


def _describe(exc: Exception) -> str:
    """A short reason for a runtime failure."""
    if isinstance(exc, ZeroDivisionError):
        return "division by zero"
    if isinstance(exc, RecursionError):
        return "too deeply nested to evaluate"
    if isinstance(exc, MemoryError):
        return "ran out of memory"
    if isinstance(exc, InvalidExpression):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


_DEFAULT: Final = SafeEvaluator()


def validate_expression(expression: str) -> None:
    """Fail early (at blueprint load) if ``expression`` would be refused by the default limits."""
    _DEFAULT.validate(expression)
