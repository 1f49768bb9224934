"""Audit and charging: a DuckDB projection of the event log (see ``schema`` for the
tables, ``projector`` for how they are written exactly once, ``reports`` for the
questions asked of them)."""

from projections.duckdb.projector import (
    AuditError,
    AuditLocked,
    AuditProjector,
    connect,
    ensure_schema,
)
from projections.duckdb.runner import catch_up, follow
from projections.duckdb.source import EmbeddedRawSource, EventLogSource, RawBatch, RawSource

__all__ = [
    "AuditError",
    "AuditLocked",
    "AuditProjector",
    "EmbeddedRawSource",
    "EventLogSource",
    "RawBatch",
    "RawSource",
    "catch_up",
    "connect",
    "ensure_schema",
    "follow",
]
