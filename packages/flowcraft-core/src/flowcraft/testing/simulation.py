"""Deterministic crash simulation of the distributed protocol on the in-memory fleet.

One seed fixes everything: the graph shapes (chains, diamonds into ``all`` and
``any`` joins, branches skipped by conditions or actions feeding joins, loops, a
join inside a loop, a loop inside a diamond, waits resumed with an action,
failing branches; one or two runs at once), the number of workers and their
concurrency, the duplicate rate, whether the queue reorders jobs, the retry mode,
flaky nodes, and the faults: at chosen store operations a worker dies
(:class:`SimulatedCrash`: its in-flight jobs are redelivered and a new worker
takes its place) or the store is briefly unreachable (:class:`SimulatedOutage`);
a worker is cut off from the coordination store for a while (its heartbeat
fails: a partition), or a store reply reaches it only after its lease expired
(a late reply); the queue may lose one enqueued job, and the operator may die
inside ``start_run``, ``resume_with_action`` or ``cancel_run`` (and call again).
Operators also call at once: a start sent twice, a colliding start, two resumes,
a late resume of the other action, a cancel at a random moment. Some nodes run
for a while, so heartbeats beat. Hooks also yield and sleep at random, so
concurrent jobs interleave differently per seed.

Everything runs on a :class:`VirtualTimeLoop`: time advances only when every task
waits, so leases, redelivery delays and heartbeats follow the simulation's clock,
and a seed replays exactly. When the fleet falls quiet, a paused run is resumed
and a stuck one reconciled (a reconcile that no lost job or operator crash
explains is a failure: redelivery alone must suffice). After each run the
invariants of PRODUCT.md are checked: one final status, repeated publications
that agree; each activation's output and deltas committed once and together by
an execution (another execution only where a crash or an outage cut a job short);
the expected activations per node, with the right inputs; joins fired once per
activation with every branch; no lost delta; untaken branches never ran; the
stored state agrees with the published result (beyond writes of branches nobody
waits for; exactly, for a cancelled run); operator calls that conflict are
refused. The ``harsh`` profile runs three runs at once, duplicates 50-100 % of
jobs, stalls on 3-6 % of store operations and injects 3-8 faults. A failing seed
replays with its trace::

    python -m flowcraft.testing.simulation --seed N [--profile harsh]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextvars
import functools
import multiprocessing
import random
import selectors
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from flowcraft.distributed import keys as K
from flowcraft.distributed.adapter import FinalResult, RetryMode, RunConflictError
from flowcraft.distributed.coordination import InMemoryCoordinationStore
from flowcraft.distributed.memory import InMemoryAdapter, InMemoryBroker
from flowcraft.distributed.payload import JobPayload
from flowcraft.errors import FlowcraftError
from flowcraft.flow import Flow
from flowcraft.node import NodeContext, NodeResult
from flowcraft.runtime import RuntimeOptions
from flowcraft.testing.store import ManualClock

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

__all__ = [
    "PROFILES",
    "SHAPES",
    "Profile",
    "SimulatedCrash",
    "SimulatedOutage",
    "SimulationReport",
    "VirtualTimeLoop",
    "run_seed",
    "run_seeds",
]

# ---------------------------------------------------------------------------- time


class _VirtualSelector(selectors.BaseSelector):
    """Polls a real selector without blocking; a wait advances the virtual clock."""

    def __init__(self, clock: ManualClock) -> None:
        self._inner = selectors.DefaultSelector()
        self._clock = clock

    def register(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._inner.select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("simulation deadlock: every task waits and no timer is due")
        self._clock.advance(timeout)
        return []

    def get_map(self) -> Mapping[FileDescriptorLike, selectors.SelectorKey]:
        return self._inner.get_map()

    def close(self) -> None:
        self._inner.close()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to the next timer whenever nothing is ready.

    ``asyncio.sleep``, ``call_later`` and timeouts follow ``loop.clock``; give the
    same clock (``loop.time``) to stores so TTLs and leases expire in step.
    """

    def __init__(self) -> None:
        self.clock = ManualClock(start=0.0)
        super().__init__(_VirtualSelector(self.clock))

    def time(self) -> float:
        return self.clock.now


# ---------------------------------------------------------------------------- faults


@dataclass
class _LossyBroker(InMemoryBroker):
    """A broker that may lose an enqueued job (``lose`` says which)."""

    lose: Callable[[JobPayload], bool] | None = None

    def put(self, job: JobPayload) -> None:
        if self.lose is not None and self.lose(job):
            return
        super().put(job)


class _VirtualClockAdapter(InMemoryAdapter):
    """Timers on the simulation's virtual clock."""

    def clock(self) -> float:
        return asyncio.get_running_loop().time()


class SimulatedCrash(BaseException):
    """The worker process dies here. Not an ``Exception``: no adapter code may catch it."""


class SimulatedOutage(ConnectionError):
    """The store could not be reached (or its reply was lost); the worker lives on."""


class _Flaky(RuntimeError):
    pass


class _Failure(RuntimeError):
    pass


FaultKind = Literal["crash", "outage", "partition", "late"]
Profile = Literal["default", "harsh"]
PROFILES: tuple[Profile, ...] = ("default", "harsh")


@dataclass(eq=False)
class _Worker:
    name: str
    adapter: InMemoryAdapter
    concurrency: int
    slots: dict[asyncio.Task[None], _Slot] = field(default_factory=dict)
    dead: bool = False
    frozen_until: float = 0.0  # a stalled process: no progress, no heartbeat
    partitioned_until: float = 0.0  # cut off from the coordination store


@dataclass(eq=False)
class _Slot:
    """One delivery in a worker's hands."""

    worker: _Worker
    label: str
    delivery: Any
    started: bool = False
    aborted: bool = False  # the job did not finish normally (crash, outage, retry)
    stalled: bool = False  # its worker stalled past the lease while it was in hand
    in_node: bool = False
    late: bool = False  # the next store reply it gets arrives late


_SLOT: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar("flowcraft_sim_slot")


@dataclass(eq=False)
class _Execution:
    token: int
    input: Any
    slot: _Slot | None


# ---------------------------------------------------------------------------- shapes

NodeRef = tuple[str, int]  # (node id, activation)


@dataclass
class _Expect:
    status: str = "completed"
    runs: dict[str, tuple[int, int]] = field(default_factory=dict)  # activations: (min, max)
    never: set[str] = field(default_factory=set)
    lazy: set[str] = field(default_factory=set)  # may stay unresolved when the run ends
    inputs: dict[str, Callable[[int], NodeRef]] = field(default_factory=dict)
    joins: dict[str, tuple[str, Callable[[int], list[NodeRef]]]] = field(default_factory=dict)
    counter: int | None = None
    failing: set[str] = field(default_factory=set)
    resume: str | None = None  # the action a wait is resumed with
    wait_node: str | None = None
    signal: Any = None  # the payload an event wait is signalled with
    token: str | None = None  # the event wait's correlation token


