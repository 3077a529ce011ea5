"""What every adapter's crash test shares: the diamond workload, its worker, the kill loop.

An adapter's crash test keeps a small fleet module of its own (``tests/<adapter>/``):
a :class:`FleetSettings` subclass that builds its adapter, ending in
``if __name__ == "__main__": worker_main(Settings)``. The test starts that module
BY PATH as worker processes (:class:`WorkerProcesses`), which read their settings
from the environment variable :data:`ENV`; this module is imported from the
installed ``flowcraft_backends``, so it works in both places.

Every node execution and every publication is appended to an effects file (one
JSON line each), so the test also sees executions whose commit a SIGKILL lost.

Every worker process, and the test's client (:func:`client_options`), records run
history into one SQLite file next to the effects file, spooling its events in one
folder there; :func:`check_history` then asks that every run's history be complete
and duplicate-free: what a SIGKILLed worker had not stored yet must come back from
its spool file or from its redelivered jobs.

Unlike the rest of ``flowcraft_backends`` this module imports flowcraft-core (a
dependency of the package for this module); nothing else here imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self, cast

import pytest

from flowcraft import Flow, NodeContext, RuntimeOptions
from flowcraft.distributed.adapter import BaseDistributedAdapter, FinalResult
from flowcraft.history import History, HistoryRecorder, SpoolDrainer, SqliteHistoryStore
from flowcraft_backends._service import RunningService

__all__ = [
    "BRANCHES",
    "ENV",
    "EXPECTED_END",
    "NODES",
    "Effects",
    "FleetSettings",
    "WorkerProcesses",
    "all_published",
    "blueprints",
    "check_counters",
    "check_effects",
    "check_exactly_once",
    "check_history",
    "check_results",
    "client_options",
    "diamond",
    "history_recorder",
    "read_effects",
    "registry",
    "restarter",
    "run_worker",
    "worker_main",
]

ENV = "FLOWCRAFT_CRASH_FLEET"
"""The environment variable that carries a worker process's settings (JSON)."""

READY = "__ready__"
"""The effects line a worker process writes once SIGTERM stops it gracefully."""

BRANCHES = 16
EXPECTED_END = sum(range(1, BRANCHES + 1))
NODES = ["start", "join", "end", *(f"b{i}" for i in range(BRANCHES))]


def diamond() -> Flow:
    """start -> 16 parallel branches -> an ``all`` join -> end (blueprint only: ``uses`` keys)."""
    flow = Flow("diamond").node("start", "start").node("join", "join").node("end", "end")
    for i in range(BRANCHES):
        flow.node(f"b{i}", "branch", params={"i": i})
        flow.edge("start", f"b{i}").edge(f"b{i}", "join")
    return flow.edge("join", "end")


def blueprints() -> RuntimeOptions:
    """The diamond's blueprint, without implementations: enough for a client adapter."""
    bp = diamond().to_blueprint()
    return RuntimeOptions(blueprints={bp.id: bp})


def history_files(effects_path: str) -> tuple[str, str]:
    """The fleet's history store (a SQLite file) and spool folder, beside its effects."""
    effects = Path(effects_path)
    return (
        str(effects.with_name(effects.name + ".history.db")),
        str(effects.with_name(effects.name + ".spool")),
    )


def history_recorder(effects_path: str, *, spool_only: bool = False) -> HistoryRecorder:
    """A recorder into the fleet's history, spooling in the fleet's folder (a killed
    worker's file is stored by a recorder that outlives it, within a second). With
    ``spool_only``, it only spools: :func:`history_drainer` stores."""
    store, spool = history_files(effects_path)
    if spool_only:
        return HistoryRecorder(None, spool=spool)
    return HistoryRecorder(SqliteHistoryStore(store), spool=spool, recover_interval=1.0)


@contextlib.asynccontextmanager
async def history_drainer(effects_path: str) -> AsyncIterator[SpoolDrainer]:
    """The fleet's one history writer while the block runs (for workers whose settings
    say ``history_drainer``), a last pass at its end."""
    store, spool = history_files(effects_path)
    opened = SqliteHistoryStore(store)
    drainer = SpoolDrainer(opened, spool, interval=0.1)
    stop = asyncio.Event()
    task = asyncio.ensure_future(drainer.run(stop))
    try:
        yield drainer
    finally:
        stop.set()
        try:
            await task
        finally:
            drainer.close()
            await opened.aclose()


