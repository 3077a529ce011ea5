"""The blueprint: a workflow as validated data.

The JSON form uses the TypeScript flowcraft's camelCase keys (``joinStrategy``,
``maxRetries``, ``retryDelay``), so a blueprint written for that tool loads
unchanged. Durations keep its unit, milliseconds, so the numbers mean the same
thing in both tools. Unknown keys are kept (not validated) so a round trip loses
nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from flowcraft.errors import BlueprintError

__all__ = [
    "EdgeDefinition",
    "JoinStrategy",
    "NodeConfig",
    "NodeDefinition",
    "WorkflowBlueprint",
    "blueprint_json_schema",
]

JoinStrategy = Literal["all", "any"]


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="allow",
        frozen=True,
        validate_default=False,
    )

    def to_json_dict(self) -> dict[str, Any]:
        """The camelCase JSON form, with only the fields that were given."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_unset=True)


class NodeConfig(_Model):
    """How a node runs: retries, timeout, fallback and how it joins its predecessors.

    ``max_retries`` counts attempts in total (1 means no retry), as in the original.
    ``retry_delay`` and ``timeout`` are milliseconds.
    """

    max_retries: int = Field(default=1, ge=1)
    retry_delay: float = Field(default=0, ge=0)
    retry_backoff: Literal["fixed", "exponential"] = "exponential"
    timeout: float | None = Field(default=None, gt=0)
    fallback: str | None = None
    join_strategy: JoinStrategy | None = None


class NodeDefinition(_Model):
    """One node: which implementation it ``uses`` and with what."""

    id: str = Field(min_length=1)
    uses: str = Field(min_length=1)
    params: dict[str, Any] | None = None
    inputs: str | dict[str, str] | None = None
    config: NodeConfig | None = None
    # ``inputs`` expressions with hyphenated node ids spelled out; set by the analysis.
    _named_inputs: dict[str, str] | None = PrivateAttr(default=None)

    @property
    def join_strategy(self) -> JoinStrategy:
        return (self.config.join_strategy if self.config else None) or "all"

    @property
    def max_attempts(self) -> int:
        return self.config.max_retries if self.config else 1


class EdgeDefinition(_Model):
    """A transition. ``action`` matches the source's result action; ``condition``
    is an expression over the context and ``result``; ``transform`` computes the
    target's input from ``input`` (the source's output)."""

    source: str = Field(min_length=1)
    target: str = Field(min_length=1)
    action: str | None = None
    condition: str | None = None
    transform: str | None = None
    # (condition, transform) with hyphenated node ids spelled out; set by the analysis.
    _named: tuple[str | None, str | None] | None = PrivateAttr(default=None)


class WorkflowBlueprint(_Model):
    """A whole workflow. ``metadata.version`` (if any) pins which workers may run it."""

    id: str = Field(min_length=1)
    nodes: tuple[NodeDefinition, ...]
    edges: tuple[EdgeDefinition, ...] = ()
    metadata: dict[str, Any] | None = None
    _analysis: Any = PrivateAttr(default=None)  # the runtime's cached graph analysis

    @field_validator("nodes", mode="after")
    @classmethod
    def _unique_ids(cls, nodes: tuple[NodeDefinition, ...]) -> tuple[NodeDefinition, ...]:
        dupes = [nid for nid, n in Counter(n.id for n in nodes).items() if n > 1]
        if dupes:
            raise ValueError(f"duplicate node id(s): {', '.join(map(repr, dupes))}")
        return nodes

    @property
    def version(self) -> str | None:
        value = (self.metadata or {}).get("version")
        return None if value is None else str(value)

    def node(self, node_id: str) -> NodeDefinition:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise BlueprintError(f"blueprint {self.id!r} has no node {node_id!r}")

    def check(self) -> WorkflowBlueprint:
        """Check references and expressions; raise ``BlueprintError`` naming the culprit."""
        from flowcraft.expressions import validate_expression

        ids = {n.id for n in self.nodes}
        if not ids:
            raise BlueprintError(f"blueprint {self.id!r} has no nodes")
        for i, edge in enumerate(self.edges):
            where = f"edge #{i} ({edge.source!r} -> {edge.target!r})"
            for end in ("source", "target"):
                if getattr(edge, end) not in ids:
                    raise BlueprintError(
                        f"blueprint {self.id!r}: {where} has unknown {end} {getattr(edge, end)!r}"
                    )
            for field in ("condition", "transform"):
                expr = getattr(edge, field)
                if expr is not None:
                    try:
                        validate_expression(expr)
                    except Exception as exc:
                        raise BlueprintError(
                            f"blueprint {self.id!r}: {where} has an invalid {field}: {exc}"
                        ) from exc
        for node in self.nodes:
            fallback = node.config.fallback if node.config else None
            if fallback is not None and fallback not in ids:
                raise BlueprintError(
                    f"blueprint {self.id!r}: node {node.id!r} names unknown fallback {fallback!r}"
                )
            if isinstance(node.inputs, dict):
                for target, expr in node.inputs.items():
                    try:
                        validate_expression(expr)
                    except Exception as exc:
                        raise BlueprintError(
                            f"blueprint {self.id!r}: node {node.id!r} input {target!r}: {exc}"
                        ) from exc
        return self

    @classmethod
    def parse(cls, data: str | bytes | dict[str, Any]) -> WorkflowBlueprint:
        """Load and check a blueprint from JSON text or a dict; errors name the culprit."""
        if isinstance(data, str | bytes):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise BlueprintError(f"blueprint is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise BlueprintError(f"blueprint must be a JSON object, not {type(data).__name__}")
        try:
            blueprint = cls.model_validate(data)
        except ValidationError as exc:
            raise BlueprintError(_describe(data, exc)) from None
        return blueprint.check()

    def to_json(self) -> str:
        return json.dumps(self.to_json_dict())


def _describe(data: dict[str, Any], exc: ValidationError) -> str:
    """Turn pydantic's locations into 'node 'x'' / 'edge #2 (a -> b)' phrases."""
    bp = data.get("id", "?")
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        where = ".".join(str(p) for p in loc) or "blueprint"
        if len(loc) >= 2 and loc[0] in ("nodes", "edges") and isinstance(loc[1], int):
            items = data.get(str(loc[0])) or []
            item = items[loc[1]] if loc[1] < len(items) and isinstance(items[loc[1]], dict) else {}
            if loc[0] == "nodes":
                where = f"node {item.get('id', '#' + str(loc[1]))!r}"
            else:
                where = f"edge #{loc[1]} ({item.get('source')!r} -> {item.get('target')!r})"
            rest = ".".join(str(p) for p in loc[2:])
            if rest:
                where += f" field {rest!r}"
        lines.append(f"{where}: {err['msg']}")
    return f"invalid blueprint {bp!r}: " + "; ".join(lines)


def blueprint_json_schema() -> dict[str, Any]:
    """The JSON Schema of the blueprint's JSON form (camelCase)."""
    return WorkflowBlueprint.model_json_schema(by_alias=True)
