"""Every example in ``examples/`` run through the ``flowcraft`` command, end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from flowcraft.cli import main

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def run_json(example: str, *args: str) -> tuple[int, dict[str, Any], str]:
    result = invoke("run", str(EXAMPLES / example), "--json", *args)
    assert "Traceback" not in result.output
    return result.exit_code, json.loads(result.stdout), result.stderr


def ran(stderr: str) -> list[str]:
    """Nodes that started, in order, from the progress lines."""
    return [line.split()[3] for line in stderr.splitlines() if line.split()[2:3] == ["start"]]


def skipped(stderr: str) -> set[str]:
    return {line.split()[3] for line in stderr.splitlines() if line.split()[2:3] == ["skipped"]}


def order(total_items: list[tuple[int, float]], *, country: str = "DE", since: int = 2015) -> str:
    return json.dumps(
        {
            "order": {
                "id": "ORD-T-1",
                "customer": {"name": "T", "email": "t@example.com", "since": since},
                "country": country,
                "items": [
                    {"sku": f"SKU-{i}", "quantity": q, "unit_price": p}
                    for i, (q, p) in enumerate(total_items)
                ],
            }
        }
    )


# ---------------------------------------------------------------- order pipeline


def test_order_pipeline_with_no_setup_takes_the_review_branch() -> None:
    """The README's first command: sensible defaults, no --context needed."""
    result = invoke("run", str(EXAMPLES / "order_pipeline.py"))
    assert result.exit_code == 0, result.output
    context = json.loads(result.stdout)
    assert context["checked_order"]["total"] == 1327.8
    assert context["decision"] == {
        "order_id": "ORD-20240917-0042",
        "approved": True,
        "by": "risk-review",
        "reasons": [],
    }
    assert context["shipment"]["shipment_id"] == "SHP-0042"
    assert context["notification"]["subject"] == "Order ORD-20240917-0042 is on its way"
    assert ran(result.stderr) == ["validate", "review", "fulfil", "notify"]
    assert skipped(result.stderr) == {"auto_approve", "reject"}


def test_order_pipeline_small_order_is_auto_approved() -> None:
    code, payload, stderr = run_json(
        "order_pipeline.py", "--context", order([(2, 12.5)], country="NL")
    )
    assert code == 0
    context = payload["context"]
    assert context["decision"]["by"] == "auto"
    assert context["shipment"]["carrier"] == "DHL"
    assert context["notification"]["body"] == "DHL shipment SHP-1, total 25.00"
    assert ran(stderr) == ["validate", "auto_approve", "fulfil", "notify"]
    assert "review" in skipped(stderr)


def test_order_pipeline_review_rejects_and_fulfilment_is_skipped() -> None:
    code, payload, stderr = run_json(
        "order_pipeline.py", "--context", order([(3, 2400.0)], country="IR", since=2016)
    )
    assert code == 0
    context = payload["context"]
    assert context["decision"]["approved"] is False
    assert context["decision"]["reasons"] == ["cannot ship to IR"]
    assert "shipment" not in context
    assert context["_outputs.reject"] == {"rejected": True, "reasons": ["cannot ship to IR"]}
    assert context["notification"]["subject"] == "Order ORD-T-1 could not be accepted"
    assert {"fulfil", "auto_approve"} <= skipped(stderr)


def test_order_pipeline_invalid_order_fails() -> None:
    code, payload, _ = run_json("order_pipeline.py", "--context", order([(0, 10.0)]))
    assert code == 1
    assert payload["status"] == "failed"
    [error] = payload["errors"]
    assert error["nodeId"] == "validate"
    assert "quantity must be a positive integer" in error["message"]


# ---------------------------------------------------------------- fan-out


def test_fan_out_joins_every_supplier_and_picks_the_best_offer() -> None:
    code, payload, stderr = run_json("fan_out.py")
    assert code == 0
    context = payload["context"]
    suppliers = ["acme", "globex", "initech", "umbrella", "hooli"]
    quotes = [context[f"_outputs.fetch_{s}"] for s in suppliers]
    assert [q["supplier"] for q in quotes] == suppliers
    assert context["quotes_received"] == 5
    in_time = [q for q in quotes if q["ships_in_days"] <= 5]
    assert context["best_offer"] == min(in_time, key=lambda q: q["total"])
    # the five fetchers all started before any of them finished: they ran at once
    lines = [line.split()[2:4] for line in stderr.splitlines() if " ms  " in line]
    first_finish = next(
        i for i, (kind, node) in enumerate(lines) if node.startswith("fetch_") and kind == "finish"
    )
    started = [node for kind, node in lines[:first_finish] if kind == "start"]
    assert set(started) >= {f"fetch_{s}" for s in suppliers}
    assert ran(stderr)[-1] == "choose"


def test_fan_out_with_context_and_no_supplier_in_time() -> None:
    code, payload, _ = run_json(
        "fan_out.py", "-q", "--context", '{"sku": "GPU-1", "quantity": 2, "max_days": 0}'
    )
    assert code == 0
    assert payload["context"]["best_offer"]["supplier"] == "umbrella"  # the fastest


# ---------------------------------------------------------------- retry and fallback


def test_retry_then_fallback_completes_the_run() -> None:
    code, payload, stderr = run_json("retry_fallback.py")
    assert code == 0
    assert payload["status"] == "completed"
    context = payload["context"]
    assert context["_outputs.fetch_rates"]["stale"] is True
    assert context["rates_source"] == "cache"
    assert context["conversion"] == {
        "amount": 250.0,
        "from": "EUR",
        "to": "USD",
        "result": 271.25,
        "stale_rate": True,
    }
    # writes made by failed attempts were discarded, never committed
    assert not any(key.startswith("attempts.") for key in context)
    retries = [line for line in stderr.splitlines() if "retry    fetch_rates" in line]
    assert len(retries) == 2  # 3 attempts in all
    assert "attempt 1 failed: ServiceUnavailable" in retries[0]
    assert "running fallback 'cached_rates'" in stderr


