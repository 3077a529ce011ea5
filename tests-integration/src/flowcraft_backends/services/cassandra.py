"""Apache Cassandra: a real single node, run from Maven Central's ``cassandra-all`` jars.

Local process: ``java @jvm.args org.apache.cassandra.service.CassandraDaemon`` in
the foreground, with a generated ``cassandra.yaml`` that keeps data, commit log,
saved caches, hints and CDC under the server's work directory (so ``restart()``
keeps keyspaces and rows). The native (CQL) port is the service's port; the
storage (gossip) port is a second reserved port. JMX stays off, so those two are
the only ports it binds. The JVM gets the ``--add-exports``/``--add-opens`` list of
Cassandra's ``jvm17-server.options`` and a small heap. Ready in about 8-10 s once
the jars are cached.

Settings for one test node: one token at 0, no bootstrap, no wait for gossip to
settle, no auto-snapshot on DROP/TRUNCATE (which would otherwise slow test
clean-up), small caches.

``url`` is ``host:port`` of the CQL port; ``extra`` has the ``local_datacenter``
that load-balancing policies need. Docker: the pinned ``cassandra`` image.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from flowcraft_backends._java import JvmService, split_host_port, write_argfile
from flowcraft_backends._maven import Artifact
from flowcraft_backends._process import LocalProcess

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

__all__ = [
    "ARTIFACTS",
    "CASSANDRA_VERSION",
    "LOCAL_DATACENTER",
    "CassandraService",
    "cassandra_yaml",
    "jvm_options",
]

_log = logging.getLogger(__name__)

CASSANDRA_VERSION = "5.0.6"
#: Cassandra 5.0 runs on Java 11 and 17; newer Java gets a best-effort extra flag.
JAVA_MINIMUM = 11
JAVA_TESTED = 17
#: SimpleSnitch puts every node in this data center.
LOCAL_DATACENTER = "datacenter1"

ARTIFACTS = (Artifact("org.apache.cassandra", "cassandra-all", CASSANDRA_VERSION),)

#: Module access that Cassandra needs on Java 17 (from its conf/jvm17-server.options).
_JPMS_OPTIONS = (
    "-Djdk.attach.allowAttachSelf=true",
    "--add-exports=java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports=java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.server=ALL-UNNAMED",
    "--add-exports=java.sql/java.sql=ALL-UNNAMED",
    "--add-exports=java.base/java.lang.ref=ALL-UNNAMED",
    "--add-exports=jdk.unsupported/sun.misc=ALL-UNNAMED",
    "--add-exports=jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED",
    "--add-exports=jdk.attach/sun.tools.attach=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.loader=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.reflect=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.math=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.util.jar=ALL-UNNAMED",
    "--add-opens=jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens=jdk.compiler/com.sun.tools.javac=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
)

_HEAP_AND_GC = (
    "-Xms256m",
    "-Xmx1g",
    "-Xss256k",
    "-XX:+UseG1GC",
    "-XX:+ParallelRefProcEnabled",
    "-XX:MaxTenuringThreshold=1",
    "-XX:+ExitOnOutOfMemoryError",
)

#: Netty settings from jvm17-server.options, and the single-test-node start-up shortcuts.
_SYSTEM_PROPERTIES = (
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Dio.netty.allocator.useCacheForAllThreads=true",
    "-Dio.netty.allocator.maxOrder=11",
    "-Dcassandra-foreground=yes",
    "-Dcassandra.skip_wait_for_gossip_to_settle=0",
    "-Dcassandra.ring_delay_ms=100",
    "-Dcassandra.superuser_setup_delay_ms=0",
)

_LOGBACK = """\
<configuration>
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="STDOUT"/></root>
</configuration>
"""


def cassandra_yaml(workdir: Path, native_port: int, storage_port: int) -> str:
    """The ``cassandra.yaml`` of one test node on 127.0.0.1 with its data under ``workdir``."""
    directory = workdir.resolve()
    return f"""\
