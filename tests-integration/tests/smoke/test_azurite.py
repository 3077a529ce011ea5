"""Azurite smoke test: an Azure Storage queue send, receive and delete."""

from __future__ import annotations

import uuid

from azure.storage.queue import QueueClient

from flowcraft_backends import RunningService


def test_queue_send_receive_delete(azurite_service: RunningService) -> None:
    name = f"smoke-{uuid.uuid4().hex[:12]}"
    connection_string = azurite_service.extra["connection_string"]
    with QueueClient.from_connection_string(connection_string, name) as queue:
        queue.create_queue()
        try:
            queue.send_message("hello flowcraft")
            received = list(queue.receive_messages(max_messages=5, visibility_timeout=30))
            assert [message.content for message in received] == ["hello flowcraft"]
            assert received[0].dequeue_count == 1

            queue.delete_message(received[0])

            assert queue.get_queue_properties().approximate_message_count == 0
            assert list(queue.receive_messages(max_messages=5)) == []
        finally:
            queue.delete_queue()
