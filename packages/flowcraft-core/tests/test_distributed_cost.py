"""Cost per node job (PRODUCT.md guarantee 7): O(delta), not O(state).

Jobs are delivered one at a time so each job's operations are counted alone: the
context operations (``broker.context_ops``), the coordination store operations
(``store.op_counts``), the jobs it enqueued and the bytes it read. With 1 KB and
with 1 MB in the run's state, every job costs the same; only finalization reads
the whole state, once per run.

Measured (one delivery, no duplicates):

================================  ============================  ================================
job                               context ops                   store ops
================================  ============================  ================================
node with one successor           2 get_many, 1 patch           2 set_if_not_exist
branch into a join (not last)     2 get_many, 1 patch           2 set_if_not_exist, 1 increment
branch that completes the join    4 get_many, 2 patch           2 set_if_not_exist, 1 increment
the join itself                   3 get_many, 1 patch           2 set_if_not_exist
last sink (finalizes the run)     3 get_many, 2 patch,          3 set_if_not_exist, 1 increment,
                                  1 to_dict                     deletes (counters; one call on
                                                                a store with ``delete_many``)
================================  ============================  ================================
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest

from flowcraft import Flow, NodeContext, RuntimeOptions
from flowcraft.distributed.coordination import InMemoryCoordinationStore
from flowcraft.distributed.memory import InMemoryAdapter, InMemoryBroker
from flowcraft.distributed.payload import JobPayload
from flowcraft.testing import ContextMeter, meter_contexts

SMALL = 1024
LARGE = 1024 * 1024

NODE = ({"get_many": 2, "patch": 1}, {"set_if_not_exist": 2})
INTO_JOIN = ({"get_many": 2, "patch": 1}, {"set_if_not_exist": 2, "increment": 1})
COMPLETES_JOIN = ({"get_many": 4, "patch": 2}, {"set_if_not_exist": 2, "increment": 1})
JOIN = ({"get_many": 3, "patch": 1}, {"set_if_not_exist": 2})
FINALIZES = (
    {"get_many": 3, "patch": 2, "to_dict": 1},
    {"set_if_not_exist": 3, "increment": 1},
)
READ_LIMIT = 4 * 1024  # bytes a non-final job may read, whatever the state holds


@dataclass
class JobCost:
    node_id: str
    context: Counter[str]
    store: Counter[str]
    enqueued: int
    read_bytes: int
    patch_ops: list[int]


async def _load(ctx: NodeContext) -> str:
    await ctx.set("blob", "x" * int(ctx.params["size"]))
    return "loaded"


async def _step(ctx: NodeContext) -> str:
    await ctx.set(f"delta {ctx.node_id}", len(str(ctx.input)))
    return ctx.node_id


def _chain(size: int) -> Flow:
    flow = Flow("chain").node("load", _load, params={"size": size})
    for name in ("a", "b", "c"):
        flow.node(name, _step)
    return flow.chain("load", "a", "b", "c")


def _diamond(size: int) -> Flow:
    flow = Flow("diamond").node("load", _load, params={"size": size})
    flow.node("s", _step).node("j", _step).node("t", _step).chain("load", "s")
    for i in range(3):
        flow.node(f"b{i}", _step).edge("s", f"b{i}").edge(f"b{i}", "j")
    return flow.edge("j", "t")


async def _costs(flow: Flow) -> tuple[list[JobCost], dict[str, Any]]:
    """Run ``flow`` delivering one job at a time; the cost of each job, and the result."""
    broker = InMemoryBroker()
    blueprint = flow.to_blueprint()
    options = RuntimeOptions.from_flows(flow)
    adapter = InMemoryAdapter(runtime_options=options, broker=broker)
    meter = ContextMeter()
    meter_contexts(adapter, meter)
    run_id = await adapter.start_run(blueprint.id, run_id="cost")
    costs: list[JobCost] = []
    while not broker.queue.empty():
        delivery = broker.queue.get_nowait()
        broker.reset_counts()
        meter.reset()
        enqueued = broker.enqueued
        await adapter.deliver(adapter.handle_job, delivery)
        costs.append(
            JobCost(
                delivery.job.node_id,
                Counter(broker.context_ops),
                Counter(broker.store.op_counts),
                broker.enqueued - enqueued,
                sum(meter.read_bytes),
                list(broker.patch_sizes),
            )
        )
    result = await adapter.get_final_result(run_id)
    assert result is not None
    assert result.status == "completed", result
    return costs, result.context


def _assert_cost(cost: JobCost, expected: tuple[dict[str, int], dict[str, int]]) -> None:
    context, store = expected
    assert cost.context == Counter(context), (cost.node_id, cost.context)
    store_ops = Counter({k: v for k, v in cost.store.items() if k != "delete"})
    assert store_ops == Counter(store), (cost.node_id, cost.store)


@pytest.mark.parametrize("build", [_chain, _diamond])
async def test_job_cost_does_not_depend_on_state_size(build: Any) -> None:
    small, small_result = await _costs(build(SMALL))
    large, large_result = await _costs(build(LARGE))
    assert len(large_result["blob"]) == LARGE
    assert {k: v for k, v in small_result.items() if k != "blob"} == {
        k: v for k, v in large_result.items() if k != "blob"
    }
    assert [c.node_id for c in small] == [c.node_id for c in large]
    for a, b in zip(small, large, strict=True):
        assert (a.context, a.store, a.enqueued, a.patch_ops) == (
            b.context,
            b.store,
            b.enqueued,
            b.patch_ops,
        ), a.node_id
    for cost in large[:-1]:
        assert cost.read_bytes < READ_LIMIT, f"{cost.node_id} read {cost.read_bytes} bytes"
        assert cost.context["to_dict"] == 0
        assert max(cost.patch_ops) <= 8, "a patch larger than the node's delta and records"
    assert large[-1].context["to_dict"] == 1, "finalization reads the state once"


async def test_chain_job_costs() -> None:
    costs, _ = await _costs(_chain(LARGE))
    by_node = {c.node_id: c for c in costs}
    for node_id in ("load", "a", "b"):
        _assert_cost(by_node[node_id], NODE)
        assert by_node[node_id].enqueued == 1
    _assert_cost(by_node["c"], FINALIZES)
    assert by_node["c"].enqueued == 0


async def test_diamond_job_costs() -> None:
    costs, _ = await _costs(_diamond(LARGE))
    by_node = {c.node_id: c for c in costs}
    assert [c.node_id for c in costs] == ["load", "s", "b0", "b1", "b2", "j", "t"]
    _assert_cost(by_node["s"], NODE)
    assert by_node["s"].enqueued == 3
    for branch in ("b0", "b1"):
        _assert_cost(by_node[branch], INTO_JOIN)
        assert by_node[branch].enqueued == 0
    _assert_cost(by_node["b2"], COMPLETES_JOIN)
    assert by_node["b2"].enqueued == 1
    _assert_cost(by_node["j"], JOIN)
    assert by_node["j"].enqueued == 1
    _assert_cost(by_node["t"], FINALIZES)
    assert by_node["t"].store["delete"] <= 1 + 2 * 2, "tidying is bounded by the joins"


class _BatchRecorder(InMemoryAdapter):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.batches: list[list[str]] = []

    async def enqueue_jobs(self, jobs: Any) -> None:
        self.batches.append([j.node_id for j in jobs])
        await super().enqueue_jobs(jobs)


async def test_fan_outs_and_start_nodes_are_enqueued_as_one_batch() -> None:
    """An adapter can send them in one call (``enqueue_jobs``); single successors go
    through ``enqueue_job`` alone."""
    flow = Flow("fan").node("s1", _step).node("s2", _step).node("j", _step)
    for i in range(3):
        flow.node(f"b{i}", _step).edge("s1", f"b{i}").edge(f"b{i}", "j")
    flow.edge("s2", "j")
    broker = InMemoryBroker()
    adapter = _BatchRecorder(runtime_options=RuntimeOptions.from_flows(flow), broker=broker)
    run_id = await adapter.start_run("fan")
    while not broker.queue.empty():
        await adapter.deliver(adapter.handle_job, broker.queue.get_nowait())
    result = await adapter.get_final_result(run_id)
    assert result is not None
    assert result.status == "completed", result
    assert sorted(map(sorted, adapter.batches)) == [["b0", "b1", "b2"], ["s1", "s2"]]


class _ConcurrentFailing(InMemoryAdapter):
    concurrent_enqueues = True

    async def enqueue_job(self, job: Any) -> None:
        if job.node_id == "b1":
            raise ConnectionError("queue unreachable")
        await super().enqueue_job(job)


async def test_concurrent_enqueues_attempt_every_job_then_raise() -> None:
    flow = Flow("fan").node("s", _step)
    for i in range(3):
        flow.node(f"b{i}", _step).edge("s", f"b{i}")
    broker = InMemoryBroker()
    adapter = _ConcurrentFailing(runtime_options=RuntimeOptions.from_flows(flow), broker=broker)
    jobs = [JobPayload(run_id="r", blueprint_id="fan", node_id=f"b{i}") for i in range(3)]
    with pytest.raises(ConnectionError, match="unreachable"):
        await adapter.enqueue_jobs(jobs)
    queued = sorted(broker.queue.get_nowait().job.node_id for _ in range(broker.queue.qsize()))
    assert queued == ["b0", "b2"]


class _DeleteManyStore(InMemoryCoordinationStore):
    """A store with the optional ``delete_many``, recording each call."""

    def __init__(self) -> None:
        super().__init__()
        self.delete_many_calls: list[list[str]] = []

    async def delete_many(self, keys: list[str]) -> None:
        self.delete_many_calls.append(list(keys))
        for key in keys:
            await self.delete(key)


@pytest.mark.parametrize("delete_many", [True, False], ids=["delete_many", "one-by-one"])
async def test_a_finished_run_leaves_no_counters(delete_many: bool) -> None:
    """The end counter and a join's counters are deleted when the run ends: in one call
    on a store with ``delete_many``, one by one on a store without."""

    async def step(ctx: NodeContext) -> Any:
        return 1

    flow = Flow("tidy").node("a", "step").node("b1", "step").node("b2", "step").node("j", "step")
    flow.edge("a", "b1").edge("a", "b2").edge("b1", "j").edge("b2", "j")
    store = _DeleteManyStore() if delete_many else InMemoryCoordinationStore()
    adapter = InMemoryAdapter(
        runtime_options=RuntimeOptions(
            registry={"step": step}, blueprints={"tidy": flow.to_blueprint()}
        ),
        coordination_store=store,
    )
    worker = asyncio.ensure_future(adapter.worker())
    try:
        run_id = await adapter.start_run("tidy", {})
        result = await adapter.wait_for_result(run_id, timeout=10)
        assert result.status == "completed"
        p = adapter.key_prefix
        counters = (f"{p}join:", f"{p}fired:", f"{p}end:")
        left = [k for k in store.snapshot() if k.startswith(counters)]
        assert left == []
        if isinstance(store, _DeleteManyStore):
            assert len(store.delete_many_calls) == 1
            assert len(store.delete_many_calls[0]) >= 3  # the end counter, the join's
    finally:
        await adapter.stop()
        await worker
