"""``siphon replay`` with the Kafka backend (real broker, see conftest.py): copies
embedded -> Kafka -> embedded keep per-AoR order and state, an interrupted Kafka copy
resumes without duplicates, state/verify read a topic, and a Kafka node warm boots
from its snapshot."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from events.embedded import EmbeddedLog
from events.kafka import KafkaLog
from events.schema import (
    Binding,
    BindingAdded,
    BindingRefreshed,
    BindingRemoved,
    Event,
    Trunk,
    TrunkRegistered,
    event_key,
)
from replay import copy as copy_mod
from replay.source import LogUnavailable
from siphon.cli import main
from siphon.config import Kafka
from tests.integration.conftest import USERS, SiphonProcess
from tests.integration.sipclient import UdpClient

pytestmark = pytest.mark.kafka

T0 = 1_700_000_000.0
PARTITIONS = 4


def events(n: int) -> list[Event]:
    out: list[Event] = []
    for i in range(n):
        aor = f"sip:u{i % 61}@example.com"
        if i % 10 == 9:
            out.append(BindingRemoved(ts=T0 + i, node="n", aor=aor, key=f"k{(i - 1) % 2}",
                                      call_id="c", cseq=i))
            continue
        b = Binding(key=f"k{i % 2}", uri=f"sip:x@10.0.0.1:{i}", expires_at=T0 + i + 900,
                    call_id="c", cseq=i)
        cls = BindingAdded if i < 122 else BindingRefreshed
        out.append(cls(ts=T0 + i, node="n", aor=aor, binding=b))
    out.append(TrunkRegistered(ts=T0 + n, node="n", trunk_id="gw", lease_expires_at=T0 + 5000,
                               trunk=Trunk(sip_uri="sip:gw.example.com")))
    return out


def embedded_config(tmp_path: Path, name: str) -> str:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"listen: {{udp: ['127.0.0.1:15060']}}\ndomain: {{local: [example.com]}}\n"
                   f"registrar: {{path: '{tmp_path / name}.db'}}\nauth: {{nonce_secret: t}}\n")
    return str(cfg)


def kafka_config(tmp_path: Path, name: str, bootstrap: str, topic: str) -> str:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"listen: {{udp: ['127.0.0.1:15060']}}\ndomain: {{local: [example.com]}}\n"
                   f"registrar: {{backend: kafka, path: '{tmp_path}/var/x.db', kafka: "
                   f"{{bootstrap_servers: ['{bootstrap}'], topic: {topic}, "
                   f"partitions: {PARTITIONS}}}}}\nauth: {{nonce_secret: t}}\n"
                   "server: {instance_id: replay-test}\n")
    return str(cfg)


async def write_embedded(path: Path, evs: list[Event]) -> None:
    log = EmbeddedLog(path)
    await log.open()
    await log.append(evs)
    await log.close()


async def kafka_events(bootstrap: str, topic: str) -> list[Event]:
    log = KafkaLog(Kafka(bootstrap_servers=[bootstrap], topic=topic, partitions=PARTITIONS))
    await log.open()
    try:
        return [r.event async for b in log.read() for r in b]
    finally:
        await log.close()


def per_key(evs: list[Event]) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = defaultdict(list)
    for ev in evs:
        out[event_key(ev)].append(ev)
    return dict(out)


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, Any]]:
    rc = main(["replay", *args, "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return [json.loads(x) for x in captured.out.splitlines()]


def test_embedded_to_kafka_to_embedded_keeps_order_and_state(
        tmp_path: Path, kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]) -> None:
    topic = f"siphon-replay-{uuid.uuid4().hex[:8]}"
    src_evs = events(3000)
    asyncio.run(write_embedded(tmp_path / "src.db", src_evs))
    src = embedded_config(tmp_path, "src")
    kafka = kafka_config(tmp_path, "kafka", kafka_bootstrap, topic)
    back = embedded_config(tmp_path, "back")

    (res,) = run_json(capsys, "copy", "-c", src, "--to", kafka)
    assert res["copied"] == 3001
    assert per_key(asyncio.run(kafka_events(kafka_bootstrap, topic))) == per_key(src_evs)
    (again,) = run_json(capsys, "copy", "-c", src, "--to", kafka)
    assert again["copied"] == 0 and again["resumed_from"] == {"0": 3001}

    at = ("--at", f"@{T0 + 3500}")
    want = run_json(capsys, "state", "-c", src, *at)
    got = run_json(capsys, "state", "-c", kafka, *at)
    assert got[:-1] == want[:-1] and len(want) > 50
    assert got[-1]["events_applied"] == 3001 and len(got[-1]["position"]) == PARTITIONS

    (report,) = run_json(capsys, "verify", "-c", kafka)
    assert report["ok"] and report["records"] == 3001

    (res,) = run_json(capsys, "copy", "-c", kafka, "--to", back)
    assert res["copied"] == 3001
    assert run_json(capsys, "state", "-c", back, *at)[:-1] == want[:-1]
    with_offsets = run_json(capsys, "state", "-c", back, "--aor", "sip:u7@example.com")
    assert [e["cseq"] for e in with_offsets if e["kind"] == "event"] == [
        e.binding.cseq if hasattr(e, "binding") else e.cseq  # type: ignore[attr-defined]
        for e in src_evs if event_key(e) == "sip:u7@example.com"]


def test_a_kafka_copy_refuses_to_resume_into_a_topic_that_lost_its_records(
        tmp_path: Path, kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(write_embedded(tmp_path / "src.db", events(300)))
    src = embedded_config(tmp_path, "src")
    topic = f"siphon-replay-{uuid.uuid4().hex[:8]}"
    kafka = kafka_config(tmp_path, "kafka", kafka_bootstrap, topic)
    (res,) = run_json(capsys, "copy", "-c", src, "--to", kafka)
    assert res["copied"] == 301
    # The same target config now names an empty topic (a new cluster, a recreated
    # topic) while its checkpoint says 301 records were copied: nothing is skipped.
    kafka_config(tmp_path, "kafka", kafka_bootstrap, f"siphon-replay-{uuid.uuid4().hex[:8]}")
    rc = main(["replay", "copy", "-c", src, "--to", kafka, "--json"])
    err = capsys.readouterr().err
    assert rc == 4
    assert "ends before what" in err and "recreated" in err


async def test_a_kafka_copy_resumes_after_a_batch_written_but_not_checkpointed(
        tmp_path: Path, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from replay.source import EmbeddedSource
    from siphon.config import load_config

    topic = f"siphon-replay-{uuid.uuid4().hex[:8]}"
    src_evs = events(2000)
    await write_embedded(tmp_path / "src.db", src_evs)
    dst_cfg = kafka_config(tmp_path, "kafka", kafka_bootstrap, topic)
    real = copy_mod.KafkaTarget.write
    calls = {"n": 0}

    async def dies_after_appending(self: copy_mod.KafkaTarget, evs: list[Event],
                                   position: dict[int, int]) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # this batch reaches Kafka, in part, but is never checkpointed
            await self.log.append(evs[: len(evs) // 2])
            raise LogUnavailable("target: connection lost")
        await real(self, evs, position)

    async def run() -> copy_mod.CopyResult:
        target = copy_mod.open_target(load_config(dst_cfg), dst_cfg)
        async with EmbeddedSource(tmp_path / "src.db") as source:
            await target.open()
            try:
                return await copy_mod.copy(source, "embedded:src", target, copy_mod.Filter(),
                                           chunk=300)
            finally:
                await target.close()

    monkeypatch.setattr(copy_mod.KafkaTarget, "write", dies_after_appending)
    with pytest.raises(LogUnavailable):
        await run()
    assert len(await kafka_events(kafka_bootstrap, topic)) == 600 + 150
    monkeypatch.setattr(copy_mod.KafkaTarget, "write", real)
    result = await run()
    assert result.resumed_from == {0: 600}
    assert result.skipped_present == 150 and result.copied == 2001 - 600 - 150
    copied = await kafka_events(kafka_bootstrap, topic)
    assert len(copied) == 2001
    assert per_key(copied) == per_key(src_evs)
    state = json.loads(Path(dst_cfg + ".copy.json").read_text())
    assert state["embedded:src"]["position"] == {"0": 2001}


def test_a_kafka_node_warm_boots_from_its_snapshot(tmp_path: Path, kafka_bootstrap: str) -> None:
    topic = f"siphon-replay-{uuid.uuid4().hex[:8]}"
    node = SiphonProcess(tmp_path)
    try:
        node.start({"registrar": {
            "backend": "kafka", "snapshot_interval": 0.3,
            "kafka": {"bootstrap_servers": [kafka_bootstrap], "topic": topic,
                      "partitions": PARTITIONS, "group_id": topic}}}, timeout=40)
        with UdpClient(node.sip_port) as ua:
            for i in range(12):
                user = f"user{i:03d}"
                resp, _ = ua.register(user, USERS[user], expires=3600)
                assert resp.status == 200
        snapshot = tmp_path / f"{topic}.snapshot"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not snapshot.exists():
            time.sleep(0.05)
        assert snapshot.exists(), node.tail()
        before = {(b["aor"], b["uri"], b["expires_at"]) for b in node.registrations()}
        node.restart(timeout=40)
        assert "projection loaded from snapshot" in node.output().split("===== start #2")[1]
        after = {(b["aor"], b["uri"], b["expires_at"]) for b in node.registrations()}
        assert after == before and len(before) == 12
    finally:
        node.kill9()