@dataclass
class _NodeSpec:
    counter: bool = False
    action: str | None = None
    fails: bool = False
    flaky: bool = False
    duration: float = 0.0  # virtual seconds the node runs (heartbeats beat meanwhile)


class _Shape:
    """A flow under construction and what its run must produce."""

    def __init__(self, sim: Simulation, flow_id: str, prefix: str, name: str) -> None:
        self.sim = sim
        self.flow = Flow(flow_id)
        self.prefix = prefix
        self.name = name
        self.expect = _Expect()

    def n(self, local: str) -> str:
        return self.prefix + local

    def node(
        self,
        local: str,
        runs: int | tuple[int, int],
        *,
        counter: bool = False,
        action: str | None = None,
        fails: bool = False,
        join: str | None = None,
        after: str | Callable[[int], NodeRef] | None = None,
    ) -> str:
        """Add a node that must run ``runs`` activations (a count or a range); ``after``
        names the predecessor whose output is its input (or maps activation to one)."""
        node_id = self.n(local)
        flaky = not fails and self.sim.rng.random() < self.sim.flaky_rate
        duration = 0.0
        if self.sim.rng.random() < self.sim.slow_rate:
            duration = self.sim.rng.choice((0.4, 1.0, 2.5)) * self.sim.lease_seconds
        spec = _NodeSpec(counter, action, fails, flaky, duration)
        config: dict[str, Any] = {}
        if flaky:
            config["max_retries"] = 3
        if join:
            config["join_strategy"] = join
        self.flow.node(node_id, self.sim.node_function(spec), **config)
        low, high = (runs, runs) if isinstance(runs, int) else runs
        if high == 0:
            self.expect.never.add(node_id)
        self.expect.runs[node_id] = (low, high)
        if isinstance(after, str):
            self.expect.inputs[node_id] = _once(after)
        elif after is not None:
            self.expect.inputs[node_id] = after
        return node_id


def _once(node_id: str) -> Callable[[int], NodeRef]:
    return lambda gen: (node_id, 1)


def _chain(s: _Shape, rng: random.Random) -> None:
    names = [s.node("c0", 1)]
    for i in range(1, rng.randint(2, 6)):
        names.append(s.node(f"c{i}", 1, after=names[-1]))
    s.flow.chain(*names)


def _diamond(s: _Shape, rng: random.Random, strategy: str) -> None:
    start = s.node("s", 1)
    join = s.node("j", 1, join=strategy)
    # the branches an ``any`` join does not wait for may be dropped when the run ends
    runs = 1 if strategy == "all" else (0, 1)
    branches = [s.node(f"b{i}", runs, after=start) for i in range(rng.randint(2, 5))]
    for b in branches:
        s.flow.edge(start, b).edge(b, join)
    s.expect.joins[join] = (strategy, lambda g: [(b, 1) for b in branches])
    if rng.random() < 0.5:
        s.flow.edge(join, s.node("t", 1, after=join))


def _diamond_all(s: _Shape, rng: random.Random) -> None:
    _diamond(s, rng, "all")


def _diamond_any(s: _Shape, rng: random.Random) -> None:
    _diamond(s, rng, "any")


def _branches(s: _Shape, rng: random.Random) -> None:
    """Branches taken or not (by condition or by action), some two nodes long, into a join."""
    by_action = rng.random() < 0.5
    strategy = rng.choice(["all", "any"])
    taken = [rng.random() < 0.5 for _ in range(rng.randint(2, 4))]
    fired = any(taken)
    start = s.node("s", 1, action="go" if by_action else None)
    join = s.node("j", 1 if fired else 0, join=strategy)
    lasts: list[str] = []
    runs = (1, 1) if strategy == "all" else (0, 1)
    for i, take in enumerate(taken):
        path = [s.node(f"b{i}.0", runs if take else 0, after=start)]
        if rng.random() < 0.5:
            path.append(s.node(f"b{i}.1", runs if take else 0, after=path[0]))
        if strategy == "any":  # the join does not wait for the other branches
            s.expect.lazy.update(path)
        if by_action:
            s.flow.edge(start, path[0], action="go" if take else "stop")
        else:
            s.flow.edge(start, path[0], condition=f"result.output.gen == {1 if take else 99}")
        s.flow.chain(*path, join)
        if take:
            lasts.append(path[-1])
    if fired:
        s.expect.joins[join] = (strategy, lambda g: [(n, 1) for n in lasts])
    s.flow.edge(join, s.node("after", 1 if fired else 0, after=join))


def _loop(s: _Shape, rng: random.Random) -> None:
    k = rng.randint(1, 4)
    init = s.node("init", 1)
    body = s.node("body", k, counter=True, after=lambda g: (init, 1) if g == 1 else (check, g - 1))
    check = s.node("check", k, after=lambda g: (body, g))
    after = s.node("after", 1, after=lambda g: (check, k))
    s.flow.chain(init, body, check).loop(body, check, while_=f"n < {k}").edge(check, after)
    s.expect.counter = k


def _loop_with_join(s: _Shape, rng: random.Random) -> None:
    k = rng.randint(1, 3)
    strategy = rng.choice(["all", "any"])
    init = s.node("init", 1)
    head = s.node("h", k, counter=True, after=lambda g: (init, 1) if g == 1 else (tail, g - 1))
    # an ``any`` join lets the loop go on while the other branch still runs (it lags)
    runs = k if strategy == "all" else (0, k)
    p = s.node("p", runs, after=lambda g: (head, g))
    q = s.node("q", runs, after=lambda g: (head, g))
    tail = s.node("t", k, join=strategy)
    after = s.node("after", 1, after=lambda g: (tail, k))
    s.flow.chain(init, head).edge(head, p).edge(head, q).edge(p, tail).edge(q, tail)
    s.flow.loop(head, tail, while_=f"n < {k}").edge(tail, after)
    s.expect.joins[tail] = (strategy, lambda g: [(p, g), (q, g)])
    s.expect.counter = k


def _loop_in_diamond(s: _Shape, rng: random.Random) -> None:
    k = rng.randint(1, 3)
    start = s.node("s", 1)
    head = s.node("h", k, counter=True, after=lambda g: (start, 1) if g == 1 else (check, g - 1))
    check = s.node("c", k, after=lambda g: (head, g))
    side, join = s.node("x", 1, after=start), s.node("j", 1)
    after = s.node("after", 1, after=join)
    s.flow.chain(start, head, check).loop(head, check, while_=f"n < {k}")
    s.flow.edge(check, join).chain(start, side, join).edge(join, after)
    s.expect.joins[join] = ("all", lambda g: [(check, k), (side, 1)])
    s.expect.counter = k