def client_options(settings: FleetSettings) -> RuntimeOptions:
    """:func:`blueprints` for the test's client, recording history too (the client
    emits each run's ``workflow:start``); :func:`check_history` closes its recorder."""
    return dataclasses.replace(blueprints(), event_bus=history_recorder(settings.effects_path))


class _Closable(Protocol):
    async def aclose(self) -> None: ...


@dataclass
class FleetSettings:
    """A fleet's settings, passed to its worker processes as JSON in :data:`ENV`.

    Subclass with the adapter's own fields and :meth:`adapter`.
    """

    effects_path: str
    history_drainer: bool = dataclasses.field(default=False, kw_only=True)
    """The workers only spool their history; the test runs :func:`history_drainer`."""

    branch_delay: ClassVar[float] = 0.001
    """Each branch sleeps ``branch_delay * (i % 4)`` seconds."""

    def adapter(self, options: RuntimeOptions) -> BaseDistributedAdapter:
        """A new adapter on the fleet's backend, running ``options`` (with an ``aclose()``)."""
        raise NotImplementedError

    def to_env(self) -> dict[str, str]:
        return {ENV: json.dumps(asdict(self))}

    @classmethod
    def from_env(cls) -> Self:
        return cls(**json.loads(os.environ[ENV]))


class Effects:
    """Appends one JSON line per node execution or publication (O_APPEND: lines of
    several processes never interleave; a killed writer may leave a torn last line)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(self, run_id: str, node_id: str, key: str, n: int) -> None:
        line = json.dumps({"run": run_id, "node": node_id, "key": key, "n": n, "pid": os.getpid()})
        os.write(self.fd, (line + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)


def read_effects(path: str) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # torn by a SIGKILL
    return rows


def registry(effects: Effects, branch_delay: float) -> dict[str, Any]:
    """The diamond's implementations, each recording its execution in ``effects``."""

    async def start(ctx: NodeContext) -> int:
        effects.record(ctx.run_id, ctx.node_id, ctx.idempotency_key, 0)
        return 0

    async def branch(ctx: NodeContext) -> int:
        await asyncio.sleep(branch_delay * (ctx.params["i"] % 4))
        effects.record(ctx.run_id, ctx.node_id, ctx.idempotency_key, 1)
        return int(ctx.params["i"]) + 1

    async def join(ctx: NodeContext) -> int:
        # How many branch outputs the join saw: fewer than 16 would be an early join.
        effects.record(ctx.run_id, ctx.node_id, ctx.idempotency_key, len(ctx.input))
        return sum(ctx.input.values())

    async def end(ctx: NodeContext) -> int:
        effects.record(ctx.run_id, ctx.node_id, ctx.idempotency_key, 0)
        return int(ctx.input)

    return {"start": start, "branch": branch, "join": join, "end": end}


async def run_worker(settings: FleetSettings, *, handle_sigterm: bool = False) -> None:
    """One worker until stopped (or cancelled); every publication is recorded too."""
    effects = Effects(settings.effects_path)
    recorder = history_recorder(settings.effects_path, spool_only=settings.history_drainer)
    await recorder.start()  # recovers the spool files of workers killed before
    options = RuntimeOptions(
        registry=registry(effects, settings.branch_delay),
        blueprints=blueprints().blueprints,
        event_bus=recorder,
    )
    adapter = settings.adapter(options)
    publish = adapter.publish_final_result

    async def publish_final_result(run_id: str, result: FinalResult) -> None:
        effects.record(run_id, "__publish__", json.dumps(result.to_json_dict()), 0)
        await publish(run_id, result)

    adapter.publish_final_result = publish_final_result  # type: ignore[method-assign]
    if handle_sigterm:  # a graceful stop: the jobs in hand finish
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(adapter.stop()))
        effects.record("", READY, "", 0)  # WorkerProcesses.stop waits for this line
    try:
        await adapter.worker()
    finally:
        try:
            await cast(_Closable, adapter).aclose()  # every adapter has one; the base does not say
        finally:
            await recorder.aclose()  # stores what is queued, and orphaned spool files
            if recorder.store is not None:
                await recorder.store.aclose()
            effects.close()


