"""The ``flowcraft`` command, driven through click's test runner on real files."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from flowcraft import WorkflowBlueprint
from flowcraft.cli import main, mermaid


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def write(tmp_path: Path, name: str, source: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return str(path)


def one_line_error(result: Result) -> str:
    """A usage error: exit 2, a single 'Error: ...' line, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: ")
    return lines[0]


CHAIN = """
    from flowcraft import Flow

    async def double(ctx):
        value = await ctx.get("value")
        return value * 2

    async def describe(ctx):
        await ctx.set("described", f"value is {ctx.input}")
        return ctx.input + 1

    DEFAULT_CONTEXT = {"value": 10}

    flow = Flow("chain").node("double", double).node("describe", describe)
    flow.chain("double", "describe")
"""

FAILING = """
    from flowcraft import Flow

    async def boom(ctx):
        raise RuntimeError("disk on fire")

    async def never(ctx):
        return "unreachable"

    flow = Flow("failing").node("boom", boom).node("after", never).edge("boom", "after")
"""

WAITING = """
    from flowcraft import Flow

    async def prepare(ctx):
        return {"draft": await ctx.get("title")}

    async def publish(ctx):
        return {"published": ctx.input}

    async def discard(ctx):
        return {"discarded": True}

    flow = (
        Flow("publishing")
        .node("prepare", prepare)
        .wait("review")
        .node("publish", publish)
        .node("discard", discard)
        .edge("prepare", "review")
        .edge("review", "publish", action="ok")
        .edge("review", "discard", action="no")
    )
"""


# ---------------------------------------------------------------- run: Python files


def test_run_python_file_uses_default_context_and_prints_context(tmp_path: Path) -> None:
    result = invoke("run", write(tmp_path, "chain.py", CHAIN))
    assert result.exit_code == 0, result.output
    context = json.loads(result.stdout)
    assert context["_outputs.double"] == 20
    assert context["_outputs.describe"] == 21
    assert context["described"] == "value is 20"
    assert "status: completed" in result.stderr


def test_progress_lines_per_node_on_stderr(tmp_path: Path) -> None:
    result = invoke("run", write(tmp_path, "chain.py", CHAIN))
    events = [line.split()[2:4] for line in result.stderr.splitlines() if " ms  " in line]
    assert events[:4] == [
        ["start", "double"],
        ["finish", "double"],
        ["start", "describe"],
        ["finish", "describe"],
    ]
    finish = next(line for line in result.stderr.splitlines() if "finish   double" in line)
    assert finish.rstrip().endswith("ms")  # the node's own duration


def test_quiet_hides_progress(tmp_path: Path) -> None:
    result = invoke("run", write(tmp_path, "chain.py", CHAIN), "--quiet")
    assert result.exit_code == 0
    assert "start" not in result.stderr
    assert json.loads(result.stdout)["_outputs.describe"] == 21


def test_context_option_replaces_default(tmp_path: Path) -> None:
    result = invoke("run", write(tmp_path, "chain.py", CHAIN), "-q", "--context", '{"value": 1}')
    assert json.loads(result.stdout)["_outputs.describe"] == 3


def test_context_file(tmp_path: Path) -> None:
    ctx_file = tmp_path / "ctx.json"
    ctx_file.write_text('{"value": 5}')
    result = invoke(
        "run", write(tmp_path, "chain.py", CHAIN), "-q", "--context-file", str(ctx_file)
    )
    assert result.exit_code == 0
    assert json.loads(result.stdout)["_outputs.double"] == 10


def test_json_output_is_one_object(tmp_path: Path) -> None:
    result = invoke("run", write(tmp_path, "chain.py", CHAIN), "--json", "-q")
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    payload = json.loads(lines[0])
    assert set(payload) == {"runId", "status", "context", "errors", "awaiting"}
    assert payload["status"] == "completed"
    assert payload["errors"] == []
    assert payload["awaiting"] == []
    assert payload["context"]["_outputs.describe"] == 21


def test_failed_run_exits_1_and_reports_the_node(tmp_path: Path) -> None:
    result = invoke("run", write(tmp_path, "failing.py", FAILING), "--json")
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    assert payload["status"] == "failed"
    [error] = payload["errors"]
    assert error["nodeId"] == "boom"
    assert "disk on fire" in error["message"]
    assert "_outputs.after" not in payload["context"]
    assert "error    boom" in result.stderr


