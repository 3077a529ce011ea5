"""The README's quick start, run as written: its three files (the python blocks that
open with ``# file: NAME``), a worker process and the client, against Azurite, the
Cosmos DB test server and Redis, with the addresses in the environment."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path

from azure.cosmos.exceptions import CosmosResourceNotFoundError

from .conftest import Namespace

README = Path(__file__).parents[1] / "README.md"
BLOCK = re.compile(r"```python\n# file: (\w+\.py)\n(.*?)```", re.S)


async def test_quick_start_runs_as_written(namespace: Namespace, tmp_path: Path) -> None:
    files = dict(BLOCK.findall(README.read_text(encoding="utf-8")))
    assert sorted(files) == ["client.py", "orders.py", "worker.py"]
    for name, code in files.items():
        (tmp_path / name).write_text(code, encoding="utf-8")
    backends = namespace.backends
    env = {
        **os.environ,
        "AZURE_STORAGE_CONNECTION_STRING": backends.storage_connection_string,
        "COSMOS_URL": backends.cosmos_url,
        "COSMOS_KEY": backends.cosmos_key,
        "COSMOS_EMULATOR": "1",
        "REDIS_URL": backends.redis_url,
        "FLOWCRAFT_QUEUE": namespace.queue_name,
        "FLOWCRAFT_CONTAINER": namespace.container,
    }
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "worker.py", cwd=tmp_path, env=env
    )
    try:
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            "client.py",
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(client.communicate(), 120)
        assert client.returncode == 0, err.decode()
        assert out.decode().strip() == "completed ann: needs a human"
    finally:
        worker.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(worker.wait(), 60)
        async with backends.cosmos_client() as cosmos:  # the README's database
            with contextlib.suppress(CosmosResourceNotFoundError):
                await cosmos.get_database_client("flowcraft").delete_container(namespace.container)
    assert code == 0, "the worker did not stop gracefully on SIGTERM"
