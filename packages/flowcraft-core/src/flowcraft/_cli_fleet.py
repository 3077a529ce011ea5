"""The fleet commands of ``flowcraft``: ``worker`` and the run commands on an adapter.

Every command names its adapter the same way: ``--adapter NAME`` (an installed
package's entry point, see :mod:`flowcraft.adapters`), ``--url``/``--queue``/
``-o KEY=VALUE`` over the adapter's ``FLOWCRAFT_<NAME>_*`` environment variables, and
``--flows module:attr`` for the workflows (a Flow, a list of flows, or RuntimeOptions).

Exit codes: 0 done (a run completed; a worker stopped after draining), 1 failed (a run
failed or was cancelled; a worker's backend failed), 2 bad input or settings,
3 the run waits for a resume, 4 gave up (``--timeout`` passed; a worker's drain
exceeded ``--grace`` and abandoned its jobs in hand to the queue), 5 a signal was
refused (no wait for its event took it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from flowcraft._cli_telemetry import Sdk
from flowcraft._cli_telemetry import configure as configure_sdk
from flowcraft.adapters import (
    AdapterPlugin,
    AdapterSettings,
    load_adapter,
    read_settings,
)
from flowcraft.cli import (
    EXIT_COMPLETED,
    EXIT_FAILED,
    BadInput,
    FleetTarget,
    _bad,
    _import_attr,
    _json_object,
    _to_json,
    adapter_options,
    main,
)
from flowcraft.distributed import BaseDistributedAdapter, FinalResult
from flowcraft.distributed import keys as K
from flowcraft.errors import FlowcraftError, RunConflictError, UnknownBlueprintError
from flowcraft.flow import Flow
from flowcraft.runtime import RuntimeOptions

__all__ = ["EXIT_GAVE_UP", "EXIT_REFUSED", "load_flows", "serve"]

logger = logging.getLogger("flowcraft.worker")

EXIT_GAVE_UP = 4

T = TypeVar("T")


# --------------------------------------------------------------------------- options


_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout, for scripts.")

_TRACE_FILE = click.option(
    "--trace-file",
    metavar="PATH",
    envvar="FLOWCRAFT_TRACE_FILE",
    help="Write OpenTelemetry spans as JSON lines to PATH ('-': stderr). Implies "
    "--telemetry; needs flowcraft-core[prometheus] (the SDK).",
)


def _overrides(
    plugin: AdapterPlugin[Any], url: str | None, queue: str | None, options: Iterable[str]
) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for text in options:
        key, sep, value = text.partition("=")
        if not sep or not key:
            _bad("-o must look like KEY=VALUE")
        found[key.strip().replace("-", "_")] = value
    for flag, given, name in (
        ("--url", url, plugin.url_field),
        ("--queue", queue, plugin.queue_field),
    ):
        if given is None:
            continue
        if name is None:
            _bad(f"adapter {plugin.name!r} takes no {flag}; use -o KEY=VALUE")
        found[name] = given
    return found


def load_flows(spec: str | None) -> RuntimeOptions:
    """``--flows``: a Flow, a list (or tuple) of flows, or RuntimeOptions; several
    flows may be named separated by commas (``a.py:flow,b.py:flow``)."""
    if spec is None:
        return RuntimeOptions()
    if "," in spec:
        flows: list[Flow] = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            found = _import_attr(part, "--flows")
            if isinstance(found, Flow):
                flows.append(found)
            elif isinstance(found, list | tuple) and all(isinstance(f, Flow) for f in found):
                flows.extend(found)
            else:
                _bad(f"--flows {part}: with several specs, each must be a Flow or a list")
        try:
            return RuntimeOptions.from_flows(*flows)
        except (FlowcraftError, ValueError) as exc:
            _bad(f"--flows {spec}: {exc}")
    value = _import_attr(spec, "--flows")
    try:
        if isinstance(value, RuntimeOptions):
            return value
        if isinstance(value, Flow):
            return RuntimeOptions.from_flows(value)
        if isinstance(value, list | tuple) and value and all(isinstance(f, Flow) for f in value):
            return RuntimeOptions.from_flows(*value)
    except (FlowcraftError, ValueError) as exc:
        _bad(f"--flows {spec}: {exc}")
    raise BadInput(f"--flows {spec} must be a Flow, a list of flows or RuntimeOptions")


def _adapter(
    fleet: FleetTarget,
    prepare: Callable[[RuntimeOptions], RuntimeOptions] = lambda options: options,
    **extra: Any,
) -> tuple[BaseDistributedAdapter, AdapterPlugin[Any], AdapterSettings, RuntimeOptions]:
    adapter = fleet.adapter or ""
    try:
        plugin = load_adapter(adapter)
        given = _overrides(plugin, fleet.url, fleet.queue, fleet.options)
        given.update({k: v for k, v in extra.items() if v is not None})
        runtime_options = prepare(load_flows(fleet.flows))
        settings = read_settings(plugin, given)
        built = plugin.build(settings, runtime_options)
    except FlowcraftError as exc:
        _bad(str(exc))
    except (ValueError, TypeError) as exc:
        # the adapter refused its options; its message names options, not their values
        _bad(f"adapter {adapter!r}: {exc}")
    return built, plugin, settings, runtime_options


HISTORY_OPTION = click.option(
    "--history",
    metavar="STORE",
    envvar="FLOWCRAFT_HISTORY",
    help="Record what this command does to the run (its start, a cancel's final status, "
    "a resume or signal) in this run history, as the workers record the rest (a SQLite "
    "file, sqlite:///PATH or postgresql://...).",
)


def _check_history(where: str | None) -> None:
    """``--history``: a URL no history store takes is bad input (exit 2)."""
    if where is None:
        return
    from flowcraft.history import HistoryError, validate_store_url

    try:
        validate_store_url(where)
    except HistoryError as exc:
        _bad(f"--history: {exc}")


class _Recording:
    """``--history`` for an operator command: its adapter's events go to a recorder,
    written when the command ends (a store that fails is logged, never the command's
    failure)."""

    def __init__(self, where: str | None) -> None:
        self.where = where
        self.recorder: Any = None
        _check_history(where)

    def prepare(self, options: RuntimeOptions) -> RuntimeOptions:
        if self.where is None:
            return options
        from flowcraft.history import HistoryRecorder, open_store

        self.recorder = HistoryRecorder(open_store(self.where), inner=options.event_bus)
        return dataclasses.replace(options, event_bus=self.recorder)

    async def aclose(self) -> None:
        if self.recorder is not None:
            try:
                await self.recorder.aclose()
            finally:
                await self.recorder.store.aclose()


def _run_with(
    adapter: BaseDistributedAdapter,
    work: Callable[[], Awaitable[T]],
    recording: _Recording | None = None,
) -> T:
    """Run one operator call and close the adapter's clients (and write what it
    recorded), whatever happens."""

    async def go() -> T:
        try:
            return await work()
        finally:
            try:
                await adapter.aclose()
            finally:
                if recording is not None:
                    await recording.aclose()

    try:
        return asyncio.run(go())
    except click.ClickException:
        raise  # bad input found on the way (exit 2), already worded
    except UnknownBlueprintError as exc:
        _bad(f"{exc} (pass --flows MODULE:ATTR with the workflows)")
    except FlowcraftError as exc:
        _bad(str(exc))
    except (OSError, ConnectionError, TimeoutError) as exc:
        raise _BackendFailed(f"the backend failed: {type(exc).__name__}: {exc}") from None
    except Exception as exc:
        # clients raise their own error types (redis, botocore, aio-pika, ...)
        raise _BackendFailed(f"the backend failed: {type(exc).__name__}: {exc}") from None


class _BackendFailed(click.ClickException):
    """The backend refused or could not be reached: one line, exit 1."""

    exit_code = EXIT_FAILED


def _context_arg(text: str | None) -> dict[str, Any]:
    """``--context``: a JSON object, or ``@file`` holding one."""
    if text is None:
        return {}
    if text.startswith("@"):
        try:
            body = Path(text[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            _bad(f"cannot read --context file: {exc}")
        return _json_object(body, f"--context {text}")
    return _json_object(text, "--context")


# --------------------------------------------------------------------------- worker


def configure_worker_logging(level: str, adapter: BaseDistributedAdapter | None) -> None:
    """Timestamped records of flowcraft's loggers (and the adapter package's own) on
    stderr at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    names = {"flowcraft"}
    if adapter is not None:
        names.add(type(adapter).__module__.partition(".")[0])
    for name in names:
        log = logging.getLogger(name)
        for old in list(log.handlers):
            if type(old).__name__ == "_ClickHandler":
                log.removeHandler(old)
        log.addHandler(handler)
        log.setLevel(level.upper())
        log.propagate = False


