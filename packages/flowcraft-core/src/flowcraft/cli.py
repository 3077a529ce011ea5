"""The ``flowcraft`` command: run, resume, draw and check workflows from a terminal.

``flowcraft run FILE`` takes a Python file that defines a ``Flow`` at module level, or
a blueprint JSON file (whose implementations come from ``--registry``), runs it in
memory with ``FlowRuntime``, reports each node on stderr as it happens and prints the
final context on stdout.

Exit codes: 0 completed, 1 failed (or cancelled/stalled), 2 bad input or usage,
3 awaiting (a wait node paused the run; ``flowcraft resume`` continues it).

``flowcraft worker`` and the run commands on a fleet (``start``, ``status``, ``wait``,
``cancel``, ``resume RUN``, ``signal``, ``reconcile``, ``runs``, ``dead-letters``) live
in ``_cli_fleet.py``.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import click
from pydantic import ValidationError

from flowcraft._analysis import GraphAnalysis, analyse
from flowcraft._builtins import BATCH, BATCH_SCATTER, TYPESCRIPT_NAMES
from flowcraft._validate import BUILTIN_USES, ValidationReport, validate_blueprint
from flowcraft.analysis import generate_mermaid as mermaid
from flowcraft.blueprint import WorkflowBlueprint, blueprint_json_schema, load_errors
from flowcraft.errors import BlueprintError, FlowcraftError
from flowcraft.events import FlowEvent
from flowcraft.flow import Flow
from flowcraft.node import NodeImplementation
from flowcraft.runtime import FlowRuntime, RunStatus, RuntimeOptions, WorkflowResult

__all__ = ["main"]

logger = logging.getLogger("flowcraft.cli")

EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_AWAITING = 3

DEFAULT_CONTEXT_NAME = "DEFAULT_CONTEXT"

_module_counter = itertools.count()


class BadInput(click.ClickException):
    """A one-line error for bad input; exits with code 2, never a traceback."""

    exit_code = EXIT_BAD_INPUT


def _bad(message: str) -> NoReturn:
    raise BadInput(message)


# --------------------------------------------------------------------------- logging


class _ClickHandler(logging.Handler):
    """Writes records to whatever stderr is current (click's test runner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _configure_logging(verbosity: int) -> Callable[[], None]:
    """Send flowcraft's log records to stderr; returns what undoes it (the command may
    run inside another program, such as a test session)."""
    log = logging.getLogger("flowcraft")
    previous = log.level
    handler = _ClickHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(
        logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    )

    def undo() -> None:
        log.removeHandler(handler)
        log.setLevel(previous)

    return undo


def _importable(folder: str) -> None:
    """Put ``folder`` first on ``sys.path`` for the rest of this command."""
    if folder in sys.path:
        return
    sys.path.insert(0, folder)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(lambda: sys.path.remove(folder) if folder in sys.path else None)


# --------------------------------------------------------------------------- loading


@dataclass(slots=True)
class Target:
    """What a command works on: the blueprint, its implementations and related flows."""

    path: Path
    blueprint: WorkflowBlueprint
    registry: dict[str, NodeImplementation] = field(default_factory=dict)
    blueprints: dict[str, WorkflowBlueprint] = field(default_factory=dict)
    default_context: dict[str, Any] | None = None
    from_python: bool = False


def _import_file(path: Path) -> ModuleType:
    """Import a Python file as a fresh module; its folder is importable (sibling modules)."""
    _importable(str(path.parent.resolve()))
    name = f"_flowcraft_cli_{path.stem}_{next(_module_counter)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        _bad(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(name, None)
        _bad(f"could not load {path}: {type(exc).__name__}: {exc}")
    return module


def _flows_of(module: ModuleType) -> dict[str, Flow]:
    """Module-level ``Flow`` objects by attribute name (one name per object)."""
    found: dict[str, Flow] = {}
    seen: set[int] = set()
    for name, value in vars(module).items():
        if isinstance(value, Flow) and id(value) not in seen:
            seen.add(id(value))
            found[name] = value
    return found


def _pick_flow(path: Path, flows: Mapping[str, Flow], wanted: str | None) -> Flow:
    choices = ", ".join(f"{name} (id {flow.id!r})" for name, flow in flows.items())
    if wanted is not None:
        for name, flow in flows.items():
            if wanted in (name, flow.id):
                return flow
        _bad(f"{path} has no flow named {wanted!r}; choices: {choices or 'none'}")
    if not flows:
        _bad(f"{path} defines no Flow at module level")
    if len(flows) > 1:
        _bad(f"{path} defines several flows; pick one with --flow NAME: {choices}")
    return next(iter(flows.values()))


def _import_attr(spec: str, flag: str) -> Any:
    """``package.module:ATTR`` or ``path/file.py:ATTR``: the attribute, imported."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        _bad(f"{flag} must look like module:ATTR or file.py:ATTR, not {spec!r}")
    if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
        path = Path(module_part)
        if not path.is_file():
            _bad(f"{flag}: no such file {module_part!r}")
        module = _import_file(path)
    else:
        _importable(str(Path.cwd()))
        try:
            module = importlib.import_module(module_part)
        except Exception as exc:
            _bad(f"{flag}: cannot import {module_part!r}: {type(exc).__name__}: {exc}")
    try:
        return getattr(module, attr)
    except AttributeError:
        _bad(f"{flag}: module {module_part!r} has no attribute {attr!r}")


def _load_registry(spec: str) -> dict[str, NodeImplementation]:
    """``package.module:ATTR`` or ``path/file.py:ATTR``: a dict of uses -> callable, or a Flow."""
    value = _import_attr(spec, "--registry")
    if isinstance(value, Flow):
        return value.registry()
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and callable(v) for k, v in value.items()
    ):
        _bad(f"--registry: {spec} must be a dict mapping uses keys to callables")
    return dict(value)


def _blueprint_text(path: Path, flow_name: str | None) -> str:
    if flow_name is not None:
        _bad("--flow applies to Python files only")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _bad(f"cannot read {path}: {exc}")


def _load(path_text: str, flow_name: str | None, registry_spec: str | None) -> Target:
    path = Path(path_text)
    if not path.is_file():
        _bad(f"no such file: {path_text}")
    extra = _load_registry(registry_spec) if registry_spec else {}
    if path.suffix == ".py":
        module = _import_file(path)
        flows = _flows_of(module)
        chosen = _pick_flow(path, flows, flow_name)
        registry: dict[str, NodeImplementation] = {}
        blueprints: dict[str, WorkflowBlueprint] = {}
        try:
            # every flow of the module is known, so sub-flows resolve; the chosen one wins
            for flow in [*(f for f in flows.values() if f is not chosen), chosen]:
                bp = flow.to_blueprint()
                blueprints[bp.id] = bp
                registry.update(flow.registry())
        except FlowcraftError as exc:
            _bad(str(exc))
        default = getattr(module, DEFAULT_CONTEXT_NAME, None)
        if default is not None and not isinstance(default, Mapping):
            _bad(f"{path}: {DEFAULT_CONTEXT_NAME} must be a dict")
        return Target(
            path,
            blueprints[chosen.id],
            {**registry, **extra},
            blueprints,
            dict(default) if default is not None else None,
            from_python=True,
        )
    text = _blueprint_text(path, flow_name)
    try:
        blueprint = WorkflowBlueprint.parse(text)
    except FlowcraftError as exc:
        _bad(f"{path}: {exc}")
    return Target(path, blueprint, extra, {blueprint.id: blueprint})


def _analyse(target: Target) -> GraphAnalysis:
    try:
        return analyse(target.blueprint)
    except FlowcraftError as exc:
        _bad(f"{target.path}: {exc}")


def _implementations_needed(blueprint: WorkflowBlueprint) -> set[str]:
    """The ``uses`` keys a registry must supply: non-built-in nodes and batch workers."""
    needed = {n.uses for n in blueprint.nodes if n.uses not in BUILTIN_USES}
    for node in blueprint.nodes:
        params = node.params or {}
        worker = params.get("worker") if node.uses == BATCH else None
        if TYPESCRIPT_NAMES.get(node.uses, node.uses) == BATCH_SCATTER:
            worker = params.get("workerUsesKey")
        if isinstance(worker, str):
            needed.add(worker)
    return needed


def _check_registry(target: Target, registry: Mapping[str, NodeImplementation]) -> None:
    missing = sorted(k for k in _implementations_needed(target.blueprint) if k not in registry)
    if missing:
        hint = "" if target.from_python else " (pass --registry module:ATTR)"
        _bad(f"{target.path}: unknown implementation(s) {', '.join(map(repr, missing))}{hint}")


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        _bad(f"{what} is not valid JSON: {exc}")
    if not isinstance(value, dict):
        _bad(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def _initial_context(
    target: Target, context: str | None, context_file: str | None
) -> dict[str, Any] | None:
    if context is not None and context_file is not None:
        _bad("give --context or --context-file, not both")
    if context is not None:
        return _json_object(context, "--context")
    if context_file is not None:
        try:
            text = Path(context_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            _bad(f"cannot read --context-file: {exc}")
        return _json_object(text, f"--context-file {context_file}")
    return target.default_context


# --------------------------------------------------------------------------- progress


class ProgressPrinter:
    """An event bus that writes one line per node step to stderr, with elapsed time."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.started = time.perf_counter()
        self._node_start: dict[tuple[str, str], float] = {}
        self._root: str | None = None
        self._blueprint_of: dict[str, str] = {}

    def emit(self, event: FlowEvent) -> None:
        now = time.perf_counter()
        if event.type == "workflow:start":
            self._blueprint_of[event.run_id] = str(event.data.get("blueprintId", "?"))
        if self._root is None and event.type in ("workflow:start", "workflow:resume"):
            self._root = event.run_id
        if not self.enabled or event.node_id is None:
            return
        name = event.node_id
        if event.run_id != self._root:
            name = f"{self._blueprint_of.get(event.run_id, event.run_id[:8])}/{name}"
        key = (event.run_id, event.node_id)
        data = event.data
        detail = ""
        kind = event.type.removeprefix("node:")
        if event.type == "node:start":
            self._node_start[key] = now
        elif event.type == "node:finish":
            began = self._node_start.pop(key, None)
            took = f"{(now - began) * 1000:.1f} ms" if began is not None else ""
            action = data.get("action")
            detail = took if action is None else f"{took}  action {action!r}"
        elif event.type == "node:retry":
            detail = f"attempt {data.get('attempt')} failed: {data.get('error')}"
        elif event.type == "node:error":
            self._node_start.pop(key, None)
            detail = str(data.get("error", ""))
        elif event.type == "node:fallback":
            fallback = data.get("fallback")
            detail = f"running fallback {fallback!r}" if fallback else "running fallback"
        elif event.type == "node:awaiting":
            self._node_start.pop(key, None)
            detail = "paused, waiting to be resumed"
        elif event.type == "workflow:resume":
            kind = "resume"
        elif event.type not in ("node:skipped",):
            return
        elapsed = (now - self.started) * 1000
        line = f"{elapsed:9.1f} ms  {kind:<8} {name}"
        click.echo(f"{line}  {detail}" if detail else line, err=True)


# --------------------------------------------------------------------------- running


def _runtime(target: Target, bus: ProgressPrinter) -> FlowRuntime:
    return FlowRuntime(
        RuntimeOptions(registry=target.registry, blueprints=target.blueprints, event_bus=bus)
    )


def _to_json(value: Any, *, indent: int | None = 2) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False, default=repr)


