"""moto smoke test: a DynamoDB conditional put (the second one must fail)."""

from __future__ import annotations

import uuid

import boto3
import pytest
from botocore.exceptions import ClientError

from flowcraft_backends import RunningService


def test_conditional_put_rejects_existing_item(moto_service: RunningService) -> None:
    client = boto3.client(
        "dynamodb",
        endpoint_url=moto_service.url,
        region_name=moto_service.extra["region"],
        aws_access_key_id=moto_service.extra["aws_access_key_id"],
        aws_secret_access_key=moto_service.extra["aws_secret_access_key"],
    )
    table = f"smoke-{uuid.uuid4().hex[:12]}"
    client.create_table(
        TableName=table,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    try:

        def put(owner: str) -> None:
            client.put_item(
                TableName=table,
                Item={"pk": {"S": "lock"}, "owner": {"S": owner}},
                ConditionExpression="attribute_not_exists(pk)",
            )

        put("first")
        with pytest.raises(ClientError) as failure:
            put("second")
        assert failure.value.response["Error"]["Code"] == "ConditionalCheckFailedException"
        item = client.get_item(TableName=table, Key={"pk": {"S": "lock"}}, ConsistentRead=True)
        assert item["Item"]["owner"] == {"S": "first"}
    finally:
        client.delete_table(TableName=table)