def _wait(s: _Shape, rng: random.Random) -> None:
    action = rng.choice(["approve", "reject"])
    start = s.node("s", 1)
    wait = s.n("w")
    s.flow.wait(wait)
    yes = s.node("yes", 1 if action == "approve" else 0)
    no = s.node("no", 1 if action == "reject" else 0)
    end = s.node("end", 1)
    s.flow.chain(start, wait).edge(wait, yes, action="approve").edge(wait, no, action="reject")
    s.flow.edge(yes, end).edge(no, end)
    chosen = yes if action == "approve" else no
    s.expect.joins[end] = ("all", lambda g: [(chosen, 1)])
    s.expect.resume = action
    s.expect.wait_node = wait


def _sleep(s: _Shape, rng: random.Random) -> None:
    """A durable sleep between two nodes: the job is handed back until it is due."""
    start = s.node("s", 1)
    nap = s.n("nap")
    s.flow.sleep(nap, rng.choice((0.0, 0.3, 1.0, 3.0)) * s.sim.lease_seconds * 1000)
    end = s.node("end", 1, after=start)  # the sleep passes its input on
    s.flow.chain(start, nap, end)


def _event(s: _Shape, rng: random.Random) -> None:
    """An event wait, signalled by its token (maybe twice at once), or left to its
    timeout, which takes the timeout edge."""
    timeout = rng.random() < 0.4
    start = s.node("s", 1)
    wait = s.n("w")
    token = f"{s.flow.id}.{s.sim.seed}"
    limit = rng.choice((0.5, 2.0)) * s.sim.lease_seconds * 1000 if timeout else None
    s.flow.wait_for(wait, "evt", token=token, timeout=limit)
    got = s.node("got", 0 if timeout else 1)
    late = s.node("late", 1 if timeout else 0)
    end = s.node("end", 1)
    s.flow.chain(start, wait).edge(wait, got).edge(wait, late, action="timeout")
    s.flow.edge(got, end).edge(late, end)
    chosen = late if timeout else got
    s.expect.joins[end] = ("all", lambda g: [(chosen, 1)])
    s.expect.wait_node = wait
    if not timeout:
        s.expect.signal = {"from": s.flow.id}
        s.expect.token = token


def _failure(s: _Shape, rng: random.Random) -> None:
    count = rng.randint(2, 4)
    failing = set(rng.sample(range(count), rng.randint(1, min(2, count))))
    start, join = s.node("s", 1), s.node("j", 0)
    after = s.node("after", 0)
    for i in range(count):
        b = s.node(f"b{i}", 0 if i in failing else (0, 1), fails=i in failing, after=start)
        s.flow.edge(start, b).edge(b, join)
        if i in failing:
            s.expect.failing.add(b)
    s.flow.edge(join, after)
    s.expect.status = "failed"


SHAPES: dict[str, Callable[[_Shape, random.Random], None]] = {
    "chain": _chain,
    "diamond-all": _diamond_all,
    "diamond-any": _diamond_any,
    "branches": _branches,
    "loop": _loop,
    "loop-join": _loop_with_join,
    "loop-in-diamond": _loop_in_diamond,
    "wait": _wait,
    "failure": _failure,
    "sleep": _sleep,
    "event": _event,
}
"""Graph shapes a seed picks from, by name."""


# ---------------------------------------------------------------------------- the simulation


@dataclass
class _Run:
    run_id: str
    shape: _Shape
    reconciles: int = 0
    resumed: bool = False
    cancel_at: float | None = None  # virtual time of an operator's cancel
    cancelled: str | None = None  # what cancel_run returned
    double_resume: bool = False  # resume twice at once, then the other action late
    collide: bool = False  # a colliding start (other initial context) after the start


