"""KafkaLog against a real Kafka broker (see conftest.py): round trip, ordering,
partitioning, follow latency, consumer-group ownership, bad records, unreachable
clusters, and throughput figures (printed, not asserted)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner

from events.kafka import KafkaLog
from events.log import LogCorruption, LogError, Record
from events.schema import Binding, BindingAdded, BindingRemoved, Event
from siphon.config import Kafka

pytestmark = pytest.mark.kafka

PARTITIONS = 6


def topic_name(tag: str) -> str:
    return f"siphon-test-{tag}-{uuid.uuid4().hex[:8]}"


def make_config(bootstrap: str, topic: str, **kwargs: Any) -> Kafka:
    kwargs.setdefault("partitions", PARTITIONS)
    return Kafka(bootstrap_servers=[bootstrap], topic=topic, **kwargs)


@contextlib.asynccontextmanager
async def opened(bootstrap: str, topic: str, node: str = "n1",
                 **kwargs: Any) -> AsyncIterator[KafkaLog]:
    log = KafkaLog(make_config(bootstrap, topic, **kwargs), node)
    await log.open()
    try:
        yield log
    finally:
        await log.close()


def make_event(aor: str, seq: int, node: str = "n1") -> Event:
    """An event of ``aor`` carrying ``seq`` (as its CSeq) to check order and identity."""
    if seq % 7 == 6:
        return BindingRemoved(ts=1_000.0 + seq, node=node, aor=aor, key=f"k{seq}", cseq=seq)
    binding = Binding(key=f"k{seq}", uri=f"sip:u@10.0.0.1:{5060 + seq % 1000}",
                      expires_at=5_000.0 + seq, cseq=seq, call_id=f"c{seq}")
    return BindingAdded(ts=1_000.0 + seq, node=node, aor=aor, binding=binding)


def seq_of(event: Event) -> int:
    return event.binding.cseq if isinstance(event, BindingAdded) else event.cseq  # type: ignore[union-attr]


async def read_all(log: KafkaLog, **kwargs: Any) -> list[Record]:
    out: list[Record] = []
    async for batch in log.read(**kwargs):
        out.extend(batch)
    return out


async def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n[kafka] {text}")


# -- basics -------------------------------------------------------------------------------


async def test_append_read_round_trip(kafka_bootstrap: str) -> None:
    async with opened(kafka_bootstrap, topic_name("roundtrip")) as log:
        assert log.partitions == PARTITIONS
        assert await log.end_position() == dict.fromkeys(range(PARTITIONS), 0)
        events = [make_event(f"sip:user{i % 9}@example.com", i) for i in range(40)]
        placed = await log.append(events[:25])
        placed += await log.append(events[25:])
        assert await log.append([]) == []
        assert len(placed) == 40
        # offsets are 0, 1, 2... per partition, in append order
        per_partition: dict[int, list[int]] = {}
        for (p, off), event in zip(placed, events, strict=True):
            assert p == log.partition_for(event.aor)
            per_partition.setdefault(p, []).append(off)
        for offs in per_partition.values():
            assert offs == list(range(len(offs)))
        end = await log.end_position()
        assert end == {p: len(per_partition.get(p, [])) for p in range(PARTITIONS)}

        records = await read_all(log)
        assert sorted((r.partition, r.offset) for r in records) == sorted(placed)
        by_place = {(r.partition, r.offset): r.event for r in records}
        assert [by_place[pl] for pl in placed] == events

        # a bounded window: from the middle of each partition to before its end
        mid = {p: n // 2 for p, n in end.items()}
        upto = {p: max(mid[p], n - 1) for p, n in end.items()}
        window = await read_all(log, start=mid, end=upto, batch_size=3)
        expected = sorted(pl for pl in placed if mid[pl[0]] <= pl[1] < upto[pl[0]])
        assert sorted((r.partition, r.offset) for r in window) == expected
        assert await read_all(log, start=end) == []
        with pytest.raises(ValueError, match="partitions"):
            await read_all(log, start={PARTITIONS: 0})
        with pytest.raises(TypeError):
            await log.append(["not an event"])  # type: ignore[list-item]
    with pytest.raises(LogError):
        await log.append(events[:1])


async def test_per_aor_order_kept(kafka_bootstrap: str) -> None:
    aors = [f"sip:order{i}@example.com" for i in range(30)]

    async with opened(kafka_bootstrap, topic_name("order")) as log:

        async def writer(aor: str) -> None:
            seq = 0
            for n in (1, 3, 1, 5, 1, 2, 1, 1, 4, 1):  # single and multi-event appends
                await log.append([make_event(aor, seq + k) for k in range(n)])
                seq += n

        await asyncio.gather(*(writer(aor) for aor in aors))
        records = await read_all(log, batch_size=7)
    assert len(records) == 20 * len(aors)
    seen: dict[str, list[int]] = {}
    for r in records:
        assert r.partition == log.partition_for(r.event.aor)
        seen.setdefault(r.event.aor, []).append(seq_of(r.event))
    assert seen == {aor: list(range(20)) for aor in aors}


async def test_partition_for_matches_producer(kafka_bootstrap: str) -> None:
    topic = topic_name("partition")
    keys = [f"sip:p{i}@example.org" for i in range(200)]
    async with opened(kafka_bootstrap, topic) as log:
        placed = await log.append([make_event(k, i) for i, k in enumerate(keys)])
        assert [p for p, _ in placed] == [log.partition_for(k) for k in keys]
        # what aiokafka's own partitioner (= Java client's) picks for the same key bytes
        parts = list(range(log.partitions))
        assert [DefaultPartitioner()(k.encode(), parts, parts) for k in keys] == [
            p for p, _ in placed]
        assert len({p for p, _ in placed}) == PARTITIONS
        # a plain producer, partitioning by itself, lands each key where partition_for says
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            for k in keys[:50]:
                md = await producer.send_and_wait(topic, b"{}", key=k.encode())
                assert md.partition == log.partition_for(k)
        finally:
            await producer.stop()


async def test_existing_topic_partition_count_wins(kafka_bootstrap: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    topic = topic_name("existing")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 3, 1)])
    finally:
        await admin.close()
    caplog.set_level(logging.WARNING, logger="siphon.events.kafka")
    async with opened(kafka_bootstrap, topic, partitions=6) as log:
        assert log.partitions == 3
        placed = await log.append([make_event(f"sip:e{i}@example.com", i) for i in range(30)])
        assert {p for p, _ in placed} == {0, 1, 2}
        assert await log.end_position() == {p: sum(1 for q, _ in placed if q == p)
                                             for p in range(3)}
    assert any("has 3 partitions" in r.getMessage() for r in caplog.records)


# -- follow ---------------------------------------------------------------------------------


async def test_follow_sees_appends_promptly(kafka_bootstrap: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    topic = topic_name("follow")
    n = 200
    async with opened(kafka_bootstrap, topic, "writer") as writer, \
            opened(kafka_bootstrap, topic, "reader") as reader:
        await writer.append([make_event("sip:before@example.com", 10_000)])
        received: dict[int, float] = {}
        positions: list[tuple[int, int]] = []

        async def consume() -> None:
            async for batch in reader.follow():
                now = time.perf_counter()
                for r in batch:
                    received.setdefault(seq_of(r.event), now)
                    positions.append((r.partition, r.offset))

        task = asyncio.create_task(consume())
        try:
            await wait_for(lambda: 10_000 in received, 15, "existing record via follow")
            sent: dict[int, float] = {}
            acked: dict[int, float] = {}
            for i in range(n):
                sent[i] = time.perf_counter()
                await writer.append([make_event(f"sip:f{i % 20}@example.com", i)])
                acked[i] = time.perf_counter()
                await asyncio.sleep(0.005)
            await wait_for(lambda: all(i in received for i in range(n)), 15, "all follows")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert len(positions) == len(set(positions)) == n + 1
    total = [(received[i] - sent[i]) * 1000 for i in range(n)]
    after_ack = [(received[i] - acked[i]) * 1000 for i in range(n)]
    append_ms = [(acked[i] - sent[i]) * 1000 for i in range(n)]
    report(capsys, f"follow latency over {n} appends: append call -> delivered "
           f"p50 {pct(total, .5):.1f} ms, p99 {pct(total, .99):.1f} ms, max {max(total):.1f} ms; "
           f"ack -> delivered p50 {pct(after_ack, .5):.1f} ms, p99 {pct(after_ack, .99):.1f} ms; "
           f"append p50 {pct(append_ms, .5):.1f} ms, p99 {pct(append_ms, .99):.1f} ms")
    assert statistics.median(total) < 250  # generous: the target is p99 <= 50 ms


async def test_follow_raises_once_closed(kafka_bootstrap: str) -> None:
    log = KafkaLog(make_config(kafka_bootstrap, topic_name("closed")), "n1")
    await log.open()
    await log.append([make_event("sip:x@example.com", 1)])
    got: list[Record] = []

    async def consume() -> None:
        async for batch in log.follow():
            got.extend(batch)

    task = asyncio.create_task(consume())
    await wait_for(lambda: len(got) == 1, 15, "follow")
    await log.close()
    with pytest.raises(LogError):
        await asyncio.wait_for(task, 10)


# -- consumer groups -----------------------------------------------------------------------


class Member:
    """One node consuming ``owned(group)``, committing after every batch."""

    def __init__(self, log: KafkaLog, group: str) -> None:
        self.log = log
        self.group = group
        self.got: list[tuple[int, int]] = []
        self.committed: dict[int, int] = {}
        self.task = asyncio.create_task(self.run())

    async def run(self) -> None:
        async for batch in self.log.owned(self.group, batch_size=40):
            position: dict[int, int] = {}
            for r in batch:
                self.got.append((r.partition, r.offset))
                position[r.partition] = r.offset + 1
            owned = self.log.owned_partitions(self.group)
            await self.log.commit(self.group, position)
            self.committed.update({p: o for p, o in position.items() if p in owned})

    @property
    def partitions(self) -> set[int]:
        return self.log.owned_partitions(self.group)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def test_owned_split_then_failover(kafka_bootstrap: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    topic = topic_name("owned")
    group = "sweeper"
    every = set(range(PARTITIONS))
    async with opened(kafka_bootstrap, topic, "a") as log_a, \
            opened(kafka_bootstrap, topic, "b") as log_b:
        t0 = time.monotonic()
        a = Member(log_a, group)
        await wait_for(lambda: a.partitions == every, 30, "a owning every partition")
        t_first = time.monotonic() - t0
        b = Member(log_b, group)
        await wait_for(lambda: a.partitions and b.partitions
                       and a.partitions | b.partitions == every
                       and not a.partitions & b.partitions, 30, "a and b splitting")
        t_split = time.monotonic() - t0 - t_first
        b_owned, a_owned = set(b.partitions), set(a.partitions)

        first = await log_a.append([make_event(f"sip:g{i % 40}@example.com", i)
                                    for i in range(300)])
        await wait_for(lambda: set(first) <= set(a.got) | set(b.got), 20, "phase 1 delivery")
        assert {p for p, _ in b.got} <= b_owned and not {p for p, _ in a.got} & b_owned
        expected_b = {p: max(o for q, o in first if q == p) + 1
                      for p in b_owned if any(q == p for q, _ in first)}
        await wait_for(lambda: all(b.committed.get(p) == o for p, o in expected_b.items()),
                       20, "b's commits")
        b_committed = dict(b.committed)

        t1 = time.monotonic()
        await b.stop()  # leaves the group: a takes its partitions over
        await wait_for(lambda: a.partitions == every, 30, "a taking every partition over")
        t_failover = time.monotonic() - t1
        a_before = len(a.got)

        second = await log_b.append([make_event(f"sip:g{i % 40}@example.com", 1000 + i)
                                     for i in range(300)])
        await wait_for(lambda: set(second) <= set(a.got), 20, "phase 2 delivery to a")
        await a.stop()

    delivered = set(a.got) | set(b.got)
    assert set(first) | set(second) <= delivered, "records lost"
    after = a.got[a_before:]
    for p in b_owned:
        offs = [o for q, o in after if q == p]
        # resumes exactly where b committed: no committed record delivered again
        assert not offs or min(offs) == b_committed.get(p, 0), (p, offs[:3], b_committed)
    dups = len(a.got) + len(b.got) - len(delivered)
    report(capsys, f"owned(): first member owns all in {t_first:.2f} s, split "
           f"{sorted(a_owned)}/{sorted(b_owned)} in {t_split:.2f} s, "
           f"failover in {t_failover:.2f} s; {len(delivered)} records, {dups} redelivered")


async def test_commit_needs_owned_iteration(kafka_bootstrap: str) -> None:
    async with opened(kafka_bootstrap, topic_name("commit")) as log:
        assert log.owned_partitions("nobody") == set()
        with pytest.raises(LogError, match="not consumed here"):
            await log.commit("nobody", {0: 1})


# -- bad records -----------------------------------------------------------------------------


async def _with_garbage(bootstrap: str, topic: str) -> tuple[str, list[Event]]:
    """Append good, foreign garbage, good to partition 0 of ``topic``."""
    async with opened(bootstrap, topic) as log:
        aor = next(a for a in (f"sip:bad{i}@example.com" for i in range(1000))
                   if log.partition_for(a) == 0)
        good = [make_event(aor, 1), make_event(aor, 2)]
        assert await log.append(good[:1]) == [(0, 0)]
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            md = await producer.send_and_wait(topic, b"\x00 not an event {", key=aor.encode(),
                                              partition=0)
            assert (md.partition, md.offset) == (0, 1)
        finally:
            await producer.stop()
        assert await log.append(good[1:]) == [(0, 2)]
    return aor, good


async def test_bad_record_skipped(kafka_bootstrap: str,
                                  caplog: pytest.LogCaptureFixture) -> None:
    topic = topic_name("skip")
    _, good = await _with_garbage(kafka_bootstrap, topic)
    caplog.set_level(logging.WARNING, logger="siphon.events.kafka")
    async with opened(kafka_bootstrap, topic, on_bad_record="skip") as log:
        records = await read_all(log)
        assert [(r.partition, r.offset, r.event) for r in records] == [
            (0, 0, good[0]), (0, 2, good[1])]
        followed: list[Record] = []
        async for batch in log.follow():
            followed.extend(batch)
            if len(followed) >= 2:
                break
        assert [r.offset for r in followed] == [0, 2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(topic in w and "partition 0" in w and "offset 1" in w for w in warnings), warnings


async def test_bad_record_stops(kafka_bootstrap: str) -> None:
    topic = topic_name("stop")
    await _with_garbage(kafka_bootstrap, topic)
    async with opened(kafka_bootstrap, topic, on_bad_record="stop") as log:
        with pytest.raises(LogCorruption) as info:
            await read_all(log)
        assert (info.value.partition, info.value.offset) == (0, 1)
        assert topic in str(info.value)
        # reading past it works
        after = await read_all(log, start={0: 2})
        assert [(r.partition, r.offset) for r in after] == [(0, 2)]


# -- unreachable clusters ----------------------------------------------------------------------


async def _open_fails(config: Kafka, connect_timeout: float = 10.0) -> tuple[LogError, float]:
    log = KafkaLog(config, "n1", connect_timeout=connect_timeout)
    t0 = time.monotonic()
    with pytest.raises(LogError) as info:
        await asyncio.wait_for(log.open(), 30)
    took = time.monotonic() - t0
    await log.close()
    return info.value, took


async def test_unreachable_bootstrap_fails_open() -> None:
    err, took = await _open_fails(Kafka(bootstrap_servers=["127.0.0.1:1"], topic="t"))
    assert "127.0.0.1:1" in str(err) and "Connect call failed" in str(err)
    assert took < 15


async def test_silent_bootstrap_fails_open_in_time() -> None:
    """A peer that accepts TCP but never answers must not hang ``open``."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        addr = f"127.0.0.1:{srv.getsockname()[1]}"
        err, took = await _open_fails(Kafka(bootstrap_servers=[addr], topic="t"),
                                      connect_timeout=3)
    assert addr in str(err)
    assert 2.5 < took < 10


