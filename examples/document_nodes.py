"""Implementations for ``document_pipeline.json``, by ``uses`` key (``REGISTRY``).

    uv run flowcraft run examples/document_pipeline.json --registry examples.document_nodes:REGISTRY

A worker running that blueprint imports this module and hands ``REGISTRY`` to its
runtime; the blueprint itself stays plain JSON (the TypeScript flowcraft's form).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from flowcraft import NodeContext
from flowcraft.node import NodeImplementation

SAMPLE_DOCUMENTS: list[dict[str, str]] = [
    {
        "id": "doc-001",
        "title": "Q3 supplier contract renewal",
        "text": "The supplier agrees to renew the contract for twelve months. Prices rise by "
        "three percent. Either party may terminate with ninety days notice.",
    },
    {
        "id": "doc-002",
        "title": "Incident report: payment outage",
        "text": "Card payments failed for 42 minutes after a certificate expired. Customers "
        "saw errors at checkout. The certificate was renewed and monitoring added.",
    },
    {
        "id": "doc-003",
        "title": "Team offsite agenda",
        "text": "Morning: roadmap review. Afternoon: hiking. Dinner at the harbour. Bring "
        "comfortable shoes and a rain jacket.",
    },
    {
        "id": "doc-004",
        "title": "Customer complaint escalation",
        "text": "The customer threatens legal action over a delayed refund. Contact them "
        "within 24 hours with a confidential settlement offer.",
    },
]

SENSITIVE = ("legal", "confidential", "outage", "settlement", "breach")
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "the",
        "of",
        "for",
        "to",
        "with",
        "by",
        "at",
        "in",
        "on",
        "was",
        "after",
        "over",
        "them",
        "their",
    ]
)


async def load_documents(ctx: NodeContext) -> list[dict[str, str]]:
    """The ``documents`` context key, or a small sample corpus."""
    docs = await ctx.get("documents")
    if docs is None:
        docs = SAMPLE_DOCUMENTS
    if not isinstance(docs, list) or not all(isinstance(d, dict) and "text" in d for d in docs):
        raise ValueError("'documents' must be a list of objects with a 'text'")
    return docs


async def summarize_document(ctx: NodeContext) -> dict[str, Any]:
    """One batch item: the first sentence and the top keywords of one document."""
    doc = ctx.input
    max_words = int(ctx.params.get("maxKeywords", 3))
    text = doc["text"]
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    words = [w for w in re.findall(r"[a-z]+", text.lower()) if w not in STOPWORDS and len(w) > 3]
    keywords = [w for w, _ in Counter(words).most_common(max_words)]
    haystack = f"{doc.get('title', '')} {text}".lower()
    hits = sorted({w for w in SENSITIVE if w in haystack})
    return {
        "id": doc.get("id"),
        "title": doc.get("title", ""),
        "summary": first,
        "keywords": keywords,
        "sensitive": hits,
    }


async def classify_documents(ctx: NodeContext) -> dict[str, Any]:
    """Split the summaries into flagged (sensitive terms found) and clean ones."""
    summaries = ctx.input
    flagged = [s for s in summaries if s["sensitive"]]
    clean = [s for s in summaries if not s["sensitive"]]
    return {"flagged": flagged, "clean": clean, "total": len(summaries)}


async def escalate(ctx: NodeContext) -> dict[str, Any]:
    """Open a review ticket per flagged document."""
    flagged = ctx.input
    tickets = [
        {"ticket": f"REV-{i + 1:03d}", "document": s["id"], "terms": s["sensitive"]}
        for i, s in enumerate(flagged)
    ]
    await ctx.set("review_tickets", tickets)
    return {"tickets": len(tickets)}


async def archive(ctx: NodeContext) -> dict[str, Any]:
    """Archive the clean documents (here: record where they would go)."""
    clean = ctx.input
    bucket = ctx.params.get("bucket", "archive")
    stored = [f"{bucket}/{s['id']}.json" for s in clean]
    await ctx.set("archived", stored)
    return {"archived": len(stored)}


async def report(ctx: NodeContext) -> dict[str, Any]:
    classified = await ctx.get("_outputs.classify")
    tickets = await ctx.get("review_tickets") or []
    archived = await ctx.get("archived") or []
    result = {
        "documents": classified["total"],
        "flagged": len(classified["flagged"]),
        "tickets": [t["ticket"] for t in tickets],
        "archived": archived,
    }
    await ctx.set("report", result)
    return result


REGISTRY: dict[str, NodeImplementation] = {
    "load-documents": load_documents,
    "summarize-document": summarize_document,
    "classify-documents": classify_documents,
    "escalate": escalate,
    "archive": archive,
    "report": report,
}