def _result_dict(result: WorkflowResult) -> dict[str, Any]:
    return {
        "runId": result.run_id,
        "status": str(result.status),
        "context": result.context,
        "errors": [
            {"nodeId": e.node_id, "message": e.message, "type": e.type} for e in result.errors
        ],
        "awaiting": list(result.awaiting),
    }


def _actions_of(analysis: GraphAnalysis, node_id: str) -> list[str]:
    return sorted({e.action for e in analysis.out.get(node_id, ()) if e.action is not None})


def _report(
    target: Target,
    result: WorkflowResult,
    *,
    as_json: bool,
    quiet: bool,
    save_state: str | None,
    elapsed_ms: float,
) -> NoReturn:
    if result.status is RunStatus.AWAITING and save_state is not None:
        try:
            text = json.dumps(result.state, indent=2, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            _bad(f"cannot save the run state as JSON: {exc}")
        try:
            Path(save_state).write_text(text + "\n", encoding="utf-8")
        except OSError as exc:
            _bad(f"cannot write --save-state file: {exc}")
    if as_json:
        click.echo(_to_json(_result_dict(result), indent=None))
    else:
        click.echo(f"status: {result.status} (run {result.run_id}, {elapsed_ms:.1f} ms)", err=True)
        for err in result.errors:
            where = f"node {err.node_id!r}" if err.node_id else "run"
            click.echo(f"  error in {where}: {err.message}", err=True)
        click.echo(_to_json(result.context))
    if result.status is RunStatus.AWAITING and not quiet:
        analysis = analyse(target.blueprint)
        state_file = save_state or "state.json"
        for node_id in result.awaiting:
            actions = _actions_of(analysis, node_id)
            click.echo(f"awaiting node {node_id!r}", err=True)
            if actions:
                click.echo(f"  actions it can take: {', '.join(actions)}", err=True)
        if save_state is None:
            click.echo(
                "to resume, run again with --save-state state.json, then run the command below",
                err=True,
            )
        else:
            click.echo(f"run state saved to {save_state}", err=True)
        first = result.awaiting[0] if result.awaiting else "NODE"
        actions = _actions_of(analysis, first)
        action_hint = f" --action {actions[0]}" if actions else ""
        click.echo(
            f"resume with: flowcraft resume {target.path} --state {state_file} "
            f"--node {first}{action_hint} [--output JSON]",
            err=True,
        )
    code = {
        RunStatus.COMPLETED: EXIT_COMPLETED,
        RunStatus.AWAITING: EXIT_AWAITING,
    }.get(result.status, EXIT_FAILED)
    raise SystemExit(code)


def _execute(work: Coroutine[Any, Any, WorkflowResult]) -> WorkflowResult:
    try:
        result = asyncio.run(work)
    except FlowcraftError as exc:
        _bad(str(exc))
    return result


# --------------------------------------------------------------------------- commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flowcraft-core", prog_name="flowcraft")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug) to stderr.")
def main(verbose: int) -> None:
    """Run, resume, draw and check flowcraft workflows; run workers and runs on a fleet."""
    click.get_current_context().call_on_close(_configure_logging(verbose))


_FILE = click.argument("file", metavar="FILE.py|BLUEPRINT.json")
_FLOW = click.option(
    "--flow", "flow_name", metavar="NAME", help="Which Flow of the file (attribute name or id)."
)
_REGISTRY = click.option(
    "--registry",
    metavar="MODULE:ATTR",
    help="Implementations for a blueprint JSON: a dict of uses -> callable "
    "(package.module:ATTR or path/file.py:ATTR).",
)
_QUIET = click.option("-q", "--quiet", is_flag=True, help="No per-node progress on stderr.")
_JSON = click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object {runId,status,context,errors,awaiting} on stdout.",
)
_SAVE = click.option(
    "--save-state",
    metavar="FILE",
    help="When the run ends awaiting, write what `flowcraft resume` needs to FILE.",
)