async def test_empty_bootstrap_rejected() -> None:
    err, _ = await _open_fails(Kafka(topic="t"))
    assert "bootstrap_servers" in str(err)


# -- security settings ---------------------------------------------------------------------

SASL = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
        "sasl_username": "siphon", "sasl_password": "siphon-secret"}


async def test_sasl_plain(kafka_sasl_bootstrap: str) -> None:
    async with opened(kafka_sasl_bootstrap, topic_name("sasl"), **SASL) as log:
        placed = await log.append([make_event("sip:sasl@example.com", 1)])
        assert [(r.partition, r.offset) for r in await read_all(log)] == placed
    bad = make_config(kafka_sasl_bootstrap, topic_name("sasl"),
                      **{**SASL, "sasl_password": "wrong"})
    err, took = await _open_fails(bad, connect_timeout=5)
    assert kafka_sasl_bootstrap in str(err)
    assert "Authentication failed" in str(err)
    assert took < 10


async def test_ssl(kafka_ssl: tuple[str, str]) -> None:
    bootstrap, cafile = kafka_ssl
    async with opened(bootstrap, topic_name("ssl"), security_protocol="SSL",
                      ssl_cafile=cafile) as log:
        placed = await log.append([make_event("sip:tls@example.com", 1)])
        assert [(r.partition, r.offset) for r in await read_all(log)] == placed
    # the self-signed broker certificate is not trusted without its CA file
    untrusted = make_config(bootstrap, topic_name("ssl"), security_protocol="SSL")
    err, took = await _open_fails(untrusted, connect_timeout=5)
    assert bootstrap in str(err)
    assert "CERTIFICATE_VERIFY_FAILED" in str(err)
    assert took < 10