def test_failed_run_human_output(tmp_path: Path) -> None:
    result = invoke("run", write(tmp_path, "failing.py", FAILING), "-q")
    assert result.exit_code == 1
    assert "status: failed" in result.stderr
    assert "error in node 'boom'" in result.stderr


# ---------------------------------------------------------------- picking the flow


TWO_FLOWS = """
    from flowcraft import Flow

    async def child_work(ctx):
        return (await ctx.get("n")) * 10

    async def parent_start(ctx):
        await ctx.set("n", 4)
        return "started"

    child = Flow("child-flow").node("work", child_work)
    parent = (
        Flow("parent-flow")
        .node("start", parent_start)
        .subflow("call", "child-flow", inputs={"n": "n"})
        .edge("start", "call")
    )
    alias = parent  # the same object under two names counts once
"""


def test_several_flows_need_flow_option(tmp_path: Path) -> None:
    line = one_line_error(invoke("run", write(tmp_path, "two.py", TWO_FLOWS)))
    assert "--flow" in line
    assert "child (id 'child-flow')" in line
    assert "parent (id 'parent-flow')" in line


@pytest.mark.parametrize("name", ["parent", "parent-flow"])
def test_flow_option_by_name_or_id_and_subflows_resolve(tmp_path: Path, name: str) -> None:
    result = invoke("run", write(tmp_path, "two.py", TWO_FLOWS), "--flow", name, "--json", "-q")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["context"]["_outputs.call"] == 40  # the sub-flow's terminal output


def test_unknown_flow_name(tmp_path: Path) -> None:
    line = one_line_error(invoke("run", write(tmp_path, "two.py", TWO_FLOWS), "--flow", "nope"))
    assert "no flow named 'nope'" in line


def test_file_without_flow(tmp_path: Path) -> None:
    line = one_line_error(invoke("run", write(tmp_path, "empty.py", "x = 1\n")))
    assert "defines no Flow" in line


def test_file_that_fails_to_import(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.py", "raise ImportError('no such thing')\n")
    line = one_line_error(invoke("run", path))
    assert "could not load" in line
    assert "no such thing" in line


def test_missing_file() -> None:
    assert "no such file" in one_line_error(invoke("run", "does/not/exist.py"))


def test_python_file_imports_its_siblings(tmp_path: Path) -> None:
    write(tmp_path, "helpers_for_cli_test.py", "async def node(ctx):\n    return 'from sibling'\n")
    path = write(
        tmp_path,
        "uses_sibling.py",
        """
        from flowcraft import Flow
        from helpers_for_cli_test import node

        flow = Flow("sibling").node("n", node)
        """,
    )
    result = invoke("run", path, "--json", "-q")
    assert json.loads(result.stdout)["context"]["_outputs.n"] == "from sibling"


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ("{not json", "--context is not valid JSON"),
        ("[1, 2]", "--context must be a JSON object"),
    ],
)
def test_bad_context(tmp_path: Path, context: str, message: str) -> None:
    line = one_line_error(invoke("run", write(tmp_path, "chain.py", CHAIN), "--context", context))
    assert message in line


def test_context_and_context_file_together(tmp_path: Path) -> None:
    ctx_file = tmp_path / "c.json"
    ctx_file.write_text("{}")
    path = write(tmp_path, "chain.py", CHAIN)
    line = one_line_error(invoke("run", path, "--context", "{}", "--context-file", str(ctx_file)))
    assert "not both" in line


