"""A BullMQ worker process for the multi-process and crash tests.

    python worker_proc.py REDIS_URL KEY_PREFIX [CONCURRENCY] [NODE_SLEEP_S]

Runs the "diamond" flow (start, 16 parallel branches, an ``all`` join, end). Every
node execution is counted in ``<prefix>test:execs`` (field ``run:node``); the join
checks it received all 16 branch outputs and that all 16 are committed in the run's
context, and records any violation in ``<prefix>test:violations``. SIGTERM stops the
worker gracefully.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import redis.asyncio as redis_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flowcraft import Flow, NodeContext, RuntimeOptions
from flowcraft_bullmq import BullMQAdapter

WIDTH = 16


def diamond(record: Any, sleep: float) -> Flow:
    def node(fn: Any) -> Any:
        async def run(ctx: NodeContext) -> Any:
            await record(ctx)
            if sleep:
                await asyncio.sleep(sleep)
            out = fn(ctx)
            return await out if asyncio.iscoroutine(out) else out

        return run

    async def join(ctx: NodeContext) -> int:
        inputs = ctx.input or {}
        committed = [await ctx.get(f"_outputs.b{i}") for i in range(WIDTH)]
        if sorted(inputs) != sorted(f"b{i}" for i in range(WIDTH)) or None in committed:
            await record.violation(f"{ctx.run_id}: join ran with {sorted(inputs)}, {committed}")
        return sum(inputs.values())

    flow = Flow("diamond").node("start", node(lambda c: 1)).node("join", node(join))
    flow.node("end", node(lambda c: c.input * 2))
    for i in range(WIDTH):
        flow.node(f"b{i}", node(lambda c, i=i: c.input + i))
        flow.edge("start", f"b{i}").edge(f"b{i}", "join")
    return flow.edge("join", "end")


class Recorder:
    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    async def __call__(self, ctx: NodeContext) -> None:
        await self.client.hincrby(f"{self.prefix}test:execs", f"{ctx.run_id}:{ctx.node_id}", 1)

    async def violation(self, text: str) -> None:
        await self.client.rpush(f"{self.prefix}test:violations", text)


def options(flow: Flow) -> RuntimeOptions:
    return RuntimeOptions.from_flows(flow)


async def main(url: str, prefix: str, concurrency: int, sleep: float) -> None:
    # The test's own bookkeeping must outlast a Redis restart (the restart test):
    # retry connection errors for up to ~30 s instead of failing the node.
    client = redis_asyncio.Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 40),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, BusyLoadingError],
    )
    flow = diamond(Recorder(client, prefix), sleep)
    worker = BullMQAdapter(
        runtime_options=options(flow),
        connection=url,
        key_prefix=prefix,
        concurrency=concurrency,
        reconcile_interval_seconds=None,
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(worker.stop()))
    task = asyncio.ensure_future(worker.worker())
    print("ready", flush=True)
    await task
    await worker.aclose()
    await client.aclose()


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(
        main(
            args[0],
            args[1],
            int(args[2]) if len(args) > 2 else 16,
            float(args[3]) if len(args) > 3 else 0.0,
        )
    )