def test_unreadable_tls_files_rejected(tmp_path: Path) -> None:
    config = Kafka(bootstrap_servers=["127.0.0.1:9093"], security_protocol="SSL",
                   ssl_cafile=str(tmp_path / "missing.pem"))
    with pytest.raises(LogError, match="TLS"):
        KafkaLog(config, "n1")


# -- performance figures (printed, not asserted) ---------------------------------------------


async def _timed(coro: Awaitable[Any]) -> float:
    t0 = time.perf_counter()
    await coro
    return time.perf_counter() - t0


async def test_perf_concurrent_single_appends(kafka_bootstrap: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    workers, each = 500, 20
    latencies: list[float] = []
    async with opened(kafka_bootstrap, topic_name("perf-append"), append_timeout=30) as log:
        await log.append([make_event("sip:warm@example.com", 0)])

        async def worker(w: int) -> None:
            for i in range(each):
                t = time.perf_counter()
                await log.append([make_event(f"sip:w{w}@example.com", i)])
                latencies.append(time.perf_counter() - t)

        took = await _timed(asyncio.gather(*(worker(w) for w in range(workers))))
        total = sum((await log.end_position()).values())
    assert total == workers * each + 1
    ms = [x * 1000 for x in latencies]
    report(capsys, f"append: {workers} coroutines x {each} single-event appends = "
           f"{workers * each} in {took:.2f} s = {workers * each / took:,.0f} events/s; "
           f"latency p50 {pct(ms, .5):.1f} ms, p99 {pct(ms, .99):.1f} ms")


async def test_perf_read_200k(kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]) -> None:
    topic = topic_name("perf-read")
    total, chunk = 200_000, 2_000
    async with opened(kafka_bootstrap, topic, "writer", append_timeout=60) as log:
        sem = asyncio.Semaphore(4)

        async def write(base: int) -> None:
            async with sem:
                await log.append([make_event(f"sip:r{(base + i) % 5000}@example.com", base + i)
                                  for i in range(chunk)])

        wrote = await _timed(asyncio.gather(*(write(b) for b in range(0, total, chunk))))
    async with opened(kafka_bootstrap, topic, "reader") as reader:
        count = 0
        t0 = time.perf_counter()
        async for batch in reader.read():
            count += len(batch)
        took = time.perf_counter() - t0
    assert count == total
    report(capsys, f"bulk append of {total} events in {chunk}-event appends: "
           f"{total / wrote:,.0f} events/s; read from the beginning: {count} in {took:.2f} s "
           f"= {count / took:,.0f} events/s")


