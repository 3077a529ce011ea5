"""Graph analysis and the traversal rules, shared by the in-memory runtime and
the distributed adapter so a workflow behaves the same in both.

Rules (one place, read this before changing either engine):

* Every edge is ``forward``, ``back`` (closes a cycle: its target is the loop's
  head) or ``exit`` (leaves a cycle). A cycle is a loop; each loop has exactly one
  head; nest loops through sub-flows.
* A node's *activation* ``g`` counts its runs: 1 outside loops, the iteration
  number inside one. Every node resolves once per activation: it runs, or it is
  *skipped* when no predecessor chose it (dead-path elimination), so untaken
  branches never block a join or the end of the run.
* A resolved node signals each forward successor "chosen" or "not chosen"
  (generation ``k`` inside its own loop, 1 otherwise). A successor with one
  required predecessor follows its signal. A join (several required
  predecessors) waits for all signals of its generation: ``all`` runs if any was
  chosen, ``any`` runs on the first chosen signal, and both are skipped if none.
* The loop *latch* joins the loop's tails (nodes with a back or exit edge) each
  iteration. If any chose a back edge, the head is activated for the next
  iteration; otherwise every exit edge signals as its source decided in that
  final iteration.
* The run ends when every reachable sink (a node with no forward or exit edge)
  has resolved.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from flowcraft.blueprint import EdgeDefinition, NodeDefinition, WorkflowBlueprint
from flowcraft.errors import BlueprintError
from flowcraft.expressions import name_hyphenated

EdgeKind = Literal["forward", "back", "exit"]

LOOP_CONTROLLER_USES: frozenset[str] = frozenset({"loop-controller", "flowcraft:loop-controller"})
"""The ``uses`` of a loop controller (the TypeScript name and this engine's)."""

NO_PARAMS: Mapping[str, Any] = MappingProxyType({})
"""The ``params`` of every node that declares none: one shared object, not one per node."""


@dataclass(frozen=True, slots=True)
class Edge:
    index: int
    source: str
    target: str
    kind: EdgeKind
    intra: bool  # forward edge inside one loop
    definition: EdgeDefinition
    action: str | None
    condition: str | None
    transform: str | None
    target_inputs: str | None = None  # the target's ``inputs`` when it is one path


@dataclass(slots=True)
class NodePlan:
    """What the hot path needs about one node, found with one lookup.

    ``single_call``: no config (one attempt, no timeout, no fallback) and no
    inputs mapping, so a plain function can be called directly. ``chain_link``:
    single call, plain edges and one simple successor, whose plan is
    ``next_plan``: the runtime walks such links plan to plan, touching no
    graph-sized table, so per-node cost stays flat as graphs grow. ``impl``
    caches the implementation resolved from ``impl_registry`` (a runtime's registry).
    """

    node_id: str
    node: NodeDefinition
    output_key: str
    params: Mapping[str, Any]
    fallback: NodeDefinition | None
    plain: bool  # no edge has an action, condition or transform
    simple_next: Edge | None  # see GraphAnalysis.simple_next
    single_call: bool
    chain_link: bool = False
    next_intra: bool = False  # simple_next stays inside one loop iteration
    next_plan: NodePlan | None = None
    impl: Any = None
    impl_registry: Any = None


@dataclass(frozen=True, slots=True)
class Loop:
    index: int
    head: str
    nodes: frozenset[str]
    tails: tuple[str, ...]
    terminal: bool = False  # no edge leaves it: a loop controller's ``break`` ends it


class GraphAnalysis:
    """Everything the traversal needs, computed once per blueprint (and cached)."""

    def __init__(self, blueprint: WorkflowBlueprint) -> None:
        self.blueprint = blueprint
        self.nodes: dict[str, NodeDefinition] = {n.id: n for n in blueprint.nodes}
        raw_out: dict[str, list[tuple[int, EdgeDefinition]]] = {nid: [] for nid in self.nodes}
        incoming: dict[str, int] = dict.fromkeys(self.nodes, 0)
        for i, e in enumerate(blueprint.edges):
            if e.source not in self.nodes or e.target not in self.nodes:
                raise BlueprintError(
                    f"blueprint {blueprint.id!r}: edge #{i} ({e.source!r} -> {e.target!r}) "
                    "names an unknown node"
                )
            raw_out[e.source].append((i, e))
            incoming[e.target] += 1
        fallbacks = {n.config.fallback for n in blueprint.nodes if n.config and n.config.fallback}
        self.fallback_only = frozenset(f for f in fallbacks if incoming[f] == 0)
        # A fallback only runs in its node's place, whose edges it then takes (as in
        # the TypeScript flowcraft): its own outgoing edges (usually the same ones,
        # written again) are not part of the graph, so they start and join nothing.
        fed_by_fallback: set[str] = set()
        for f in self.fallback_only:
            for _, e in raw_out[f]:
                incoming[e.target] -= 1
                fed_by_fallback.add(e.target)
            raw_out[f] = []
        scc = _strongly_connected(self.nodes, raw_out)
        self.scc = scc
        # ``metadata.cycleEntryPoints`` (TypeScript ``setCycleEntryPoint``): a node
        # entered only from its own cycle starts the run, and heads that cycle.
        entries = (blueprint.metadata or {}).get("cycleEntryPoints") or ()
        if not isinstance(entries, list | tuple) or not all(isinstance(e, str) for e in entries):
            raise BlueprintError(
                f"blueprint {blueprint.id!r}: metadata.cycleEntryPoints must be a list of node ids"
            )
        for entry in entries:
            if entry not in self.nodes:
                raise BlueprintError(
                    f"blueprint {blueprint.id!r}: cycle entry point {entry!r} is not a node"
                )
        entered_inside = {
            e
            for e in entries
            if incoming[e]
            and all(
                scc[src] == scc[e]
                for src, outs in raw_out.items()
                for _, edge in outs
                if edge.target == e
            )
        }
        self.start_nodes: tuple[str, ...] = tuple(
            nid
            for nid in self.nodes
            if (incoming[nid] == 0 and nid not in self.fallback_only and nid not in fed_by_fallback)
            or nid in entered_inside
        )
        if not self.start_nodes:
            raise BlueprintError(
                f"blueprint {blueprint.id!r} has no start node (every node has a predecessor; "
                "name one in metadata.cycleEntryPoints)"
            )
        sizes: dict[int, int] = {}
        for comp in scc.values():
            sizes[comp] = sizes.get(comp, 0) + 1
        self_loops = {s for s, outs in raw_out.items() for _, e in outs if e.target == s}
        self.cyclic = frozenset(n for n, c in scc.items() if sizes[c] > 1 or n in self_loops)
        back = _back_edges(self.start_nodes, raw_out, self.cyclic, scc)
        self.reachable = _reachable(self.start_nodes, raw_out)

        out: dict[str, tuple[Edge, ...]] = {}
        ids = self.node_ids = frozenset(self.nodes)
        for node in blueprint.nodes:
            exprs = (
                [node.inputs] if isinstance(node.inputs, str) else [*(node.inputs or {}).values()]
            )
            condition = (node.params or {}).get("condition")
            if node.uses in LOOP_CONTROLLER_USES and isinstance(condition, str):
                exprs.append(condition)
            named = {e: name_hyphenated(e, ids) for e in exprs}
            node._named_inputs = {e: n for e, n in named.items() if n != e} or None
        for nid, outs in raw_out.items():
            built: list[Edge] = []
            for i, e in outs:
                condition = name_hyphenated(e.condition, ids) if e.condition else e.condition
                transform = name_hyphenated(e.transform, ids) if e.transform else e.transform
                e._named = (condition, transform)
                spec = self.nodes[e.target].inputs
                same = nid in self.cyclic and scc[nid] == scc[e.target]
                kind: EdgeKind
                if (nid, i) in back:
                    kind = "back"
                elif nid in self.cyclic and not same:
                    kind = "exit"
                else:
                    kind = "forward"
                intra = kind == "forward" and same
                built.append(
                    Edge(
                        i,
                        nid,
                        e.target,
                        kind,
                        intra,
                        e,
                        e.action,
                        condition,
                        transform,
                        spec if isinstance(spec, str) and transform else None,
                    )
                )
            out[nid] = tuple(built)
        self.out = out

        loops: dict[int, Loop] = {}
        heads: dict[int, set[str]] = {}
        for node_edges in out.values():
            for edge in node_edges:
                if edge.kind == "back":
                    heads.setdefault(scc[edge.source], set()).add(edge.target)
        for comp, targets in heads.items():
            members = frozenset(n for n in self.cyclic if scc[n] == comp)
            if len(targets) > 1:
                raise BlueprintError(
                    f"blueprint {blueprint.id!r}: nodes {sorted(members)!r} form loops with "
                    f"several heads {sorted(targets)!r}; nest loops through a sub-flow"
                )
            tails = tuple(
                n for n in self.nodes if n in members and any(e.kind != "forward" for e in out[n])
            )
            controlled = any(self.nodes[n].uses in LOOP_CONTROLLER_USES for n in members)
            exits = any(e.kind == "exit" for n in members for e in out[n])
            if not controlled and not exits:
                raise BlueprintError(
                    f"blueprint {blueprint.id!r}: the cycle through {sorted(members)!r} has no "
                    "exit (no edge leaves it), so it would never end"
                )
            loops[comp] = Loop(len(loops), next(iter(targets)), members, tails, not exits)
        for nid in self.cyclic:
            if scc[nid] not in loops and nid in self.reachable:
                raise BlueprintError(
                    f"blueprint {blueprint.id!r}: node {nid!r} is on a cycle that cannot be entered"
                )
        self.loops = loops
        self.loop_of: dict[str, Loop] = {n: loops[scc[n]] for n in self.cyclic if scc[n] in loops}

        preds_first: dict[str, list[str]] = {nid: [] for nid in self.nodes}
        preds_loop: dict[str, list[str]] = {nid: [] for nid in self.nodes}
        for node_edges in out.values():
            for edge in node_edges:
                if edge.kind == "back" or edge.source not in self.reachable:
                    continue
                if edge.source not in preds_first[edge.target]:
                    preds_first[edge.target].append(edge.source)
                if edge.intra and edge.source not in preds_loop[edge.target]:
                    preds_loop[edge.target].append(edge.source)
        self.preds_first = {k: tuple(v) for k, v in preds_first.items()}
        self.preds_loop = {k: tuple(v) for k, v in preds_loop.items()}
        # A loop with no exit (its controller breaks to nowhere) ends like a sink:
        # when its latch stops it, not when one of its nodes first resolves.
        self.terminal_loops: tuple[Loop, ...] = tuple(
            lp for lp in loops.values() if lp.terminal and lp.head in self.reachable
        )
        in_terminal = frozenset(n for lp in self.terminal_loops for n in lp.nodes)
        self.sinks: tuple[str, ...] = tuple(
            n
            for n in self.nodes
            if n in self.reachable
            and n not in in_terminal
            and not any(e.kind != "back" for e in out[n])
        )
        self.tail_of_loop: dict[str, Loop] = {
            t: loop for loop in loops.values() for t in loop.tails
        }
        # Precomputed for the hot path: edges without an action (the default
        # route), whether any edge has an action, whether any has a condition.
        self.default_edges: dict[str, tuple[Edge, ...]] = {
            n: tuple(e for e in es if e.action is None) for n, es in out.items()
        }
        self.has_actions = frozenset(n for n, es in out.items() if any(e.action for e in es))
        self.has_conditions = frozenset(n for n, es in out.items() if any(e.condition for e in es))
        self.loop_controllers = frozenset(
            n for n, node in self.nodes.items() if node.uses in LOOP_CONTROLLER_USES
        )
        # Predecessors whose edge into a node transforms what it hands over: that
        # value is the node's input even when the node declares ``inputs``.
        transformed: dict[str, set[str]] = {}
        for node_edges in out.values():
            for edge in node_edges:
                if edge.transform:
                    transformed.setdefault(edge.target, set()).add(edge.source)
        self.transformed_from: dict[str, frozenset[str]] = {
            n: frozenset(s) for n, s in transformed.items()
        }
        # A node with a single forward edge to a single-predecessor node and no
        # loop or sink role: resolving it is one activation, no bookkeeping.
        self.simple_next: dict[str, Edge] = {}
        for n, es in out.items():
            if len(es) == 1 and es[0].kind == "forward" and n not in self.tail_of_loop:
                only = es[0]
                target = only.target
                if len(self.preds_first[target]) == 1 and len(self.preds_loop[target]) <= 1:
                    self.simple_next[n] = only
        self.plans: dict[str, NodePlan] = {}
        for n, node in self.nodes.items():
            fb = node.config.fallback if node.config else None
            simple = self.simple_next.get(n)
            plain = not any(e.action or e.condition or e.transform for e in out[n])
            single = node.config is None and node.inputs is None
            self.plans[n] = NodePlan(
                n,
                node,
                "_outputs." + n,
                node.params or NO_PARAMS,
                self.nodes[fb] if fb else None,
                plain,
                simple,
                single,
                chain_link=single and plain and simple is not None,
                next_intra=simple is not None and simple.intra,
            )
        for plan in self.plans.values():
            if plan.simple_next is not None:
                plan.next_plan = self.plans[plan.simple_next.target]
        # Every implementation name the blueprint needs: a run checks these, not each node.
        self.uses = frozenset(node.uses for node in blueprint.nodes)

    def required(self, node_id: str, generation: int) -> tuple[str, ...]:
        """The predecessors whose signals activation ``generation`` of the node waits for."""
        return self.preds_first[node_id] if generation == 1 else self.preds_loop[node_id]

    def is_join(self, node_id: str, generation: int) -> bool:
        return len(self.required(node_id, generation)) > 1

    def node(self, node_id: str) -> NodeDefinition:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise BlueprintError(
                f"blueprint {self.blueprint.id!r} has no node {node_id!r}"
            ) from None


def analyse(blueprint: WorkflowBlueprint) -> GraphAnalysis:
    """The analysis of a blueprint, computed once per blueprint object (kept on it)."""
    private = blueprint.__pydantic_private__  # a plain dict: no pydantic __getattr__
    found = private.get("_analysis") if private else None
    if found is None:
        found = GraphAnalysis(blueprint)
        blueprint._analysis = found
    assert isinstance(found, GraphAnalysis)
    return found


def _strongly_connected(
    nodes: Mapping[str, object], out: Mapping[str, list[tuple[int, EdgeDefinition]]]
) -> dict[str, int]:
    """Tarjan's algorithm, iterative (graphs of 100,000 nodes must not hit recursion limits)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comp: dict[str, int] = {}
    counter = 0
    components = 0
    for root in nodes:
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack.add(v)
            edges = out[v]
            recurse = False
            while i < len(edges):
                w = edges[i][1].target
                i += 1
                if w not in index:
                    work.append((v, i))
                    work.append((w, 0))
                    recurse = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if recurse:
                continue
            if low[v] == index[v]:
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp[w] = components
                    if w == v:
                        break
                components += 1
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return comp


def _back_edges(
    starts: tuple[str, ...],
    out: Mapping[str, list[tuple[int, EdgeDefinition]]],
    cyclic: frozenset[str],
    scc: Mapping[str, int],
) -> set[tuple[str, int]]:
    """Edges to a node still on the DFS path (from the start nodes, in blueprint order)."""
    back: set[tuple[str, int]] = set()
    state: dict[str, int] = {}  # 1 on path, 2 done
    for root in starts:
        if root in state:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        state[root] = 1
        while work:
            v, i = work.pop()
            edges = out[v]
            while i < len(edges):
                idx, e = edges[i]
                i += 1
                w = e.target
                seen = state.get(w)
                if seen == 1:
                    if v in cyclic and scc[v] == scc[w]:
                        back.add((v, idx))
                elif seen is None:
                    state[w] = 1
                    work.append((v, i))
                    work.append((w, 0))
                    break
            else:
                state[v] = 2
    return back


def _reachable(
    starts: tuple[str, ...], out: Mapping[str, list[tuple[int, EdgeDefinition]]]
) -> frozenset[str]:
    seen = set(starts)
    todo = list(starts)
    while todo:
        v = todo.pop()
        for _, e in out[v]:
            if e.target not in seen:
                seen.add(e.target)
                todo.append(e.target)
    return frozenset(seen)
