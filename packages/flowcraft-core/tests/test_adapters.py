"""flowcraft.adapters: settings read from the environment and validated, errors that
never echo a value, URLs redacted for logs."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from flowcraft.adapters import (
    AdapterNotFoundError,
    AdapterPlugin,
    AdapterSettings,
    AdapterSettingsError,
    load_adapter,
    read_settings,
    redact_url,
)
from flowcraft.distributed import BaseDistributedAdapter
from flowcraft.runtime import RuntimeOptions


class ToySettings(AdapterSettings):
    model_config = SettingsConfigDict(env_prefix="FLOWCRAFT_TOY_")

    url: SecretStr
    queue_name: str = "jobs"
    batch: int = 10


def _never(settings: ToySettings, options: RuntimeOptions) -> BaseDistributedAdapter:
    raise AssertionError("not built in these tests")


TOY: AdapterPlugin[ToySettings] = AdapterPlugin("toy", ToySettings, _never, "url", "queue_name")
SECRET = "s3cr3t-p4ss"


def test_settings_come_from_the_environment_with_the_adapters_prefix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLOWCRAFT_TOY_URL", f"redis://:{SECRET}@db:6379/0")
    monkeypatch.setenv("FLOWCRAFT_TOY_BATCH", "25")
    monkeypatch.setenv("FLOWCRAFT_TOY_CONCURRENCY", "7")
    settings = read_settings(TOY)
    assert settings.url.get_secret_value() == f"redis://:{SECRET}@db:6379/0"
    assert settings.batch == 25
    assert settings.queue_name == "jobs"
    assert settings.base_options() == {"concurrency": 7}
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.model_dump())


def test_command_line_overrides_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWCRAFT_TOY_URL", "redis://env:6379")
    monkeypatch.setenv("FLOWCRAFT_TOY_QUEUE_NAME", "from-env")
    settings = read_settings(TOY, {"queue_name": "from-flag", "retry_mode": "queue"})
    assert settings.queue_name == "from-flag"
    assert settings.url.get_secret_value() == "redis://env:6379"
    assert settings.base_options() == {"retry_mode": "queue"}


def test_a_missing_setting_names_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWCRAFT_TOY_URL", raising=False)
    with pytest.raises(AdapterSettingsError, match="url \\(FLOWCRAFT_TOY_URL\\): Field required"):
        read_settings(TOY)


def test_an_invalid_value_is_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWCRAFT_TOY_URL", "redis://x")
    with pytest.raises(AdapterSettingsError) as caught:
        read_settings(TOY, {"batch": SECRET, "concurrency": "0"})
    message = str(caught.value)
    assert SECRET not in message
    assert "batch (FLOWCRAFT_TOY_BATCH)" in message
    assert "concurrency (FLOWCRAFT_TOY_CONCURRENCY)" in message


def test_an_unknown_setting_lists_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWCRAFT_TOY_URL", "redis://x")
    with pytest.raises(AdapterSettingsError, match=r"no setting 'colour'.*queue_name"):
        read_settings(TOY, {"colour": "blue"})


def test_an_adapter_that_is_not_installed_says_what_is() -> None:
    with pytest.raises(AdapterNotFoundError, match=r"no adapter named 'nope'.*flowcraft-nope"):
        load_adapter("nope")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@host:6379/0", "redis://***@host:6379/0"),
        ("amqp://guest:guest@mq:5672/vh", "amqp://guest:***@mq:5672/vh"),
        ("rediss://h:6380/0?ssl_cert_reqs=none&password=pw", "rediss://h:6380/0?..."),
        ("https://sqs.eu-west-1.amazonaws.com/1/q", "https://sqs.eu-west-1.amazonaws.com/1/q"),
        ("flowcraft-jobs", "flowcraft-jobs"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_describe_shows_address_and_queue_without_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLOWCRAFT_TOY_URL", f"redis://user:{SECRET}@db:6379/0")
    described: dict[str, Any] = TOY.describe(read_settings(TOY))
    assert described == {"url": "redis://user:***@db:6379/0", "queue": "jobs"}