def worker_main(settings_type: type[FleetSettings]) -> None:
    """A worker process: settings from :data:`ENV`; SIGTERM stops it gracefully."""
    logging.basicConfig(level=logging.WARNING, format="%(process)d %(name)s %(message)s")
    asyncio.run(run_worker(settings_type.from_env(), handle_sigterm=True))


class WorkerProcesses:
    """Worker processes running the fleet module ``script`` (by path) with ``settings``."""

    def __init__(self, script: Path, settings: FleetSettings, count: int = 2) -> None:
        self.argv = [sys.executable, str(script)]
        self.env = {**os.environ, **settings.to_env()}
        self.effects_path = settings.effects_path
        self.recoveries: list[float] = []
        self.elapsed = 0.0
        self.procs = [self.spawn() for _ in range(count)]

    def spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv, env=self.env)

    def _all_ready(self) -> bool:
        rows = read_effects(self.effects_path) if os.path.exists(self.effects_path) else []
        ready = {e["pid"] for e in rows if e["node"] == READY}
        return all(p.pid in ready or p.poll() is not None for p in self.procs)

    async def start_mid_run(self, client: BaseDistributedAdapter, count: int) -> list[str]:
        """Start ``count`` diamond runs and return when the fleet is working on them with
        the last one just started: the moment a backend restart must come to land
        mid-run. (A fixed sleep did not: on a quiet machine 30 runs finished inside
        2 s, on a loaded one the workers had not started yet.)"""
        async with asyncio.timeout(60):
            while not self._all_ready():  # noqa: ASYNC110 (the workers write a file)
                await asyncio.sleep(0.05)
            runs = [await client.start_run("diamond") for _ in range(count)]
            working = _WorkingPids(self.effects_path)
            while not working.pids():  # noqa: ASYNC110 (the workers write a file)
                await asyncio.sleep(0.02)
        runs.append(await client.start_run("diamond"))
        assert await client.get_final_result(runs[-1]) is None, "the runs finished too soon"
        return runs

    async def kill_one_repeatedly(
        self, done: Awaitable[None], *, seed: int, max_kills: int, until_working: bool = True
    ) -> int:
        """SIGKILL the first worker 1 to 2.5 s after it ran its first node (and start
        another in its place) until ``done`` or ``max_kills``; then wait for ``done``.
        Returns the kills; :attr:`recoveries` has, per kill, the seconds until the next
        node execution. (Waiting for it to work: on a loaded machine a worker takes
        seconds to start, and a Kafka consumer more to be given partitions; a kill
        every 1 to 2.5 s regardless hit only workers that had done nothing.) Without
        ``until_working``, every 1 to 2.5 s whatever the worker is doing."""
        pending = asyncio.ensure_future(done)
        rng = random.Random(seed)
        kills = 0
        self.recoveries = []
        started = time.monotonic()
        watchers: list[asyncio.Task[None]] = []
        working = _WorkingPids(self.effects_path)
        try:
            while not pending.done() and kills < max_kills:
                while (
                    until_working and self.procs[0].pid not in working.pids() and not pending.done()
                ):
                    await asyncio.wait({pending}, timeout=0.1)
                await asyncio.wait({pending}, timeout=rng.uniform(1.0, 2.5))
                if pending.done():
                    break
                victim = self.procs[0]
                victim.send_signal(signal.SIGKILL)
                killed_at, before = time.monotonic(), _lines(self.effects_path)
                await asyncio.to_thread(victim.wait)
                kills += 1
                self.procs[0] = self.spawn()
                watchers.append(asyncio.ensure_future(self._recovery(killed_at, before)))
            await pending
        finally:
            pending.cancel()
            for watcher in watchers:
                watcher.cancel()
        self.elapsed = time.monotonic() - started
        return kills

    async def _recovery(self, killed_at: float, before: int) -> None:
        while _lines(self.effects_path) <= before:  # noqa: ASYNC110 (the workers write a file)
            await asyncio.sleep(0.02)
        self.recoveries.append(time.monotonic() - killed_at)

    def report(self, runs: int, kills: int) -> str:
        """The line a crash test prints after :meth:`kill_one_repeatedly`."""
        times = ", ".join(f"{r:.2f}" for r in sorted(self.recoveries))
        return (
            f"\n{runs} diamond runs in {self.elapsed:.1f} s with {kills} kills; kill -> next "
            f"node execution: {times} s (max {max(self.recoveries, default=0):.2f} s)"
        )

    async def stop(self) -> list[int | None]:
        """SIGTERM every worker once it is ready to stop gracefully (one respawned just
        before would still be importing, and die of the signal); their exit codes
        (None: killed after 20 s)."""
        async with asyncio.timeout(20):
            while not self._all_ready():  # noqa: ASYNC110 (the workers write a file)
                await asyncio.sleep(0.05)
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for proc in self.procs:
            try:
                codes.append(await asyncio.wait_for(asyncio.to_thread(proc.wait), 20))
            except TimeoutError:
                proc.kill()
                codes.append(None)
        return codes


