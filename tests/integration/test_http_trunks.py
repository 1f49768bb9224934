"""The HTTP addon and the trunk registry, against a running ``siphon run``."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import EXAMPLES, SiphonProcess, free_port

pytestmark = pytest.mark.integration

SEED = (EXAMPLES / "trunk_registry.py").read_text()
SIPP = Path(__file__).parent / "sipp"


def call(port: int, method: str, path: str, body: bytes | str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def seed_session(port: int) -> None:
    """The curl session of the trunk-registry recipe, answer by answer."""
    record = '{"sip_uri": "sip:sbc-a.example.net:5060", "transport": "tls", "max_channels": 240}'
    status, headers, body = call(port, "PUT", "/trunks/carrier-a", record,
                                 {"content-type": "application/json"})
    assert status == 201 and headers["Location"] == "/trunks/carrier-a"
    created = json.loads(body)
    assert created == {"sip_uri": "sip:sbc-a.example.net:5060", "transport": "tls",
                       "max_channels": 240, "id": "carrier-a", "enabled": True,
                       "status": "up", "heartbeat_seconds": 30}
    status, headers, _ = call(port, "PUT", "/trunks/carrier-a", record)
    assert status == 200 and "Location" not in headers  # replace
    assert call(port, "PATCH", "/trunks/carrier-a")[0] == 204
    status, _, body = call(port, "GET", "/trunks/carrier-a")
    assert status == 200 and json.loads(body) == created
    status, _, body = call(port, "GET", "/trunks?enabled=true&transport=tls")
    assert status == 200 and json.loads(body) == {"trunks": [created]}
    status, _, body = call(port, "GET", "/trunks?transport=udp")
    assert json.loads(body) == {"trunks": []}
    assert call(port, "DELETE", "/trunks/carrier-a")[0] == 204
    status, _, body = call(port, "GET", "/trunks/carrier-a")
    assert status == 404 and json.loads(body)["error"] == "unknown trunk"
    status, _, body = call(port, "PATCH", "/trunks/carrier-a")
    assert status == 404 and "re-register" in json.loads(body)["error"]
    for bad, message in [("{not json", "invalid JSON"), ('{"transport": "udp"}', "sip_uri"),
                         ('{"sip_uri": "sip:a@b", "transport": "sctp"}', "transport")]:
        status, _, body = call(port, "PUT", "/trunks/x", bad)
        assert status == 400 and message in json.loads(body)["error"]


@pytest.mark.timeout(60)
def test_seed_script_serves_the_recipe_curl_session(siphon: SiphonProcess) -> None:
    http_port = free_port()
    siphon.start({"http": {"listen": f"127.0.0.1:{http_port}"}}, script_text=SEED)
    assert "trunk registry up" in siphon.output()  # @http.on_startup ran
    seed_session(http_port)
    status, headers, _ = call(http_port, "POST", "/trunks/carrier-a", "{}")
    assert status == 405 and "PUT" in headers["Allow"]
    assert call(http_port, "GET", "/nothing/here")[0] == 404


@pytest.mark.timeout(60)
def test_builtin_registry_same_contract_state_in_the_log(siphon: SiphonProcess) -> None:
    http_port = free_port()
    siphon.start({"http": {"listen": f"127.0.0.1:{http_port}"},
                  "trunks": {"enabled": True}}, script_text="")
    seed_session(http_port)
    call(http_port, "PUT", "/trunks/carrier-b", '{"sip_uri": "sip:gw.example.net"}')
    siphon.restart(graceful=False)  # kill -9: the registry is rebuilt from the log
    status, _, body = call(http_port, "GET", "/trunks/carrier-b")
    assert status == 200 and json.loads(body)["transport"] == "udp"


@pytest.mark.timeout(60)
def test_builtin_registry_refuses_bad_input_without_logging_it(siphon: SiphonProcess) -> None:
    http_port = free_port()
    siphon.start({"http": {"listen": f"127.0.0.1:{http_port}", "max_body_bytes": 1024},
                  "trunks": {"enabled": True}}, script_text="")
    before = siphon.admin("GET", "/admin/stats")[1]["log_position"]
    cases = [
        ("PUT", "/trunks/a", b"\xff\xfe not utf-8", 400),
        ("PUT", "/trunks/a", b'{"sip_uri": 5}', 400),
        ("PUT", "/trunks/a", b'{"sip_uri": "sip:a@b", "enabled": "yes"}', 400),
        ("PUT", "/trunks/a", b'["sip:a@b"]', 400),
        ("PUT", "/trunks/a", b'{"sip_uri": "http://a"}', 400),
        ("PUT", "/trunks/a", b'{"sip_uri": "sip:a@b", "x": "' + b"y" * 2000 + b'"}', 413),
        ("PUT", "/trunks/..", b'{"sip_uri": "sip:a@b"}', 400),
        ("PUT", "/trunks/%2E%2E%2Fetc", b'{"sip_uri": "sip:a@b"}', 400),
        ("PATCH", "/trunks/unknown", None, 404),
        ("GET", "/trunks?enabled=maybe", None, 400),
    ]
    for method, path, body, expected in cases:
        status, _, answer = call(http_port, method, path, body)
        assert status == expected, (method, path, status, answer)
        assert "error" in json.loads(answer)
    assert siphon.admin("GET", "/admin/stats")[1]["log_position"] == before


@pytest.mark.timeout(60)
def test_lease_expiry_and_token_on_a_separate_listener(siphon: SiphonProcess) -> None:
    trunk_port = free_port()
    script = (
        "from siphon import trunks, log\n"
        "@trunks.on_change\n"
        "def changed(trunk_id, event_type, trunk):\n"
        "    log.info(f'trunk-change {trunk_id} {event_type}')\n"
    )
    siphon.start({"trunks": {"enabled": True, "listen": f"127.0.0.1:{trunk_port}",
                             "token": "s3cret", "heartbeat_seconds": 1, "lease_secs": 2},
                  "registrar": {"sweep_interval": 0.2}}, script_text=script)
    auth = {"Authorization": "Bearer s3cret"}
    assert call(trunk_port, "PUT", "/trunks/t1", '{"sip_uri": "sip:gw"}')[0] == 401
    assert call(trunk_port, "PUT", "/trunks/t1", '{"sip_uri": "sip:gw"}', auth)[0] == 201
    for _ in range(4):  # heartbeats keep it alive past its 2 s lease
        time.sleep(0.7)
        assert call(trunk_port, "PATCH", "/trunks/t1", None, auth)[0] == 204
    assert call(trunk_port, "GET", "/trunks/t1", None, auth)[0] == 200
    time.sleep(3)  # no heartbeat: expired
    assert call(trunk_port, "GET", "/trunks/t1", None, auth)[0] == 404
    out = siphon.wait_output("trunk-change t1 expired")
    assert "trunk-change t1 registered" in out


ROUTE_TO_TRUNK = """
from siphon import proxy, trunks

