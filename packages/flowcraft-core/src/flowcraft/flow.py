"""``Flow``: write a workflow in Python; get a blueprint and a registry for workers."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from flowcraft._builtins import BATCH, SLEEP, SUBFLOW, WAIT
from flowcraft.blueprint import (
    EdgeDefinition,
    NodeConfig,
    NodeDefinition,
    WorkflowBlueprint,
    describe_errors,
)
from flowcraft.errors import BlueprintError
from flowcraft.node import NodeImplementation

__all__ = ["Flow"]


class Flow:
    """A workflow builder.

    ``node(id, fn)`` registers a callable under ``uses="<flow id>.<id>"``; ``node(id, "key")``
    refers to an implementation registered elsewhere (a worker's registry). Every
    method returns the flow, so calls chain.
    """

    def __init__(
        self, flow_id: str, *, version: str | None = None, metadata: Mapping[str, Any] | None = None
    ) -> None:
        self.id = flow_id
        self._nodes: dict[str, NodeDefinition] = {}
        self._edges: list[EdgeDefinition] = []
        self._registry: dict[str, NodeImplementation] = {}
        self._metadata: dict[str, Any] = dict(metadata or {})
        if version is not None:
            self._metadata["version"] = version

    def node(
        self,
        node_id: str,
        implementation: NodeImplementation | str,
        *,
        params: Mapping[str, Any] | None = None,
        inputs: str | Mapping[str, str] | None = None,
        config: NodeConfig | Mapping[str, Any] | None = None,
        **config_fields: Any,
    ) -> Flow:
        """Add a node. Config may be given as ``config=`` or as keywords
        (``max_retries=3, retry_delay=100, timeout=5000, fallback="x", join_strategy="any"``)."""
        if node_id in self._nodes:
            raise BlueprintError(f"flow {self.id!r}: duplicate node id {node_id!r}")
        if isinstance(implementation, str):
            uses = implementation
        elif callable(implementation):
            # Keyed by flow and node, so flows sharing a runtime (or a worker) never
            # swap each other's callables.
            uses = f"{self.id}.{node_id}"
            self._registry[uses] = implementation
        else:
            raise BlueprintError(
                f"flow {self.id!r}: node {node_id!r} needs a callable, "
                "a BaseNode class or a uses key"
            )
        cfg: NodeConfig | None
        if isinstance(config, NodeConfig):
            cfg = config.model_copy(update=config_fields) if config_fields else config
        elif config is not None or config_fields:
            cfg = NodeConfig.model_validate({**dict(config or {}), **config_fields})
        else:
            cfg = None
        self._nodes[node_id] = NodeDefinition(
            id=node_id,
            uses=uses,
            params=dict(params) if params else None,
            inputs=inputs if isinstance(inputs, str | None) else dict(inputs),
            config=cfg,
        )
        return self

    def edge(
        self,
        source: str,
        target: str,
        *,
        action: str | None = None,
        condition: str | None = None,
        transform: str | None = None,
    ) -> Flow:
        """Add a transition; an edge back to an earlier node makes a loop."""
        self._edges.append(
            EdgeDefinition(
                source=source,
                target=target,
                action=action,
                condition=condition,
                transform=transform,
            )
        )
        return self

    def chain(self, *node_ids: str) -> Flow:
        """Edges between consecutive nodes: ``chain("a", "b", "c")``."""
        for a, b in itertools.pairwise(node_ids):
            self.edge(a, b)
        return self

    def loop(self, start: str, end: str, *, while_: str) -> Flow:
        """Repeat ``start`` .. ``end`` while ``while_`` holds after ``end``.

        ``while_`` sees the context and ``result`` (``end``'s result). Edges leaving
        the loop are followed once it stops.
        """
        return self.edge(end, start, condition=while_)

    def wait(self, node_id: str, **config_fields: Any) -> Flow:
        """A pause for a human or another system; resume it with an output and/or action."""
        return self.node(node_id, WAIT, **config_fields)

    def wait_for(
        self,
        node_id: str,
        event: str,
        *,
        token: str | None = None,
        token_from: str | None = None,
        timeout: float | str | None = None,
        **config_fields: Any,
    ) -> Flow:
        """A wait for an external event: ``signal(run id or token, event, payload)``
        resumes it with the payload as its output. ``token`` (or ``token_from``, an
        expression over the context and ``input``) correlates a signal without the
        run's id; after ``timeout`` (milliseconds or ``'30s'``, ``'2h'``...) it resolves
        by itself with the action ``timeout`` (give it an edge with that action)."""
        params: dict[str, Any] = {"event": event}
        if token is not None:
            params["token"] = token
        if token_from is not None:
            params["tokenFrom"] = token_from
        if timeout is not None:
            params["timeout"] = timeout
        return self.node(node_id, WAIT, params=params, **config_fields)

    def sleep(self, node_id: str, duration: float | str) -> Flow:
        """A timer: waits ``duration`` (milliseconds, or ``'5s'``, ``'1h'``, ``'2d'``),
        then passes its input on. Distributed, the wait is durable and costs nothing."""
        return self.node(node_id, SLEEP, params={"duration": duration})

    def subflow(
        self,
        node_id: str,
        blueprint_id: str,
        *,
        inputs: Mapping[str, str] | None = None,
        outputs: Mapping[str, str] | None = None,
        **config_fields: Any,
    ) -> Flow:
        """Run another blueprint to completion as one node.

        ``inputs`` maps child context keys to parent keys (or node ids: their
        outputs); without it, this node's input is the child's start nodes' input.
        ``outputs`` maps parent keys to child keys (or child node ids). The node's
        output is the child's terminal node's output (a dict by node id if it has
        several), or its whole final context when ``outputs`` is given.
        """
        params: dict[str, Any] = {"blueprintId": blueprint_id}
        if inputs:
            params["inputs"] = dict(inputs)
        if outputs:
            params["outputs"] = dict(outputs)
        return self.node(node_id, SUBFLOW, params=params, **config_fields)

    def batch(
        self,
        node_id: str,
        worker: NodeImplementation | str,
        *,
        concurrency: int = 16,
        params: Mapping[str, Any] | None = None,
        input_key: str | None = None,
        output_key: str | None = None,
        chunk_size: int | None = None,
        **config_fields: Any,
    ) -> Flow:
        """Scatter the input list over ``worker`` (at most ``concurrency`` at once) and
        gather the outputs, in order, as this node's output.

        As the TypeScript ``batch``: ``input_key`` names the list (a context key or
        a node id) instead of the predecessor's output, ``output_key`` also keeps
        the outputs under that context key, ``chunk_size`` runs the items that many
        at a time, chunk after chunk."""
        if isinstance(worker, str):
            key = worker
        else:
            key = f"{self.id}.{node_id}.worker"
            self._registry[key] = worker
        batch_params: dict[str, Any] = {"worker": key, "concurrency": concurrency}
        if params:
            batch_params["params"] = dict(params)
        if output_key is not None:
            batch_params["outputKey"] = output_key
        if chunk_size is not None:
            batch_params["chunkSize"] = chunk_size
        return self.node(node_id, BATCH, params=batch_params, inputs=input_key, **config_fields)

    def set_cycle_entry_point(self, node_id: str) -> Flow:
        """Start the run at ``node_id`` when it is entered only from its own cycle
        (``metadata.cycleEntryPoints``, as the TypeScript ``setCycleEntryPoint``)."""
        entries = self._metadata.setdefault("cycleEntryPoints", [])
        if node_id not in entries:
            entries.append(node_id)
        return self

    def registry(self) -> dict[str, NodeImplementation]:
        """The callables given to this flow, by ``uses`` key (hand it to workers)."""
        return dict(self._registry)

    def to_blueprint(self) -> WorkflowBlueprint:
        data = {
            "id": self.id,
            "nodes": tuple(self._nodes.values()),
            "edges": tuple(self._edges),
            "metadata": self._metadata or None,
        }
        try:
            blueprint = WorkflowBlueprint.model_validate(data)
        except ValidationError as exc:
            raise BlueprintError(describe_errors(data, exc)) from exc
        return blueprint.check()

    def __repr__(self) -> str:
        return f"Flow({self.id!r}, nodes={len(self._nodes)}, edges={len(self._edges)})"
