"""``active_runs`` (``flowcraft runs``) on the real runs table: the unfinished runs
that do not wait for a resume, read without claiming them from the reconciler."""

from __future__ import annotations

import asyncio

from flowcraft import Flow, RuntimeOptions

from .conftest import Namespace

TIMEOUT = 30.0


async def test_active_runs_lists_running_runs_and_claims_nothing(namespace: Namespace) -> None:
    one = Flow("one").node("a", lambda c: 1)
    hold = Flow("hold").wait("w").node("b", lambda c: c.input).edge("w", "b")
    adapter = namespace.adapter(RuntimeOptions.from_flows(one, hold))
    task = asyncio.ensure_future(adapter.worker())
    try:
        done = await adapter.start_run("one")
        assert (await adapter.wait_for_result(done, TIMEOUT)).status == "completed"
        paused = await adapter.start_run("hold")
        async with asyncio.timeout(TIMEOUT):
            while True:
                if (await adapter.get_status(paused)).status == "awaiting":
                    break
                await asyncio.sleep(0.05)
    finally:
        await adapter.stop()
        await task
    # no worker now: these stay running, the first started is the least recently changed
    first = await adapter.start_run("one")
    second = await adapter.start_run("one")
    assert await adapter.active_runs() == [first, second]
    assert await adapter.active_runs(limit=1) == [first]
    # read only: the reconciler still claims both, and a claimed run is still listed
    assert sorted(await adapter.find_stalled_runs(0.0, 10)) == sorted([first, second])
    assert await adapter.active_runs() == [first, second]
