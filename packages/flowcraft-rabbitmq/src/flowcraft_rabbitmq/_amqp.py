"""A lean AMQP 0-9-1 client: one ``asyncio.Protocol`` per connection, frames encoded and
decoded by pamqp (the codec aiormq uses too), this module only the state machine.

Why not aio-pika/aiormq: they cost about 0.25 ms of worker CPU per message on the job
path (a task, queue and lock per frame), half a job's budget (issue 23;
``benchmarks/amqp_floor.py``). Here a frame is parsed in ``data_received`` and
dispatched at once; a publish is one ``write``; an ack is one ``write``.

What it does (only what the adapter uses): PLAIN login, TLS, heartbeats (a peer that
says nothing for two intervals is dropped), channels with synchronous methods
(declare, bind, qos, consume, get, delete, ...), publisher confirms with ``mandatory``
returns and nacks, consumers with server-sent cancels, bodies split and joined at
``frame_max``, ``Connection.Blocked`` logged, channel and connection closes from the
server turned into exceptions. No reconnection: the ``Broker`` above reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from pamqp import commands as amqp
from pamqp import frame as amqp_frame
from pamqp import header as amqp_header
from pamqp import heartbeat as amqp_heartbeat
from pamqp.exceptions import UnmarshalingException

from flowcraft_rabbitmq import _hotframes as hot

__all__ = [
    "ERRORS",
    "AMQPError",
    "Channel",
    "ChannelClosed",
    "Connection",
    "ConnectionLost",
    "Message",
    "Nacked",
    "Parameters",
    "Unroutable",
    "connect",
]

logger = logging.getLogger("flowcraft.rabbitmq.amqp")

_HEADER = struct.Struct(">BHI")
_FRAME_END = 0xCE
_CLIENT_FRAME_MAX = 131072
_REPLY_SUCCESS = 200


class AMQPError(Exception):
    """Something went wrong talking to RabbitMQ."""


class ConnectionLost(AMQPError):
    """The connection is gone (closed, dropped, or silent past its heartbeats)."""


class ChannelClosed(AMQPError):
    """The server closed the channel (``code``: AMQP reply code, e.g. 404, 406)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


class Unroutable(AMQPError):
    """A ``mandatory`` message reached no queue (the broker returned it)."""


class Nacked(AMQPError):
    """The broker refused a published message (``Basic.Nack``)."""


RETRYABLE: tuple[type[BaseException], ...] = (ConnectionLost, OSError, TimeoutError)
"""What a reconnection can cure."""

ERRORS: tuple[type[BaseException], ...] = (AMQPError, *RETRYABLE)
"""Everything talking to RabbitMQ may raise."""


def _product_version() -> str:
    try:
        return version("flowcraft-rabbitmq")
    except PackageNotFoundError:  # pragma: no cover - a source tree without metadata
        return "0"


@dataclass(frozen=True)
class Parameters:
    """Where and how to connect: from an ``amqp://`` or ``amqps://`` URL plus options."""

    host: str = "localhost"
    port: int = 5672
    username: str = "guest"
    password: str = field(default="guest", repr=False)
    virtual_host: str = "/"
    tls: bool = False
    heartbeat: float = 60.0
    connect_timeout: float = 10.0
    client_properties: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Parameters:
        """``amqp[s]://user:password@host:port/vhost?heartbeat=S&connection_timeout=S``;
        ``options`` (``heartbeat``, ``connect_timeout``, ``client_properties``) win."""
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps"):
            raise ValueError(f"not an AMQP URL (scheme {parts.scheme!r}; amqp:// or amqps://)")
        unknown = set(options) - {"heartbeat", "connect_timeout", "client_properties"}
        if unknown:
            raise ValueError(
                f"unknown AMQP option(s) {sorted(unknown)}; "
                "known: heartbeat, connect_timeout, client_properties"
            )
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        tls = parts.scheme == "amqps"
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        settings: dict[str, Any] = {
            "host": parts.hostname or "localhost",
            "port": parts.port or (5671 if tls else 5672),
            "username": unquote(parts.username) if parts.username is not None else "guest",
            "password": unquote(parts.password) if parts.password is not None else "guest",
            "virtual_host": vhost,
            "tls": tls,
        }
        try:
            if "heartbeat" in query:
                settings["heartbeat"] = float(query["heartbeat"])
            if "connection_timeout" in query:  # milliseconds, as pika and aio-pika read it
                settings["connect_timeout"] = float(query["connection_timeout"]) / 1000
        except ValueError as exc:
            raise ValueError(f"bad number in the AMQP URL's query: {exc}") from None
        settings.update(options)
        heartbeat = settings.get("heartbeat", 60.0)
        if heartbeat != 0 and not heartbeat >= 1:  # RabbitMQ counts whole seconds
            raise ValueError(f"heartbeat must be 0 (off) or at least 1 second, not {heartbeat!r}")
        if not settings.get("connect_timeout", 1) > 0:
            raise ValueError("connect_timeout must be > 0")
        return cls(**settings)


