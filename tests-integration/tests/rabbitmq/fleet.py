"""The RabbitMQ fleet the crash tests run: the diamond workflow and a worker process.

``python fleet.py`` runs one worker; its settings come from the environment
variable ``FLOWCRAFT_FLEET`` (JSON, see :func:`settings`). Every execution of the
join and every publication of a result is also written to an effects table, so
the test sees executions whose commit a crash lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg

from flowcraft import Flow, NodeContext, RuntimeOptions
from flowcraft.distributed.adapter import FinalResult
from flowcraft_rabbitmq import RabbitMQAdapter

BRANCHES = 16


@dataclass
class Settings:
    amqp_url: str
    postgres_dsn: str
    redis_url: str
    queue_name: str
    table: str
    key_prefix: str
    effects_table: str
    concurrency: int = 8
    lease_seconds: float = 2.0

    def adapter_options(self) -> dict[str, Any]:
        return {
            "amqp_url": self.amqp_url,
            "postgres_dsn": self.postgres_dsn,
            "redis_url": self.redis_url,
            "queue_name": self.queue_name,
            "table": self.table,
            "key_prefix": self.key_prefix,
            "concurrency": self.concurrency,
            "lease_seconds": self.lease_seconds,
            "retry_delay_seconds": 0.2,
            "reconcile_interval_seconds": 2.0,
            "stall_seconds": 10.0,
        }

    def to_env(self) -> dict[str, str]:
        return {"FLOWCRAFT_FLEET": json.dumps(asdict(self))}


def diamond() -> Flow:
    """start -> 16 parallel branches -> an ``all`` join -> end (blueprint only: ``uses`` keys)."""
    flow = Flow("diamond").node("start", "start").node("join", "join").node("end", "end")
    for i in range(BRANCHES):
        flow.node(f"b{i}", "branch", params={"i": i})
        flow.edge("start", f"b{i}").edge(f"b{i}", "join")
    return flow.edge("join", "end")


def blueprints() -> RuntimeOptions:
    bp = diamond().to_blueprint()
    return RuntimeOptions(blueprints={bp.id: bp})


class Effects:
    """Join executions and publications, as rows (run_id, node_id, key, n)."""

    def __init__(self, pool: Any, table: str) -> None:
        self.pool = pool
        self.table = table

    async def record(self, run_id: str, node_id: str, key: str, n: int) -> None:
        await self.pool.execute(
            f'INSERT INTO "{self.table}" (run_id, node_id, key, n, pid) '
            "VALUES ($1, $2, $3, $4, $5)",
            run_id,
            node_id,
            key,
            n,
            os.getpid(),
        )


def registry(effects: Effects) -> dict[str, Any]:
    async def start(ctx: NodeContext) -> int:
        return 0

    async def branch(ctx: NodeContext) -> int:
        await asyncio.sleep(0.001 * (ctx.params["i"] % 4))
        return int(ctx.params["i"]) + 1

    async def join(ctx: NodeContext) -> int:
        # The number of branch outputs the join saw: fewer than 16 is an early join.
        await effects.record(ctx.run_id, ctx.node_id, ctx.idempotency_key, len(ctx.input))
        return sum(ctx.input.values())

    async def end(ctx: NodeContext) -> int:
        return int(ctx.input)

    return {"start": start, "branch": branch, "join": join, "end": end}


async def create_effects_table(dsn: str, table: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            f'CREATE TABLE IF NOT EXISTS "{table}" (run_id text, node_id text, key text, '
            "n integer, pid integer)"
        )
    finally:
        await conn.close()


async def run_worker(settings: Settings, *, handle_sigterm: bool = False) -> None:
    pool = await asyncpg.create_pool(settings.postgres_dsn, min_size=1, max_size=4)
    effects = Effects(pool, settings.effects_table)
    options = RuntimeOptions(registry=registry(effects), blueprints=blueprints().blueprints)
    adapter = RabbitMQAdapter(runtime_options=options, **settings.adapter_options())
    publish = adapter.publish_final_result

    async def publish_final_result(run_id: str, result: FinalResult) -> None:
        await effects.record(run_id, "__publish__", json.dumps(result.to_json_dict()), 0)
        await publish(run_id, result)

    adapter.publish_final_result = publish_final_result  # type: ignore[method-assign]
    if handle_sigterm:  # a graceful stop: the jobs in hand finish
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(adapter.stop()))
    try:
        await adapter.worker()
    finally:
        await adapter.aclose()
        await pool.close()


def settings() -> Settings:
    return Settings(**json.loads(os.environ["FLOWCRAFT_FLEET"]))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(process)d %(name)s %(message)s")
    asyncio.run(run_worker(settings(), handle_sigterm=True))