async def serve(
    adapter: BaseDistributedAdapter,
    grace: float,
    *,
    started: Callable[[], None] = lambda: None,
) -> int:
    """Run ``adapter.worker()`` until SIGINT or SIGTERM, then drain within ``grace``
    seconds: no new jobs, the jobs in hand finish; past the grace period (or on a
    second signal) they are abandoned, and their messages return to the queue."""
    loop = asyncio.get_running_loop()
    signals: list[str] = []
    first = asyncio.Event()
    again = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        signals.append(sig.name)
        (again if first.is_set() else first).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        running = asyncio.ensure_future(adapter.worker())
        started()
        signalled = asyncio.ensure_future(first.wait())
        await asyncio.wait({running, signalled}, return_when=asyncio.FIRST_COMPLETED)
        signalled.cancel()
        if running.done():
            exc = running.exception()
            logger.error("the worker ended on its own: %r", exc)
            await _close_within(adapter, 5.0)
            return EXIT_FAILED
        logger.info("%s: stopping; jobs in hand have %.0f s to finish", signals[0], grace)
        await adapter.stop()
        forced = asyncio.ensure_future(again.wait())
        await asyncio.wait({running, forced}, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        code = EXIT_COMPLETED
        if not running.done():
            why = "a second signal" if again.is_set() else f"{grace:.0f} s passed"
            logger.warning(
                "%s: abandoning the jobs still in hand (their messages return to the queue)",
                why,
            )
            running.cancel()
            await asyncio.wait({running}, timeout=2.0)
            code = EXIT_GAVE_UP
        elif running.exception() is not None:
            logger.error("the worker failed while stopping: %r", running.exception())
            code = EXIT_FAILED
        await _close_within(adapter, 5.0)
        return code
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _close_within(adapter: BaseDistributedAdapter, seconds: float) -> None:
    """``aclose()`` (stop, wait for the jobs in hand, close the clients), bounded without
    relying on cancellation (a client that swallows one would hang the exit)."""
    closing = asyncio.ensure_future(adapter.aclose())
    await asyncio.wait({closing}, timeout=seconds)
    if not closing.done():
        logger.warning("closing the adapter took over %.0f s; leaving it", seconds)
    elif closing.exception() is not None:
        logger.warning("closing the adapter failed: %r", closing.exception())


def _exit_without_stuck_threads(code: int) -> NoReturn:
    """Exit now even if a thread is still blocked in a backend call that was abandoned
    (a long poll, say): every job was settled or handed back, so nothing is lost, and
    a container's stop timeout is not spent waiting for it."""
    stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if not stuck and code != EXIT_GAVE_UP:
        raise SystemExit(code)
    logger.debug("%d threads still in backend calls; not waiting for them", len(stuck))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _blueprints_line(runtime_options: RuntimeOptions) -> str:
    return ", ".join(
        bp.id if bp.version is None else f"{bp.id}@{bp.version}"
        for bp in runtime_options.blueprints.values()
    )


@click.command()
@adapter_options()
@click.option(
    "-c", "--concurrency", type=click.IntRange(min=1), help="Jobs this process runs at once."
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    envvar="FLOWCRAFT_GRACE_SECONDS",
    help="Seconds the jobs in hand have to finish after SIGINT/SIGTERM.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    envvar="FLOWCRAFT_LOG_LEVEL",
)
@click.option(
    "--telemetry",
    is_flag=True,
    envvar="FLOWCRAFT_TELEMETRY",
    help="OpenTelemetry spans per node job and metrics (needs flowcraft-core[otel] and "
    "an SDK configured, e.g. by opentelemetry-instrument).",
)
@_TRACE_FILE
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    envvar="FLOWCRAFT_METRICS_PORT",
    help="Serve Prometheus metrics on this port (/metrics; with --processes N, the "
    "processes take PORT..PORT+N-1). Implies --telemetry; needs flowcraft-core[prometheus].",
)
@click.option(
    "--metrics-host",
    default="0.0.0.0",  # noqa: S104 (a scrape endpoint; set 127.0.0.1 to keep it local)
    show_default=True,
    envvar="FLOWCRAFT_METRICS_HOST",
    help="The address the metrics endpoint listens on.",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes to run on this machine (each drains on its own).",
)
@click.option(
    "--history",
    metavar="STORE",
    envvar="FLOWCRAFT_HISTORY",
    help="Record every run's events in this history store (a SQLite file, sqlite:///PATH "
    "or postgresql://...), read back with `flowcraft history`.",
)
@click.option(
    "--history-spool",
    metavar="FOLDER",
    envvar="FLOWCRAFT_HISTORY_SPOOL",
    help="A folder on this machine where each event is appended as it is emitted, so a "
    "killed worker's events are stored by the next one. Without --history: the events "
    "only go there, for `flowcraft history drain` to store.",
)
@click.option(
    "--history-drainer",
    is_flag=True,
    envvar="FLOWCRAFT_HISTORY_DRAINER",
    help="With --history and --history-spool: the worker processes only append events to "
    "the spool, and one `flowcraft history drain` process started beside them stores "
    "them (the workers spend no time on the store).",
)
@click.option(
    "--history-max-value-bytes",
    metavar="BYTES",
    type=click.IntRange(min=0),
    envvar="FLOWCRAFT_HISTORY_MAX_VALUE_BYTES",
    help="With --history: a value (a node's input or output, a context write) whose JSON "
    "is longer is recorded as its size and SHA-256 only (default 1048576); 0 keeps every "
    "value whole.",
)
def worker(
    fleet: FleetTarget,
    concurrency: int | None,
    grace: float,
    log_level: str,
    telemetry: bool,
    trace_file: str | None,
    metrics_port: int | None,
    metrics_host: str,
    processes: int,
    history: str | None,
    history_spool: str | None,
    history_drainer: bool,
    history_max_value_bytes: int | None,
) -> None:
    """Run a worker: take node jobs from the adapter's queue until SIGINT or SIGTERM.

    On the signal it takes no new jobs and lets the jobs in hand finish within
    --grace seconds; past that (or on a second signal) it abandons them to the
    queue, which delivers them again to another worker.

    Exit status: 0 stopped after draining, 1 the backend failed, 2 bad input or
    settings, 4 the drain exceeded --grace.
    """
    if fleet.flows is None:
        _bad("a worker needs --flows MODULE:ATTR (or FLOWCRAFT_FLOWS)")
    _check_history(history)
    if history_drainer and (history is None or history_spool is None):
        _bad("--history-drainer needs --history STORE and --history-spool FOLDER")
    if processes > 1 or history_drainer:
        _supervise(
            fleet,
            processes,
            concurrency,
            grace,
            log_level,
            telemetry,
            trace_file,
            metrics_port,
            metrics_host,
            history,
            history_spool,
            history_drainer,
            history_max_value_bytes,
        )
    if history is None and history_max_value_bytes is not None:
        _bad("--history-max-value-bytes needs --history STORE (or `flowcraft history drain`)")
    telemetry = telemetry or trace_file is not None or metrics_port is not None
    sdk = _telemetry_sdk(telemetry, trace_file, metrics_port, metrics_host, "flowcraft-worker")
    buses: list[Any] = []
    recorders: list[Any] = []

    def prepare(options: RuntimeOptions) -> RuntimeOptions:
        if history is not None or history_spool is not None:
            from flowcraft.history import DEFAULT_MAX_VALUE_BYTES, HistoryRecorder, open_store

            cap = history_max_value_bytes
            store = (
                None
                if history is None  # spool only: a drainer on this machine stores it
                else open_store(
                    history, max_value_bytes=DEFAULT_MAX_VALUE_BYTES if cap is None else cap or None
                )
            )
            recorders.append(HistoryRecorder(store, inner=options.event_bus, spool=history_spool))
            options = dataclasses.replace(options, event_bus=recorders[0])
        if not telemetry:
            return options
        from flowcraft.telemetry import Telemetry

        buses.append(
            Telemetry(
                options.event_bus,
                adapter=fleet.adapter or "",
                tracer_provider=sdk.tracer_provider,
                meter_provider=sdk.meter_provider,
            )
        )
        return dataclasses.replace(options, event_bus=buses[0])

    built, plugin, settings, runtime_options = _adapter(fleet, prepare, concurrency=concurrency)
    for bus in buses:
        bus.attributes["flowcraft.worker"] = built.worker_id
        bus.instrument(built)
    configure_worker_logging(log_level, built)
    where = plugin.describe(settings)
    facts = {
        "adapter": plugin.name,
        **where,
        "concurrency": getattr(built, "concurrency", None)
        or getattr(getattr(built, "settings", None), "concurrency", "?"),
        "worker": built.worker_id,
        "pid": os.getpid(),
    }
    if metrics_port is not None:
        facts["metrics"] = f"http://{metrics_host}:{metrics_port}/metrics"
    summary = " ".join(f"{k}={v}" for k, v in facts.items())
    blueprints = _blueprints_line(runtime_options)
    began = time.monotonic()

    async def run() -> int:
        watch = [asyncio.ensure_future(bus.watch_queue_depth()) for bus in buses]
        watch.append(asyncio.ensure_future(watch_supervisor()))
        try:
            return await serve(
                built,
                grace,
                started=lambda: logger.info(
                    "worker started: %s blueprints=%s", summary, blueprints
                ),
            )
        finally:
            for task in watch:
                task.cancel()
            for recorder in recorders:  # the events still queued go to the store
                await recorder.aclose()

    runner = asyncio.Runner()
    code = runner.run(run())
    if code != EXIT_GAVE_UP:
        # otherwise the abandoned jobs' tasks are not waited for: the process exits
        runner.close()
    sdk.shutdown()
    logger.info(
        "worker stopped: %s after %.1f s (exit %d)", summary, time.monotonic() - began, code
    )
    _exit_without_stuck_threads(code)


