"""The deterministic crash simulation: thousands of seeds, replay, and proof that it bites.

Replay a failing seed with ``python -m flowcraft.testing.simulation --seed N``
(``--profile harsh`` for the harsh profile). ``FLOWCRAFT_SIM_SEEDS`` sets how many
seeds of the default profile run (default 20,000), ``FLOWCRAFT_SIM_HARSH_SEEDS`` how
many of the harsh one (default 5,000); ``FLOWCRAFT_SIM_PROCESSES`` the processes they
run in (default 2).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from flowcraft.context import PatchOperation
from flowcraft.distributed import _handler as handler_module
from flowcraft.distributed import _resolution as protocol_module
from flowcraft.distributed import adapter as adapter_module
from flowcraft.distributed.memory import InMemoryAdapter, InMemoryBroker, InMemoryRunContext
from flowcraft.distributed.payload import JobPayload
from flowcraft.runtime import RuntimeOptions
from flowcraft.testing.simulation import (
    SHAPES,
    Profile,
    SimulatedCrash,
    SimulationReport,
    VirtualTimeLoop,
    cli,
    run_seed,
    run_seeds,
)

SEEDS = int(os.environ.get("FLOWCRAFT_SIM_SEEDS", "20000"))
HARSH_SEEDS = int(os.environ.get("FLOWCRAFT_SIM_HARSH_SEEDS", "5000"))
PROCESSES = int(os.environ.get("FLOWCRAFT_SIM_PROCESSES", "2"))
BATCH = 2000
BATCHES = [("default", first, min(first + BATCH, SEEDS)) for first in range(0, SEEDS, BATCH)] + [
    ("harsh", first, min(first + BATCH, HARSH_SEEDS)) for first in range(0, HARSH_SEEDS, BATCH)
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("profile", "first", "stop"), BATCHES, ids=[f"{p}-{a}-{b}" for p, a, b in BATCHES]
)
def test_seeds(profile: Profile, first: int, stop: int) -> None:
    began = time.perf_counter()
    reports = run_seeds(range(first, stop), profile=profile, processes=PROCESSES)
    assert [r.seed for r in reports] == list(range(first, stop))
    failed = [r for r in reports if not r.ok]
    summary = "\n".join(
        f"seed {r.seed} ({', '.join(r.shapes)}): {r.failures[0]}\n"
        f"  replay: python -m flowcraft.testing.simulation --seed {r.seed} --profile {profile}"
        for r in failed
    )
    assert not failed, f"{len(failed)} of {len(reports)} seeds failed:\n{summary}"
    elapsed = time.perf_counter() - began
    print(f"{profile} seeds {first}..{stop - 1}: ok in {elapsed:.1f} s")


def test_the_simulation_injects_what_it_claims() -> None:
    """Over 300 seeds: every shape, crashes, outages, duplicates and lease waits happen."""
    reports = [run_seed(seed) for seed in range(300)]
    shapes = Counter(s for r in reports for s in r.shapes)
    assert set(shapes) == set(SHAPES)
    assert sum(r.crashes for r in reports) > 100
    assert sum(r.outages for r in reports) > 30
    assert sum(r.stalls for r in reports) > 100
    assert sum(r.lost_jobs for r in reports) > 20
    assert sum(r.reconciled_runs for r in reports) > 10, "no lost job ever needed reconcile"
    traces = ["\n".join(r.trace) for r in reports]
    assert sum("running elsewhere" in t for t in traces) > 30, "no redelivery met a live lease"
    assert sum("dup=1.0" in t for t in traces) > 20
    assert sum("retry=queue" in t for t in traces) > 30
    assert sum("resume " in t for t in traces) > 10
    assert sum(r.partitions for r in reports) > 10
    assert sum(r.late_replies for r in reports) > 10
    assert sum(r.cancels for r in reports) > 10
    assert sum(r.operator_races for r in reports) > 50
    heartbeats_cut = sum(
        1
        for t in traces
        for line in t.splitlines()
        if "CUT OFF" in line and ("extend_ttl" in line or "get flowcraft:lease" in line)
    )
    assert heartbeats_cut > 5, "no partition cut a heartbeat off"
    assert sum("cancel run-" in t and "returned cancelled" in t for t in traces) > 5
    assert sum("colliding start refused" in t for t in traces) > 10
    assert sum("late resume refused" in t for t in traces) > 5
    assert all(r.ok for r in reports), [r.failures for r in reports if not r.ok]


def test_the_harsh_profile_is_harsh() -> None:
    """Three runs at once, duplicates 50-100 %, stalls on 3-6 % of store operations,
    3-8 faults per seed."""
    reports = [run_seed(seed, profile="harsh") for seed in range(60)]
    assert all(len(r.shapes) == 3 for r in reports)
    for report in reports:
        line = report.trace[0]
        dup = float(line.split(" dup=")[1].split()[0])
        stall = float(line.split(" stall=")[1].split()[0])
        faults = line.split(" faults=")[1].split("]")[0].count("(")
        assert 0.5 <= dup <= 1.0
        assert 0.03 <= stall <= 0.06
        assert 3 <= faults <= 8
    assert all(r.ok for r in reports), [r.failures for r in reports if not r.ok]


def _seed_where(check: Callable[[SimulationReport], bool]) -> int:
    return next(seed for seed in range(1_000) if check(run_seed(seed)))


def test_a_seed_replays_exactly() -> None:
    crashes = _seed_where(lambda r: r.crashes >= 2)
    outages = _seed_where(lambda r: r.crashes > 0 and r.outages > 0)
    for seed in (crashes, outages):
        first, second = run_seed(seed), run_seed(seed)
        assert first.render() == second.render()
        assert first.ok


def test_cli_replays_a_seed_with_its_trace() -> None:
    seed = _seed_where(lambda r: r.outages > 0)
    code, text = cli(["--seed", str(seed)])
    assert code == 0
    assert "OUTAGE at op" in text
    assert text.splitlines()[-1].startswith(f"seed {seed}: ok (")
    code, text = cli(["--seeds", "0:5", "--shape", "loop"])
    assert code == 0
    assert text.startswith("5 seeds in")
    code, text = cli(["--seed", "3", "--profile", "harsh"])
    assert code == 0, text
    assert text.splitlines()[-1].startswith("seed 3 harsh: ok (")
    code, text = cli(["--seeds", "0:200", "--processes", "2"])
    assert code == 0, text
    assert text.startswith("200 seeds in")


def test_seeds_run_the_same_in_other_processes() -> None:
    here = run_seeds(range(100, 130), profile="harsh")
    there = run_seeds(range(100, 130), profile="harsh", processes=2)
    assert [r.render() for r in here] == [r.render() for r in there]


def test_cli_runs_as_a_module() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flowcraft.testing.simulation", "--seed", "1"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "seed 1: ok" in done.stdout


# ---------------------------------------------------------------- the simulation finds bugs


def _first_failing(seeds: range, shapes: list[str] | None = None) -> int | None:
    return next((s for s in seeds if not run_seed(s, shapes).ok), None)


def test_it_catches_a_commit_that_is_not_atomic(monkeypatch: pytest.MonkeyPatch) -> None:
    """The original's defect: output first, deltas after; a crash between loses deltas."""
    original = InMemoryRunContext.patch

    async def split(self: InMemoryRunContext, ops: Sequence[PatchOperation]) -> None:
        half = len(ops) // 2
        await original(self, ops[half:])
        await original(self, ops[:half])

    monkeypatch.setattr(InMemoryRunContext, "patch", split)
    assert _first_failing(range(200)) is not None


