import json

import pytest

from flowcraft import PayloadDecodeError
from flowcraft.distributed.payload import JobPayload


def test_wire_form_is_the_seeds_camel_case() -> None:
    job = JobPayload(run_id="r1", blueprint_id="bp", node_id="n", attempt=2, is_last_attempt=False)
    assert json.loads(job.encode()) == {
        "runId": "r1",
        "blueprintId": "bp",
        "nodeId": "n",
        "attempt": 2,
        "isLastAttempt": False,
    }
    assert JobPayload.decode(job.encode()) == job


def test_optional_fields_are_omitted() -> None:
    job = JobPayload(run_id="r", blueprint_id="b", node_id="n")
    assert job.to_wire() == {"runId": "r", "blueprintId": "b", "nodeId": "n"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"{not json", "not JSON"),
        (b"[1,2]", "JSON object"),
        (b'{"runId":"r","blueprintId":"b"}', "nodeId"),
        (b'{"runId":"r","blueprintId":"b","nodeId":"n","evil":1}', "evil"),
        (b'{"runId":1,"blueprintId":"b","nodeId":"n"}', "runId"),
        (b'{"runId":"r","blueprintId":"b","nodeId":"n","attempt":0}', "attempt"),
        (b"x" * (65 * 1024), "64 KiB"),
        (b"[" * 50_000, "not JSON"),
    ],
)
def test_untrusted_bytes_raise_one_clear_error(raw: bytes, message: str) -> None:
    with pytest.raises(PayloadDecodeError, match=message):
        JobPayload.decode(raw)
