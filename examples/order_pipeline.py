"""An order pipeline: validate, then review high-value orders or approve the rest
automatically, fulfil, and notify the customer.

    uv run flowcraft run examples/order_pipeline.py
    uv run flowcraft run examples/order_pipeline.py --context-file my_order.json
    uv run flowcraft run examples/order_pipeline.py --context '{"order": {
        "id": "A-1", "customer": {"email": "kim@example.com", "since": 2019},
        "items": [{"sku": "MUG", "quantity": 2, "unit_price": 12.5}], "country": "NL"}}'
    uv run flowcraft graph examples/order_pipeline.py

Orders totalling ``REVIEW_THRESHOLD`` or more go through a risk review, which rejects
large orders from brand-new customers and shipments to embargoed destinations; the
rest are approved automatically. Rejected orders are not fulfilled: the ``fulfil``
node is skipped and the customer is told why.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from flowcraft import Flow, NodeContext, NodeResult

REVIEW_THRESHOLD = 1000
NEW_CUSTOMER_LIMIT = 5000
EMBARGOED = frozenset({"KP", "IR", "SY"})

# Used by `flowcraft run` when no --context is given.
DEFAULT_CONTEXT: dict[str, Any] = {
    "order": {
        "id": "ORD-20240917-0042",
        "customer": {"name": "Ada Park", "email": "ada.park@example.com", "since": 2021},
        "country": "DE",
        "items": [
            {"sku": "DESK-OAK-160", "quantity": 1, "unit_price": 899.00},
            {"sku": "CHAIR-ERGO-2", "quantity": 1, "unit_price": 349.00},
            {"sku": "LAMP-LED-01", "quantity": 2, "unit_price": 39.90},
        ],
    }
}


async def validate(ctx: NodeContext) -> dict[str, Any]:
    """Check the order's shape and compute its total."""
    order = await ctx.get("order")
    if not isinstance(order, dict):
        raise ValueError("context has no 'order' object")
    problems = [
        f"missing {key!r}" for key in ("id", "customer", "items", "country") if key not in order
    ]
    items = order.get("items") or []
    if not items:
        problems.append("no items")
    total = 0.0
    for n, item in enumerate(items):
        qty, price = item.get("quantity"), item.get("unit_price")
        if not isinstance(qty, int) or qty <= 0:
            problems.append(f"item {n}: quantity must be a positive integer")
        elif not isinstance(price, int | float) or price < 0:
            problems.append(f"item {n}: unit_price must be a non-negative number")
        else:
            total += qty * price
    if problems:
        raise ValueError(f"invalid order: {'; '.join(problems)}")
    customer = order["customer"]
    checked = {
        "order_id": order["id"],
        "email": customer.get("email"),
        "customer_since": customer.get("since"),
        "country": order["country"],
        "total": round(total, 2),
        "items": len(items),
    }
    await ctx.set("checked_order", checked)
    return checked


async def review(ctx: NodeContext) -> NodeResult:
    """Risk review of a high-value order: action ``approve`` or ``reject``."""
    order = ctx.input
    reasons = []
    if order["country"] in EMBARGOED:
        reasons.append(f"cannot ship to {order['country']}")
    since = order.get("customer_since")
    if order["total"] >= NEW_CUSTOMER_LIMIT and (since is None or since >= date.today().year):
        reasons.append(f"new customer over {NEW_CUSTOMER_LIMIT}")
    decision = {
        "order_id": order["order_id"],
        "approved": not reasons,
        "by": "risk-review",
        "reasons": reasons,
    }
    await ctx.set("decision", decision)
    return NodeResult(output=order, action="reject" if reasons else "approve")


async def auto_approve(ctx: NodeContext) -> dict[str, Any]:
    order = ctx.input
    await ctx.set("decision", {"order_id": order["order_id"], "approved": True, "by": "auto"})
    return dict(order)


async def fulfil(ctx: NodeContext) -> dict[str, Any]:
    """Reserve stock and book a shipment (the id is stable across retries).

    Its input is the ``checked_order`` context key (see ``inputs=`` below), whichever
    branch approved the order."""
    order = ctx.input
    shipment = {
        "shipment_id": "SHP-" + order["order_id"].rsplit("-", 1)[-1],
        "carrier": "DHL" if order["country"] in {"DE", "AT", "NL", "BE"} else "UPS",
        "parcels": order["items"],
    }
    await ctx.set("shipment", shipment)
    return shipment


async def reject(ctx: NodeContext) -> dict[str, Any]:
    decision = await ctx.get("decision")
    return {"rejected": True, "reasons": decision["reasons"]}


async def notify(ctx: NodeContext) -> dict[str, Any]:
    """Tell the customer what happened (whichever branch ran)."""
    order = await ctx.get("checked_order")
    shipment = await ctx.get("shipment")
    if shipment is not None:
        subject = f"Order {order['order_id']} is on its way"
        body = (
            f"{shipment['carrier']} shipment {shipment['shipment_id']}, total {order['total']:.2f}"
        )
    else:
        decision = await ctx.get("decision")
        subject = f"Order {order['order_id']} could not be accepted"
        body = "; ".join(decision["reasons"])
    message = {"to": order["email"], "subject": subject, "body": body}
    await ctx.set("notification", message)
    return message


flow = (
    Flow("order-pipeline", version="1")
    .node("validate", validate)
    .node("review", review)
    .node("auto_approve", auto_approve)
    .node("fulfil", fulfil, inputs="checked_order", max_retries=3, retry_delay=200)
    .node("reject", reject)
    .node("notify", notify)
    .edge("validate", "review", condition=f"result.output.total >= {REVIEW_THRESHOLD}")
    .edge("validate", "auto_approve", condition=f"result.output.total < {REVIEW_THRESHOLD}")
    .edge("review", "fulfil", action="approve")
    .edge("review", "reject", action="reject")
    .edge("auto_approve", "fulfil")
    .edge("fulfil", "notify")
    .edge("reject", "notify")
)
