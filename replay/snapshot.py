"""Projection snapshots: registrar + trunk state and the log position it reflects.

File layout: a 24-byte header, ``SIPHSNAP`` magic, format version (u32), CRC32 of
the body (u32) and body length (u64), then the body: one msgpack document
(:class:`Snapshot`). Files are written atomically (temp file, fsync, rename,
fsync of the directory); the previous snapshot is kept as ``<path>.prev``.

A snapshot is trusted only if everything checks: magic, version, length, CRC,
decoding, the log it was taken from (backend/topic and partition count), a
position not past the log's end, and *anchors*: the time and key of the last
record it reflects in each partition must match that record in the log, so a
snapshot of another (recreated, restored, truncated) log is never applied. A
rejected snapshot is logged and ignored: the node replays the whole log. After a
warm boot the history the snapshot stands for is still read in the background
(:meth:`Snapshotter.guard_history`): damage there stops the node as at a cold boot.

For the Kafka backend each node keeps its own snapshot file (the projection is
the same on every node, so any node's snapshot boots any node of that topic).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec

from events.embedded import _gc_paused, fsync_dir
from events.log import Position, Record
from events.schema import Binding, Trunk, event_key
from projections import registrar as reg
from projections import trunks as trk
from siphon.config import Config

log = logging.getLogger("siphon.snapshot")

FORMAT_VERSION = 1
MAGIC = b"SIPHSNAP"
HEADER = struct.Struct("<8sIIQ")
FINAL_SNAPSHOT_TIMEOUT = 5.0
"""Seconds a stopping node spends on its last snapshot at most."""


class SnapshotError(Exception):
    """A snapshot file is missing, damaged, of another format, or of another log."""


class AorEntry(msgspec.Struct, array_like=True, gc=False):
    aor: str
    bindings: list[Binding]
    """In arrival order (the projection's order: most recent last)."""


class TrunkRow(msgspec.Struct, array_like=True, gc=False):
    trunk_id: str
    trunk: Trunk
    lease_expires_at: float
    registered_at: float
    last_heartbeat: float


class Anchor(msgspec.Struct, array_like=True, gc=False):
    """The last record a snapshot reflects in one partition."""

    partition: int
    offset: int
    ts: float
    key: str
    type: str


class Snapshot(msgspec.Struct, kw_only=True):
    """The body of a snapshot file."""

    log: str
    """Identity of the log: ``embedded`` or ``kafka:<topic>``."""
    partitions: int
    position: dict[int, int]
    """Next offset per partition: everything before it is reflected."""
    anchors: list[Anchor]
    created_at: float
    node: str = ""
    last_ts: float | None = None
    """Newest event time reflected (a time target at or after it may start here)."""
    aors: list[AorEntry] = msgspec.field(default_factory=list)
    trunks: list[TrunkRow] = msgspec.field(default_factory=list)

    @property
    def bindings(self) -> int:
        return sum(len(e.bindings) for e in self.aors)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Snapshot)


# ------------------------------------------------------------------- capture/restore


def capture(registrar: reg.RegistrarState, trunks: trk.TrunkState, *, identity: str,
            partitions: int, anchors: list[Anchor] | None = None, node: str = "",
            last_ts: float | None = None) -> Snapshot:
    """A consistent copy of the state (bindings are immutable: copying the containers
    is enough), safe to encode while the projection moves on."""
    return Snapshot(
        log=identity, partitions=partitions, position=dict(registrar.position),
        anchors=list(anchors or []), created_at=time.time(), node=node, last_ts=last_ts,
        aors=[AorEntry(aor, list(bs.values())) for aor, bs in registrar.aors.items()],
        trunks=[TrunkRow(tid, e.trunk, e.lease_expires_at, e.registered_at, e.last_heartbeat)
                for tid, e in trunks.trunks.items()])


def to_states(snap: Snapshot) -> tuple[reg.RegistrarState, trk.TrunkState]:
    """Fresh projection states holding the snapshot."""
    own = reg.compact_decoded  # the snapshot's bindings were just decoded: ours to share
    with _gc_paused():
        aors = {e.aor: {b.key: own(b) for b in e.bindings} for e in snap.aors if e.bindings}
    state = reg.RegistrarState(aors=aors, position=dict(snap.position))
    tstate = trk.TrunkState({r.trunk_id: trk.TrunkEntry(r.trunk, r.lease_expires_at,
                                                        r.registered_at, r.last_heartbeat)
                             for r in snap.trunks})
    return state, tstate


# ------------------------------------------------------------------------ file I/O


def encode(snap: Snapshot) -> bytes:
    body = _encoder.encode(snap)
    return HEADER.pack(MAGIC, FORMAT_VERSION, zlib.crc32(body), len(body)) + body


