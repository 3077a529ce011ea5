"""Every key the distributed protocol uses, in one place.

Two stores, two kinds of key (the design note, DISTRIBUTED.md, says who writes each):

* Context keys live in the run's context and change only through ``patch``, so
  they commit atomically with a node's output. They start with ``_flowcraft.``
  (reserved) or ``_outputs.`` (node outputs, as in the original).
* Coordination keys live in the coordination store (counters, leases, the final
  status). Their parts are joined with ``:``; a run id or node id containing
  ``:`` cannot collide with another because each key kind has a fixed number of
  parts and ids are escaped.
"""

from __future__ import annotations

RESERVED_PREFIX = "_flowcraft."
OUTPUTS_PREFIX = "_outputs."

META = "_flowcraft.meta"  # {"blueprintId", "version"}: written by start_run
STATUS = "_flowcraft.status"  # {"status", "errors"}: running/awaiting/completed/failed/cancelled

FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
"""A run in one of these has ended: its jobs drop themselves."""
REQUEST = "_flowcraft.request"  # str: fingerprint of the start request (blueprint, initial context)
ORIGIN = "_flowcraft.origin"
"""{str: str}: who started the run, as ``run_origin()`` described it at ``start_run``
(the caller's trace context): every worker's spans of the run join that trace."""
ENDED = "_flowcraft.end"
"""str: the run's final status, once it has one. Every commit, pause, resume and
failure record is guarded on its absence, so nothing changes a run after it ended
(cancel_run writes it first)."""


def output(node_id: str) -> str:
    return OUTPUTS_PREFIX + node_id


def resolved(node_id: str) -> str:
    """How many activations of the node have resolved (run or skipped)."""
    return f"_flowcraft.n.{node_id}"


def activation(node_id: str, generation: int) -> str:
    """The record that activates generation ``g``: ``{"skip", "inputs", "gathered"}``."""
    head, tail = activation_parts(node_id)
    return f"{head}{generation}{tail}"


def activation_parts(node_id: str) -> tuple[str, str]:
    """``activation(node_id, g)`` is ``head + str(g) + tail``: for a server-side script
    that derives ``g`` itself."""
    return "_flowcraft.a.", f".{node_id}"


def decision(node_id: str, generation: int) -> str:
    """What activation ``g`` chose: ``{"skip": bool, "chosen": [edge index, ...]}``."""
    return f"_flowcraft.d.{generation}.{node_id}"


def waiting(node_id: str) -> str:
    """Set while a wait node is paused: the paused generation."""
    return f"_flowcraft.w.{node_id}"


def timer(node_id: str) -> str:
    """A suspended activation that resumes by itself or by a signal:
    ``{"g", "due", "event", "token"}`` (``due``: epoch seconds or None). Written with
    a sleep's first delivery or a wait's pause; deleted by the resolution."""
    return f"_flowcraft.t.{node_id}"


def signalled(node_id: str) -> str:
    """What resolved the node's last wait: ``{"g", "fp"}`` (``fp``: the fingerprint of
    the signal, or ``timeout``), so a repeated signal is told apart from a rival."""
    return f"_flowcraft.sig.{node_id}"


def loop_exit(loop_index: int) -> str:
    """The iteration in which a loop stopped (its exit edges signal from it)."""
    return f"_flowcraft.x.{loop_index}"


def error(node_id: str) -> str:
    return f"_flowcraft.e.{node_id}"


def is_reserved(key: str) -> bool:
    return key.startswith(RESERVED_PREFIX)


def _esc(part: str) -> str:
    return part.replace("%", "%25").replace(":", "%3A")


def lease(prefix: str, run_id: str, node_id: str, generation: int) -> str:
    return f"{lease_stem(prefix, run_id, node_id)}{generation}"


def lease_stem(prefix: str, run_id: str, node_id: str) -> str:
    """``lease(...)`` without the generation at its end: for a server-side script that
    derives the generation itself."""
    return f"{prefix}lease:{_esc(run_id)}:{_esc(node_id)}:"


def followed_up(prefix: str, run_id: str, node_id: str, generation: int) -> str:
    """Set once everything after a resolution is done; a duplicate that finds it acks at once."""
    return f"{prefix}done:{_esc(run_id)}:{_esc(node_id)}:{generation}"


def join_counter(prefix: str, run_id: str, node_id: str, generation: int) -> str:
    return f"{prefix}join:{_esc(run_id)}:{_esc(node_id)}:{generation}"


def any_fired(prefix: str, run_id: str, node_id: str, generation: int) -> str:
    return f"{prefix}fired:{_esc(run_id)}:{_esc(node_id)}:{generation}"


def latch_counter(prefix: str, run_id: str, loop_index: int, iteration: int) -> str:
    return f"{prefix}latch:{_esc(run_id)}:{loop_index}:{iteration}"


def end_counter(prefix: str, run_id: str) -> str:
    return f"{prefix}end:{_esc(run_id)}"


def final(prefix: str, run_id: str) -> str:
    """The run's one final status: the first ``set_if_not_exist`` wins."""
    return f"{prefix}final:{_esc(run_id)}"


def result(prefix: str, run_id: str) -> str:
    """A run's published final result (JSON), where results live in Redis."""
    return f"{prefix}result:{_esc(run_id)}"


def results_channel(prefix: str) -> str:
    """Pub/sub channel: the id of every run whose result was just published."""
    return f"{prefix}results"


def reconciler(prefix: str) -> str:
    """Held for one reconciler interval by the worker that reconciles the fleet's runs."""
    return f"{prefix}reconciler"


def token(prefix: str, token: str) -> str:
    """The run whose wait carries this correlation token (``signal`` by token)."""
    return f"{prefix}token:{_esc(token)}"


def attempts(prefix: str, run_id: str, node_id: str, generation: int) -> str:
    """Failed queue-mode attempts of an activation (counted by the base, so hand-backs
    of a busy or foreign delivery never count)."""
    return f"{prefix}attempts:{_esc(run_id)}:{_esc(node_id)}:{generation}"
