"""``PostgresContext``: one run's state, a ``jsonb`` row in PostgreSQL.

The state object maps each context key to the value's exact JSON text (a jsonb
string: jsonb itself would turn ``1e16`` into an int), checked and encoded by the
core's ``encode_value`` before anything is sent. Every method is one statement, so
one round trip:

==============  ===================================================================
``get``         ``state ->> $key``
``get_many``    ``state ->> k`` over ``unnest($keys)`` of the keys present
``has``         ``state ? $key``
``patch``       ``(state - $deleted_keys) || $set_object``, an upsert of the row;
                guarded: the same upsert with the guard in its ``WHERE``
``to_dict``     ``jsonb_each_text`` of the whole ``state``
==============  ===================================================================

``patch`` is atomic (one statement on one row) and its text is constant: the
keys to delete travel as a ``text[]`` parameter and the keys to set as the keys
of a JSON object parameter, so no context key ever appears in SQL text. The
operations are first collapsed to their net effect per key (the last operation
on a key wins), which makes the delete-then-merge order exact.

Context keys are top-level keys of the state object. ``jsonb - text[]`` and
``||`` are the top-level forms of ``#-`` and ``jsonb_set``: for a path of one
key, ``state #- ARRAY[k]`` is ``state - k`` and ``jsonb_set(state, ARRAY[k], v)``
is ``state || jsonb_build_object(k, v)``; the array forms apply any number of
operations in one constant statement.
"""

from __future__ import annotations

from flowcraft.distributed import RunStoreContext
from flowcraft_rabbitmq._store import PostgresRunStore

__all__ = ["PostgresContext"]


class PostgresContext(RunStoreContext[PostgresRunStore]):
    """The state of run ``run_id`` in a :class:`PostgresRunStore`."""

    __slots__ = ()
