"""Firestore emulator smoke tests with google-cloud-firestore's async client."""

from __future__ import annotations

import uuid

import pytest
from google.cloud import firestore

from flowcraft_backends import RestartUnsupported, RunningService
from flowcraft_backends.services.firestore import clear_documents

PROJECT = "flowcraft-smoke"


@pytest.fixture
def client(
    firestore_service: RunningService, monkeypatch: pytest.MonkeyPatch
) -> firestore.AsyncClient:
    # The client library switches to a plaintext channel and admin credentials with this.
    monkeypatch.setenv(
        "FIRESTORE_EMULATOR_HOST", firestore_service.extra["FIRESTORE_EMULATOR_HOST"]
    )
    return firestore.AsyncClient(project=PROJECT)


def _doc(client: firestore.AsyncClient) -> firestore.AsyncDocumentReference:
    return client.collection("smoke").document(uuid.uuid4().hex)


async def test_update_with_delete_field_removes_only_that_field(
    client: firestore.AsyncClient,
) -> None:
    ref = _doc(client)
    await ref.set({"status": "running", "owner": "worker-1"})

    await ref.update({"owner": firestore.DELETE_FIELD})

    snapshot = await ref.get()
    assert snapshot.exists
    assert snapshot.to_dict() == {"status": "running"}


async def test_increment_is_applied_by_the_server(client: firestore.AsyncClient) -> None:
    ref = _doc(client)
    await ref.set({"n": 1})
    for _ in range(5):
        await ref.update({"n": firestore.Increment(2)})
    snapshot = await ref.get()
    assert snapshot.get("n") == 11


async def test_clear_documents_empties_the_project(
    firestore_service: RunningService, client: firestore.AsyncClient
) -> None:
    ref = _doc(client)
    await ref.set({"x": 1})

    clear_documents(firestore_service.url, PROJECT)

    assert not (await ref.get()).exists


async def test_restart_answers_on_the_same_port(
    firestore_service: RunningService, client: firestore.AsyncClient
) -> None:
    if firestore_service.how != "local":
        with pytest.raises(RestartUnsupported):
            firestore_service.restart()
        return
    ref = _doc(client)
    await ref.set({"before": True})
    url_before = firestore_service.url

    firestore_service.restart()

    assert firestore_service.url == url_before
    # The emulator keeps data in memory only: the restarted one starts empty.
    assert not (await ref.get()).exists
    await ref.set({"after": True})
    assert (await ref.get()).to_dict() == {"after": True}
