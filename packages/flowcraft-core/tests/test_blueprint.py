import json
from typing import Any

import pytest
from pydantic import ValidationError

from flowcraft import (
    BlueprintError,
    EdgeDefinition,
    Flow,
    NodeConfig,
    NodeDefinition,
    WorkflowBlueprint,
    blueprint_json_schema,
    sanitize_blueprint,
)
from flowcraft._analysis import analyse
from flowcraft.blueprint import UNCHECKED_REFERENCES, SourceLocation

# Written in the TypeScript flowcraft's JSON form (camelCase, ms durations, free-form metadata).
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


def test_typescript_source_locations_load_and_round_trip() -> None:
    where = {"file": "flow.ts", "line": 12, "column": 3}
    data = json.loads(json.dumps(TS_BLUEPRINT))
    data["nodes"][0]["_sourceLocation"] = where
    data["edges"][0]["_sourceLocation"] = where
    bp = WorkflowBlueprint.parse(data)
    assert bp.nodes[0].source_location == SourceLocation(file="flow.ts", line=12, column=3)
    assert bp.to_json_dict() == data


def test_metadata_is_free_form_but_its_typed_keys_are_checked() -> None:
    bp = WorkflowBlueprint.parse(
        {"id": "x", "nodes": [{"id": "a", "uses": "u"}], "metadata": {"ui": {"x": 1}, "version": 3}}
    )
    assert bp.version == "3"
    assert bp.to_json_dict()["metadata"]["ui"] == {"x": 1}
    with pytest.raises(ValidationError) as caught:
        WorkflowBlueprint.model_validate(
            {
                "id": "x",
                "nodes": [{"id": "a", "uses": "u"}],
                "metadata": {"version": [1], "cycleEntryPoints": "a"},
            }
        )
    assert [e["loc"] for e in caught.value.errors()] == [
        ("metadata", "version"),
        ("metadata", "cycleEntryPoints"),
    ]


def _locs(data: dict[str, Any]) -> list[tuple[Any, ...]]:
    with pytest.raises(ValidationError) as caught:
        WorkflowBlueprint.model_validate(data)
    return [e["loc"] for e in caught.value.errors()]


def test_unknown_keys_are_refused_at_every_level_all_at_once() -> None:
    data = {
        "id": "x",
        "custom": True,
        "nodes": [
            {"id": "a", "uses": "u", "ui": {"x": 1}, "config": {"maxRetrys": 3}},
            {"id": "b", "uses": "u", "_sourceLocation": {"file": "f", "line": 1, "col": 2}},
        ],
        "edges": [{"source": "a", "target": "b", "label": "go"}],
    }
    assert sorted(_locs(data), key=str) == sorted(
        [
            ("custom",),
            ("nodes", 0, "ui"),
            ("nodes", 0, "config", "maxRetrys"),
            ("nodes", 1, "_sourceLocation", "col"),
            ("nodes", 1, "_sourceLocation", "column"),
            ("edges", 0, "label"),
        ],
        key=str,
    )
    with pytest.raises(
        BlueprintError, match=r"config.maxRetrys'?: unknown key; did you mean maxRetries\?"
    ):
        WorkflowBlueprint.parse(data)


def test_params_and_inputs_stay_free_form() -> None:
    bp = WorkflowBlueprint.parse(
        {
            "id": "x",
            "nodes": [
                {"id": "a", "uses": "u", "params": {"anything": {"deep": [1, {"x": None}]}}},
                {"id": "b", "uses": "u", "inputs": {"whatever": "a"}},
            ],
            "edges": [{"source": "a", "target": "b"}],
        }
    )
    assert bp.nodes[0].params == {"anything": {"deep": [1, {"x": None}]}}


def test_dangling_edges_duplicates_and_field_errors_in_one_validation_error() -> None:
    data = {
        "id": "x",
        "nodes": [
            {"id": "a", "uses": "u", "config": {"joinStrategy": "some", "fallback": "nobody"}},
            {"id": "a", "uses": "u"},
            {"id": "b", "uses": "u"},
        ],
        "edges": [
            {"source": "a", "target": "ghost"},
            {"source": "phantom", "target": "b"},
            {"source": "b", "target": "b", "extra": 1},
        ],
        "metadata": {"cycleEntryPoints": ["b", "void"]},
    }
    locs = _locs(data)
    assert set(locs) == {
        ("nodes", 0, "config", "joinStrategy"),
        ("nodes", 0, "config", "fallback"),
        ("nodes", 1, "id"),
        ("edges", 0, "target"),
        ("edges", 1, "source"),
        ("edges", 2, "extra"),
        ("metadata", "cycleEntryPoints", 1),
    }
    assert len(locs) == 7
    # the same through Python construction and JSON text
    with pytest.raises(ValidationError) as caught:
        WorkflowBlueprint(
            id="x",
            nodes=(NodeDefinition(id="a", uses="u"),),
            edges=(EdgeDefinition(source="a", target="ghost"),),
        )
    assert [e["loc"] for e in caught.value.errors()] == [("edges", 0, "target")]
    text = json.dumps(
        {"id": "x", "nodes": [{"id": "a", "uses": "u"}], "edges": [{"source": "zz", "target": "a"}]}
    )
    with pytest.raises(ValidationError) as caught:
        WorkflowBlueprint.model_validate_json(text)
    assert [e["loc"] for e in caught.value.errors()] == [("edges", 0, "source")]


def test_hostile_ids_are_not_message_templates() -> None:
    locs_and_msgs = []
    with pytest.raises(ValidationError) as caught:
        WorkflowBlueprint.model_validate(
            {
                "id": "x",
                "nodes": [{"id": "a", "uses": "u"}],
                "edges": [{"source": "a", "target": "{message}{0}%s"}],
            }
        )
    for err in caught.value.errors():
        locs_and_msgs.append(err["msg"])
    assert locs_and_msgs == ["edge target '{message}{0}%s' is not a node"]


