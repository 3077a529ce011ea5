"""Fan out to five suppliers in parallel, then join them all and pick the best offer.

    uv run flowcraft run examples/fan_out.py
    uv run flowcraft run examples/fan_out.py --context '{"sku": "GPU-4090", "quantity": 3}'

``quote`` fans out to one ``fetch_<supplier>`` node per supplier; they run at once
(each waits on simulated network latency), and ``choose`` is an ``all`` join: it runs
once every supplier has answered and receives their quotes as a dict keyed by node id.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

from flowcraft import Flow, NodeContext

SUPPLIERS: dict[str, dict[str, Any]] = {
    "acme": {"latency_ms": 40, "markup": 1.12, "ships_in_days": 2},
    "globex": {"latency_ms": 25, "markup": 1.05, "ships_in_days": 6},
    "initech": {"latency_ms": 60, "markup": 1.09, "ships_in_days": 3},
    "umbrella": {"latency_ms": 35, "markup": 1.20, "ships_in_days": 1},
    "hooli": {"latency_ms": 50, "markup": 1.07, "ships_in_days": 4},
}

DEFAULT_CONTEXT: dict[str, Any] = {"sku": "SSD-2TB-NVME", "quantity": 10, "max_days": 5}


def _base_price(sku: str) -> float:
    """A deterministic list price per SKU (stands in for a catalogue)."""
    return 50 + zlib.crc32(sku.encode()) % 400


async def quote(ctx: NodeContext) -> dict[str, Any]:
    sku = await ctx.get("sku")
    quantity = await ctx.get("quantity")
    if not isinstance(sku, str) or not isinstance(quantity, int) or quantity <= 0:
        raise ValueError("context needs 'sku' (text) and 'quantity' (a positive integer)")
    return {"sku": sku, "quantity": quantity}


async def fetch(ctx: NodeContext) -> dict[str, Any]:
    """Ask one supplier (``params.supplier``) for a price."""
    name = ctx.params["supplier"]
    terms = SUPPLIERS[name]
    await asyncio.sleep(terms["latency_ms"] / 1000)  # the network round trip
    request = ctx.input
    unit = round(_base_price(request["sku"]) * terms["markup"], 2)
    return {
        "supplier": name,
        "unit_price": unit,
        "total": round(unit * request["quantity"], 2),
        "ships_in_days": terms["ships_in_days"],
    }


async def choose(ctx: NodeContext) -> dict[str, Any]:
    """The cheapest quote that ships in time (``max_days``), else the fastest one."""
    quotes: list[dict[str, Any]] = list(ctx.input.values())
    max_days = await ctx.get("max_days")
    in_time = [q for q in quotes if max_days is None or q["ships_in_days"] <= max_days]
    best = (
        min(in_time, key=lambda q: q["total"])
        if in_time
        else min(quotes, key=lambda q: q["ships_in_days"])
    )
    await ctx.set("best_offer", best)
    await ctx.set("quotes_received", len(quotes))
    return best


flow = Flow("supplier-fan-out").node("quote", quote).node("choose", choose, join_strategy="all")
for supplier in SUPPLIERS:
    flow.node(f"fetch_{supplier}", fetch, params={"supplier": supplier})
    flow.edge("quote", f"fetch_{supplier}").edge(f"fetch_{supplier}", "choose")