@dataclass
class SimulationReport:
    """What one seed did and found."""

    seed: int
    shapes: list[str]
    failures: list[str]
    trace: list[str]
    profile: str = "default"
    crashes: int = 0
    outages: int = 0
    stalls: int = 0
    partitions: int = 0
    late_replies: int = 0
    cancels: int = 0
    operator_races: int = 0
    deliveries: int = 0
    lost_jobs: int = 0
    reconciled_runs: int = 0
    virtual_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def render(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        lines = [*self.trace, ""]
        lines += [f"FAILURE: {f}" for f in self.failures]
        lines.append(
            f"seed {self.seed}{'' if self.profile == 'default' else ' ' + self.profile}: "
            f"{verdict} ({', '.join(self.shapes)}; {self.deliveries} deliveries,"
            f" {self.crashes} crashes, {self.outages} outages, {self.stalls} stalls,"
            f" {self.partitions} partitions, {self.late_replies} late replies,"
            f" {self.cancels} cancels, {self.operator_races} operator races,"
            f" {self.lost_jobs} lost jobs,"
            f" {self.reconciled_runs} runs needed reconcile, {self.virtual_seconds:.2f} virtual s)"
        )
        return "\n".join(lines)


class Simulation:
    """One seed's fleet, runs and faults (use :func:`run_seed`)."""

    lease_seconds = 2.0
    time_limit = 3_600.0
    tick = 0.05

    def __init__(
        self, seed: int, shapes: list[str] | None = None, *, profile: Profile = "default"
    ) -> None:
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, not {profile!r}")
        self.seed = seed
        self.profile = profile
        harsh = profile == "harsh"
        # The harsh profile draws from its own stream: seed N of each profile differs.
        self.rng = random.Random(seed if not harsh else f"harsh-{seed}")
        rng = self.rng
        self.flaky_rate = rng.choice([0.0, 0.0, 0.2])
        self.slow_rate = rng.choice([0.0, 0.1, 0.3])
        # a slow node's worker loses its link to the coordination store meanwhile
        self.heartbeat_cut_rate = 0.5 if harsh else 0.3
        self.worker_count = rng.randint(1, 3)
        self.concurrency = rng.choice([1, 2, 4, 8])
        if harsh:
            self.duplicate_rate = round(rng.uniform(0.5, 1.0), 2)
        else:
            self.duplicate_rate = rng.choice([0.0, 0.0, 0.2, 0.5, 1.0])
        self.retry_mode: RetryMode = "queue" if rng.random() < 0.25 else "in-process"
        self.yield_rate = rng.choice([0.0, 0.3, 0.7])
        self.delay_rate = rng.choice([0.0, 0.05])
        self.reorder_rate = rng.choice([0.0, 0.3])  # queues need not keep jobs in order
        count = 3 if harsh else rng.choice([1, 1, 2])
        names = shapes or [rng.choice(list(SHAPES)) for _ in range(count)]
        self.runs: list[_Run] = []
        cancel_rate = 0.15 if harsh else 0.08
        for i, name in enumerate(names):
            shape = _Shape(self, f"{name}-{i}", f"r{i}.", name)
            SHAPES[name](shape, rng)
            run = _Run(f"run-{seed}-{i}", shape)
            if rng.random() < cancel_rate:
                run.cancel_at = rng.uniform(0.0, 3.0 * self.lease_seconds)
            waits = shape.expect.resume is not None or shape.expect.signal is not None
            run.double_resume = waits and rng.random() < 0.5
            run.collide = rng.random() < 0.1
            self.runs.append(run)
        self.double_start = rng.random() < 0.2  # every start is sent twice at once
        activations = sum(
            max(high, 1) for run in self.runs for _, high in run.shape.expect.runs.values()
        )
        budget = max(40, int(activations * 30 * (1 + self.duplicate_rate)))
        count = rng.randint(3, 8) if harsh else rng.choice([0, 1, 1, 2, 3, 5])
        faults = sorted(rng.randint(1, budget) for _ in range(count))
        kinds: list[FaultKind] = [
            *("crash",) * 6,
            *("outage",) * 2,
            "partition",
            "late",
        ]
        self.faults: list[tuple[int, FaultKind]] = [(at, rng.choice(kinds)) for at in faults]
        self.lose_enqueue = rng.randint(1, activations) if rng.random() < 0.15 else 0
        # the operator's process dies at its Nth store operation in an operator call
        self.client_crash = rng.randint(1, 12) if rng.random() < 0.15 else 0
        self.client_ops = 0
        self.operator_crashed = False
        # a worker process stalls (pause, blocked loop) for longer than its leases
        if harsh:
            self.stall_rate = round(rng.uniform(0.03, 0.06), 3)
        else:
            self.stall_rate = rng.choice([0.0, 0.0, 0.01, 0.03])
        self.cancelling: dict[str, asyncio.Task[None]] = {}
        self.stalls = 0
        self.partitions = 0
        self.late_replies = 0
        self.cancels = 0
        self.operator_races = 0
        self.enqueues = 0
        self.lost_runs: set[str] = set()
        self.trace: list[str] = []
        self.failures: list[str] = []
        self.executions: dict[str, list[_Execution]] = {}
        self.ops = 0
        self.tokens = 0
        self.crashes = 0
        self.outages = 0
        self.deliveries = 0
        self.workers: list[_Worker] = []
        self.graveyard: list[_Worker] = []
        self.restarts: list[float] = []
        self.spawned = 0

    def describe(self) -> str:
        return (
            f"seed {self.seed} ({self.profile}): shapes={[r.shape.name for r in self.runs]} "
            f"workers={self.worker_count}x{self.concurrency} dup={self.duplicate_rate} "
            f"retry={self.retry_mode} yield={self.yield_rate} delay={self.delay_rate} "
            f"reorder={self.reorder_rate} "
            f"flaky={self.flaky_rate} faults={self.faults} lose-enqueue={self.lose_enqueue} "
            f"client-crash={self.client_crash} stall={self.stall_rate} slow={self.slow_rate} "
            f"cancel-at={[r.cancel_at and round(r.cancel_at, 2) for r in self.runs]} "
            f"double-start={self.double_start} "
            f"double-resume={[r.double_resume for r in self.runs]} "
            f"collide={[r.collide for r in self.runs]}"
        )

    def log(self, line: str) -> None:
        loop = asyncio.get_running_loop()
        self.trace.append(f"{loop.time():9.3f} {line}")

    # ------------------------------------------------------------------ nodes

    def node_function(self, spec: _NodeSpec) -> Callable[[NodeContext], Awaitable[Any]]:
        async def node(ctx: NodeContext) -> Any:
            slot = _SLOT.get(None)
            if slot is not None:
                slot.in_node = True
            try:
                if spec.flaky and ctx.attempt == 1:
                    raise _Flaky(f"{ctx.node_id} flaky on attempt 1")
                if spec.fails:
                    raise _Failure(f"{ctx.node_id} fails for good")
                if spec.counter:
                    await ctx.set("n", int(await ctx.get("n") or 0) + 1)
                if spec.duration:
                    if slot is not None and self.rng.random() < self.heartbeat_cut_rate:
                        self._partition(slot, f"while {ctx.node_id} runs")
                    await asyncio.sleep(spec.duration)
                self.tokens += 1
                token = self.tokens
                await ctx.set(f"w.{ctx.node_id}.{ctx.activation}", token)
                self.executions.setdefault(ctx.idempotency_key, []).append(
                    _Execution(token, ctx.input, slot)
                )
                out = {"token": token, "gen": ctx.activation}
                return NodeResult(output=out, action=spec.action) if spec.action else out
            finally:
                if slot is not None:
                    slot.in_node = False

        return node

    # ------------------------------------------------------------------ fault hooks

    def _lose(self, job: JobPayload) -> bool:
        self.enqueues += 1
        if self.enqueues != self.lose_enqueue:
            return False
        self.lost_runs.add(job.run_id)
        self.log(f"LOST the enqueue of {job.run_id}/{job.node_id}")
        return True

    async def _before_context(self, operation: str, run_id: str) -> None:
        await self._hook("before", operation, run_id)

    async def _before_store(self, operation: str, key: str) -> None:
        await self._hook("before", operation, key)

    async def _after_store(self, operation: str, key: str) -> None:
        await self._hook("after", operation, key)

    async def _after_context(self, operation: str, run_id: str) -> None:
        await self._hook("after", operation, run_id)

    async def _hook(self, when: str, operation: str, key: str) -> None:
        self.ops += 1
        slot = _SLOT.get(None)
        if slot is not None and slot.worker is self.operator:
            self.client_ops += 1
            if self.client_ops == self.client_crash:
                self.crashes += 1
                self.operator_crashed = True
                self.lost_runs.add(slot.label)  # a reconcile is expected
                self.log(f"CRASH the operator at op {self.ops} ({when} {operation} {key})")
                raise SimulatedCrash(f"operator at op {self.ops}")
        elif slot is not None:
            worker = slot.worker
            if worker.dead:
                raise SimulatedCrash(f"{worker.name} is dead")
            now = asyncio.get_running_loop().time()
            coordination = not operation.startswith("context.")
            if coordination and when == "before" and worker.partitioned_until > now:
                slot.stalled = True
                self.log(f"CUT OFF {slot.label}: {operation} {key}")
                raise SimulatedOutage(f"{worker.name} is cut off from the coordination store")
            if when == "after" and slot.late:
                # The operation took effect; its reply arrives after the lease expired.
                slot.late = False
                slot.stalled = True
                delay = self.rng.uniform(1.2, 3.0) * self.lease_seconds
                self.log(f"LATE reply to {slot.label}: {operation} {key}, {delay:.2f} s")
                await asyncio.sleep(delay)
            if self.faults and self.ops >= self.faults[0][0]:
                _, kind = self.faults.pop(0)
                where = f"op {self.ops} ({when} {operation} {key}) in {slot.label}"
                if kind == "crash":
                    self.crashes += 1
                    self.log(f"CRASH {worker.name} at {where}")
                    self._kill(worker)
                    raise SimulatedCrash(where)
                if kind == "partition":
                    self._partition(slot, f"at {where}")
                elif kind == "late":
                    self.late_replies += 1
                    slot.late = True
                    self.log(f"the next reply to {slot.label} will be LATE (at {where})")
                elif not slot.in_node:  # inside a node it would only fail that attempt
                    self.outages += 1
                    self.log(f"OUTAGE at {where}")
                    raise SimulatedOutage(where)
            await self._maybe_stall(worker, operation)
        roll = self.rng.random()
        if roll < self.yield_rate:
            await asyncio.sleep(0)
        elif roll < self.yield_rate + self.delay_rate:
            await asyncio.sleep(self.rng.choice((0.001, 0.01, 0.2)))

    def _partition(self, slot: _Slot, where: str) -> None:
        """Cut the slot's worker off the coordination store (its heartbeats too) for 1
        to 2.5 leases; its context store stays reachable."""
        worker = slot.worker
        self.partitions += 1
        span = self.rng.uniform(1.0, 2.5) * self.lease_seconds
        worker.partitioned_until = asyncio.get_running_loop().time() + span
        for other in worker.slots.values():
            other.stalled = True
        slot.stalled = True
        self.log(f"PARTITION {worker.name} from the store for {span:.2f} s {where}")

    async def _maybe_stall(self, worker: _Worker, operation: str) -> None:
        """Freeze the worker (every task of it, heartbeats too) past its leases, before
        any store operation, a commit's guarded patch included."""
        now = asyncio.get_running_loop().time()
        if worker.frozen_until > now:
            slot = _SLOT.get(None)
            if slot is not None:
                slot.stalled = True
            await asyncio.sleep(worker.frozen_until - now)
            return
        if not self.stall_rate or self.rng.random() >= self.stall_rate:
            return
        for slot in worker.slots.values():
            slot.stalled = True
        self.stalls += 1
        worker.frozen_until = now + 1.5 * self.lease_seconds
        self.log(f"STALL {worker.name} for {1.5 * self.lease_seconds} s before {operation}")
        await asyncio.sleep(1.5 * self.lease_seconds)

    def _kill(self, worker: _Worker) -> None:
        worker.dead = True
        for task, slot in worker.slots.items():
            slot.aborted = True
            task.cancel()
            if not slot.started:  # taken from the queue, never begun: the queue redelivers it
                self.broker.queue.put_nowait(slot.delivery)
        self.workers.remove(worker)
        self.graveyard.append(worker)
        self.restarts.append(asyncio.get_running_loop().time() + 0.5)

    # ------------------------------------------------------------------ fleet

    def _adapter(self, name: str) -> InMemoryAdapter:
        return _VirtualClockAdapter(
            runtime_options=self.options,
            broker=self.broker,
            worker_id=name,
            lease_seconds=self.lease_seconds,
            retry_mode=self.retry_mode,
            concurrency=self.concurrency,
        )

    def _new_worker(self) -> None:
        self.spawned += 1
        name = f"w{self.spawned}"
        self.workers.append(_Worker(name, self._adapter(name), self.concurrency))
        self.log(f"start {name}")

    def _spawn(self, worker: _Worker, delivery: Any) -> None:
        self.deliveries += 1
        job = delivery.job
        label = (
            f"{worker.name}#{self.deliveries} {job.run_id}/{job.node_id}"
            if isinstance(job, JobPayload)
            else f"{worker.name}#{self.deliveries} raw"
        )
        slot = _Slot(worker, label, delivery)
        context = contextvars.copy_context()
        context.run(_SLOT.set, slot)
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._deliver(slot, delivery), context=context)
        worker.slots[task] = slot
        task.add_done_callback(lambda t: worker.slots.pop(t, None))

    async def _deliver(self, slot: _Slot, delivery: Any) -> None:
        slot.started = True
        adapter = slot.worker.adapter

        async def handler(job: JobPayload) -> None:
            try:
                await adapter.handle_job(job)
            except BaseException as exc:
                slot.aborted = True
                if not isinstance(exc, SimulatedCrash | asyncio.CancelledError):
                    self.log(f"{slot.label}: {type(exc).__name__}: {str(exc)[:120]}")
                raise

        self.log(f"deliver {slot.label} (delivery {delivery.deliveries + 1})")
        published = sum(len(r) for r in self.broker.results.values())
        try:
            await adapter.deliver(handler, delivery)
        except (SimulatedCrash, asyncio.CancelledError):
            slot.aborted = True
            self.log(f"{slot.label}: died")
        else:
            self.log(f"{slot.label}: {'handed back' if slot.aborted else 'done'}")
        for run_id, results in self.broker.results.items():
            if sum(len(r) for r in self.broker.results.values()) == published:
                break
            last = results[-1]
            self.log(f"{slot.label} published {run_id}: {last.status} {last.errors}")
            published += 1

    def _busy(self) -> bool:
        for run_id, task in list(self.cancelling.items()):
            if task.done():
                task.result()  # a cancel that raised is a failure of the seed
                del self.cancelling[run_id]
        return (
            bool(self.cancelling)
            or not self.broker.queue.empty()
            or self.broker.in_flight > 0
            or any(w.slots for w in (*self.workers, *self.graveyard))
        )

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if now > self.time_limit:
                self.failures.append(f"livelock: runs not done after {self.time_limit} s")
                return
            while self.restarts and self.restarts[0] <= now:
                self.restarts.pop(0)
                self._new_worker()
            for run in self.runs:
                due = run.cancel_at is not None and run.cancel_at <= now
                if due and run.cancelled is None and run.run_id not in self.cancelling:
                    self.cancelling[run.run_id] = loop.create_task(self._cancel(run))
            self.graveyard = [w for w in self.graveyard if w.slots]
            free = [
                w for w in self.workers if len(w.slots) < w.concurrency and w.frozen_until <= now
            ]
            queue = self.broker.queue
            if free and not queue.empty():
                delivery = queue.get_nowait()
                if queue.qsize() and self.rng.random() < self.reorder_rate:
                    queue.put_nowait(delivery)  # overtaken by the next job
                    continue
                self._spawn(self.rng.choice(free), delivery)
                if self.rng.random() < 0.5:
                    await asyncio.sleep(0)
                continue
            if self._busy() or self.restarts:
                await asyncio.sleep(self.tick)
                continue
            if not await self._unstick():
                return

    async def _unstick(self) -> bool:
        """Quiet: resume waits, reconcile stuck runs; False when every run is final."""
        progressed = False
        for run in self.runs:
            status = (await self.client.get_status(run.run_id)).status
            if status in ("completed", "failed", "cancelled"):
                continue
            expect = run.shape.expect
            if run.cancel_at is not None and run.cancelled is None:
                run.cancel_at = 0.0  # quiet before its moment: cancel now
                await self._cancel(run)
                progressed = True
                continue
            if status == "awaiting" and expect.signal is not None and not run.resumed:
                run.resumed = True
                self.log(f"signal {run.run_id} by its token {expect.token!r}")
                await self._signal(run)
                progressed = True
                continue
            if status == "awaiting" and expect.resume and not run.resumed:
                run.resumed = True
                self.log(f"resume {run.run_id} with {expect.resume!r}")
                await self._resume(run, expect.resume)
                progressed = True
                continue
            if run.reconciles >= 3:
                self.failures.append(f"run {run.run_id} stuck ({status}) after 3 reconciles")
                continue
            run.reconciles += 1
            enqueued = await self.client.reconcile(run.run_id)
            self.log(f"RECONCILE {run.run_id} ({status}): {enqueued} jobs")
            if run.run_id not in self.lost_runs:
                self.failures.append(
                    f"run {run.run_id} ({status}) needed reconcile although no job was lost"
                )
            progressed = True
        return progressed

    async def _as_operator(self, run_id: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """Make an operator call that may crash (then the operator calls it again, once)."""
        slot = _Slot(self.operator, run_id, None, started=True)
        context = contextvars.copy_context()
        context.run(_SLOT.set, slot)
        loop = asyncio.get_running_loop()
        try:
            return await loop.create_task(_awaited(call), context=context)
        except SimulatedCrash:
            return await call()

    async def _cancel(self, run: _Run) -> None:
        """An operator cancels the run (whatever state it is in)."""
        self.cancels += 1
        self.log(f"CANCEL {run.run_id}")
        call = functools.partial(self.client.cancel_run, run.run_id, "simulated cancel")
        run.cancelled = await self._as_operator(run.run_id, call)
        self.log(f"cancel {run.run_id} returned {run.cancelled}")

    async def _resume(self, run: _Run, action: str) -> None:
        """Resume a paused run: once, or twice at once (exactly one may apply), then
        late with the other action (which must be refused)."""
        resume = functools.partial(self.client.resume_with_action, run.run_id, action)
        if not run.double_resume:
            try:
                await self._as_operator(run.run_id, resume)
            except FlowcraftError as exc:  # the crashed call did resume it: reconcile
                self.log(f"resume again: {exc}")
            return
        self.operator_races += 1
        self.operator_crashed = False
        outcomes = await asyncio.gather(
            self._as_operator(run.run_id, resume),
            self._as_operator(run.run_id, resume),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, FlowcraftError):
                raise outcome
        applied = sum(1 for o in outcomes if not isinstance(o, BaseException))
        self.log(f"two resumes of {run.run_id}: {outcomes}")
        if applied > 1 or (applied == 0 and not self.operator_crashed):
            self.failures.append(f"run {run.run_id}: {applied} of two concurrent resumes applied")
        other = "reject" if action == "approve" else "approve"
        try:
            await self.client.resume_with_action(run.run_id, other)
        except FlowcraftError as exc:
            self.log(f"late resume refused: {exc}")
        else:
            self.failures.append(f"run {run.run_id}: a late resume ({other}) was accepted")

    async def _signal(self, run: _Run) -> None:
        """Signal an event wait by its token: once, or twice at once (one resumes it,
        the other is told it is a duplicate); then the same signal again (a duplicate)
        and another one (refused)."""
        expect = run.shape.expect
        assert expect.token is not None
        send = functools.partial(self.client.signal, expect.token, "evt", expect.signal)
        if not run.double_resume:
            try:
                self.log(f"signal returned {await self._as_operator(run.run_id, send)}")
            except FlowcraftError as exc:
                self.log(f"signal refused: {exc}")
            return
        self.operator_races += 1
        self.operator_crashed = False
        outcomes = await asyncio.gather(
            self._as_operator(run.run_id, send),
            self._as_operator(run.run_id, send),
            return_exceptions=True,
        )
        self.log(f"two signals of {run.run_id}: {outcomes}")
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, FlowcraftError):
                raise outcome
        applied = sum(1 for o in outcomes if o is True)
        if applied > 1 or (applied == 0 and not self.operator_crashed):
            self.failures.append(f"run {run.run_id}: {applied} of two identical signals applied")
        if await self.client.signal(expect.token, "evt", expect.signal) is not False:
            self.failures.append(f"run {run.run_id}: a repeated signal was not a duplicate")
        try:
            await self.client.signal(expect.token, "evt", {"other": True})
        except FlowcraftError as exc:
            self.log(f"late signal refused: {exc}")
        else:
            self.failures.append(f"run {run.run_id}: a different late signal was accepted")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        store = InMemoryCoordinationStore(
            clock=loop.time, before_op=self._before_store, after_op=self._after_store
        )
        self.broker = _LossyBroker(
            lose=self._lose,
            store=store,
            duplicate_rate=self.duplicate_rate,
            seed=self.rng.randrange(2**32),
            max_redelivery_delay=0.25,
            fault=self._before_context,
            after_fault=self._after_context,
        )
        flows = {r.shape.flow.id: r.shape.flow for r in self.runs}
        self.options = RuntimeOptions.from_flows(*flows.values())
        self.client = self._adapter("client")
        self.operator = _Worker("operator", self.client, 1)
        self.log(self.describe())
        for _ in range(self.worker_count):
            self._new_worker()
        began = loop.time()
        for r in self.runs:
            start = functools.partial(self.client.start_run, r.shape.flow.id, {}, run_id=r.run_id)
            if r.cancel_at is not None:
                r.cancel_at += began
            if self.double_start:  # the same request twice at once: both return the run
                self.operator_races += 1
                await asyncio.gather(
                    self._as_operator(r.run_id, start), self._as_operator(r.run_id, start)
                )
            else:
                await self._as_operator(r.run_id, start)
        for r in self.runs:
            if r.collide:
                await self._collide(r)
        await self._dispatch()
        for r in self.runs:
            await self._check(r)
        for job, error in self.broker.dead_letters:
            self.failures.append(f"dead-lettered {job!r}: {error}")

    async def _collide(self, run: _Run) -> None:
        """Another request with the run's id (other initial context) must be refused."""
        self.operator_races += 1
        call = functools.partial(
            self.client.start_run, run.shape.flow.id, {"collide": True}, run_id=run.run_id
        )
        try:
            await self._as_operator(run.run_id, call)
        except RunConflictError as exc:
            self.log(f"colliding start refused: {exc}")
        else:
            self.failures.append(f"run {run.run_id}: a colliding start was accepted")

    # ------------------------------------------------------------------ invariants

    async def _check(self, run: _Run) -> None:
        expect = run.shape.expect
        problems: list[str] = []
        published = self.broker.results.get(run.run_id, [])
        if not published:
            self.failures.append(f"run {run.run_id}: no final result was published")
            return
        first = published[0].to_json_dict()
        problems += self._check_republished(run, published)
        status = first["status"]
        cancelled = status == "cancelled"
        if cancelled and run.cancel_at is None:
            problems.append("cancelled, but nobody cancelled it")
        if status != expect.status and not cancelled:
            problems.append(
                f"status {status!r} (errors {first['errors']}), expected {expect.status}"
            )
        if run.cancelled is not None and run.cancelled != status:
            problems.append(f"cancel_run returned {run.cancelled!r}, the run ended {status!r}")
        info = await self.client.get_status(run.run_id)
        if info.status != status:
            problems.append(f"get_status says {info.status!r}, the published result {status!r}")
        state = self.broker.contexts[run.run_id].data
        problems += self._check_state(run, state, published[0])
        if cancelled:
            if first["errors"] != [
                {"nodeId": None, "message": "simulated cancel", "type": "cancelled"}
            ]:
                problems.append(f"a cancelled run published errors {first['errors']}")
        elif status == "failed":
            errors = first["errors"]
            if len(errors) != 1 or errors[0].get("nodeId") not in expect.failing:
                problems.append(f"errors {errors}, expected one naming one of {expect.failing}")
        complete = status == "completed"
        for node_id, runs in expect.runs.items():
            problems += self._check_node(run, state, node_id, runs, complete)
        if complete:
            problems += self._check_joins(run, state)
            if expect.counter is not None and state.get("n") != expect.counter:
                problems.append(f"context n = {state.get('n')}, expected {expect.counter}")
            for node_id, (low, high) in expect.runs.items():
                resolved = state.get(K.resolved(node_id))
                if low == high and node_id not in expect.lazy and resolved != max(high, 1):
                    problems.append(f"{node_id} resolved {resolved} times, expected {high}")
        for key in state:
            if key.startswith("w."):
                node_id, _, gen = key[2:].rpartition(".")
                if node_id not in expect.runs or int(gen) > expect.runs[node_id][1]:
                    problems.append(f"unexpected write {key!r}")
        self.failures += [f"run {run.run_id} ({run.shape.name}): {p}" for p in problems]

    def _check_state(self, run: _Run, state: Mapping[str, Any], first: FinalResult) -> list[str]:
        """The stored state agrees with the published result: exactly for a cancelled
        run (fenced before it was read), else but for what nodes nobody waits for wrote
        (they may commit until the run's end is recorded, after the publication)."""
        view = {k: v for k, v in state.items() if not K.is_reserved(k)}
        differ = {
            k for k in view.keys() | first.context.keys() if view.get(k) != first.context.get(k)
        }
        if first.status != "cancelled":
            expect = run.shape.expect
            unwaited = {n for n, (low, high) in expect.runs.items() if low < high} | expect.lazy
            differ = {k for k in differ if _writer(k) not in unwaited}
        if differ:
            return [f"the stored state and the published result differ in {sorted(differ)}"]
        return []

    def _check_republished(self, run: _Run, published: list[FinalResult]) -> list[str]:
        """Repeated publications (a finalizer redone) agree on status and errors, and their
        contexts differ only in what nodes nobody waits for wrote (``any``-join losers,
        branches beside a failure); the adapter keeps the first."""
        first = published[0]
        if self.broker.published.get(run.run_id) is not first:
            return ["the adapter does not keep the first publication"]
        expect = run.shape.expect
        unwaited = {n for n, (low, high) in expect.runs.items() if low < high} | expect.lazy
        problems: list[str] = []
        for again in published[1:]:
            if (again.status, again.errors) != (first.status, first.errors):
                problems.append(
                    f"published {first.status} {first.errors}, then {again.status} {again.errors}"
                )
            differ = {
                k
                for k in first.context.keys() | again.context.keys()
                if first.context.get(k) != again.context.get(k)
            }
            stray = {k for k in differ if _writer(k) not in unwaited}
            if stray:
                problems.append(f"a repeated publication changed {sorted(stray)}")
        return problems

    def _check_node(
        self,
        run: _Run,
        state: Mapping[str, Any],
        node_id: str,
        runs: tuple[int, int],
        complete: bool,
    ) -> list[str]:
        problems: list[str] = []
        prefix = f"{run.run_id}:{node_id}:"
        gens = sorted(
            int(k[len(prefix) :])
            for k in self.executions
            if k.startswith(prefix) and k[len(prefix) :].isdigit()
        )
        low, high = runs if complete else (0, runs[1])
        if not low <= len(gens) <= high or gens != list(range(1, len(gens) + 1)):
            problems.append(f"{node_id} ran activations {gens}, expected {low}..{high}")
        source = run.shape.expect.inputs.get(node_id)
        for gen in gens:
            executions = self.executions[f"{prefix}{gen}"]
            committed = state.get(f"w.{node_id}.{gen}")
            if committed is None:
                if complete and low == high:  # a branch nobody waits for may be dropped
                    problems.append(f"the writes of {node_id} activation {gen} were lost")
                continue
            if committed not in [e.token for e in executions]:
                problems.append(f"{node_id}#{gen} committed token {committed} of no execution")
            ref = source(gen) if source is not None else None
            if ref is not None:
                expected = {"token": state.get(f"w.{ref[0]}.{ref[1]}"), "gen": ref[1]}
                got = [e.input for e in executions if e.token == committed]
                if got and got[0] != expected:
                    problems.append(
                        f"{node_id}#{gen} got input {got[0]}, expected the output of "
                        f"{ref[0]}#{ref[1]}: {expected}"
                    )
            twice = [e for e in executions if e.token != committed and not _aborted(e)]
            if twice and not any(_stalled(e) for e in executions):
                problems.append(
                    f"{node_id}#{gen} executed {len(executions)} times without a crash: "
                    f"{[(e.token, e.slot.label if e.slot else None) for e in executions]}"
                )
        committed_gens = [g for g in gens if f"w.{node_id}.{g}" in state]
        if committed_gens and complete:
            last = committed_gens[-1]
            output = state.get(K.output(node_id))
            written = state.get(f"w.{node_id}.{last}")
            if (output is not None or written is not None) and output != {
                "token": written,
                "gen": last,
            }:
                problems.append(
                    f"{node_id}: output {output} and writes "
                    f"{state.get(f'w.{node_id}.{last}')} come from different executions"
                )
        return problems

    def _check_joins(self, run: _Run, state: Mapping[str, Any]) -> list[str]:
        problems: list[str] = []

        def out(ref: NodeRef) -> dict[str, Any]:
            return {"token": state.get(f"w.{ref[0]}.{ref[1]}"), "gen": ref[1]}

        for join, (strategy, preds) in run.shape.expect.joins.items():
            for gen in range(1, run.shape.expect.runs[join][1] + 1):
                committed = state.get(f"w.{join}.{gen}")
                seen = [
                    e.input
                    for e in self.executions.get(f"{run.run_id}:{join}:{gen}", [])
                    if e.token == committed
                ]
                if not seen:
                    continue  # reported by _check_node
                refs = preds(gen)
                if strategy == "all":
                    expected: Any = {ref[0]: out(ref) for ref in refs}
                    if seen[0] != expected:
                        problems.append(f"join {join}#{gen} input {seen[0]}, expected {expected}")
                elif seen[0] not in [out(ref) for ref in refs]:
                    problems.append(f"any-join {join}#{gen} input {seen[0]} is no branch's output")
        return problems


