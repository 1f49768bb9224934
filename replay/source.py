"""Read-only access to the event log a config names, for the replay tools.

:class:`EmbeddedSource` reads the SQLite file on a connection of its own that
never writes (so it works on a live node's log or a read-only backup, and never
creates a missing log); long reads run a child process (``_reader.py``) that reads
and checks records while this process decodes and applies. :class:`KafkaSource`
wraps :class:`events.kafka.KafkaLog` (never creating the topic).

Both yield :class:`events.log.Record` batches, in order per partition, and can
either stop at the first damaged record (:class:`events.log.LogCorruption`) or
report each one through ``on_problem`` and go on (``replay verify``).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import sqlite3
import struct
import sys
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from events import _reader
from events.codec import EventDecodeError, decode, decode_array
from events.embedded import APPLICATION_ID, FORMAT_VERSION, KEY_INDEX, SELECT_KEY, _gc_paused
from events.log import LogCorruption, LogError, Position, Record
from events.schema import event_key
from siphon.config import Config

log = logging.getLogger("siphon.replay")

OnProblem = Callable[[int, int, str], None]
"""Called with (partition, offset, reason) for each damaged record, instead of raising."""

PIPELINE_MIN = 200_000
"""Reads of at least this many embedded records run the reader in a child process."""


class ReplayError(Exception):
    """A replay command cannot do what was asked; ``exit_code`` says how it ends."""

    exit_code = 1


class LogUnavailable(ReplayError):
    """The log cannot be opened, reached or read (missing file, cluster down...)."""

    exit_code = 3


class BadInput(ReplayError):
    """The request does not fit the log (time before its first event, offset past its
    end, an AoR it never names...)."""

    exit_code = 4


def _decode_run(partition: int, first: int, payloads: list[bytes] | bytes, count: int,
                on_problem: OnProblem | None) -> list[Record]:
    """Decode ``count`` payloads from offset ``first`` (a list, or one JSON array)."""
    array = payloads if isinstance(payloads, bytes) else b"[" + b",".join(payloads) + b"]"
    with _gc_paused():
        try:
            events = decode_array(array)
            if len(events) == count:
                return [Record(partition, off, ev) for off, ev in enumerate(events, first)]
        except EventDecodeError:
            pass
        items = payloads if isinstance(payloads, list) else _split(payloads, count)
        out: list[Record] = []
        for off, payload in enumerate(items, first):
            try:
                out.append(Record(partition, off, decode(payload)))
            except EventDecodeError as exc:
                reason = f"undecodable payload: {exc}"
                if on_problem is None:
                    raise LogCorruption(partition, off, reason) from None
                on_problem(partition, off, reason)
        return out


def _cut(body: bytes, lengths: tuple[int, ...]) -> list[bytes]:
    """``body`` cut into consecutive pieces of ``lengths``."""
    out: list[bytes] = []
    append = out.append
    at = 0
    for n in lengths:
        end = at + n
        append(body[at:end])
        at = end
    return out


def _split(array: bytes, count: int) -> list[bytes]:
    """The elements of a JSON array of ``count`` objects, as raw bytes."""
    import msgspec

    raws = msgspec.json.decode(array, type=list[msgspec.Raw])
    if len(raws) != count:
        raise LogError(f"reader sent {len(raws)} records where {count} were announced")
    return [bytes(r) for r in raws]


class Source(abc.ABC):
    """A log opened for reading (``async with``)."""

    label: str = "event log"
    identity: str = ""
    """What a snapshot or a copy checkpoint records to recognise this log."""

    async def __aenter__(self) -> Source:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def open(self) -> None:
        """Open; raises :class:`LogUnavailable` with a clear message."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def partitions(self) -> int: ...

    @abc.abstractmethod
    def partition_for(self, key: str) -> int: ...

    @abc.abstractmethod
    async def end_position(self) -> Position:
        """Next offset per partition."""

    @abc.abstractmethod
    async def begin_position(self) -> Position:
        """First offset per partition."""

    @abc.abstractmethod
    async def first_ts(self) -> float | None:
        """Time of the earliest first record of the partitions (None: empty log)."""

    @abc.abstractmethod
    def read(self, start: Position | None, stop: Position, *, key: str | None = None,
             on_problem: OnProblem | None = None) -> AsyncIterator[list[Record]]:
        """Batches of records from ``start`` (missing partitions: their beginning) to
        ``stop`` (partitions missing from it are not read); with ``key``, only that
        AoR's (or ``trunk:<id>``'s) records."""

    def read_payloads(self, start: Position | None, stop: Position, *,
                      on_problem: OnProblem | None = None
                      ) -> AsyncIterator[tuple[int, Any, list[bytes]]] | None:
        """Like :meth:`read`, as ``(partition, offsets, stored payloads)`` not decoded
        (damaged records are left out, reported as ``read`` does; payloads that do not
        decode are the caller's to report); None when this source cannot."""
        return None


