"""Google Cloud Firestore (native mode): Google's own emulator, from google-cloud-cli.

Local process: ``cloud_firestore_emulator start --host=127.0.0.1 --port=PORT``, a bash
wrapper around a Java server (ready in about 3-10 s). Both run in one process group,
which stop() signals as a whole, so the Java child never outlives the wrapper. Data
lives in memory only: a restart starts empty. Docker: the pinned
``google-cloud-cli:<version>-emulators`` image.

Clients find the emulator through ``FIRESTORE_EMULATOR_HOST`` (``host:port``), which
``RunningService.extra`` carries; ``url`` is the same ``host:port``. Use
:func:`clear_documents` to empty a project between tests.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx

from flowcraft_backends.services.pubsub import GoogleEmulatorService, insecure_channel

__all__ = ["FirestoreService", "clear_documents"]

_log = logging.getLogger(__name__)

_PROBE_PARENT = "projects/flowcraft-probe/databases/(default)/documents"
#: The emulator treats this bearer token as an administrator (needed for metadata calls).
_ADMIN_METADATA = (("authorization", "Bearer owner"),)


def clear_documents(url: str, project: str, database: str = "(default)") -> None:
    """Delete every document of ``project`` in the emulator at ``url`` (``host:port``)."""
    endpoint = f"http://{url}/emulator/v1/projects/{project}/databases/{database}/documents"
    httpx.delete(endpoint, timeout=10.0).raise_for_status()


class FirestoreService(GoogleEmulatorService):
    """The Firestore emulator on ``127.0.0.1:PORT``."""

    name = "firestore"
    docker_port = 8080
    ready_timeout = 90.0
    install_hint = "apt google-cloud-cli-firestore-emulator (Google's repository) + Java"
    script = Path("platform/cloud-firestore-emulator/cloud_firestore_emulator")
    component = "google-cloud-cli-firestore-emulator"
    emulator_host_var = "FIRESTORE_EMULATOR_HOST"
    gcloud_start = "emulators firestore start"

    def emulator_args(self, port: int) -> list[str]:
        return ["start", *super().emulator_args(port)]

    def probe(self, url: str) -> None:
        from google.cloud.firestore_v1.services.firestore import FirestoreClient
        from google.cloud.firestore_v1.services.firestore.transports import (
            FirestoreGrpcTransport,
        )

        with insecure_channel(url) as channel:
            client = FirestoreClient(transport=FirestoreGrpcTransport(channel=channel))
            # One call, no retries (wait_ready retries); any answer, even empty, means ready.
            client.list_collection_ids(
                request={"parent": _PROBE_PARENT},
                retry=None,
                timeout=2.0,
                metadata=_ADMIN_METADATA,
            )
