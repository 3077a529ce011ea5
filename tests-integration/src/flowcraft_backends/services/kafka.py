"""Apache Kafka: the real broker in KRaft mode, run from Maven Central's jars.

Local process: one JVM that is both broker and controller (``process.roles=
broker,controller``), its ``kafka_2.13`` jars resolved by :mod:`flowcraft_backends._maven`
and started as ``java @jvm.args kafka.Kafka server.properties``. The storage
directory is formatted once (``kafka.tools.StorageTool format``) with a fresh
cluster id, so ``restart()`` keeps topics, messages and committed offsets. The
controller listens on a second port, reserved with the client port. Needs Java 17
or newer (Kafka 4 brokers do); ready in about 3 s once the jars are cached.

Settings for one test node: every internal topic has replication factor 1, the
group coordinator does not wait before the first rebalance, and the offsets and
transaction-state topics have one partition each so that they are created fast.

``url`` is the bootstrap address ``host:port``. Docker: the pinned
``apache/kafka`` image, configured with the same settings and advertising the
host port that Docker mapped.
"""

from __future__ import annotations

import base64
import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowcraft_backends._install import InstallError, run_checked
from flowcraft_backends._java import JvmService, write_argfile
from flowcraft_backends._maven import Artifact
from flowcraft_backends._process import LocalProcess
from flowcraft_backends._service import BackendUnavailable

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

__all__ = [
    "ARTIFACTS",
    "KAFKA_VERSION",
    "KafkaService",
    "broker_properties",
    "new_cluster_id",
]

_log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
#: Java needed by the broker (Kafka 4 brokers need 17).
JAVA_MINIMUM = 17

#: The broker and the SLF4J binding for the Log4j 2 that Kafka 4 logs with.
ARTIFACTS = (
    Artifact("org.apache.kafka", "kafka_2.13", KAFKA_VERSION),
    Artifact("org.apache.logging.log4j", "log4j-slf4j-impl", "2.24.3"),
)

_JVM_OPTIONS = (
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)

_LOG4J2 = """\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.controller.name = org.apache.kafka.controller
logger.controller.level = INFO
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
"""

#: The image's internal listeners (the client port is mapped; these stay inside).
_DOCKER_CLIENT_PORT = 9092
_DOCKER_BROKER_PORT = 19092
_DOCKER_CONTROLLER_PORT = 9093
_DOCKER_START_SCRIPT = "/flowcraft-start.sh"

#: Settings shared by the local broker and the Docker image.
_TEST_SETTINGS: dict[str, str] = {
    "num.partitions": "1",
    "default.replication.factor": "1",
    "min.insync.replicas": "1",
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "group.initial.rebalance.delay.ms": "0",
    "auto.create.topics.enable": "true",
    "delete.topic.enable": "true",
}


