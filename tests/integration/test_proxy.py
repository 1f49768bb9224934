"""The registrar recipe as a proxy, with real SIPp peers: forking, CANCEL, Record-Route."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import EXAMPLES, SiphonProcess, free_port

pytestmark = pytest.mark.integration

SIPP = Path(__file__).parent / "sipp"
RECIPE = (EXAMPLES / "registrar.py").read_text()


def _sipp(*args: str, timeout: float = 30.0) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sipp", *args, "-nostdin", "-timeout", f"{int(timeout)}s"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _register_from(node: SiphonProcess, port: int, tmp: Path, user: str = "bob") -> None:
    """A real SIPp REGISTER with digest from local port ``port`` (so the binding's
    Contact and source are that port, where a SIPp UAS will listen next)."""
    users = tmp / f"users-{port}.csv"
    users.write_text(
        f"SEQUENTIAL\n{user};secret;[authentication username={user} password=secret];\n")
    proc = subprocess.run(
        ["sipp", f"127.0.0.1:{node.sip_port}", "-sf", str(SIPP / "register_auth.xml"),
         "-inf", str(users), "-key", "domain", "example.com", "-p", str(port), "-m", "1",
         "-nostdin", "-timeout", "10s"],
        capture_output=True, timeout=20)
    assert proc.returncode == 0, proc.stdout.decode()[-2000:]


def _finish(proc: subprocess.Popen[bytes], timeout: float = 40.0) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(errors="replace")


def _call(node: SiphonProcess, user: str = "bob") -> subprocess.Popen[bytes]:
    return _sipp(f"127.0.0.1:{node.sip_port}", "-sf", str(SIPP / "uac_call.xml"), "-s", user,
                 "-key", "domain", "example.com", "-m", "1", "-p", str(free_port()))


@pytest.mark.timeout(90)
def test_fork_first_200_wins_other_branch_cancelled(siphon: SiphonProcess,
                                                    tmp_path: Path) -> None:
    siphon.start(script_text=RECIPE)
    port_a, port_b = free_port(), free_port()
    _register_from(siphon, port_a, tmp_path)
    _register_from(siphon, port_b, tmp_path)
    status, body = siphon.admin("GET", "/admin/registrations/sip:bob@example.com")
    assert status == 200 and len(body["contacts"]) == 2
    answer = _sipp("-sf", str(SIPP / "uas_answer.xml"), "-p", str(port_a), "-m", "1")
    ring = _sipp("-sf", str(SIPP / "uas_ring_cancel.xml"), "-p", str(port_b), "-m", "1")
    caller = _call(siphon)
    rc, out = _finish(caller)
    assert rc == 0, f"caller failed:\n{out[-3000:]}\n{siphon.tail()}"
    rc, out = _finish(answer)
    assert rc == 0, f"answering UAS did not get ACK and BYE via the proxy:\n{out[-3000:]}"
    rc, out = _finish(ring)
    assert rc == 0, f"ringing UAS was not cancelled:\n{out[-3000:]}"


@pytest.mark.timeout(90)
def test_busy_branch_does_not_win_over_an_answer(siphon: SiphonProcess, tmp_path: Path) -> None:
    siphon.start(script_text=RECIPE)
    port_a, port_b = free_port(), free_port()
    _register_from(siphon, port_a, tmp_path)
    _register_from(siphon, port_b, tmp_path)
    busy = _sipp("-sf", str(SIPP / "uas_busy.xml"), "-p", str(port_a), "-m", "1")
    answer = _sipp("-sf", str(SIPP / "uas_answer.xml"), "-p", str(port_b), "-m", "1")
    rc, out = _finish(_call(siphon))
    assert rc == 0, f"caller failed:\n{out[-3000:]}\n{siphon.tail()}"
    assert _finish(busy)[0] == 0, "the 486 branch was not ACKed by the proxy"
    assert _finish(answer)[0] == 0


@pytest.mark.timeout(90)
def test_unregistered_user_gets_404_and_only_busy_gives_486(siphon: SiphonProcess,
                                                           tmp_path: Path) -> None:
    siphon.start(script_text=RECIPE)
    rc, out = _finish(_call(siphon, "nobody"), timeout=40)
    assert rc != 0 and "404" in out
    port = free_port()
    _register_from(siphon, port, tmp_path)
    busy = _sipp("-sf", str(SIPP / "uas_busy.xml"), "-p", str(port), "-m", "1")
    rc, out = _finish(_call(siphon))
    assert rc != 0 and "486" in out, out[-3000:]
    assert _finish(busy)[0] == 0


@pytest.mark.timeout(90)
def test_caller_cancel_reaches_the_ringing_branch(siphon: SiphonProcess, tmp_path: Path) -> None:
    siphon.start(script_text=RECIPE)
    port = free_port()
    _register_from(siphon, port, tmp_path)
    ring = _sipp("-sf", str(SIPP / "uas_ring_cancel.xml"), "-p", str(port), "-m", "1")
    caller = _sipp(f"127.0.0.1:{siphon.sip_port}", "-sf", str(SIPP / "uac_cancel.xml"), "-s",
                   "bob", "-key", "domain", "example.com", "-m", "1", "-p", str(free_port()))
    rc, out = _finish(caller)
    assert rc == 0, f"caller did not get 200 (CANCEL) and 487:\n{out[-3000:]}\n{siphon.tail()}"
    rc, out = _finish(ring)
    assert rc == 0, f"the CANCEL was not propagated to the branch:\n{out[-3000:]}"


RELAY_ALL = """
from siphon import proxy

