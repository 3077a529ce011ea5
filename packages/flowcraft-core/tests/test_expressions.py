"""Behaviour of the safe expression evaluator: conditions, transforms, paths, JS spellings."""

from __future__ import annotations

import ast
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from flowcraft.errors import ExpressionError, FlowcraftError
from flowcraft.expressions import Evaluator, SafeEvaluator, resolve_path, validate_expression

EVALUATOR = SafeEvaluator()


def condition_scope(**context: Any) -> dict[str, Any]:
    """What the runtime hands a condition: context keys plus ``result``."""
    result = {
        "output": {"status": "approved", "score": 0.8, "tags": ["a", "b"], "owner": None},
        "action": "retry",
        "error": None,
    }
    return {"count": 2, "user": {"name": "Ada", "roles": ["admin"]}, **context, "result": result}


def run(expression: str, scope: Mapping[str, Any] | None = None) -> Any:
    return EVALUATOR.evaluate(expression, condition_scope() if scope is None else scope)


# ----------------------------------------------------------------- conditions


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("result.output.status == 'approved'", True),
        ("result.output.status != 'approved'", False),
        ('result.action == "retry" and count < 3', True),
        ('result.action == "retry" and count >= 3', False),
        ("result.output.score > 0.5 or count > 10", True),
        ("not result.error", True),
        ("result.error is None", True),
        ("result.output.score <= 0.8 < 1", True),
        ("'admin' in user.roles", True),
        ("'guest' not in user.roles", True),
        ("'status' in result.output", True),
        ("'pro' in 'approved'", True),
        ("count + 1 == 3", True),
        ("count * 2 - 1", 3),
        ("count / 4", 0.5),
        ("7 // count", 3),
        ("7 % count", 1),
        ("count ** 3", 8),
        ("1.5e-3 * 1000", 1.5),
        ("0x10 + 1_000", 1016),
        ("-count", -2),
        ("'big' if count > 1 else 'small'", "big"),
        ("[1, 'two', None, True, 2.5]", [1, "two", None, True, 2.5]),
        ("(1, 2)", (1, 2)),
        ("{'a': [1, {'b': None}]}", {"a": [1, {"b": None}]}),
        ("result['output']['tags'][0]", "a"),
        ("result.output.tags[-1]", "b"),
        ("result.output.tags[0:1]", ["a"]),
        ("user.name[1:]", "da"),
    ],
)
def test_condition_features(expression: str, expected: Any) -> None:
    assert run(expression) == expected


def test_condition_sees_result_and_context_side_by_side() -> None:
    scope = condition_scope(threshold=0.5)
    assert EVALUATOR.evaluate("result.output.score > threshold", scope) is True


# ----------------------------------------------------------------- transforms


def test_transform_returns_a_dict_built_from_input_and_context() -> None:
    scope = {"input": {"amount": 42, "items": [1, 2]}, "user": {"name": "Ada"}}
    value = EVALUATOR.evaluate('{"total": input.amount, "user": user.name}', scope)
    assert value == {"total": 42, "user": "Ada"}


def test_transform_returns_lists_and_numbers() -> None:
    scope = {"input": {"items": [1, 2, 3]}, "extra": 4}
    assert EVALUATOR.evaluate("input.items", scope) == [1, 2, 3]
    assert EVALUATOR.evaluate("input.items + [extra]", scope) == [1, 2, 3, 4]
    assert EVALUATOR.evaluate("[*input.items, extra]", scope) == [1, 2, 3, 4]
    assert EVALUATOR.evaluate("len(input.items) * 2", scope) == 6
    assert EVALUATOR.evaluate("input", {"input": 21}) == 21
    assert EVALUATOR.evaluate("input * 2", {"input": 21}) == 42


def test_transform_spreads_a_dict() -> None:
    scope = {"input": {"a": 1, "b": 2}}
    assert EVALUATOR.evaluate("{**input, 'b': 3, 'c': 4}", scope) == {"a": 1, "b": 3, "c": 4}


