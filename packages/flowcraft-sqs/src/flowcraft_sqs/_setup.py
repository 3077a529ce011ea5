"""Creating the table and the queues the adapter uses (idempotent; for setup scripts and tests).

In production you may prefer CloudFormation, CDK or Terraform: the README lists
exactly what these helpers create, so the same can be declared there.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from flowcraft_sqs._client import AwsClients, error_code, logger

__all__ = ["ACTIVE_RUNS_INDEX", "QueueUrls", "create_queues", "create_table"]

ACTIVE_RUNS_INDEX = "flowcraft-active-runs"
"""The sparse global secondary index of runs that have not ended (the reconciler's)."""

# Attribute names shared with context.py and coordination.py.
PK = "pk"
INDEX_PK = "g"
INDEX_SK = "u"
TTL_ATTRIBUTE = "ttl"


async def create_table(
    clients: AwsClients,
    table_name: str = "flowcraft",
    *,
    billing_mode: str = "PAY_PER_REQUEST",
    enable_ttl: bool = True,
    wait: bool = True,
    tags: dict[str, str] | None = None,
) -> None:
    """Create the table for run state, final results and coordination keys.

    Partition key ``pk`` (string); the global secondary index ``flowcraft-active-runs``
    (``g`` string, ``u`` number, projecting ``st`` and ``rid``) that the
    reconciler queries; DynamoDB TTL on the ``ttl`` attribute. An existing table is
    left as it is (its TTL setting is still switched on).
    """
    params: dict[str, Any] = {
        "TableName": table_name,
        "KeySchema": [{"AttributeName": PK, "KeyType": "HASH"}],
        "AttributeDefinitions": [
            {"AttributeName": PK, "AttributeType": "S"},
            {"AttributeName": INDEX_PK, "AttributeType": "S"},
            {"AttributeName": INDEX_SK, "AttributeType": "N"},
        ],
        "GlobalSecondaryIndexes": [
            {
                "IndexName": ACTIVE_RUNS_INDEX,
                "KeySchema": [
                    {"AttributeName": INDEX_PK, "KeyType": "HASH"},
                    {"AttributeName": INDEX_SK, "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "INCLUDE", "NonKeyAttributes": ["st", "rid"]},
            }
        ],
        "BillingMode": billing_mode,
    }
    if billing_mode == "PROVISIONED":
        throughput = {"ReadCapacityUnits": 5, "WriteCapacityUnits": 5}
        params["ProvisionedThroughput"] = throughput
        params["GlobalSecondaryIndexes"][0]["ProvisionedThroughput"] = throughput
    if tags:
        params["Tags"] = [{"Key": k, "Value": v} for k, v in tags.items()]
    try:
        await clients.dynamodb_call("create_table", **params)
        logger.info("created DynamoDB table %s", table_name)
    except Exception as exc:
        if error_code(exc) != "ResourceInUseException":
            raise
    if wait:
        await _wait_for_table(clients, table_name)
    if enable_ttl:
        try:
            await clients.dynamodb_call(
                "update_time_to_live",
                TableName=table_name,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE},
            )
        except Exception as exc:
            # Already enabled (or being enabled): DynamoDB refuses a second change.
            if error_code(exc) != "ValidationException":
                raise


async def _wait_for_table(clients: AwsClients, table_name: str) -> None:
    async with asyncio.timeout(300.0):
        while True:
            table = (await clients.dynamodb_call("describe_table", TableName=table_name))["Table"]
            indexes = table.get("GlobalSecondaryIndexes", [])
            if table["TableStatus"] == "ACTIVE" and all(
                i.get("IndexStatus", "ACTIVE") == "ACTIVE" for i in indexes
            ):
                return
            await asyncio.sleep(1.0)


@dataclass(frozen=True, slots=True)
class QueueUrls:
    """The job queue and its dead-letter queue."""

    queue_url: str
    dead_letter_queue_url: str


async def create_queues(
    clients: AwsClients,
    queue_name: str = "flowcraft-jobs",
    *,
    fifo: bool = False,
    dead_letter_queue_name: str | None = None,
    max_receive_count: int = 10,
    visibility_timeout: int = 30,
    receive_wait_seconds: int = 20,
    message_retention_seconds: int = 4 * 24 * 3600,
    dead_letter_retention_seconds: int = 14 * 24 * 3600,
    tags: dict[str, str] | None = None,
) -> QueueUrls:
    """Create the job queue and its dead-letter queue (with a redrive policy).

    A FIFO queue's name must end in ``.fifo`` (added if missing); its dead-letter
    queue is FIFO too. ``max_receive_count`` is how many deliveries a message gets
    before SQS moves it to the dead-letter queue: keep it above every node's
    ``max_retries`` in queue retry mode. Existing queues with the same attributes are
    returned as they are.
    """
    if not 1 <= max_receive_count <= 1000:
        raise ValueError("max_receive_count must be 1..1000")
    suffix = ".fifo" if fifo else ""
    base = queue_name.removesuffix(".fifo")
    dlq_name = (dead_letter_queue_name or f"{base}-dlq").removesuffix(".fifo") + suffix
    fifo_attributes = {"FifoQueue": "true", "ContentBasedDeduplication": "false"} if fifo else {}
    tag_param = {"tags": tags} if tags else {}
    dlq_url = (
        await clients.sqs_call(
            "create_queue",
            QueueName=dlq_name,
            Attributes={
                **fifo_attributes,
                "MessageRetentionPeriod": str(dead_letter_retention_seconds),
            },
            **tag_param,
        )
    )["QueueUrl"]
    dlq_arn = (
        await clients.sqs_call(
            "get_queue_attributes", QueueUrl=dlq_url, AttributeNames=["QueueArn"]
        )
    )["Attributes"]["QueueArn"]
    redrive = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}
    queue_url = (
        await clients.sqs_call(
            "create_queue",
            QueueName=base + suffix,
            Attributes={
                **fifo_attributes,
                "VisibilityTimeout": str(visibility_timeout),
                "ReceiveMessageWaitTimeSeconds": str(receive_wait_seconds),
                "MessageRetentionPeriod": str(message_retention_seconds),
                "RedrivePolicy": json.dumps(redrive),
            },
            **tag_param,
        )
    )["QueueUrl"]
    logger.info("queues ready: %s (dead letters: %s)", queue_url, dlq_url)
    return QueueUrls(queue_url, dlq_url)