# -- bulk reads for rebuilds -----------------------------------------------------------------


async def test_read_payloads_matches_read(kafka_bootstrap: str) -> None:
    """The bulk reader (own Fetch requests, no consumer) yields exactly the records
    ``read`` yields, per partition in offset order, from a start and up to an end."""
    from events.codec import decode

    topic = topic_name("payloads")
    async with opened(kafka_bootstrap, topic) as log:
        events = [make_event(f"sip:p{i % 50}@example.com", i) for i in range(3000)]
        for i in range(0, len(events), 500):
            await log.append(events[i:i + 500])
        end = await log.end_position()
        for start, stop in ((None, None), ({0: 5, 3: 17}, None), (None, {p: o // 2 for p, o in
                                                                        end.items()})):
            expected = {(r.partition, r.offset, r.event)
                        for r in await read_all(log, start=start, end=stop)}
            got: list[tuple[int, int, Any]] = []
            last: dict[int, int] = {}
            async for partition, offsets, payloads in log.read_payloads(start, stop):
                assert list(offsets) == sorted(offsets)
                assert offsets[0] > last.get(partition, -1)
                last[partition] = offsets[-1]
                got.extend((partition, o, decode(p)) for o, p in zip(offsets, payloads,
                                                                      strict=True))
            assert len(got) == len(expected) and set(got) == expected
        # leaving early (a fetch in flight) closes cleanly
        async with contextlib.aclosing(log.read_payloads(batch_size=100)) as bulk:
            async for _ in bulk:
                break
        assert len(await read_all(log)) == 3000