def test_spreads_of_non_containers_fail_clearly() -> None:
    with pytest.raises(ExpressionError, match="cannot spread a int into a list"):
        EVALUATOR.evaluate("[*x]", {"x": 1})
    with pytest.raises(ExpressionError, match="cannot spread a list into a dict"):
        EVALUATOR.evaluate("{**x}", {"x": [1]})


# ---------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    "expression",
    [
        "result.output.missing",
        "result.output.missing.deeper.still",
        "result.output.owner.name",  # through None
        "result.output.status.upper",  # through a string: no Python attributes
        "result.output.score.real",  # through a number
        "result['output']['missing']",
        "result.output.tags[5]",
        "result.output.tags['x']",
        "result.output.owner['x']",
        "result.nothing[0].name",
    ],
)
def test_a_missing_path_is_none(expression: str) -> None:
    assert run(expression) is None


@pytest.mark.parametrize("key", ["items", "keys", "values", "get", "pop", "copy", "update"])
def test_dict_methods_are_key_lookups(key: str) -> None:
    assert run(f"result.output.{key}") is None
    assert EVALUATOR.evaluate(f"data.{key}", {"data": {key: "stored"}}) == "stored"


def test_length_reads_like_javascript() -> None:
    scope = {"xs": [1, 2, 3], "s": "abcd", "d": {"length": 7}, "e": {}}
    assert EVALUATOR.evaluate("xs.length", scope) == 3
    assert EVALUATOR.evaluate("s.length", scope) == 4
    assert EVALUATOR.evaluate("d.length", scope) == 7  # a key wins
    assert EVALUATOR.evaluate("e.length", scope) is None


def test_dotted_context_keys_are_reachable() -> None:
    scope = {"_outputs.fetch": {"status": 200}, "_inputs.parse": [1]}
    assert EVALUATOR.evaluate("_outputs.fetch.status == 200", scope) is True
    assert EVALUATOR.evaluate("_inputs.parse", scope) == [1]
    assert EVALUATOR.evaluate("_outputs.other.status", {"_outputs": {"other": {}}}) is None


def test_the_shortest_matching_key_wins() -> None:
    scope = {"a": {"b": 1}, "a.b": 2}
    assert EVALUATOR.evaluate("a.b", scope) == 1


def test_single_underscore_names_are_allowed() -> None:
    assert EVALUATOR.evaluate("_private._x", {"_private": {"_x": 1}}) == 1


def test_dunder_string_keys_are_plain_data_lookups() -> None:
    scope = {"data": {"__class__": "just a key"}}
    assert EVALUATOR.evaluate("data['__class__']", scope) == "just a key"
    assert EVALUATOR.evaluate("data['__dict__']", scope) is None


def test_results_are_the_scope_values_themselves() -> None:
    items = [1, 2]
    assert EVALUATOR.evaluate("input.items", {"input": {"items": items}}) is items


def test_scope_may_be_any_mapping() -> None:
    class Lazy(Mapping[str, Any]):
        def __getitem__(self, key: str) -> Any:
            if key == "x":
                return {"y": 5}
            raise KeyError(key)

        def __iter__(self) -> Iterator[str]:
            return iter(["x"])

        def __len__(self) -> int:
            return 1

    assert EVALUATOR.evaluate("x.y + 1", Lazy()) == 6


# ----------------------------------------------------------------- resolve_path


def test_resolve_path() -> None:
    data = {"a": {"b": [{"c": 1}]}, "_outputs.load": {"text": "hi"}, "n": None}
    assert resolve_path(data, "a.b.0.c") == 1
    assert resolve_path(data, "a.b.1.c") is None
    assert resolve_path(data, "a.b.length") == 1
    assert resolve_path(data, "_outputs.load") == {"text": "hi"}
    assert resolve_path(data, "_outputs.load.text") == "hi"
    assert resolve_path(data, "n.x") is None
    assert resolve_path(data, "missing") is None
    assert resolve_path("text", "0") is None


def test_resolve_path_wants_a_string() -> None:
    with pytest.raises(ExpressionError, match="must be a string"):
        resolve_path({}, 1)  # type: ignore[arg-type]


# ----------------------------------------------------------- unknown names