# ------------------------------------------------------------------------- embedded


class EmbeddedSource(Source):
    """An embedded (SQLite) log, read without ever writing to it."""

    def __init__(self, path: str | os.PathLike[str], *, pipeline: bool | None = None,
                 batch_size: int = 10_000) -> None:
        self.path = Path(path)
        self.label = f"embedded log {self.path}"
        self.identity = "embedded"
        self.pipeline = pipeline
        """Child-process reader: None = for reads of at least PIPELINE_MIN records."""
        self.batch_size = batch_size
        self.key_index = False
        """The log has the key index (one AoR's records without a scan); a log written
        by an older siphon gains it the next time a node (or any writer) opens it."""
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        await asyncio.to_thread(self._open_sync)

    def _open_sync(self) -> None:
        path = self.path
        if not path.exists():
            raise LogUnavailable(f"{path}: no event log there (file not found)")
        if not path.is_file():
            raise LogUnavailable(f"{path}: not a file")
        try:
            conn = _reader.connect(str(path))
        except sqlite3.Error as exc:
            raise LogUnavailable(f"{path}: cannot open event log: {exc}") from exc
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            has_table = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                     "AND name = 'records'").fetchone()
            self.key_index = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' "
                                          "AND name = ?", (KEY_INDEX,)).fetchone() is not None
        except sqlite3.Error as exc:
            conn.close()
            raise LogUnavailable(f"{path}: not an event log: {exc}") from exc
        if app_id != APPLICATION_ID or version == 0 or not has_table:
            conn.close()
            raise LogUnavailable(f"{path}: not a siphon event log (application_id "
                                 f"{app_id:#x}, format version {version})")
        if version > FORMAT_VERSION:
            conn.close()
            raise LogUnavailable(f"{path}: event log format version {version} is newer than "
                                 f"this siphon supports ({FORMAT_VERSION})")
        self._conn = conn

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def partitions(self) -> int:
        return 1

    def partition_for(self, key: str) -> int:
        return 0

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        if self._conn is None:
            raise LogUnavailable(f"{self.path}: event log is not open")
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise LogUnavailable(f"{self.path}: cannot read event log: {exc}") from exc

    async def end_position(self) -> Position:
        rows = await asyncio.to_thread(
            self._query, 'SELECT COALESCE(MAX("offset"), -1) + 1 FROM records')
        return {0: int(rows[0][0])}

    async def begin_position(self) -> Position:
        rows = await asyncio.to_thread(self._query, 'SELECT MIN("offset") FROM records')
        return {0: int(rows[0][0] or 0)}

    async def first_ts(self) -> float | None:
        rows = await asyncio.to_thread(
            self._query, 'SELECT ts FROM records ORDER BY "offset" LIMIT 1')
        return float(rows[0][0]) if rows else None

    async def record_at(self, offset: int) -> Record | None:
        """The record at ``offset`` (None when missing or damaged)."""
        rows = await asyncio.to_thread(
            self._query, 'SELECT payload, crc FROM records WHERE "offset" = ?', (offset,))
        if not rows or not isinstance(rows[0][0], bytes) or zlib.crc32(rows[0][0]) != rows[0][1]:
            return None
        try:
            return Record(0, offset, decode(rows[0][0]))
        except EventDecodeError:
            return None

    async def read(self, start: Position | None, stop: Position, *, key: str | None = None,
                   on_problem: OnProblem | None = None) -> AsyncIterator[list[Record]]:
        lo = (start or {}).get(0, 0)
        hi = stop.get(0, lo)
        if hi <= lo:
            return
        if key is not None:
            async for batch in self._read_key(key, lo, hi, on_problem):
                yield batch
            return
        use_child = self.pipeline if self.pipeline is not None else hi - lo >= PIPELINE_MIN
        reader = self._read_child if use_child else self._read_here
        async for batch in reader(lo, hi, on_problem):
            yield batch

    def read_payloads(self, start: Position | None, stop: Position, *,
                      on_problem: OnProblem | None = None
                      ) -> AsyncIterator[tuple[int, Any, list[bytes]]] | None:
        return self._payloads(start, stop, on_problem)

    async def _payloads(self, start: Position | None, stop: Position,
                        on_problem: OnProblem | None
                        ) -> AsyncIterator[tuple[int, Any, list[bytes]]]:
        lo = (start or {}).get(0, 0)
        hi = stop.get(0, lo)
        if hi <= lo:
            return
        use_child = self.pipeline if self.pipeline is not None else hi - lo >= PIPELINE_MIN
        if use_child:
            async for item in self._read_child(lo, hi, on_problem, raw=True):
                yield item  # type: ignore[misc]
            return
        for s in range(lo, hi, self.batch_size):
            u = min(hi, s + self.batch_size)
            rows = await asyncio.to_thread(self._query, _reader.SELECT, (s, u))
            for kind, offset, data in _reader.check_rows(rows, s, u):
                if kind == "ok":
                    payloads: list[bytes] = data  # type: ignore[assignment]
                    yield 0, range(offset, offset + len(payloads)), payloads
                else:
                    self._problem(on_problem, offset, str(data))

    def _problem(self, on_problem: OnProblem | None, offset: int, reason: str) -> None:
        if on_problem is None:
            raise LogCorruption(0, offset, f"{reason} in {self.path}")
        on_problem(0, offset, reason)

    async def _read_here(self, lo: int, hi: int,
                         on_problem: OnProblem | None) -> AsyncIterator[list[Record]]:
        for s in range(lo, hi, self.batch_size):
            u = min(hi, s + self.batch_size)
            batch = await asyncio.to_thread(self._fetch_sync, s, u, on_problem)
            if batch:
                yield batch

    def _fetch_sync(self, s: int, u: int, on_problem: OnProblem | None) -> list[Record]:
        rows = self._query(_reader.SELECT, (s, u))
        out: list[Record] = []
        for kind, offset, data in _reader.check_rows(rows, s, u):
            if kind == "ok":
                payloads: list[bytes] = data  # type: ignore[assignment]
                out.extend(_decode_run(0, offset, payloads, len(payloads), on_problem))
            else:
                self._problem(on_problem, offset, str(data))
        return out

    async def _read_child(self, lo: int, hi: int, on_problem: OnProblem | None,
                          raw: bool = False) -> AsyncIterator[Any]:
        """Batches of records (or, ``raw``, ``(0, offsets, payloads)``) read by a child."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", _reader.__file__, str(self.path), str(lo), str(hi),
            str(self.batch_size), *(["payloads"] if raw else []),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
            limit=1 << 20)
        assert proc.stdout is not None and proc.stderr is not None
        out = proc.stdout
        finished = False
        try:
            while True:
                try:
                    kind = await out.readexactly(1)
                    if kind == b"Z":
                        finished = True
                        return
                    if kind == b"B" or kind == b"P":
                        first, count, size = _reader.BATCH.unpack(
                            await out.readexactly(_reader.BATCH.size))
                        if kind == b"P":
                            lengths = struct.unpack(f"<{count}I",
                                                    await out.readexactly(4 * count))
                        body = await out.readexactly(size)
                    elif kind == b"E":
                        offset, size = _reader.ERROR.unpack(
                            await out.readexactly(_reader.ERROR.size))
                        reason = (await out.readexactly(size)).decode(errors="replace")
                    else:
                        raise LogError(f"{self.path}: reader sent an unknown frame {kind!r}")
                except asyncio.IncompleteReadError:
                    await proc.wait()
                    err = (await proc.stderr.read()).decode(errors="replace").strip()
                    raise LogUnavailable(f"{self.path}: reading failed (reader exit "
                                         f"{proc.returncode}): {err or 'no output'}") from None
                if kind == b"B":
                    yield _decode_run(0, first, body, count, on_problem)
                elif kind == b"P":
                    yield 0, range(first, first + count), _cut(body, lengths)
                else:
                    self._problem(on_problem, offset, reason)
        finally:
            if not finished and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())

    async def _read_key(self, key: str, lo: int, hi: int,
                        on_problem: OnProblem | None) -> AsyncIterator[list[Record]]:
        """``key``'s records through the key index (a scan of the table without it)."""
        async for rows in self._key_rows(key, lo, hi):
            out: list[Record] = []
            for offset, payload, crc in rows:
                if not isinstance(payload, bytes) or zlib.crc32(payload) != crc:
                    self._problem(on_problem, offset, "crc mismatch or damaged payload")
                    continue
                out.extend(_decode_run(0, offset, [payload], 1, on_problem))
            if out:
                yield out

    async def _key_rows(self, key: str, lo: int, hi: int) -> AsyncIterator[list[Any]]:
        """``(offset, payload, crc)`` rows of ``key`` in ``[lo, hi)``, in offset order."""
        if not self.key_index:
            log.warning("%s has no key index (written by an older siphon): reading one "
                        "key scans the whole log; the index is built the next time a node "
                        "opens the log", self.path)
            yield await asyncio.to_thread(
                self._query, 'SELECT "offset", payload, crc FROM records WHERE key = ? '
                'AND "offset" >= ? AND "offset" < ? ORDER BY "offset"', (key, lo, hi))
            return
        limit = self.batch_size
        while lo < hi:
            rows = await asyncio.to_thread(self._query, SELECT_KEY, (key, lo, hi, limit))
            yield rows
            if len(rows) < limit:
                return
            lo = rows[-1][0] + 1