class Message:
    """A message delivered by a consumer or ``Channel.get``; settle it on its channel."""

    __slots__ = ("body", "channel", "delivery_tag", "properties", "redelivered")

    def __init__(
        self, channel: Channel, delivery_tag: int, redelivered: bool, properties: Any, body: bytes
    ) -> None:
        self.channel = channel
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self.properties: amqp.Basic.Properties = properties
        self.body = body

    @property
    def headers(self) -> Mapping[str, Any]:
        return self.properties.headers or {}

    async def ack(self) -> None:
        """Ack (written without waiting: a lost ack is a redelivery)."""
        channel = self.channel
        if channel._error is not None:
            raise channel._error
        channel.connection.write(hot.ack_frame(channel.number, self.delivery_tag))

    async def nack(self, *, requeue: bool) -> None:
        self.channel.send(amqp.Basic.Nack(self.delivery_tag, requeue=requeue))

    async def reject(self, *, requeue: bool) -> None:
        self.channel.send(amqp.Basic.Reject(self.delivery_tag, requeue=requeue))


OnMessage = Callable[[Message], Coroutine[Any, Any, None]]


class Channel:
    """One AMQP channel. Synchronous methods (``call``) take turns; publishes and acks
    are written at once. Closed by the server, it raises :class:`ChannelClosed` from
    then on; once the connection is gone, :class:`ConnectionLost`."""

    def __init__(self, connection: Connection, number: int) -> None:
        self.connection = connection
        self.number = number
        self.closed: asyncio.Future[None] = connection.loop.create_future()
        """Done (with the reason as its exception) once the channel is unusable."""
        self._error: AMQPError | None = None
        self._turn = asyncio.Lock()
        self._reply: asyncio.Future[Any] | None = None
        self._confirming = False
        self._published = 0
        self._confirms: dict[int, asyncio.Future[None]] = {}
        self._returned: dict[int, str] = {}
        self._id_prefix = f"{id(self):x}.{number}."
        self._consumers: dict[str, OnMessage] = {}
        self._cancelled: Callable[[str], None] | None = None
        self._incoming: Any = None  # Deliver, Return or GetOk awaiting its content
        self._properties: Any = None
        self._body_size = -1  # -1: the content header has not come yet
        self._chunks: list[bytes] = []
        self._received = 0
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references
        self._publish_frames: dict[tuple[str, str, bool], bytes] = {}

    @property
    def is_open(self) -> bool:
        return self._error is None

    # ------------------------------------------------------------------ writing

    def send(self, method: Any) -> None:
        """Queue one method frame for the next send (nacks, rejects)."""
        if self._error is not None:
            raise self._error
        self.connection.write(amqp_frame.marshal(method, self.number))

    async def call(self, method: Any) -> Any:
        """Send a synchronous method and return the server's reply method."""
        async with self._turn:
            if self._error is not None:
                raise self._error
            reply = self._reply = self.connection.loop.create_future()
            self.connection.write(amqp_frame.marshal(method, self.number))
            try:
                return await reply
            finally:
                self._reply = None

    async def confirm_select(self) -> None:
        await self.call(amqp.Confirm.Select())
        self._confirming = True

    async def qos(self, prefetch_count: int) -> None:
        await self.call(amqp.Basic.Qos(prefetch_count=prefetch_count))

    def publish(
        self,
        body: bytes,
        *,
        exchange: str = "",
        routing_key: str,
        properties: amqp.Basic.Properties | None = None,
        mandatory: bool = True,
    ) -> asyncio.Future[None] | None:
        """Write a message in one go; on a confirm channel, the future of its confirm
        (it raises :class:`Unroutable` for a returned ``mandatory`` message and
        :class:`Nacked` if the broker refuses it). Without ``properties``: a
        persistent JSON message (a job), packed without pamqp."""
        if self._error is not None:
            raise self._error
        self._published += 1
        tag = self._published
        message_id = f"{self._id_prefix}{tag}"
        confirm: asyncio.Future[None] | None = None
        if self._confirming:
            confirm = self.connection.loop.create_future()
            self._confirms[tag] = confirm
        number = self.number
        key = (exchange, routing_key, mandatory)
        method = self._publish_frames.get(key)
        if method is None:
            publish = amqp.Basic.Publish(
                exchange=exchange, routing_key=routing_key, mandatory=mandatory
            )
            method = self._publish_frames[key] = amqp_frame.marshal(publish, number)
        if properties is None:
            header = hot.job_header_frame(number, len(body), "application/json", message_id)
        else:
            properties.message_id = message_id
            content = amqp_header.ContentHeader(0, len(body), properties)
            header = amqp_frame.marshal(content, number)
        step = self.connection.frame_max - 8
        if 0 < len(body) <= step:
            parts = [method, header, hot.body_frame(number, body)]
        else:  # no body frame for an empty body
            parts = [method, header]
            for start in range(0, len(body), step):
                parts.append(hot.body_frame(number, body[start : start + step]))
        self.connection.write(b"".join(parts))
        return confirm

    # ------------------------------------------------------------------ consuming

    async def consume(
        self,
        queue: str,
        on_message: OnMessage,
        *,
        on_cancel: Callable[[str], None] | None = None,
    ) -> str:
        """Deliver ``queue``'s messages to ``on_message`` (a task each), unacked until
        settled; ``on_cancel`` hears of a cancel sent by the server (queue deleted)."""
        tag = f"flowcraft.{id(self):x}.{len(self._consumers)}"
        self._consumers[tag] = on_message
        self._cancelled = on_cancel
        try:
            await self.call(amqp.Basic.Consume(queue=queue, consumer_tag=tag))
        except BaseException:
            self._consumers.pop(tag, None)
            raise
        return tag

    async def cancel(self, consumer_tag: str) -> None:
        await self.call(amqp.Basic.Cancel(consumer_tag=consumer_tag))
        self._consumers.pop(consumer_tag, None)

    async def get(self, queue: str) -> Message | None:
        """One message from ``queue`` (unacked until settled), or None if it is empty."""
        reply = await self.call(amqp.Basic.Get(queue=queue))
        return reply if isinstance(reply, Message) else None

    async def close(self) -> None:
        """Close the channel (its unacked messages go back to their queues)."""
        if self._error is not None:
            return
        with contextlib.suppress(AMQPError):
            await self.call(
                amqp.Channel.Close(
                    reply_code=_REPLY_SUCCESS, reply_text="bye", class_id=0, method_id=0
                )
            )
        self._fail(ConnectionLost("the channel was closed"))
        self.connection.channels.pop(self.number, None)

    # ------------------------------------------------------------------ reading

    def _method(self, frame: Any) -> None:
        if self._incoming is not None:
            raise UnmarshalingException("Content", f"expected content, got {frame.name}")
        name = frame.name
        if name == "Basic.Deliver" or name == "Basic.Return" or name == "Basic.GetOk":
            self._incoming = frame
            self._body_size = -1
        elif name == "Basic.Ack":
            self._settle_confirms(frame.delivery_tag, frame.multiple, None)
        elif name == "Basic.Nack":
            self._settle_confirms(frame.delivery_tag, frame.multiple, Nacked("nacked by broker"))
        elif name == "Basic.Cancel":  # the server ends a consumer (its queue was deleted)
            self._consumers.pop(frame.consumer_tag, None)
            if self._cancelled is not None:
                self._cancelled(frame.consumer_tag)
        elif name == "Channel.Close":
            self.connection.write(amqp_frame.marshal(amqp.Channel.CloseOk(), self.number))
            self.connection.channels.pop(self.number, None)
            self._fail(ChannelClosed(frame.reply_code, frame.reply_text))
        elif name == "Channel.Flow":
            self.connection.write(
                amqp_frame.marshal(amqp.Channel.FlowOk(active=frame.active), self.number)
            )
        else:  # the reply to this channel's pending call
            reply = self._reply
            if reply is not None and not reply.done():
                reply.set_result(frame)

    def _header(self, body_size: int, properties: Any) -> None:
        if self._incoming is None or self._body_size >= 0:
            raise UnmarshalingException("Content", "a content header out of place")
        self._properties = properties
        self._body_size = body_size
        self._chunks = []
        self._received = 0
        if body_size == 0:
            self._delivered(self._incoming, properties, b"")

    def _body(self, chunk: bytes) -> None:
        if self._incoming is None or self._body_size < 0:
            raise UnmarshalingException("Content", "a content body out of place")
        self._chunks.append(chunk)
        self._received += len(chunk)
        if self._received >= self._body_size:
            chunks = self._chunks
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self._delivered(self._incoming, self._properties, body)

    def _delivered(self, method: Any, properties: Any, body: bytes) -> None:
        self._incoming = None
        self._properties = None
        self._chunks = []
        name = method.name
        if name == "Basic.Deliver":
            callback = self._consumers.get(method.consumer_tag)
            if callback is not None:
                message = Message(self, method.delivery_tag, method.redelivered, properties, body)
                task = self.connection.loop.create_task(callback(message))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        elif name == "Basic.GetOk":
            reply = self._reply
            message = Message(self, method.delivery_tag, method.redelivered, properties, body)
            if reply is not None and not reply.done():
                reply.set_result(message)
        else:  # Basic.Return: the confirm that follows it reports the message unroutable
            message_id = properties.message_id or ""
            if message_id.startswith(self._id_prefix):
                tag = int(message_id[len(self._id_prefix) :])
                self._returned[tag] = f"{method.reply_code} {method.reply_text}"

    def _settle_confirms(self, tag: int, multiple: bool, error: AMQPError | None) -> None:
        confirms = self._confirms
        if multiple:
            settled = []
            for pending in confirms:
                if pending > tag:
                    break
                settled.append(pending)
        else:
            settled = [tag]
        for pending in settled:
            waiter = confirms.pop(pending, None)
            returned = self._returned.pop(pending, None) if self._returned else None
            if waiter is None or waiter.done():
                continue
            if returned is not None:
                waiter.set_exception(Unroutable(f"returned by broker: {returned}"))
            elif error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(None)

    def _fail(self, error: AMQPError) -> None:
        if self._error is not None:
            return
        self._error = error
        waiters = list(self._confirms.values())
        if self._reply is not None:
            waiters.append(self._reply)
        self._confirms.clear()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # retrieved: nobody may be awaiting a write-only confirm
        if not self.closed.done():
            self.closed.set_exception(error)
            self.closed.exception()