def test_an_unknown_name_is_an_error_that_lists_the_known_ones() -> None:
    with pytest.raises(ExpressionError) as caught:
        run("reslt.action == 'retry'")
    message = str(caught.value)
    assert "'reslt'" in message
    assert "result" in message
    assert "count" in message
    assert caught.value.expression == "reslt.action == 'retry'"


def test_unknown_names_read_as_none_when_not_strict() -> None:
    lenient = SafeEvaluator(strict_names=False)
    assert lenient.evaluate("missing", {}) is None
    assert lenient.evaluate("missing.deep.path", {}) is None
    assert lenient.evaluate("missing == null", {}) is True
    assert lenient.evaluate("!retries", {}) is True


def test_callers_can_declare_keys_that_may_be_absent() -> None:
    assert EVALUATOR.evaluate("retries == None", {"retries": None}) is True


# ------------------------------------------------------------ JS spellings


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("result.action === 'retry'", True),
        ("result.action !== 'retry'", False),
        ("result.action === 'retry' && count < 3", True),
        ("result.action === 'stop' || count < 3", True),
        ("!result.error", True),
        ("!!result.output", True),
        ("!(count > 1 && true)", False),
        ("!result.output.tags[0]", False),
        ("!result.output.owner && count == 2", True),
        ("result.error === null", True),
        ("result.error == undefined", True),
        ("result.output.missing === undefined", True),
        ("true && !false", True),
        ("[true, false, null]", [True, False, None]),
        ("result.output.tags.length > 1", True),
        ("count != 3", True),
    ],
)
def test_javascript_spellings(expression: str, expected: Any) -> None:
    assert run(expression) == expected


def test_bang_binds_tighter_than_comparison_as_in_javascript() -> None:
    # JS: (!a) == b ; a naive "not a == b" would read not (a == b).
    assert EVALUATOR.evaluate("!a == b", {"a": False, "b": True}) is True
    assert EVALUATOR.evaluate("!a == b", {"a": True, "b": True}) is False
    assert EVALUATOR.evaluate("!-x", {"x": 0}) is True


@pytest.mark.parametrize(
    "literal",
    [
        "'a && b'",
        '"x || y"',
        "'a === b !== c'",
        "'!done'",
        "'true false null undefined'",
        '"it\'s && fine"',
        "'''triple && quoted'''",
    ],
)
def test_javascript_operators_inside_strings_are_left_alone(literal: str) -> None:
    assert EVALUATOR.evaluate(literal, {}) == ast.literal_eval(literal)
    assert EVALUATOR.evaluate(f"{literal} == {literal}", {}) is True


def test_javascript_words_as_keys_stay_keys() -> None:
    scope = {"flags": {"true": 1, "null": 2}}
    assert EVALUATOR.evaluate("flags.true + flags.null", scope) == 3
    assert EVALUATOR.evaluate("flags['true']", scope) == 1


def test_python_spellings_still_work_alongside() -> None:
    assert run("result.action == 'retry' and not result.error and True") is True


def test_newlines_and_comments_are_whitespace() -> None:
    expression = "result.action == 'retry'  # retry path\n  && count < 3"
    assert run(expression) is True


# ---------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("len(result.output.tags)", 2),
        ("len(user.name)", 3),
        ("str(count)", "2"),
        ("str()", ""),
        ("int('12') + 1", 13),
        ("float('1.5')", 1.5),
        ("bool(result.error)", False),
        ("abs(-count)", 2),
        ("min(3, count)", 2),
        ("max(result.output.tags)", "b"),
        ("round(2.567, 2)", 2.57),
        ("round(2.5)", 2),
        ("lower(user.name)", "ada"),
        ("upper(user.name) == 'ADA'", True),
    ],
)
def test_whitelisted_helpers(expression: str, expected: Any) -> None:
    assert run(expression) == expected


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("lower(count)", "lower\\(\\) needs a string"),
        ("upper(None)", "upper\\(\\) needs a string"),
        ("min()", "at least one argument"),
        ("max(count)", "max\\(\\) needs a string, list or dict"),
        ("round(1.5, 1000)", "digits"),
        ("len(count)", "TypeError"),
    ],
)
def test_helpers_reject_bad_arguments(expression: str, reason: str) -> None:
    with pytest.raises(ExpressionError, match=reason):
        run(expression)