def blueprint_file(tmp_path: Path, data: dict[str, Any], name: str = "bp.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_invalid_blueprint_names_the_edge(tmp_path: Path) -> None:
    path = blueprint_file(
        tmp_path,
        {
            "id": "bad",
            "nodes": [{"id": "a", "uses": "flowcraft:sleep"}],
            "edges": [{"source": "a", "target": "ghost"}],
        },
    )
    line = one_line_error(invoke("run", path))
    assert "'ghost'" in line
    assert "edge #0" in line


def test_blueprint_missing_uses(tmp_path: Path) -> None:
    path = blueprint_file(tmp_path, {"id": "bad", "nodes": [{"id": "a"}]})
    line = one_line_error(invoke("run", path))
    assert "node 'a'" in line
    assert "uses" in line


def test_blueprint_not_json(tmp_path: Path) -> None:
    path = tmp_path / "bp.json"
    path.write_text("{ nope")
    assert "not valid JSON" in one_line_error(invoke("run", str(path)))


def test_blueprint_unknown_uses_asks_for_registry(tmp_path: Path) -> None:
    path = blueprint_file(tmp_path, {"id": "x", "nodes": [{"id": "a", "uses": "mystery"}]})
    line = one_line_error(invoke("run", path))
    assert "'mystery'" in line
    assert "--registry" in line


def test_blueprint_with_only_builtins_needs_no_registry(tmp_path: Path) -> None:
    path = blueprint_file(
        tmp_path,
        {
            "id": "sleepy",
            "nodes": [
                {"id": "a", "uses": "flowcraft:sleep", "params": {"duration": 1}},
                {"id": "b", "uses": "flowcraft:sleep", "params": {"duration": 1}},
            ],
            "edges": [{"source": "a", "target": "b"}],
        },
    )
    result = invoke("run", path, "--json", "-q")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["status"] == "completed"
    assert set(payload["context"]) == {"_outputs.a", "_outputs.b"}


REGISTRY_MODULE = """
    async def shout(ctx):
        return str(await ctx.get("word")).upper()

    REGISTRY = {"shout": shout}
    NOT_A_REGISTRY = 42
"""


def shout_blueprint(tmp_path: Path) -> str:
    return blueprint_file(tmp_path, {"id": "loud", "nodes": [{"id": "s", "uses": "shout"}]})


def test_registry_from_file_path(tmp_path: Path) -> None:
    reg = write(tmp_path, "my_registry_file.py", REGISTRY_MODULE)
    result = invoke(
        "run",
        shout_blueprint(tmp_path),
        "--registry",
        f"{reg}:REGISTRY",
        "--context",
        '{"word": "hey"}',
        "--json",
        "-q",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["context"]["_outputs.s"] == "HEY"


def test_registry_from_module_in_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "cli_test_registry_mod.py", REGISTRY_MODULE)
    blueprint = Path(shout_blueprint(tmp_path)).name
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "run",
        blueprint,
        "--registry",
        "cli_test_registry_mod:REGISTRY",
        "--context",
        '{"word": "ok"}',
        "-q",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["_outputs.s"] == "OK"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon_here", "must look like module:ATTR"),
        ("cli_test_missing_module_xyz:REGISTRY", "cannot import"),
        ("{reg}:MISSING", "has no attribute 'MISSING'"),
        ("{reg}:NOT_A_REGISTRY", "must be a dict"),
        ("missing_file.py:REGISTRY", "no such file"),
    ],
)
def test_bad_registry(tmp_path: Path, spec: str, message: str) -> None:
    reg = write(tmp_path, "reg_for_errors.py", REGISTRY_MODULE)
    line = one_line_error(
        invoke("run", shout_blueprint(tmp_path), "--registry", spec.format(reg=reg))
    )
    assert message in line


# ---------------------------------------------------------------- awaiting and resume


def test_awaiting_exits_3_and_resume_completes(tmp_path: Path) -> None:
    path = write(tmp_path, "waiting.py", WAITING)
    state = tmp_path / "state.json"
    paused = invoke("run", path, "--context", '{"title": "Hello"}', "--save-state", str(state))
    assert paused.exit_code == 3, paused.output
    assert "status: awaiting" in paused.stderr
    assert f"flowcraft resume {path} --state {state} --node review --action no" in paused.stderr
    assert "actions it can take: no, ok" in paused.stderr
    assert json.loads(state.read_text())["waiting"][0][0] == "review"

    resumed = invoke(
        "resume",
        path,
        "--state",
        str(state),
        "--node",
        "review",
        "--action",
        "ok",
        "--output",
        '{"editor": "lee"}',
        "--json",
    )
    assert resumed.exit_code == 0, resumed.output
    payload = json.loads(resumed.stdout)
    assert payload["status"] == "completed"
    assert payload["context"]["_outputs.publish"] == {"published": {"editor": "lee"}}
    assert "_outputs.discard" not in payload["context"]
    assert payload["context"]["_outputs.prepare"] == {"draft": "Hello"}
    assert "skipped  discard" in resumed.stderr