cluster_name: flowcraft-test
num_tokens: 1
initial_token: 0
auto_bootstrap: false
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:{storage_port}"
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: {storage_port}
native_transport_port: {native_port}
start_native_transport: true
data_file_directories: ["{directory / "data"}"]
commitlog_directory: "{directory / "commitlog"}"
saved_caches_directory: "{directory / "saved_caches"}"
hints_directory: "{directory / "hints"}"
cdc_raw_directory: "{directory / "cdc_raw"}"
commitlog_sync: periodic
commitlog_sync_period: 10000ms
authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer
auto_snapshot: false
concurrent_reads: 4
concurrent_writes: 4
concurrent_counter_writes: 4
concurrent_compactors: 1
memtable_heap_space: 64MiB
memtable_offheap_space: 64MiB
file_cache_size: 32MiB
key_cache_size: 16MiB
counter_cache_size: 8MiB
networking_cache_size: 16MiB
index_summary_capacity: 8MiB
disk_access_mode: mmap_index_only
"""


def jvm_options(workdir: Path, java_major: int) -> list[str]:
    """Every JVM option for a node whose configuration lives in ``workdir``."""
    directory = workdir.resolve()
    options = [
        *_HEAP_AND_GC,
        *_JPMS_OPTIONS,
        *_SYSTEM_PROPERTIES,
        f"-Dcassandra.config=file://{directory / 'cassandra.yaml'}",
        f"-Dcassandra.storagedir={directory}",
        f"-Dcassandra.logdir={directory / 'logs'}",
        f"-Dcassandra.triggers_dir={directory / 'triggers'}",
        f"-Dlogback.configurationFile={directory / 'logback.xml'}",
    ]
    if java_major > JAVA_TESTED:
        # Cassandra installs a SecurityManager, which Java 18+ refuses without this.
        options.append("-Djava.security.manager=allow")
    return options


class CassandraService(JvmService):
    """A single Cassandra node whose CQL port is ``127.0.0.1:PORT``."""

    name = "cassandra"
    docker_image = f"cassandra:{CASSANDRA_VERSION}"
    docker_port = 9042
    ready_timeout = 180.0
    install_hint = f"Maven Central org.apache.cassandra:cassandra-all:{CASSANDRA_VERSION} + Java 17"

    artifacts = ARTIFACTS
    java_minimum = JAVA_MINIMUM

    def start_local(self, port: int, workdir: Path) -> LocalProcess:
        java, major, classpath = self.jvm()
        if major > JAVA_TESTED:
            _log.warning(
                "cassandra %s is run on Java %d; it supports Java 11 and 17 "
                "(set JAVA_HOME to a Java 17 if it fails to start)",
                CASSANDRA_VERSION,
                major,
            )
        storage_port = self.reserve_port(workdir, "storage")
        for sub in ("data", "commitlog", "saved_caches", "hints", "cdc_raw", "logs", "triggers"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        (workdir / "cassandra.yaml").write_text(cassandra_yaml(workdir, port, storage_port))
        (workdir / "logback.xml").write_text(_LOGBACK)
        argfile = write_argfile(workdir / "jvm.args", jvm_options(workdir, major), classpath)
        argv = [str(java), f"@{argfile}", "org.apache.cassandra.service.CassandraDaemon"]
        return self.spawn(argv, port, workdir)

    def local_url(self, port: int) -> str:
        return f"127.0.0.1:{port}"

    def client_probe(self, url: str) -> None:
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
        from cassandra.policies import WhiteListRoundRobinPolicy

        host, port = split_host_port(url, self.docker_port)
        profile = ExecutionProfile(
            load_balancing_policy=WhiteListRoundRobinPolicy([host]), request_timeout=5.0
        )
        cluster = Cluster(
            [host],
            port=port,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile},
            connect_timeout=3.0,
            control_connection_timeout=3.0,
        )
        try:
            session = cluster.connect()
            row = session.execute("SELECT release_version FROM system.local").one()
            if row is None or not row.release_version:
                raise RuntimeError(f"cassandra at {url} returned no release_version")
        finally:
            cluster.shutdown()

    def extra_for(self, url: str) -> dict[str, str]:
        host, port = split_host_port(url, self.docker_port)
        return {"host": host, "port": str(port), "local_datacenter": LOCAL_DATACENTER}

    def docker_container(self) -> DockerContainer:
        return (
            super()
            .docker_container()
            .with_env("MAX_HEAP_SIZE", "1G")
            .with_env("HEAP_NEWSIZE", "128M")
            .with_env("CASSANDRA_NUM_TOKENS", "1")
            .with_env(
                "JVM_OPTS",
                "-Dcassandra.skip_wait_for_gossip_to_settle=0 -Dcassandra.initial_token=0 "
                "-Dcassandra.ring_delay_ms=100 -Dcassandra.superuser_setup_delay_ms=0",
            )
        )
