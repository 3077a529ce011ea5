"""``flowcraft worker --adapter sqs``: settings from ``FLOWCRAFT_SQS_*``; AWS credentials
and region come from boto3's usual chain (``AWS_*`` variables, ``~/.aws``, a role)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from flowcraft.adapters import AdapterPlugin, AdapterSettings
from flowcraft.runtime import RuntimeOptions
from flowcraft_sqs._client import AwsSettings
from flowcraft_sqs.adapter import SqsAdapter


class SqsPluginSettings(AdapterSettings):
    model_config = SettingsConfigDict(env_prefix="FLOWCRAFT_SQS_")

    queue_url: str
    table_name: str = "flowcraft"
    dead_letter_queue_url: str | None = None
    namespace: str = "flowcraft"
    region_name: str | None = None
    endpoint_url: str | None = None
    """One endpoint for SQS and DynamoDB (moto, LocalStack)."""
    wait_time_seconds: int = Field(default=20, ge=0, le=20)


def build(settings: SqsPluginSettings, runtime_options: RuntimeOptions) -> SqsAdapter:
    return SqsAdapter(
        runtime_options=runtime_options,
        queue_url=settings.queue_url,
        table_name=settings.table_name,
        dead_letter_queue_url=settings.dead_letter_queue_url,
        namespace=settings.namespace,
        wait_time_seconds=settings.wait_time_seconds,
        aws=AwsSettings(region_name=settings.region_name, endpoint_url=settings.endpoint_url),
        **settings.base_options(),
    )


ADAPTER = AdapterPlugin("sqs", SqsPluginSettings, build, "endpoint_url", "queue_url")
