"""Checks every adapter's integration tests share (issue 22): how long a SIGKILLed
worker's runs take to move again with the adapter's DEFAULT settings, and a fleet
whose workers run two versions of a blueprint.

Recovery: an adapter's crash fleet module (``tests/<adapter>/``) ends in
``if __name__ == "__main__": fleet_main(Settings)``, and its settings build the
adapter leaving every setting that governs recovery (lease, visibility, lock, stall
checks) at its default when ``recovery_defaults`` is set. :func:`measure_recovery`
starts that module by path as probe worker processes, lets one take jobs
that each hold their node until then, SIGKILLs it, and measures from
the kill to the moment another worker starts each of those activations again.

Like :mod:`flowcraft_backends.crash_fleet`, this module imports flowcraft-core.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, cast

from flowcraft import Flow, NodeContext, RuntimeOptions
from flowcraft.distributed.adapter import BaseDistributedAdapter
from flowcraft.events import FlowEvent
from flowcraft_backends.crash_fleet import FleetSettings, read_effects, worker_main

__all__ = [
    "HOLD_SECONDS",
    "PROBE_ENV",
    "check_version_skew",
    "fleet_main",
    "hold_flow",
    "measure_recovery",
    "probe_main",
    "skew_flow",
]

HOLD_SECONDS = 0.5
"""How long the probe's node runs when it runs again; its first execution holds the
node until its worker is killed."""

_READY = "__ready__"

PROBE_ENV = "FLOWCRAFT_PROBE"
"""Set (to 1) in a fleet module's environment: it runs a probe worker, not the diamond."""


class _Closable(Protocol):
    async def aclose(self) -> None: ...


def hold_flow() -> Flow:
    """One node, ``hold`` (blueprint only: implemented by :func:`probe_main`)."""
    return Flow("hold").node("hold", "hold")


class _Journal:
    """One JSON line per event, appended (O_APPEND) by every process."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(self, run_id: str, what: str) -> None:
        line = json.dumps({"run": run_id, "what": what, "pid": os.getpid(), "t": time.time()})
        os.write(self.fd, (line + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)


def _read(path: str) -> list[dict[str, Any]]:
    return read_effects(path) if os.path.exists(path) else []


async def _probe_worker(settings: FleetSettings) -> None:
    journal = _Journal(settings.effects_path)

    async def hold(ctx: NodeContext) -> str:
        again = any(r["run"] == ctx.run_id for r in _read(settings.effects_path))
        journal.record(ctx.run_id, "start")
        await asyncio.sleep(HOLD_SECONDS if again else 600)
        return "held"

    class Requeues:
        """Journals every job handed back (why a recovery took longer than the lease)."""

        def emit(self, event: FlowEvent) -> None:
            if event.type == "job:requeued" and event.run_id:
                journal.record(event.run_id, "requeued: " + str(event.data.get("reason")))

    bp = hold_flow().to_blueprint()
    options = RuntimeOptions(registry={"hold": hold}, blueprints={bp.id: bp}, event_bus=Requeues())
    adapter = settings.adapter(options)
    if os.environ.get("FLOWCRAFT_PROBE_LOG") == "DEBUG" and hasattr(adapter, "receive"):
        receive = adapter.receive

        async def traced(n: int) -> Any:
            journal.record("", f"receive({n}) asked")
            got = await receive(n)
            journal.record("", f"receive({n}) -> {len(got)}")
            return got

        adapter.receive = traced
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(adapter.stop()))
    worker = asyncio.ensure_future(adapter.worker())
    await asyncio.sleep(0.5)  # connected and consuming (a fetch in flight)
    journal.record("", _READY)
    try:
        await worker
    finally:
        await cast(_Closable, adapter).aclose()
        journal.close()


def fleet_main(settings_type: type[FleetSettings]) -> None:
    """A fleet module's entry point: a probe worker under :data:`PROBE_ENV`, else the
    crash fleet's worker."""
    if os.environ.get(PROBE_ENV):
        probe_main(settings_type)
    else:
        worker_main(settings_type)


def probe_main(settings_type: type[FleetSettings]) -> None:
    """A probe worker process: settings from the crash fleet's environment variable."""
    logging.basicConfig(level="WARNING", format="%(created).2f %(process)d %(name)s %(message)s")
    # FLOWCRAFT_PROBE_LOG=DEBUG shows every hand-back of the probe's workers.
    logging.getLogger("flowcraft").setLevel(os.environ.get("FLOWCRAFT_PROBE_LOG", "WARNING"))
    asyncio.run(_probe_worker(settings_type.from_env()))


async def _until(check: Callable[[], bool], seconds: float, what: str) -> None:
    try:
        async with asyncio.timeout(seconds):
            while not check():  # noqa: ASYNC110 (the workers write a file)
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {seconds} s waiting for {what}") from None


