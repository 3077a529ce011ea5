import json

import pytest

from flowcraft import (
    BlueprintError,
    EdgeDefinition,
    NodeConfig,
    WorkflowBlueprint,
    blueprint_json_schema,
)
from flowcraft._analysis import analyse

# Written in the TypeScript flowcraft's JSON form (camelCase, ms durations, extra keys).
TS_BLUEPRINT = {
    "id": "doc-pipeline",
    "metadata": {"version": "2", "owner": "docs-team"},
    "nodes": [
        {"id": "load", "uses": "loadDocument", "params": {"path": "/tmp/x"}},
        {
            "id": "summarise",
            "uses": "llm",
            "inputs": "_outputs.load",
            "config": {"maxRetries": 3, "retryDelay": 250, "timeout": 10000},
        },
        {"id": "tag", "uses": "tagger", "inputs": {"text": "_outputs.load"}},
        {"id": "merge", "uses": "merge", "config": {"joinStrategy": "all"}},
    ],
    "edges": [
        {"source": "load", "target": "summarise"},
        {"source": "load", "target": "tag", "condition": "result.output.length > 10"},
        {"source": "summarise", "target": "merge", "transform": "input.summary"},
        {"source": "tag", "target": "merge"},
    ],
}


def test_typescript_blueprint_loads_unchanged_and_round_trips() -> None:
    bp = WorkflowBlueprint.parse(json.dumps(TS_BLUEPRINT))
    assert bp.version == "2"
    summarise = bp.node("summarise")
    assert summarise.config is not None
    assert summarise.config.max_retries == 3
    assert summarise.config.retry_delay == 250
    assert summarise.max_attempts == 3
    assert bp.node("merge").join_strategy == "all"
    assert bp.to_json_dict() == TS_BLUEPRINT | {"edges": TS_BLUEPRINT["edges"]}
    assert WorkflowBlueprint.parse(bp.to_json()) == bp


def test_unknown_keys_are_kept() -> None:
    data = {"id": "x", "nodes": [{"id": "a", "uses": "u", "ui": {"x": 1}}], "custom": True}
    bp = WorkflowBlueprint.parse(data)
    assert bp.to_json_dict()["nodes"][0]["ui"] == {"x": 1}
    assert bp.to_json_dict()["custom"] is True


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["edges"].append({"source": "load", "target": "ghost"}), "'ghost'"),
        (lambda d: d["edges"].append({"source": "nowhere", "target": "tag"}), "'nowhere'"),
        (lambda d: d["nodes"].append({"id": "tag", "uses": "again"}), "duplicate node id"),
        (
            lambda d: d["nodes"][3].update(config={"joinStrategy": "some"}),
            "node 'merge' field 'config.joinStrategy'",
        ),
        (lambda d: d["nodes"][0].pop("uses"), "node 'load' field 'uses'"),
        (lambda d: d["nodes"][1]["config"].update(maxRetries=0), "node 'summarise'"),
        (
            lambda d: d["edges"][1].update(condition="result.output >"),
            "edge #1 ('load' -> 'tag') has an invalid condition",
        ),
        (
            lambda d: d["nodes"][1]["config"].update(fallback="missing"),
            "unknown fallback 'missing'",
        ),
    ],
)
def test_invalid_blueprints_name_the_culprit(mutate, message) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(json.dumps(TS_BLUEPRINT))
    mutate(data)
    with pytest.raises(BlueprintError, match=message.replace("(", r"\(").replace(")", r"\)")):
        WorkflowBlueprint.parse(data)


def test_not_json_and_not_object() -> None:
    with pytest.raises(BlueprintError, match="not valid JSON"):
        WorkflowBlueprint.parse("{nope")
    with pytest.raises(BlueprintError, match="JSON object"):
        WorkflowBlueprint.parse("[1, 2]")


def test_cycle_without_exit_is_refused() -> None:
    bp = WorkflowBlueprint.parse(
        {
            "id": "spin",
            "nodes": [{"id": "a", "uses": "u"}, {"id": "b", "uses": "u"}, {"id": "c", "uses": "u"}],
            "edges": [
                {"source": "a", "target": "b"},
                {"source": "b", "target": "c"},
                {"source": "c", "target": "b"},
            ],
        }
    )
    with pytest.raises(BlueprintError, match="no exit"):
        analyse(bp)


def test_no_start_node_is_refused() -> None:
    bp = WorkflowBlueprint.parse(
        {
            "id": "ring",
            "nodes": [{"id": "a", "uses": "u"}, {"id": "b", "uses": "u"}],
            "edges": [{"source": "a", "target": "b"}, {"source": "b", "target": "a"}],
        }
    )
    with pytest.raises(BlueprintError, match="no start node"):
        analyse(bp)


def test_edge_kinds_and_loops_are_classified() -> None:
    bp = WorkflowBlueprint(
        id="loop",
        nodes=tuple(
            WorkflowBlueprint.model_validate(
                {"id": "t", "nodes": [{"id": n, "uses": "u"} for n in "abcd"]}
            ).nodes
        ),
        edges=(
            EdgeDefinition(source="a", target="b"),
            EdgeDefinition(source="b", target="c"),
            EdgeDefinition(source="c", target="b", condition="x < 3"),
            EdgeDefinition(source="c", target="d"),
        ),
    )
    a = analyse(bp)
    kinds = {(e.source, e.target): e.kind for es in a.out.values() for e in es}
    assert kinds == {
        ("a", "b"): "forward",
        ("b", "c"): "forward",
        ("c", "b"): "back",
        ("c", "d"): "exit",
    }
    assert a.start_nodes == ("a",)
    assert a.sinks == ("d",)
    loop = a.loop_of["b"]
    assert loop.head == "b"
    assert loop.tails == ("c",)
    assert analyse(bp) is a  # cached per blueprint


def test_json_schema_uses_camel_case() -> None:
    schema = json.dumps(blueprint_json_schema())
    assert "joinStrategy" in schema
    assert "maxRetries" in schema
    assert "join_strategy" not in schema


def test_config_defaults() -> None:
    cfg = NodeConfig()
    assert cfg.max_retries == 1
    assert cfg.join_strategy is None