@dataclass(frozen=True, slots=True)
class FleetTarget:
    """What a fleet command was told about its adapter (``adapter_options``)."""

    adapter: str | None
    url: str | None
    queue: str | None
    options: tuple[str, ...]
    flows: str | None


def adapter_options(*, required: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--adapter``, ``--url``, ``--queue``, ``-o`` and ``--flows``: how every fleet
    command reaches its backend and knows the workflows (see ``flowcraft.adapters``),
    passed to the command as one ``fleet: FleetTarget`` argument."""
    decorators = [
        click.option(
            "--adapter",
            envvar="FLOWCRAFT_ADAPTER",
            required=required,
            metavar="NAME",
            help="An installed adapter (bullmq, rabbitmq, sqs, gcp, ...). Env: FLOWCRAFT_ADAPTER.",
        ),
        click.option(
            "--url", metavar="URL", help="The backend's main address (else from the environment)."
        ),
        click.option("--queue", metavar="NAME", help="The job queue (name, topic or URL)."),
        click.option(
            "-o",
            "--option",
            "options",
            multiple=True,
            metavar="KEY=VALUE",
            help="An adapter setting (repeatable); overrides FLOWCRAFT_<ADAPTER>_<KEY>.",
        ),
        click.option(
            "--flows",
            envvar="FLOWCRAFT_FLOWS",
            metavar="MODULE:ATTR",
            help="The workflows: a Flow, a list of flows or RuntimeOptions "
            "(package.module:ATTR or path/file.py:ATTR). Env: FLOWCRAFT_FLOWS.",
        ),
    ]

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            fleet = FleetTarget(*(kwargs.pop(k) for k in FleetTarget.__slots__))
            return func(fleet=fleet, **kwargs)

        for option in reversed(decorators):
            command = option(command)
        return command

    return decorate


@main.command()
@_FILE
@click.option("--context", metavar="JSON", help="Initial context, a JSON object.")
@click.option("--context-file", metavar="FILE", help="Initial context from a JSON file.")
@_FLOW
@_REGISTRY
@_QUIET
@_JSON
@_SAVE
def run(
    file: str,
    context: str | None,
    context_file: str | None,
    flow_name: str | None,
    registry: str | None,
    quiet: bool,
    as_json: bool,
    save_state: str | None,
) -> None:
    """Run a workflow in memory and print its final context.

    FILE is a Python file defining a Flow (and optionally DEFAULT_CONTEXT, used when
    no context is given) or a blueprint JSON file.

    Exit status: 0 completed, 1 failed, 2 bad input, 3 awaiting.
    """
    target = _load(file, flow_name, registry)
    _analyse(target)
    initial = _initial_context(target, context, context_file)
    bus = ProgressPrinter(enabled=not quiet)
    runtime = _runtime(target, bus)
    _check_registry(target, runtime.registry)
    started = time.perf_counter()
    result = _execute(runtime.run(target.blueprint, initial))
    elapsed = (time.perf_counter() - started) * 1000
    _report(target, result, as_json=as_json, quiet=quiet, save_state=save_state, elapsed_ms=elapsed)


@main.command()
@click.argument("file", metavar="FILE.py|BLUEPRINT.json|RUN")
@click.option(
    "--state", "state_file", metavar="FILE", help="Saved by `run --save-state` (in memory)."
)
@click.option("--node", "node_id", metavar="ID", help="The waiting node to resume.")
@click.option("--output", metavar="JSON", help="The waiting node's output, as JSON.")
@click.option("--action", metavar="ACTION", help="The waiting node's action (picks edges).")
@_FLOW
@_REGISTRY
@_QUIET
@_JSON
@_SAVE
@adapter_options(required=False)
@click.option(
    "--history",
    metavar="STORE",
    envvar="FLOWCRAFT_HISTORY",
    help="On a fleet: record the resume in this run history (see `flowcraft start`).",
)
def resume(
    file: str,
    state_file: str | None,
    node_id: str | None,
    output: str | None,
    action: str | None,
    flow_name: str | None,
    registry: str | None,
    quiet: bool,
    as_json: bool,
    save_state: str | None,
    fleet: FleetTarget,
    history: str | None,
) -> None:
    """Resume a run that waits, giving the waiting node its result.

    In memory: flowcraft resume FILE --state STATE.json ... (the state saved by
    run --save-state). On a fleet: flowcraft resume RUN --adapter NAME --flows
    MODULE:ATTR --action A [--output JSON].
    """
    if state_file is None:
        if fleet.adapter is None:
            _bad("give --state FILE (a run in memory) or --adapter NAME (a run on a fleet)")
        from flowcraft._cli_fleet import resume_distributed

        resume_distributed(file, fleet, node_id, action, output, as_json, history)
    target = _load(file, flow_name, registry)
    analysis = _analyse(target)
    try:
        text = Path(state_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _bad(f"cannot read --state: {exc}")
    state = _json_object(text, f"--state {state_file}")
    if not isinstance(state.get("waiting"), list) or "context" not in state:
        _bad(f"--state {state_file} is not a saved awaiting run")
    if state.get("blueprintId") not in (None, target.blueprint.id):
        _bad(
            f"--state {state_file} belongs to blueprint {state.get('blueprintId')!r}, "
            f"not {target.blueprint.id!r}"
        )
    value: Any = None
    if output is not None:
        try:
            value = json.loads(output)
        except json.JSONDecodeError as exc:
            _bad(f"--output is not valid JSON ({exc}); quote strings, e.g. '\"yes\"'")
    waiting = [w[0] for w in state["waiting"] if isinstance(w, list) and w]
    node = node_id if node_id is not None else waiting[0] if len(waiting) == 1 else None
    if action is not None and node is not None:
        actions = _actions_of(analysis, node)
        defaults = any(e.action is None for e in analysis.out.get(node, ()))
        if actions and action not in actions and not defaults:
            _bad(f"node {node!r} has no edge for action {action!r} (actions: {', '.join(actions)})")
        if actions and action not in actions:
            logger.warning(
                "node %r has no edge for action %r (edges: %s); its default edges apply",
                node,
                action,
                ", ".join(actions),
            )
    bus = ProgressPrinter(enabled=not quiet)
    runtime = _runtime(target, bus)
    _check_registry(target, runtime.registry)
    started = time.perf_counter()
    result = _execute(runtime.resume(target.blueprint, state, node_id, output=value, action=action))
    elapsed = (time.perf_counter() - started) * 1000
    _report(target, result, as_json=as_json, quiet=quiet, save_state=save_state, elapsed_ms=elapsed)


# --------------------------------------------------------------------------- graph


@main.command()
@_FILE
@_FLOW
def graph(file: str, flow_name: str | None) -> None:
    """Print the workflow as a Mermaid flowchart (paste it into a Markdown file)."""
    target = _load(file, flow_name, None)
    click.echo(mermaid(target.blueprint))


# --------------------------------------------------------------------------- validate


def _validation_report(
    path_text: str, flow_name: str | None, registry_spec: str | None
) -> ValidationReport:
    """Every problem of FILE; usage errors and unreadable files exit 2 instead."""
    path = Path(path_text)
    if not path.is_file():
        _bad(f"no such file: {path_text}")
    extra = _load_registry(registry_spec) if registry_spec else None
    if path.suffix == ".py":
        module = _import_file(path)
        flows = _flows_of(module)
        chosen = _pick_flow(path, flows, flow_name)
        keys = set(extra or ())
        for flow in flows.values():
            keys.update(flow.registry())
        try:
            blueprint = chosen.to_blueprint()
        except BlueprintError as exc:
            report = ValidationReport(chosen.id)
            if isinstance(exc.__cause__, ValidationError):
                for loc, code, message in load_errors(exc.__cause__):
                    report.add("error", loc, code, message)
            else:
                report.add("error", (), "invalid_blueprint", str(exc))
            return report.sort()
        return validate_blueprint(
            blueprint, registry=keys, blueprints={f.id for f in flows.values()}
        )
    text = _blueprint_text(path, flow_name)
    report = ValidationReport(None)
    if not text.strip():
        report.add("error", (), "empty", "the file is empty (a blueprint is a JSON object)")
        return report
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        report.add("error", (), "not_json", f"not valid JSON: {exc}")
        return report
    except RecursionError:
        report.add("error", (), "not_json", "the JSON is nested too deeply to read")
        return report
    return validate_blueprint(data, registry=set(extra) if extra is not None else None)


def _print_report(path: str, report: ValidationReport, strict: bool) -> None:
    for problem in report.errors:
        click.echo(f"error: {problem}", err=True)
    for problem in report.warnings:
        click.echo(f"warning: {problem}", err=True)
    bp, analysis = report.blueprint, report.analysis
    if report.valid and not (strict and report.warnings) and bp and analysis:
        click.echo(f"ok: blueprint {bp.id!r}: {len(bp.nodes)} nodes, {len(bp.edges)} edges")
        click.echo(f"start nodes: {', '.join(analysis.start_nodes)}")
        click.echo(f"end nodes: {', '.join(analysis.sinks) or 'none'}")
        for loop in analysis.loops.values():
            members = ", ".join(n.id for n in bp.nodes if n.id in loop.nodes)
            click.echo(f"loop: head {loop.head!r} over {members}")
        if not analysis.loops:
            click.echo("loops: none")
        return
    what = f"blueprint {report.blueprint_id!r}" if report.blueprint_id else path
    errors, warnings = len(report.errors), len(report.warnings)
    counts = f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
    click.echo(f"invalid: {what}: {counts}{' (--strict)' if strict and not errors else ''}")


@main.command()
@_FILE
@_FLOW
@_REGISTRY
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object {valid,blueprintId,errors,warnings,summary} on stdout; "
    "each error and warning is {path,code,message}.",
)
@click.option("--strict", is_flag=True, help="Warnings count as errors (exit 1).")
def validate(
    file: str, flow_name: str | None, registry: str | None, as_json: bool, strict: bool
) -> None:
    """Check a workflow and report every problem at once, each with its path
    (nodes[3].config.maxRetrys).

    Errors: unknown keys (with a suggestion for near misses), wrong types, duplicate
    node ids, edges, fallbacks and cycle entry points naming missing nodes, invalid
    expressions, unknown flowcraft:* built-ins, built-ins missing their params,
    loops without an exit or start node, and, when the implementations are known (a
    Python file, or --registry), uses keys the registry lacks. Warnings: uses keys
    that cannot be checked without a registry, sub-flow blueprints not in the file,
    unreachable nodes, near misses of metadata keys.

    \b
    Exit status:
      0  valid (warnings allowed unless --strict)
      1  invalid: every error is reported (with --json, in the object)
      2  usage error or unreadable input: no such file, not UTF-8, a Python
         file that fails to import or has no such flow, a bad --registry
         (one "Error:" line on stderr, no report)
    """
    report = _validation_report(file, flow_name, registry)
    failed = not report.valid or (strict and bool(report.warnings))
    if as_json:
        click.echo(_to_json({**report.to_json_dict(), "valid": not failed}, indent=None))
    else:
        _print_report(file, report, strict)
    raise SystemExit(EXIT_FAILED if failed else EXIT_COMPLETED)


# --------------------------------------------------------------------------- schema


@main.command()
def schema() -> None:
    """Print the blueprint JSON Schema."""
    click.echo(json.dumps(blueprint_json_schema(), indent=2))


# The fleet commands add themselves to ``main`` (they use the helpers above).
import flowcraft._cli_fleet  # noqa: E402
import flowcraft._cli_history  # noqa: E402, F401

if __name__ == "__main__":  # pragma: no cover
    main()
