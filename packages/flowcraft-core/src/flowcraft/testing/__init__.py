"""Conformance kit: abstract pytest classes each store and adapter must pass, the
deterministic crash simulation of the distributed protocol, and the replay of a
recorded run against new node code (``replay_run``).

Needs the ``[testing]`` extra (pytest, pytest-asyncio).
"""

from __future__ import annotations

import pytest

# Plain asserts in the kit give pytest's detailed failure messages.
pytest.register_assert_rewrite(
    "flowcraft.testing.store",
    "flowcraft.testing.context",
    "flowcraft.testing.adapter",
    "flowcraft.testing.simulation",
)

from flowcraft.testing.adapter import (  # noqa: E402
    AdapterConformanceTests,
    AdapterFactory,
    ContextMeter,
    Fleet,
    SideEffects,
    meter_contexts,
)
from flowcraft.testing.context import ContextStoreTests  # noqa: E402
from flowcraft.testing.replay import ReplayReport, StepChange, replay_run  # noqa: E402
from flowcraft.testing.store import CoordinationStoreTests, ManualClock  # noqa: E402

_SIMULATION = frozenset({"SimulatedCrash", "SimulationReport", "VirtualTimeLoop", "run_seed"})


def __getattr__(name: str) -> object:
    # Lazy, so ``python -m flowcraft.testing.simulation`` does not import it twice.
    if name in _SIMULATION:
        from flowcraft.testing import simulation

        return getattr(simulation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdapterConformanceTests",
    "AdapterFactory",
    "ContextMeter",
    "ContextStoreTests",
    "CoordinationStoreTests",
    "Fleet",
    "ManualClock",
    "ReplayReport",
    "SideEffects",
    "SimulatedCrash",
    "SimulationReport",
    "StepChange",
    "VirtualTimeLoop",
    "meter_contexts",
    "replay_run",
    "run_seed",
]
