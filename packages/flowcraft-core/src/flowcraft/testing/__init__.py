"""Conformance kit: abstract pytest classes each store and adapter must pass.

Needs the ``[testing]`` extra (pytest, pytest-asyncio).
"""

from __future__ import annotations

import pytest

# Plain asserts in the kit give pytest's detailed failure messages.
pytest.register_assert_rewrite("flowcraft.testing.store")

from flowcraft.testing.store import CoordinationStoreTests, ManualClock  # noqa: E402

__all__ = ["CoordinationStoreTests", "ManualClock"]