def test_it_catches_inputs_read_by_reference_in_lagging_loops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Undo the fix that hands outputs by value inside loops with an ``any`` join."""
    monkeypatch.setattr(protocol_module, "_has_any_join", lambda analysis, node_id: False)
    seed = _first_failing(range(300), ["loop-join"])
    assert seed is not None, "no seed noticed a lagging branch reading the next iteration's output"
    report = run_seed(seed, ["loop-join"])
    assert any("got input" in f for f in report.failures), report.failures


def test_it_catches_a_join_that_trusts_its_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The original's defect: a redelivered signal counts twice and the join fires early."""
    original = adapter_module.BaseDistributedAdapter._decisions_for

    async def trusting(self: Any, job: Any, target: str, gen: int, required: Any) -> Any:
        found = await original(self, job, target, gen, required)
        if found is None:  # pretend the missing predecessors resolved without choosing
            return {}
        return found

    monkeypatch.setattr(adapter_module.BaseDistributedAdapter, "_decisions_for", trusting)
    assert _first_failing(range(300), ["diamond-all"]) is not None


def test_it_catches_an_unguarded_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the commit's guard (``n.X == g - 1``, the run not ended) a worker that
    stalled past its lease commits over the delivery that took over: the lease alone
    cannot fence it (issue 12)."""
    for module in (protocol_module, handler_module):
        monkeypatch.setattr(module, "_fence", lambda node_id, generation: {})
    assert _first_failing(range(600)) is not None


# ---------------------------------------------------------------- the pieces


def test_virtual_time_jumps_to_the_next_timer() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        began = loop.time()
        await asyncio.sleep(3_600)
        async with asyncio.timeout(10):
            await asyncio.sleep(9.5)
        return began, loop.time()

    wall = time.perf_counter()
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        began, ended = runner.run(main())
    assert ended - began == pytest.approx(3_609.5)
    assert time.perf_counter() - wall < 5, "virtual time must not wait for real time"


def test_virtual_time_reports_a_deadlock() -> None:
    async def forever() -> None:
        await asyncio.Event().wait()

    with (
        asyncio.Runner(loop_factory=VirtualTimeLoop) as runner,
        pytest.raises(RuntimeError, match="deadlock"),
    ):
        runner.run(forever())


async def test_a_dying_worker_hands_its_job_back() -> None:
    """A handler ending with a BaseException that is not an Exception (the worker died)
    leaves the job on the queue, still in flight, and lets the exception through."""
    broker = InMemoryBroker()
    adapter = InMemoryAdapter(runtime_options=RuntimeOptions(), broker=broker)
    broker.put(JobPayload(run_id="r", blueprint_id="b", node_id="n"))
    delivery = broker.queue.get_nowait()

    async def dies(job: JobPayload) -> None:
        raise SimulatedCrash("power cut")

    with pytest.raises(SimulatedCrash):
        await adapter.deliver(dies, delivery)
    assert broker.queue.get_nowait() is delivery
    assert broker.in_flight == 1
    assert broker.dead_letters == []
