"""Bad jobs put on the queue with Azure's own client (not the adapter): raw garbage, an
unknown blueprint, an unknown node. Each is dead-lettered to the poison queue with its
reason while the worker keeps running, and a good run still completes after them."""

from __future__ import annotations

import asyncio
import json

from azure.storage.queue.aio import QueueClient

from flowcraft import RuntimeOptions
from flowcraft_backends.crash_fleet import blueprints

from .azure_fleet import Settings

# Queue messages are XML text: a body with a control character is not delivered by
# Azurite at all (the send succeeds, the receive never returns it), so garbage here is
# text that is not a job.
BAD = {
    "garbage <&> \ufffd {": "PayloadDecodeError",
    '{"runId": "r1"}': "PayloadDecodeError",
    "": "PayloadDecodeError",
    json.dumps({"runId": "r2", "blueprintId": "nope", "nodeId": "start"}): (
        "UnknownBlueprintError"
    ),
    "[" * 5000 + "]" * 5000: "PayloadDecodeError",
    '{"runId": "\\udc00", "blueprintId": "diamond", "nodeId": "start"}': "PayloadDecodeError",
    '{"runId": "r", "blueprintId": 7, "nodeId": "start"}': "PayloadDecodeError",
    '{"runId": "r", "blueprintId": "diamond", "nodeId": "start", "x": 1}': "PayloadDecodeError",
    '"just a string"': "PayloadDecodeError",
    # A node of a run that was never started: the base reports the unknown run first.
    json.dumps({"runId": "r3", "blueprintId": "diamond", "nodeId": "nope"}): "Unknown",
}


async def test_bad_jobs_are_dead_lettered_and_the_worker_keeps_running(
    settings: Settings,
) -> None:
    async with QueueClient.from_connection_string(
        settings.storage_connection_string, settings.queue_name
    ) as raw:  # Azure's own client, not the adapter's
        for body in BAD:
            await raw.send_message(body)
    ids = {"start": 0, "branch": 1, "join": 2, "end": 3}
    registry = {name: (lambda value: lambda ctx: value)(v) for name, v in ids.items()}
    options = RuntimeOptions(registry=registry, blueprints=blueprints().blueprints)
    adapter = settings.adapter(options)
    worker = asyncio.ensure_future(adapter.worker())
    try:
        async with asyncio.timeout(60):
            while True:
                letters = await adapter.dead_letters()
                if len(letters) >= len(BAD):
                    break
                assert not worker.done(), worker
                await asyncio.sleep(0.2)
        assert len(letters) == len(BAD)
        for body, error in BAD.items():
            assert [x for x in letters if x.body == body and x.reason.startswith(error)], (
                body,
                error,
                letters,
            )
        assert not worker.done(), "the worker stopped"
        run = await adapter.start_run("diamond")
        result = await adapter.wait_for_result(run, 60)
        assert result.status == "completed", result.errors
        assert not worker.done()
    finally:
        await adapter.stop()
        await asyncio.wait_for(worker, 30)
        await adapter.aclose()