def test_references_can_be_left_to_a_linter() -> None:
    bp = WorkflowBlueprint.model_validate(
        {"id": "x", "nodes": [{"id": "a", "uses": "u"}], "edges": [{"source": "a", "target": "z"}]},
        context=dict(UNCHECKED_REFERENCES),
    )
    with pytest.raises(BlueprintError, match="edge #0 \\('a' -> 'z'\\) field 'target'"):
        bp.check()


def test_a_loop_body_naming_missing_nodes_is_refused() -> None:
    data = {
        "id": "loop",
        "nodes": [
            {"id": "start", "uses": "u"},
            {"id": "ctl", "uses": "loop-controller", "params": {"condition": "n < 3"}},
        ],
        "edges": [
            {"source": "start", "target": "ctl"},
            {"source": "ctl", "target": "body-start", "action": "continue"},
            {"source": "body-end", "target": "ctl"},
        ],
    }
    assert _locs(data) == [("edges", 1, "target"), ("edges", 2, "source")]
    flow = Flow("loop").node("a", lambda c: 1).node("b", lambda c: 2).edge("a", "b")
    flow.loop("b", "missing-end", while_="x < 3")
    with pytest.raises(BlueprintError, match="'missing-end'"):
        flow.to_blueprint()


def test_a_self_loop_with_an_exit_is_valid_one_without_is_not() -> None:
    nodes = [{"id": "s", "uses": "u"}, {"id": "poll", "uses": "u"}, {"id": "done", "uses": "u"}]
    edges = [
        {"source": "s", "target": "poll"},
        {"source": "poll", "target": "poll", "condition": "result.output == 'wait'"},
    ]
    looping = WorkflowBlueprint.parse(
        {"id": "ok", "nodes": nodes, "edges": [*edges, {"source": "poll", "target": "done"}]}
    )
    assert analyse(looping).loop_of["poll"].head == "poll"
    trapped = WorkflowBlueprint.parse({"id": "trap", "nodes": nodes[:2], "edges": edges})
    with pytest.raises(BlueprintError, match="no exit"):
        analyse(trapped)


def test_ten_thousand_nodes_with_one_bad_edge_each_way() -> None:
    n = 10_000
    nodes = [{"id": f"n{i}", "uses": "u"} for i in range(n)]
    edges = [{"source": f"n{i}", "target": f"n{i + 1}"} for i in range(n - 1)]
    bp = WorkflowBlueprint.model_validate({"id": "big", "nodes": nodes, "edges": edges})
    assert len(bp.edges) == n - 1
    edges[5000] = {"source": "n5000", "target": "gone"}
    edges[7000] = {"source": "gone-too", "target": "n7001"}
    assert _locs({"id": "big", "nodes": nodes, "edges": edges}) == [
        ("edges", 5000, "target"),
        ("edges", 7000, "source"),
    ]


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


def test_json_schema_forbids_unknown_keys_except_in_free_form_places() -> None:
    schema = blueprint_json_schema()
    assert schema["additionalProperties"] is False
    for name in ("NodeDefinition", "NodeConfig", "EdgeDefinition", "SourceLocation"):
        assert schema["$defs"][name]["additionalProperties"] is False, name
    metadata = next(
        s for s in schema["properties"]["metadata"]["anyOf"] if s.get("type") == "object"
    )
    assert metadata["additionalProperties"] is True
    assert set(metadata["properties"]) == {"version", "cycleEntryPoints"}
    assert "_sourceLocation" in schema["$defs"]["NodeDefinition"]["properties"]


def test_config_defaults() -> None:
    cfg = NodeConfig()
    assert cfg.max_retries == 1
    assert cfg.join_strategy is None


def test_sanitize_blueprint_drops_what_ui_tools_add() -> None:
    """A blueprint decorated by a UI tool is refused as it is; sanitized, it loads with
    everything the model defines kept (camelCase and snake_case keys alike)."""
    raw = {
        "id": "ui",
        "nodes": [
            {
                "id": "a",
                "uses": "step",
                "params": {"position": "kept: params are free-form"},
                "config": {"maxRetries": 3, "color": "red"},
                "position": {"x": 1, "y": 2},
                "_sourceLocation": {"file": "f.ts", "line": 1, "column": 2},
            },
            {"id": "b", "uses": "step", "style": {"stroke": "blue"}},
        ],
        "edges": [{"source": "a", "target": "b", "action": "ok", "animated": True}],
        "metadata": {"version": "2", "canvas": {"zoom": 1.5}},
        "viewport": {"x": 0},
    }
    with pytest.raises(ValidationError):
        WorkflowBlueprint.model_validate(raw)
    clean = sanitize_blueprint(raw)
    blueprint = WorkflowBlueprint.model_validate(clean)
    assert [n.id for n in blueprint.nodes] == ["a", "b"]
    assert blueprint.nodes[0].max_attempts == 3
    assert blueprint.nodes[0].params == {"position": "kept: params are free-form"}
    assert blueprint.nodes[0].source_location is not None
    assert blueprint.edges[0].action == "ok"
    assert blueprint.metadata == {"version": "2", "canvas": {"zoom": 1.5}}
    assert "viewport" not in clean
    assert "position" not in clean["nodes"][0]
    assert raw["nodes"][0]["position"] == {"x": 1, "y": 2}, "the input is left as it was"
    # Dangling references are not the sanitizer's business: loading still refuses them.
    broken = sanitize_blueprint({**raw, "edges": [{"source": "a", "target": "zz"}]})
    with pytest.raises(ValidationError, match="zz"):
        WorkflowBlueprint.model_validate(broken)
