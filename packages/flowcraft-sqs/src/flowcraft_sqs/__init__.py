"""flowcraft on AWS: node jobs on SQS, run state and coordination keys in DynamoDB."""

from flowcraft_sqs._client import AwsClients, AwsSettings
from flowcraft_sqs._setup import ACTIVE_RUNS_INDEX, QueueUrls, create_queues, create_table
from flowcraft_sqs.adapter import SqsAdapter
from flowcraft_sqs.context import DEFAULT_MAX_STATE_BYTES, DynamoDbContext, RunTable
from flowcraft_sqs.coordination import DynamoDbCoordinationStore

__all__ = [
    "ACTIVE_RUNS_INDEX",
    "DEFAULT_MAX_STATE_BYTES",
    "AwsClients",
    "AwsSettings",
    "DynamoDbContext",
    "DynamoDbCoordinationStore",
    "QueueUrls",
    "RunTable",
    "SqsAdapter",
    "create_queues",
    "create_table",
]
