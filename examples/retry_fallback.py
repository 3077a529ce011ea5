"""Retries and a fallback: a flaky service fails every attempt, a fallback steps in,
and the run still completes.

    uv run flowcraft run examples/retry_fallback.py

``fetch_rates`` calls an exchange-rate service that is down: it is tried 3 times in
all (``max_retries`` counts attempts) with a backoff starting at ``retry_delay`` ms,
then its ``fallback`` node ``cached_rates`` supplies yesterday's rates, and its result
stands for ``fetch_rates``'s. ``convert`` never knows the difference.
"""

from __future__ import annotations

from typing import Any

from flowcraft import Flow, NodeContext

CACHED_RATES = {"base": "EUR", "rates": {"USD": 1.085, "GBP": 0.857, "JPY": 161.2}, "stale": True}

DEFAULT_CONTEXT: dict[str, Any] = {"amount": 250.0, "currency": "USD"}


class ServiceUnavailable(ConnectionError):
    pass


async def fetch_rates(ctx: NodeContext) -> dict[str, Any]:
    """Always fails: the rate service is unreachable."""
    await ctx.set(f"attempts.fetch_rates.{ctx.attempt}", "failed")  # discarded on failure
    raise ServiceUnavailable(f"rates.example.com unreachable (attempt {ctx.attempt})")


async def cached_rates(ctx: NodeContext) -> dict[str, Any]:
    """The fallback: yesterday's rates from a local cache."""
    await ctx.set("rates_source", "cache")
    return CACHED_RATES


async def convert(ctx: NodeContext) -> dict[str, Any]:
    rates = ctx.input
    amount = float(await ctx.get("amount"))
    currency = await ctx.get("currency")
    rate = rates["rates"][currency]
    converted = {
        "amount": amount,
        "from": rates["base"],
        "to": currency,
        "result": round(amount * rate, 2),
        "stale_rate": bool(rates.get("stale")),
    }
    await ctx.set("conversion", converted)
    return converted


flow = (
    Flow("rates-with-fallback")
    .node("fetch_rates", fetch_rates, max_retries=3, retry_delay=20, fallback="cached_rates")
    .node("cached_rates", cached_rates)
    .node("convert", convert)
    .edge("fetch_rates", "convert")
)
