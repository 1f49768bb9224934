"""The one ``EventLog`` interface every backend (embedded, Kafka) implements."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence

import msgspec

from events.schema import Event, event_key

Position = dict[int, int]
"""Next offset to read, per partition (the embedded log has partition 0 only)."""


class Record(msgspec.Struct, frozen=True, gc=False):
    """An event as stored in the log, with its place in it."""

    partition: int
    offset: int
    event: Event


class LogError(Exception):
    """The log cannot be used (unreachable, unwritable, closed)."""


class LogCorruption(LogError):
    """A stored record is damaged or undecodable; names where."""

    def __init__(self, partition: int, offset: int, reason: str) -> None:
        super().__init__(f"corrupt record at partition {partition} offset {offset}: {reason}")
        self.partition = partition
        self.offset = offset
        self.reason = reason


class EventLog(abc.ABC):
    """Append-only, ordered, durable log of events.

    ``append`` returns only once the events are durable; records of one key
    (AoR) keep their order. ``read`` replays what exists; ``follow`` keeps
    yielding as new records are appended (by this process or another node).
    """

    @abc.abstractmethod
    async def open(self) -> None:
        """Open (creating if needed) and check the log; raises LogError/LogCorruption."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush and release resources."""

    @abc.abstractmethod
    async def append(self, events: Sequence[Event]) -> list[tuple[int, int]]:
        """Durably append ``events``; returns their ``(partition, offset)`` in order."""

    @abc.abstractmethod
    async def end_position(self) -> Position:
        """The next offset per partition: reading up to it covers everything appended so far."""

    @abc.abstractmethod
    def read(self, start: Position | None = None, end: Position | None = None,
             batch_size: int = 10_000) -> AsyncIterator[list[Record]]:
        """Yield batches of records from ``start`` (default: beginning) up to ``end``
        (default: the end position when called), then stop."""

    async def read_key(self, key: str, start: Position | None = None,
                       end: Position | None = None,
                       batch_size: int = 10_000) -> AsyncIterator[list[Record]]:
        """Like ``read``, only the records whose key (:func:`events.schema.event_key`:
        the AoR, or ``trunk:<id>``) is ``key``, in order, from its partition only.

        This default reads that partition and filters; backends override it with
        something faster (the embedded log: its key index)."""
        p = self.partition_for(key)
        if end is None:
            end = await self.end_position()
        if p not in end:
            return
        begin = {p: start[p]} if start is not None and p in start else None
        async for batch in self.read(begin, {p: end[p]}, batch_size):
            mine = [rec for rec in batch if event_key(rec.event) == key]
            if mine:
                yield mine

    @abc.abstractmethod
    def follow(self, start: Position | None = None,
               batch_size: int = 10_000) -> AsyncIterator[list[Record]]:
        """Like ``read`` without an end: waits for and yields new records forever."""

    # ---- partitions and ownership (cluster-wide once-only work) ----------------------
    @property
    def partitions(self) -> int:
        """Number of partitions (valid after ``open``); the embedded log has one."""
        return 1

    def partition_for(self, key: str) -> int:
        """The partition ``append`` puts events with this key in."""
        return 0

    @abc.abstractmethod
    def owned(self, group: str, batch_size: int = 10_000) -> AsyncIterator[list[Record]]:
        """Records of the partitions this process owns in consumer group ``group``, from
        the group's committed position (a group with nothing committed starts at the
        end). Ownership moves when members join or leave (Kafka consumer groups);
        the embedded log's single process owns its only partition."""

    @abc.abstractmethod
    async def commit(self, group: str, position: Position) -> None:
        """Record that ``group`` has handled everything before ``position``; after a
        crash, ``owned`` resumes from there (at-least-once processing)."""

    def owned_partitions(self, group: str) -> set[int]:
        """Partitions currently owned in ``group`` (all, for a single-process log)."""
        return set(range(self.partitions))

