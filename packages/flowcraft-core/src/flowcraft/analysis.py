"""Static analysis of a blueprint as a library: what the TypeScript flowcraft's
``analyzeBlueprint``, ``checkForCycles``, ``lintBlueprint``, ``generateMermaid`` and
``generateMermaidForRun`` give, with Python names (the JSON forms keep camelCase).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from flowcraft._analysis import GraphAnalysis, analyse
from flowcraft._builtins import (
    BATCH,
    BATCH_SCATTER,
    SUBFLOW,
    TYPESCRIPT_NAMES,
    WAIT,
)
from flowcraft.blueprint import UNCHECKED_REFERENCES, WorkflowBlueprint
from flowcraft.errors import FlowcraftError

if TYPE_CHECKING:
    from flowcraft.events import FlowEvent
    from flowcraft.flow import Flow

__all__ = [
    "BlueprintAnalysis",
    "LintIssue",
    "LintResult",
    "analyze_blueprint",
    "check_for_cycles",
    "generate_mermaid",
    "generate_mermaid_for_run",
    "lint_blueprint",
]

logger = logging.getLogger("flowcraft.analysis")


def _blueprint(target: WorkflowBlueprint | Flow | Mapping[str, Any]) -> WorkflowBlueprint:
    """A blueprint object, without the reference checks (a linter must see bad edges)."""
    from flowcraft.flow import Flow

    if isinstance(target, WorkflowBlueprint):
        return target
    if isinstance(target, Flow):
        return target.to_blueprint()
    return WorkflowBlueprint.model_validate(dict(target), context=dict(UNCHECKED_REFERENCES))


def _successors(blueprint: WorkflowBlueprint) -> dict[str, list[str]]:
    ids = {n.id for n in blueprint.nodes}
    out: dict[str, list[str]] = {n.id: [] for n in blueprint.nodes}
    for e in blueprint.edges:
        if e.source in ids and e.target in ids:
            out[e.source].append(e.target)
    return out


@dataclass(frozen=True, slots=True)
class BlueprintAnalysis:
    """The shape of a blueprint: ``terminal_node_ids`` have no outgoing edge."""

    cycles: list[list[str]]
    start_node_ids: list[str]
    terminal_node_ids: list[str]
    node_count: int
    edge_count: int
    is_dag: bool

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "cycles": self.cycles,
            "startNodeIds": self.start_node_ids,
            "terminalNodeIds": self.terminal_node_ids,
            "nodeCount": self.node_count,
            "edgeCount": self.edge_count,
            "isDag": self.is_dag,
        }


def check_for_cycles(target: WorkflowBlueprint | Flow | Mapping[str, Any]) -> list[list[str]]:
    """The cycles a depth-first search from each node (in blueprint order) closes,
    each as a path of node ids ending where it began; iterative, so deep graphs
    never hit a recursion limit."""
    blueprint = _blueprint(target)
    out = _successors(blueprint)
    cycles: list[list[str]] = []
    done: set[str] = set()
    for root in out:
        if root in done:
            continue
        # Iterative DFS; a back edge to a node on the path closes a cycle.
        path: list[str] = [root]
        on_path = {root}
        iters = [iter(out[root])]
        done.add(root)
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                iters.pop()
                on_path.discard(path.pop())
                continue
            if nxt in on_path:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in done:
                done.add(nxt)
                path.append(nxt)
                on_path.add(nxt)
                iters.append(iter(out[nxt]))
    return cycles


def analyze_blueprint(target: WorkflowBlueprint | Flow | Mapping[str, Any]) -> BlueprintAnalysis:
    """Cycles, start and terminal nodes, counts, and whether the graph is acyclic."""
    blueprint = _blueprint(target)
    out = _successors(blueprint)
    has_incoming = {t for targets in out.values() for t in targets}
    cycles = check_for_cycles(blueprint)
    return BlueprintAnalysis(
        cycles=cycles,
        start_node_ids=[n for n in out if n not in has_incoming],
        terminal_node_ids=[n for n, targets in out.items() if not targets],
        node_count=len(blueprint.nodes),
        edge_count=len(blueprint.edges),
        is_dag=not cycles,
    )


LintCode = Literal[
    "INVALID_EDGE_SOURCE",
    "INVALID_EDGE_TARGET",
    "MISSING_NODE_IMPLEMENTATION",
    "ORPHAN_NODE",
    "INVALID_BATCH_WORKER_KEY",
    "INVALID_SUBFLOW_BLUEPRINT_ID",
    "INVALID_FALLBACK",
    "INVALID_GRAPH",
]


@dataclass(frozen=True, slots=True)
class LintIssue:
    code: LintCode
    message: str
    node_id: str | None = None
    related_id: str | None = None

    def to_json_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.node_id is not None:
            data["nodeId"] = self.node_id
        if self.related_id is not None:
            data["relatedId"] = self.related_id
        return data


@dataclass(frozen=True, slots=True)
class LintResult:
    issues: list[LintIssue] = field(default_factory=list)

    @property
    def is_valid(self) -> bool:
        return not self.issues

    def to_json_dict(self) -> dict[str, Any]:
        return {"isValid": self.is_valid, "issues": [i.to_json_dict() for i in self.issues]}


def lint_blueprint(
    target: WorkflowBlueprint | Flow | Mapping[str, Any],
    registry: Mapping[str, Any] | Iterable[str],
    blueprints: Mapping[str, Any] | Iterable[str] = (),
) -> LintResult:
    """Problems found before running: edges naming unknown nodes, implementations
    missing from ``registry`` (built-ins count as present), nodes no start node
    reaches, batch workers and sub-flow blueprints that are unknown, fallbacks
    naming unknown nodes, and graphs this engine refuses (``INVALID_GRAPH``)."""
    from flowcraft.flow import Flow

    if isinstance(target, Flow):
        registry = {*registry, *target.registry()}
    blueprint = _blueprint(target)
    known = set(registry) | set(TYPESCRIPT_NAMES) | set(TYPESCRIPT_NAMES.values())
    known_blueprints = set(blueprints) | {blueprint.id}
    ids = {n.id for n in blueprint.nodes}
    issues: list[LintIssue] = []
    for e in blueprint.edges:
        if e.source not in ids:
            issues.append(
                LintIssue(
                    "INVALID_EDGE_SOURCE",
                    f"edge source {e.source!r} is not a node",
                    e.source,
                    e.target,
                )
            )
        if e.target not in ids:
            issues.append(
                LintIssue(
                    "INVALID_EDGE_TARGET",
                    f"edge target {e.target!r} is not a node",
                    e.target,
                    e.source,
                )
            )
    for node in blueprint.nodes:
        params = node.params or {}
        if node.uses not in known and node.uses != BATCH:
            issues.append(
                LintIssue(
                    "MISSING_NODE_IMPLEMENTATION",
                    f"node {node.id!r} uses {node.uses!r}, which is not in the registry",
                    node.id,
                )
            )
        worker = (
            params.get("workerUsesKey")
            if TYPESCRIPT_NAMES.get(node.uses, node.uses) == BATCH_SCATTER
            else params.get("worker")
            if node.uses == BATCH
            else None
        )
        if worker is not None and worker not in known:
            issues.append(
                LintIssue(
                    "INVALID_BATCH_WORKER_KEY",
                    f"batch node {node.id!r} names worker {worker!r}, which is not in the registry",
                    node.id,
                    str(worker),
                )
            )
        if TYPESCRIPT_NAMES.get(node.uses, node.uses) == SUBFLOW:
            child = params.get("blueprintId")
            if child not in known_blueprints:
                issues.append(
                    LintIssue(
                        "INVALID_SUBFLOW_BLUEPRINT_ID",
                        f"sub-flow node {node.id!r} names unknown blueprint {child!r}",
                        node.id,
                        str(child),
                    )
                )
        fallback = node.config.fallback if node.config else None
        if fallback is not None and fallback not in ids:
            issues.append(
                LintIssue(
                    "INVALID_FALLBACK",
                    f"node {node.id!r} names unknown fallback {fallback!r}",
                    node.id,
                    fallback,
                )
            )
    shape = analyze_blueprint(blueprint)
    fallbacks = {n.config.fallback for n in blueprint.nodes if n.config and n.config.fallback}
    out = _successors(blueprint)
    seen = set(shape.start_node_ids)
    seen |= set((blueprint.metadata or {}).get("cycleEntryPoints") or ())
    todo = list(seen)
    while todo:
        for nxt in out.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    for node in blueprint.nodes:
        if node.id not in seen and node.id not in fallbacks:
            issues.append(
                LintIssue(
                    "ORPHAN_NODE", f"node {node.id!r} is not reachable from a start node", node.id
                )
            )
    if not any(i.code.startswith("INVALID_EDGE") for i in issues):
        try:
            analyse(blueprint.check())
        except FlowcraftError as exc:
            issues.append(LintIssue("INVALID_GRAPH", str(exc)))
    return LintResult(issues)


# --------------------------------------------------------------------------- Mermaid

_MERMAID_ESCAPES = str.maketrans(
    {
        "#": "#35;",
        '"': "#quot;",
        "<": "#lt;",
        ">": "#gt;",
        "&": "#amp;",
        "|": "#124;",
        "`": "#96;",
        "\n": " ",
        "\r": " ",
    }
)


def _mermaid_text(text: str) -> str:
    return text.translate(_MERMAID_ESCAPES)


def generate_mermaid(target: WorkflowBlueprint | Flow | Mapping[str, Any]) -> str:
    """A Mermaid flowchart of the blueprint. Node ids are replaced by safe ``n<i>``
    names; labels carry the real ids. Back edges (loops) are dotted."""
    return "\n".join(_mermaid_lines(_blueprint(target)))


def _mermaid_lines(blueprint: WorkflowBlueprint) -> list[str]:
    try:
        analysis: GraphAnalysis | None = analyse(blueprint)
    except FlowcraftError as exc:
        logger.warning("cannot classify loops: %s", exc)
        analysis = None
    safe = {node.id: f"n{i}" for i, node in enumerate(blueprint.nodes)}
    lines = ["flowchart TD"]
    for node in blueprint.nodes:
        label = _mermaid_text(node.id)
        if node.uses not in (node.id, f"{blueprint.id}.{node.id}"):  # not a Flow callable
            label += f"<br/><small>{_mermaid_text(node.uses)}</small>"
        uses = TYPESCRIPT_NAMES.get(node.uses, node.uses)
        if uses == WAIT:
            shape = f'{{{{"{label}"}}}}'
        elif uses == SUBFLOW:
            shape = f'[["{label}"]]'
        elif analysis is not None and node.id in analysis.start_nodes:
            shape = f'(["{label}"])'
        else:
            shape = f'["{label}"]'
        lines.append(f"    {safe[node.id]}{shape}")
    kinds: dict[int, str] = {}
    if analysis is not None:
        kinds = {e.index: e.kind for edges in analysis.out.values() for e in edges}
    for i, edge in enumerate(blueprint.edges):
        if edge.source not in safe or edge.target not in safe:
            continue
        parts = []
        if edge.action is not None:
            parts.append(edge.action)
        if edge.condition is not None:
            parts.append(f"if {edge.condition}")
        arrow = "-.->" if kinds.get(i) == "back" else "-->"
        label = f'|"{_mermaid_text(" / ".join(parts))}"|' if parts else ""
        lines.append(f"    {safe[edge.source]} {arrow}{label} {safe[edge.target]}")
    for node in blueprint.nodes:
        fallback = node.config.fallback if node.config else None
        if fallback is not None and fallback in safe:
            lines.append(f'    {safe[node.id]} -.-|"fallback"| {safe[fallback]}')
    return lines


def generate_mermaid_for_run(
    target: WorkflowBlueprint | Flow | Mapping[str, Any], events: Iterable[FlowEvent]
) -> str:
    """The flowchart with a finished run's path highlighted: nodes that finished,
    failed or were skipped get classes ``completed``/``failed``/``skipped``, and
    edges between two nodes that ran are drawn thick (``linkStyle``)."""
    blueprint = _blueprint(target)
    finished: set[str] = set()
    failed: set[str] = set()
    skipped: set[str] = set()
    for event in events:
        if event.node_id is None:
            continue
        if event.type == "node:finish":
            finished.add(event.node_id)
        elif event.type == "node:error":
            failed.add(event.node_id)
        elif event.type == "node:skipped":
            skipped.add(event.node_id)
    skipped -= finished | failed
    ran = finished | failed
    lines = _mermaid_lines(blueprint)
    lines += [
        "    classDef completed fill:#d4edda,stroke:#28a745,stroke-width:2px",
        "    classDef failed fill:#f8d7da,stroke:#dc3545,stroke-width:2px",
        "    classDef skipped fill:#eeeeee,stroke:#999999,stroke-dasharray:4 4",
    ]
    safe = {node.id: f"n{i}" for i, node in enumerate(blueprint.nodes)}
    for name, members in (
        ("completed", finished - failed),
        ("failed", failed),
        ("skipped", skipped),
    ):
        chosen = [safe[n] for n in safe if n in members]
        if chosen:
            lines.append(f"    class {','.join(chosen)} {name}")
    drawn = [e for e in blueprint.edges if e.source in safe and e.target in safe]
    taken = [str(i) for i, e in enumerate(drawn) if e.source in finished and e.target in ran]
    if taken:
        lines.append(f"    linkStyle {','.join(taken)} stroke:#28a745,stroke-width:3px")
    return "\n".join(lines)
