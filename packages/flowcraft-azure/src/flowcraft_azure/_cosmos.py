"""How run state sits in Cosmos DB (NoSQL API): names, paths and predicates.

One logical partition per run (partition key path ``/run``) holds two items: ``state``
(the context) and ``result`` (the published result). Item ids are constants, so no run
id ever becomes an item id (ids cannot hold ``/ \\ ? #``); the run id goes into the
partition key value, hashed when it is long or unusual (:func:`partition_value`).

Context keys live under one object, ``/c``, each as a property named ``#`` + key whose
value is the JSON text of the context value: Cosmos numbers are doubles, so a big int
or ``0.1`` keeps its exact text this way. A deleted key is a ``null`` property (a
*tombstone*): Cosmos refuses to ``remove`` an absent property, which would fail a whole
commit, while ``set`` to ``null`` always applies. The ``#`` prefix keeps every property
name clear of names that mean something to the servers (``id``, ``_rid``, ``__proto__``
in the JavaScript test server).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "PARTITION_KEY_PATH",
    "RESULT_ID",
    "STATE_ID",
    "field_name",
    "guard_predicate",
    "partition_value",
    "patch_path",
    "sql_string",
]

PARTITION_KEY_PATH = "/run"
STATE_ID = "state"
RESULT_ID = "result"
CONTEXT_FIELD = "c"
_PREFIX = "#"
_PLAIN_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@=+-]{0,127}")


def partition_value(run_id: str) -> str:
    """The partition key value of a run: the run id itself when it is short and plain,
    else ``~`` + its SHA-256 (a plain id never starts with ``~``, so the two never meet)."""
    if _PLAIN_RUN_ID.fullmatch(run_id):
        return run_id
    return "~" + hashlib.sha256(run_id.encode("utf-8", "surrogatepass")).hexdigest()


def field_name(key: str) -> str:
    """The property under ``/c`` that holds ``key``."""
    return _PREFIX + key


def key_of(name: str) -> str:
    return name[len(_PREFIX) :]


def patch_path(key: str) -> str:
    """The patch path of ``key``: JSON Pointer (RFC 6901), ``~`` as ``~0``, ``/`` as ``~1``."""
    escaped = field_name(key).replace("~", "~0").replace("/", "~1")
    return f"/{CONTEXT_FIELD}/{escaped}"


def sql_string(text: str) -> str:
    """A Cosmos SQL string literal of ``text`` with EVERY UTF-16 unit as a ``\\uXXXX``
    escape: nothing of ``text`` can end the literal or change the query, and the test
    server (which lower-cases a filter predicate before parsing it) reads it unchanged.
    Filter predicates take no parameters, so this is how a key reaches one."""
    units = text.encode("utf-16-le", "surrogatepass")
    escaped = "".join(
        f"\\u{int.from_bytes(units[i : i + 2], 'little'):04X}" for i in range(0, len(units), 2)
    )
    return f'"{escaped}"'


def guard_predicate(guard: Mapping[str, str | None]) -> str:
    """The ``filter_predicate`` of a guarded patch. ``guard`` maps a key to the JSON text
    it must hold, or None: the key must be absent (no property, or a tombstone)."""
    terms: list[str] = []
    for key, text in guard.items():
        ref = f"c.{CONTEXT_FIELD}[{sql_string(field_name(key))}]"
        terms.append(f"NOT IS_STRING({ref})" if text is None else f"{ref} = {sql_string(text)}")
    return "FROM c WHERE (" + " AND ".join(terms) + ")"


def guard_holds(fields: Mapping[str, Any], guard: Mapping[str, str | None]) -> bool:
    """The same test on an item read into memory (the replace path of a large commit)."""
    for key, text in guard.items():
        stored = fields.get(field_name(key))
        if text is None:
            if isinstance(stored, str):
                return False
        elif stored != text:
            return False
    return True
