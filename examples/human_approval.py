"""Human in the loop: an expense claim pauses for a manager's decision.

    uv run flowcraft run examples/human_approval.py --save-state approval.json
    # the run ends "awaiting" (exit status 3); later, the manager decides:
    uv run flowcraft resume examples/human_approval.py --state approval.json \\
        --node manager_approval --action approve --output '{"approver": "dana"}'

``manager_approval`` is a wait node. Resuming it with ``--action approve`` pays the
claim; ``--action reject`` tells the employee instead. ``--output`` becomes the wait
node's output, which the next node receives as its input.
"""

from __future__ import annotations

from typing import Any

from flowcraft import Flow, NodeContext

DEFAULT_CONTEXT: dict[str, Any] = {
    "claim": {
        "id": "EXP-7731",
        "employee": "sam.rivera@example.com",
        "amount": 486.20,
        "currency": "EUR",
        "purpose": "Client workshop travel, Lyon",
    }
}


async def submit(ctx: NodeContext) -> dict[str, Any]:
    claim = await ctx.get("claim")
    if not isinstance(claim, dict) or float(claim.get("amount", 0)) <= 0:
        raise ValueError("context needs a 'claim' with a positive 'amount'")
    summary = {
        "claim_id": claim["id"],
        "employee": claim["employee"],
        "amount": round(float(claim["amount"]), 2),
        "currency": claim.get("currency", "EUR"),
    }
    await ctx.set("summary", summary)
    return summary


async def pay(ctx: NodeContext) -> dict[str, Any]:
    summary = await ctx.get("summary")
    decision = ctx.input if isinstance(ctx.input, dict) else {}
    payment = {
        "claim_id": summary["claim_id"],
        "paid": summary["amount"],
        "currency": summary["currency"],
        "approved_by": decision.get("approver", "unknown"),
        "reference": f"PAY-{summary['claim_id']}",
    }
    await ctx.set("payment", payment)
    return payment


async def notify_rejection(ctx: NodeContext) -> dict[str, Any]:
    summary = await ctx.get("summary")
    decision = ctx.input if isinstance(ctx.input, dict) else {}
    message = {
        "to": summary["employee"],
        "subject": f"Expense claim {summary['claim_id']} rejected",
        "reason": decision.get("reason", "no reason given"),
    }
    await ctx.set("rejection", message)
    return message


flow = (
    Flow("expense-approval")
    .node("submit", submit)
    .wait("manager_approval")
    .node("pay", pay)
    .node("notify_rejection", notify_rejection)
    .edge("submit", "manager_approval")
    .edge("manager_approval", "pay", action="approve")
    .edge("manager_approval", "notify_rejection", action="reject")
)