def test_awaiting_without_save_state_explains_how(tmp_path: Path) -> None:
    result = invoke("run", write(tmp_path, "waiting.py", WAITING), "--json")
    assert result.exit_code == 3
    assert json.loads(result.stdout)["awaiting"] == ["review"]
    assert "--save-state" in result.stderr


def test_resume_other_action(tmp_path: Path) -> None:
    path = write(tmp_path, "waiting.py", WAITING)
    state = tmp_path / "s.json"
    invoke("run", path, "-q", "--save-state", str(state))
    resumed = invoke("resume", path, "--state", str(state), "--action", "no", "--json", "-q")
    assert resumed.exit_code == 0
    context = json.loads(resumed.stdout)["context"]
    assert context["_outputs.discard"] == {"discarded": True}
    assert "_outputs.publish" not in context


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--node", "prepare"], "not waiting"),
        (["--output", "yes"], "--output is not valid JSON"),
    ],
)
def test_resume_bad_input(tmp_path: Path, extra: list[str], message: str) -> None:
    path = write(tmp_path, "waiting.py", WAITING)
    state = tmp_path / "s.json"
    invoke("run", path, "-q", "--save-state", str(state))
    assert message in one_line_error(invoke("resume", path, "--state", str(state), *extra))


def test_resume_state_of_another_blueprint(tmp_path: Path) -> None:
    path = write(tmp_path, "waiting.py", WAITING)
    state = tmp_path / "s.json"
    invoke("run", path, "-q", "--save-state", str(state))
    other = write(tmp_path, "chain.py", CHAIN)
    line = one_line_error(invoke("resume", other, "--state", str(state)))
    assert "belongs to blueprint 'publishing'" in line


def test_resume_with_garbage_state(tmp_path: Path) -> None:
    state = tmp_path / "s.json"
    state.write_text('{"hello": 1}')
    line = one_line_error(invoke("resume", write(tmp_path, "w.py", WAITING), "--state", str(state)))
    assert "not a saved awaiting run" in line


# ---------------------------------------------------------------- graph


LOOP = """
    from flowcraft import Flow

    async def init(ctx):
        await ctx.set("count", 0)

    async def step(ctx):
        await ctx.set("count", (await ctx.get("count")) + 1)

    async def done(ctx):
        return await ctx.get("count")

    flow = (
        Flow("looping")
        .node("init", init)
        .node("step", step)
        .node("done", done)
        .edge("init", "step")
        .loop("step", "step", while_="count < 3")
        .edge("step", "done", condition="count >= 3")
    )
"""


def test_graph_of_a_loop_marks_the_back_edge(tmp_path: Path) -> None:
    result = invoke("graph", write(tmp_path, "loop.py", LOOP))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "flowchart TD"
    assert '    n0(["init"])' in lines
    assert "    n0 --> n1" in lines
    assert '    n1 -.->|"if count #lt; 3"| n1' in lines
    assert '    n1 -->|"if count #gt;= 3"| n2' in lines


def test_graph_escapes_hostile_ids_and_labels() -> None:
    bp = WorkflowBlueprint.parse(
        {
            "id": "hostile",
            "nodes": [
                {"id": 'a"]; click x', "uses": "u"},
                {"id": "b|<script>", "uses": "flowcraft:wait"},
                {"id": "ünï#code", "uses": "u", "config": {"fallback": "fb"}},
                {"id": "fb", "uses": "u"},
            ],
            "edges": [
                {"source": 'a"]; click x', "target": "b|<script>", "action": 'go"|'},
                {"source": "b|<script>", "target": "ünï#code", "condition": "x == 'a' and y"},
            ],
        }
    )
    text = mermaid(bp)
    assert '    n0(["a#quot;]; click x<br/><small>u</small>"])' in text
    assert '    n1{{"b#124;#lt;script#gt;<br/><small>flowcraft:wait</small>"}}' in text
    assert '    n0 -->|"go#quot;#124;"| n1' in text
    assert "ünï#35;code" in text
    assert '    n2 -.-|"fallback"| n3' in text
    for line in text.splitlines()[1:]:
        # only the generated ids start a statement; user text stays inside quotes
        assert line.startswith("    n")


