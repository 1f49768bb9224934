"""``replay copy``: disaster-recovery copy of one log into another, resumable.

Records are copied in source order per partition, so per AoR (embedded ->
Kafka, Kafka -> embedded, embedded -> embedded, Kafka -> Kafka), optionally
only those in ``[--from, --until]`` and/or of some AoRs. Running the same command
again resumes (or catches up with what the source gained since); nothing is
written twice:

* **embedded target**: each batch of records and the source position after it
  are committed in *one* SQLite transaction (table ``replay_copy`` in the target
  file), so the target always holds exactly the records before its recorded
  position, whatever happens (Ctrl-C, kill -9, power loss).
* **Kafka target**: the idempotent producer (acks=all) appends a batch; once every
  record is acknowledged, a checkpoint file (``<target config>.copy.json``,
  written atomically) records the source position after the batch *and* the
  target's end offsets at that moment. A batch interrupted before its checkpoint
  may have been written in part (any subset of partitions): on resume the target
  records after the checkpointed end offsets are read back and the source records
  equal to them are skipped once each, so they are not written again. The
  target must not be written by anything else while a copy runs; a lock file
  beside the checkpoint keeps a second copy out.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import fcntl
import json
import os
import sqlite3
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from events.codec import encode
from events.embedded import EmbeddedLog, fsync_dir
from events.log import LogError, Position
from events.schema import Event, event_key
from replay.source import BadInput, LogUnavailable, ReplayError, Source
from replay.state import Progress
from siphon.config import Config

CHUNK = 2000
"""Events per target write (one transaction, or one acknowledged Kafka batch)."""


@dataclass(frozen=True, slots=True)
class Filter:
    """Which events to copy: ``since <= ts <= until`` and of ``aors`` (when given)."""

    since: float | None = None
    until: float | None = None
    aors: frozenset[str] | None = None

    def accepts(self, event: Event) -> bool:
        if self.since is not None and event.ts < self.since:
            return False
        if self.until is not None and event.ts > self.until:
            return False
        return self.aors is None or event_key(event) in self.aors

    def as_json(self) -> str:
        return json.dumps({"from": self.since, "until": self.until,
                           "aors": None if self.aors is None else sorted(self.aors)},
                          sort_keys=True)


@dataclass(slots=True)
class CopyResult:
    """Progress of a copy (kept up to date while it runs, for Ctrl-C reports)."""

    source: str = ""
    target: str = ""
    resumed_from: Position | None = None
    position: Position = field(default_factory=dict)
    """Source position everything before which is copied (durably)."""
    read: int = 0
    copied: int = 0
    skipped_present: int = 0
    """Records of an interrupted batch found already in the target (not rewritten)."""
    total_copied: int = 0
    """Copied by this and earlier runs of the same copy."""
    done: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target,
                "resumed_from": None if self.resumed_from is None else
                {str(p): o for p, o in sorted(self.resumed_from.items())},
                "position": {str(p): o for p, o in sorted(self.position.items())},
                "read": self.read, "copied": self.copied,
                "skipped_already_present": self.skipped_present,
                "total_copied": self.total_copied, "done": self.done}


def source_id(cfg: Config) -> str:
    """Identifies a copy's source in checkpoints."""
    if cfg.registrar.backend == "kafka" and cfg.registrar.kafka is not None:
        k = cfg.registrar.kafka
        return f"kafka:{','.join(sorted(k.bootstrap_servers))}/{k.topic}"
    return f"embedded:{os.path.abspath(cfg.registrar.path)}"


class Target(abc.ABC):
    label: str

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def resume(self, source: str, filt: Filter) -> tuple[Position | None, int]:
        """The source position a previous run of this copy reached (None: never
        started) and how many records it copied; raises :class:`BadInput` when the
        target holds something else."""

    @abc.abstractmethod
    async def write(self, events: list[Event], position: Position) -> None:
        """Durably append ``events`` and record ``position`` as reached."""

    def already_present(self) -> collections.Counter[bytes]:
        """Encoded events of an interrupted batch already in the target."""
        return collections.Counter()


# ------------------------------------------------------------------------- embedded

_CREATE_COPY = ("CREATE TABLE IF NOT EXISTS replay_copy (source TEXT NOT NULL, "
                "partition INTEGER NOT NULL, next_offset INTEGER NOT NULL, "
                "PRIMARY KEY (source, partition))")
_CREATE_COPY_META = ("CREATE TABLE IF NOT EXISTS replay_copy_meta (source TEXT PRIMARY KEY, "
                     "filter TEXT NOT NULL, copied INTEGER NOT NULL)")


