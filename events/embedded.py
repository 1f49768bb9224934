"""Embedded (single-node) event log on SQLite in WAL mode.

One table holds the records; partition is always 0 and offsets are 0-based
consecutive integers. Appends from many coroutines are grouped by a single
writer task into one transaction (one fsync) per batch; the SQLite calls run
in worker threads so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import gc
import logging
import os
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from events import _reader
from events.codec import EventDecodeError, decode, encode
from events.log import EventLog, LogCorruption, LogError, Position, Record
from events.schema import EVENT_TYPES, Event, event_key

log = logging.getLogger("siphon.events.embedded")

FORMAT_VERSION = 1
"""On-disk format, kept in ``PRAGMA user_version``; bump on incompatible change."""

APPLICATION_ID = 0x53495048
"""``PRAGMA application_id`` marking a SQLite file as a siphon event log ("SIPH")."""

_SQLITE_MAGIC = b"SQLite format 3\x00"
_HEADER_SIZE = 100

_CREATE = (
    'CREATE TABLE records ("offset" INTEGER PRIMARY KEY, ts REAL NOT NULL, '
    "key TEXT NOT NULL, payload BLOB NOT NULL, crc INTEGER NOT NULL)"
)
_INSERT_HEAD = 'INSERT INTO records ("offset", ts, key, payload, crc) VALUES '
_INSERT_CHUNK = 500
"""Rows per INSERT statement (fewer if SQLite allows fewer than 5 x that variables).