def _telemetry_sdk(
    telemetry: bool,
    trace_file: str | None,
    metrics_port: int | None,
    metrics_host: str,
    service: str,
) -> Sdk:
    """Check that OpenTelemetry is there when asked for, and set up the SDK for
    ``--trace-file``/``--metrics-port`` (bad input, exit 2, when it is missing)."""
    if not telemetry:
        return Sdk()
    try:
        import flowcraft.telemetry  # noqa: F401
    except ImportError:
        _bad("--telemetry needs OpenTelemetry: pip install 'flowcraft-core[otel]'")
    try:
        return configure_sdk(trace_file, metrics_port, metrics_host, service)
    except ImportError as exc:
        _bad(str(exc))
    except OSError as exc:
        _bad(f"--trace-file/--metrics-port: {exc}")


SUPERVISOR_ENV = "FLOWCRAFT_SUPERVISOR"
"""Set by ``--processes`` in its children: the supervisor's pid."""


async def watch_supervisor(interval: float = 1.0) -> None:
    """In a process started by ``--processes`` (or ``--history-drainer``): once the
    supervisor is gone (killed: SIGKILL, the OOM killer), stop as on SIGTERM, so no
    worker or drainer runs on unsupervised (each runs in a session of its own, where
    no terminal's signal reaches it)."""
    given = os.environ.get(SUPERVISOR_ENV, "")
    if not given.isdigit():
        return
    while True:  # no event tells a process its parent died: look every second
        await asyncio.sleep(interval)
        if os.getppid() != int(given):
            break
    logger.warning("supervisor %s gone: stopping as on SIGTERM", given)
    os.kill(os.getpid(), signal.SIGTERM)