@proxy.on_request
def route(request):
    request.relay()
"""


@pytest.mark.timeout(60)
def test_unknown_cancel_gets_481_and_a_loop_gets_482(siphon: SiphonProcess) -> None:
    from tests.integration.sipclient import UdpClient, build_request, new_branch, new_tag

    siphon.start(script_text=RELAY_ALL)
    with UdpClient(siphon.sip_port) as client:
        cancel = build_request(
            "CANCEL", "sip:bob@example.com", to="<sip:bob@example.com>",
            from_=f"<sip:a@example.com>;tag={new_tag()}", call_id="nope@it", cseq=1,
            via=f"SIP/2.0/UDP {client.via_host};branch={new_branch()}")
        resp = client.request(cancel, call_id="nope@it")
        assert resp is not None and resp.status == 481
        # relayed to its own Request-URI, which is siphon: it comes back unchanged
        me = f"sip:loop@127.0.0.1:{siphon.sip_port}"
        invite = build_request(
            "INVITE", me, to=f"<{me}>", from_=f"<sip:a@example.com>;tag={new_tag()}",
            call_id="loop@it", cseq=1,
            via=f"SIP/2.0/UDP {client.via_host};branch={new_branch()}",
            contact=f"<sip:a@{client.via_host}>")
        client.send(invite)
        final = None
        for _ in range(10):
            resp = client.recv(timeout=5, call_id="loop@it")
            assert resp is not None, siphon.tail()
            if resp.status >= 200:
                final = resp
                break
        assert final is not None and final.status == 482, final


@pytest.mark.timeout(90)
def test_finished_calls_leave_no_proxy_state(siphon: SiphonProcess, tmp_path: Path) -> None:
    import time
    import urllib.request

    siphon.start(script_text=RECIPE)
    port = free_port()
    _register_from(siphon, port, tmp_path)
    answer = _sipp("-sf", str(SIPP / "uas_answer.xml"), "-p", str(port), "-m", "3")
    for _ in range(3):
        rc, out = _finish(_call(siphon))
        assert rc == 0, out[-2000:]
    assert _finish(answer)[0] == 0

    def branches() -> float:
        url = f"http://127.0.0.1:{siphon.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("siphon_proxy_branches "):
                    return float(line.split()[1])
        raise AssertionError("no siphon_proxy_branches metric")

    deadline = time.monotonic() + 15  # BYE transactions linger for timer K (5 s)
    while branches() != 0:
        assert time.monotonic() < deadline, "proxy sessions are never forgotten"
        time.sleep(0.5)
