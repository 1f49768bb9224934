"""What on-call engineers rely on: /metrics, SIGHUP reload, SIGTERM, JSON logs."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import pytest

from tests.integration.conftest import AUTH_SCRIPT, SiphonProcess
from tests.integration.sipclient import UdpClient

pytestmark = pytest.mark.integration


def scrape(node: SiphonProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics:\n{text}")


@pytest.mark.timeout(60)
def test_metrics_follow_registrations(siphon: SiphonProcess) -> None:
    siphon.start()
    with UdpClient(siphon.sip_port) as client:
        resp, _ = client.register("alice", "secret")
        assert resp.status == 200
        bad, _ = client.register("bob", "wrong")
        assert bad.status == 401
    text = scrape(siphon)
    assert value(text, 'siphon_registrations_total{outcome="ok"}') == 1
    assert value(text, 'siphon_registrations_total{outcome="challenged"}') >= 2
    assert value(text, 'siphon_sip_requests_total{method="REGISTER"}') >= 4
    assert value(text, "siphon_bindings") == 1 and value(text, "siphon_aors") == 1
    assert value(text, "siphon_log_append_seconds_count") >= 1
    assert value(text, "siphon_ready") == 1
    assert 'siphon_consumer_lag{partition="0"} 0.0' in text
    status, _ = siphon.admin("GET", "/metrics/../nothing")
    assert status == 404


@pytest.mark.timeout(60)
def test_sighup_reloads_the_script_and_keeps_bindings(siphon: SiphonProcess) -> None:
    siphon.start()
    with UdpClient(siphon.sip_port) as client:
        assert client.register("alice", "secret")[0].status == 200
        assert client.options("sip:nobody@example.com").status == 404
        siphon.script_path.write_text(AUTH_SCRIPT.replace(
            'request.reply(404, "Not Found")', 'request.reply(480, "Reloaded")'))
        siphon.proc.send_signal(signal.SIGHUP)
        siphon.wait_output("reloaded")
        assert client.options("sip:nobody@example.com").status == 480
        siphon.script_path.write_text("def broken(:\n")
        siphon.proc.send_signal(signal.SIGHUP)
        siphon.wait_output("keeping the running script")
        assert client.options("sip:nobody@example.com").status == 480
    status, body = siphon.admin("GET", "/admin/registrations/sip:alice@example.com")
    assert status == 200 and len(body["contacts"]) == 1


@pytest.mark.timeout(60)
def test_sigterm_drains_and_exits_zero_with_json_logs(siphon: SiphonProcess) -> None:
    siphon.start({"log": {"format": "json"}})
    with UdpClient(siphon.sip_port) as client:
        assert client.register("alice", "secret")[0].status == 200
    siphon.proc.send_signal(signal.SIGTERM)
    assert siphon.wait_exit(20) == 0
    lines = [ln for ln in siphon.output().splitlines() if ln.startswith("{")]
    records = [json.loads(ln) for ln in lines]
    assert any(r["msg"] == "shutting down" for r in records)
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    time.sleep(0.1)
    siphon.start()  # the binding survived the graceful stop
    assert siphon.admin("GET", "/admin/registrations/sip:alice@example.com")[0] == 200