async def test_rebuild_fast_equals_classic_and_skips_bad_records(
        kafka_bootstrap: str, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from projections import registrar
    from projections.runner import ProjectionRunner

    monkeypatch.setattr(registrar, "FAST_REBUILD_MIN", 0)  # fast path for a small topic

    topic = topic_name("fastrebuild")
    await _with_garbage(kafka_bootstrap, topic)
    async with opened(kafka_bootstrap, topic, on_bad_record="skip") as log:
        await log.append([make_event(f"sip:f{i % 30}@example.com", i) for i in range(2000)])
        caplog.set_level(logging.WARNING, logger="siphon.events.kafka")
        fast = ProjectionRunner(log)
        assert await fast.rebuild() == 2003
        assert any("offset 1" in r.getMessage() for r in caplog.records)
        classic = ProjectionRunner(log)
        classic.log = type("Classic", (), {"read": log.read})()  # type: ignore[assignment]
        await classic.rebuild()
        assert {a: list(b.values()) for a, b in fast.state.aors.items()} == {
            a: list(b.values()) for a, b in classic.state.aors.items()}
        assert fast.state.position == classic.state.position
    async with opened(kafka_bootstrap, topic, on_bad_record="stop") as log:
        with pytest.raises(LogCorruption) as info:
            await ProjectionRunner(log).rebuild()
        assert (info.value.partition, info.value.offset) == (0, 1)