# ---------------------------------------------------------------- human approval


@pytest.mark.parametrize(
    ("action", "output", "expected"),
    [
        (
            "approve",
            '{"approver": "dana"}',
            {
                "payment": {
                    "claim_id": "EXP-7731",
                    "paid": 486.2,
                    "currency": "EUR",
                    "approved_by": "dana",
                    "reference": "PAY-EXP-7731",
                }
            },
        ),
        (
            "reject",
            '{"reason": "no receipt"}',
            {
                "rejection": {
                    "to": "sam.rivera@example.com",
                    "subject": "Expense claim EXP-7731 rejected",
                    "reason": "no receipt",
                }
            },
        ),
    ],
)
def test_human_approval_awaits_then_resumes(
    tmp_path: Path, action: str, output: str, expected: dict[str, Any]
) -> None:
    example = str(EXAMPLES / "human_approval.py")
    state = tmp_path / "approval.json"
    paused = invoke("run", example, "--save-state", str(state))
    assert paused.exit_code == 3, paused.output
    assert "status: awaiting" in paused.stderr
    assert "awaiting node 'manager_approval'" in paused.stderr
    assert "--node manager_approval --action approve" in paused.stderr
    assert "payment" not in json.loads(paused.stdout)

    resumed = invoke(
        "resume",
        example,
        "--state",
        str(state),
        "--node",
        "manager_approval",
        "--action",
        action,
        "--output",
        output,
        "--json",
    )
    assert resumed.exit_code == 0, resumed.output
    payload = json.loads(resumed.stdout)
    assert payload["status"] == "completed"
    assert payload["runId"] == json.loads(state.read_text())["runId"]
    for key, value in expected.items():
        assert payload["context"][key] == value
    assert ({"payment", "rejection"} - set(expected)).isdisjoint(payload["context"])
    assert payload["context"]["summary"]["claim_id"] == "EXP-7731"


# ---------------------------------------------------------------- document pipeline (JSON)


def test_document_pipeline_json_with_registry_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    code, payload, stderr = run_json(
        "document_pipeline.json", "--registry", "examples.document_nodes:REGISTRY"
    )
    assert code == 0, stderr
    context = payload["context"]
    summaries = context["_outputs.summarize"]
    assert [s["id"] for s in summaries] == ["doc-001", "doc-002", "doc-003", "doc-004"]
    assert summaries[3]["sensitive"] == ["confidential", "legal", "settlement"]
    assert context["report"] == {
        "documents": 4,
        "flagged": 2,
        "tickets": ["REV-001", "REV-002"],
        "archived": [
            "s3://docs-archive/2024/doc-001.json",
            "s3://docs-archive/2024/doc-003.json",
        ],
    }
    assert [t["document"] for t in context["review_tickets"]] == ["doc-002", "doc-004"]
    assert ran(stderr) == [
        "load",
        "summarize",
        "rate-limit",
        "classify",
        "escalate",
        "archive",
        "report",
    ]


def test_document_pipeline_nothing_flagged_skips_escalation() -> None:
    docs = [{"id": "d1", "title": "Lunch menu", "text": "Soup and bread on Friday."}]
    code, payload, stderr = run_json(
        "document_pipeline.json",
        "--registry",
        f"{EXAMPLES / 'document_nodes.py'}:REGISTRY",
        "--context",
        json.dumps({"documents": docs}),
    )
    assert code == 0
    assert payload["context"]["report"] == {
        "documents": 1,
        "flagged": 0,
        "tickets": [],
        "archived": ["s3://docs-archive/2024/d1.json"],
    }
    assert "escalate" in skipped(stderr)


def test_document_pipeline_without_registry_is_refused() -> None:
    result = invoke("run", str(EXAMPLES / "document_pipeline.json"))
    assert result.exit_code == 2
    assert "--registry" in result.stderr


def test_document_pipeline_is_camel_case_json() -> None:
    data = json.loads((EXAMPLES / "document_pipeline.json").read_text())
    configs = [n["config"] for n in data["nodes"] if "config" in n]
    keys = {k for c in configs for k in c}
    assert {"maxRetries", "retryDelay", "joinStrategy"} <= keys


# ---------------------------------------------------------------- all examples: graph and validate


PY_EXAMPLES = sorted(p.name for p in EXAMPLES.glob("*.py") if p.name != "document_nodes.py")


def test_the_expected_examples_exist() -> None:
    assert PY_EXAMPLES == [
        "fan_out.py",
        "human_approval.py",
        "order_pipeline.py",
        "retry_fallback.py",
    ]


@pytest.mark.parametrize("example", [*PY_EXAMPLES, "document_pipeline.json"])
def test_every_example_validates_and_draws(example: str) -> None:
    args = (
        ["--registry", f"{EXAMPLES / 'document_nodes.py'}:REGISTRY"]
        if example.endswith(".json")
        else []
    )
    checked = invoke("validate", str(EXAMPLES / example), *args)
    assert checked.exit_code == 0, checked.output
    assert checked.stdout.startswith("ok: blueprint")
    drawn = invoke("graph", str(EXAMPLES / example))
    assert drawn.exit_code == 0
    assert drawn.stdout.startswith("flowchart TD\n")