async def check_results(client: BaseDistributedAdapter, runs: Sequence[str]) -> None:
    """Every run completed with the diamond's output."""
    results = [await client.wait_for_result(r, 5) for r in runs]
    assert Counter(r.status for r in results) == {"completed": len(runs)}
    assert {r.context["_outputs.end"] for r in results} == {EXPECTED_END}


async def check_exactly_once(
    client: BaseDistributedAdapter, runs: Sequence[str], effects_path: str
) -> None:
    """Every run completed once: its result, each node's activation resolved exactly
    once in its state, no early join, one publication (:func:`check_effects`)."""
    await check_results(client, runs)
    deadline = time.monotonic() + 60
    for run in runs:
        while True:
            state = await client.create_context(run).get_many(
                [f"_flowcraft.n.{n}" for n in NODES] + ["_flowcraft.status"]
            )
            # A worker killed between publishing and recording the status leaves the
            # run "running" until its redelivered job finishes the finalizer.
            status = (state.pop("_flowcraft.status", None) or {}).get("status")
            if status == "completed" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert status == "completed", (run, status)
        assert set(state.values()) == {1}, (run, state)  # each node resolved exactly once
        assert len(state) == len(NODES)
    check_effects(effects_path, runs)
    await check_history(client, runs, effects_path)


async def check_history(
    client: BaseDistributedAdapter, runs: Sequence[str], effects_path: str, seconds: float = 60
) -> None:
    """Every run's history (as the store de-duplicates it) is complete and has no
    duplicate: one ``workflow:start``, one ``workflow:finish`` (completed), each node
    started and finished once, and its context rebuilt at the last step has the
    outputs the run published. Closes the client's recorder (from
    :func:`client_options`) first; waits up to ``seconds`` for the workers' recorders
    (each writes within 0.2 s, and stores a killed worker's spool file within 1 s)."""
    bus = client.event_bus
    assert isinstance(bus, HistoryRecorder), "the client must record: use client_options()"
    await bus.aclose()
    if bus.store is not None:
        await bus.store.aclose()
    final = {r: (await client.wait_for_result(r, 5)).context for r in runs}
    store, _ = history_files(effects_path)
    async with SqliteHistoryStore(store) as opened:
        history = History(opened)
        deadline = time.monotonic() + seconds
        for run in runs:
            while True:
                try:
                    await _check_run_history(history, run, final[run])
                    break
                except AssertionError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
        emitters: Counter[str] = Counter()
        for run in runs:
            emitters.update(e.worker for e in await history.events(run))
    print(
        f"\nhistory of {len(runs)} runs complete and duplicate-free: "
        f"{sum(emitters.values())} events from {len(emitters)} processes "
        f"(events per process: {sorted(emitters.values())})"
    )


async def _check_run_history(history: History, run: str, final: dict[str, Any]) -> None:
    events = await history.events(run)
    kinds = Counter(e.kind for e in events)
    assert kinds["workflow:start"] == 1, (run, kinds)
    finishes = [e.data.get("status") for e in events if e.kind == "workflow:finish"]
    assert finishes == ["completed"], (run, finishes)
    finished = Counter((e.node_id, e.activation) for e in events if e.kind == "node:finish")
    assert finished == {(n, 1): 1 for n in NODES}, (run, finished)
    started = {e.node_id for e in events if e.kind == "node:start"}
    assert started == set(NODES), (run, started)
    rebuilt = await history.context_at(run)
    outputs = {k: v for k, v in final.items() if k.startswith("_outputs.")}
    assert {k: v for k, v in rebuilt.items() if k.startswith("_outputs.")} == outputs, run


