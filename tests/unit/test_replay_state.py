"""``siphon replay state``: point-in-time rebuilds and AoR histories over real embedded logs."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from events.embedded import EmbeddedLog
from events.log import LogCorruption
from events.schema import (
    Binding,
    BindingAdded,
    BindingExpired,
    BindingRefreshed,
    BindingRemoved,
    Event,
    Trunk,
    TrunkRegistered,
)
from projections.runner import ProjectionRunner
from replay.source import BadInput, EmbeddedSource
from replay.state import Target, aor_history, parse_target, rebuild
from siphon.cli import main

T0 = 1_700_000_000.0
ALICE = "sip:alice@example.com"
BOB = "sip:bob@example.com"


def added(t: float, aor: str, key: str, *, expires: float = 3600, call_id: str = "c1",
          cseq: int = 1, refresh: bool = False) -> Event:
    b = Binding(key=key, uri=f"sip:{key}@10.0.0.1:5060", expires_at=t + expires,
                call_id=call_id, cseq=cseq, registered_at=t)
    cls = BindingRefreshed if refresh else BindingAdded
    return cls(ts=t, node="n1", aor=aor, binding=b)


SCENARIO: list[Event] = [
    added(T0, ALICE, "a1"),                                            # 0
    added(T0 + 10, BOB, "b1", expires=50),                            # 1
    added(T0 + 20, ALICE, "a1", cseq=2, refresh=True),                # 2
    added(T0 + 30, ALICE, "a2", call_id="c2", cseq=7),                # 3
    TrunkRegistered(ts=T0 + 40, node="n1", trunk_id="gw1",            # 4
                    trunk=Trunk(sip_uri="sip:gw1.example.com"), lease_expires_at=T0 + 130),
    BindingRemoved(ts=T0 + 50, node="n1", aor=ALICE, key="a2", call_id="c2", cseq=8),  # 5
    BindingExpired(ts=T0 + 200, node="n1", aor=BOB, key="b1", expires_at=T0 + 60),     # 6
]


async def write_log(path: Path, events: list[Event]) -> None:
    log = EmbeddedLog(path)
    await log.open()
    await log.append(events)
    await log.close()


@pytest.fixture
async def scenario(tmp_path: Path) -> Path:
    path = tmp_path / "log.db"
    await write_log(path, SCENARIO)
    return path


def config(tmp_path: Path, log_path: Path, name: str = "siphon.yaml") -> Path:
    cfg = tmp_path / name
    cfg.write_text(f"listen: {{udp: ['127.0.0.1:15060']}}\ndomain: {{local: [example.com]}}\n"
                   f"registrar: {{path: '{log_path}'}}\nauth: {{nonce_secret: test}}\n")
    return cfg


async def state_at(path: Path, text: str | None) -> tuple[dict[str, list[str]], list[str], float]:
    async with EmbeddedSource(path) as src:
        out = await rebuild(src, parse_target(text))
    live: dict[str, list[str]] = {}
    for aor, b in out.live_bindings():
        live.setdefault(aor, []).append(f"{b.key}/{b.cseq}")
    return live, [tid for tid, _ in out.live_trunks()], out.at


def test_parse_target() -> None:
    assert parse_target(None).is_now and parse_target("now").is_now
    assert parse_target("42").offsets == {0: 42}
    assert parse_target("0:5, 2:7").offsets == {0: 5, 2: 7}
    assert parse_target("@1700000000.5").time == 1_700_000_000.5
    assert parse_target("2023-11-14T22:13:20Z").time == T0
    assert parse_target("2023-11-14T23:13:20+01:00").time == T0
    for bad in ("yesterday", "0:1,0:2", "1:"):
        with pytest.raises(ValueError):
            parse_target(bad)


async def test_replay_to_now_equals_the_runner_rebuild(scenario: Path) -> None:
    log = EmbeddedLog(scenario)
    await log.open()
    runner = ProjectionRunner(log)
    await runner.rebuild()
    await log.close()
    async with EmbeddedSource(scenario) as src:
        out = await rebuild(src, Target())
    assert out.registrar.aors == runner.state.aors
    assert out.trunks.trunks == runner.trunks.trunks
    assert out.position == {0: len(SCENARIO)} == runner.position


async def test_state_at_a_time_applies_earlier_events_and_judges_liveness_then(
        scenario: Path) -> None:
    live, trunks, at = await state_at(scenario, f"@{T0 + 35}")
    assert at == T0 + 35
    assert live == {ALICE: ["a2/7", "a1/2"], BOB: ["b1/1"]}
    assert trunks == []
    # bob's binding lapsed at T0+60: not live at T0+100 although its expiry event is later
    live, trunks, _ = await state_at(scenario, f"@{T0 + 100}")
    assert live == {ALICE: ["a1/2"]}
    assert trunks == ["gw1"]
    live, trunks, _ = await state_at(scenario, f"@{T0 + 150}")
    assert trunks == []  # lease ran out at T0+130


async def test_state_at_an_offset_is_inclusive_and_live_at_that_records_time(
        scenario: Path) -> None:
    live, _, at = await state_at(scenario, "2")
    assert live == {ALICE: ["a1/2"], BOB: ["b1/1"]}
    assert at == T0 + 20
    live, _, _ = await state_at(scenario, "0:0")
    assert live == {ALICE: ["a1/1"]}


async def test_targets_outside_the_log_are_refused_with_the_reason(scenario: Path) -> None:
    async with EmbeddedSource(scenario) as src:
        with pytest.raises(BadInput, match="before the first event"):
            await rebuild(src, parse_target(f"@{T0 - 1}"))
        with pytest.raises(BadInput, match=r"offset 7 is past the end of the log \(its last "
                                           r"offset is 6\)"):
            await rebuild(src, parse_target("7"))
        with pytest.raises(BadInput, match="partition 3 does not exist"):
            await rebuild(src, parse_target("3:1"))
        with pytest.raises(BadInput, match=r"names AoR 'sip:carol@example\.com'"):
            await aor_history(src, "sip:carol@example.com", Target())


async def test_aor_history_lists_each_event_with_the_bindings_it_left(scenario: Path) -> None:
    async with EmbeddedSource(scenario) as src:
        steps, out = await aor_history(src, ALICE, parse_target(f"@{T0 + 100}"))
        assert [(s.record.offset, s.change) for s in steps] == [
            (0, "registered"), (2, "refreshed"), (3, "registered"), (5, "deregistered")]
        assert [[b.key for b in s.bindings] for s in steps] == [
            ["a1"], ["a1"], ["a2", "a1"], ["a1"]]
        assert [b.cseq for b in out.live_bindings_of(ALICE)] == [2]
        steps, _ = await aor_history(src, ALICE, parse_target(f"@{T0 + 25}"))
        assert [s.record.offset for s in steps] == [0, 2]


@pytest.mark.parametrize("pipeline", [False, True], ids=["in-process", "child-reader"])
async def test_both_read_paths_give_the_same_state(tmp_path: Path, pipeline: bool) -> None:
    path = tmp_path / "big.db"
    events = [added(T0 + i, f"sip:u{i % 97}@example.com", f"k{i % 3}", cseq=i,
                    refresh=i >= 300) for i in range(3000)]
    await write_log(path, events)
    async with EmbeddedSource(path, pipeline=pipeline, batch_size=256) as src:
        out = await rebuild(src, Target())
    assert out.read == out.applied == 3000
    async with EmbeddedSource(path, pipeline=False) as src:
        ref = await rebuild(src, Target())
    assert out.registrar.aors == ref.registrar.aors
    assert len(out.registrar.aors) == 97


@pytest.mark.parametrize("pipeline", [False, True], ids=["in-process", "child-reader"])
async def test_a_damaged_record_stops_the_replay_naming_its_offset(
        tmp_path: Path, pipeline: bool) -> None:
    path = tmp_path / "log.db"
    await write_log(path, [added(T0 + i, ALICE, f"k{i}") for i in range(50)])
    with sqlite3.connect(path) as db:
        db.execute("UPDATE records SET payload = ? WHERE \"offset\" = 17", (b'{"type":1}',))
    async with EmbeddedSource(path, pipeline=pipeline, batch_size=10) as src:
        with pytest.raises(LogCorruption) as info:
            await rebuild(src, Target())
        assert info.value.offset == 17
        problems: list[tuple[int, int, str]] = []
        out = await rebuild(src, Target(), on_problem=lambda p, o, r: problems.append((p, o, r)))
    assert [(p, o) for p, o, _ in problems] == [(0, 17)]
    assert "crc mismatch" in problems[0][2]
    assert out.read == 49


def test_cli_state_json_and_exit_codes(scenario: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(config(tmp_path, scenario))
    assert main(["replay", "state", "-c", cfg, "--at", f"@{T0 + 35}", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    bindings = [x for x in lines if x["kind"] == "binding"]
    assert {(b["aor"], b["cseq"]) for b in bindings} == {(ALICE, 2), (ALICE, 7), (BOB, 1)}
    summary = lines[-1]
    assert summary["kind"] == "summary" and summary["events_applied"] == 4
    assert summary["bindings_live"] == 3

    assert main(["replay", "state", "-c", cfg, "--aor", "alice@example.com", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["change"] for x in lines if x["kind"] == "event"] == [
        "registered", "refreshed", "registered", "deregistered"]
    assert lines[-1]["kind"] == "state"

    cases = [(["--at", f"@{T0 - 3600}"], 4, "before the first event of the log"),
             (["--at", "99"], 4, "offset 99 is past the end of the log"),
             (["--aor", "sip:nobody@example.com"], 4, "no event in embedded log"),
             (["--at", "next tuesday"], 2, "neither an ISO time")]
    for extra, code, message in cases:
        assert main(["replay", "state", "-c", cfg, *extra]) == code, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err

    missing = config(tmp_path, tmp_path / "nope.db", "missing.yaml")
    assert main(["replay", "state", "-c", str(missing)]) == 3
    assert "no event log there" in capsys.readouterr().err
    assert not (tmp_path / "nope.db").exists()  # never created by a replay


def test_cli_state_table_when_piped(scenario: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(config(tmp_path, scenario))
    assert main(["replay", "state", "-c", cfg, "--at", f"@{T0 + 100}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# Registrations at 2023-11-14T22:15:00.000Z")
    assert out[1].split("\t")[:2] == ["AoR", "Contact"]
    assert out[2].split("\t")[:2] == [ALICE, "sip:a1@10.0.0.1:5060"]
    assert any(line.startswith("# Trunks at") for line in out)


async def test_replay_reads_a_live_nodes_log_without_blocking_its_writes(
        scenario: Path) -> None:
    log = EmbeddedLog(scenario)
    await log.open()
    try:
        async with EmbeddedSource(scenario) as src:
            appended = asyncio.create_task(log.append([added(T0 + 300, BOB, "b2")]))
            out = await rebuild(src, Target())
            await appended
            assert out.read in (7, 8)
    finally:
        await log.close()
