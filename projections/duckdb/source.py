"""Where the audit projector reads records from: stored payload bytes, not decoded events.

The audit database keeps every record, including event types this siphon does not
know (written by a newer version, or by something else). ``EventLog.read`` cannot
give those (the embedded log raises :class:`~events.log.LogCorruption` on a record
that does not decode; Kafka skips or stops on it), so:

* :class:`EmbeddedRawSource` reads an embedded log's SQLite file itself (read only,
  the same ``records`` table, crc-checked like ``EmbeddedLog`` does) and yields the
  payloads as stored. It is also several times faster: no msgspec decode.
* :class:`EventLogSource` adapts any :class:`~events.log.EventLog` (Kafka): events
  are re-encoded with :func:`events.codec.encode`. Records the log itself refuses
  never reach it (see the Kafka log's ``on_bad_record``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from events.codec import encode
from events.embedded import APPLICATION_ID, FORMAT_VERSION
from events.log import EventLog, LogCorruption, LogError, Position


@dataclass(slots=True)
class RawBatch:
    """Stored records in log order: ``payloads[i]`` is at ``(partitions[i], offsets[i])``.

    ``partitions`` is a single int and ``offsets`` a ``range`` when the batch is one
    contiguous run of one partition (the embedded log's case).
    """

    partitions: int | list[int]
    offsets: range | list[int]
    payloads: list[bytes]

    def __len__(self) -> int:
        return len(self.payloads)

    def end(self) -> Position:
        """The position just after this batch (per partition present in it)."""
        if isinstance(self.partitions, int):
            assert isinstance(self.offsets, range)
            return {self.partitions: self.offsets.stop} if len(self.offsets) else {}
        out: Position = {}
        for p, o in zip(self.partitions, self.offsets, strict=True):
            if o + 1 > out.get(p, 0):
                out[p] = o + 1
        return out


class RawSource:
    """What the projector needs from a log (see the two implementations below)."""

    identity: str
    """Names the log (kind and path/topic); stored in the audit database, which then
    refuses to be fed from another log."""

    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def end_position(self) -> Position:
        raise NotImplementedError

    def read(self, start: Position, end: Position,
             batch_size: int) -> AsyncIterator[RawBatch]:
        raise NotImplementedError

    def follow(self, start: Position, batch_size: int) -> AsyncIterator[RawBatch]:
        raise NotImplementedError


_SELECT = 'SELECT payload, crc FROM records WHERE "offset" >= ? AND "offset" < ? ORDER BY "offset"'
_SELECT_WITH_OFFSETS = (
    'SELECT "offset", payload, crc FROM records '
    'WHERE "offset" >= ? AND "offset" < ? ORDER BY "offset"'
)
_NEXT = 'SELECT COALESCE(MAX("offset"), -1) + 1 FROM records'


class EmbeddedRawSource(RawSource):
    """Raw reader of an embedded (SQLite) event log file; never creates or writes it."""

    poll_interval: float = 0.5

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).absolute()
        self.identity = f"embedded:{self.path}"
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        await asyncio.to_thread(self._open_sync)

    def _open_sync(self) -> None:
        path = self.path
        if not path.is_file():
            raise LogError(f"{path}: no event log there (registrar.path of the config)")
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   timeout=10.0)
            conn.execute("PRAGMA query_only=ON")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        except sqlite3.Error as exc:
            raise LogError(f"{path}: cannot open event log: {exc}") from exc
        if app_id != APPLICATION_ID or version == 0:
            conn.close()
            raise LogError(f"{path}: not a siphon event log (application_id {app_id:#x})")
        if version > FORMAT_VERSION:
            conn.close()
            raise LogError(f"{path}: event log format {version} is newer than this siphon "
                           f"reads ({FORMAT_VERSION})")
        self._conn = conn

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LogError(f"{self.path}: event log is not open")
        return self._conn

    def _end_sync(self) -> int:
        try:
            return int(self._db().execute(_NEXT).fetchone()[0])
        except sqlite3.Error as exc:
            raise LogError(f"{self.path}: cannot read event log: {exc}") from exc

    async def end_position(self) -> Position:
        return {0: await asyncio.to_thread(self._end_sync)}

    @staticmethod
    def _offset(position: Position) -> int:
        others = sorted(p for p in position if p != 0)
        if others:
            raise LogError(f"the embedded log has partition 0 only, not {others}")
        return position.get(0, 0)

    def fetch(self, start: int, stop: int) -> RawBatch:
        """Records ``[start, stop)`` (all of them: a gap or bad crc raises LogCorruption)."""
        conn = self._db()
        try:
            rows = conn.execute(_SELECT, (start, stop)).fetchall()
        except sqlite3.Error as exc:
            raise LogError(f"{self.path}: cannot read event log: {exc}") from exc
        crc32 = zlib.crc32
        try:
            payloads = [p for p, c in rows if crc32(p) == c]
        except TypeError:  # a payload that is not a blob
            payloads = []
        if len(payloads) != stop - start:
            self._locate(start, stop)
        return RawBatch(0, range(start, stop), payloads)

    def _locate(self, start: int, stop: int) -> None:
        rows = self._db().execute(_SELECT_WITH_OFFSETS, (start, stop)).fetchall()
        expected = start
        for offset, payload, crc in rows:
            if offset != expected:
                break
            if not isinstance(payload, bytes):
                raise LogCorruption(0, offset, f"payload is not a blob in {self.path}")
            if zlib.crc32(payload) != crc:
                raise LogCorruption(0, offset, f"crc mismatch in {self.path}")
            expected += 1
        if expected < stop:
            raise LogCorruption(0, expected, f"record missing (gap in offsets) in {self.path}")

    async def read(self, start: Position, end: Position,
                   batch_size: int = 100_000) -> AsyncIterator[RawBatch]:
        """Batches from ``start`` up to ``end``; the next one is fetched while the
        caller handles the current one."""
        pos, stop = self._offset(start), self._offset(end)
        nxt: asyncio.Future[RawBatch] | None = None
        try:
            while pos < stop:
                upto = min(stop, pos + batch_size)
                batch = await (nxt or asyncio.to_thread(self.fetch, pos, upto))
                nxt = None
                pos = upto
                if pos < stop:
                    nxt = asyncio.ensure_future(
                        asyncio.to_thread(self.fetch, pos, min(stop, pos + batch_size)))
                yield batch
        finally:
            if nxt is not None:
                nxt.cancel()
                with contextlib.suppress(BaseException):
                    await nxt

    async def follow(self, start: Position,
                     batch_size: int = 100_000) -> AsyncIterator[RawBatch]:
        """What exists from ``start``, then new records as they are committed (polled)."""
        pos = self._offset(start)
        while True:
            end = await asyncio.to_thread(self._end_sync)
            if end < pos:
                raise LogError(f"{self.path}: the log ends at offset {end}, before the "
                               f"audit position {pos} (was it replaced?)")
            if end == pos:
                await asyncio.sleep(self.poll_interval)
                continue
            async for batch in self.read({0: pos}, {0: end}, batch_size):
                yield batch
            pos = end


class EventLogSource(RawSource):
    """Any :class:`EventLog`, events re-encoded to their stored JSON form."""

    def __init__(self, log: EventLog, identity: str) -> None:
        self.log = log
        self.identity = identity

    async def open(self) -> None:
        await self.log.open()

    async def close(self) -> None:
        await self.log.close()

    async def end_position(self) -> Position:
        return await self.log.end_position()

    def _full(self, position: Position) -> Position:
        return {p: position.get(p, 0) for p in range(self.log.partitions)}

    @staticmethod
    def _batch(records: list) -> RawBatch:  # list[Record]
        payloads = [encode(r.event) for r in records]
        first, last = records[0], records[-1]
        if (last.offset - first.offset == len(records) - 1
                and all(r.partition == first.partition for r in records)
                and all(r.offset == first.offset + i for i, r in enumerate(records))):
            return RawBatch(first.partition, range(first.offset, last.offset + 1), payloads)
        return RawBatch([r.partition for r in records], [r.offset for r in records], payloads)

    async def read(self, start: Position, end: Position,
                   batch_size: int = 100_000) -> AsyncIterator[RawBatch]:
        it = self.log.read(self._full(start), end, batch_size)
        async with contextlib.aclosing(it):  # type: ignore[type-var]
            async for records in it:
                yield self._batch(records)

    async def follow(self, start: Position,
                     batch_size: int = 100_000) -> AsyncIterator[RawBatch]:
        it = self.log.follow(self._full(start), batch_size)
        async with contextlib.aclosing(it):  # type: ignore[type-var]
            async for records in it:
                yield self._batch(records)
