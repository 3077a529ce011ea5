"""pytest plugin: backend fixtures (placeholder until the launcher lands)."""
