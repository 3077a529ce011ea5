"""docker-compose.yml stays in step with the service modules (no backend needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flowcraft_backends import services
from flowcraft_backends._process import PORT_RANGE

COMPOSE = Path(__file__).resolve().parents[3] / "docker-compose.yml"


def _compose_services() -> dict[str, dict[str, str]]:
    """Service name -> {"image": ..., "ports": ...} from the two-space-indented YAML."""
    found: dict[str, dict[str, str]] = {}
    current: str | None = None
    for line in COMPOSE.read_text().splitlines():
        if match := re.fullmatch(r"  ([a-z0-9_-]+):", line):
            current = match.group(1)
            found[current] = {}
        elif current and (match := re.fullmatch(r"    (image|ports): (.+)", line)):
            found[current][match.group(1)] = match.group(2).strip()
    return found


def _exports() -> dict[str, str]:
    text = COMPOSE.read_text()
    return dict(re.findall(r"^#\s+export (FLOWCRAFT_TEST_\w+)=(\S+)$", text, re.MULTILINE))


@pytest.mark.parametrize("name", services.names())
def test_compose_uses_the_service_image(name: str) -> None:
    service = services.get(name)
    assert _compose_services()[name]["image"] == service.docker_image


@pytest.mark.parametrize("name", services.names())
def test_compose_header_exports_the_env_var(name: str) -> None:
    service = services.get(name)
    exports = _exports()
    assert service.env_var in exports
    host_port = re.search(r"127\.0\.0\.1:(\d+)", exports[service.env_var])
    assert host_port is not None
    published = _compose_services()[name]["ports"]
    assert f"127.0.0.1:{host_port.group(1)}:" in published


def test_host_ports_avoid_the_ephemeral_range() -> None:
    for name, facts in _compose_services().items():
        for port in re.findall(r"127\.0\.0\.1:(\d+):", facts["ports"]):
            assert not 32768 <= int(port) <= 60999, name
    low, high = PORT_RANGE
    assert high < 32768
    assert low >= 1024


def test_ci_smoke_job_uses_the_same_addresses() -> None:
    workflow = (COMPOSE.parent / ".github" / "workflows" / "ci.yml").read_text()
    ci_env = dict(re.findall(r"^\s+(FLOWCRAFT_TEST_\w+): (\S+)$", workflow, re.MULTILINE))
    assert ci_env == _exports()
