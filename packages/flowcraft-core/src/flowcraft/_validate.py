"""``flowcraft validate``'s checks: every problem of a blueprint in one report.

Loading a blueprint stops at the model's errors and running it stops at the first
missing implementation; a report for a person or a script needs all of them at
once, each with a path (``nodes[3].config.maxRetrys``), so this walks the raw JSON
as well as the model: unknown keys (with a suggestion), references to missing
nodes, expressions, unknown built-ins, implementations the registry lacks, the
built-ins' required params and the graph rules (loops, start nodes).
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from flowcraft._analysis import GraphAnalysis, analyse
from flowcraft._builtins import (
    BATCH,
    BATCH_GATHER,
    BATCH_SCATTER,
    LOOP_CONTROLLER,
    SLEEP,
    SUBFLOW,
    TYPESCRIPT_NAMES,
    WAIT,
    duration_ms,
)
from flowcraft.blueprint import (
    METADATA_KEYS,
    WorkflowBlueprint,
    error_path,
    expression_problems,
    load_errors,
)
from flowcraft.errors import FlowcraftError

__all__ = ["BUILTIN_USES", "Problem", "ValidationReport", "validate_blueprint"]

PREFIXED_BUILTINS = frozenset(
    {WAIT, SLEEP, SUBFLOW, BATCH, LOOP_CONTROLLER, BATCH_SCATTER, BATCH_GATHER}
)
BUILTIN_USES = PREFIXED_BUILTINS | frozenset(TYPESCRIPT_NAMES)
"""Every ``uses`` the engine implements itself (``flowcraft:*`` and the TypeScript names)."""

_SUGGEST_LIMIT = 5_000  # past this many candidates a suggestion costs more than it helps

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding: ``path`` locates it in the JSON ("" for the whole file)."""

    severity: Severity
    path: str
    code: str
    message: str
    loc: tuple[str | int, ...] = ()

    def to_json_dict(self) -> dict[str, str]:
        return {"path": self.path, "code": self.code, "message": self.message}

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


@dataclass(slots=True)
class ValidationReport:
    """What ``validate_blueprint`` found; ``analysis`` is set when the graph is sound."""

    blueprint_id: str | None
    problems: list[Problem] = field(default_factory=list)
    blueprint: WorkflowBlueprint | None = None
    analysis: GraphAnalysis | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def valid(self) -> bool:
        return not self.errors

    def add(self, severity: Severity, loc: Iterable[str | int], code: str, message: str) -> None:
        where = tuple(loc)
        self.problems.append(Problem(severity, error_path(where), code, message, where))

    def sort(self) -> ValidationReport:
        """In document order: the file, then id, nodes, edges, metadata, by index."""
        self.problems.sort(key=lambda p: _order(p.loc))
        return self

    def to_json_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "valid": self.valid,
            "blueprintId": self.blueprint_id,
            "errors": [p.to_json_dict() for p in self.errors],
            "warnings": [p.to_json_dict() for p in self.warnings],
            "summary": None,
        }
        if self.blueprint is not None and self.analysis is not None:
            bp, analysis = self.blueprint, self.analysis
            data["summary"] = {
                "nodes": len(bp.nodes),
                "edges": len(bp.edges),
                "startNodes": list(analysis.start_nodes),
                "endNodes": list(analysis.sinks),
                "loops": [
                    {"head": loop.head, "nodes": [n.id for n in bp.nodes if n.id in loop.nodes]}
                    for loop in analysis.loops.values()
                ],
            }
        return data


_TOP = {"id": 1, "nodes": 2, "edges": 3, "metadata": 4}


def _order(loc: tuple[str | int, ...]) -> tuple[tuple[int, int, str], ...]:
    head = (0, -1, "") if not loc else (_TOP.get(str(loc[0]), 5), 0, str(loc[0]))
    rest = tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in loc[1:])
    return (head, *rest)


def suggestion(word: str, choices: Collection[str]) -> str:
    """'; did you mean X?' when ``word`` is a near miss of one of ``choices``."""
    if len(choices) > _SUGGEST_LIMIT:
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


def validate_blueprint(
    data: Any,
    *,
    registry: Collection[str] | None = None,
    blueprints: Collection[str] | None = None,
) -> ValidationReport:
    """Every problem of ``data`` (parsed JSON, or a ``WorkflowBlueprint``).

    ``registry``: the ``uses`` keys available (None: unknown, so a ``uses`` that is
    not a built-in is a warning, not an error). ``blueprints``: the blueprint ids a
    sub-flow may name (None: unknown, a warning)."""
    if isinstance(data, WorkflowBlueprint):
        report = ValidationReport(data.id, blueprint=data)
        raw: Any = data
    elif not isinstance(data, Mapping):
        report = ValidationReport(None)
        kind = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
        if data is None:
            kind = "null"
        report.add("error", (), "not_object", f"a blueprint is a JSON object, not {kind}")
        return report
    else:
        raw = data
        bp_id = data.get("id")
        report = ValidationReport(bp_id if isinstance(bp_id, str) else None)
        try:
            report.blueprint = WorkflowBlueprint.model_validate(data)
        except ValidationError as exc:
            for loc, code, message in load_errors(exc):
                report.add("error", loc, code, message)
    _check_uses(report, raw, registry)
    _check_builtin_params(report, raw, blueprints)
    for loc, what, detail in expression_problems(raw, loop_conditions=True):
        report.add("error", loc, "invalid_expression", f"{what}: {detail}")
    _check_metadata_keys(report, raw)
    if report.blueprint is not None:
        try:
            report.analysis = analyse(report.blueprint)
        except FlowcraftError as exc:
            message = str(exc).removeprefix(f"blueprint {report.blueprint_id!r}: ")
            report.add("error", (), "invalid_graph", message)
        else:
            _check_reachability(report, report.blueprint, report.analysis)
    return report.sort()