def test_graph_of_example_style_flow_labels_actions(tmp_path: Path) -> None:
    result = invoke("graph", write(tmp_path, "w.py", WAITING))
    assert '    n1 -->|"ok"| n2' in result.stdout
    assert '    n1{{"review<br/><small>flowcraft:wait</small>"}}' in result.stdout


# ---------------------------------------------------------------- validate and schema


def test_validate_reports_counts_starts_and_loops(tmp_path: Path) -> None:
    result = invoke("validate", write(tmp_path, "loop.py", LOOP))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "ok: blueprint 'looping': 3 nodes, 3 edges",
        "start nodes: init",
        "end nodes: done",
        "loop: head 'step' over step",
    ]


def test_validate_json_without_registry_warns_about_unchecked_uses(tmp_path: Path) -> None:
    path = shout_blueprint(tmp_path)
    result = invoke("validate", path)
    assert result.exit_code == 0
    assert "loops: none" in result.stdout
    assert (
        "warning: nodes[0].uses: 'shout' is not a built-in and cannot be checked without "
        "a registry (--registry)" in result.stderr
    )
    assert invoke("validate", path, "--strict").exit_code == 1


def test_validate_rejects_a_cycle_without_exit(tmp_path: Path) -> None:
    path = blueprint_file(
        tmp_path,
        {
            "id": "trap",
            "nodes": [{"id": n, "uses": "flowcraft:sleep"} for n in ("s", "a", "b")],
            "edges": [
                {"source": "s", "target": "a"},
                {"source": "a", "target": "b"},
                {"source": "b", "target": "a"},
            ],
        },
    )
    result = invoke("validate", path)
    assert result.exit_code == 1
    assert "no exit" in result.stderr
    assert result.stdout == "invalid: blueprint 'trap': 1 error, 0 warnings\n"


def test_validate_with_registry_catches_unknown_uses(tmp_path: Path) -> None:
    reg = write(tmp_path, "reg_validate.py", REGISTRY_MODULE)
    path = blueprint_file(
        tmp_path,
        {"id": "x", "nodes": [{"id": "a", "uses": "shout"}, {"id": "b", "uses": "shuot"}]},
    )
    result = invoke("validate", path, "--registry", f"{reg}:REGISTRY")
    assert result.exit_code == 1
    assert (
        "error: nodes[1].uses: 'shuot' is not in the registry; did you mean shout?" in result.stderr
    )


def validate_json(*args: str, code: int = 1) -> dict[str, Any]:
    result = invoke("validate", *args, "--json")
    assert result.exit_code == code, result.output
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["valid"] is (code == 0)
    return report


def paths(report: dict[str, Any], kind: str = "errors") -> list[str]:
    return [p["path"] for p in report[kind]]


BROKEN: dict[str, Any] = {
    "id": "broken",
    "nodes": [
        {"id": "a", "uses": "flowcraft:doesnotexist"},
        {"id": "b", "uses": "flowcraft:sleep", "config": {"maxRetrys": 3}},
        {"id": "c", "uses": "flowcraft:sleep", "params": {"duration": "soon"}},
        {"id": "c", "uses": "flowcraft:wait", "_sourceLocation": {"file": "f", "line": 1}},
        {"id": "d", "uses": "flowcraft:subflow"},
    ],
    "edges": [
        {"source": "a", "target": "b", "conditon": "x > 1"},
        {"source": "b", "target": "ghost"},
        {"source": "phantom", "target": "c", "transform": "input +"},
    ],
    "metadata": {"cycleEntryPoint": ["a"], "owner": "me"},
    "verison": "1",
}