One multi-row statement per chunk instead of ``executemany``: the sqlite3 module
releases the GIL around every statement step, and the writer thread then waits up
to the interpreter's switch interval (5 ms) to get it back from a busy event loop.
Per row, a 2,000-row commit took seconds under load; per chunk, milliseconds."""
_NEXT = 'SELECT COALESCE(MAX("offset"), -1) + 1 FROM records'
_SELECT = 'SELECT payload, crc FROM records WHERE "offset" >= ? AND "offset" < ? ORDER BY "offset"'
_SELECT_WITH_OFFSETS = (
    'SELECT "offset", payload, crc FROM records '
    'WHERE "offset" >= ? AND "offset" < ? ORDER BY "offset"'
)

KEY_INDEX = "records_key"
"""Index on ``records(key)`` (entries are (key, offset): one key's records come out of
it in offset order). Added beside format 1: a log without it still opens (it is built
then), and a siphon that does not know it keeps it up to date (SQLite does)."""
_CREATE_KEY_INDEX = f"CREATE INDEX IF NOT EXISTS {KEY_INDEX} ON records (key)"
_HAS_KEY_INDEX = "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?"
SELECT_KEY = (
    f'SELECT "offset", payload, crc FROM records INDEXED BY {KEY_INDEX} '
    'WHERE key = ? AND "offset" >= ? AND "offset" < ? ORDER BY "offset" LIMIT ?'
)
"""One key's records in ``[start, stop)``, at most ``limit``, through the key index
(``INDEXED BY``: never a table scan; an error if the index is missing)."""
KEY_INDEX_NOTE_EVERY = 10.0
"""Seconds between "still building" notes while the key index is built at open."""

_CREATE_GROUPS = (
    "CREATE TABLE IF NOT EXISTS consumer_positions "
    '("group" TEXT PRIMARY KEY, next_offset INTEGER NOT NULL)'
)
_GET_GROUP = 'SELECT next_offset FROM consumer_positions WHERE "group" = ?'
_SET_GROUP = 'INSERT OR REPLACE INTO consumer_positions ("group", next_offset) VALUES (?, ?)'

_Row = tuple[float, str, bytes, int]
"""An encoded event waiting to be written: ts, key, payload, crc."""
_Pending = tuple[list[_Row], Sequence[Event], asyncio.Future[list[tuple[int, int]]]]
CHILD_READER_MIN = 200_000
"""``read_payloads`` of at least this many records reads in a child process."""
TAIL_RECORDS = 50_000
"""Recently committed records kept in memory, so that followers in this process get
them without reading them back from the file (write-through)."""


def _check_header(path: Path) -> None:
    """Refuse an existing file that is not a (complete enough) SQLite database."""
    try:
        with path.open("rb") as f:
            header = f.read(_HEADER_SIZE)
    except OSError as exc:
        raise LogError(f"{path}: cannot open event log: {exc}") from exc
    if not header:
        raise LogError(
            f"{path}: event log file is empty (truncated?); remove it to start a new log"
        )
    if not _SQLITE_MAGIC.startswith(header[: len(_SQLITE_MAGIC)]):
        raise LogError(f"{path}: not an event log: not a SQLite database (bad file header)")
    if len(header) < _HEADER_SIZE:
        raise LogError(
            f"{path}: event log is truncated ({len(header)} bytes, shorter than its header)"
        )


def fsync_dir(directory: Path) -> None:
    """Make a rename or file creation in ``directory`` durable (fsync the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create(path: Path) -> None:
    """Create an empty log at ``path`` atomically: built aside, then linked in place.

    So a file at ``path`` is always a complete log, and an empty or truncated
    one is damage, never a half-made new log. Losing the race to another
    process creating the same log is fine: its file is used.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.init")
    tmp.unlink(missing_ok=True)
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_CREATE)
            conn.execute(_CREATE_KEY_INDEX)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={FORMAT_VERSION}")
            conn.execute("COMMIT")
        finally:
            conn.close()
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # no hard links here: rename, unless someone was faster
            if not path.exists():
                os.replace(tmp, path)
        fsync_dir(path.parent)
    except (OSError, sqlite3.Error) as exc:
        raise LogError(f"{path}: cannot create event log: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_reenable = False


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Suspend the cyclic GC while a batch is decoded (any thread, nestable).

    Decoding allocates several GC-tracked objects per record which all survive
    the batch, so the collector would run (and promote) every ~150 records for
    nothing; pausing it roughly doubles decode throughput. It is the process's
    collector: it stays off for the duration of one batch at most.
    """
    global _gc_pauses, _gc_reenable
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_reenable = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_reenable:
                gc.enable()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Reader:
    """One read connection of a ``read``/``follow`` generator, used in worker threads.

    The connection is opened lazily in the worker thread; it is closed only once
    no worker uses it any more, even if the generator is closed or cancelled
    while a fetch is in flight.
    """

    def __init__(self, log: EmbeddedLog) -> None:
        self._log = log
        self._conn: sqlite3.Connection | None = None
        self._busy: asyncio.Future[tuple[list[Any], int]] | None = None

    async def fetch(self, start: int, stop: int | None, limit: int,
                    raw: bool = False) -> tuple[list[Any], int]:
        loop = asyncio.get_running_loop()
        self._busy = loop.run_in_executor(None, self._fetch_sync, start, stop, limit, raw)
        # shield: if we are cancelled, the thread still finishes before close().
        return await asyncio.shield(self._busy)

    def _fetch_sync(self, start: int, stop: int | None, limit: int,
                    raw: bool) -> tuple[list[Any], int]:
        if self._conn is None:
            self._conn = self._log._connect_reader()
        if raw:
            return self._log._fetch_payloads(self._conn, start, stop, limit)
        return self._log._fetch(self._conn, start, stop, limit)

    async def fetch_key(self, key: str, start: int, stop: int,
                        limit: int) -> tuple[list[Any], int]:
        loop = asyncio.get_running_loop()
        self._busy = loop.run_in_executor(None, self._fetch_key_sync, key, start, stop, limit)
        return await asyncio.shield(self._busy)

    def _fetch_key_sync(self, key: str, start: int, stop: int,
                        limit: int) -> tuple[list[Any], int]:
        if self._conn is None:
            self._conn = self._log._connect_reader()
        return self._log._fetch_key(self._conn, key, start, stop, limit)

    def close(self) -> None:
        busy = self._busy
        if busy is not None and not busy.done():
            busy.add_done_callback(self._close_after)
        elif self._conn is not None:
            self._conn.close()
            self._conn = None

    def _close_after(self, busy: asyncio.Future[tuple[list[Any], int]]) -> None:
        if not busy.cancelled():
            busy.exception()  # retrieved: nobody is waiting for it any more
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@functools.lru_cache(maxsize=64)
def _insert_sql(rows: int) -> str:
    """INSERT of ``rows`` records in one statement."""
    return _INSERT_HEAD + ", ".join(["(?, ?, ?, ?, ?)"] * rows)


class EmbeddedLog(EventLog):
    """Single-node :class:`EventLog` stored in one SQLite file (WAL, synchronous=FULL)."""

    poll_interval: float = 0.5
    """Seconds between checks for records appended by another process, in ``follow``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        group_commit_max: int = 2000,
        on_progress: Callable[[int, int], None] | None = None,
        quick_check: bool = True,
        append_timeout: float = 5.0,
    ) -> None:
        if group_commit_max < 1:
            raise ValueError("group_commit_max must be at least 1")
        if append_timeout <= 0:
            raise ValueError("append_timeout must be positive")
        self.path = Path(path)
        self.group_commit_max = group_commit_max
        self.append_timeout = append_timeout
        """Seconds a commit may take: past it, ``append`` raises :class:`LogError` for
        the appends in that commit and those queued behind it (a stalled disk)."""
        self.on_progress = on_progress
        self.quick_check = quick_check
        """Run SQLite's whole-file ``quick_check`` at open (O(file size)); a warm boot
        from a snapshot skips it (see replay/snapshot.py)."""
        self.commits = 0
        """Number of transactions committed by ``append`` since open (one per group)."""
        self.stalls = 0
        """Times a commit ran past ``append_timeout`` (see :meth:`append`)."""
        self._state = "new"  # new -> open -> closing -> closed
        self._wconn: sqlite3.Connection | None = None
        self._insert_chunk = _INSERT_CHUNK
        self._mconn: sqlite3.Connection | None = None
        self._mlock = threading.Lock()
        self._wexec: concurrent.futures.ThreadPoolExecutor | None = None
        self._writer: asyncio.Task[None] | None = None
        self._pending: collections.deque[_Pending] = collections.deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        self._tail: list[Record] = []
        self._tail_base = 0
        self._commit_seq = 0
        self._waiters: set[asyncio.Future[None]] = set()

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        """Open or create the log, check its format and integrity, start the writer."""
        if self._state != "new":
            raise LogError(f"{self.path}: event log already opened")
        loop = asyncio.get_running_loop()
        wexec = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="siphon-log-writer"
        )
        try:
            await loop.run_in_executor(wexec, self._open_sync)
            self._mconn = await asyncio.to_thread(self._connect_reader)
        except BaseException:
            if self._wconn is not None:
                await loop.run_in_executor(wexec, self._close_sync)
            wexec.shutdown(wait=False)
            raise
        self._wexec = wexec
        self._state = "open"
        self._writer = asyncio.create_task(
            self._write_loop(), name=f"siphon-log-writer:{self.path}"
        )

    def _open_sync(self) -> None:
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LogError(f"{path}: cannot create directory: {exc}") from exc
        if not path.exists():
            _create(path)
        _check_header(path)
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        except sqlite3.Error as exc:
            raise LogError(f"{path}: cannot open event log: {exc}") from exc
        self._wconn = conn
        self._insert_chunk = max(1, min(
            _INSERT_CHUNK, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // 5))
        try:
            self._init_sync(conn)
        except sqlite3.Error as exc:
            self._close_sync()
            raise LogError(f"{path}: cannot open event log (damaged database?): {exc}") from exc
        except BaseException:
            self._close_sync()
            raise

    def _init_sync(self, conn: sqlite3.Connection) -> None:
        """Check format and integrity, switch to WAL + synchronous=FULL."""
        path = self.path
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > FORMAT_VERSION:
            raise LogError(
                f"{path}: event log format version {version} is newer than this siphon "
                f"supports ({FORMAT_VERSION}); refusing to open it"
            )
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        if version == 0 or app_id != APPLICATION_ID:
            raise LogError(
                f"{path}: not a siphon event log (SQLite database with format version "
                f"{version}, application_id {app_id:#x})"
            )
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise LogError(f"{path}: cannot use WAL journal mode (got {mode!r})")
        conn.execute("PRAGMA synchronous=FULL")
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")] if (
            self.quick_check) else ["ok"]
        if problems != ["ok"]:
            detail = "; ".join(str(p) for p in problems[:5])
            raise LogError(f"{path}: event log database is damaged (quick_check: {detail})")
        has_table = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'records'"
        ).fetchone()
        if not has_table:
            raise LogError(f"{path}: event log has no records table (format {version})")
        conn.execute(_CREATE_GROUPS)  # added beside format 1: older files gain it here
        self._ensure_key_index(conn)

    def _ensure_key_index(self, conn: sqlite3.Connection) -> None:
        """Build the key index of a log made before it existed (once; logged, timed)."""
        if conn.execute(_HAS_KEY_INDEX, (KEY_INDEX,)).fetchone():
            return
        records = int(conn.execute(_NEXT).fetchone()[0])
        log.info("%s: building the key index on %s records (once, for one-AoR reads)",
                 self.path, f"{records:,}")
        t0 = last = time.monotonic()

        def note() -> int:
            nonlocal last
            now = time.monotonic()
            if now - last >= KEY_INDEX_NOTE_EVERY:
                last = now
                log.info("%s: still building the key index (%.0f s so far)",
                         self.path, now - t0)
            return 0  # go on

        conn.set_progress_handler(note, 1_000_000)
        try:
            conn.execute(_CREATE_KEY_INDEX)
        finally:
            conn.set_progress_handler(None, 0)
        log.info("%s: key index built on %s records in %.2f s", self.path,
                 f"{records:,}", time.monotonic() - t0)

    def _connect_reader(self) -> sqlite3.Connection:
        """A read-only connection usable from any (one at a time) thread."""
        try:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10.0
            )
        except sqlite3.Error as exc:
            raise LogError(f"{self.path}: cannot open event log for reading: {exc}") from exc
        try:
            conn.execute("PRAGMA query_only=ON")
        except sqlite3.Error as exc:
            conn.close()
            raise LogError(f"{self.path}: cannot open event log for reading: {exc}") from exc
        return conn

    async def close(self) -> None:
        """Flush pending appends, stop the writer and close the database."""
        if self._state in ("closing", "closed"):
            return
        if self._state == "new":
            self._state = "closed"
            return
        self._state = "closing"
        self._wake.set()
        try:
            if self._writer is not None:
                # wait() neither raises the writer's error nor cancels it if we are.
                await asyncio.wait([self._writer])
        finally:
            assert self._wexec is not None
            await asyncio.get_running_loop().run_in_executor(self._wexec, self._close_sync)
            self._wexec.shutdown(wait=False)
            with self._mlock:
                if self._mconn is not None:
                    self._mconn.close()
                    self._mconn = None
            self._state = "closed"
            self._notify()

    def _close_sync(self) -> None:
        if self._wconn is not None:
            self._wconn.close()
            self._wconn = None

    def _check_open(self) -> None:
        if self._state != "open":
            raise LogError(f"{self.path}: event log is {self._state}, not open")

    # -- appending -----------------------------------------------------------

    async def append(self, events: Sequence[Event]) -> list[tuple[int, int]]:
        """Durably append ``events`` (grouped with concurrent appends into one commit).

        Returns their ``(0, offset)`` once the transaction holding them committed.
        On failure raises :class:`LogError` and none of ``events`` is appended. When
        the commit holding them (or the one ahead of it) takes longer than
        ``append_timeout``, raises :class:`LogError` with the outcome unknown: they may
        still be written. So may a cancelled append whose group was in flight.
        """
        self._check_open()
        if self._writer is None or self._writer.done():
            raise LogError(f"{self.path}: event log writer is not running")
        rows: list[_Row] = []
        for event in events:
            if not isinstance(event, EVENT_TYPES):
                raise TypeError(f"not an event: {type(event).__name__}")
            payload = encode(event)
            rows.append((event.ts, event_key(event), payload, zlib.crc32(payload)))
        if not rows:
            return []
        fut: asyncio.Future[list[tuple[int, int]]] = asyncio.get_running_loop().create_future()
        self._pending.append((rows, events, fut))
        self._wake.set()
        return await fut

    def _stalled(self, group: list[_Pending]) -> None:
        """A commit has run for ``append_timeout``: fail its appends (outcome unknown)
        and those queued behind it (not written), and check again one period on."""
        self.stalls += 1
        log.error("%s: a commit has not finished within %g s (storage stalled?); failing "
                  "%d queued appends", self.path, self.append_timeout,
                  len(group) + len(self._pending))
        for _, _, fut in group:
            if not fut.done():
                fut.set_exception(LogError(
                    f"{self.path}: commit not finished within {self.append_timeout:g} s "
                    "(storage stalled?); outcome unknown"))
        while self._pending:
            _, _, fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(LogError(
                    f"{self.path}: not appended: the commit ahead has not finished within "
                    f"{self.append_timeout:g} s (storage stalled?)"))
        self._watchdog = asyncio.get_running_loop().call_later(
            self.append_timeout, self._stalled, [])  # (the group's futures are done now)

    def _take_group(self) -> list[_Pending]:
        """Dequeue pending appends (never split) up to ``group_commit_max`` events."""
        group: list[_Pending] = []
        count = 0
        pending = self._pending
        while pending:
            rows, events, fut = pending[0]
            if group and count + len(rows) > self.group_commit_max:
                break
            pending.popleft()
            if fut.done():  # cancelled before being written: drop it
                continue
            group.append((rows, events, fut))
            count += len(rows)
        return group

    async def _write_loop(self) -> None:
        """The single writer: one transaction per group of queued appends."""
        loop = asyncio.get_running_loop()
        group: list[_Pending] = []
        try:
            while True:
                if not self._pending:
                    if self._state != "open":
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                group = self._take_group()
                if not group:
                    continue
                rows = [row for item_rows, _, _ in group for row in item_rows]
                # one timer per commit bounds every append in it and queued behind it
                self._watchdog = loop.call_later(self.append_timeout, self._stalled, group)
                try:
                    base = await loop.run_in_executor(self._wexec, self._write_sync, rows)
                except Exception as exc:
                    for _, _, fut in group:
                        if not fut.done():
                            err = LogError(f"{self.path}: append failed: {exc}")
                            err.__cause__ = exc
                            fut.set_exception(err)
                    group = []
                    continue
                finally:
                    if self._watchdog is not None:  # the first timer or one _stalled set
                        self._watchdog.cancel()
                self.commits += 1
                offset = base
                committed: list[Record] = []
                for item_rows, events, fut in group:
                    n = len(item_rows)
                    if not fut.done():
                        fut.set_result([(0, o) for o in range(offset, offset + n)])
                    committed.extend(Record(0, offset + i, e) for i, e in enumerate(events))
                    offset += n
                group = []
                self._remember(base, committed)
                self._notify()
        except BaseException:
            # Cancelled (loop shutting down) or a bug: nobody may wait forever.
            for _, _, fut in [*group, *self._pending]:
                if not fut.done():
                    fut.set_exception(LogError(f"{self.path}: event log writer stopped"))
            self._pending.clear()
            raise

    def _write_sync(self, rows: list[_Row]) -> int:
        """Write ``rows`` in one transaction (in the writer thread); return the first offset."""
        conn = self._wconn
        if conn is None:
            raise LogError(f"{self.path}: event log is closed")
        try:
            conn.execute("BEGIN IMMEDIATE")
            base: int = conn.execute(_NEXT).fetchone()[0]
            params: list[object] = []
            for i, (ts, key, payload, crc) in enumerate(rows):
                params += (base + i, ts, key, payload, crc)
            chunk = self._insert_chunk
            for start in range(0, len(rows), chunk):
                n = min(chunk, len(rows) - start)
                conn.execute(_insert_sql(n), params[5 * start : 5 * (start + n)])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        return base

    def _remember(self, base: int, records: list[Record]) -> None:
        """Keep just-committed records for in-process followers (contiguous only)."""
        if base != self._tail_base + len(self._tail):
            self._tail = []  # another process wrote in between: restart the tail here
            self._tail_base = base
        self._tail.extend(records)
        excess = len(self._tail) - 2 * TAIL_RECORDS
        if excess > 0:
            del self._tail[: excess + TAIL_RECORDS]
            self._tail_base += excess + TAIL_RECORDS

    def _from_tail(self, pos: int, limit: int) -> list[Record]:
        start = pos - self._tail_base
        if 0 <= start < len(self._tail):
            return self._tail[start : start + limit]
        return []

    def _notify(self) -> None:
        """Wake every follower waiting for a commit (or for the close)."""
        self._commit_seq += 1
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def _wait_commit(self, seen_seq: int) -> bool:
        """Wait until a commit after ``seen_seq`` or ``poll_interval``, whichever first;
        True when woken by a commit of this process."""
        if self._commit_seq != seen_seq:
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.add(waiter)
        timer = loop.call_later(self.poll_interval, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiters.discard(waiter)
        return self._commit_seq != seen_seq

    # -- reading -----------------------------------------------------------

    async def end_position(self) -> Position:
        """``{0: next offset}`` as committed in the file (also by other processes)."""
        self._check_open()
        return {0: await asyncio.to_thread(self._end_sync)}

    def _end_sync(self) -> int:
        with self._mlock:
            if self._mconn is None:
                raise LogError(f"{self.path}: event log is closed")
            try:
                return int(self._mconn.execute(_NEXT).fetchone()[0])
            except sqlite3.Error as exc:
                raise LogError(f"{self.path}: cannot read event log: {exc}") from exc

    @staticmethod
    def _offset(position: Position | None, what: str) -> int | None:
        if position is None:
            return None
        others = sorted(p for p in position if p != 0)
        if others:
            raise ValueError(f"the embedded log has partition 0 only; {what} names {others}")
        offset = position.get(0, 0)
        if offset < 0:
            raise ValueError(f"negative {what} offset {offset}")
        return offset

    async def read(
        self,
        start: Position | None = None,
        end: Position | None = None,
        batch_size: int = 10_000,
    ) -> AsyncIterator[list[Record]]:
        """Yield batches from ``start`` up to ``end`` (default: the end when iteration
        starts); raises :class:`LogCorruption` at the first damaged or missing record."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        pos = self._offset(start, "start") or 0
        stop = self._offset(end, "end")
        reader = _Reader(self)
        try:
            while stop is None or pos < stop:
                self._check_open()
                records, committed_end = await reader.fetch(pos, stop, batch_size)
                if stop is None:
                    stop = committed_end
                if not records:
                    return
                yield records
                pos += len(records)
        finally:
            reader.close()

    async def _bounded_span(self, start: Position | None, end: Position | None,
                            batch_size: int) -> tuple[int, int]:
        """First and past-the-end offsets of a read (the end defaults to the log's)."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        pos = self._offset(start, "start") or 0
        stop = self._offset(end, "end")
        if stop is None:
            stop = (await self.end_position())[0]
        return pos, stop

    async def read_key(
        self,
        key: str,
        start: Position | None = None,
        end: Position | None = None,
        batch_size: int = 10_000,
    ) -> AsyncIterator[list[Record]]:
        """Like :meth:`read`, only the records whose key is ``key``, through the key
        index: time grows with that key's records, not with the log. Raises
        :class:`LogCorruption` at the first of them that is damaged, or whose stored key
        is not its event's."""
        pos, stop = await self._bounded_span(start, end, batch_size)
        reader = _Reader(self)
        try:
            while pos < stop:
                self._check_open()
                records, pos = await reader.fetch_key(key, pos, stop, batch_size)
                if records:
                    yield records
        finally:
            reader.close()

    def _fetch_key(self, conn: sqlite3.Connection, key: str, start: int, stop: int,
                   limit: int) -> tuple[list[Record], int]:
        """Up to ``limit`` checked records of ``key`` in ``[start, stop)`` (worker thread),
        and where the next fetch starts (``stop`` once there are no more)."""
        try:
            rows = conn.execute(SELECT_KEY, (key, start, stop, limit)).fetchall()
        except sqlite3.Error as exc:
            raise LogError(f"{self.path}: cannot read event log: {exc}") from exc
        crc32 = zlib.crc32
        records: list[Record] = []
        with _gc_paused():
            for offset, payload, crc in rows:
                if not isinstance(payload, bytes):
                    self._corrupt(offset, f"payload is {type(payload).__name__}, not a blob")
                if crc32(payload) != crc:
                    self._corrupt(offset,
                                  f"crc mismatch (stored {crc!r}, computed {crc32(payload)})")
                try:
                    event = decode(payload)
                except EventDecodeError as exc:
                    self._corrupt(offset, f"undecodable payload: {exc}")
                if event_key(event) != key:
                    self._corrupt(offset, f"stored key {key!r} is not its event's "
                                          f"({event_key(event)!r})")
                records.append(Record(0, offset, event))
        return records, (rows[-1][0] + 1 if len(rows) == limit else stop)

    async def read_payloads(
        self,
        start: Position | None = None,
        end: Position | None = None,
        batch_size: int = 20_000,
    ) -> AsyncIterator[tuple[int, range, list[bytes]]]:
        """Like :meth:`read`, but yields ``(partition, offsets, payloads)`` with the
        stored (CRC-checked, not decoded) payloads, for a projection rebuild that
        decodes only what it needs (``projections.registrar.Rebuild``). The next
        batch is read while the caller works on the current one."""
        pos, stop = await self._bounded_span(start, end, batch_size)
        if stop - pos >= CHILD_READER_MIN:
            async for item in self._payloads_from_child(pos, stop, batch_size):
                yield item
            return
        reader = _Reader(self)
        pending: asyncio.Future[tuple[list[Any], int]] | None = None
        try:
            self._check_open()
            pending = asyncio.ensure_future(reader.fetch(pos, stop, batch_size, raw=True))
            while pending is not None:
                payloads, committed_end = await pending
                pending = None
                if stop is None:
                    stop = committed_end
                if not payloads:
                    return
                first = pos
                pos += len(payloads)
                if pos < stop:
                    self._check_open()
                    pending = asyncio.ensure_future(
                        reader.fetch(pos, stop, batch_size, raw=True))
                yield 0, range(first, pos), payloads
        finally:
            if pending is not None:
                pending.cancel()
            reader.close()

    async def _payloads_from_child(self, pos: int, stop: int, batch_size: int
                                   ) -> AsyncIterator[tuple[int, range, list[bytes]]]:
        """``read_payloads`` of a long range: a child process (``events/_reader.py``)
        reads and checks the rows on its own core (a reader thread would share this
        process's GIL); a thread of ours takes its frames off the pipe, a batch ahead."""
        proc = subprocess.Popen(
            [sys.executable, "-I", _reader.__file__, str(self.path), str(pos), str(stop),
             str(batch_size), "payloads"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, bufsize=1 << 20)
        assert proc.stdout is not None and proc.stderr is not None
        loop = asyncio.get_running_loop()
        frames: asyncio.Queue[Any] = asyncio.Queue(maxsize=2)
        stopping = threading.Event()

        def put(item: Any) -> None:
            fut = asyncio.run_coroutine_threadsafe(frames.put(item), loop)
            while not stopping.is_set():
                try:
                    fut.result(timeout=0.5)
                    return
                except concurrent.futures.TimeoutError:
                    continue
            fut.cancel()

        def pump() -> None:
            out = proc.stdout
            assert out is not None
            try:
                while not stopping.is_set():
                    kind = out.read(1)
                    if kind == b"P":
                        first, count, size = _reader.BATCH.unpack(out.read(_reader.BATCH.size))
                        lengths = struct.unpack(f"<{count}I", out.read(4 * count))
                        body = out.read(size)
                        if len(body) != size:
                            raise EOFError
                        pieces: list[bytes] = []
                        append = pieces.append
                        at = 0
                        for n in lengths:
                            append(body[at:at + n])
                            at += n
                        put(("P", first, pieces))
                    elif kind == b"E":
                        offset, size = _reader.ERROR.unpack(out.read(_reader.ERROR.size))
                        put(("E", offset, out.read(size).decode(errors="replace")))
                    elif kind == b"Z":
                        put(("Z", 0, None))
                        return
                    else:
                        raise EOFError
            except (EOFError, struct.error, OSError, ValueError):
                proc.wait()
                err = proc.stderr.read().decode(errors="replace").strip()  # type: ignore[union-attr]
                put(("X", proc.returncode, err or "no output"))

        pumping = loop.run_in_executor(None, pump)
        try:
            while True:
                self._check_open()
                kind, first, data = await frames.get()
                if kind == "Z":
                    break
                if kind == "E":
                    self._corrupt(first, data)
                if kind == "X":
                    raise LogError(f"{self.path}: cannot read event log (reader exit "
                                   f"{first}): {data}")
                if first != pos:
                    self._corrupt(pos, "record missing (gap in offsets)")
                pos += len(data)
                yield 0, range(first, pos), data
        finally:
            stopping.set()
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.shield(pumping)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(proc.wait)
            for f in (proc.stdout, proc.stderr):
                with contextlib.suppress(Exception):
                    f.close()
        if pos < stop:
            self._corrupt(pos, "record missing (log ends early)")

    def bad_record(self, partition: int, offset: int, reason: str) -> NoReturn:
        """A stored record that does not decode: the log is damaged there."""
        self._corrupt(offset, reason)

    async def follow(
        self, start: Position | None = None, batch_size: int = 10_000
    ) -> AsyncIterator[list[Record]]:
        """Yield what exists from ``start``, then new records as they are committed,
        forever (woken by this process's commits, polling for other writers).
        Raises :class:`LogError` once the log is closed."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        pos = self._offset(start, "start") or 0
        reader = _Reader(self)
        try:
            poll = True  # read the file: at start, and after each idle poll interval
            while True:
                self._check_open()
                seen_seq = self._commit_seq  # taken before reading: no missed wake-up
                records = self._from_tail(pos, batch_size)
                if not records and (poll or pos != self._tail_base + len(self._tail)):
                    records, _ = await reader.fetch(pos, None, batch_size)
                    poll = False
                if records:
                    yield records
                    pos += len(records)
                else:
                    poll = not await self._wait_commit(seen_seq)
        finally:
            reader.close()

    # -- ownership (one process owns the only partition) ------------------------

    async def owned(self, group: str, batch_size: int = 10_000) -> AsyncIterator[list[Record]]:
        """Follow from ``group``'s committed position (the end, when it has none)."""
        self._check_open()
        committed = await asyncio.to_thread(self._group_sync, group, None)
        start = committed if committed is not None else (await self.end_position())[0]
        async for batch in self.follow({0: start}, batch_size):
            yield batch

    async def commit(self, group: str, position: Position) -> None:
        """Durably store ``group``'s position (same file, own transaction)."""
        self._check_open()
        offset = self._offset(position, "commit")
        assert self._wexec is not None
        await asyncio.get_running_loop().run_in_executor(
            self._wexec, self._group_sync, group, offset or 0)

    def _group_sync(self, group: str, offset: int | None) -> int | None:
        """Read (offset None) or write a group's position; writes on the writer thread."""
        if offset is None:
            with self._mlock:
                if self._mconn is None:
                    raise LogError(f"{self.path}: event log is closed")
                row = self._mconn.execute(_GET_GROUP, (group,)).fetchone()
            return None if row is None else int(row[0])
        conn = self._wconn
        if conn is None:
            raise LogError(f"{self.path}: event log is closed")
        try:
            conn.execute(_SET_GROUP, (group, offset))
        except sqlite3.Error as exc:
            raise LogError(f"{self.path}: cannot store position of {group!r}: {exc}") from exc
        return offset

    def _fetch(
        self, conn: sqlite3.Connection, start: int, stop: int | None, limit: int
    ) -> tuple[list[Record], int]:
        """Read (in a worker thread) and check up to ``limit`` records from ``start``,
        not past ``stop`` nor the committed end; return them and the committed end."""
        with _gc_paused():
            rows, upto, end = self._snapshot_rows(conn, start, stop, limit)
            if upto <= start:
                return [], end
            # Offsets are unique integers in [start, upto): the right count means no gap.
            if len(rows) == upto - start:
                crc32, record, dec = zlib.crc32, Record, decode
                try:
                    records = [
                        record(0, offset, dec(payload))
                        for offset, (payload, crc) in enumerate(rows, start)
                        if crc32(payload) == crc
                    ]
                    if len(records) == len(rows):
                        return records, end
                except Exception:
                    pass  # located precisely below
        return self._check_slowly(conn, start, upto), end

    def _snapshot_rows(self, conn: sqlite3.Connection, start: int, stop: int | None,
                       limit: int) -> tuple[list[tuple[bytes, int]], int, int]:
        """(payload, crc) rows from ``start`` up to ``limit`` records, not past ``stop``
        nor the committed end, read in one snapshot with that end: (rows, upto, end)."""
        try:
            conn.execute("BEGIN")  # one snapshot for the end and the rows
            try:
                end: int = conn.execute(_NEXT).fetchone()[0]
                upto = min(end, start + limit if stop is None else min(stop, start + limit))
                rows = conn.execute(_SELECT, (start, upto)).fetchall() if upto > start else []
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise LogError(f"{self.path}: cannot read event log: {exc}") from exc
        return rows, upto, end

    def _fetch_payloads(
        self, conn: sqlite3.Connection, start: int, stop: int | None, limit: int
    ) -> tuple[list[bytes], int]:
        """As :meth:`_fetch`, but the CRC-checked payloads, not decoded."""
        rows, upto, end = self._snapshot_rows(conn, start, stop, limit)
        if upto <= start:
            return [], end
        crc32 = zlib.crc32
        if len(rows) == upto - start and all(
                type(p) is bytes and crc32(p) == c for p, c in rows):
            return [p for p, _ in rows], end
        records = self._check_slowly(conn, start, upto)  # raises naming the damage
        return [encode(r.event) for r in records], end  # repaired meanwhile (unlikely)

    def _check_slowly(self, conn: sqlite3.Connection, start: int, stop: int) -> list[Record]:
        """Record by record, find and raise the first damaged or missing one."""
        try:
            rows = conn.execute(_SELECT_WITH_OFFSETS, (start, stop)).fetchall()
        except sqlite3.Error as exc:
            raise LogError(f"{self.path}: cannot read event log: {exc}") from exc
        crc32 = zlib.crc32
        records: list[Record] = []
        expected = start
        for offset, payload, crc in rows:
            if offset != expected:
                break
            if not isinstance(payload, bytes):
                self._corrupt(offset, f"payload is {type(payload).__name__}, not a blob")
            if crc32(payload) != crc:
                self._corrupt(offset, f"crc mismatch (stored {crc!r}, computed {crc32(payload)})")
            try:
                records.append(Record(0, offset, decode(payload)))
            except EventDecodeError as exc:
                self._corrupt(offset, f"undecodable payload: {exc}")
            expected += 1
        if expected < stop:
            self._corrupt(expected, "record missing (gap in offsets)")
        return records  # only if the damage was repaired in between

    def _corrupt(self, offset: int, reason: str) -> NoReturn:
        raise LogCorruption(0, offset, f"{reason} in {self.path}")

    async def verify(self) -> int:
        """Read the whole log checking every record; returns how many.

        Raises :class:`LogCorruption` naming the first bad offset. Calls
        ``on_progress(done, total)`` after each batch.
        """
        total = (await self.end_position())[0]
        done = 0
        if self.on_progress is not None:
            self.on_progress(0, total)
        async for batch in self.read(None, {0: total}, batch_size=10_000):
            done += len(batch)
            if self.on_progress is not None:
                self.on_progress(done, total)
        if done != total:
            self._corrupt(done, "record missing (log ends early)")
        return done
