"""Trunk projection and the registry service on a real embedded log."""

import asyncio

from multidict import CIMultiDict, CIMultiDictProxy

from events.embedded import EmbeddedLog
from events.schema import Trunk, TrunkExpired, TrunkRegistered
from projections import trunks as proj
from projections.runner import ProjectionRunner
from siphon.http_server import protected
from siphon.script.http_api import HttpRequest, Response
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


def test_wire_request_is_lazy_and_equals_the_eager_one() -> None:
    wire = CIMultiDict([("Host", "x"), ("X-Multi", "one"), ("x-multi", "two"),
                        ("Authorization", "Bearer t")])

    class Transport:
        def get_extra_info(self, name: str) -> tuple[str, int] | None:
            return ("127.0.0.1", 4242) if name == "peername" else None

    lazy = HttpRequest.from_wire("PATCH", "/trunks/a", "x=1&y=&z=a+b", CIMultiDictProxy(wire),
                                 b"", {"id": "a"}, Transport())
    assert lazy.header("x-multi") == lazy.header("X-MULTI") == "one, two"
    assert lazy.header("authorization") == "Bearer t" and lazy.header("missing") is None
    eager = HttpRequest("PATCH", "/trunks/a", "x=1&y=&z=a+b",
                        {"host": "x", "x-multi": "one, two", "authorization": "Bearer t"}, b"",
                        {"id": "a"}, "127.0.0.1:4242")
    for req in (lazy, eager):
        assert req.headers == {"host": "x", "x-multi": "one, two", "authorization": "Bearer t"}
        assert req.query_params == {"x": "1", "y": "", "z": "a b"}
        assert req.client == "127.0.0.1:4242" and req.body() == b"" and req.json() is None
        assert req.header("X-Multi") == "one, two"
    assert HttpRequest.from_wire("GET", "/", "", CIMultiDictProxy(CIMultiDict()), b"", {},
                                 None).client == ""


async def test_rest_heartbeats_answer_from_the_projection(tmp_path) -> None:
    log = EmbeddedLog(tmp_path / "log.db")
    await log.open()
    runner = ProjectionRunner(log)
    task = asyncio.create_task(runner.run())
    now = [1000.0]
    svc = TrunkService(log, runner, "n1", heartbeat_seconds=10, lease_secs=30,
                       clock=lambda: now[0])
    handler = protected(svc.handle_one, "tok")
    auth = {"authorization": "Bearer tok"}

    def req(method: str, trunk_id: str, body: bytes = b"", headers: dict | None = None
            ) -> HttpRequest:
        return HttpRequest(method, f"/trunks/{trunk_id}", "", headers or {}, body,
                           {"id": trunk_id})

    async def answer(request: HttpRequest) -> Response:
        result = handler(request)
        return await result if asyncio.iscoroutine(result) else result

    assert (await answer(req("PATCH", "gw1"))).status == 401  # no token: refused at once
    assert (await answer(req("PATCH", "gw1", headers=auth))).status == 404
    created = await answer(req("PUT", "gw1", b'{"sip_uri": "sip:gw"}', auth))
    assert created.status == 201 and created.headers["Location"] == "/trunks/gw1"
    before = (await log.end_position())[0]
    assert not svc.heartbeat_thinned("nope")
    for _ in range(50):  # within a third of the lease: answered from the projection
        now[0] += 0.1
        assert (await answer(req("PATCH", "gw1", headers=auth))).status == 204
    assert svc.heartbeats_thinned == 50 and (await log.end_position())[0] == before
    now[0] += 10
    assert not svc.heartbeat_thinned("gw1")  # a third of the lease old: needs an event
    assert (await answer(req("PATCH", "gw1", headers=auth))).status == 204
    assert (await log.end_position())[0] == before + 1
    assert svc.heartbeat_thinned("gw1")
    now[0] += 31  # lapsed: not thinned, and the slow path says unknown
    assert not svc.heartbeat_thinned("gw1")
    missing = await answer(req("PATCH", "gw1", headers=auth))
    assert missing.status == 404 and b"re-register" in missing.body
    bad = await answer(req("PATCH", "..", headers=auth))
    assert bad.status == 400 and b"invalid trunk id" in bad.body
    task.cancel()
    await log.close()