# ---------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("1 / 0", "division by zero"),
        ("None < 3", "'<' not supported"),
        ("'a' + 1", "TypeError"),
        ("{[1]: 2}", "unhashable"),
        ("result.output[[1]]", "cannot use a list as a key"),
        ("'x' in count", "'in' needs a string, list or dict"),
        ("'x' not in None", "'not in' needs"),
        ("(-8) ** 0.5", "not a real number"),
        ("'%s' % count", "string formatting"),
        ("int('nope')", "ValueError"),
        ("10.0 ** 400", "OverflowError"),
    ],
)
def test_runtime_failures_are_expression_errors(expression: str, reason: str) -> None:
    with pytest.raises(ExpressionError, match=reason) as caught:
        run(expression)
    assert caught.value.expression == expression
    assert repr(expression) in str(caught.value)


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("count ==", "invalid syntax"),
        ("a = 1", "invalid syntax"),
        ("import os", "invalid syntax"),
        ("count; count", "invalid syntax"),
        ("lambda: 1", "lambda is not allowed"),
        ("[x for x in y]", "comprehension is not allowed"),
        ("{x: 1 for x in y}", "comprehension is not allowed"),
        ("(x for x in y)", "generator expression is not allowed"),
        ("(y := 1)", "assignment"),
        ("f'{count}'", "f-string is not allowed"),
        ("{1, 2}", "set literal is not allowed"),
        ("count | 1", "operator \\| is not allowed"),
        ("count << 1", "operator << is not allowed"),
        ("~count", "operator ~ is not allowed"),
        ("b'x'", "bytes literals"),
        ("1j", "complex literals"),
        ("...", "ellipsis literals"),
        ("x.__class__", "contains '__'"),
        ("__builtins__", "contains '__'"),
        ("a__b", "contains '__'"),
        ("getattr(x, 'y')", "function 'getattr' is not allowed"),
        ("user.name.upper()", "calling methods"),
        ("(lower or upper)(x)", "computed functions"),
        ("len(x=1)", "keyword arguments"),
        ("len(*x)", "spread"),
        ("(*x,)", "spread"),
        ("await x", "await"),
    ],
)
def test_refused_at_compile_time(expression: str, reason: str) -> None:
    with pytest.raises(ExpressionError, match=reason) as caught:
        validate_expression(expression)
    assert "refused" in str(caught.value)
    assert caught.value.expression == expression


def test_expression_error_is_a_flowcraft_error() -> None:
    with pytest.raises(FlowcraftError):
        run("1/0")
    with pytest.raises(ValueError, match="division"):
        run("1/0")


def test_non_string_expression() -> None:
    with pytest.raises(ExpressionError, match="must be a string, not NoneType"):
        EVALUATOR.evaluate(None, {})  # type: ignore[arg-type]


def test_long_expressions_are_cut_in_messages() -> None:
    expression = "1/0 + " + " + ".join(["count"] * 100)
    with pytest.raises(ExpressionError) as caught:
        run(expression)
    assert len(str(caught.value)) < 300
    assert caught.value.expression == expression


# ----------------------------------------------------------------- validate


@pytest.mark.parametrize(
    "expression",
    [
        "result.output.status == 'approved'",
        "result.action === 'retry' && !done",
        "{'total': input.amount}",
        "no_such_name_needed_at_validation",
    ],
)
def test_validate_accepts_without_a_scope(expression: str) -> None:
    validate_expression(expression)


def test_validate_uses_the_evaluators_own_limits() -> None:
    small = SafeEvaluator(max_length=10)
    small.validate("a == 1")
    with pytest.raises(ExpressionError, match="longer than 10"):
        small.validate("a == 1 and b == 2")


# ------------------------------------------------------------------ limits


