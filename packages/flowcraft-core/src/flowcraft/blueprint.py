"""The blueprint: a workflow as validated data.

The JSON form uses the TypeScript flowcraft's camelCase keys (``joinStrategy``,
``maxRetries``, ``retryDelay``), so a blueprint written for that tool loads
unchanged. Durations keep its unit, milliseconds, so the numbers mean the same
thing in both tools.

Every key the original defines is modelled (``_sourceLocation`` included) and any
other key is refused, so a typo such as ``maxRetrys`` fails at load instead of
being ignored; ``metadata``, ``params`` and ``inputs`` mappings stay free-form. The
model also refuses duplicate node ids and references to missing nodes (edge ends,
fallbacks, ``metadata.cycleEntryPoints``), every problem in one ``ValidationError``.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import InitErrorDetails, PydanticCustomError

from flowcraft.errors import BlueprintError

__all__ = [
    "EdgeDefinition",
    "JoinStrategy",
    "NodeConfig",
    "NodeDefinition",
    "SourceLocation",
    "WorkflowBlueprint",
    "blueprint_json_schema",
    "sanitize_blueprint",
]

JoinStrategy = Literal["all", "any"]

UNCHECKED_REFERENCES: Mapping[str, Any] = {"references": False}
"""A validation context (``model_validate(data, context=UNCHECKED_REFERENCES)``) that
skips the checks of references between nodes: for a linter that reports them itself."""


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        validate_default=False,
    )

    def to_json_dict(self) -> dict[str, Any]:
        """The camelCase JSON form, with only the fields that were given."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_unset=True)


class SourceLocation(_Model):
    """Where the TypeScript builder defined a node or edge (for debugging tools)."""

    file: str
    line: int
    column: int


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
    source_location: SourceLocation | None = Field(default=None, alias="_sourceLocation")
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
    source_location: SourceLocation | None = Field(default=None, alias="_sourceLocation")
    # (condition, transform) with hyphenated node ids spelled out; set by the analysis.
    _named: tuple[str | None, str | None] | None = PrivateAttr(default=None)


METADATA_KEYS: Mapping[str, str] = {
    "version": "a string (or an integer): which workers may run the blueprint",
    "cycleEntryPoints": "a list of node ids that start cycles",
}
"""The metadata keys with a meaning; any other key is the author's own."""

_METADATA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "version": {"type": ["string", "integer"]},
        "cycleEntryPoints": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": True,
}


def _metadata_types(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """Type the keys the engine reads; leave the rest free-form."""
    if value is None:
        return value
    problems: list[InitErrorDetails] = []
    version = value.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, str | int)):
        problems.append(_problem("metadata_type", ("version",), version, "must be a string"))
    entries = value.get("cycleEntryPoints")
    if entries is not None and (
        not isinstance(entries, list | tuple) or not all(isinstance(e, str) for e in entries)
    ):
        problems.append(
            _problem("metadata_type", ("cycleEntryPoints",), entries, "must be a list of node ids")
        )
    if problems:
        raise ValidationError.from_exception_data("metadata", problems)
    return value


Metadata = Annotated[dict[str, Any], WithJsonSchema(_METADATA_SCHEMA)]