class _Round:
    """One kill: a victim that takes the jobs, another worker idle beside it."""

    def __init__(self, script: Path, env: dict[str, str], path: str) -> None:
        self.argv = [sys.executable, str(script)]
        self.env = env
        self.path = path
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(self.argv, env=self.env)
        self.procs.append(proc)
        return proc

    def ready(self, proc: subprocess.Popen[bytes]) -> bool:
        return any(r["what"] == _READY and r["pid"] == proc.pid for r in _read(self.path))

    def started(self, proc: subprocess.Popen[bytes], ids: list[str]) -> dict[str, float]:
        return {
            r["run"]: r["t"]
            for r in _read(self.path)
            if r["what"] == "start" and r["pid"] == proc.pid and r["run"] in ids
        }

    async def run(self, client: BaseDistributedAdapter, runs: int) -> list[float]:
        victim = self.spawn()
        await _until(lambda: self.ready(victim), 60, "the first worker to be ready")
        ids = [await client.start_run("hold") for _ in range(runs)]
        await _until(lambda: len(self.started(victim, ids)) == runs, 30, "it to take the jobs")
        other = self.spawn()
        await _until(lambda: self.ready(other), 60, "the second worker to be ready")
        victim.send_signal(signal.SIGKILL)
        killed = time.time()
        await asyncio.to_thread(victim.wait)
        try:
            await _until(lambda: len(self.started(other, ids)) == runs, 60, "the runs to move")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; killed pid {victim.pid} at {killed:.2f}, the other is pid "
                f"{other.pid}; journal: {_read(self.path)}"
            ) from None
        if os.environ.get("FLOWCRAFT_PROBE_LOG") == "DEBUG":
            print(
                f"\nkilled at {killed:.2f}: {[r for r in _read(self.path) if r['t'] > killed - 8]}"
            )
        for run_id in ids:
            result = await client.wait_for_result(run_id, 60)
            assert result.status == "completed", result.errors
        return [t - killed for t in self.started(other, ids).values()]

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(asyncio.to_thread(proc.wait), 30)
                except TimeoutError:
                    proc.kill()


async def measure_recovery(
    script: Path,
    settings: FleetSettings,
    client: BaseDistributedAdapter,
    *,
    rounds: int = 3,
    runs: int = 4,
) -> list[float]:
    """Seconds from each SIGKILL of a worker holding ``runs`` activations to another
    worker starting each of them again (``rounds`` kills). The replacement is running
    and idle before the kill, so its start-up time is not counted; the first execution
    of each activation holds it until the kill."""
    env = {**os.environ, **settings.to_env(), PROBE_ENV: "1"}
    recoveries: list[float] = []
    for _ in range(rounds):
        one = _Round(script, env, settings.effects_path)
        try:
            recoveries += await one.run(client, runs)
        finally:
            await one.stop()
    return recoveries


def report_recovery(name: str, recoveries: list[float]) -> str:
    """The line the recovery tests print."""
    return (
        f"\n{name}: SIGKILL -> the killed worker's activations start again on another "
        f"worker, {len(recoveries)} activations: median {statistics.median(recoveries):.2f} s, "
        f"max {max(recoveries):.2f} s ({', '.join(f'{r:.2f}' for r in sorted(recoveries))})"
    )


# ---------------------------------------------------------------- version skew


def skew_flow(version: str, record: Callable[[str, str, str], None]) -> Flow:
    """Version 1: ``a -> b``; version 2 adds ``c`` after ``b``. Each execution is
    recorded as (run id, node, the version that ran it)."""

    def node(name: str) -> Callable[[NodeContext], Any]:
        def run(ctx: NodeContext) -> Any:
            record(ctx.run_id, name, version)
            return f"{ctx.input or ''}{name}{version}"

        return run

    flow = Flow("skew", version=version).node("a", node("a")).node("b", node("b"))
    flow.chain("a", "b")
    if version == "2":
        flow.node("c", node("c")).chain("b", "c")
    return flow


AdapterMaker = Callable[
    [RuntimeOptions], BaseDistributedAdapter | Awaitable[BaseDistributedAdapter]
]


async def check_version_skew(make: AdapterMaker, *, runs: int = 10) -> None:
    """One worker with blueprint version 1, one with version 2 (which adds a node),
    on one queue; runs started at each version. Every run completes with its own
    version's nodes, each activation executed once and only by a worker of its
    version; nothing is dead-lettered (the v1 worker used to dead-letter the new node's
    job and strand the run)."""
    executions: Counter[tuple[str, str, str]] = Counter()

    def record(run_id: str, node: str, version: str) -> None:
        executions[(run_id, node, version)] += 1

    async def build(version: str) -> BaseDistributedAdapter:
        made = make(RuntimeOptions.from_flows(skew_flow(version, record)))
        return await made if inspect.isawaitable(made) else made

    worker_v1, worker_v2 = await build("1"), await build("2")
    client_v1, client_v2 = await build("1"), await build("2")
    tasks = [asyncio.ensure_future(w.worker()) for w in (worker_v1, worker_v2)]
    adapters = [worker_v1, worker_v2, client_v1, client_v2]
    try:
        started = {
            "2": [await client_v2.start_run("skew") for _ in range(runs)],
            "1": [await client_v1.start_run("skew") for _ in range(runs)],
        }
        for version, ids in started.items():
            nodes = "abc" if version == "2" else "ab"
            for run_id in ids:
                try:
                    result = await client_v2.wait_for_result(run_id, 90)
                except TimeoutError:
                    status = await client_v2.get_status(run_id)
                    letters = await client_v2.dead_letters()
                    ran = {k: c for k, c in executions.items() if k[0] == run_id}
                    raise AssertionError(
                        f"run {run_id} (v{version}) is {status}; executions {ran}; "
                        f"dead letters {letters}"
                    ) from None
                assert result.status == "completed", (version, result.errors)
                expected = "".join(f"{n}{version}" for n in nodes)
                assert result.context[f"_outputs.{nodes[-1]}"] == expected
                per_node = {(n, v): c for (r, n, v), c in executions.items() if r == run_id}
                assert per_node == {(n, version): 1 for n in nodes}, (run_id, per_node)
        assert [t for t in tasks if t.done()] == [], "a worker died"
        assert await client_v2.dead_letters() == []
    finally:
        for worker in (worker_v1, worker_v2):
            await worker.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        for adapter in adapters:
            await cast(_Closable, adapter).aclose()
