"""FirestoreContext on Google's Firestore emulator: one write per patch carrying only the
delta, hostile keys and values round-trip exactly, partial reads, the 1 MiB limit as
StateLimitError, the guarded patch through the update_time precondition."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from flowcraft import StateLimitError
from flowcraft.context import PatchOperation
from flowcraft.testing.adapter import HOSTILE_KEYS
from flowcraft_gcp import FirestoreContext, GcpClients, RunCollection
from flowcraft_gcp.context import document_id

EXTRA_KEYS = [
    "",
    "__name__",
    "__flowcraft__",
    "`",
    "a`b\\c`",
    "nul \x00 byte",
    "#hash",
    "slash/and/more",
    "astral 𝄞 🚀 👩‍👩‍👧",
    "c.k.`x`",
    "h" + "0" * 64,
    "x" * 2000,  # past Firestore's 1,500-byte field path: stored under a hash
    "é" * 800,  # 1,600 bytes of UTF-8
]

VALUES: list[Any] = [
    2**70,
    -(2**63) - 1,
    1e16,
    1e308,
    0.1,
    5e-324,
    -0.0,
    "",
    "astral 𝄞 🚀",
    [],
    [[1, [2, [3]]], None],
    {"__name__": 1, "a.b": {"`": None}, "": True},
    None,
    False,
]


@pytest.fixture
def runs(clients: GcpClients) -> RunCollection:
    return RunCollection(clients, max_state_bytes=200_000)


@pytest.fixture
async def other(clients: GcpClients) -> AsyncIterator[GcpClients]:
    """Clients of "another process" on the same project."""
    made = GcpClients(clients.project)
    yield made
    await made.aclose()


@pytest.fixture
def ctx(runs: RunCollection) -> FirestoreContext:
    return runs.context(f"run-{uuid.uuid4().hex[:8]}")


async def _raw(ctx: FirestoreContext) -> dict[str, Any]:
    snapshot = await ctx.runs.document(ctx.run_id).get()
    return snapshot.to_dict() or {}


async def test_hostile_keys_round_trip(ctx: FirestoreContext) -> None:
    keys = [*HOSTILE_KEYS, *EXTRA_KEYS]
    values = {k: {"for": k, "list": [1, 2.5, None, True]} for k in keys}
    await ctx.patch([PatchOperation.set(k, v) for k, v in values.items()])
    assert await ctx.to_dict() == values
    assert await ctx.get_many(keys) == values
    for key in keys:
        assert await ctx.get(key) == values[key]
        assert await ctx.has(key)
    assert await ctx.get_many(["absent", keys[0]]) == {keys[0]: values[keys[0]]}
    assert not await ctx.has("absent")
    await ctx.patch([PatchOperation.delete(k) for k in keys[::2]])
    assert await ctx.to_dict() == {k: values[k] for k in keys[1::2]}


@pytest.mark.parametrize("value", VALUES, ids=repr)
async def test_values_round_trip_exactly(ctx: FirestoreContext, value: Any) -> None:
    await ctx.set("v", value)
    got = await ctx.get("v")
    assert got == value
    assert type(got) is type(value)
    assert await ctx.has("v")
    assert await ctx.to_dict() == {"v": value}


async def test_patch_is_one_write_of_the_delta(ctx: FirestoreContext) -> None:
    requests = ctx.runs.clients.requests
    await ctx.patch([PatchOperation.set(f"k{i}", "x" * 1000) for i in range(50)])
    requests.clear()
    await ctx.patch([PatchOperation.set("k1", 1), PatchOperation.delete("k2")])
    assert dict(requests) == {"firestore.commit": 1}
    raw = await _raw(ctx)
    assert raw["r"] == ctx.run_id
    assert raw["c"]["kk1"] == "1"
    assert "kk2" not in raw["c"]
    assert len(raw["c"]) == 49
    requests.clear()
    assert await ctx.get_many(["k1", "k3", "nope"]) == {"k1": 1, "k3": "x" * 1000}
    assert dict(requests) == {"firestore.get": 1}


async def test_last_operation_on_a_key_wins(ctx: FirestoreContext) -> None:
    await ctx.set("a", 1)
    await ctx.patch(
        [PatchOperation.set("a", 2), PatchOperation.delete("a"), PatchOperation.set("b", 1)]
    )
    assert await ctx.to_dict() == {"b": 1}
    await ctx.patch([PatchOperation.delete("b"), PatchOperation.set("b", 3)])
    assert await ctx.to_dict() == {"b": 3}
    await ctx.delete("b")
    assert await ctx.to_dict() == {}
    assert await ctx.get("b") is None


async def test_a_patch_that_cannot_fit_is_refused_before_writing(ctx: FirestoreContext) -> None:
    await ctx.set("small", "x")
    with pytest.raises(StateLimitError, match=r"'huge'.*") as failure:
        await ctx.patch([PatchOperation.set("huge", "y" * 300_000), PatchOperation.set("o", 1)])
    assert ctx.run_id in str(failure.value)
    assert await ctx.to_dict() == {"small": "x"}


async def test_firestore_refusal_of_a_large_state_is_state_limit_error(
    clients: GcpClients,
) -> None:
    runs = RunCollection(clients)  # the real limit: 1 MiB per document
    ctx = runs.context("big")
    await ctx.set("a", "x" * 600_000)
    with pytest.raises(StateLimitError, match="1 MiB") as failure:
        await ctx.patch([PatchOperation.set("b", "y" * 600_000), PatchOperation.set("c", 1)])
    assert "'big'" in str(failure.value)
    assert set(await ctx.to_dict()) == {"a"}
    # the guarded path says the same
    with pytest.raises(StateLimitError, match="1 MiB"):
        await ctx.patch([PatchOperation.set("b", "y" * 600_000)], guard={"b": None})
    assert set(await ctx.to_dict()) == {"a"}


@pytest.mark.parametrize(
    "run_id", ["a/b", ".", "..", "__x__", "ü" * 600, "with space", "", "~abc", "x" * 300]
)
async def test_awkward_run_ids_get_their_own_document(runs: RunCollection, run_id: str) -> None:
    ctx = runs.context(run_id)
    await ctx.set("k", run_id)
    assert await runs.context(run_id).get("k") == run_id
    assert (await _raw(ctx))["r"] == run_id
    other = runs.context(run_id + "-")
    assert await other.get("k") is None
    assert document_id(run_id) != document_id(run_id + "-")
    assert "/" not in document_id(run_id)


# ---------------------------------------------------------------- the guarded patch


async def test_guard_absent_key(ctx: FirestoreContext) -> None:
    assert await ctx.patch([PatchOperation.set("a", 1)], guard={"_flowcraft.n.X": None})
    assert await ctx.get("a") == 1
    await ctx.set("_flowcraft.n.X", 1)
    assert not await ctx.patch([PatchOperation.set("a", 2)], guard={"_flowcraft.n.X": None})
    assert await ctx.get("a") == 1


async def test_guard_on_a_document_that_does_not_exist(ctx: FirestoreContext) -> None:
    assert not await ctx.patch([PatchOperation.set("a", 1)], guard={"n": 0})
    assert await ctx.to_dict() == {}
    assert await ctx.patch(
        [PatchOperation.set("n", 1), PatchOperation.delete("gone")], guard={"n": None}
    )
    assert await ctx.to_dict() == {"n": 1}


async def test_guard_equal_and_not_equal(ctx: FirestoreContext) -> None:
    await ctx.patch([PatchOperation.set("n", 2), PatchOperation.set("s", "abc")])
    assert not await ctx.patch([PatchOperation.set("x", 1)], guard={"n": 3})
    assert not await ctx.patch([PatchOperation.set("x", 1)], guard={"s": "abd"})
    assert not await ctx.patch([PatchOperation.set("x", 1)], guard={"n": 2, "s": "zzz"})
    assert await ctx.get("x") is None
    assert await ctx.patch([PatchOperation.set("n", 3)], guard={"n": 2, "s": "abc"})
    assert await ctx.get("n") == 3


@pytest.mark.parametrize(
    ("stored", "expected"),
    [("3", 3), (3.0, 3), (True, 1), ([3], 3), ({"v": 3}, 3), (3, "3"), (None, 0), ("", 0)],
)
async def test_guard_wrong_type_never_matches(
    ctx: FirestoreContext, stored: Any, expected: int | str
) -> None:
    await ctx.set("k", stored)
    assert not await ctx.patch([PatchOperation.set("w", 1)], guard={"k": expected})
    assert await ctx.get("w") is None


async def test_guard_key_written_by_the_same_ops(ctx: FirestoreContext) -> None:
    await ctx.set("_flowcraft.n.X", 2)
    assert await ctx.patch(
        [PatchOperation.set("_flowcraft.n.X", 3), PatchOperation.set("_outputs.X", "out")],
        guard={"_flowcraft.n.X": 2},
    )
    assert not await ctx.patch(
        [PatchOperation.set("_flowcraft.n.X", 3), PatchOperation.set("_outputs.X", "late")],
        guard={"_flowcraft.n.X": 2},
    )
    assert await ctx.get_many(["_flowcraft.n.X", "_outputs.X"]) == {
        "_flowcraft.n.X": 3,
        "_outputs.X": "out",
    }


async def test_guard_with_hostile_key_names(ctx: FirestoreContext) -> None:
    keys = [k for k in [*HOSTILE_KEYS, *EXTRA_KEYS] if k]
    await ctx.patch([PatchOperation.set(k, i) for i, k in enumerate(keys)])
    fresh = ctx.runs.context(ctx.run_id)
    assert await fresh.patch(
        [PatchOperation.set("ok", 1)], guard={k: i for i, k in enumerate(keys)}
    )
    assert not await fresh.patch([PatchOperation.set("ok", 2)], guard={keys[-1]: -1})
    assert await fresh.get("ok") == 1


async def test_guard_after_a_read_needs_no_extra_read(
    ctx: FirestoreContext, other: GcpClients
) -> None:
    requests = ctx.runs.clients.requests
    await ctx.set("n", 1)
    requests.clear()
    assert await ctx.get_many(["n", "meta"]) == {"n": 1}
    assert await ctx.patch([PatchOperation.set("n", 2)], guard={"n": 1})
    assert await ctx.patch([PatchOperation.set("n", 3)], guard={"n": 2})
    assert dict(requests) == {"firestore.get": 1, "firestore.commit": 2}
    # a write by this process in between: known stale, so one read, then the commit
    await ctx.runs.context(ctx.run_id).set("other", 1)
    requests.clear()
    assert await ctx.patch([PatchOperation.set("n", 4)], guard={"n": 3})
    assert dict(requests) == {"firestore.get": 1, "firestore.commit": 1}
    # a write by another process in between: the precondition fails, a read, the commit
    await RunCollection(other).context(ctx.run_id).set("other", 2)
    requests.clear()
    assert await ctx.patch([PatchOperation.set("n", 5)], guard={"n": 4})
    assert dict(requests) == {"firestore.get": 1, "firestore.commit": 2}
    assert await ctx.to_dict() == {"n": 5, "other": 2}


async def test_a_stale_remembered_read_is_not_trusted(
    ctx: FirestoreContext, other: GcpClients
) -> None:
    await ctx.set("n", 1)
    assert await ctx.get("n") == 1
    await RunCollection(other).context(ctx.run_id).set("n", 2)
    # remembered n == 1 is stale: the precondition fails, the fresh read decides
    assert not await ctx.patch([PatchOperation.set("x", 1)], guard={"n": 1})
    assert await ctx.patch([PatchOperation.set("x", 1)], guard={"n": 2})
    assert await ctx.get("x") == 1


async def test_local_racers_line_up_instead_of_retrying(runs: RunCollection) -> None:
    """A fan-out's branches in one process: each guarded commit costs one commit and at
    most one read, not a precondition race lost to every sibling."""
    run_id = f"fan-{uuid.uuid4().hex[:6]}"
    await runs.context(run_id).set("start", 1)
    contexts = [runs.context(run_id) for _ in range(16)]
    await asyncio.gather(*(c.get_many([f"n.b{i}"]) for i, c in enumerate(contexts)))
    runs.clients.requests.clear()
    applied = await asyncio.gather(
        *(
            c.patch([PatchOperation.set(f"n.b{i}", 1)], guard={f"n.b{i}": None})
            for i, c in enumerate(contexts)
        )
    )
    assert all(applied)
    assert runs.clients.requests["firestore.commit"] == 16
    assert runs.clients.requests["firestore.get"] <= 15


async def test_concurrent_racers_exactly_one_wins(runs: RunCollection) -> None:
    run_id = f"race-{uuid.uuid4().hex[:6]}"
    await runs.context(run_id).set("_flowcraft.n.X", 0)

    async def racer(i: int) -> bool:
        ctx = runs.context(run_id)
        await ctx.get("_flowcraft.n.X")
        return await ctx.patch(
            [PatchOperation.set("_flowcraft.n.X", 1), PatchOperation.set("winner", i)],
            guard={"_flowcraft.n.X": 0},
        )

    outcomes = await asyncio.gather(*(racer(i) for i in range(20)))
    assert outcomes.count(True) == 1
    state = await runs.context(run_id).to_dict()
    assert state == {"_flowcraft.n.X": 1, "winner": outcomes.index(True)}


async def test_concurrent_guarded_increments_lose_nothing(runs: RunCollection) -> None:
    """Racers that retry on a lost guard: every increment lands exactly once."""
    run_id = f"inc-{uuid.uuid4().hex[:6]}"
    await runs.context(run_id).set("n", 0)

    async def bump(i: int) -> None:
        ctx = runs.context(run_id)
        while True:
            n = await ctx.get("n")
            if await ctx.patch(
                [PatchOperation.set("n", n + 1), PatchOperation.set(f"by{i}", n + 1)],
                guard={"n": n},
            ):
                return

    await asyncio.gather(*(bump(i) for i in range(15)))
    state = await runs.context(run_id).to_dict()
    assert state["n"] == 15
    assert sorted(v for k, v in state.items() if k.startswith("by")) == list(range(1, 16))


async def test_stalled_runs_are_found_by_their_last_write(runs: RunCollection) -> None:
    def status(value: str) -> PatchOperation:
        return PatchOperation.set("_flowcraft.status", {"status": value, "errors": []})

    running, ended, waiting, late = (runs.context(f"{n}-{uuid.uuid4().hex[:6]}") for n in "rewl")
    await running.patch([status("running"), PatchOperation.set("x", 1)])
    await waiting.patch([status("running")])
    await waiting.patch([status("awaiting")])
    for ctx in (ended, late):
        await ctx.patch([status("running")])
        await ctx.patch([status("completed"), PatchOperation.set("_flowcraft.end", "completed")])
    await late.patch([PatchOperation.set("_outputs.branch", 1)])  # a late branch after the end
    assert "a" not in await _raw(ended)
    assert "a" in await _raw(late)
    await asyncio.sleep(0.05)
    assert sorted(await runs.stalled(0, 100)) == [running.run_id]
    assert "a" not in await _raw(late), "an ended run leaves the index when found"
    assert await runs.stalled(3600, 100) == []
    # a guarded write keeps the index too
    assert await running.patch([PatchOperation.set("y", 1)], guard={"x": 1})
    assert await runs.stalled(3600, 100) == []
    await asyncio.sleep(0.05)
    assert await runs.stalled(0, 100) == [running.run_id]


async def test_a_jobs_reads_add_up_for_its_fenced_commit(ctx: FirestoreContext) -> None:
    """A job reads its node's count, then its inputs, then commits guarded on the count
    and the run's end marker: two reads of one version answer the guard, no third."""
    await ctx.patch([PatchOperation.set("_flowcraft.n.X", 1), PatchOperation.set("in", 5)])
    requests = ctx.runs.clients.requests
    requests.clear()
    assert await ctx.get_many(["_flowcraft.meta", "_flowcraft.n.X"]) == {"_flowcraft.n.X": 1}
    assert await ctx.get_many(["in"]) == {"in": 5}
    assert await ctx.patch(
        [PatchOperation.set("_flowcraft.n.X", 2)],
        guard={"_flowcraft.n.X": 1, "_flowcraft.end": None},
    )
    assert dict(requests) == {"firestore.get": 2, "firestore.commit": 1}


async def test_to_dict_is_in_key_order(ctx: FirestoreContext) -> None:
    """Two readings of one state give the same JSON (a republished result compares equal)."""
    keys = [f"k{i}" for i in range(40)] + ["_outputs.z", "a", "é"]
    await ctx.patch([PatchOperation.set(k, 1) for k in reversed(keys)])
    assert list(await ctx.to_dict()) == sorted(keys)
