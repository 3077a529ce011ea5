"""``JobAdder`` stores a job exactly as ``Queue.add`` does (on a real Redis)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from bullmq import Queue

from flowcraft_bullmq._adding import JobAdder


@pytest.fixture
async def queue(redis_url: str, prefix: str) -> AsyncIterator[Queue]:
    q = Queue("adding", {"connection": redis_url, "prefix": f"{prefix}bull"})
    yield q
    await q.close()


@pytest.mark.parametrize(
    ("data", "opts"),
    [
        (
            {"runId": "r1", "blueprintId": "b", "nodeId": "n"},
            {"removeOnComplete": True, "removeOnFail": 10_000},
        ),
        (
            {"runId": "é 中文 🚀", "blueprintId": "b\"'", "nodeId": "n:{x}"},
            {
                "removeOnComplete": {"count": 5},
                "removeOnFail": False,
                "attempts": 3,
                "backoff": {"type": "exponential", "delay": 200},
            },
        ),
        ("\udcff not json", {"attempts": 2, "backoff": 1000}),
    ],
)
async def test_stored_like_queue_add(queue: Queue, data: Any, opts: dict[str, Any]) -> None:
    theirs = await queue.add("node", data, opts)
    ours_id = await JobAdder(queue).add("node", data, opts)
    assert ours_id != theirs.id
    client = queue.client
    stored = [await client.hgetall(queue.toKey(i)) for i in (theirs.id, ours_id)]
    for job in stored:
        assert job, "the job hash is missing"
        job.pop("timestamp")
    assert stored[0] == stored[1]
    assert await client.lrange(queue.toKey("wait"), 0, -1) == [ours_id, theirs.id]


@pytest.mark.parametrize(
    "opts", [{"delay": 10}, {"priority": 1}, {"jobId": "x"}, {"parent": {"id": "p", "queue": "q"}}]
)
async def test_refuses_what_it_does_not_build(queue: Queue, opts: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="plain jobs only"):
        await JobAdder(queue).add("node", {}, opts)
