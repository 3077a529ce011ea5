"""flowcraft: workflows that run unchanged in one process or on a fleet of workers."""
