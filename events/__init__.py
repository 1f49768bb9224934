"""Event schema and log backends."""