@proxy.on_request
def route(request):
    if request.in_dialog:
        if request.loose_route():
            request.relay()
        return
    live = trunks.live(enabled=True)
    if not live:
        request.reply(503, "No Trunk")
        return
    request.record_route()
    request.fork([t["sip_uri"] for t in live])
"""


@pytest.mark.timeout(90)
def test_sip_script_routes_a_call_to_a_live_trunk(siphon: SiphonProcess) -> None:
    http_port, trunk_sip = free_port(), free_port()
    siphon.start({"http": {"listen": f"127.0.0.1:{http_port}"}, "trunks": {"enabled": True}},
                 script_text=ROUTE_TO_TRUNK)
    uac = ["sipp", f"127.0.0.1:{siphon.sip_port}", "-sf", str(SIPP / "uac_call.xml"), "-s",
           "bob", "-key", "domain", "example.com", "-m", "1", "-nostdin", "-timeout", "20s"]
    proc = subprocess.run([*uac, "-p", str(free_port())], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=30)
    assert proc.returncode != 0 and b"503" in proc.stdout  # no trunk yet
    status, _, _ = call(http_port, "PUT", "/trunks/gw1",
                        f'{{"sip_uri": "sip:127.0.0.1:{trunk_sip}", "transport": "udp"}}')
    assert status == 201
    uas = subprocess.Popen(["sipp", "-sf", str(SIPP / "uas_answer.xml"), "-p", str(trunk_sip),
                            "-m", "1", "-nostdin", "-timeout", "20s"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc = subprocess.run([*uac, "-p", str(free_port())], capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stdout.decode()[-2000:]
    out, _ = uas.communicate(timeout=30)
    assert uas.returncode == 0, out.decode()[-2000:]


ROUTES_SCRIPT = """
import asyncio, json
from siphon import http

