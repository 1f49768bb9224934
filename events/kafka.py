"""Kafka event log (multi-node) on aiokafka.

One topic holds every event; the key of a record is the event's AoR
(:func:`events.schema.event_key`), so all events of one AoR are in one partition,
in append order. Partitions are chosen by ``murmur2(key) % partitions`` exactly as
the default partitioners of aiokafka and the Java client do, and passed explicitly to
the producer, so :meth:`KafkaLog.partition_for` is where ``append`` puts a key.

Semantics, compared with the embedded log:

* ``append`` returns once every event is acknowledged by all in-sync replicas
  (idempotent producer, ``acks=all``). It is bounded by ``append_timeout``; on a
  timeout the outcome is unknown (the events may still be written later), which is
  reported as :class:`~events.log.LogError`.
* ``read``/``follow`` assign every partition by hand (no consumer group) and yield
  batches that may mix partitions: order is kept per partition (so per AoR), records
  of different partitions may interleave in any way.
* ``owned`` is a consumer-group member: Kafka spreads the partitions over the
  group's members and moves them when members come and go. Offsets are committed
  only by :meth:`KafkaLog.commit` (no auto-commit), so processing is at-least-once:
  after a crash or a hand-over, records after the last commit are delivered again.
  A group that never committed starts at the end of each partition; the first
  member to get a partition commits that start, so a later hand-over resumes from
  it instead of jumping to the then-current end.
* The partition count is read at ``open``; partitions added later are not seen.
* Catching up: ``end = await log.end_position()`` then ``read(start, end)`` stops
  exactly when every partition's position reached ``end`` (positions, not record
  offsets, so gaps left by compaction or transaction markers cannot stall it);
  ``follow(end)`` then continues from there without a gap or a duplicate.
* Iterations hold a consumer each: close them (``contextlib.aclosing``) when leaving
  them early; ``close`` stops them all.
* A record that does not decode as an event (written by something else) is skipped
  with a warning naming topic/partition/offset (``on_bad_record: skip``) or raises
  :class:`~events.log.LogCorruption` (``on_bad_record: stop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka import errors as kerr
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.partitioner import murmur2
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata, TopicPartition

from events.codec import EventDecodeError, decode, encode
from events.deadlines import Deadlines
from events.embedded import _gc_paused
from events.log import EventLog, LogCorruption, LogError, Position, Record
from events.schema import EVENT_TYPES, Event, event_key
from siphon.config import Kafka

log = logging.getLogger("siphon.events.kafka")

TOPIC_CONFIG: dict[str, str] = {"retention.ms": "-1", "retention.bytes": "-1"}
"""Configuration of a topic created by ``open``: an event log keeps its history."""

_PARTITION_CACHE_MAX = 100_000

_FETCH_ERRORS = (kerr.KafkaError, kerr.ConsumerStoppedError, kerr.IllegalOperation)
_REBALANCED = (
    kerr.CommitFailedError,
    kerr.RebalanceInProgressError,
    kerr.IllegalGenerationError,
    kerr.UnknownMemberIdError,
    kerr.IllegalStateError,
)


def kafka_partition(key: bytes, partitions: int) -> int:
    """The partition of ``key`` among ``partitions``, as Kafka's default partitioners
    (aiokafka's ``DefaultPartitioner``, the Java client) compute it."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def _ssl_context(config: Kafka) -> ssl.SSLContext | None:
    if config.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    try:
        ctx = ssl.create_default_context(cafile=config.ssl_cafile)
        if config.ssl_certfile:
            ctx.load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise LogError(f"kafka: cannot load TLS files: {exc}") from exc
    return ctx


class _ClientErrors(logging.Handler):
    """Collects what aiokafka logs about failing connections to ``servers`` (it logs the
    cause, e.g. authentication or certificate failures, but raises a generic error)."""

    def __init__(self, servers: Sequence[str]) -> None:
        super().__init__(logging.WARNING)
        self.servers = tuple(servers)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            message = record.getMessage()
            if any(server in message for server in self.servers):
                self.messages.append(message)

    def __enter__(self) -> _ClientErrors:
        logging.getLogger("aiokafka").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("aiokafka").removeHandler(self)


_PRODUCER_BROKEN = tuple(
    getattr(kerr, name) for name in (
        "OutOfOrderSequenceNumber", "UnknownProducerIdError", "ProducerFenced")
    if hasattr(kerr, name))


class _OwnershipListener(ConsumerRebalanceListener):
    """Tracks a group member's partitions; pins a new group's start (see module doc)."""

    def __init__(self, log_: KafkaLog, group: str, consumer: AIOKafkaConsumer) -> None:
        self._log = log_
        self._group = group
        self._consumer = consumer
        self.partitions: set[int] = set()

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        gone = {tp.partition for tp in revoked}
        self.partitions -= gone
        if gone:
            log.info("%s: group %s: partitions %s revoked", self._log.topic,
                     self._log.group_id(self._group), sorted(gone))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        tps = [tp for tp in assigned if tp.topic == self._log.topic]
        fresh: dict[TopicPartition, OffsetAndMetadata] = {}
        try:
            for tp in tps:
                if await self._consumer.committed(tp) is None:
                    # A new group starts where the log ended when this node opened it,
                    # not where it ends now: events appended between this node's
                    # start and the group's first assignment still get callbacks.
                    start = self._log.opened_at_end.get(tp.partition)
                    if start is None:
                        start = await self._consumer.position(tp)
                    else:
                        self._consumer.seek(tp, start)
                    fresh[tp] = OffsetAndMetadata(start, "")
            if fresh:
                await self._consumer.commit(fresh)
        except Exception as exc:  # the group just resumes at the end then
            log.warning("%s: group %s: cannot pin start of partitions %s: %s",
                        self._log.topic, self._log.group_id(self._group),
                        sorted(tp.partition for tp in fresh), exc)
        self.partitions = {tp.partition for tp in tps}
        log.info("%s: group %s: owns partitions %s", self._log.topic,
                 self._log.group_id(self._group), sorted(self.partitions))


class KafkaLog(EventLog):
    """:class:`EventLog` on one Kafka topic (see the module docstring for semantics)."""

    def __init__(
        self,
        config: Kafka,
        node_id: str = "",
        *,
        connect_timeout: float = 10.0,
        follow_max_wait_ms: int = 100,
    ) -> None:
        self.config = config
        self._deadlines = Deadlines(config.append_timeout)
        self.topic = config.topic
        self.node_id = node_id
        self.connect_timeout = connect_timeout
        """Bound on ``open`` (connect, create topic, metadata) and on metadata queries."""
        self.follow_max_wait_ms = follow_max_wait_ms
        """How long the broker may hold a ``follow``/``owned`` fetch with no data. It
        does not delay delivery (a held fetch is answered as soon as records arrive:
        append -> follow p99 was ~11 ms at 10, 100 and 500 alike); it only sets how
        often an idle consumer polls the broker."""
        self._bootstrap = ",".join(config.bootstrap_servers)
        self._client_id = f"{config.client_id}-{node_id}" if node_id else config.client_id
        self._ssl = _ssl_context(config)
        self._state = "new"  # new -> open -> closed
        self._partitions = 0
        self._partition_cache: dict[bytes, int] = {}
        self._producer: AIOKafkaProducer | None = None
        self._producer_lock = asyncio.Lock()
        self.opened_at_end: dict[int, int] = {}
        """End offsets of every partition when ``open`` finished."""
        self._meta: AIOKafkaConsumer | None = None
        self._consumers: set[AIOKafkaConsumer] = set()
        self._groups: dict[str, tuple[AIOKafkaConsumer, _OwnershipListener]] = {}

    # -- lifecycle ---------------------------------------------------------

    def _common(self, role: str) -> dict[str, Any]:
        c = self.config
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self._bootstrap,
            "client_id": f"{self._client_id}.{role}",
            "security_protocol": c.security_protocol,
            "ssl_context": self._ssl,
        }
        if c.security_protocol.startswith("SASL_"):
            kwargs["sasl_mechanism"] = c.sasl_mechanism or "PLAIN"
            kwargs["sasl_plain_username"] = c.sasl_username
            kwargs["sasl_plain_password"] = c.sasl_password
        return kwargs

    def _consumer(self, role: str, **kwargs: Any) -> AIOKafkaConsumer:
        defaults: dict[str, Any] = {
            "enable_auto_commit": False,
            "isolation_level": "read_committed",
            "max_partition_fetch_bytes": 4 * 1024 * 1024,
        }
        return AIOKafkaConsumer(**{**self._common(role), **defaults, **kwargs})

    def group_id(self, group: str) -> str:
        """The Kafka consumer group id of siphon group ``group``."""
        return f"{self.config.group_id}.{group}"

    async def open(self) -> None:
        """Connect, create the topic if missing, learn its partition count.

        Raises :class:`LogError` (naming the bootstrap servers) when the cluster
        cannot be reached or used within ``connect_timeout`` seconds.
        """
        if self._state != "new":
            raise LogError(f"kafka topic {self.topic}: event log already opened")
        if not self.config.bootstrap_servers:
            raise LogError("kafka: registrar.kafka.bootstrap_servers is empty")
        if self.config.sasl_mechanism == "OAUTHBEARER":
            raise LogError("kafka: sasl_mechanism OAUTHBEARER needs a token provider, "
                           "which siphon does not configure")
        with _ClientErrors(self.config.bootstrap_servers) as errors:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await self._open()
            except BaseException as exc:
                await self._shutdown()
                self._state = "new"
                where = f"kafka {self._bootstrap} (topic {self.topic})"
                cause = f" (last error: {errors.messages[-1]})" if errors.messages else ""
                if isinstance(exc, LogError):
                    raise LogError(f"{where}: {exc}") from exc
                if isinstance(exc, TimeoutError):
                    raise LogError(f"{where}: not reachable or not answering within "
                                   f"{self.connect_timeout:g} s{cause}") from exc
                if isinstance(exc, kerr.KafkaError | OSError):
                    raise LogError(f"{where}: cannot connect: {exc}{cause}") from exc
                raise
        self._state = "open"
        self.opened_at_end = await self.end_position()

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **self._common("producer"),
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            max_batch_size=512 * 1024,
        )

    async def _replace_producer(self, broken: AIOKafkaProducer, reason: str) -> None:
        """Start a fresh idempotent producer (new producer id) after a sequence error.

        aiokafka drops a batch that waited longer than its request timeout for a
        partition leader (a long broker outage) even when it was already sent once;
        its sequence numbers are then lost and every later batch of that partition is
        refused as out of order. Only a new producer id gets the partition writable
        again. The appends that failed answered "outcome unknown" already.
        """
        async with self._producer_lock:
            if self._producer is not broken or self._state != "open":
                return  # someone else replaced it already
            log.warning("kafka topic %s: restarting the producer after %s", self.topic, reason)
            fresh = self._new_producer()
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await fresh.start()
            except (TimeoutError, kerr.KafkaError) as exc:
                log.warning("kafka topic %s: new producer not started yet: %s", self.topic, exc)
                with contextlib.suppress(Exception):
                    await fresh.stop()
                return
            self._producer = fresh
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.connect_timeout):
                    await broken.stop()

    async def _open(self) -> None:
        admin = AIOKafkaAdminClient(**self._common("admin"))
        try:
            await admin.start()
            await self._create_topic(admin)
        finally:
            await admin.close()
        self._producer = self._new_producer()
        await self._producer.start()
        parts = await self._producer.partitions_for(self.topic)
        self._partitions = len(parts)
        if sorted(parts) != list(range(self._partitions)):
            raise LogError(f"unexpected partitions {sorted(parts)}")
        if self._partitions != self.config.partitions:
            log.warning("kafka topic %s has %d partitions, not the configured %d; using %d",
                        self.topic, self._partitions, self.config.partitions, self._partitions)
        self._meta = self._consumer("meta")
        await self._meta.start()

    async def _create_topic(self, admin: AIOKafkaAdminClient) -> None:
        """Create the topic unless it exists (so a principal without the right to
        create topics can use a topic made beforehand)."""
        if self.topic in await admin.list_topics():
            return
        topic = NewTopic(self.topic, self.config.partitions, self.config.replication_factor,
                         topic_configs=TOPIC_CONFIG)
        response = await admin.create_topics([topic])
        for name, code, message in (e[:3] for e in response.topic_errors):
            if name != self.topic or code == 0:
                continue
            error = kerr.for_code(code)
            if error is kerr.TopicAlreadyExistsError:
                return
            raise LogError(f"cannot create topic: {error.__name__}: {message or ''}".rstrip())
        log.info("created kafka topic %s (%d partitions, replication factor %d)", self.topic,
                 self.config.partitions, self.config.replication_factor)

    async def close(self) -> None:
        """Flush the producer, stop it and every consumer (running iterations then
        raise :class:`LogError`)."""
        if self._state == "closed":
            return
        self._state = "closed"
        await self._shutdown()

    async def _shutdown(self) -> None:
        consumers = [*self._consumers, *(c for c, _ in self._groups.values())]
        if self._meta is not None:
            consumers.append(self._meta)
        self._meta = None
        self._groups.clear()
        self._consumers.clear()
        producer, self._producer = self._producer, None
        tasks = [c.stop() for c in consumers]
        if producer is not None:
            tasks.append(producer.stop())  # flushes what is buffered
        if tasks:
            with contextlib.suppress(Exception):  # best effort, bounded
                async with asyncio.timeout(max(self.connect_timeout,
                                               self.config.append_timeout)):
                    await asyncio.gather(*tasks, return_exceptions=True)

    def _check_open(self) -> None:
        if self._state != "open":
            raise LogError(f"kafka topic {self.topic}: event log is {self._state}, not open")

    # -- partitions ----------------------------------------------------------

    @property
    def partitions(self) -> int:
        """Partition count of the topic, read at ``open``."""
        return self._partitions

    def partition_for(self, key: str) -> int:
        """The partition ``append`` puts events with key (AoR) ``key`` in."""
        if self._partitions < 1:
            raise LogError(f"kafka topic {self.topic}: event log is not open")
        return self._partition_of(key.encode())

    def _partition_of(self, key: bytes) -> int:
        """``kafka_partition`` of ``key``, memoised (murmur2 is pure Python)."""
        cache = self._partition_cache
        partition = cache.get(key)
        if partition is None:
            if len(cache) >= _PARTITION_CACHE_MAX:
                cache.clear()
            partition = cache[key] = kafka_partition(key, self._partitions)
        return partition

    def _tps(self, partitions: Iterable[int] | None = None) -> list[TopicPartition]:
        ps = range(self._partitions) if partitions is None else partitions
        return [TopicPartition(self.topic, p) for p in ps]

    def _check_position(self, position: Position | None, what: str) -> Position:
        if position is None:
            return {}
        bad = sorted(p for p in position if not 0 <= p < self._partitions)
        if bad:
            raise ValueError(f"{what} names partitions {bad}; topic {self.topic} has "
                             f"{self._partitions}")
        neg = {p: o for p, o in position.items() if o < 0}
        if neg:
            raise ValueError(f"negative {what} offsets {neg}")
        return dict(position)

    # -- appending -----------------------------------------------------------

    async def append(self, events: Sequence[Event]) -> list[tuple[int, int]]:
        """Append ``events`` (key: AoR) and wait until all replicas in sync have them.

        Returns their ``(partition, offset)`` in order. Raises :class:`LogError` on
        any failure or after ``append_timeout`` seconds; then some, all or none of
        the events may be (or later become) appended.
        """
        self._check_open()
        producer = self._producer
        if producer is None:
            raise LogError(f"kafka topic {self.topic}: event log is not open")
        prepared: list[tuple[bytes, bytes, int]] = []
        for event in events:
            if not isinstance(event, EVENT_TYPES):
                raise TypeError(f"not an event: {type(event).__name__}")
            key = event_key(event).encode()
            prepared.append((key, encode(event), self._partition_of(key)))
        if not prepared:
            return []
        # Every event goes through aiokafka's accumulator, which packs concurrent appends
        # into shared record batches (its explicit batch API, send_batch, misbehaves
        # under concurrency: spurious KafkaTimeoutError).
        futures: list[asyncio.Future[Any]] = []
        deadline = self._deadlines.enter()  # (one timer per 50 ms of appends)
        try:
            for key, value, partition in prepared:
                futures.append(
                    await producer.send(self.topic, value, key=key, partition=partition))
            results = [await fut for fut in futures]  # all sent: wait for each
        except asyncio.CancelledError:
            if not self._deadlines.timed_out(deadline):
                raise
            raise LogError(
                f"kafka topic {self.topic}: append not acknowledged within "
                f"{self.config.append_timeout:g} s; outcome unknown") from None
        except kerr.KafkaError as exc:
            if isinstance(exc, _PRODUCER_BROKEN):
                await self._replace_producer(producer, type(exc).__name__)
            raise LogError(f"kafka topic {self.topic}: append failed: {exc!r}") from exc
        finally:
            self._deadlines.leave(deadline)
            for fut in futures:  # retrieve failures nobody awaits any more
                if fut.done() and not fut.cancelled():
                    fut.exception()
                elif not fut.done():
                    fut.add_done_callback(_retrieve)
        return [(md.partition, md.offset) for md in results]

    # -- reading -----------------------------------------------------------

    async def end_position(self) -> Position:
        """The end offset (next offset to be written) of every partition."""
        self._check_open()
        meta = self._meta
        if meta is None:
            raise LogError(f"kafka topic {self.topic}: event log is not open")
        try:
            async with asyncio.timeout(self.connect_timeout):
                ends = await meta.end_offsets(self._tps())
        except TimeoutError as exc:
            raise LogError(f"kafka topic {self.topic}: no end offsets within "
                           f"{self.connect_timeout:g} s") from exc
        except _FETCH_ERRORS as exc:
            raise LogError(f"kafka topic {self.topic}: cannot get end offsets: {exc!r}") from exc
        return {tp.partition: off for tp, off in ends.items()}

    def _decode(self, data: dict[TopicPartition, list[ConsumerRecord[Any, Any]]],
                stop: Position | None = None) -> list[Record]:
        """Records of one fetch, per partition in offset order, not at/after ``stop``."""
        out: list[Record] = []
        with _gc_paused():
            for tp, msgs in data.items():
                limit = None if stop is None else stop.get(tp.partition)
                for msg in msgs:
                    if limit is not None and msg.offset >= limit:
                        break
                    try:
                        if msg.value is None:
                            raise EventDecodeError("record has no value")
                        event = decode(msg.value)
                    except EventDecodeError as exc:
                        self._bad_record(tp.partition, msg.offset, str(exc))
                        continue
                    out.append(Record(tp.partition, msg.offset, event))
        return out

    @property
    def _isolation_committed(self) -> bool:
        return True  # as every consumer of this log (see _consumer)

    def bad_record(self, partition: int, offset: int, reason: str) -> None:
        """A record that does not decode: stop or skip, as ``on_bad_record`` says."""
        self._bad_record(partition, offset, reason)

    def _bad_record(self, partition: int, offset: int, reason: str) -> None:
        if self.config.on_bad_record == "stop":
            raise LogCorruption(partition, offset, f"undecodable record in kafka topic "
                                f"{self.topic}: {reason}")
        log.warning("skipping undecodable record in kafka topic %s partition %d offset %d: %s",
                    self.topic, partition, offset, reason)

    async def _assigned_consumer(self, role: str, start: Position,
                                 **kwargs: Any) -> AIOKafkaConsumer:
        """A started consumer (no group) on every partition, at ``start`` (missing
        partitions: their beginning)."""
        consumer = self._consumer(role, group_id=None, auto_offset_reset="none", **kwargs)
        self._consumers.add(consumer)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await consumer.start()
                tps = self._tps()
                consumer.assign(tps)
                rest = [tp for tp in tps if tp.partition not in start]
                if rest:
                    await consumer.seek_to_beginning(*rest)
                for tp in tps:
                    if tp.partition in start:
                        consumer.seek(tp, start[tp.partition])
        except BaseException as exc:
            self._consumers.discard(consumer)
            await consumer.stop()
            if isinstance(exc, TimeoutError | kerr.KafkaError):
                raise LogError(f"kafka topic {self.topic}: cannot start reading: "
                               f"{exc!r}") from exc
            raise
        return consumer

    async def _release(self, consumer: AIOKafkaConsumer) -> None:
        self._consumers.discard(consumer)
        with contextlib.suppress(Exception):
            await consumer.stop()

    def _fetch_error(self, exc: BaseException) -> LogError:
        if self._state != "open":
            return LogError(f"kafka topic {self.topic}: event log is {self._state}")
        if isinstance(exc, kerr.OffsetOutOfRangeError):
            return LogError(f"kafka topic {self.topic}: position out of range "
                            f"(records deleted, or a position from another log?): {exc}")
        return LogError(f"kafka topic {self.topic}: read failed: {exc!r}")

    async def read(
        self,
        start: Position | None = None,
        end: Position | None = None,
        batch_size: int = 10_000,
    ) -> AsyncIterator[list[Record]]:
        """Yield batches from ``start`` (missing partitions: their beginning) up to
        ``end`` (default: the end offsets when iteration starts), then stop.

        Order is kept within a partition; partitions interleave arbitrarily.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._check_open()
        begin = self._check_position(start, "start")
        stop = self._check_position(end, "end") if end is not None else await self.end_position()
        # partitions missing from an explicit end are not read
        todo = {p for p, off in stop.items() if off > begin.get(p, 0)}
        if not todo:
            return
        consumer = await self._assigned_consumer("read", begin, fetch_max_wait_ms=100)
        try:
            consumer.pause(*self._tps(set(range(self._partitions)) - todo))
            while todo:
                try:
                    data = await consumer.getmany(timeout_ms=1000, max_records=batch_size)
                    for p in list(todo):
                        tp = TopicPartition(self.topic, p)
                        if await consumer.position(tp) >= stop[p]:
                            todo.discard(p)
                            consumer.pause(tp)
                except _FETCH_ERRORS as exc:
                    raise self._fetch_error(exc) from exc
                if not data:
                    self._check_open()
                    continue
                records = self._decode(data, stop)
                if records:
                    yield records
        finally:
            await self._release(consumer)

    async def read_key(
        self,
        key: str,
        start: Position | None = None,
        end: Position | None = None,
        batch_size: int = 10_000,
    ) -> AsyncIterator[list[Record]]:
        """Like :meth:`read`, only the records of ``key`` (AoR or ``trunk:<id>``): its
        partition is scanned by the bulk reader, which keeps only the records carrying
        ``key`` as their Kafka key; those are decoded and checked to be ``key``'s."""
        self._check_open()
        p = self.partition_for(key)
        stop = self._check_position(end, "end") if end is not None else await self.end_position()
        if p not in stop:
            return
        begin = self._check_position(start, "start")
        first = {p: begin[p]} if p in begin else None
        async with contextlib.aclosing(self.read_payloads(
                first, {p: stop[p]}, batch_size, key=key.encode())) as batches:
            async for partition, offsets, values in batches:
                out: list[Record] = []
                with _gc_paused():
                    for offset, value in zip(offsets, values, strict=True):
                        try:
                            event = decode(value)
                        except EventDecodeError as exc:
                            self._bad_record(partition, offset, str(exc))
                            continue
                        if event_key(event) == key:
                            out.append(Record(partition, offset, event))
                if out:
                    yield out

    # -- bulk reading for rebuilds ------------------------------------------------

    async def read_payloads(
        self,
        start: Position | None = None,
        end: Position | None = None,
        batch_size: int = 10_000,
        *,
        key: bytes | None = None,
    ) -> AsyncIterator[tuple[int, list[int], list[bytes]]]:
        """Like :meth:`read` (same start, end and order), but yields ``(partition,
        offsets, values)`` with the records' raw values, for a projection rebuild that
        decodes only what it needs (``projections.registrar.Rebuild``).

        It sends Fetch requests itself and walks the record batches with aiokafka's
        C record parser: no consumer, no ``ConsumerRecord`` per record (a third of a
        rebuild's time otherwise), and the next fetch is in flight while the caller
        works on the current one. With ``key``, only the records with that Kafka key
        (one AoR's, before any decoding). Anything unusual (aborted transactions, a CRC
        error, a missing leader, a fetch error) hands over to the consumer-based
        :meth:`read` from where it got to, which deals with it as usual.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._check_open()
        begin = self._check_position(start, "start")
        stop = self._check_position(end, "end") if end is not None else await self.end_position()
        pos = dict(begin)
        missing = [tp for tp in self._tps(p for p in stop if p not in pos)]
        if missing:
            meta = self._meta
            if meta is None:
                raise LogError(f"kafka topic {self.topic}: event log is not open")
            try:
                async with asyncio.timeout(self.connect_timeout):
                    begins = await meta.beginning_offsets(missing)
            except (TimeoutError, *_FETCH_ERRORS) as exc:
                raise LogError(f"kafka topic {self.topic}: cannot get first offsets: "
                               f"{exc!r}") from exc
            pos.update({tp.partition: off for tp, off in begins.items()})
        todo = {p for p, off in stop.items() if off > pos.get(p, 0)}
        if not todo:
            return
        client = AIOKafkaClient(**self._common("bulk"))
        fetch: asyncio.Task[list[Any]] | None = None
        fallback: str | None = None
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await client.bootstrap()
                    await client.add_topic(self.topic)
                    await client.force_metadata_update()
            except Exception as exc:
                fallback = f"cannot bootstrap: {exc!r}"
            if fallback is None:
                fetch = asyncio.ensure_future(self._raw_fetch(client, pos, todo))
            while fetch is not None:
                try:
                    parsed = await fetch
                except _RawFetchAborted as exc:
                    fallback = str(exc)
                    break
                except kerr.KafkaError as exc:
                    fallback = repr(exc)
                    break
                finally:
                    fetch = None
                # positions after this response: fetch the next while this one is used
                for p, batches, _ in parsed:
                    if batches:
                        pos[p] = max(pos[p], min(batches[-1].next_offset, stop[p]))
                    if pos[p] >= stop[p]:
                        todo.discard(p)
                if todo:
                    self._check_open()
                    fetch = asyncio.ensure_future(self._raw_fetch(client, pos, todo))
                for p, batches, first in parsed:
                    limit = stop[p]
                    offsets: list[int] = []
                    values: list[bytes] = []
                    for batch in batches:
                        recs = list(batch)
                        if not recs:
                            continue
                        if recs[0].offset < first or recs[-1].offset >= limit:
                            recs = [r for r in recs if first <= r.offset < limit]
                        if key is not None:
                            recs = [r for r in recs if r.key == key]
                        offsets += [r.offset for r in recs]
                        values += [r.value or b"" for r in recs]
                    if offsets:
                        yield p, offsets, values
        finally:
            if fetch is not None:
                fetch.cancel()
                await asyncio.wait([fetch])  # does not raise the fetch's outcome
                if not fetch.cancelled():
                    fetch.exception()  # retrieved: nobody wants it any more
            with contextlib.suppress(Exception):
                await client.close()
        if fallback is not None and todo:
            log.info("kafka topic %s: bulk read hands over to the consumer (%s)",
                     self.topic, fallback)
            rest = {p: pos[p] for p in todo}
            async with contextlib.aclosing(
                    self.read(rest, {p: stop[p] for p in todo}, batch_size)) as batches:
                async for records in batches:
                    by_part: dict[int, tuple[list[int], list[bytes]]] = {}
                    for rec in records:
                        if key is not None and event_key(rec.event).encode() != key:
                            continue
                        offs, vals = by_part.setdefault(rec.partition, ([], []))
                        offs.append(rec.offset)
                        vals.append(encode(rec.event))
                    for p, (offs, vals) in by_part.items():
                        yield p, offs, vals

    async def _raw_fetch(self, client: AIOKafkaClient, pos: Position,
                         todo: set[int]) -> list[tuple[int, list[Any], int]]:
        """One Fetch per leader for the ``todo`` partitions at ``pos``: their complete
        data record batches, with the offset asked for (``(partition, batches, from)``)."""
        by_node: dict[int, list[tuple[int, int, int]]] = {}
        for p in sorted(todo):
            leader = client.cluster.leader_for_partition(TopicPartition(self.topic, p))
            if leader is None or leader == -1:
                raise _RawFetchAborted(f"no leader known for partition {p}")
            by_node.setdefault(leader, []).append((p, pos[p], _BULK_PARTITION_BYTES))
        requests = [
            client.send(node, FetchRequest(self.follow_max_wait_ms, 1, _BULK_FETCH_BYTES,
                                           1 if self._isolation_committed else 0,
                                           [(self.topic, parts)]))
            for node, parts in by_node.items()]
        out: list[tuple[int, list[Any], int]] = []
        asked = {p: off for parts in by_node.values() for p, off, _ in parts}
        for response in await asyncio.gather(*requests):
            for _topic, partitions in response.topics:
                for partition, error_code, _high, *part_data in partitions:
                    if error_code != 0:
                        raise _RawFetchAborted(
                            f"partition {partition}: {kerr.for_code(error_code).__name__}")
                    # part_data: v4 [lso, aborted, records]; v5-v10 [lso, log start,
                    # aborted, records]; v11+ [lso, log start, aborted, replica, records]
                    v = response.API_VERSION
                    aborted = part_data[2] if v >= 11 else part_data[-2] if v >= 4 else None
                    if aborted:
                        raise _RawFetchAborted(f"partition {partition}: aborted transactions")
                    records = MemoryRecords(part_data[-1])
                    batches: list[Any] = []
                    while records.has_next():
                        batch = records.next_batch()
                        if batch is None:
                            break
                        if not batch.validate_crc():
                            raise _RawFetchAborted(f"partition {partition}: CRC error")
                        if batch.is_control_batch:
                            batches.append(_Skip(batch.next_offset))
                            continue
                        batches.append(batch)
                    out.append((partition, batches, asked[partition]))
        return out

    async def follow(
        self, start: Position | None = None, batch_size: int = 10_000
    ) -> AsyncIterator[list[Record]]:
        """Like ``read`` without an end: yields new records as they are appended (by
        any node), forever; raises :class:`LogError` once the log is closed."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._check_open()
        begin = self._check_position(start, "start")
        consumer = await self._assigned_consumer(
            "follow", begin, fetch_max_wait_ms=self.follow_max_wait_ms)
        try:
            async for records in self._stream(consumer, batch_size):
                yield records
        finally:
            await self._release(consumer)

    async def _stream(self, consumer: AIOKafkaConsumer,
                      batch_size: int) -> AsyncIterator[list[Record]]:
        """Decoded batches from ``consumer``, forever (``follow`` and ``owned``)."""
        while True:
            try:
                data = await consumer.getmany(timeout_ms=1000, max_records=batch_size)
            except _FETCH_ERRORS as exc:
                raise self._fetch_error(exc) from exc
            if not data:
                self._check_open()
                continue
            records = self._decode(data)
            if records:
                yield records

    # -- ownership (consumer groups) --------------------------------------------

    async def owned(self, group: str, batch_size: int = 10_000) -> AsyncIterator[list[Record]]:
        """Records of the partitions this member owns in group ``<group_id>.<group>``,
        from the group's committed offsets (a new group: the end). One ``owned``
        iteration per group and :class:`KafkaLog` at a time. At-least-once: see
        :meth:`commit`."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._check_open()
        if group in self._groups:
            raise LogError(f"kafka topic {self.topic}: group {group!r} is already consumed "
                           "by this log")
        consumer = self._consumer(
            f"group.{group}",
            group_id=self.group_id(group),
            auto_offset_reset="latest",
            fetch_max_wait_ms=self.follow_max_wait_ms,
            heartbeat_interval_ms=1000,
            session_timeout_ms=10_000,
        )
        listener = _OwnershipListener(self, group, consumer)
        self._groups[group] = (consumer, listener)
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await consumer.start()
                consumer.subscribe(topics=[self.topic], listener=listener)
            except (TimeoutError, kerr.KafkaError) as exc:
                raise LogError(f"kafka topic {self.topic}: cannot join group "
                               f"{self.group_id(group)}: {exc!r}") from exc
            async for records in self._stream(consumer, batch_size):
                yield records
        finally:
            if self._groups.get(group, (None,))[0] is consumer:
                del self._groups[group]
            with contextlib.suppress(Exception):
                await consumer.stop()  # leaves the group: its partitions move at once

    async def commit(self, group: str, position: Position) -> None:
        """Commit ``position`` (next offset per partition) for ``group``, for the
        partitions this member still owns; the others are ignored.

        A commit refused because the group is rebalancing is logged and dropped: the
        partitions' new owner resumes from the previous commit (at-least-once).
        Raises :class:`LogError` on other failures.
        """
        self._check_open()
        pos = self._check_position(position, "commit")
        entry = self._groups.get(group)
        if entry is None:
            raise LogError(f"kafka topic {self.topic}: group {group!r} is not consumed here "
                           "(commit needs a running owned() iteration)")
        consumer, listener = entry
        offsets = {TopicPartition(self.topic, p): OffsetAndMetadata(off, "")
                   for p, off in pos.items() if p in listener.partitions}
        if not offsets:
            return
        try:
            async with asyncio.timeout(self.connect_timeout):
                await consumer.commit(offsets)
        except _REBALANCED as exc:
            log.warning("%s: group %s: commit of %s dropped (rebalanced): %s", self.topic,
                        self.group_id(group), {tp.partition: o.offset
                                               for tp, o in offsets.items()}, exc)
        except TimeoutError as exc:
            raise LogError(f"kafka topic {self.topic}: commit for group "
                           f"{self.group_id(group)} timed out") from exc
        except kerr.KafkaError as exc:
            raise LogError(f"kafka topic {self.topic}: commit for group "
                           f"{self.group_id(group)} failed: {exc!r}") from exc

    def owned_partitions(self, group: str) -> set[int]:
        """Partitions this member currently owns in ``group`` (empty if not consuming)."""
        entry = self._groups.get(group)
        return set(entry[1].partitions) if entry is not None else set()


_BULK_FETCH_BYTES = 16 * 1024 * 1024
_BULK_PARTITION_BYTES = 4 * 1024 * 1024


class _RawFetchAborted(Exception):
    """The bulk reader met something it leaves to the consumer."""


class _Skip:
    """A control batch: no records, but the position moves past it."""

    __slots__ = ("next_offset",)

    def __init__(self, next_offset: int) -> None:
        self.next_offset = next_offset

    def __iter__(self) -> Any:
        return iter(())


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
