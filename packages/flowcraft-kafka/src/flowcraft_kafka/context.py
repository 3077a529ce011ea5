"""``CassandraContext``: one run's state, a partition of rows (one per key) in Cassandra.

==============  ==============================================================
``get``         ``SELECT v ... WHERE ns, run, k``
``get_many``    ``SELECT k, v ... WHERE ns, run AND k IN ?`` (100 keys a request)
``patch``       one single-partition batch of upserts and deletes (O(delta));
                with ``guard``, the same batch as one lightweight transaction
``to_dict``     the run's partition, paged
==============  ==============================================================

See :mod:`flowcraft_kafka._cassandra` for why this layout, the timestamps and the
guarded patch's timeouts.
"""

from __future__ import annotations

from flowcraft.distributed import RunStoreContext
from flowcraft_kafka._cassandra import CassandraRunStore

__all__ = ["CassandraContext"]


class CassandraContext(RunStoreContext[CassandraRunStore]):
    """The state of run ``run_id`` in a :class:`CassandraRunStore`."""

    __slots__ = ()