_DRAINER_RESTART_SECONDS = 5.0
"""A history drain process that exits is started again, at most this often."""


def _start_drainer(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    started = subprocess.Popen(argv, env=env, start_new_session=True)  # noqa: S603 (our argv)
    logger.info("history drain process started: pid %d", started.pid)
    return started


def _supervise(
    fleet: FleetTarget,
    processes: int,
    concurrency: int | None,
    grace: float,
    log_level: str,
    telemetry: bool,
    trace_file: str | None,
    metrics_port: int | None,
    metrics_host: str,
    history: str | None,
    history_spool: str | None,
    history_drainer: bool,
    history_max_value_bytes: int | None,
) -> NoReturn:
    """``--processes N``: N worker processes with this one's settings, passed through
    the environment (never on a command line, where ``ps`` would show credentials).
    SIGINT/SIGTERM are forwarded to each (a second one too); when one exits by itself,
    the others are stopped. Exits with the highest exit status.

    ``--history-drainer``: the workers only spool, and a ``flowcraft history drain``
    process stores the folder (started again if it dies: the events wait in the
    files); stopped, for a last pass, once every worker has exited."""
    try:
        plugin = load_adapter(fleet.adapter or "")
        given = _overrides(plugin, fleet.url, fleet.queue, fleet.options)
        if concurrency is not None:
            given["concurrency"] = concurrency
        read_settings(plugin, given)  # bad settings fail here, once
        load_flows(fleet.flows)
    except FlowcraftError as exc:
        _bad(str(exc))
    configure_worker_logging(log_level, None)
    env = {
        **os.environ,
        "FLOWCRAFT_ADAPTER": plugin.name,
        "FLOWCRAFT_FLOWS": fleet.flows or "",
        **{plugin.env_var(key): str(value) for key, value in given.items()},
    }
    argv = [
        sys.executable,
        "-c",
        "from flowcraft.cli import main; main(prog_name='flowcraft')",
        "worker",
        "--grace",
        str(grace),
        "--log-level",
        log_level,
        *(["--telemetry"] if telemetry else []),
        *(["--trace-file", trace_file] if trace_file is not None else []),
        "--metrics-host",
        metrics_host,
    ]
    # The store's URL may hold a password: the environment, not the command line.
    for variable, value in (
        ("FLOWCRAFT_HISTORY", history),
        ("FLOWCRAFT_HISTORY_SPOOL", history_spool),
        (
            "FLOWCRAFT_HISTORY_MAX_VALUE_BYTES",
            None if history_max_value_bytes is None else str(history_max_value_bytes),
        ),
    ):
        if value is not None:
            env[variable] = value
    env.pop("FLOWCRAFT_METRICS_PORT", None)
    env.pop("FLOWCRAFT_HISTORY_DRAINER", None)
    env[SUPERVISOR_ENV] = str(os.getpid())
    drain_argv: list[str] = []
    drain_env = dict(env)
    if history_drainer:
        drain_argv = [*argv[:3], "history", "drain"]
        env.pop("FLOWCRAFT_HISTORY", None)  # the workers: the spool only
        env.pop("FLOWCRAFT_HISTORY_MAX_VALUE_BYTES", None)
    drainer = _start_drainer(drain_argv, drain_env) if drain_argv else None
    drainer_started = time.monotonic()
    children = [
        subprocess.Popen(  # noqa: S603 (our own argv)
            argv + ([] if metrics_port is None else ["--metrics-port", str(metrics_port + i)]),
            env=env,
            start_new_session=True,
        )
        for i in range(processes)
    ]
    logger.info("supervising %d worker processes: %s", processes, [c.pid for c in children])
    signals: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        signals.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM if len(signals) == 1 else signal.SIGINT)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    codes: dict[int, int] = {}
    while len(codes) < len(children):
        if (
            drainer is not None
            and drainer.poll() is not None
            and time.monotonic() - drainer_started > _DRAINER_RESTART_SECONDS
        ):
            logger.warning("history drain exited (%d); started again", drainer.returncode)
            drainer = _start_drainer(drain_argv, drain_env)
            drainer_started = time.monotonic()
        for child in children:
            code = child.poll()
            if code is None or child.pid in codes:
                continue
            codes[child.pid] = code if code >= 0 else EXIT_FAILED
            if not signals:
                logger.warning(
                    "worker process %d exited (%d); stopping the others", child.pid, code
                )
                forward(signal.SIGTERM, None)
        time.sleep(0.1)
    worst = max(codes.values())
    logger.info("all %d worker processes stopped (exit %s)", processes, sorted(codes.values()))
    if drainer is not None:  # every event is spooled now: its last pass stores them
        drainer.send_signal(signal.SIGTERM)
        try:
            drained = drainer.wait(grace + 60)
        except subprocess.TimeoutExpired:
            drainer.kill()
            drained = EXIT_FAILED
        if drained != 0:
            logger.error("history drain process exited (%d): the spool keeps the rest", drained)
            worst = max(worst, EXIT_FAILED)
    raise SystemExit(worst)