@http.middleware
def gate(req):
    if req.header("X-Block"):
        return http.Response(status=403, headers={"Content-Type": "application/json"},
                             body=b'{"status": 403, "error": "blocked"}')
    req.tagged = "by-middleware"

@http.route("/echo/{name}", methods=["GET", "POST"])
def echo(req):
    return http.Response(status=200, headers={"Content-Type": "application/json"},
                         body=json.dumps({
                             "method": req.method, "path": req.path,
                             "name": req.path_params["name"], "query": req.query_params,
                             "multi": req.header("x-multi"),
                             "multi_dict": req.headers.get("x-multi"),
                             "client": req.client, "length": len(req.body()),
                             "tagged": req.tagged}))

@http.route("/boom", methods=["GET"])
async def boom(req):
    await asyncio.sleep(0)
    raise RuntimeError("kaboom-marker")
"""


def raw_exchange(port: int, head: bytes, body: bytes = b"", *, wait_continue: bool = False
                 ) -> tuple[bytes, bytes]:
    """Send ``head`` (and ``body``, after a ``100 Continue`` when asked); return (what came
    before the body was sent, the final answer's bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        interim = b""
        if wait_continue:
            while b"\r\n\r\n" not in interim:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                interim += chunk
            if not interim.startswith(b"HTTP/1.1 100"):
                return interim, b""
        sock.sendall(body)
        answer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return interim, answer


@pytest.mark.timeout(60)
def test_script_routes_middleware_errors_and_body_limits(siphon: SiphonProcess) -> None:
    port = free_port()
    siphon.start({"http": {"listen": f"127.0.0.1:{port}", "max_body_bytes": 1024}},
                 script_text=ROUTES_SCRIPT)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.putrequest("GET", "/echo/a%20b?x=1&y=&z=a+b")
    conn.putheader("X-Multi", "one")
    conn.putheader("X-Multi", "two")
    conn.endheaders()
    resp = conn.getresponse()
    got = json.loads(resp.read())
    assert resp.status == 200, got
    assert got["method"] == "GET" and got["path"] == "/echo/a%20b" and got["name"] == "a b"
    assert got["query"] == {"x": "1", "y": "", "z": "a b"}
    assert got["multi"] == got["multi_dict"] == "one, two"
    assert got["client"].startswith("127.0.0.1:") and got["tagged"] == "by-middleware"
    # a chunked body in several pieces is read whole; a chunked body over the limit is 413
    conn.request("POST", "/echo/n", body=iter([b"x" * 300] * 3), encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["length"] == 900
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("POST", "/echo/n", body=iter([b"x" * 600] * 3), encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and "larger than 1024" in json.loads(resp.read())["error"]
    conn.close()
    # Expect: 100-continue gets its 100 before the body; an oversize one gets 413 instead
    head = (b"POST /echo/n HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
    interim, answer = raw_exchange(port, head, b"y" * 500, wait_continue=True)
    assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
    assert answer.startswith(b"HTTP/1.1 200") and b'"length": 500' in answer, answer
    interim, _ = raw_exchange(port, head.replace(b"500", b"5000"), wait_continue=True)
    assert interim.startswith(b"HTTP/1.1 413"), interim
    # middleware short-circuit, 405 with Allow, 404, 500 with the traceback logged
    status, _, body = call(port, "GET", "/echo/x", None, {"X-Block": "1"})
    assert status == 403 and json.loads(body)["error"] == "blocked"
    status, headers, body = call(port, "DELETE", "/echo/x")
    assert status == 405 and headers["Allow"] == "GET, POST" and "error" in json.loads(body)
    status, _, body = call(port, "GET", "/nothing")
    assert status == 404 and "error" in json.loads(body)
    status, _, body = call(port, "GET", "/boom")
    assert status == 500 and "error" in json.loads(body)
    out = siphon.wait_output("kaboom-marker")
    assert "Traceback" in out and "HTTP handler boom failed on GET /boom" in out
