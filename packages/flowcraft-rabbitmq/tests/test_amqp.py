"""The adapter's own AMQP client (``_amqp``) and the Broker on it, against a real
RabbitMQ: frames split and joined, returns and channel errors, refused logins, a
connection cut or gone silent (through a TCP proxy the test controls), TLS (through a
TLS-terminating proxy), a queue deleted under the consumer."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import random
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pamqp import body as amqp_body
from pamqp import commands as amqp
from pamqp import frame as amqp_frame
from pamqp import header as amqp_header

from flowcraft_backends import RunningService
from flowcraft_rabbitmq import _hotframes as hot
from flowcraft_rabbitmq._amqp import (
    ChannelClosed,
    Connection,
    ConnectionLost,
    Message,
    Parameters,
    Unroutable,
    connect,
)
from flowcraft_rabbitmq._broker import CLASSIC_V2, Broker
from flowcraft_rabbitmq._settings import DELAY_BUCKETS_MS, Topology

TIMEOUT = 20.0


class Proxy:
    """A TCP proxy to RabbitMQ that a test can cut (``drop``) or silence (``freeze``);
    with ``tls`` it terminates TLS and forwards plain AMQP."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.target = (host, port)
        self.tls = tls
        self.pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.frozen = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.pairs.append((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.frozen.is_set():
                    continue  # swallowed: the peer hears nothing
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def drop(self) -> None:
        for a, b in self.pairs:
            a.transport.abort()
            b.transport.abort()
        self.pairs.clear()

    async def stop(self) -> None:
        self.drop()
        if self.server is not None:
            self.server.close()


def _url_via(url: str, port: int, scheme: str = "amqp") -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(
        parts._replace(scheme=scheme, netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host)
    )


@pytest.fixture
async def proxy(rabbitmq_service: RunningService) -> AsyncIterator[Proxy]:
    parts = urlsplit(rabbitmq_service.url)
    proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.fixture
async def queue_name(rabbitmq_service: RunningService) -> AsyncIterator[str]:
    name = f"amqp-test-{uuid.uuid4().hex[:10]}"
    yield name
    broker = Broker(Topology.for_queue(name), url=rabbitmq_service.url)
    try:
        await broker.delete_topology()
    finally:
        await broker.aclose()


async def _open(url: str, **options: float) -> Connection:
    return await connect(Parameters.from_url(url, **options))


async def test_large_bodies_and_rich_headers_survive_a_round_trip(
    rabbitmq_service: RunningService, queue_name: str
) -> None:
    """Bodies past frame_max are split and joined; header tables keep their types;
    an empty body arrives empty; aio-pika (another client) reads what we wrote."""
    connection = await _open(rabbitmq_service.url)
    try:
        channel = await connection.channel(confirms=True)
        await channel.call(amqp.Queue.Declare(queue=queue_name, durable=True))
        big = bytes(range(256)) * 1200  # 307,200 bytes: three body frames at 131,072
        headers = {"n": 7, "ok": True, "name": "grüße ☃", "nested": {"a": [1, "b"]}}
        for body in (big, b"", b"{}"):
            confirm = channel.publish(
                body,
                routing_key=queue_name,
                properties=amqp.Basic.Properties(headers=headers, delivery_mode=2),
            )
            assert confirm is not None
            await confirm
        got = []
        while (message := await channel.get(queue_name)) is not None:
            got.append(message)
        assert [m.body for m in got] == [big, b"", b"{}"]
        assert got[0].headers["name"] == "grüße ☃"
        assert got[0].headers["n"] == 7
        assert got[0].headers["ok"] is True
        assert got[0].headers["nested"] == {"a": [1, "b"]}
        await got[0].nack(requeue=True)  # back to the queue, marked redelivered
        await channel.close()
    finally:
        await connection.close()
    other = await aio_pika.connect(rabbitmq_service.url)
    try:
        queue = await (await other.channel()).get_queue(queue_name)
        message = await queue.get(no_ack=True, fail=True)
        assert message is not None
        assert message.body == big
        assert message.redelivered
    finally:
        await other.close()


async def test_an_unroutable_message_raises_and_the_channel_goes_on(
    rabbitmq_service: RunningService, queue_name: str
) -> None:
    connection = await _open(rabbitmq_service.url)
    try:
        channel = await connection.channel(confirms=True)
        await channel.call(amqp.Queue.Declare(queue=queue_name))
        nowhere = channel.publish(
            b"x", routing_key=f"{queue_name}-missing", properties=amqp.Basic.Properties()
        )
        somewhere = channel.publish(
            b"y", routing_key=queue_name, properties=amqp.Basic.Properties()
        )
        assert nowhere is not None
        assert somewhere is not None
        with pytest.raises(Unroutable, match="NO_ROUTE"):
            await nowhere
        await somewhere  # the next message, confirmed
        assert channel.is_open
        message = await channel.get(queue_name)
        assert message is not None
        assert message.body == b"y"
    finally:
        await connection.close()


async def test_a_channel_error_closes_that_channel_only(
    rabbitmq_service: RunningService, queue_name: str
) -> None:
    connection = await _open(rabbitmq_service.url)
    try:
        channel = await connection.channel(confirms=True)
        confirm = channel.publish(
            b"x",
            exchange=f"{queue_name}-no-such-exchange",
            routing_key="",
            properties=amqp.Basic.Properties(),
        )
        assert confirm is not None
        with pytest.raises(ChannelClosed) as caught:
            await confirm
        assert caught.value.code == 404
        assert not channel.is_open
        with pytest.raises(ChannelClosed):
            await channel.call(amqp.Queue.Declare(queue=queue_name))
        again = await connection.channel()
        ok = await again.call(amqp.Queue.Declare(queue=queue_name))
        assert ok.message_count == 0
    finally:
        await connection.close()


async def test_a_refused_login_says_so_without_the_password(
    rabbitmq_service: RunningService,
) -> None:
    parts = urlsplit(rabbitmq_service.url)
    url = urlunsplit(parts._replace(netloc=f"guest:s3cret-pw@{parts.hostname}:{parts.port}"))
    with pytest.raises(ConnectionLost, match="ACCESS_REFUSED") as caught:
        await _open(url)
    assert "s3cret-pw" not in str(caught.value)
    assert "s3cret-pw" not in repr(Parameters.from_url(url))
    with pytest.raises(ConnectionLost, match=r"NOT_ALLOWED|vhost"):
        await _open(urlunsplit(urlsplit(rabbitmq_service.url)._replace(path="/no-such-vhost")))


def test_urls_and_options_are_read_and_checked() -> None:
    p = Parameters.from_url("amqps://u%40x:p%2Fw@rabbit.example/%2Fprod?heartbeat=5")
    assert (p.host, p.port, p.tls, p.username, p.password) == (
        "rabbit.example",
        5671,
        True,
        "u@x",
        "p/w",
    )
    assert p.virtual_host == "/prod"
    assert p.heartbeat == 5.0
    assert Parameters.from_url("amqp://localhost").virtual_host == "/"
    assert Parameters.from_url("amqp://localhost/").virtual_host == "/"
    assert Parameters.from_url("amqp://h/v?connection_timeout=2500").connect_timeout == 2.5
    assert Parameters.from_url("amqp://h/", heartbeat=0).heartbeat == 0
    with pytest.raises(ValueError, match="scheme"):
        Parameters.from_url("http://localhost/")
    with pytest.raises(ValueError, match="heartbeats"):
        Parameters.from_url("amqp://h/", heartbeats=3)
    with pytest.raises(ValueError, match="query"):
        Parameters.from_url("amqp://h/?heartbeat=soon")
    for bad in (0.5, -1, float("nan")):
        with pytest.raises(ValueError, match="heartbeat must be 0"):
            Parameters.from_url("amqp://h/", heartbeat=bad)
    with pytest.raises(ValueError, match="connect_timeout"):
        Parameters.from_url("amqp://h/", connect_timeout=0)


async def test_a_silent_server_is_dropped_after_two_heartbeats(
    rabbitmq_service: RunningService, proxy: Proxy, queue_name: str
) -> None:
    """A partition that leaves the socket open: nothing arrives, so after two heartbeat
    intervals the connection is dropped and a publish waiting for its confirm fails."""
    connection = await _open(_url_via(rabbitmq_service.url, proxy.port), heartbeat=1)
    assert connection.heartbeat == 1
    channel = await connection.channel(confirms=True)
    await channel.call(amqp.Queue.Declare(queue=queue_name))
    proxy.frozen.set()
    confirm = channel.publish(b"x", routing_key=queue_name, properties=amqp.Basic.Properties())
    assert confirm is not None
    began = asyncio.get_running_loop().time()
    with pytest.raises(ConnectionLost, match="heartbeat"):
        async with asyncio.timeout(TIMEOUT):
            await confirm
    assert asyncio.get_running_loop().time() - began < 4.5
    assert not connection.is_open
    with pytest.raises(ConnectionLost):
        await connection.lost


async def test_the_broker_publishes_and_consumes_again_after_the_connection_is_cut(
    rabbitmq_service: RunningService, proxy: Proxy, queue_name: str
) -> None:
    """The same Broker through a cut: a publish after it reconnects, the consumer starts
    again by itself, and every message published is consumed (a delivery whose ack was
    lost with the connection comes again)."""
    broker = Broker(
        Topology.for_queue(queue_name),
        url=_url_via(rabbitmq_service.url, proxy.port),
        reconnect_interval=0.1,
    )
    seen: list[bytes] = []
    got = asyncio.Event()

    async def on_message(message: Message) -> None:
        seen.append(message.body)
        await message.ack()
        got.set()

    consumer = await broker.consume(on_message, prefetch=4)
    try:
        await broker.publish(b"1")
        async with asyncio.timeout(TIMEOUT):
            while b"1" not in seen:
                await got.wait()
                got.clear()
        first = proxy.connections
        proxy.drop()
        await broker.publish(b"2")  # reconnects
        await broker.publish(b"3")
        async with asyncio.timeout(TIMEOUT):
            while not {b"2", b"3"} <= set(seen):
                await got.wait()
                got.clear()
        assert proxy.connections == first + 1  # one new connection, shared
    finally:
        await consumer.cancel()
        await consumer.close()
        await broker.aclose()


async def test_a_publish_waits_through_an_outage_until_its_timeout(
    rabbitmq_service: RunningService, queue_name: str
) -> None:
    """Nothing listens: a publish keeps trying until publish_timeout, then raises."""
    with contextlib.closing(__import__("socket").socket()) as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    broker = Broker(
        Topology.for_queue(queue_name),
        url=_url_via(rabbitmq_service.url, port),
        publish_timeout=1.0,
    )
    began = asyncio.get_running_loop().time()
    with pytest.raises((ConnectionRefusedError, TimeoutError)):  # refused, or cut mid-attempt
        await broker.publish(b"x")
    assert 0.9 < asyncio.get_running_loop().time() - began < 5
    await broker.aclose()


async def test_a_queue_deleted_under_the_consumer_is_declared_and_consumed_again(
    rabbitmq_service: RunningService, queue_name: str
) -> None:
    broker = Broker(
        Topology.for_queue(queue_name), url=rabbitmq_service.url, reconnect_interval=0.1
    )
    arrived = asyncio.Event()

    async def on_message(message: Message) -> None:
        if message.body == b"after":
            arrived.set()
        await message.ack()

    consumer = await broker.consume(on_message, prefetch=4)
    try:
        connection = await _open(rabbitmq_service.url)
        try:
            channel = await connection.channel()
            await channel.call(amqp.Queue.Delete(queue=queue_name))
        finally:
            await connection.close()
        await broker.publish(b"after")  # unroutable at first: declared again, then sent
        async with asyncio.timeout(TIMEOUT):
            await arrived.wait()
    finally:
        await consumer.cancel()
        await consumer.close()
        await broker.aclose()


def _queue_arguments(topology: Topology) -> dict[str, dict[str, object]]:
    """The work, dead-letter and first delay queue with their arguments, less the
    storage version."""
    return {
        topology.queue: {"x-dead-letter-exchange": topology.dead_exchange},
        topology.dead_queue: {},
        topology.delay_queue(DELAY_BUCKETS_MS[0]): {
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": topology.queue,
        },
    }


async def test_every_queue_is_a_version_2_classic_queue(
    rabbitmq_service: RunningService, queue_name: str
) -> None:
    """Version 2 costs RabbitMQ about a third less CPU per persistent message: the work,
    dead-letter and delay queues are declared so (a declaration differing only in the
    version is refused as inequivalent, the same one with version 2 accepted)."""
    topology = Topology.for_queue(queue_name)
    broker = Broker(topology, url=rabbitmq_service.url)
    try:
        await broker.publish(b"later", delay_ms=DELAY_BUCKETS_MS[0])
    finally:
        await broker.aclose()
    declared = _queue_arguments(topology)
    connection = await _open(rabbitmq_service.url)
    try:
        for name, arguments in declared.items():
            channel = await connection.channel()
            with pytest.raises(ChannelClosed) as caught:
                await channel.call(
                    amqp.Queue.Declare(
                        queue=name, durable=True, arguments={**arguments, "x-queue-version": 1}
                    )
                )
            assert caught.value.code == 406, name
            assert "x-queue-version" in str(caught.value), caught.value
            channel = await connection.channel()
            await channel.call(
                amqp.Queue.Declare(
                    queue=name, durable=True, arguments={**arguments, "x-queue-version": 2}
                )
            )
    finally:
        await connection.close()


async def test_queues_an_earlier_release_declared_are_used_as_they_are(
    rabbitmq_service: RunningService, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An upgrade: the queues exist as an earlier release declared them (no
    ``x-queue-version``, version 1 on this server), a job waiting in the work queue.
    Where the server refuses the version-2 declarations as inequivalent, the queues
    are used as they are, with one warning each; the waiting job is delivered."""
    topology = Topology.for_queue(queue_name)
    earlier = _queue_arguments(topology)
    connection = await _open(rabbitmq_service.url)
    try:
        channel = await connection.channel()
        await channel.call(
            amqp.Exchange.Declare(
                exchange=topology.dead_exchange, exchange_type="fanout", durable=True
            )
        )
        for name, arguments in earlier.items():
            await channel.call(amqp.Queue.Declare(queue=name, durable=True, arguments=arguments))
        channel.publish(b"waiting", routing_key=topology.queue)
        await channel.call(amqp.Queue.Declare(queue=topology.queue, passive=True))
        # Whether this server refuses version 2 for a queue declared without a version
        # (3.10 and 3.11, whose default is version 1, do).
        probe = f"{queue_name}.probe"
        await channel.call(amqp.Queue.Declare(queue=probe, auto_delete=True))
        refused = False
        try:
            await channel.call(
                amqp.Queue.Declare(queue=probe, auto_delete=True, arguments=CLASSIC_V2)
            )
        except ChannelClosed as exc:
            refused = exc.code == 406
            if not refused:
                raise
        channel = await connection.channel()
        await channel.call(amqp.Queue.Delete(queue=probe))
    finally:
        await connection.close()

    broker = Broker(topology, url=rabbitmq_service.url, reconnect_interval=0.1)
    bodies: list[bytes] = []
    all_in = asyncio.Event()

    async def on_message(message: Message) -> None:
        bodies.append(message.body)
        await message.ack()
        if len(bodies) == 3:
            all_in.set()

    with caplog.at_level(logging.WARNING, logger="flowcraft.rabbitmq.broker"):
        consumer = await broker.consume(on_message, prefetch=4)
        try:
            await broker.publish(b"now")
            await broker.publish(b"later", delay_ms=DELAY_BUCKETS_MS[0])
            async with asyncio.timeout(TIMEOUT):
                await all_in.wait()
            await broker.depths()  # declares every queue again: no second warning
        finally:
            await consumer.cancel()
            await consumer.close()
            await broker.aclose()
    assert sorted(bodies) == [b"later", b"now", b"waiting"]
    warned = [r.getMessage() for r in caplog.records if "version-1" in r.getMessage()]
    assert sorted(warned) == sorted(
        f"queue {name!r} was declared by an earlier flowcraft-rabbitmq as a version-1 "
        "classic queue; it is used as it is (RabbitMQ spends about a third more CPU per "
        "message on it): delete it once drained to have it declared as version 2"
        for name in earlier
        if refused
    )


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_tls_is_used_and_verified(
    rabbitmq_service: RunningService, queue_name: str, tmp_path: Path
) -> None:
    """amqps:// through a TLS-terminating proxy: with the proxy's certificate trusted
    (amqp_ssl_context) the broker works; with the system's default context the
    self-signed certificate is refused."""
    cert, key = _self_signed(tmp_path)
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    parts = urlsplit(rabbitmq_service.url)
    proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5672, tls=server_side)
    await proxy.start()
    url = _url_via(rabbitmq_service.url, proxy.port, scheme="amqps")
    try:
        trusting = ssl.create_default_context(cafile=str(cert))
        broker = Broker(Topology.for_queue(queue_name), url=url, ssl_context=trusting)
        try:
            await broker.publish(b"over tls")
            assert (await broker.depths())[queue_name] == 1
        finally:
            await broker.aclose()
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(Parameters.from_url(url))
    finally:
        await proxy.stop()


@pytest.mark.parametrize("seed", range(5))
def test_the_hand_packed_frames_equal_pamqps(seed: int) -> None:
    """_hotframes packs and reads the job path's frames without pamqp: byte for byte
    what pamqp writes, and what pamqp reads."""
    rng = random.Random(seed)
    for _ in range(200):
        channel = rng.randrange(1, 2048)
        tag = rng.randrange(1, 2**63)
        assert hot.ack_frame(channel, tag) == amqp_frame.marshal(amqp.Basic.Ack(tag), channel)
        multiple = rng.random() < 0.5
        ack = amqp_frame.marshal(amqp.Basic.Ack(tag, multiple), channel)
        assert hot.read_ack(ack[7:-1]) == (tag, multiple)
        assert hot.class_method(ack[7:-1]) == hot.BASIC_ACK

        def text(n: int, alphabet: str = "abcxyz.-_é☃") -> str:
            return "".join(rng.choice(alphabet) for _ in range(n))

        deliver = amqp.Basic.Deliver(
            consumer_tag=text(rng.randrange(0, 40)),
            delivery_tag=tag,
            redelivered=multiple,
            exchange=text(rng.randrange(0, 20), "abcXYZ019.-_:"),  # pamqp's exchange rule
            routing_key=text(rng.randrange(0, 60)),
        )
        packed = amqp_frame.marshal(deliver, channel)
        assert hot.class_method(packed[7:-1]) == hot.BASIC_DELIVER
        read = hot.read_deliver(packed[7:-1])
        for name in ("consumer_tag", "delivery_tag", "redelivered", "exchange", "routing_key"):
            assert getattr(read, name) == getattr(deliver, name)

        size = rng.randrange(0, 2**40)
        message_id = text(rng.randrange(1, 40))
        ours = hot.job_header_frame(channel, size, "application/json", message_id)
        properties = amqp.Basic.Properties(
            content_type="application/json", delivery_mode=2, message_id=message_id
        )
        theirs = amqp_frame.marshal(amqp_header.ContentHeader(0, size, properties), channel)
        assert ours == theirs
        read_size, read_properties = hot.read_job_header(theirs[7:-1]) or (None, None)
        assert read_size == size
        assert read_properties == properties
        chunk = rng.randbytes(rng.randrange(1, 300))
        assert hot.body_frame(channel, chunk) == amqp_frame.marshal(
            amqp_body.ContentBody(chunk), channel
        )
    other = amqp.Basic.Properties(content_type="application/json", delivery_mode=2, headers={})
    frame = amqp_frame.marshal(amqp_header.ContentHeader(0, 5, other), 1)
    assert hot.read_job_header(frame[7:-1]) is None  # left to pamqp