# --------------------------------------------------------------------------- run commands


def _print_result(result: FinalResult, as_json: bool) -> NoReturn:
    if as_json:
        click.echo(_to_json(result.to_json_dict(), indent=None))
    else:
        click.echo(f"run {result.run_id}: {result.status}", err=True)
        for error in result.errors:
            where = f"node {error.get('nodeId')!r}" if error.get("nodeId") else "run"
            click.echo(f"  error in {where}: {error.get('message', error)}", err=True)
        click.echo(_to_json(result.context))
    raise SystemExit(EXIT_COMPLETED if result.status == "completed" else EXIT_FAILED)


async def _wait(
    adapter: BaseDistributedAdapter,
    run_id: str,
    timeout: float | None,  # noqa: ASYNC109 (wait_for_result's own)
    *,
    progress: bool = False,
) -> FinalResult:
    shown = _Progress(adapter, run_id) if progress else None
    watcher = asyncio.ensure_future(shown.follow()) if shown is not None else None
    try:
        result = await adapter.wait_for_result(run_id, timeout)
    except TimeoutError:
        click.echo(f"run {run_id}: still running after {timeout} s", err=True)
        raise SystemExit(EXIT_GAVE_UP) from None
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
    if shown is not None:
        with contextlib.suppress(Exception):
            await shown.poll()  # the nodes resolved since the last look
    return result


class _Progress:
    """One line on stderr per node activation as the run's state records it resolved
    (read every quarter second; needs the blueprint through --flows)."""

    def __init__(self, adapter: BaseDistributedAdapter, run_id: str) -> None:
        self.adapter = adapter
        self.ctx = adapter.create_context(run_id)
        self.keys: dict[str, str] = {}
        self.seen: dict[str, int] = {}
        self.began = time.monotonic()

    async def follow(self) -> None:
        meta = await self.ctx.get(K.META)
        blueprint = self.adapter.runtime.blueprints.get(meta["blueprintId"]) if meta else None
        if blueprint is None:
            return
        self.keys = {K.resolved(node.id): node.id for node in blueprint.nodes}
        while True:
            await self.poll()
            await asyncio.sleep(0.25)

    async def poll(self) -> None:
        if not self.keys:
            return
        found = await self.ctx.get_many(list(self.keys))
        new: dict[str, int] = {}
        for key, node_id in self.keys.items():
            count = int(found.get(key) or 0)
            if count > self.seen.get(node_id, 0):
                new[node_id] = count
        if not new:
            return
        # an activation records whether it was skipped (a branch not taken)
        how = await self.ctx.get_many([K.activation(n, c) for n, c in new.items()])
        elapsed = time.monotonic() - self.began
        for node_id, count in new.items():
            self.seen[node_id] = count
            record = how.get(K.activation(node_id, count))
            skipped = isinstance(record, dict) and record.get("skip") is True
            times = f" ({count}x)" if count > 1 else ""
            verb = "skipped" if skipped else "done"
            click.echo(f"{elapsed:8.1f} s  {verb:<8}{node_id}{times}", err=True)