class EmbeddedTarget(Target):
    """An embedded log file (created if missing); the checkpoint lives inside it."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.label = f"embedded log {self.path}"
        self._conn: sqlite3.Connection | None = None
        self._source = ""
        self._copied = 0

    async def open(self) -> None:
        log = EmbeddedLog(self.path)  # creates a new log atomically, or checks this one
        try:
            await log.open()
        except LogError as exc:
            raise LogUnavailable(f"target {exc}") from exc
        await log.close()
        await asyncio.to_thread(self._open_sync)

    def _open_sync(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=30.0)
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(_CREATE_COPY)
        conn.execute(_CREATE_COPY_META)
        self._conn = conn

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def resume(self, source: str, filt: Filter) -> tuple[Position | None, int]:
        return await asyncio.to_thread(self._resume_sync, source, filt)

    def _resume_sync(self, source: str, filt: Filter) -> tuple[Position | None, int]:
        assert self._conn is not None
        self._source = source
        self._filter = filt.as_json()
        meta = self._conn.execute("SELECT filter, copied FROM replay_copy_meta "
                                  "WHERE source = ?", (source,)).fetchone()
        if meta is not None:
            if meta[0] != filt.as_json():
                raise BadInput(f"{self.label} holds a copy from {source} made with other "
                               f"filters ({meta[0]}); resume with the same --from/--until/"
                               "--aor, or copy into a new target")
            rows = self._conn.execute("SELECT partition, next_offset FROM replay_copy "
                                      "WHERE source = ?", (source,)).fetchall()
            self._copied = int(meta[1])
            return {int(p): int(o) for p, o in rows}, self._copied
        count = self._conn.execute('SELECT COUNT(*) FROM records').fetchone()[0]
        if count:
            raise BadInput(f"{self.label} already holds {count} records and no copy from "
                           f"{source}: copy into a new (or empty) log")
        return None, 0

    async def write(self, events: list[Event], position: Position) -> None:
        rows = []
        for ev in events:
            payload = encode(ev)
            rows.append((ev.ts, event_key(ev), payload, zlib.crc32(payload)))
        await asyncio.to_thread(self._write_sync, rows, position)
        self._copied += len(rows)

    def _write_sync(self, rows: list[tuple[float, str, bytes, int]], position: Position) -> None:
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            base = conn.execute('SELECT COALESCE(MAX("offset"), -1) + 1 FROM records'
                                ).fetchone()[0]
            conn.executemany('INSERT INTO records ("offset", ts, key, payload, crc) '
                             "VALUES (?, ?, ?, ?, ?)",
                             [(base + i, *row) for i, row in enumerate(rows)])
            conn.executemany("INSERT OR REPLACE INTO replay_copy (source, partition, "
                             "next_offset) VALUES (?, ?, ?)",
                             [(self._source, p, o) for p, o in position.items()])
            conn.execute("INSERT OR REPLACE INTO replay_copy_meta (source, filter, copied) "
                         "VALUES (?, ?, ?)",
                         (self._source, self._filter, self._copied + len(rows)))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    _filter = ""


# ---------------------------------------------------------------------------- kafka


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class KafkaTarget(Target):
    """A Kafka topic (created if missing); the checkpoint is a file beside the
    target's config."""

    def __init__(self, cfg: Config, state_file: Path, *, connect_timeout: float = 10.0) -> None:
        from events.kafka import KafkaLog

        kafka = cfg.registrar.kafka
        assert kafka is not None
        # Bigger batches than a node's appends: allow them more time.
        kafka = msgspec.structs.replace(kafka, append_timeout=max(kafka.append_timeout, 30.0))
        self.log = KafkaLog(kafka, f"{cfg.server.instance_id}-copy",
                            connect_timeout=connect_timeout)
        self.label = f"kafka topic {kafka.topic} at {','.join(kafka.bootstrap_servers)}"
        self.state_file = state_file
        self._lock_fd: int | None = None
        self._state: dict[str, Any] = {}
        self._present: collections.Counter[bytes] = collections.Counter()

    async def open(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        lock = self.state_file.with_name(self.state_file.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ReplayError(f"another copy into {self.label} is running "
                              f"(lock {lock})") from None
        self._lock_fd = fd
        try:
            await self.log.open()
        except LogError as exc:
            raise LogUnavailable(f"target {exc}") from exc

    async def close(self) -> None:
        try:
            await self.log.close()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _load(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ReplayError(f"{self.state_file}: unreadable copy checkpoint: {exc}") from exc
        return data

    async def resume(self, source: str, filt: Filter) -> tuple[Position | None, int]:
        data = self._load()
        entry = data.get(source)
        try:
            end = await self.log.end_position()
        except LogError as exc:
            raise LogUnavailable(f"target {exc}") from exc
        self._state = data
        self._source = source
        self._filter = filt.as_json()
        if entry is None:
            if any(end.values()):
                raise BadInput(f"{self.label} already holds {sum(end.values())} records and "
                               f"{self.state_file} has no copy from {source}: copy into a new "
                               "(or empty) topic")
            # Checkpoint before the first batch: an interrupted first batch resumes too.
            self._state[source] = {"filter": self._filter, "copied": 0, "position": {},
                                   "target_end": {str(p): o for p, o in end.items()}}
            await asyncio.to_thread(_write_json_atomic, self.state_file, self._state)
            return None, 0
        if entry.get("filter") != self._filter:
            raise BadInput(f"{self.label} holds a copy from {source} made with other filters "
                           f"({entry.get('filter')}); resume with the same --from/--until/"
                           "--aor, or copy into a new target")
        checkpoint_end = {int(p): int(o) for p, o in entry["target_end"].items()}
        # A topic's end offsets never go back: fewer records than the checkpoint saw
        # means another cluster or a recreated topic, and resuming would skip them all.
        lost = {p: o for p, o in checkpoint_end.items() if end.get(p, 0) < o}
        if lost:
            p, o = min(lost.items())
            raise BadInput(f"{self.label} ends before what {self.state_file} recorded as "
                           f"copied (partition {p}: end offset {end.get(p, 0)}, checkpoint "
                           f"{o}): the topic was recreated or is on another cluster; remove "
                           "the checkpoint file to copy afresh into an empty topic")
        extra = {p: o for p, o in end.items() if o > checkpoint_end.get(p, 0)}
        if extra:  # the batch in flight when the last run stopped: what of it arrived
            start = {p: checkpoint_end.get(p, 0) for p in extra}
            async with contextlib.aclosing(self.log.read(start, extra)) as batches:
                async for batch in batches:
                    for rec in batch:
                        self._present[encode(rec.event)] += 1
        self._copied = int(entry.get("copied", 0))
        return {int(p): int(o) for p, o in entry["position"].items()}, self._copied

    def already_present(self) -> collections.Counter[bytes]:
        return self._present

    async def write(self, events: list[Event], position: Position) -> None:
        try:
            if events:
                await self.log.append(events)
            end = await self.log.end_position()
        except LogError as exc:
            raise LogUnavailable(f"target {exc}") from exc
        self._copied += len(events)
        self._state[self._source] = {
            "filter": self._filter, "copied": self._copied,
            "position": {str(p): o for p, o in position.items()},
            "target_end": {str(p): o for p, o in end.items()}}
        await asyncio.to_thread(_write_json_atomic, self.state_file, self._state)

    _source = ""
    _filter = ""
    _copied = 0


def open_target(cfg: Config, config_path: str, *, connect_timeout: float = 10.0,
                state_file: str | None = None) -> Target:
    if cfg.registrar.backend == "kafka":
        if cfg.registrar.kafka is None:
            raise LogUnavailable("target: registrar.backend is kafka but registrar.kafka "
                                 "is missing")
        path = Path(state_file) if state_file else Path(config_path + ".copy.json")
        return KafkaTarget(cfg, path, connect_timeout=connect_timeout)
    return EmbeddedTarget(cfg.registrar.path)


# ----------------------------------------------------------------------------- copy


async def copy(source: Source, source_name: str, target: Target, filt: Filter, *,
               result: CopyResult | None = None, progress: Progress | None = None,
               on_total: Callable[[int], None] | None = None,
               chunk: int = CHUNK) -> CopyResult:
    """Copy what the source holds now (from where an earlier run stopped)."""
    res = result if result is not None else CopyResult()
    res.source, res.target = source.label, target.label
    resumed, res.total_copied = await target.resume(source_name, filt)
    res.resumed_from = resumed
    start: Position = dict(resumed or {})
    res.position = dict(start)
    present = target.already_present()
    end = await source.end_position()
    begin = await source.begin_position()
    if on_total is not None:
        on_total(sum(max(0, off - start.get(p, begin.get(p, 0))) for p, off in end.items()))
    pending: list[Event] = []
    pos: Position = dict(start)

    async def flush() -> None:
        events = list(pending)
        pending.clear()
        snapshot = dict(pos)
        write = asyncio.ensure_future(target.write(events, snapshot))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            # Ctrl-C: let the batch in flight finish, so the saved state is exact.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await write
            if write.done() and not write.cancelled() and write.exception() is None:
                res.copied += len(events)
                res.total_copied += len(events)
                res.position = snapshot
            raise
        res.copied += len(events)
        res.total_copied += len(events)
        res.position = snapshot

    if any(off > start.get(p, 0) for p, off in end.items()):
        async with contextlib.aclosing(source.read(start, end)) as batches:
            async for batch in batches:
                for rec in batch:
                    pos[rec.partition] = rec.offset + 1
                    ev = rec.event
                    if not filt.accepts(ev):
                        continue
                    if present:
                        data = encode(ev)
                        if present.get(data):
                            present[data] -= 1
                            if not present[data]:
                                del present[data]
                            res.skipped_present += 1
                            continue
                    pending.append(ev)
                    if len(pending) >= chunk:
                        await flush()
                res.read += len(batch)
                if progress is not None:
                    progress(len(batch))
        if pending or pos != res.position:
            await flush()
    res.done = True
    return res