async def _awaited(call: Callable[[], Awaitable[Any]]) -> Any:
    return await call()


def _writer(key: str) -> str | None:
    """The node whose execution writes ``key`` in the simulation (None: no node's)."""
    if key.startswith(K.OUTPUTS_PREFIX):
        return key[len(K.OUTPUTS_PREFIX) :]
    if key.startswith("w."):
        return key[2:].rpartition(".")[0]
    return None


def _aborted(execution: _Execution) -> bool:
    return execution.slot is not None and execution.slot.aborted


def _stalled(execution: _Execution) -> bool:
    """A stall past the lease lets a second delivery run the activation too (the lease
    only saves duplicate work; the commit's guard lets one of them resolve it)."""
    return execution.slot is not None and execution.slot.stalled


# ---------------------------------------------------------------------------- entry points


def run_seed(
    seed: int, shapes: list[str] | None = None, *, profile: Profile = "default"
) -> SimulationReport:
    """Run one seed on a fresh virtual-time loop and check its invariants."""
    sim = Simulation(seed, shapes, profile=profile)
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        try:
            runner.run(sim.run())
        except Exception as exc:  # a bug in the protocol surfaced as an exception
            sim.failures.append(f"simulation raised {type(exc).__name__}: {exc}")
        virtual = runner.get_loop().time()
    return SimulationReport(
        seed=seed,
        shapes=[r.shape.name for r in sim.runs],
        failures=sim.failures,
        trace=sim.trace,
        profile=profile,
        crashes=sim.crashes,
        partitions=sim.partitions,
        late_replies=sim.late_replies,
        cancels=sim.cancels,
        operator_races=sim.operator_races,
        outages=sim.outages,
        stalls=sim.stalls,
        deliveries=sim.deliveries,
        lost_jobs=len(sim.lost_runs),
        reconciled_runs=sum(1 for r in sim.runs if r.reconciles),
        virtual_seconds=virtual,
    )