def test_limits_are_configurable() -> None:
    with pytest.raises(ExpressionError, match="nested deeper than 3"):
        SafeEvaluator(max_depth=3).validate("a + b + c + d")
    with pytest.raises(ExpressionError, match="brackets nested deeper than 2"):
        SafeEvaluator(max_depth=2).validate("[[[1]]]")
    with pytest.raises(ExpressionError, match="more than 5 syntax nodes"):
        SafeEvaluator(max_nodes=5).validate("[1, 2, 3, 4, 5]")
    with pytest.raises(ExpressionError, match="more than 10 items or characters"):
        SafeEvaluator(max_size=10).evaluate("'abcdef' + 'ghijkl'", {})
    with pytest.raises(ExpressionError, match="exceeds 64 bits"):
        SafeEvaluator(max_int_bits=64).evaluate("2 ** 70", {})
    assert SafeEvaluator(max_int_bits=64).evaluate("2 ** 60", {}) == 2**60


def test_size_budget_is_per_evaluation() -> None:
    evaluator = SafeEvaluator(max_size=10)
    for _ in range(3):
        assert evaluator.evaluate("'abcd' + 'efgh'", {}) == "abcdefgh"


def test_size_budget_counts_every_building_step() -> None:
    evaluator = SafeEvaluator(max_size=100)
    with pytest.raises(ExpressionError, match="more than 100"):
        evaluator.evaluate("[*xs, *xs, *xs]", {"xs": list(range(40))})
    with pytest.raises(ExpressionError, match="more than 100"):
        evaluator.evaluate("{**d, **d}", {"d": {str(i): i for i in range(60)}})
    with pytest.raises(ExpressionError, match="more than 100"):
        evaluator.evaluate("xs[:] + xs[:]", {"xs": list(range(30))})
    with pytest.raises(ExpressionError, match="more than 100"):
        evaluator.evaluate("str(xs)", {"xs": list(range(200))})


def test_repetition_is_bounded() -> None:
    assert run("'ab' * 3") == "ababab"
    assert run("[0] * 3") == [0, 0, 0]
    assert run("3 * [0]") == [0, 0, 0]
    assert run("'x' * -1") == ""
    with pytest.raises(ExpressionError, match="builds more than"):
        run("'a' * 10**9")
    with pytest.raises(ExpressionError, match="holds lists or dicts"):
        run("[[1]] * 3")


def test_integer_growth_is_bounded() -> None:
    with pytest.raises(ExpressionError, match="bits"):
        run("9 ** 9 ** 9")
    with pytest.raises(ExpressionError, match="bits"):
        run("(2 ** 4000) * (2 ** 4000)")
    assert run("2 ** -1") == 0.5
    assert run("0 ** 10**9") == 0
    assert run("1 ** 10**9") == 1


# --------------------------------------------------------------- machinery


def test_each_source_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_parse = ast.parse

    def counting_parse(source: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(source)
        return real_parse(source, *args, **kwargs)

    monkeypatch.setattr(ast, "parse", counting_parse)
    evaluator = SafeEvaluator()
    for value in range(5):
        assert evaluator.evaluate("x.v + 1", {"x": {"v": value}}) == value + 1
    evaluator.validate("x.v + 1")
    assert len(calls) == 1


def test_is_an_evaluator() -> None:
    assert isinstance(EVALUATOR, Evaluator)


def test_threads_do_not_share_scopes() -> None:
    evaluator = SafeEvaluator()
    failures: list[int] = []

    def work(number: int) -> None:
        for _ in range(300):
            scope = {"n": number, "data": {"v": [number] * 3}}
            if evaluator.evaluate("n * 10 + len(data.v) + data.v[0]", scope) != number * 11 + 3:
                failures.append(number)

    threads = [threading.Thread(target=work, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_reentrant_evaluation_from_a_scope_mapping() -> None:
    evaluator = SafeEvaluator()
    values = {"other": 1}

    class Nested(Mapping[str, Any]):
        """Evaluates another expression with the same evaluator while being read."""

        def __getitem__(self, key: str) -> Any:
            if key == "inner":
                return evaluator.evaluate("x * 2", {"x": 21})
            return values[key]

        def __iter__(self) -> Iterator[str]:
            return iter(["inner", "other"])

        def __len__(self) -> int:
            return 2

    # ``other`` is read after the nested evaluation: the outer names must be intact.
    assert evaluator.evaluate("inner + other", Nested()) == 43
    assert evaluator.evaluate("other", values) == 1