# ---------------------------------------------------------------------------- kafka


def _collecting_log_class() -> type:
    from events.kafka import KafkaLog

    class CollectingKafkaLog(KafkaLog):
        """A KafkaLog that hands undecodable records to ``on_problem`` (or raises)."""

        on_problem: OnProblem | None = None

        def _bad_record(self, partition: int, offset: int, reason: str) -> None:
            if self.on_problem is None:
                raise LogCorruption(partition, offset,
                                    f"undecodable record in kafka topic {self.topic}: {reason}")
            self.on_problem(partition, offset, f"undecodable record: {reason}")

    return CollectingKafkaLog


class KafkaSource(Source):
    """A Kafka topic; the topic must exist (it is never created here)."""

    def __init__(self, cfg: Config, *, connect_timeout: float = 10.0) -> None:
        kafka = cfg.registrar.kafka
        assert kafka is not None
        self.kafka = kafka
        self.log = _collecting_log_class()(kafka, f"{cfg.server.instance_id}-replay",
                                           connect_timeout=connect_timeout)
        servers = ",".join(kafka.bootstrap_servers)
        self.label = f"kafka topic {kafka.topic} at {servers}"
        self.identity = f"kafka:{kafka.topic}"
        self.connect_timeout = connect_timeout

    async def open(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        servers = ",".join(self.kafka.bootstrap_servers)
        admin = AIOKafkaAdminClient(**self.log._common("replay-admin"))
        try:
            async with asyncio.timeout(self.connect_timeout):
                await admin.start()
                topics = await admin.list_topics()
        except Exception as exc:
            raise LogUnavailable(f"kafka {servers}: not reachable within "
                                 f"{self.connect_timeout:g} s ({exc!r})") from exc
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
        if self.kafka.topic not in topics:
            raise LogUnavailable(f"kafka {servers}: topic {self.kafka.topic} does not exist")
        try:
            await self.log.open()
        except LogError as exc:
            raise LogUnavailable(str(exc)) from exc

    async def close(self) -> None:
        await self.log.close()

    @property
    def partitions(self) -> int:
        return self.log.partitions

    def partition_for(self, key: str) -> int:
        return self.log.partition_for(key)

    async def end_position(self) -> Position:
        try:
            return await self.log.end_position()
        except LogError as exc:
            raise LogUnavailable(str(exc)) from exc

    async def begin_position(self) -> Position:
        meta = self.log._meta
        if meta is None:
            raise LogUnavailable(f"{self.label}: not open")
        try:
            async with asyncio.timeout(self.connect_timeout):
                begins = await meta.beginning_offsets(self.log._tps())
        except Exception as exc:
            raise LogUnavailable(f"{self.label}: cannot get the first offsets: {exc!r}") from exc
        return {tp.partition: off for tp, off in begins.items()}

    async def first_ts(self) -> float | None:
        begin = await self.begin_position()
        end = await self.end_position()
        stop = {p: off + 1 for p, off in begin.items() if end.get(p, 0) > off}
        if not stop:
            return None
        first: float | None = None
        async with contextlib.aclosing(self.log.read(begin, stop)) as batches:
            async for batch in batches:
                for rec in batch:
                    if first is None or rec.event.ts < first:
                        first = rec.event.ts
        return first

    def read_payloads(self, start: Position | None, stop: Position, *,
                      on_problem: OnProblem | None = None
                      ) -> AsyncIterator[tuple[int, Any, list[bytes]]] | None:
        return self._payloads(start, stop, on_problem)

    async def _payloads(self, start: Position | None, stop: Position,
                        on_problem: OnProblem | None, key: bytes | None = None
                        ) -> AsyncIterator[tuple[int, Any, list[bytes]]]:
        start = dict(start or {})
        if not any(off > start.get(p, 0) for p, off in stop.items()):
            return
        with self._reading(on_problem):
            async with contextlib.aclosing(
                    self.log.read_payloads(start, stop, key=key)) as batches:
                async for item in batches:
                    yield item

    @contextlib.contextmanager
    def _reading(self, on_problem: OnProblem | None) -> Iterator[None]:
        """Install the bad-record policy while reading; a log that cannot be read
        (not a damaged record) becomes :class:`LogUnavailable`."""
        self.log.on_problem = on_problem
        try:
            yield
        except LogCorruption:
            raise
        except LogError as exc:
            raise LogUnavailable(str(exc)) from exc
        finally:
            self.log.on_problem = None

    async def read(self, start: Position | None, stop: Position, *, key: str | None = None,
                   on_problem: OnProblem | None = None) -> AsyncIterator[list[Record]]:
        start = dict(start or {})
        if key is not None:
            # one AoR: its partition only, and only the records carrying its Kafka key
            # are decoded (the bulk reader filters on the key before any decoding)
            p = self.partition_for(key)
            stop = {p: stop[p]} if p in stop else {}
            start = {p: start[p]} if p in start else {}
            async for partition, offsets, payloads in self._payloads(
                    start, stop, on_problem, key=key.encode()):
                out: list[Record] = []
                for off, payload in zip(offsets, payloads, strict=True):
                    out.extend(_decode_run(partition, off, [payload], 1, on_problem))
                batch = [r for r in out if event_key(r.event) == key]
                if batch:
                    yield batch
            return
        if not any(off > start.get(p, 0) for p, off in stop.items()):
            return
        with self._reading(on_problem):
            async with contextlib.aclosing(self.log.read(start, stop)) as batches:
                async for batch in batches:
                    yield batch


def open_source(cfg: Config, *, connect_timeout: float = 10.0,
                pipeline: bool | None = None) -> Source:
    """The (not yet opened) source for the log ``cfg`` names."""
    if cfg.registrar.backend == "kafka":
        if cfg.registrar.kafka is None:
            raise LogUnavailable("registrar.backend is kafka but registrar.kafka is missing")
        return KafkaSource(cfg, connect_timeout=connect_timeout)
    return EmbeddedSource(cfg.registrar.path, pipeline=pipeline)
