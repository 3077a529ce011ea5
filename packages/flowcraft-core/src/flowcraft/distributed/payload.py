"""``JobPayload``: the message one node job carries, in the seed's exact wire form."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from flowcraft.errors import PayloadDecodeError

__all__ = ["MAX_PAYLOAD_BYTES", "JobPayload"]

MAX_PAYLOAD_BYTES = 64 * 1024


class JobPayload(BaseModel):
    """``{"runId", "blueprintId", "nodeId", "attempt", "isLastAttempt"}``.

    The job names a node, not an activation: the worker finds which activation is
    pending from the run's state, so a redelivered or duplicated job is harmless.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        strict=True,
    )

    run_id: str = Field(min_length=1, max_length=512)
    blueprint_id: str = Field(min_length=1, max_length=512)
    node_id: str = Field(min_length=1, max_length=1024)
    attempt: int | None = Field(default=None, ge=1)
    is_last_attempt: bool | None = None

    def to_wire(self) -> dict[str, Any]:
        """The camelCase dict, with ``attempt``/``isLastAttempt`` only when set."""
        return self.model_dump(by_alias=True, exclude_none=True)

    def encode(self) -> bytes:
        return json.dumps(self.to_wire(), separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def decode(cls, raw: bytes | str | dict[str, Any]) -> JobPayload:
        """Decode untrusted input; any problem is a ``PayloadDecodeError`` saying what."""
        if isinstance(raw, bytes | bytearray | memoryview):
            if len(raw) > MAX_PAYLOAD_BYTES:
                raise PayloadDecodeError(f"job payload is {len(raw)} bytes; the limit is 64 KiB")
            try:
                raw = bytes(raw).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PayloadDecodeError(f"job payload is not UTF-8: {exc}") from None
        if isinstance(raw, str):
            if len(raw) > MAX_PAYLOAD_BYTES:
                raise PayloadDecodeError("job payload is larger than 64 KiB")
            try:
                raw = json.loads(raw)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise PayloadDecodeError(f"job payload is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise PayloadDecodeError(f"job payload must be a JSON object, not {type(raw).__name__}")
        try:
            return cls.model_validate(raw, by_alias=True)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}"
                for e in exc.errors()
            )
            raise PayloadDecodeError(f"invalid job payload: {problems}") from None
