"""Trunk projection and the registry service on a real embedded log."""

import asyncio

from events.embedded import EmbeddedLog
from events.schema import Trunk, TrunkExpired, TrunkRegistered
from projections import trunks as proj
from projections.runner import ProjectionRunner
from siphon.trunks import TrunkError, TrunkService, check_id, parse_record


def test_projection_apply_and_liveness() -> None:
    state = proj.TrunkState()
    t = Trunk(sip_uri="sip:gw", transport="tcp")
    assert proj.apply(state, TrunkRegistered(ts=0, node="n", trunk_id="a", trunk=t,
                                             lease_expires_at=90)) == "registered"
    assert [tid for tid, _ in proj.live(state, 10, transport="tcp")] == ["a"]
    assert proj.live(state, 10, transport="udp") == [] and proj.live(state, 95) == []
    stale = TrunkExpired(ts=95, node="n", trunk_id="a", lease_expires_at=50)
    assert proj.apply(state, stale) is None  # not the current lease
    assert proj.apply(state, TrunkExpired(ts=95, node="n", trunk_id="a",
                                          lease_expires_at=90)) == "expired"
    assert state.trunks == {}


def test_record_and_id_validation() -> None:
    assert parse_record(b'{"sip_uri": "sip:gw", "x": 1}').attributes == {"x": 1}
    for body in (b"nope", b"[]", b'{"sip_uri": "tel:123"}', b"\xff"):
        try:
            parse_record(body)
        except TrunkError as exc:
            assert exc.status == 400
        else:
            raise AssertionError(body)
    for bad in ("..", "a/b", "", "x" * 200, "a\nb"):
        try:
            check_id(bad)
        except TrunkError:
            continue
        raise AssertionError(bad)


async def test_heartbeats_are_thinned_and_leases_expire(tmp_path) -> None:
    log = EmbeddedLog(tmp_path / "log.db")
    await log.open()
    runner = ProjectionRunner(log)
    task = asyncio.create_task(runner.run())
    now = [1000.0]
    svc = TrunkService(log, runner, "n1", heartbeat_seconds=10, lease_secs=30,
                       clock=lambda: now[0])
    created, record = await svc.put("gw1", parse_record(b'{"sip_uri": "sip:gw"}'))
    assert created and record["heartbeat_seconds"] == 10
    assert (await svc.put("gw1", parse_record(b'{"sip_uri": "sip:gw2"}')))[0] is False
    before = (await log.end_position())[0]
    for _ in range(100):  # 100 heartbeats within a third of the lease: no event
        now[0] += 0.05
        assert await svc.heartbeat("gw1")
    assert (await log.end_position())[0] == before and svc.heartbeats_thinned == 100
    now[0] += 11
    assert await svc.heartbeat("gw1")  # a third of the lease passed: one event
    assert (await log.end_position())[0] == before + 1
    now[0] += 31
    assert svc.view("gw1") is None and await svc.sweep_once() == 1
    assert not await svc.heartbeat("gw1")
    task.cancel()
    await log.close()