def decode(data: bytes, name: str = "snapshot") -> Snapshot:
    """Check and decode a snapshot file's bytes; raises :class:`SnapshotError`."""
    if len(data) < HEADER.size:
        raise SnapshotError(f"{name}: too short for a snapshot ({len(data)} bytes)")
    magic, version, crc, length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError(f"{name}: not a siphon snapshot (bad magic)")
    if version != FORMAT_VERSION:
        raise SnapshotError(f"{name}: snapshot format version {version}, this siphon reads "
                            f"version {FORMAT_VERSION}")
    body = memoryview(data)[HEADER.size:]
    if len(body) != length:
        raise SnapshotError(f"{name}: truncated or padded ({len(body)} body bytes, header "
                            f"says {length})")
    if zlib.crc32(body) != crc:
        raise SnapshotError(f"{name}: checksum mismatch (damaged)")
    try:
        with _gc_paused():  # ~100k long-lived objects: the collector would only rescan them
            return _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise SnapshotError(f"{name}: undecodable body: {exc}") from exc


def read(path: str | os.PathLike[str]) -> Snapshot:
    """Read and check a snapshot file (not yet against a log)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SnapshotError(f"{path}: no snapshot there") from None
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot read: {exc}") from exc
    return decode(data, str(path))


def previous(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def write(path: str | os.PathLike[str], snap: Snapshot | bytes) -> int:
    """Atomically replace ``path`` with the snapshot, keeping the old one as
    ``<path>.prev``; returns the size written."""
    path = Path(path)
    data = snap if isinstance(snap, bytes) else encode(snap)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        if path.exists():
            link = path.with_name(f".{path.name}.{os.getpid()}.prev.tmp")
            link.unlink(missing_ok=True)
            os.link(path, link)  # the current one stays in place until replaced
            os.replace(link, previous(path))
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return len(data)


# --------------------------------------------------------------------- validation

Reader = Callable[[Position, Position], AsyncIterator[list[Record]]]
"""``read(start, end)`` of a log (EventLog.read or Source.read)."""


def tag(record: Record) -> str:
    return str(type(record.event).__struct_config__.tag)  # type: ignore[attr-defined]


def anchor_of(record: Record) -> Anchor:
    return Anchor(record.partition, record.offset, record.event.ts, event_key(record.event),
                  tag(record))


async def anchors_at(read: Reader, position: Position) -> list[Anchor]:
    """Anchors of the records just before ``position`` (one per partition)."""
    start = {p: off - 1 for p, off in position.items() if off > 0}
    if not start:
        return []
    found: dict[int, Anchor] = {}
    batches = read(start, dict(position))
    async with contextlib.aclosing(batches):  # type: ignore[type-var]
        async for batch in batches:
            for rec in batch:
                if rec.offset == position[rec.partition] - 1:
                    found[rec.partition] = anchor_of(rec)
    return [found[p] for p in sorted(found)]


async def check(snap: Snapshot, *, identity: str, partitions: int, end: Position,
                read: Reader, name: str = "snapshot") -> None:
    """Raise :class:`SnapshotError` unless ``snap`` was taken from this log."""
    if snap.log != identity:
        raise SnapshotError(f"{name}: taken from {snap.log}, not {identity}")
    if snap.partitions != partitions:
        raise SnapshotError(f"{name}: taken from a log with {snap.partitions} partitions, "
                            f"this one has {partitions}")
    ahead = {p: off for p, off in snap.position.items() if off > end.get(p, 0)}
    if ahead:
        raise SnapshotError(f"{name}: reflects offsets {ahead} but the log ends at "
                            f"{ {p: end.get(p, 0) for p in ahead} } (another or a truncated log)")
    expected = {a.partition: a for a in snap.anchors}
    needed = {p for p, off in snap.position.items() if off > 0}
    if needed != set(expected):
        raise SnapshotError(f"{name}: anchors missing for partitions "
                            f"{sorted(needed - set(expected))}")
    actual = {a.partition: a for a in await anchors_at(read, snap.position)}
    for p, want in sorted(expected.items()):
        got = actual.get(p)
        if got != want:
            what = "missing" if got is None else f"{got.type} {got.key} at {got.ts}"
            raise SnapshotError(f"{name}: partition {p} offset {want.offset} is {what} in the "
                                f"log, the snapshot expects {want.type} {want.key} at {want.ts} "
                                "(a snapshot of another log)")


async def load_valid(path: Path, *, identity: str, partitions: int, end: Position,
                     read: Reader, warn: Callable[[str], None] = log.warning,
                     accept: Callable[[Snapshot], bool] | None = None
                     ) -> tuple[Snapshot, Path] | None:
    """The newest snapshot among ``path`` and ``<path>.prev`` that checks against the
    log (and that ``accept`` takes); problems are reported through ``warn``."""
    good: list[tuple[Snapshot, Path]] = []
    for candidate in (path, previous(path)):
        if not candidate.exists():
            continue
        try:
            snap = await asyncio.to_thread(read_file, candidate)
            await check(snap, identity=identity, partitions=partitions, end=end, read=read,
                        name=str(candidate))
        except SnapshotError as exc:
            warn(f"ignoring snapshot {exc}")
            continue
        if accept is None or accept(snap):
            good.append((snap, candidate))
    if not good:
        return None
    return max(good, key=lambda sp: (sum(sp[0].position.values()), sp[0].created_at))


def read_file(path: Path) -> Snapshot:
    return read(path)


# ------------------------------------------------------------------ config helpers


def log_identity(cfg: Config) -> str:
    if cfg.registrar.backend == "kafka" and cfg.registrar.kafka is not None:
        return f"kafka:{cfg.registrar.kafka.topic}"
    return "embedded"


def snapshot_path(cfg: Config) -> Path:
    """``registrar.snapshot_path``, else ``<log path>.snapshot`` (embedded) or
    ``<dir of registrar.path>/<topic>.snapshot`` (Kafka)."""
    configured = getattr(cfg.registrar, "snapshot_path", "")
    if configured:
        return Path(configured)
    if cfg.registrar.backend == "kafka" and cfg.registrar.kafka is not None:
        return Path(cfg.registrar.path).parent / f"{cfg.registrar.kafka.topic}.snapshot"
    return Path(cfg.registrar.path + ".snapshot")


# --------------------------------------------------------------------- node side


class Snapshotter:
    """Boots a node's projection from its newest valid snapshot and keeps writing
    new ones every ``interval`` seconds (and once more when the node stops)."""

    def __init__(self, runner: Any, log_: Any, path: Path, *, identity: str, node: str = "",
                 interval: float = 60.0) -> None:
        self.runner = runner
        self.log = log_
        self.path = path
        self.identity = identity
        self.node = node
        self.interval = interval
        self.written = 0
        self.last_written: Position | None = None
        self.last_ts: float | None = None
        self.restored: Position | None = None
        """Position of the snapshot the node booted from (None: a full replay)."""

    async def restore(self) -> Snapshot | None:
        """Load the newest valid snapshot into the runner (before its rebuild)."""
        t0 = time.monotonic()
        try:
            end = await self.log.end_position()
            found = await load_valid(self.path, identity=self.identity,
                                     partitions=self.log.partitions, end=end,
                                     read=self.log.read)
        except Exception as exc:  # never let a snapshot stop a node: full replay
            log.warning("ignoring snapshot %s: %s", self.path, exc)
            return None
        if found is None:
            if not self.path.exists():
                log.info("no snapshot at %s: replaying the whole log", self.path)
            return None
        snap, where = found
        state, tstate = to_states(snap)
        self.runner.restore(state, tstate)
        self.restored = dict(snap.position)
        self.last_written = dict(snap.position)
        self.last_ts = snap.last_ts
        log.info("projection loaded from snapshot %s in %.2fs: position %s, %d AoRs, "
                 "%d bindings, %d trunks", where, time.monotonic() - t0, snap.position,
                 len(snap.aors), snap.bindings, len(snap.trunks))
        return snap

    async def check_history(self, pace: float = 0.5) -> int:
        """Read the log up to the restored snapshot's position through the backend's
        checks (CRC, decoding, gaps), as a cold boot would have, using about ``pace``
        of a core; raises :class:`events.log.LogCorruption` naming a damaged record."""
        if not self.restored:
            return 0
        count = 0
        t0 = time.monotonic()
        batches = self.log.read(None, dict(self.restored))
        async with contextlib.aclosing(batches):  # type: ignore[type-var]
            tick = time.monotonic()
            async for batch in batches:
                count += len(batch)
                busy = time.monotonic() - tick
                await asyncio.sleep(busy * (1.0 / pace - 1.0))
                tick = time.monotonic()
        log.info("history before the snapshot checked: %d records in %.1fs", count,
                 time.monotonic() - t0)
        return count

    async def guard_history(self) -> None:
        """:meth:`check_history`, then idle until cancelled: run as one of the node's
        critical tasks, so a damaged record stops the node (naming it) after a warm
        boot too, without delaying readiness."""
        await self.check_history()
        await asyncio.Event().wait()

    async def take(self) -> bool:
        """Write a snapshot now unless nothing changed since the last one."""
        runner = self.runner
        position = dict(runner.state.position)
        if not position or position == self.last_written:
            return False
        snap = capture(runner.state, runner.trunks, identity=self.identity,
                       partitions=self.log.partitions, node=self.node)
        snap.anchors = await anchors_at(self.log.read, snap.position)
        t0 = time.monotonic()
        size = await asyncio.to_thread(write, self.path, snap)
        self.last_written = snap.position
        self.written += 1
        log.info("snapshot written to %s in %.2fs (%d bytes, position %s)", self.path,
                 time.monotonic() - t0, size, snap.position)
        return True

    async def run(self) -> None:
        """Snapshot every ``interval`` seconds; a last one when cancelled."""
        try:
            while True:
                await asyncio.sleep(self.interval)
                try:
                    await self.take()
                except Exception as exc:
                    log.warning("cannot write snapshot %s: %s", self.path, exc)
        except asyncio.CancelledError:
            # Bounded: a node stopping because its log is unreachable must still stop.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.take(), FINAL_SNAPSHOT_TIMEOUT)
            raise
