"""Hostile input: whatever the text, the evaluator returns data or raises ExpressionError.

A tripwire object sits in the scope (top level and inside data); every named attribute
read, call, item read or iteration on it is recorded, so reaching a scope object's
methods counts as a failure even when no exception escapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowcraft.errors import ExpressionError
from flowcraft.expressions import SafeEvaluator, resolve_path

EVALUATOR = SafeEvaluator()
# Parser-safety checks need sources far over the default 4,096-character limit.
ROOMY = SafeEvaluator(max_length=300_000)
FAST = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Tripwire:
    """Records every way an expression could run code that belongs to a scope object."""

    def __init__(self) -> None:
        object.__setattr__(self, "_log", [])

    @property
    def log(self) -> list[str]:
        log: list[str] = object.__getattribute__(self, "_log")
        return log

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("__") and name not in ("_log", "log"):
            object.__getattribute__(self, "_log").append(f"get {name}")
        return object.__getattribute__(self, name)

    def __getattr__(self, name: str) -> Any:
        self.log.append(f"missing {name}")
        raise AttributeError(name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.log.append("call")
        return self

    def __getitem__(self, key: Any) -> Any:
        self.log.append(f"item {key!r}")
        return self

    def __iter__(self) -> Any:
        self.log.append("iter")
        return iter([self])

    def run(self) -> str:
        self.log.append("run")
        return "ran"

    def items(self) -> list[Any]:
        self.log.append("items")
        return []


def hostile_scope(tripwire: Tripwire) -> dict[str, Any]:
    return {
        "obj": tripwire,
        "data": {"obj": tripwire, "items": [tripwire, 1], "x": 1, "s": "text"},
        "x": 1,
        "s": "abc",
        "xs": [1, 2, 3],
        "result": {"output": {"status": "ok"}, "action": None, "error": None},
    }


def attempt(evaluator: SafeEvaluator, expression: str) -> tuple[Any, ExpressionError | None]:
    """Evaluate with a fresh tripwire; fail the test if the tripwire was touched."""
    tripwire = Tripwire()
    outcome: tuple[Any, ExpressionError | None]
    try:
        outcome = (evaluator.evaluate(expression, hostile_scope(tripwire)), None)
    except ExpressionError as exc:
        outcome = (None, exc)
    assert tripwire.log == [], f"{expression!r} reached the scope object: {tripwire.log}"
    return outcome


def refused(expression: str, evaluator: SafeEvaluator = EVALUATOR) -> ExpressionError:
    value, error = attempt(evaluator, expression)
    assert error is not None, f"{expression[:80]!r} evaluated to {value!r}"
    return error


# -------------------------------------------------------------- classic escapes


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os')",
        "__import__('os').system('echo pwned')",
        "().__class__.__bases__[0].__subclasses__()",
        "''.__class__.__mro__[1].__subclasses__()",
        "x.__class__",
        "obj.__dict__",
        "obj.__init__.__globals__",
        "data.__class__.__init__",
        "xs.__len__()",
        "obj.run()",
        "data.obj.run()",
        "data.items()",
        "s.upper()",
        "s.format(obj)",
        "obj()",
        "data['obj']()",
        "(obj or x)()",
        "getattr(obj, 'run')()",
        "eval('1')",
        "exec('x = 1')",
        "compile('1', '', 'eval')",
        "open('/etc/passwd')",
        "type(obj)",
        "vars()",
        "globals()",
        "locals()",
        "dir()",
        "help()",
        "breakpoint()",
        "__builtins__",
        "x.\uff3f\uff3fclass\uff3f\uff3f",  # fullwidth low lines: NFKC makes them '__'
        "lambda: 0",
        "(lambda: 0)()",
        "[c for c in xs]",
        "{c: 1 for c in xs}",
        "sum(c for c in xs)",
        "[y := 1]",
        "f'{obj}'",
        "f'{1:999999999}'",
        "'{0.__class__}'.format(obj)",
        "'%0999999999d' % 1",
        "9 ** 9 ** 9",
        "10 ** 10 ** 10",
        "2 ** 4096 * 2 ** 4096",
        "'a' * 10 ** 9",
        "[0] * 10 ** 9",
        "'a' * 10 ** 5 * 10 ** 5",
        "str([[1] * 99999] * 99999)",
        "[[1] * 99999] * 99999 == [[1] * 99999] * 99999",
        "round(1, -10 ** 9)",
        "int('9' * 5000)",
        "[*obj]",
        "{**obj}",
        "'x' in obj",
        "min(obj)",
        "max(data.obj)",
        "import os",
        "x = 1",
        "del x",
        "x; obj.run()",
        "\x00",
        "a" * 4097,
    ],
)
def test_classic_escapes_and_bombs_are_refused(expression: str) -> None:
    refused(expression)


@pytest.mark.parametrize(
    "expression",
    [
        "obj['k']",
        "obj[0]",
        "obj.run",
        "obj.items",
        "data.obj.x",
        "data['__class__']",
        "data['__globals__']",
        "data.items[0].run",
        "result.output.length",
    ],
)
def test_lookups_on_objects_are_inert(expression: str) -> None:
    value, error = attempt(EVALUATOR, expression)
    assert error is None
    assert value is None or isinstance(value, (int, str, list, dict))


def test_refusal_names_the_expression() -> None:
    error = refused("obj.run()")
    assert error.expression == "obj.run()"
    assert "'obj.run()'" in str(error)


# -------------------------------------------------------- parser-safety bombs


@pytest.mark.parametrize(
    "make",
    [
        lambda n: "(" * n + "1" + ")" * n,
        lambda n: "(" * n,
        lambda n: "[" * n + "]" * n,
        lambda n: "{" * n,
        lambda n: "f(" * n + ")" * n,
        lambda n: "!" * n + "x",
        lambda n: "-" * n + "1",
        lambda n: "not " * n + "x",
        lambda n: "!(" * n + "x" + ")" * n,
        lambda n: "a" + ".a" * n,
        lambda n: "1+" * n + "1",
        lambda n: "2**" * n + "2",
        lambda n: "x" + "[0]" * n,
        lambda n: "x if x else " * n + "x",
        lambda n: "[" + "1," * n + "]",
        lambda n: "'&&' + " * n + "'x'",
    ],
)
def test_pathological_nesting_is_refused_not_crashed(make: Callable[[int], str]) -> None:
    for depth in (1_000, 10_000, 50_000):
        error = refused(make(depth), ROOMY)
        assert "refused" in str(error)
        refused(make(depth))  # and the default evaluator refuses it on length alone


def test_long_sources_are_refused_before_parsing() -> None:
    assert "longer than 4096" in str(refused("x + " * 2000 + "x"))
    assert "longer than 4096" in str(refused("'" + "a" * 5000 + "'"))


# ------------------------------------------------------------- hypothesis


@FAST
@given(st.text(max_size=200))
def test_random_text(expression: str) -> None:
    attempt(EVALUATOR, expression)


TOKENS = [
    "obj", "data", "x", "s", "xs", "result", "output", "items", "keys", "run", "length",
    "__class__", "__import__", "__dict__", "__globals__", "_x", "true", "false", "null",
    "undefined", "len", "str", "int", "min", "max", "lower", "getattr", "eval", "type",
    "lambda", "for", "in", "not", "and", "or", "if", "else", "is", "None", ":=",
    ".", ",", ":", "(", ")", "[", "]", "{", "}", "*", "**", "+", "-", "/", "//", "%",
    "==", "===", "!=", "!==", "!", "&&", "||", "<", ">", "<=", "|", "&", "~", "<<",
    "0", "1", "9", "10", "2.5", "1e308", "'a'", "'&& ||'", "'__class__'", "\"x\"",
    "f'{obj}'", "b'x'", "...", "#", "\n", "\\",
]  # fmt: skip


@FAST
@given(st.lists(st.sampled_from(TOKENS), max_size=24), st.sampled_from([" ", ""]))
def test_token_soup(tokens: list[str], separator: str) -> None:
    attempt(EVALUATOR, separator.join(tokens))


ATOMS = st.sampled_from(
    [
        "obj", "data", "x", "s", "xs", "result", "true", "null", "undefined", "_x",
        "0", "1", "-1", "2.5", "10**9", "'a'", "'__class__'", "'&& b'", "[]", "{}",
    ]
)  # fmt: skip
ATTRIBUTES = st.sampled_from(
    [
        "items", "keys", "run", "length", "output", "status", "true", "_x", "obj",
        "__class__", "__dict__", "__globals__", "__init__", "mro", "format", "__len__",
    ]
)  # fmt: skip
FUNCTIONS = st.sampled_from(
    [
        "len", "str", "int", "float", "bool", "abs", "min", "max", "round", "lower",
        "upper", "getattr", "eval", "exec", "open", "type", "vars", "__import__", "print",
    ]
)  # fmt: skip
BINARY = st.sampled_from(
    [
        "+", "-", "*", "/", "//", "%", "**", "==", "!=", "===", "!==", "<", ">=",
        "and", "or", "&&", "||", "in", "not in", "is", "|", "<<",
    ]
)  # fmt: skip


def _extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    pairs = st.tuples(inner, inner)
    return st.one_of(
        st.tuples(inner, ATTRIBUTES).map(lambda p: f"{p[0]}.{p[1]}"),
        pairs.map(lambda p: f"{p[0]}[{p[1]}]"),
        pairs.map(lambda p: f"{p[0]}({p[1]})"),
        st.tuples(FUNCTIONS, inner).map(lambda p: f"{p[0]}({p[1]})"),
        st.tuples(inner, BINARY, inner).map(lambda p: f"({p[0]} {p[1]} {p[2]})"),
        st.tuples(st.sampled_from(["!", "not ", "-", "~"]), inner).map("".join),
        pairs.map(lambda p: f"[{p[0]}, *{p[1]}]"),
        pairs.map(lambda p: f"{{{p[0]}: {p[1]}, **{p[0]}}}"),
        st.tuples(inner, inner, inner).map(lambda p: f"({p[0]} if {p[1]} else {p[2]})"),
        inner.map(lambda e: f"(lambda: {e})()"),
        pairs.map(lambda p: f"[{p[0]} for v in {p[1]}]"),
        inner.map(lambda e: f"f'{{{e}}}'"),
    )


EXPRESSIONS = st.recursive(ATOMS, _extend, max_leaves=12)


@FAST
@given(EXPRESSIONS)
def test_generated_expressions(expression: str) -> None:
    value, error = attempt(EVALUATOR, expression)
    if error is None:
        assert not callable(value) or isinstance(value, Tripwire)
    else:
        assert str(error)
        assert error.expression == expression


@FAST
@given(st.text(max_size=60), st.text(max_size=60))
def test_string_literals_pass_through_translation_untouched(left: str, right: str) -> None:
    assert EVALUATOR.evaluate(repr(left), {}) == left
    assert EVALUATOR.evaluate(f"{left!r} + {right!r} === {left + right!r}", {}) is True


Env = dict[str, bool]
Formula = tuple[str, Callable[[Env], bool], bool]  # source, JS meaning, is it a primary


def _operand(formula: Formula) -> str:
    """Parenthesise anything that is not a primary, as a JS author would have to."""
    source, _, primary = formula
    return source if primary else f"({source})"


# JS source templates with their meaning; ``!x === y`` is ``(!x) === y`` in JS, where a
# naive ``not x == y`` translation would read ``not (x == y)``.
JS_BINARY: list[tuple[str, Callable[[bool, bool], bool]]] = [
    ("{l} && {r}", lambda left, right: left and right),
    ("{l} || {r}", lambda left, right: left or right),
    ("!{l} === {r}", lambda left, right: (not left) == right),
    ("!{l} !== !{r}", lambda left, right: (not left) != (not right)),
]


def _combine(template: str, meaning: Callable[[bool, bool], bool]) -> Any:
    def build(pair: tuple[Formula, Formula]) -> Formula:
        left, right = pair
        source = template.format(l=_operand(left), r=_operand(right))
        return (source, lambda env: meaning(left[1](env), right[1](env)), False)

    return build


def _negate(formula: Formula) -> Formula:
    return (f"!{_operand(formula)}", lambda env: not formula[1](env), True)


def _js_formula(inner: st.SearchStrategy[Formula]) -> st.SearchStrategy[Formula]:
    pairs = st.tuples(inner, inner)
    return st.one_of(inner.map(_negate), *(pairs.map(_combine(*entry)) for entry in JS_BINARY))


def _leaf(name: str) -> Formula:
    if name in ("true", "false"):
        return (name, lambda env: name == "true", True)
    return (name, lambda env: env[name], True)


JS_FORMULAS = st.recursive(
    st.sampled_from(["a", "b", "c", "true", "false"]).map(_leaf), _js_formula, max_leaves=8
)


@FAST
@given(JS_FORMULAS, st.fixed_dictionaries({name: st.booleans() for name in "abc"}))
def test_javascript_boolean_logic_matches_javascript_precedence(formula: Formula, env: Env) -> None:
    source, meaning, _ = formula
    assert EVALUATOR.evaluate(source, env) == meaning(env)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=10,
)


@FAST
@given(JSON, st.text(max_size=30))
def test_resolve_path_never_raises(data: Any, path: str) -> None:
    resolve_path(data, path)