def _items(raw: Any, key: str) -> list[tuple[int, Any]]:
    value = raw.get(key) if isinstance(raw, Mapping) else getattr(raw, key, None)
    return list(enumerate(value)) if isinstance(value, list | tuple) else []


def _field(item: Any, key: str) -> Any:
    return item.get(key) if isinstance(item, Mapping) else getattr(item, key, None)


def _check_uses(report: ValidationReport, raw: Any, registry: Collection[str] | None) -> None:
    """Unknown built-ins are errors; other unknown keys are errors with a registry and
    one warning per key without."""
    known = BUILTIN_USES | frozenset(registry or ())
    unchecked: dict[str, list[tuple[str | int, ...]]] = {}
    for i, node in _items(raw, "nodes"):
        uses = _field(node, "uses")
        params = _field(node, "params")
        wanted: list[tuple[tuple[str | int, ...], Any]] = [(("nodes", i, "uses"), uses)]
        if isinstance(params, Mapping):
            if uses == BATCH:
                wanted.append((("nodes", i, "params", "worker"), params.get("worker")))
            elif TYPESCRIPT_NAMES.get(uses, uses) == BATCH_SCATTER:
                wanted.append(
                    (("nodes", i, "params", "workerUsesKey"), params.get("workerUsesKey"))
                )
        for loc, key in wanted:
            if not isinstance(key, str) or not key or key in known:
                continue
            if key.startswith("flowcraft:"):
                report.add(
                    "error",
                    loc,
                    "unknown_builtin",
                    f"unknown built-in {key!r}{suggestion(key, PREFIXED_BUILTINS)}",
                )
            elif registry is not None:
                report.add(
                    "error",
                    loc,
                    "unknown_uses",
                    f"{key!r} is not in the registry{suggestion(key, known)}",
                )
            else:
                unchecked.setdefault(key, []).append(loc)
    for key, locs in unchecked.items():
        more = f" (and {len(locs) - 1} more)" if len(locs) > 1 else ""
        report.add(
            "warning",
            locs[0],
            "unchecked_uses",
            f"{key!r}{more} is not a built-in and cannot be checked without a registry "
            f"(--registry){suggestion(key, BUILTIN_USES)}",
        )


def _check_builtin_params(
    report: ValidationReport, raw: Any, blueprints: Collection[str] | None
) -> None:
    """The params a built-in cannot run without (else the run fails when it gets there)."""
    own_id = report.blueprint_id
    for i, node in _items(raw, "nodes"):
        uses = _field(node, "uses")
        kind = TYPESCRIPT_NAMES.get(uses, uses) if isinstance(uses, str) else None
        params = _field(node, "params")
        params = params if isinstance(params, Mapping) else {}
        at: tuple[str | int, ...] = ("nodes", i, "params")
        required = {
            SUBFLOW: ("blueprintId",),
            LOOP_CONTROLLER: ("condition",),
            BATCH: ("worker",),
            BATCH_SCATTER: ("workerUsesKey", "gatherNodeId"),
        }.get(kind or "", ())
        for key in required:
            if not isinstance(params.get(key), str) or not params.get(key):
                report.add("error", (*at, key), "missing_param", f"{uses} needs a string {key}")
        if kind == SLEEP and "duration" in params:
            try:
                duration_ms(params["duration"], str(_field(node, "id")))
            except ValueError as exc:
                report.add("error", (*at, "duration"), "invalid_param", str(exc))
        child = params.get("blueprintId")
        if kind == SUBFLOW and isinstance(child, str) and child and child != own_id:
            if blueprints is None:
                report.add(
                    "warning",
                    (*at, "blueprintId"),
                    "unchecked_blueprint",
                    f"sub-flow blueprint {child!r} is not in this file, so it is not checked",
                )
            elif child not in blueprints:
                report.add(
                    "error",
                    (*at, "blueprintId"),
                    "unknown_blueprint",
                    f"unknown blueprint {child!r}{suggestion(child, blueprints)}",
                )


def _check_metadata_keys(report: ValidationReport, raw: Any) -> None:
    """Metadata is the author's own, but a near miss of a key the engine reads is a typo."""
    metadata = raw.get("metadata") if isinstance(raw, Mapping) else getattr(raw, "metadata", None)
    if not isinstance(metadata, Mapping):
        return
    for key in metadata:
        if isinstance(key, str) and key not in METADATA_KEYS:
            hint = suggestion(key, METADATA_KEYS)
            if hint:
                report.add(
                    "warning",
                    ("metadata", key),
                    "unknown_metadata_key",
                    f"not a key flowcraft reads{hint}",
                )


def _check_reachability(
    report: ValidationReport, bp: WorkflowBlueprint, analysis: GraphAnalysis
) -> None:
    """One warning for all the nodes no start node reaches (fallbacks excepted)."""
    lost = [
        (i, n.id)
        for i, n in enumerate(bp.nodes)
        if n.id not in analysis.reachable and n.id not in analysis.fallback_only
    ]
    if lost:
        names = ", ".join(repr(nid) for _, nid in lost[:10])
        more = f" and {len(lost) - 10} more" if len(lost) > 10 else ""
        report.add(
            "warning",
            ("nodes", lost[0][0]),
            "unreachable",
            f"no start node reaches {names}{more}",
        )