def new_cluster_id() -> str:
    """A random KRaft cluster id (a UUID in URL-safe base64, as Kafka prints them)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):  # Kafka never hands out ids a CLI would take for a flag
            return text


def broker_properties(port: int, controller_port: int, log_dir: Path) -> dict[str, str]:
    """``server.properties`` for a single combined broker and controller on 127.0.0.1."""
    return {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(log_dir),
        **_TEST_SETTINGS,
    }


def _render_properties(values: dict[str, str]) -> str:
    return "".join(f"{key}={value}\n" for key, value in values.items())


class KafkaService(JvmService):
    """A single-node KRaft Kafka broker on ``127.0.0.1:PORT``."""

    name = "kafka"
    docker_image = f"apache/kafka:{KAFKA_VERSION}"
    docker_port = _DOCKER_CLIENT_PORT
    ready_timeout = 90.0
    install_hint = f"Maven Central org.apache.kafka:kafka_2.13:{KAFKA_VERSION} + Java 17"

    artifacts = ARTIFACTS
    java_minimum = JAVA_MINIMUM

    def _argfile(self, workdir: Path) -> tuple[Path, Path]:
        """The ``java`` launcher and the argument file with options and classpath."""
        java, _, classpath = self.jvm()
        log4j = workdir / "log4j2.properties"
        log4j.write_text(_LOG4J2)
        options = [*_JVM_OPTIONS, f"-Dlog4j2.configurationFile={log4j}"]
        return java, write_argfile(workdir / "jvm.args", options, classpath)

    def _format_storage(self, java: Path, argfile: Path, properties: Path, log_dir: Path) -> None:
        """Format ``log_dir`` for KRaft unless an earlier start already did."""
        if (log_dir / "meta.properties").is_file():
            return
        cluster_id = new_cluster_id()
        argv = [
            str(java),
            f"@{argfile}",
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            cluster_id,
            "--config",
            str(properties),
        ]
        try:
            run_checked(argv, timeout=120)
        except InstallError as exc:
            raise BackendUnavailable(f"kafka: formatting {log_dir} failed: {exc}") from exc
        _log.info("kafka: formatted %s (cluster id %s)", log_dir, cluster_id)

    def start_local(self, port: int, workdir: Path) -> LocalProcess:
        controller_port = self.reserve_port(workdir, "controller")
        log_dir = workdir / "data"
        properties = workdir / "server.properties"
        properties.write_text(_render_properties(broker_properties(port, controller_port, log_dir)))
        java, argfile = self._argfile(workdir)
        self._format_storage(java, argfile, properties, log_dir)
        return self.spawn([str(java), f"@{argfile}", "kafka.Kafka", str(properties)], port, workdir)

    def local_url(self, port: int) -> str:
        return f"127.0.0.1:{port}"

    def client_probe(self, url: str) -> None:
        from confluent_kafka.admin import AdminClient

        config: dict[str, Any] = {
            "bootstrap.servers": url,
            "socket.timeout.ms": 3000,
            "socket.connection.setup.timeout.ms": 3000,
            "logger": logging.getLogger(f"{__name__}.client"),
        }
        admin = AdminClient(config)
        metadata = admin.list_topics(timeout=3)
        if not metadata.brokers:
            raise RuntimeError(f"kafka at {url} answered metadata without brokers")

    def extra_for(self, url: str) -> dict[str, str]:
        return {"bootstrap_servers": url}

    def docker_container(self) -> DockerContainer:
        from testcontainers.core.container import DockerContainer

        client_port = _DOCKER_CLIENT_PORT
        script = _DOCKER_START_SCRIPT

        class _KafkaContainer(DockerContainer):
            """Waits for a start script that sets the advertised (mapped) host port."""

            def start(self) -> _KafkaContainer:
                super().start()
                host = self.get_container_host_ip()
                mapped = self.get_exposed_port(client_port)
                advertised = (
                    f"PLAINTEXT://{host}:{mapped},BROKER://$(hostname -i | cut -d' ' -f1)"
                    f":{_DOCKER_BROKER_PORT}"
                )
                body = (
                    "#!/bin/sh\n"
                    f'export KAFKA_ADVERTISED_LISTENERS="{advertised}"\n'
                    "exec /etc/kafka/docker/run\n"
                )
                _put_file(self, script, body.encode())
                return self

        container = _KafkaContainer(self.docker_image).with_exposed_ports(client_port)
        environment = {
            "CLUSTER_ID": new_cluster_id(),
            "KAFKA_NODE_ID": "1",
            "KAFKA_PROCESS_ROLES": "broker,controller",
            "KAFKA_LISTENERS": (
                f"PLAINTEXT://0.0.0.0:{client_port},BROKER://0.0.0.0:{_DOCKER_BROKER_PORT},"
                f"CONTROLLER://0.0.0.0:{_DOCKER_CONTROLLER_PORT}"
            ),
            "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": (
                "PLAINTEXT:PLAINTEXT,BROKER:PLAINTEXT,CONTROLLER:PLAINTEXT"
            ),
            "KAFKA_INTER_BROKER_LISTENER_NAME": "BROKER",
            "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
            "KAFKA_CONTROLLER_QUORUM_VOTERS": f"1@localhost:{_DOCKER_CONTROLLER_PORT}",
            "KAFKA_HEAP_OPTS": "-Xms128m -Xmx512m",
        }
        for key, value in _TEST_SETTINGS.items():
            environment["KAFKA_" + key.upper().replace(".", "_")] = value
        for key, value in environment.items():
            container.with_env(key, value)
        return container.with_command(
            f'sh -c "while [ ! -f {script} ]; do sleep 0.1; done; exec sh {script}"'
        )


def _put_file(container: DockerContainer, path: str, content: bytes) -> None:
    """Copy ``content`` to ``path`` inside a running container."""
    import io
    import tarfile
    import time

    with io.BytesIO() as archive:
        with tarfile.TarFile(fileobj=archive, mode="w") as tar:
            info = tarfile.TarInfo(name=path.lstrip("/"))
            info.size = len(content)
            info.mtime = int(time.time())
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(content))
        archive.seek(0)
        container.get_wrapped_container().put_archive("/", archive.getvalue())