def test_validate_reports_every_error_at_once_with_paths(tmp_path: Path) -> None:
    report = validate_json(blueprint_file(tmp_path, BROKEN))
    assert report["blueprintId"] == "broken"
    found = {(p["path"], p["code"]): p["message"] for p in report["errors"]}
    assert found == {
        ("nodes[0].uses", "unknown_builtin"): "unknown built-in 'flowcraft:doesnotexist'",
        ("nodes[1].config.maxRetrys", "unknown_key"): "unknown key; did you mean maxRetries?",
        ("nodes[2].params.duration", "invalid_param"): (
            "sleep node 'c': invalid duration 'soon' (e.g. 500, '10s', '5m', '1h')"
        ),
        ("nodes[3].id", "duplicate_node_id"): "duplicate node id 'c' (also nodes[2])",
        ("nodes[3]._sourceLocation.column", "missing"): "required",
        ("nodes[4].params.blueprintId", "missing_param"): (
            "flowcraft:subflow needs a string blueprintId"
        ),
        ("edges[0].conditon", "unknown_key"): "unknown key; did you mean condition?",
        ("edges[1].target", "dangling_edge"): "edge target 'ghost' is not a node",
        ("edges[2].source", "dangling_edge"): "edge source 'phantom' is not a node",
        ("edges[2].transform", "invalid_expression"): report["errors"][-2]["message"],
        ("verison", "unknown_key"): "unknown key (allowed: id, nodes, edges, metadata)",
    }
    assert paths(report) == [path for path, _ in found]  # document order
    assert paths(report, "warnings") == ["metadata.cycleEntryPoint"]
    assert report["warnings"][0]["message"].endswith("did you mean cycleEntryPoints?")
    assert report["summary"] is None


def test_validate_human_report_lists_each_problem_on_stderr(tmp_path: Path) -> None:
    result = invoke("validate", blueprint_file(tmp_path, BROKEN))
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 11
    assert "error: nodes[1].config.maxRetrys: unknown key; did you mean maxRetries?" in errors
    assert result.stdout == "invalid: blueprint 'broken': 11 errors, 1 warning\n"


def test_unknown_builtin_is_an_error_even_without_registry(tmp_path: Path) -> None:
    path = blueprint_file(tmp_path, {"id": "x", "nodes": [{"id": "a", "uses": "flowcraft:slep"}]})
    report = validate_json(path)
    assert report["errors"] == [
        {
            "path": "nodes[0].uses",
            "code": "unknown_builtin",
            "message": "unknown built-in 'flowcraft:slep'; did you mean flowcraft:sleep?",
        }
    ]


def test_typescript_builtin_names_and_source_locations_are_valid(tmp_path: Path) -> None:
    where = {"file": "flow.ts", "line": 3, "column": 1}
    path = blueprint_file(
        tmp_path,
        {
            "id": "ts",
            "nodes": [
                {"id": "w", "uses": "wait", "_sourceLocation": where},
                {"id": "s", "uses": "sleep", "params": {"duration": "1s"}},
                {"id": "sub", "uses": "subflow", "params": {"blueprintId": "ts"}},
            ],
            "edges": [
                {"source": "w", "target": "s", "_sourceLocation": where},
                {"source": "s", "target": "sub"},
            ],
            "metadata": {"version": "1", "anything": {"goes": True}},
        },
    )
    report = validate_json(path, code=0)
    assert report["errors"] == report["warnings"] == []
    assert report["summary"] == {
        "nodes": 3,
        "edges": 2,
        "startNodes": ["w"],
        "endNodes": ["sub"],
        "loops": [],
    }


def test_every_example_and_typescript_scenario_validates(tmp_path: Path) -> None:
    from flowcraft.testing.compat import SCENARIOS

    examples = Path(__file__).parents[3] / "examples"
    for json_file in sorted(examples.glob("*.json")):
        assert validate_json(str(json_file), code=0)["errors"] == []
    for name, make in SCENARIOS.items():
        scenario = make()
        for i, bp in enumerate(scenario.blueprints):
            path = blueprint_file(tmp_path, dict(bp), f"{name}-{i}.json")
            report = validate_json(
                path, "--registry", f"{_registry_file(tmp_path, scenario)}:R", code=0
            )
            assert report["errors"] == [], (name, report)


def _registry_file(tmp_path: Path, scenario: Any) -> str:
    """A registry module with the scenario's keys (the validate command needs names only)."""
    path = tmp_path / f"reg_{abs(hash(tuple(scenario.registry)))}.py"
    keys = sorted(scenario.registry)
    path.write_text(f"R = {{k: (lambda ctx: None) for k in {keys!r}}}\n")
    return str(path)