class Connection(asyncio.Protocol):
    """One socket to RabbitMQ; use :func:`connect`."""

    def __init__(self, parameters: Parameters) -> None:
        self.parameters = parameters
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.channels: dict[int, Channel] = {}
        self.frame_max = _CLIENT_FRAME_MAX
        self.channel_max = 2047
        self.heartbeat = 0.0
        self.lost: asyncio.Future[None] = self.loop.create_future()
        """Done (with the reason as its exception) once the connection is unusable."""
        self._control = Channel(self, 0)
        self._buffer = bytearray()
        self._last_read = self.loop.time()
        self._beat: asyncio.TimerHandle | None = None
        self._error: AMQPError | None = None
        self._next_channel = 1
        self._outgoing: list[bytes] = []

    @property
    def is_open(self) -> bool:
        return self._error is None and self.transport is not None

    def __repr__(self) -> str:
        p = self.parameters
        return f"Connection({p.host}:{p.port}{'/tls' if p.tls else ''}, vhost={p.virtual_host!r})"

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but behave as one)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        buffer = self._buffer
        buffer += data
        size = len(buffer)
        offset = 0
        try:
            while size - offset >= 8:
                kind, number, length = _HEADER.unpack_from(buffer, offset)
                end = offset + 8 + length
                if end > size:
                    break
                if buffer[end - 1] != _FRAME_END:
                    raise UnmarshalingException("Frame", "no frame-end byte")
                start, offset = offset, end
                if kind == 8:  # heartbeat
                    continue
                if number == 0:
                    self._control_frame(amqp_frame.unmarshal(bytes(buffer[start:end]))[2])
                    continue
                channel = self.channels.get(number)
                if channel is None:
                    continue
                payload = bytes(buffer[start + 7 : end - 1])
                if kind == 3:  # content body
                    channel._body(payload)
                elif kind == 2:  # content header: a job's read here, others by pamqp
                    job = hot.read_job_header(payload)
                    if job is None:
                        header: Any = amqp_frame.unmarshal(bytes(buffer[start:end]))[2]
                        job = (header.body_size, header.properties)
                    channel._header(*job)
                else:
                    ids = hot.class_method(payload)
                    if ids == hot.BASIC_ACK:
                        tag, multiple = hot.read_ack(payload)
                        channel._settle_confirms(tag, multiple, None)
                    elif ids == hot.BASIC_DELIVER:
                        channel._method(hot.read_deliver(payload))
                    else:
                        channel._method(amqp_frame.unmarshal(bytes(buffer[start:end]))[2])
        except (UnmarshalingException, ValueError, IndexError, struct.error) as exc:
            logger.error("RabbitMQ sent a frame this client cannot read (%s); disconnecting", exc)
            self._lose(ConnectionLost(f"unreadable frame: {exc}"))
            return
        finally:
            del buffer[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"{type(exc).__name__}: {exc}" if exc is not None else "closed"
        self._lose(ConnectionLost(f"the connection to RabbitMQ was lost ({reason})"))

    def pause_writing(self) -> None:  # the socket's buffer is full; RabbitMQ reads slowly
        logger.debug("RabbitMQ is reading slowly (write buffer full)")

    def resume_writing(self) -> None:
        pass

    # ------------------------------------------------------------------ control channel

    def _control_frame(self, frame: Any) -> None:
        name = frame.name
        if name == "Connection.Close":
            self.write(amqp_frame.marshal(amqp.Connection.CloseOk(), 0))
            self._lose(
                ConnectionLost(
                    f"RabbitMQ closed the connection: {frame.reply_code} {frame.reply_text}"
                )
            )
        elif name == "Connection.Blocked":
            logger.warning("RabbitMQ blocks publishing on this connection (%s)", frame.reason)
        elif name == "Connection.Unblocked":
            logger.info("RabbitMQ unblocked publishing on this connection")
        else:
            self._control._method(frame)

    def write(self, data: bytes) -> None:
        """Queue frames for the socket: what the tasks of one loop pass write (acks and
        publishes of several jobs) goes out in one send at the start of the next pass.
        A send costs about as much CPU as a job's own AMQP work on loopback."""
        if self._error is not None:
            raise self._error
        self._outgoing.append(data)
        if len(self._outgoing) == 1:
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        outgoing = self._outgoing
        if not outgoing or self.transport is None or self._error is not None:
            outgoing.clear()
            return
        data = outgoing[0] if len(outgoing) == 1 else b"".join(outgoing)
        outgoing.clear()
        self.transport.write(data)

    async def _handshake(self) -> None:
        p = self.parameters
        started = self._control._reply = self.loop.create_future()
        self.write(b"AMQP\x00\x00\x09\x01")
        start = await started
        mechanisms = start.mechanisms
        if isinstance(mechanisms, bytes):
            mechanisms = mechanisms.decode("utf-8", "replace")
        if "PLAIN" not in str(mechanisms).split():
            raise AMQPError(f"RabbitMQ offers no PLAIN login (it offers {start.mechanisms})")
        properties = {
            "product": "flowcraft-rabbitmq",
            "version": _product_version(),
            "platform": "Python",
            "capabilities": {
                "authentication_failure_close": True,
                "basic.nack": True,
                "connection.blocked": True,
                "consumer_cancel_notify": True,
                "publisher_confirms": True,
            },
            **dict(p.client_properties),
        }
        login = f"\0{p.username}\0{p.password}"
        tuned = self._control._reply = self.loop.create_future()
        self.write(
            amqp_frame.marshal(
                amqp.Connection.StartOk(
                    client_properties=properties, mechanism="PLAIN", response=login
                ),
                0,
            )
        )
        tune = await tuned
        self.channel_max = tune.channel_max or 2047
        self.frame_max = min(tune.frame_max or _CLIENT_FRAME_MAX, _CLIENT_FRAME_MAX)
        if p.heartbeat and tune.heartbeat:
            self.heartbeat = min(p.heartbeat, float(tune.heartbeat))
        else:
            self.heartbeat = p.heartbeat if p.heartbeat and not tune.heartbeat else 0.0
        self.write(
            amqp_frame.marshal(
                amqp.Connection.TuneOk(self.channel_max, self.frame_max, int(self.heartbeat)), 0
            )
        )
        await self._control.call(amqp.Connection.Open(virtual_host=p.virtual_host))
        if self.heartbeat:
            self._beat = self.loop.call_later(self.heartbeat / 2, self._heartbeat)

    def _heartbeat(self) -> None:
        if self._error is not None:
            return
        if self.loop.time() - self._last_read > 2 * self.heartbeat:
            logger.warning("RabbitMQ sent nothing for %.0f s; disconnecting", 2 * self.heartbeat)
            self._lose(ConnectionLost("RabbitMQ missed its heartbeats"))
            return
        self.write(amqp_heartbeat.Heartbeat.marshal())
        self._beat = self.loop.call_later(self.heartbeat / 2, self._heartbeat)

    def _lose(self, error: AMQPError) -> None:
        if self._error is not None:
            return
        self._error = error
        if self._beat is not None:
            self._beat.cancel()
        for channel in [self._control, *self.channels.values()]:
            channel._fail(error)
        self.channels.clear()
        if self.transport is not None:
            self.transport.abort()
        if not self.lost.done():
            self.lost.set_exception(error)
            self.lost.exception()

    # ------------------------------------------------------------------ public

    async def channel(self, *, confirms: bool = False) -> Channel:
        """A new channel; ``confirms`` turns on publisher confirms."""
        if self._error is not None:
            raise self._error
        number = self._next_channel
        while number in self.channels:
            number = number % self.channel_max + 1
        self._next_channel = number % self.channel_max + 1
        channel = Channel(self, number)
        self.channels[number] = channel
        try:
            await channel.call(amqp.Channel.Open())
            if confirms:
                await channel.confirm_select()
        except BaseException:
            self.channels.pop(number, None)
            raise
        return channel

    async def close(self) -> None:
        """Close politely (a second or so at most), then drop the socket."""
        if self._error is not None:
            return
        with contextlib.suppress(AMQPError, TimeoutError):
            async with asyncio.timeout(2.0):
                await self._control.call(
                    amqp.Connection.Close(
                        reply_code=_REPLY_SUCCESS, reply_text="bye", class_id=0, method_id=0
                    )
                )
        self._lose(ConnectionLost("the connection was closed"))


async def connect(parameters: Parameters, ssl_context: ssl.SSLContext | None = None) -> Connection:
    """Open a connection (TLS when ``parameters.tls`` or ``ssl_context`` is given) and log in.

    Raises ``OSError``/``TimeoutError`` when RabbitMQ cannot be reached and
    :class:`ConnectionLost` when it refuses the login or the virtual host.
    """
    p = parameters
    context = ssl_context
    if context is None and p.tls:
        context = ssl.create_default_context()
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(p.connect_timeout):
        _, connection = await loop.create_connection(
            lambda: Connection(p),
            p.host,
            p.port,
            ssl=context,
            server_hostname=p.host if context is not None else None,
        )
        try:
            await connection._handshake()
        except BaseException:
            connection._lose(ConnectionLost("the handshake did not finish"))
            raise
    return connection