def run_seeds(
    seeds: range, *, profile: Profile = "default", processes: int = 1
) -> list[SimulationReport]:
    """Run ``seeds`` (in ``processes`` worker processes when more than 1: seeds are
    independent, and each replays the same wherever it runs). Reports keep no trace
    unless they failed, so a large range stays small in memory."""
    if processes <= 1:
        return [_trimmed(run_seed(s, profile=profile)) for s in seeds]
    chunks = [range(start, min(start + 100, seeds.stop)) for start in seeds[::100]]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        parts = pool.map(functools.partial(run_seeds, profile=profile), chunks)
        return [report for part in parts for report in part]


def _trimmed(report: SimulationReport) -> SimulationReport:
    if report.ok:
        report.trace = []
    return report


def summarise(reports: list[SimulationReport], elapsed: float) -> str:
    bad = [r for r in reports if not r.ok]
    lines = [f"seed {r.seed} ({r.profile}): {r.failures[0]}" for r in bad]
    total = functools.partial(sum, start=0)
    lines.append(
        f"{len(reports)} seeds in {elapsed:.1f} s: {len(bad)} failed; "
        f"{total(r.crashes for r in reports)} crashes, "
        f"{total(r.outages for r in reports)} outages, "
        f"{total(r.stalls for r in reports)} stalls, "
        f"{total(r.partitions for r in reports)} partitions, "
        f"{total(r.late_replies for r in reports)} late replies, "
        f"{total(r.cancels for r in reports)} cancels, "
        f"{total(r.operator_races for r in reports)} operator races, "
        f"{total(r.lost_jobs for r in reports)} lost jobs, "
        f"{total(r.reconciled_runs for r in reports)} runs needed reconcile"
    )
    return "\n".join(lines)