@pytest.mark.parametrize(
    ("content", "code", "message"),
    [
        ("", "empty", "the file is empty (a blueprint is a JSON object)"),
        ("   \n", "empty", "the file is empty (a blueprint is a JSON object)"),
        ("[1, 2]", "not_object", "a blueprint is a JSON object, not a list"),
        ("null", "not_object", "a blueprint is a JSON object, not null"),
        ('"text"', "not_object", "a blueprint is a JSON object, not a str"),
        ("{nope", "not_json", "not valid JSON: "),
        ("[" * 100_000 + "]" * 100_000, "not_json", "the JSON is nested too deeply to read"),
    ],
)
def test_validate_hostile_files(tmp_path: Path, content: str, code: str, message: str) -> None:
    path = tmp_path / "bp.json"
    path.write_text(content)
    report = validate_json(str(path))
    assert [e["code"] for e in report["errors"]] == [code]
    assert report["errors"][0]["message"].startswith(message)
    assert report["errors"][0]["path"] == ""


def test_validate_exit_2_for_unreadable_input(tmp_path: Path) -> None:
    assert "no such file" in one_line_error(invoke("validate", str(tmp_path / "none.json")))
    binary = tmp_path / "bp.json"
    binary.write_bytes(b"\xff\xfe{")
    assert "cannot read" in one_line_error(invoke("validate", str(binary), "--json"))
    bad_registry = invoke("validate", shout_blueprint(tmp_path), "--registry", "nope")
    assert bad_registry.exit_code == 2


def test_validate_missing_fields_and_wrong_types(tmp_path: Path) -> None:
    path = blueprint_file(
        tmp_path,
        {
            "nodes": [{"uses": "flowcraft:wait"}, {"id": "b", "uses": "", "inputs": 5}],
            "edges": {"a": "b"},
        },
    )
    report = validate_json(path)
    assert {(e["path"], e["message"]) for e in report["errors"]} == {
        ("id", "required"),
        ("nodes[0].id", "required"),
        ("nodes[1].uses", "String should have at least 1 character"),
        ("nodes[1].inputs", "must be a string or a mapping of strings"),
        ("edges", "must be a list"),
    }
    assert report["blueprintId"] is None


def test_validate_ten_thousand_nodes(tmp_path: Path) -> None:
    """A big blueprint is one report, not ten thousand warnings; the work is linear
    (see benchmarks for timings, none asserted here)."""
    n = 10_000
    nodes = [{"id": f"n{i}", "uses": "step"} for i in range(n)]
    edges = [{"source": f"n{i}", "target": f"n{i + 1}"} for i in range(n - 1)]
    edges[4000] = {"source": "n4000", "target": "n4000x"}
    nodes.append({"id": "n1", "uses": "step"})
    report = validate_json(blueprint_file(tmp_path, {"id": "big", "nodes": nodes, "edges": edges}))
    assert paths(report) == [f"nodes[{n}].id", "edges[4000].target"]
    assert len(report["warnings"]) == 1  # one per unchecked uses key, not per node
    assert "(and 10000 more)" in report["warnings"][0]["message"]


def test_validate_unreachable_nodes_are_one_warning(tmp_path: Path) -> None:
    path = blueprint_file(
        tmp_path,
        {
            "id": "x",
            "nodes": [{"id": n, "uses": "flowcraft:sleep"} for n in ("a", "b", "c", "d")],
            "edges": [
                {"source": "a", "target": "b"},
                {"source": "c", "target": "d"},
                {"source": "d", "target": "c"},
            ],
            "metadata": {"cycleEntryPoints": []},
        },
    )
    report = validate_json(path, code=0)
    assert report["warnings"] == [
        {"path": "nodes[2]", "code": "unreachable", "message": "no start node reaches 'c', 'd'"}
    ]


def test_validate_self_loop_with_an_exit_is_valid(tmp_path: Path) -> None:
    path = blueprint_file(
        tmp_path,
        {
            "id": "poll",
            "nodes": [{"id": n, "uses": "flowcraft:sleep"} for n in ("s", "p", "done")],
            "edges": [
                {"source": "s", "target": "p"},
                {"source": "p", "target": "p", "condition": "result.output == null"},
                {"source": "p", "target": "done"},
            ],
        },
    )
    report = validate_json(path, code=0)
    assert report["summary"]["loops"] == [{"head": "p", "nodes": ["p"]}]


def test_validate_loop_body_naming_missing_nodes(tmp_path: Path) -> None:
    path = blueprint_file(
        tmp_path,
        {
            "id": "loop",
            "nodes": [
                {"id": "start", "uses": "flowcraft:sleep"},
                {"id": "ctl", "uses": "loop-controller", "params": {"condition": "n <"}},
            ],
            "edges": [
                {"source": "start", "target": "ctl"},
                {"source": "ctl", "target": "body", "action": "continue"},
                {"source": "body-end", "target": "ctl"},
            ],
        },
    )
    report = validate_json(path)
    assert paths(report) == [
        "nodes[1].params.condition",
        "edges[1].target",
        "edges[2].source",
    ]


