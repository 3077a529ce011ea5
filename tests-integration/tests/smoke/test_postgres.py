"""PostgreSQL smoke test: a jsonb update at a parameterised path (asyncpg)."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from flowcraft_backends import RestartUnsupported, RunningService


async def test_jsonb_set_with_parameterised_path(postgres_service: RunningService) -> None:
    conn = await asyncpg.connect(postgres_service.url)
    table = f"smoke_{uuid.uuid4().hex[:12]}"
    try:
        await conn.execute(f"CREATE TABLE {table} (id text PRIMARY KEY, doc jsonb NOT NULL)")
        await conn.execute(
            f"INSERT INTO {table} VALUES ($1, $2::jsonb)",
            "run-1",
            json.dumps({"nodes": {"a": {"status": "pending"}}, "keep": 1}),
        )
        updated = await conn.fetchval(
            f"UPDATE {table} SET doc = jsonb_set(doc, $1::text[], $2::jsonb, true) "
            "WHERE id = $3 RETURNING doc",
            ["nodes", "a", "status"],
            json.dumps("done"),
            "run-1",
        )
        assert json.loads(updated) == {"nodes": {"a": {"status": "done"}}, "keep": 1}
        status = await conn.fetchval(
            f"SELECT doc #>> $1::text[] FROM {table} WHERE id = $2",
            ["nodes", "a", "status"],
            "run-1",
        )
        assert status == "done"
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


async def test_restart_keeps_port_and_data(postgres_service: RunningService) -> None:
    if postgres_service.how != "local":
        with pytest.raises(RestartUnsupported):
            postgres_service.restart()
        return
    table = f"smoke_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(postgres_service.url)
    await conn.execute(f"CREATE TABLE {table} AS SELECT 42 AS answer")
    await conn.close()

    postgres_service.restart()

    conn = await asyncpg.connect(postgres_service.url)
    try:
        assert await conn.fetchval(f"SELECT answer FROM {table}") == 42
    finally:
        await conn.execute(f"DROP TABLE {table}")
        await conn.close()
