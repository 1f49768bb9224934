"""Catching up with a log, and following it, into an audit database."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from events.log import Position
from projections.duckdb.projector import AuditError, AuditProjector, connect, ensure_schema
from projections.duckdb.source import RawBatch, RawSource

Progress = Callable[[int, int], None]
"""Called with (records ingested so far, records to ingest) after each committed batch."""

BATCH_SIZE = 245_760
"""Records per transaction while catching up: big batches amortise DuckDB's per-statement
and per-commit costs. Two DuckDB row groups (2 x 122,880 rows): whole row groups are
compressed and written once, by the insert; a partial one left by each batch would be
rewritten by the next checkpoint (that cost ~3 us/record and a third more file)."""

DERIVE_EVERY = 2_000_000
"""While catching up, the derived tables take in the new records once this many wait
(and at the end): the state machine's fixed costs (the open bindings it carries
over) are paid per derivation, not per batch."""


class _Writer:
    """Runs ``projector.write`` in one worker thread, one batch ahead of the reader."""

    def __init__(self, projector: AuditProjector) -> None:
        self.projector = projector
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="audit-writer")
        self._busy: concurrent.futures.Future[None] | None = None
        self._size = 0

    async def wait(self) -> int:
        """Wait for the write in flight; returns how many records it committed."""
        busy, size = self._busy, self._size
        if busy is None:
            return 0
        await asyncio.wrap_future(busy)
        self._busy, self._size = None, 0
        return size

    async def submit(self, batch: RawBatch) -> int:
        """Start writing ``batch`` once the previous write committed (returned)."""
        done = await self.wait()
        self._busy = self._pool.submit(self.projector.write, batch)
        self._size = len(batch)
        return done

    async def derive(self) -> None:
        """Bring the derived tables up to date (after the writes in flight)."""
        await self.wait()
        self._busy = self._pool.submit(self.projector.derive)
        await asyncio.wrap_future(self._busy)
        self._busy = None

    def close(self) -> None:
        """Stop: an interrupted write is rolled back (DuckDB interrupt), never half-done."""
        busy = self._busy
        if busy is not None and not busy.done():
            with contextlib.suppress(Exception):
                self.projector.con.interrupt()
            concurrent.futures.wait([busy])
        self._pool.shutdown(wait=True)


def _check_start(start: Position, end: Position, identity: str) -> None:
    for part, nxt in start.items():
        if nxt > end.get(part, 0):
            raise AuditError(
                f"{identity}: the log ends at offset {end.get(part, 0)} of partition {part}, "
                f"before the audit position {nxt}: was the log replaced? (use a new --db)")


async def catch_up(projector: AuditProjector, source: RawSource, *,
                   batch_size: int = BATCH_SIZE, progress: Progress | None = None,
                   end: Position | None = None, derive_every: int = DERIVE_EVERY) -> int:
    """Ingest from the stored position up to ``end`` (default: the log's end now), the
    derived tables included. Returns the records ingested. ``source`` must be open."""
    projector.check_source(source.identity)
    start = projector.position()
    if end is None:
        end = await source.end_position()
    _check_start(start, end, source.identity)
    total = sum(max(0, e - start.get(p, 0)) for p, e in end.items())
    done = 0
    if progress is not None:
        progress(0, total)
    writer = _Writer(projector)
    saved, projector.derive_every = projector.derive_every, derive_every
    try:
        async for batch in source.read(start, end, batch_size):
            done += await writer.submit(batch)
            if progress is not None:
                progress(done, total)
        done += await writer.wait()
        await writer.derive()
        if progress is not None:
            progress(done, total)
    finally:
        writer.close()
        projector.derive_every = saved
    return done


async def follow(db_path: str | os.PathLike[str], source: RawSource, *,
                 batch_size: int = BATCH_SIZE, lock_wait: float = 60.0,
                 on_batch: Callable[[int, Position], None] | None = None) -> None:
    """Catch up, then ingest new records as they are appended, forever.

    The database is opened only while a batch is written, so reports can read it
    in between (DuckDB allows one writing process, or readers, at a time).
    """
    db_path = Path(db_path)
    con = connect(db_path, wait=lock_wait)
    try:
        ensure_schema(con)
        projector = AuditProjector(con)
        projector.check_source(source.identity)
        start = projector.position()
    finally:
        con.close()
    _check_start(start, await source.end_position(), source.identity)
    async for batch in source.follow(start, batch_size):
        con = await asyncio.to_thread(connect, db_path, wait=lock_wait)
        try:
            writer = _Writer(AuditProjector(con))
            try:
                await writer.submit(batch)
                await writer.wait()
            finally:
                writer.close()
            if on_batch is not None:
                on_batch(len(batch), batch.end())
        finally:
            con.close()