def cli(argv: list[str]) -> tuple[int, str]:
    """``--seed N`` replays one seed with its trace; ``--seeds A:B`` runs a range."""
    parser = argparse.ArgumentParser(prog="python -m flowcraft.testing.simulation")
    parser.add_argument("--seed", type=int, help="replay one seed and print its trace")
    parser.add_argument("--seeds", help="run seeds A:B and summarise (default 0:200)")
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), help="force shapes")
    parser.add_argument("--profile", choices=PROFILES, default="default", help="fault profile")
    parser.add_argument("--processes", type=int, default=1, help="run seeds in N processes")
    args = parser.parse_args(argv)
    if args.seed is not None:
        report = run_seed(args.seed, args.shape, profile=args.profile)
        return (0 if report.ok else 1), report.render()
    start, _, stop = (args.seeds or "0:200").partition(":")
    began = time.perf_counter()
    seeds = range(int(start), int(stop))
    if args.shape:
        reports = [run_seed(s, args.shape, profile=args.profile) for s in seeds]
    else:
        reports = run_seeds(seeds, profile=args.profile, processes=args.processes)
    text = summarise(reports, time.perf_counter() - began)
    return (0 if all(r.ok for r in reports) else 1), text


if __name__ == "__main__":
    code, text = cli(sys.argv[1:])
    print(text)
    sys.exit(code)
