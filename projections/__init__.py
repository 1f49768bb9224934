"""In-memory and DuckDB projections of the event log."""
