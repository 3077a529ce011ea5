"""flowcraft on BullMQ and Redis."""
