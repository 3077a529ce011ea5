"""SQS's message formats and limits, as the adapter sends and reads them."""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

MAX_VISIBILITY_SECONDS = 12 * 3600  # SQS's ceiling for ChangeMessageVisibility
MAX_DELAY_SECONDS = 900  # SQS's ceiling for a message's DelaySeconds
BATCH = 10  # SQS's batch size for receive, send and delete
BATCH_BYTES = 200 * 1024  # below SQS's limit on a batch's total payload
_GROUP_ID = re.compile(r"[!-~]{1,128}")
ERROR_ATTRIBUTE = "flowcraft-error"


@dataclass(slots=True)
class Poll:
    """One long poll that the worker may abandon: whoever takes the lock first decides
    whether the messages go to the worker or straight back to the queue."""

    lock: threading.Lock
    taken: bool = False
    abandoned: bool = False


def retrieve(future: asyncio.Future[Any]) -> None:
    """Consume an abandoned poll's outcome so asyncio does not log it as unretrieved."""
    if not future.cancelled():
        future.exception()


def receive_count(message: Mapping[str, Any]) -> int:
    return int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))


def message_group(message: Mapping[str, Any]) -> str:
    """The FIFO group a received message came in (``flowcraft`` on standard queues)."""
    return str(message.get("Attributes", {}).get("MessageGroupId", "flowcraft"))


def group_id(value: str) -> str:
    """A valid FIFO ``MessageGroupId`` (printable ASCII, <= 128): long or exotic ids are
    hashed."""
    if _GROUP_ID.fullmatch(value):
        return value
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def string_attribute(value: str) -> dict[str, str]:
    return {"DataType": "String", "StringValue": value}


def number_attribute(value: float) -> dict[str, str]:
    return {"DataType": "Number", "StringValue": str(value)}


def batches(messages: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Messages in request-sized batches (count and total body size)."""
    batch: list[dict[str, Any]] = []
    size = 0
    for message in messages:
        body = len(message["MessageBody"].encode())
        if batch and (len(batch) == BATCH or size + body > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(message)
        size += body
    if batch:
        yield batch


_INVALID_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def clean(text: str, limit: int = 4000) -> str:
    """Text SQS accepts in a message attribute (XML characters), shortened."""
    return _INVALID_XML.sub("?", text)[:limit] or "?"