_TIMEOUT = click.option(
    "--timeout", type=click.FloatRange(min=0), help="Give up waiting after this many seconds."
)


@click.command()
@click.argument("blueprint")
@adapter_options()
@click.option("--context", metavar="JSON|@FILE", help="The initial context: a JSON object.")
@click.option("--run-id", metavar="ID", help="The run's id (default: a new one).")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the run's result and print it.")
@_TIMEOUT
@click.option(
    "--telemetry",
    is_flag=True,
    envvar="FLOWCRAFT_TELEMETRY",
    help="Start the run in a span (flowcraft.start BLUEPRINT): the workers' node spans "
    "join its trace (needs flowcraft-core[otel] and an SDK, or --trace-file).",
)
@_TRACE_FILE
@HISTORY_OPTION
@_JSON
def start(
    blueprint: str,
    fleet: FleetTarget,
    context: str | None,
    run_id: str | None,
    wait_: bool,
    timeout: float | None,
    telemetry: bool,
    trace_file: str | None,
    history: str | None,
    as_json: bool,
) -> None:
    """Start a run of BLUEPRINT (an id known through --flows); prints the run id.

    With --wait: the run's final context, exit 0 completed, 1 failed or cancelled,
    4 --timeout passed.
    """
    initial = _context_arg(context)
    telemetry = telemetry or trace_file is not None
    sdk = _telemetry_sdk(telemetry, trace_file, None, "", "flowcraft-cli")
    recording = _Recording(history)
    built, *_ = _adapter(fleet, recording.prepare)
    span: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext
    if telemetry:
        from flowcraft.telemetry import Telemetry

        tracing = Telemetry(adapter=fleet.adapter or "", tracer_provider=sdk.tracer_provider)
        tracing.instrument(built)
        span = functools.partial(tracing.start_span, blueprint)

    async def go() -> tuple[str, FinalResult | None]:
        try:
            with span():
                started = await built.start_run(blueprint, initial, run_id)
        finally:
            sdk.shutdown()
        if not wait_:
            return started, None
        if not as_json:
            click.echo(f"started run {started}; waiting for its result", err=True)
        return started, await _wait(built, started, timeout, progress=not as_json)

    started, result = _run_with(built, go, recording)
    if result is not None:
        _print_result(result, as_json)
    if as_json:
        click.echo(_to_json({"runId": started, "blueprintId": blueprint}, indent=None))
    else:
        click.echo(started)


@click.command()
@click.argument("run_id", metavar="RUN")
@adapter_options()
@_JSON
def status(
    run_id: str,
    fleet: FleetTarget,
    as_json: bool,
) -> None:
    """Show a run's status (exit 1 if no such run is known)."""
    built, *_ = _adapter(fleet)
    info = _run_with(built, lambda: built.get_status(run_id))
    if as_json:
        click.echo(
            _to_json(
                {
                    "runId": info.run_id,
                    "status": info.status,
                    "errors": info.errors,
                    "waiting": info.waiting,
                    "timers": info.timers,
                },
                indent=None,
            )
        )
    else:
        click.echo(f"run {info.run_id}: {info.status}")
        for error in info.errors:
            click.echo(f"  error: {error.get('nodeId') or 'run'}: {error.get('message', error)}")
        if info.waiting:
            click.echo(f"  waiting: {', '.join(info.waiting)}")
        for timer in info.timers:
            click.echo(f"  {_timer_line(timer)}")
    raise SystemExit(EXIT_FAILED if info.status == "unknown" else EXIT_COMPLETED)


def _when(epoch: Any) -> str:
    """An epoch time for people: UTC, to the second, and how far away it is."""
    if not isinstance(epoch, int | float):
        return "?"
    at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))
    left = epoch - time.time()
    return f"{at} (in {left:.0f} s)" if left >= 0 else f"{at} (due {-left:.0f} s ago)"


def _timer_line(timer: dict[str, Any]) -> str:
    node = timer.get("nodeId")
    if timer.get("kind") == "sleep":
        return f"sleeping: {node} until {_when(timer.get('until'))}"
    event = timer.get("event")
    line = f"waiting for event: {event} at {node}" if event else f"waiting: {node}"
    if timer.get("token") is not None:
        line += f", token {timer['token']}"
    until = timer.get("until")
    return line + (f", timeout at {_when(until)}" if until is not None else ", no timeout")


