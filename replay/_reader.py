"""Moved to :mod:`events._reader` (the embedded log's rebuild runs it too); kept so
that imports of ``replay._reader`` keep working."""

from events._reader import BATCH, ERROR, SELECT, Item, check_rows, connect, main, stream

__all__ = ["BATCH", "ERROR", "SELECT", "Item", "check_rows", "connect", "main", "stream"]