async def all_published(
    redis: Any,
    keys: Sequence[str],
    seconds: float,
    *,
    client: BaseDistributedAdapter | None = None,
    runs: Sequence[str] = (),
) -> None:
    """Wait until every Redis result record in ``keys`` exists (a Redis restarting
    meanwhile is looked at again). Past ``seconds`` the failure says how many are
    missing and, given the ``client`` and the ``runs`` (in the order of ``keys``),
    what the first few unfinished runs' state holds: where a run stopped."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    found: list[Any] = []
    try:
        async with asyncio.timeout(seconds):
            while True:
                try:
                    found = await redis.mget(list(keys))
                except RedisConnectionError:
                    found = []
                if sum(1 for v in found if v is not None) == len(keys):
                    return
                await asyncio.sleep(0.1)
    except TimeoutError:
        missing = [i for i in range(len(keys)) if not found or found[i] is None]
        report = [f"{len(missing)} of {len(keys)} results missing after {seconds:.0f} s"]
        if client is not None and runs:
            for i in missing[:3]:
                state = await client.create_context(runs[i]).to_dict()
                done = sorted(k[9:] for k in state if k.startswith("_outputs."))
                status = await client.get_status(runs[i])
                report.append(f"run {runs[i]}: {status.status}, outputs of {done}")
        raise AssertionError("; ".join(report)) from None


COUNTERS = ("join:", "end:", "latch:", "fired:")


async def check_counters(redis_url: str, key_prefix: str, ttl: float) -> None:
    """No coordination counter of a finished run is left in Redis without an expiry.

    A known core gap: a worker killed inside the finalizer's clean-up may leave a
    counter of a finished run behind; it still expires, and there are only a few."""
    import redis.asyncio as redis_asyncio

    redis = redis_asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = [k async for k in redis.scan_iter(match=key_prefix + "*", count=1000)]
        counters = [k for k in keys if k[len(key_prefix) :].startswith(COUNTERS)]
        ttls = [await redis.ttl(k) for k in counters]
    finally:
        await redis.aclose()
    assert all(0 < t <= ttl for t in ttls), (counters, ttls)
    assert len(counters) <= 5, f"coordination counters left behind: {counters}"


class _WorkingPids:
    """The processes that ran a node (wrote a line to the effects file other than
    :data:`READY`), read on from where the last look stopped."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self.found: set[int] = set()

    def pids(self) -> set[int]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return self.found
        end = chunk.rfind(b"\n") + 1  # a line still being written is read next time
        self.offset += end
        for line in chunk[:end].splitlines():
            if READY.encode() not in line:
                with contextlib.suppress(ValueError):
                    self.found.add(int(json.loads(line)["pid"]))
        return self.found


def _lines(path: str) -> int:
    """Lines in the effects file so far (a torn last line counts too: close enough)."""
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def check_effects(path: str, runs: Sequence[str]) -> None:
    """No join fired before all its branches; every run published, always the same result."""
    effects = read_effects(path)
    early = [e for e in effects if e["node"] == "join" and e["n"] != BRANCHES]
    assert early == [], f"joins fired before all {BRANCHES} branches: {early[:5]}"
    publications: dict[str, set[str]] = {}
    for e in effects:
        if e["node"] == "__publish__":
            publications.setdefault(e["run"], set()).add(e["key"])
    assert set(publications) == set(runs)  # every run published ...
    assert all(len(p) == 1 for p in publications.values()), "... and always the same result"


def restarter(service: RunningService) -> Callable[[], None]:
    """How a crash test restarts a backend: the launcher's own (local), or the command
    in ``FLOWCRAFT_TEST_<NAME>_RESTART`` for one given by URL (``docker compose
    restart <name>`` keeps its host port); skips the test when there is neither."""
    variable = f"FLOWCRAFT_TEST_{service.name.upper()}_RESTART"
    command = os.environ.get(variable)
    if service.how == "env" and command:

        def run_command() -> None:
            subprocess.run(shlex.split(command), check=True, timeout=300)

        return run_command
    if service.how != "local":
        pytest.skip(
            f"cannot restart a {service.how} {service.name}: use the local one "
            f"(FLOWCRAFT_BACKENDS_DOCKER=0) or set {variable}"
        )
    return service.restart