@click.command()
@click.argument("run_id", metavar="RUN")
@adapter_options()
@_TIMEOUT
@_JSON
def wait(
    run_id: str,
    fleet: FleetTarget,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Wait for a run to end and print its final context.

    Exit status: 0 completed, 1 failed or cancelled, 4 --timeout passed.
    """
    built, *_ = _adapter(fleet)
    result = _run_with(
        built, functools.partial(_wait, built, run_id, timeout, progress=not as_json)
    )
    _print_result(result, as_json)


@click.command()
@click.argument("run_id", metavar="RUN")
@adapter_options()
@click.option("--reason", default="cancelled by the operator", show_default=True)
@HISTORY_OPTION
@_JSON
def cancel(
    run_id: str,
    fleet: FleetTarget,
    reason: str,
    history: str | None,
    as_json: bool,
) -> None:
    """Cancel a run. A run that already ended is left alone; its status is printed.

    Exit status: 0 the run is cancelled (now or before), 1 it had already completed
    or failed.
    """
    recording = _Recording(history)
    built, *_ = _adapter(fleet, recording.prepare)
    final = _run_with(built, lambda: built.cancel_run(run_id, reason), recording)
    if as_json:
        click.echo(_to_json({"runId": run_id, "status": final}, indent=None))
    else:
        click.echo(f"run {run_id}: {final}")
    raise SystemExit(EXIT_COMPLETED if final == "cancelled" else EXIT_FAILED)


EXIT_REFUSED = 5


class _Refused(click.ClickException):
    """A resume or signal the run did not take (another resolved the wait first, or
    no wait is there yet): one line, exit 5 (a sender may try again later)."""

    exit_code = EXIT_REFUSED


def resume_distributed(
    run_id: str,
    fleet: FleetTarget,
    node_id: str | None,
    action: str | None,
    output: str | None,
    as_json: bool,
    history: str | None = None,
) -> NoReturn:
    """``flowcraft resume RUN --adapter ...``: resume a run paused at a wait node."""
    value: Any = None
    if output is not None:
        try:
            value = json.loads(output)
        except json.JSONDecodeError as exc:
            _bad(f"--output is not valid JSON ({exc}); quote strings, e.g. '\"yes\"'")
    recording = _Recording(history)
    built, *_ = _adapter(fleet, recording.prepare)

    async def go() -> None:
        try:
            await built.resume_with_action(run_id, action, value, node_id=node_id)
        except RunConflictError as exc:
            raise _Refused(str(exc)) from None

    _run_with(built, go, recording)
    if as_json:
        click.echo(_to_json({"runId": run_id, "resumed": True}, indent=None))
    else:
        click.echo(f"run {run_id}: resumed")
    raise SystemExit(EXIT_COMPLETED)


def _payload_arg(text: str | None) -> Any:
    """``--payload``: any JSON value, or ``@file`` holding one."""
    if text is None:
        return None
    where = "--payload"
    if text.startswith("@"):
        where = f"--payload {text}"
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            _bad(f"cannot read --payload file: {exc}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        _bad(f"{where} is not valid JSON ({exc}); quote strings, e.g. '\"yes\"'")


@click.command("signal")
@click.argument("target", metavar="RUN_OR_TOKEN")
@click.argument("event")
@adapter_options()
@click.option("--payload", metavar="JSON|@FILE", help="The wait's output: a JSON value.")
@click.option(
    "--token",
    "by_token",
    is_flag=True,
    help="RUN_OR_TOKEN is a correlation token: never take it as a run id.",
)
@HISTORY_OPTION
@_JSON
def signal_(
    target: str,
    event: str,
    fleet: FleetTarget,
    payload: str | None,
    by_token: bool,
    history: str | None,
    as_json: bool,
) -> None:
    """Deliver the external EVENT to the wait that waits for it (Flow.wait_for), in
    the run whose wait holds the token RUN_OR_TOKEN, or else the run with that id.

    Idempotent: the same signal (event and payload) again is told it was already
    applied. Exit status: 0 resumed (or already resumed by this same signal), 2 bad
    input, 5 refused: nothing waits for EVENT there (not yet, or another signal, a
    resume or the timeout resolved the wait, or the run ended), or no run has that
    token (with --token) or id.
    """
    value = _payload_arg(payload)
    recording = _Recording(history)
    built, *_ = _adapter(fleet, recording.prepare)

    async def go() -> bool:
        claimed = await built.coordination_store.get(K.token(built.key_prefix, target))
        if claimed is None:
            if by_token:
                raise _Refused(f"no waiting run holds the token {target!r} (not yet, or gone)")
            if await built.create_context(target).get(K.META) is None:
                raise _Refused(f"no run has the id or a wait with the token {target!r}")
        try:
            return await built.signal(target, event, value)
        except RunConflictError as exc:
            raise _Refused(str(exc)) from None

    applied = _run_with(built, go, recording)
    if as_json:
        click.echo(
            _to_json(
                {"target": target, "event": event, "resumed": applied, "duplicate": not applied},
                indent=None,
            )
        )
    elif applied:
        click.echo(f"{target}: {event}: resumed")
    else:
        click.echo(f"{target}: {event}: already resumed by this same signal (nothing done)")
    raise SystemExit(EXIT_COMPLETED)


@click.command()
@click.argument("run_id", metavar="[RUN]", required=False)
@adapter_options()
@click.option("--stalled", is_flag=True, help="Every run without progress (the reconciler's pass).")
@click.option(
    "--older-than",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="With --stalled: no progress for this long (default: the adapter's).",
)
@HISTORY_OPTION
@_JSON
def reconcile(
    run_id: str | None,
    fleet: FleetTarget,
    stalled: bool,
    older_than: float | None,
    history: str | None,
    as_json: bool,
) -> None:
    """Re-drive a run after crashes (or --stalled: every stalled run); prints the
    jobs enqueued. Idempotent: safe to run at any time."""
    if (run_id is None) == (not stalled):
        _bad("give a RUN or --stalled (one of them)")
    recording = _Recording(history)
    built, *_ = _adapter(fleet, recording.prepare)

    async def go() -> dict[str, int]:
        if run_id is not None:
            return {run_id: await built.reconcile(run_id)}
        try:
            return await built.reconcile_stalled(older_than)
        except NotImplementedError as exc:
            _bad(str(exc))

    enqueued = _run_with(built, go, recording)
    if as_json:
        click.echo(_to_json({"enqueued": enqueued}, indent=None))
    elif not enqueued:
        click.echo("no stalled runs")
    else:
        for rid, count in enqueued.items():
            click.echo(f"run {rid}: {count} job(s) enqueued")


@click.command()
@adapter_options()
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option(
    "--history",
    "history_store",
    metavar="STORE",
    envvar="FLOWCRAFT_HISTORY",
    help="Also the recent runs recorded in this run history (flowcraft.history: a "
    "SQLite file or postgresql://...), those that ended included.",
)
@_JSON
def runs(
    fleet: FleetTarget,
    limit: int,
    history_store: str | None,
    as_json: bool,
) -> None:
    """List the active runs (not ended, not waiting for a resume) with their
    blueprint and status, and the recent ones where a run history is kept."""
    built, *_ = _adapter(fleet)
    listings = list(RUN_LISTINGS)
    if history_store is not None:
        listings.append(functools.partial(_recent_from_history, history_store))

    async def go() -> list[dict[str, Any]]:
        try:
            active = await built.active_runs(limit)
        except NotImplementedError as exc:
            if not listings:
                _bad(f"{exc}: the adapter keeps no index of active runs")
            active = []
        rows = [await _run_row(built, run_id) for run_id in active]
        # an index may still hold a run that just ended (it is cleaned lazily)
        rows = [r for r in rows if r["status"] not in (*K.FINAL_STATUSES, "unknown")]
        seen = {r["runId"] for r in rows}
        for source in listings:
            rows.extend(r for r in await source(built, limit) if r["runId"] not in seen)
            seen |= {r["runId"] for r in rows}
        return rows

    rows = _run_with(built, go)
    if as_json:
        click.echo(_to_json(rows, indent=None))
        return
    if not rows:
        click.echo("no active runs" if not listings else "no runs")
    for row in rows:
        click.echo(f"{row['runId']}  {row['status']:<10} {row.get('blueprintId') or '-'}")


async def _run_row(adapter: BaseDistributedAdapter, run_id: str) -> dict[str, Any]:
    info = await adapter.get_status(run_id)
    meta = await adapter.create_context(run_id).get(K.META)
    return {
        "runId": run_id,
        "status": info.status,
        "blueprintId": meta.get("blueprintId") if isinstance(meta, dict) else None,
        "version": meta.get("version") if isinstance(meta, dict) else None,
    }


async def _recent_from_history(
    where: str, _adapter: BaseDistributedAdapter, limit: int
) -> list[dict[str, Any]]:
    """The most recently started runs of a run history (``flowcraft history`` lists
    the same), with the status their last recorded event gave."""
    from flowcraft.history import open_store

    store = open_store(where)
    try:
        found = await store.runs(limit=limit)
    finally:
        await store.aclose()
    return [
        {"runId": r.run_id, "status": r.status, "blueprintId": r.blueprint_id, "version": None}
        for r in found
    ]


RunListing = Callable[[BaseDistributedAdapter, int], Awaitable[list[dict[str, Any]]]]

RUN_LISTINGS: list[RunListing] = []
"""More rows for ``flowcraft runs`` after the active runs: a run history (runs that
ended) appends its listing here. Each returns rows with at least ``runId`` and
``status`` (and ``blueprintId``, ``version`` where known), at most ``limit``."""


@click.group("dead-letters")
def dead_letters() -> None:
    """Jobs the queue parked (undecodable, unknown blueprint, out of deliveries)."""


@dead_letters.command("list")
@adapter_options()
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@_JSON
def dead_letters_list(
    fleet: FleetTarget,
    limit: int,
    as_json: bool,
) -> None:
    """List parked jobs with the reason each was parked (without removing them)."""
    built, *_ = _adapter(fleet)

    async def go() -> list[Any]:
        try:
            return await built.dead_letters(limit)
        except NotImplementedError as exc:
            _bad(str(exc))

    letters = _run_with(built, go)
    rows = [
        {
            "id": letter.id,
            "reason": letter.reason,
            "body": letter.body.decode("utf-8", "replace")
            if isinstance(letter.body, bytes)
            else letter.body,
        }
        for letter in letters
    ]
    if as_json:
        click.echo(_to_json(rows, indent=None))
        return
    if not rows:
        click.echo("no dead letters")
    for row in rows:
        body = row["body"] if len(row["body"]) <= 200 else row["body"][:200] + "..."
        click.echo(f"{row['id'] or '-'}  {row['reason']}\n    {body}")


@dead_letters.command("requeue")
@adapter_options()
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@_JSON
def dead_letters_requeue(
    fleet: FleetTarget,
    limit: int,
    as_json: bool,
) -> None:
    """Put parked jobs back on the job queue as they are (after fixing what parked
    them: a missing blueprint deployed, say); each is enqueued before it is removed."""
    built, *_ = _adapter(fleet)
    count = _run_with(built, functools.partial(_dead_letter_op, built.requeue_dead_letters, limit))
    if as_json:
        click.echo(_to_json({"requeued": count}, indent=None))
    else:
        click.echo(f"{count} dead letter(s) requeued")


@dead_letters.command("purge")
@adapter_options()
@click.option("--limit", type=click.IntRange(min=1), help="At most this many (default: all).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_JSON
def dead_letters_purge(
    fleet: FleetTarget,
    limit: int | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Delete parked jobs for good."""
    if not yes and not click.confirm("Delete the dead letters for good?", err=True):
        _bad("not confirmed (pass --yes)")
    built, *_ = _adapter(fleet)
    count = _run_with(built, functools.partial(_dead_letter_op, built.purge_dead_letters, limit))
    if as_json:
        click.echo(_to_json({"purged": count}, indent=None))
    else:
        click.echo(f"{count} dead letter(s) purged")


async def _dead_letter_op(op: Callable[[Any], Awaitable[int]], limit: int | None) -> int:
    try:
        return await op(limit)
    except NotImplementedError as exc:
        _bad(str(exc))


for _command in (worker, start, status, wait, cancel, signal_, reconcile, runs, dead_letters):
    main.add_command(_command)