def test_validate_python_flow_reports_all_reference_errors(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "dangling.py",
        """
        from flowcraft import Flow

        async def a(ctx):
            return 1

        flow = (
            Flow("dangling").node("a", a).node("b", "elsewhere")
            .edge("a", "nowhere").edge("void", "a")
        )
        """,
    )
    report = validate_json(path)
    assert paths(report) == ["edges[0].target", "edges[1].source"]
    ok = write(tmp_path, "ok_flow.py", CHAIN)
    assert validate_json(ok, code=0)["summary"]["nodes"] == 2


def test_validate_python_flow_checks_its_registry(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "elsewhere.py",
        """
        from flowcraft import Flow

        flow = Flow("uses-elsewhere").node("a", lambda c: 1).node("b", "elsewhere").edge("a", "b")
        """,
    )
    report = validate_json(path)
    assert report["errors"][0]["message"] == "'elsewhere' is not in the registry"


def test_validate_help_documents_exit_codes() -> None:
    result = invoke("validate", "--help")
    assert "0  valid" in result.stdout
    assert "1  invalid" in result.stdout
    assert "2  usage error or unreadable input" in result.stdout


def test_schema_is_the_blueprint_json_schema() -> None:
    result = invoke("schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert {"id", "nodes", "edges"} <= set(schema["properties"])
    node_schema = json.dumps(schema["$defs"])
    assert "joinStrategy" in node_schema
    assert "maxRetries" in node_schema
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["NodeConfig"]["additionalProperties"] is False


def test_help_lists_commands() -> None:
    result = invoke("--help")
    for command in ("run", "resume", "graph", "validate", "schema"):
        assert command in result.stdout


def test_resume_with_an_action_no_edge_takes_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "waiting.py", WAITING)
    state = tmp_path / "s.json"
    invoke("run", path, "-q", "--save-state", str(state))
    line = one_line_error(invoke("resume", path, "--state", str(state), "--action", "okay"))
    assert "no edge for action 'okay' (actions: no, ok)" in line
    # the state is untouched: the right action still resumes it
    assert invoke("resume", path, "--state", str(state), "--action", "ok", "-q").exit_code == 0


def test_invalid_flow_in_python_file_names_the_edge(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "bad_flow.py",
        """
        from flowcraft import Flow

        async def a(ctx):
            return 1

        flow = Flow("bad").node("a", a).edge("a", "nowhere")
        """,
    )
    line = one_line_error(invoke("run", path))
    assert "'nowhere'" in line


def test_batch_worker_must_be_in_the_registry(tmp_path: Path) -> None:
    path = blueprint_file(
        tmp_path,
        {
            "id": "batchy",
            "nodes": [{"id": "b", "uses": "flowcraft:batch", "params": {"worker": "missing"}}],
        },
    )
    assert "'missing'" in one_line_error(invoke("run", path))
    checked = invoke("validate", path)
    assert checked.exit_code == 0
    assert "warning: nodes[0].params.worker: 'missing' is not a built-in" in checked.stderr


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("flowcraft, version ")


def test_the_command_leaves_logging_and_sys_path_as_it_found_them(tmp_path: Path) -> None:
    import logging
    import sys

    log = logging.getLogger("flowcraft")
    handlers, level, path = list(log.handlers), log.level, list(sys.path)
    reg = write(tmp_path, "reg_cleanup.py", REGISTRY_MODULE)
    result = invoke("-v", "run", shout_blueprint(tmp_path), "--registry", f"{reg}:REGISTRY", "-q")
    assert result.exit_code == 0, result.output
    assert log.handlers == handlers
    assert log.level == level
    assert sys.path == path


def test_verbose_logs_node_failures_on_stderr(tmp_path: Path) -> None:
    result = invoke("-v", "run", write(tmp_path, "failing.py", FAILING), "-q")
    assert result.exit_code == 1
    assert "INFO flowcraft.runtime:" in result.stderr
    assert "disk on fire" in result.stderr