class WorkflowBlueprint(_Model):
    """A whole workflow. ``metadata.version`` (if any) pins which workers may run it.

    Validation refuses unknown keys, duplicate node ids and references to missing
    nodes, and reports every problem at once (``UNCHECKED_REFERENCES`` skips the
    references, for linters)."""

    id: str = Field(min_length=1)
    nodes: tuple[NodeDefinition, ...]
    edges: tuple[EdgeDefinition, ...] = ()
    metadata: Metadata | None = None
    _analysis: Any = PrivateAttr(default=None)  # the runtime's cached graph analysis

    @field_validator("metadata", mode="after")
    @classmethod
    def _metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _metadata_types(value)

    @model_validator(mode="wrap")
    @classmethod
    def _references(
        cls, data: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        """Field errors and reference errors together, so one load shows them all."""
        check = not (info.context and info.context.get("references") is False)
        found = _reference_problems(data) if check and isinstance(data, Mapping) else []
        try:
            blueprint = handler(data)
        except ValidationError as exc:
            if not found:
                raise
            raise ValidationError.from_exception_data(cls.__name__, _details(exc) + found) from None
        if check and not isinstance(data, Mapping):  # JSON text or another object
            found = _reference_problems(blueprint)
        if found:
            raise ValidationError.from_exception_data(cls.__name__, found)
        return blueprint

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
        """Check references and expressions; raise ``BlueprintError`` naming every culprit.

        References are checked at load already; they are checked again here for a
        blueprint built without that check (``UNCHECKED_REFERENCES``)."""
        found: list[str] = [] if self.nodes else ["has no nodes"]
        for problem in _reference_problems(self):
            found.append(f"{_where(self, problem['loc'])}: {_custom_message(problem)}")
        for loc, what, detail in expression_problems(self):
            where = _where(self, loc[:2])
            if loc[0] == "edges":
                found.append(f"{where} has an {what}: {detail}")
            else:
                found.append(f"{where} input {loc[-1]!r}: {detail}")
        if found:
            raise BlueprintError(f"blueprint {self.id!r}: " + "; ".join(found))
        return self

    @classmethod
    def parse(cls, data: str | bytes | Mapping[str, Any]) -> WorkflowBlueprint:
        """Load and check a blueprint from JSON text or a dict; errors name the culprit."""
        if isinstance(data, str | bytes):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise BlueprintError(f"blueprint is not valid JSON: {exc}") from exc
        if not isinstance(data, Mapping):
            raise BlueprintError(f"blueprint must be a JSON object, not {type(data).__name__}")
        try:
            blueprint = cls.model_validate(data)
        except ValidationError as exc:
            raise BlueprintError(describe_errors(data, exc)) from exc
        return blueprint.check()

    def to_json(self) -> str:
        return json.dumps(self.to_json_dict())


# --------------------------------------------------------------------------- references


def _problem(kind: str, loc: tuple[str | int, ...], value: Any, message: str) -> InitErrorDetails:
    # The message goes in as a context value: braces in ids are never a template.
    return InitErrorDetails(
        type=PydanticCustomError(kind, "{message}", {"message": message}), loc=loc, input=value
    )


def _get(item: Any, key: str, name: str | None = None) -> Any:
    """A key of a JSON object or a field of a model (``name``: its Python name)."""
    if isinstance(item, Mapping):
        value = item.get(key)
        return item.get(name) if value is None and name else value
    return getattr(item, name or key, None)


def _seq(value: Any) -> Sequence[Any]:
    return value if isinstance(value, list | tuple) else ()


def _reference_problems(data: Any) -> list[InitErrorDetails]:
    """Duplicate node ids and references to missing nodes, from raw JSON or a model.

    Linear in the blueprint's size; values of the wrong type are left to the fields'
    own validation."""
    found: list[InitErrorDetails] = []
    first: dict[str, int] = {}
    for i, node in enumerate(_seq(_get(data, "nodes"))):
        nid = _get(node, "id")
        if not isinstance(nid, str):
            continue
        if nid in first:
            found.append(
                _problem(
                    "duplicate_node_id",
                    ("nodes", i, "id"),
                    nid,
                    f"duplicate node id {nid!r} (also nodes[{first[nid]}])",
                )
            )
        else:
            first[nid] = i
    for i, node in enumerate(_seq(_get(data, "nodes"))):
        fallback = _get(_get(node, "config"), "fallback")
        if isinstance(fallback, str) and fallback not in first:
            found.append(
                _problem(
                    "unknown_node",
                    ("nodes", i, "config", "fallback"),
                    fallback,
                    f"unknown fallback {fallback!r}: no node has that id",
                )
            )
    for i, edge in enumerate(_seq(_get(data, "edges"))):
        for end in ("source", "target"):
            value = _get(edge, end)
            if isinstance(value, str) and value not in first:
                found.append(
                    _problem(
                        "dangling_edge",
                        ("edges", i, end),
                        value,
                        f"edge {end} {value!r} is not a node",
                    )
                )
    metadata = _get(data, "metadata")
    if isinstance(metadata, Mapping):
        for i, entry in enumerate(_seq(metadata.get("cycleEntryPoints"))):
            if isinstance(entry, str) and entry not in first:
                found.append(
                    _problem(
                        "unknown_node",
                        ("metadata", "cycleEntryPoints", i),
                        entry,
                        f"cycle entry point {entry!r} is not a node",
                    )
                )
    return found


def expression_problems(
    data: Any, *, loop_conditions: bool = False
) -> list[tuple[tuple[str | int, ...], str, str]]:
    """Expressions the default evaluator would refuse, as (location, what, why): edge
    conditions and transforms, ``inputs`` mappings and, with ``loop_conditions``, a
    loop controller's ``params.condition``. Works on raw JSON or a model."""
    from flowcraft.expressions import validate_expression

    found: list[tuple[tuple[str | int, ...], str, str]] = []

    def check(loc: tuple[str | int, ...], what: str, expr: Any) -> None:
        if isinstance(expr, str):
            try:
                validate_expression(expr)
            except Exception as exc:
                found.append((loc, what, str(exc)))

    for i, edge in enumerate(_seq(_get(data, "edges"))):
        for field in ("condition", "transform"):
            check(("edges", i, field), f"invalid {field}", _get(edge, field))
    for i, node in enumerate(_seq(_get(data, "nodes"))):
        inputs = _get(node, "inputs")
        if isinstance(inputs, Mapping):
            for key, expr in inputs.items():
                check(("nodes", i, "inputs", key), "invalid input expression", expr)
        params = _get(node, "params")
        if loop_conditions and _get(node, "uses") in _LOOP_USES and isinstance(params, Mapping):
            check(("nodes", i, "params", "condition"), "invalid condition", params.get("condition"))
    return found


_LOOP_USES = frozenset({"loop-controller", "flowcraft:loop-controller"})


def _details(exc: ValidationError) -> list[InitErrorDetails]:
    """A ValidationError's errors, ready to be raised again with others."""
    details: list[InitErrorDetails] = []
    for err in exc.errors():
        detail = InitErrorDetails(
            type=err["type"], loc=err["loc"], input=err["input"], ctx=err.get("ctx", {})
        )
        try:
            ValidationError.from_exception_data("probe", [detail])
        except Exception:  # a custom error type: keep its type name and message
            detail = _problem(err["type"], err["loc"], err["input"], err["msg"])
        details.append(detail)
    return details


def _custom_message(problem: InitErrorDetails) -> str:
    kind = problem["type"]
    return kind.message() if isinstance(kind, PydanticCustomError) else str(kind)


def _where(data: Any, loc: Sequence[str | int]) -> str:
    """'node 'x' field 'config.fallback'' / 'edge #2 ('a' -> 'b')' for a location."""
    if len(loc) >= 2 and loc[0] in ("nodes", "edges") and isinstance(loc[1], int):
        items = _seq(_get(data, str(loc[0])))
        item = items[loc[1]] if loc[1] < len(items) else {}
        if loc[0] == "nodes":
            nid = _get(item, "id")
            where = f"node {nid if isinstance(nid, str) else '#' + str(loc[1])!r}"
        else:
            where = f"edge #{loc[1]} ({_get(item, 'source')!r} -> {_get(item, 'target')!r})"
        rest = ".".join(str(p) for p in loc[2:])
        return f"{where} field {rest!r}" if rest else where
    return error_path(loc) or "blueprint"


# --------------------------------------------------------------------------- unknown keys

_MODEL_AT: dict[tuple[str, ...], type[_Model]] = {
    (): WorkflowBlueprint,
    ("nodes", "#"): NodeDefinition,
    ("nodes", "#", "config"): NodeConfig,
    ("nodes", "#", "_sourceLocation"): SourceLocation,
    ("edges", "#"): EdgeDefinition,
    ("edges", "#", "_sourceLocation"): SourceLocation,
}


def known_keys(parent: Sequence[str | int]) -> list[str]:
    """The JSON keys allowed in the object at ``parent`` (``[]`` if free-form)."""
    shape = tuple("#" if isinstance(p, int) else p for p in parent)
    model = _MODEL_AT.get(shape)
    if model is None:
        return []
    return [f.alias or name for name, f in model.model_fields.items()]


def unknown_key_message(loc: Sequence[str | int]) -> str:
    """'unknown key; did you mean maxRetries?' for the key at the end of ``loc``."""
    key = str(loc[-1])
    keys = known_keys(loc[:-1])
    lowered = {k.lower(): k for k in keys}
    close = lowered.get(key.lower().replace("_", "")) or next(
        iter(difflib.get_close_matches(key, keys, n=1, cutoff=0.6)), None
    )
    if close is not None and close != key:
        return f"unknown key; did you mean {close}?"
    return f"unknown key (allowed: {', '.join(keys)})" if keys else "unknown key"


# --------------------------------------------------------------------------- messages


def error_path(loc: Sequence[str | int]) -> str:
    """``nodes[3].config.maxRetrys`` for pydantic's ``('nodes', 3, 'config', 'maxRetrys')``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


_PLAIN: Mapping[str, str] = {
    "missing": "required",
    "string_type": "must be a string",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "int_type": "must be an integer",
    "float_type": "must be a number",
}

_UNION_TAGS = frozenset({"str", "dict[str,str]"})  # the branches of ``inputs``


def error_message(err: Mapping[str, Any]) -> str:
    """One pydantic error in words (unknown keys get their suggestion)."""
    if err["type"] == "extra_forbidden":
        return unknown_key_message(err["loc"])
    return _PLAIN.get(str(err["type"]), str(err["msg"]))


def load_errors(exc: ValidationError) -> list[tuple[tuple[str | int, ...], str, str]]:
    """A failed load's errors as (location, code, message), one per problem: the
    branches of ``inputs`` (a string or a mapping) are merged into one."""
    found: list[tuple[tuple[str | int, ...], str, str]] = []
    merged: dict[tuple[str | int, ...], int] = {}  # an inputs location: its one error
    inside: set[tuple[str | int, ...]] = set()  # inputs locations with errors inside
    for err in exc.errors():
        loc = tuple(err["loc"])
        code = "unknown_key" if err["type"] == "extra_forbidden" else str(err["type"])
        tag = next(
            (i for i, p in enumerate(loc) if p in _UNION_TAGS and loc[i - 1] == "inputs"), None
        )
        if tag is None:
            found.append((loc, code, error_message(err)))
        elif loc[tag + 1 :]:  # a value inside the mapping: the mapping was the intent
            inside.add(loc[:tag])
            found.append((loc[:tag] + loc[tag + 1 :], code, error_message(err)))
        elif loc[:tag] not in merged:
            merged[loc[:tag]] = len(found)
            found.append((loc[:tag], "inputs_type", "must be a string or a mapping of strings"))
    drop = {i for base, i in merged.items() if base in inside}
    return [f for i, f in enumerate(found) if i not in drop]


def describe_errors(data: Any, exc: ValidationError) -> str:
    """Every error of a failed load in one line, each where it is and what it is."""
    bp = _get(data, "id") or "?"
    lines = [f"{_where(data, loc)}: {message}" for loc, _, message in load_errors(exc)]
    return f"invalid blueprint {bp!r}: " + "; ".join(lines)


def _known(model: type[BaseModel]) -> frozenset[str]:
    """The keys a model accepts: its camelCase aliases and its field names."""
    return frozenset(
        key
        for name, field in model.model_fields.items()
        for key in (name, field.alias or to_camel(name))
    )


def sanitize_blueprint(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with only the keys a blueprint, its nodes, their ``config``
    and its edges define: for blueprints decorated by UI tools (positions, styles),
    which loading refuses. Nothing else is checked: load the result to validate it."""

    def keep(item: Any, model: type[BaseModel]) -> Any:
        if not isinstance(item, Mapping):
            return item  # not an object: loading reports it
        known = _known(model)
        return {k: v for k, v in item.items() if k in known}

    out: dict[str, Any] = keep(raw, WorkflowBlueprint)
    nodes = out.get("nodes")
    if isinstance(nodes, Sequence) and not isinstance(nodes, str):
        out["nodes"] = [keep(n, NodeDefinition) for n in nodes]
        for node in out["nodes"]:
            if isinstance(node, dict) and isinstance(node.get("config"), Mapping):
                node["config"] = keep(node["config"], NodeConfig)
    edges = out.get("edges")
    if isinstance(edges, Sequence) and not isinstance(edges, str):
        out["edges"] = [keep(e, EdgeDefinition) for e in edges]
    return out


def blueprint_json_schema() -> dict[str, Any]:
    """The JSON Schema of the blueprint's JSON form (camelCase)."""
    return WorkflowBlueprint.model_json_schema(by_alias=True)
