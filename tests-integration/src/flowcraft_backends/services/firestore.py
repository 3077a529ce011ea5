"""Google Cloud Firestore (native mode): Google's own emulator, from google-cloud-cli.

Local process: what ``cloud_firestore_emulator start --host=127.0.0.1 --port=PORT`` runs
(a bash wrapper around a Java server; ready in about 3-10 s). Java is started directly
when the wrapper is the known one, else the wrapper is; either way everything runs in
one process group, which stop() signals as a whole, so Java never outlives a stop.
Data lives in memory only: a restart starts empty. Docker: the pinned
``google-cloud-cli:<version>-emulators`` image.

Clients find the emulator through ``FIRESTORE_EMULATOR_HOST`` (``host:port``), which
``RunningService.extra`` carries; ``url`` is the same ``host:port``. Use
:func:`clear_documents` to empty a project between tests.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import httpx

from flowcraft_backends.services.pubsub import GoogleEmulatorService, insecure_channel

__all__ = ["FirestoreService", "clear_documents"]

_log = logging.getLogger(__name__)

_MAIN_CLASS = "com.google.cloud.datastore.emulator.firestore.CloudFirestore"
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

    def command(self, script: Path, port: int) -> list[str]:
        args = ["start", "--host=127.0.0.1", f"--port={port}"]
        # The launcher is a bash script that runs Java as its child, not with exec. Stopping
        # the process group then leaves the dead Java process to init, which here reaps it
        # only after 1-2 s. Run Java the same way directly when the script is the one we
        # know (it names the jar and main class), so Java leads the group and is reaped at
        # once; otherwise run the script.
        jar = script.parent / "cloud-firestore-emulator.jar"
        java = shutil.which("java")
        if java and jar.is_file() and _MAIN_CLASS in script.read_text(errors="replace"):
            return [java, "-Duser.language=en", "-cp", str(jar), _MAIN_CLASS, *args]
        return [str(script), *args]

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
