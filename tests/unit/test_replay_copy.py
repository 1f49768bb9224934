"""``siphon replay copy`` between embedded logs: order, filters, resume without duplicates."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
from pathlib import Path

import pytest

from events.embedded import EmbeddedLog
from events.schema import Binding, BindingAdded, BindingRemoved, Event, event_key
from replay import copy as copy_mod
from replay.copy import EmbeddedTarget, Filter, copy
from replay.source import BadInput, EmbeddedSource
from siphon.cli import main

T0 = 1_700_000_000.0


def events(n: int, start: int = 0) -> list[Event]:
    out: list[Event] = []
    for i in range(start, start + n):
        aor = f"sip:u{i % 13}@example.com"
        if i % 9 == 8:
            out.append(BindingRemoved(ts=T0 + i, node="n", aor=aor, key=f"k{i % 2}",
                                      call_id="c", cseq=i))
        else:
            out.append(BindingAdded(ts=T0 + i, node="n", aor=aor, binding=Binding(
                key=f"k{i % 2}", uri=f"sip:x@10.0.0.1:{i}", expires_at=T0 + i + 600,
                call_id="c", cseq=i)))
    return out


async def write_log(path: Path, evs: list[Event]) -> None:
    log = EmbeddedLog(path)
    await log.open()
    await log.append(evs)
    await log.close()


async def read_events(path: Path) -> list[tuple[int, Event]]:
    async with EmbeddedSource(path) as src:
        end = await src.end_position()
        return [(r.offset, r.event) async for b in src.read(None, end) for r in b]


def config(tmp_path: Path, name: str, log_path: Path) -> str:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"listen: {{udp: ['127.0.0.1:15060']}}\ndomain: {{local: [example.com]}}\n"
                   f"registrar: {{path: '{log_path}'}}\nauth: {{nonce_secret: test}}\n")
    return str(cfg)


async def run_copy(src: Path, dst: Path, filt: Filter | None = None,
                   chunk: int = 100) -> copy_mod.CopyResult:
    filt = filt if filt is not None else Filter()
    target = EmbeddedTarget(str(dst))
    async with EmbeddedSource(src) as source:
        await target.open()
        try:
            return await copy(source, f"embedded:{src}", target, filt, chunk=chunk)
        finally:
            await target.close()


async def test_full_copy_is_identical_and_rerunning_catches_up(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.db", tmp_path / "dst.db"
    await write_log(src, events(1000))
    res = await run_copy(src, dst)
    assert (res.copied, res.read, res.position, res.done) == (1000, 1000, {0: 1000}, True)
    assert await read_events(dst) == await read_events(src)
    again = await run_copy(src, dst)
    assert (again.copied, again.resumed_from) == (0, {0: 1000})
    log = EmbeddedLog(src)
    await log.open()
    await log.append(events(250, start=1000))
    await log.close()
    more = await run_copy(src, dst)
    assert (more.copied, more.total_copied) == (250, 1250)
    assert await read_events(dst) == await read_events(src)


async def test_an_interrupted_copy_resumes_without_writing_anything_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = tmp_path / "src.db", tmp_path / "dst.db"
    await write_log(src, events(1000))
    real = EmbeddedTarget._write_sync
    calls = {"n": 0}

    def failing(self: EmbeddedTarget, rows: list, position: dict) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            # the transaction is under way when the process dies: nothing of it stays
            self._conn.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]
            self._conn.executemany(  # type: ignore[union-attr]
                'INSERT INTO records ("offset", ts, key, payload, crc) VALUES (?, ?, ?, ?, ?)',
                [(10_000 + i, *row) for i, row in enumerate(rows)])
            self._conn.execute("ROLLBACK")  # type: ignore[union-attr]
            raise OSError("disk gone")
        real(self, rows, position)

    monkeypatch.setattr(EmbeddedTarget, "_write_sync", failing)
    with pytest.raises(OSError, match="disk gone"):
        await run_copy(src, dst)
    assert len(await read_events(dst)) == 300
    monkeypatch.setattr(EmbeddedTarget, "_write_sync", real)
    res = await run_copy(src, dst)
    assert res.resumed_from == {0: 300} and res.copied == 700 and res.total_copied == 1000
    assert await read_events(dst) == await read_events(src)


async def test_filters_select_by_time_and_aor_keeping_order(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.db", tmp_path / "dst.db"
    await write_log(src, events(500))
    aors = frozenset({"sip:u3@example.com", "sip:u5@example.com"})
    res = await run_copy(src, dst, Filter(since=T0 + 100, until=T0 + 399, aors=aors))
    expected = [e for _, e in await read_events(src)
                if T0 + 100 <= e.ts <= T0 + 399 and event_key(e) in aors]
    assert [e for _, e in await read_events(dst)] == expected
    assert res.copied == len(expected) and res.read == 500
    with pytest.raises(BadInput, match="made with other filters"):
        await run_copy(src, dst, Filter(aors=aors))


async def test_a_target_holding_other_records_is_refused(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.db", tmp_path / "dst.db"
    await write_log(src, events(10))
    await write_log(dst, events(3, start=500))
    with pytest.raises(BadInput, match="already holds 3 records and no copy from"):
        await run_copy(src, dst)
    assert len(await read_events(dst)) == 3


def test_cli_copy_then_state_is_the_same(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "src.db", tmp_path / "dst.db"
    asyncio.run(write_log(src, events(400)))
    a, b = config(tmp_path, "a", src), config(tmp_path, "b", dst)
    assert main(["replay", "copy", "-c", a, "--to", b, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["copied"] == 400 and result["position"] == {"0": 400}
    at = ["--at", f"@{T0 + 450}", "--json"]
    assert main(["replay", "state", "-c", a, *at]) == 0
    left = capsys.readouterr().out.splitlines()
    assert main(["replay", "state", "-c", b, *at]) == 0
    right = capsys.readouterr().out.splitlines()
    assert left[:-1] == right[:-1] and len(left) > 10
    with sqlite3.connect(dst) as db:
        assert db.execute("SELECT partition, next_offset FROM replay_copy").fetchall() == [
            (0, 400)]

    assert main(["replay", "copy", "-c", a, "--to", a]) == 4
    assert "the same log" in capsys.readouterr().err
    assert main(["replay", "copy", "-c", a, "--to", b, "--from", "x"]) == 2
    assert "--from/--until" in capsys.readouterr().err


def test_cli_copy_to_an_unreachable_kafka_cluster(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src.db"
    asyncio.run(write_log(src, events(10)))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dst = tmp_path / "kafka.yaml"
    dst.write_text("listen: {udp: ['127.0.0.1:15060']}\ndomain: {local: [example.com]}\n"
                   "registrar: {backend: kafka, kafka: {bootstrap_servers: "
                   f"['127.0.0.1:{port}'], topic: dr}}}}\nauth: {{nonce_secret: test}}\n")
    rc = main(["replay", "copy", "-c", config(tmp_path, "a", src), "--to", str(dst),
               "--timeout", "2"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert f"kafka 127.0.0.1:{port}" in err and "Traceback" not in err
