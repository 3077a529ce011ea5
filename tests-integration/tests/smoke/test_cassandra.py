"""Cassandra smoke test: lightweight transactions with prepared statements, restart()."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from cassandra import ProtocolVersion
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import DCAwareRoundRobinPolicy

from flowcraft_backends import RestartUnsupported, RunningService


def _connect(service: RunningService) -> Cluster:
    profile = ExecutionProfile(
        load_balancing_policy=DCAwareRoundRobinPolicy(
            local_dc=service.extra.get("local_datacenter", "datacenter1")
        ),
        request_timeout=30.0,
    )
    host, _, port = service.url.rpartition(":")
    return Cluster(
        [host],
        port=int(port),
        protocol_version=ProtocolVersion.V5,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
    )


@pytest.fixture
def session(cassandra_service: RunningService) -> Iterator[Session]:
    cluster = _connect(cassandra_service)
    session = cluster.connect()
    keyspace = f"smoke_{uuid.uuid4().hex[:12]}"
    session.execute(
        f"CREATE KEYSPACE {keyspace} "
        "WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
    )
    session.set_keyspace(keyspace)
    session.execute("CREATE TABLE jobs (id text PRIMARY KEY, owner text, attempt int)")
    try:
        yield session
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
        cluster.shutdown()


def test_insert_if_not_exists_applies_once(session: Session) -> None:
    insert = session.prepare("INSERT INTO jobs (id, owner, attempt) VALUES (?, ?, ?) IF NOT EXISTS")
    select = session.prepare("SELECT owner, attempt FROM jobs WHERE id = ?")

    first = session.execute(insert, ("job-1", "worker-a", 1))
    second = session.execute(insert, ("job-1", "worker-b", 2))

    assert first.was_applied is True
    assert second.was_applied is False
    existing = second.one()
    assert (existing.owner, existing.attempt) == ("worker-a", 1)  # the row that won
    row = session.execute(select, ("job-1",)).one()
    assert (row.owner, row.attempt) == ("worker-a", 1)


def test_conditional_update_checks_current_value(session: Session) -> None:
    session.execute(
        session.prepare("INSERT INTO jobs (id, owner, attempt) VALUES (?, ?, ?) IF NOT EXISTS"),
        ("job-2", "worker-a", 1),
    )
    bump = session.prepare("UPDATE jobs SET attempt = ? WHERE id = ? IF attempt = ?")

    assert session.execute(bump, (2, "job-2", 1)).was_applied is True
    stale = session.execute(bump, (2, "job-2", 1))
    assert stale.was_applied is False
    assert stale.one().attempt == 2


def test_restart_keeps_port_and_rows(cassandra_service: RunningService) -> None:
    if cassandra_service.how != "local":
        with pytest.raises(RestartUnsupported):
            cassandra_service.restart()
        return
    keyspace = f"smoke_{uuid.uuid4().hex[:12]}"
    cluster = _connect(cassandra_service)
    session = cluster.connect()
    session.execute(
        f"CREATE KEYSPACE {keyspace} "
        "WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
    )
    session.execute(f"CREATE TABLE {keyspace}.kv (k text PRIMARY KEY, v text)")
    session.execute(
        session.prepare(f"INSERT INTO {keyspace}.kv (k, v) VALUES (?, ?)"), ("k", "survives")
    )
    cluster.shutdown()
    url_before = cassandra_service.url

    cassandra_service.restart()

    assert cassandra_service.url == url_before
    cluster = _connect(cassandra_service)
    try:
        session = cluster.connect()
        row = session.execute(
            session.prepare(f"SELECT v FROM {keyspace}.kv WHERE k = ?"), ("k",)
        ).one()
        assert row is not None
        assert row.v == "survives"
        session.execute(f"DROP KEYSPACE {keyspace}")
    finally:
        cluster.shutdown()
