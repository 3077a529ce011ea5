"""The SQS fleet the crash test runs: the diamond workflow and a worker process.

``python sqs_fleet.py`` runs one worker with the settings in the environment variable
``FLOWCRAFT_SQS_FLEET`` (JSON, see :class:`Settings`). Every node execution and every
publication is appended to an effects file (one JSON line each), so the test also sees
executions whose commit a SIGKILL lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from dataclasses import asdict, dataclass
from typing import Any

from flowcraft import Flow, NodeContext, RuntimeOptions
from flowcraft.distributed.adapter import FinalResult
from flowcraft_sqs import AwsSettings, SqsAdapter

BRANCHES = 16


@dataclass
class Settings:
    endpoint_url: str
    region: str
    access_key: str
    queue_url: str
    table: str
    namespace: str
    effects_path: str
    concurrency: int = 8

    def aws(self) -> AwsSettings:
        return AwsSettings(
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.access_key,
        )

    def adapter(self, options: RuntimeOptions) -> SqsAdapter:
        return SqsAdapter(
            runtime_options=options,
            queue_url=self.queue_url,
            table_name=self.table,
            namespace=self.namespace,
            key_prefix=f"{self.namespace}:",
            aws=self.aws(),
            concurrency=self.concurrency,
            wait_time_seconds=1,
            visibility_timeout=3,
            lease_seconds=2.0,
            retry_delay_seconds=0.2,
            reconcile_interval_seconds=2.0,
            stalled_after_seconds=10.0,
        )

    def to_env(self) -> dict[str, str]:
        return {"FLOWCRAFT_SQS_FLEET": json.dumps(asdict(self))}


def diamond() -> Flow:
    """start -> 16 branches -> an ``all`` join -> end (blueprint only: ``uses`` keys)."""
    flow = Flow("diamond").node("start", "start").node("join", "join").node("end", "end")
    for i in range(BRANCHES):
        flow.node(f"b{i}", "branch", params={"i": i})
        flow.edge("start", f"b{i}").edge(f"b{i}", "join")
    return flow.edge("join", "end")


def blueprints() -> RuntimeOptions:
    bp = diamond().to_blueprint()
    return RuntimeOptions(blueprints={bp.id: bp})


class Effects:
    """Appends one JSON line per node execution or publication (O_APPEND: lines of
    several processes never interleave; a killed writer may leave a torn last line)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(self, run_id: str, node_id: str, key: str, n: int) -> None:
        line = json.dumps({"run": run_id, "node": node_id, "key": key, "n": n, "pid": os.getpid()})
        os.write(self.fd, (line + "\n").encode())


def read_effects(path: str) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # torn by a SIGKILL
    return rows


def registry(effects: Effects) -> dict[str, Any]:
    async def start(ctx: NodeContext) -> int:
        effects.record(ctx.run_id, ctx.node_id, ctx.idempotency_key, 0)
        return 0

    async def branch(ctx: NodeContext) -> int:
        await asyncio.sleep(0.005 * (ctx.params["i"] % 4))
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


async def run_worker(settings: Settings) -> None:
    effects = Effects(settings.effects_path)
    options = RuntimeOptions(registry=registry(effects), blueprints=blueprints().blueprints)
    adapter = settings.adapter(options)
    publish = adapter.publish_final_result

    async def publish_final_result(run_id: str, result: FinalResult) -> None:
        effects.record(run_id, "__publish__", json.dumps(result.to_json_dict()), 0)
        await publish(run_id, result)

    adapter.publish_final_result = publish_final_result  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(adapter.stop()))
    try:
        await adapter.worker()
    finally:
        await adapter.aclose()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(process)d %(name)s %(message)s")
    asyncio.run(run_worker(Settings(**json.loads(os.environ["FLOWCRAFT_SQS_FLEET"]))))
