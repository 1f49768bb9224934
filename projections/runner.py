"""Feeds a projection from an EventLog: rebuild at start, then follow live."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import heapq
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from events import codec
from events.log import EventLog, LogCorruption, Position, Record
from events.schema import TRUNK_EVENT_TYPES
from projections import registrar as reg
from projections import trunks

log = logging.getLogger("siphon.projection")

Listener = Callable[[Record, str], None]
"""Called after each applied record with its on_change type (sync, must not block)."""


def _release_free_memory() -> None:
    """Give the heap pages a rebuild freed back to the OS (glibc keeps them otherwise:
    the superseded records' payloads leave holes, ~60 MiB per million events)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def _corrupt(partition: int, offset: int, reason: str) -> None:
    raise LogCorruption(partition, offset, reason)


class ProjectionRunner:
    """Applies log records to the registrar and trunk projections in log order.

    ``rebuild()`` replays the log up to its current end; ``run()`` then follows
    it. ``wait_applied(partition, offset)`` lets a writer wait until its own
    append is reflected in the state, so replies are built from the log.
    """

    def __init__(self, log_: EventLog, state: reg.RegistrarState | None = None) -> None:
        self.log = log_
        self.state = state if state is not None else reg.RegistrarState()
        self.trunks = trunks.TrunkState()
        self.listeners: list[Listener] = []
        self._waiters: dict[int, list[tuple[int, int, asyncio.Future[None]]]] = {}
        self._seq = 0
        self.applied = 0

    def restore(self, state: reg.RegistrarState, trunk_state: trunks.TrunkState) -> None:
        """Start from a snapshot: ``rebuild()`` then replays only what follows
        ``state.position``. Call before ``rebuild()``."""
        self.state = state
        self.trunks = trunk_state

    def _apply_batch(self, records: list[Record],
                     registrar_apply: Callable[[reg.RegistrarState, Any], str | None] = reg.apply
                     ) -> None:
        state = self.state
        trunk_state = self.trunks
        listeners = self.listeners
        trunk_types = TRUNK_EVENT_TYPES
        last: dict[int, int] = {}
        for rec in records:
            event = rec.event
            if isinstance(event, trunk_types):
                change = trunks.apply(trunk_state, event)
            else:
                change = registrar_apply(state, event)
            last[rec.partition] = rec.offset
            if change is not None and listeners:
                for listener in listeners:
                    listener(rec, change)
        for partition, offset in last.items():
            state.position[partition] = offset + 1
        self.applied += len(records)
        self._wake()

    def _wake(self) -> None:
        for partition, heap in self._waiters.items():
            done = self.state.position.get(partition, 0)
            while heap and heap[0][0] < done:
                _, _, fut = heapq.heappop(heap)
                if not fut.done():
                    fut.set_result(None)

    async def rebuild(self, progress: Callable[[int, float], None] | None = None) -> int:
        """Apply everything in the log up to its end now; returns records applied.

        The cyclic garbage collector is paused meanwhile (the projection only
        grows; scanning it over and over is most of the cost otherwise) and the
        rebuilt state is then frozen out of future collections.
        """
        start = time.monotonic()
        before = self.applied
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            payloads = getattr(self.log, "read_payloads", None)
            if (payloads is not None and codec.slim_usable() and not self.listeners
                    and await self._fast_pays()
                    and await self._rebuild_fast(payloads, progress, start)):
                return self.applied - before
            async for batch in self.log.read(dict(self.state.position) or None):
                self._apply_batch(batch, reg.apply_uncompacted)
                if progress is not None:
                    progress(self.applied - before, time.monotonic() - start)
            reg.compact_state(self.state)
        finally:
            if was_enabled:
                gc.enable()
            gc.freeze()
            if self.applied - before >= 10_000:
                _release_free_memory()
        return self.applied - before

    async def _fast_pays(self) -> bool:
        end = await self.log.end_position()
        position = self.state.position
        todo = sum(max(0, off - position.get(p, 0)) for p, off in end.items())
        return reg.rebuild_pays(self.state, todo)

    async def _rebuild_fast(self, read: Callable[..., AsyncIterator[tuple[int, Any, list[bytes]]]],
                            progress: Callable[[int, float], None] | None,
                            start: float) -> bool:
        """Rebuild from the stored payloads, decoding only what decides the state
        (:class:`projections.registrar.Rebuild`); same result as applying every
        record. False (nothing changed) when a record needs the full path."""
        before = self.applied
        trunk_state = self.trunks
        saved = {tid: dataclasses.replace(e) for tid, e in trunk_state.trunks.items()}

        def other(event: Any) -> None:
            if isinstance(event, TRUNK_EVENT_TYPES):
                trunks.apply(trunk_state, event)
            else:
                reg.apply(self.state, event)

        bad = getattr(self.log, "bad_record", None) or _corrupt
        rebuild = reg.Rebuild(self.state, other, bad)
        try:
            batches = read(dict(self.state.position) or None)
            async with contextlib.aclosing(batches):  # type: ignore[type-var]
                async for partition, offsets, payloads in batches:
                    rebuild.feed(partition, offsets, payloads)
                    self.applied += len(payloads)
                    if progress is not None:
                        progress(self.applied - before, time.monotonic() - start)
            rebuild.finish()
        except reg.NeedFullRebuild as exc:
            log.warning("fast rebuild not possible (%s): replaying with full decoding", exc)
            trunk_state.trunks = saved
            self.applied = before
            return False
        self._wake()
        return True

    async def run(self) -> None:
        """Follow the log forever from the current position."""
        async for batch in self.log.follow(dict(self.state.position) or None):
            self._apply_batch(batch)

    async def wait_applied(self, partition: int, offset: int) -> None:
        """Return once the record at ``offset`` of ``partition`` has been applied."""
        if self.state.position.get(partition, 0) > offset:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._waiters.setdefault(partition, []), (offset, self._seq, fut))
        await fut

    @property
    def position(self) -> Position:
        return dict(self.state.position)
