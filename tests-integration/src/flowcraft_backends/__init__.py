"""Start the real backends flowcraft's tests need (placeholder until the launcher lands)."""
