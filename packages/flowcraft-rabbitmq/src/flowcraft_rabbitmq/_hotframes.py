"""The frames every job sends or receives, packed and unpacked with ``struct``.

pamqp reads and writes any frame generically, at 12-15 us for a delivery's method or
content header on this kind of machine: about a tenth of a job's AMQP budget. These
are the AMQP 0-9-1 layouts of ``Basic.Deliver``, ``Basic.Ack`` and a content header
whose only properties are ``content_type``, ``delivery_mode`` and ``message_id`` (a
job as the Broker publishes it); anything else goes through pamqp.
``tests/test_amqp.py`` pins them byte for byte against pamqp.
"""

from __future__ import annotations

import struct
from typing import Any

from pamqp import commands as amqp

__all__ = [
    "BASIC_ACK",
    "BASIC_DELIVER",
    "JOB_FLAGS",
    "ack_frame",
    "body_frame",
    "class_method",
    "job_header_frame",
    "read_ack",
    "read_deliver",
    "read_job_header",
]

_BASIC = 60
_DELIVER = 60
_ACK = 80
_METHOD = 1
_HEADER = 2
_END = b"\xce"

BASIC_DELIVER = (_BASIC, _DELIVER)
BASIC_ACK = (_BASIC, _ACK)

# property flags, highest bit first: content_type, ..., delivery_mode (bit 12), ...,
# message_id (bit 7)
JOB_FLAGS = 0x8000 | 0x1000 | 0x0080

_ACK_FRAME = struct.Struct(">BHIHHQBB")
_ACK_BODY = struct.Struct(">QB")
_CLASS_METHOD = struct.Struct(">HH")
_HEADER_FIELDS = struct.Struct(">HHQH")
_TAG = struct.Struct(">Q")


def ack_frame(channel: int, delivery_tag: int) -> bytes:
    """A ``Basic.Ack`` of one delivery."""
    return _ACK_FRAME.pack(_METHOD, channel, 13, _BASIC, _ACK, delivery_tag, 0, 0xCE)


_FRAME_START = struct.Struct(">BHI")
_BODY = 3


def body_frame(channel: int, chunk: bytes) -> bytes:
    """A content body frame (``chunk`` at most ``frame_max - 8`` bytes)."""
    return b"".join((_FRAME_START.pack(_BODY, channel, len(chunk)), chunk, _END))


def class_method(payload: bytes) -> tuple[int, int]:
    """A method frame payload's class and method ids."""
    class_id, method_id = _CLASS_METHOD.unpack_from(payload)
    return class_id, method_id


def read_ack(payload: bytes) -> tuple[int, bool]:
    """A ``Basic.Ack``'s ``delivery_tag`` and ``multiple`` (payload after class/method)."""
    tag, bits = _ACK_BODY.unpack_from(payload, 4)
    return tag, bool(bits & 1)


def read_deliver(payload: bytes) -> amqp.Basic.Deliver:
    """A ``Basic.Deliver`` method (payload: the frame between header and end byte)."""
    at = 4
    size = payload[at]
    consumer_tag = payload[at + 1 : at + 1 + size].decode()
    at += 1 + size
    (delivery_tag,) = _TAG.unpack_from(payload, at)
    redelivered = bool(payload[at + 8] & 1)
    at += 9
    size = payload[at]
    exchange = payload[at + 1 : at + 1 + size].decode()
    at += 1 + size
    size = payload[at]
    routing_key = payload[at + 1 : at + 1 + size].decode()
    return amqp.Basic.Deliver(
        consumer_tag=consumer_tag,
        delivery_tag=delivery_tag,
        redelivered=redelivered,
        exchange=exchange,
        routing_key=routing_key,
    )


def job_header_frame(channel: int, body_size: int, content_type: str, message_id: str) -> bytes:
    """The content header of a persistent job message (no headers, no expiration)."""
    ctype = content_type.encode()
    mid = message_id.encode()
    payload = b"".join(
        (
            _HEADER_FIELDS.pack(_BASIC, 0, body_size, JOB_FLAGS),
            bytes((len(ctype),)),
            ctype,
            b"\x02",  # delivery_mode: persistent
            bytes((len(mid),)),
            mid,
        )
    )
    return b"".join((_FRAME_START.pack(_HEADER, channel, len(payload)), payload, _END))


def read_job_header(payload: bytes) -> tuple[int, Any] | None:
    """A job's content header: (body size, properties), or None if it has other
    properties (pamqp reads those)."""
    _class, _weight, body_size, flags = _HEADER_FIELDS.unpack_from(payload)
    if flags != JOB_FLAGS:
        return None
    at = 14
    size = payload[at]
    content_type = payload[at + 1 : at + 1 + size].decode()
    at += 1 + size
    delivery_mode = payload[at]
    at += 1
    size = payload[at]
    message_id = payload[at + 1 : at + 1 + size].decode()
    properties = amqp.Basic.Properties(
        content_type=content_type, delivery_mode=delivery_mode, message_id=message_id
    )
    return body_size, properties
