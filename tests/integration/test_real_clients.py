"""Third-party SIP clients against a running node: sipsak and SIPp."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import EXAMPLES, USERS, SiphonProcess, free_port

pytestmark = pytest.mark.integration

SIPP_SCENARIO = Path(__file__).parent / "sipp" / "register_auth.xml"


def run(cmd: list[str], cwd: Path, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def sipsak(port: int, cwd: Path, password: str, expires: int) -> subprocess.CompletedProcess[str]:
    return run(["sipsak", "-U", "-C", "sip:alice@127.0.0.1:5080",
                "-s", f"sip:alice@127.0.0.1:{port}", "-a", password, "-u", "alice",
                "-x", str(expires)], cwd, timeout=30)


@pytest.mark.timeout(60)
def test_sipsak_register_wrong_password_and_deregister(siphon_factory, tmp_path: Path) -> None:
    assert shutil.which("sipsak"), "sipsak is not installed (Debian package sipsak)"
    # sipsak 0.9.8.1 mangles five-digit ports in the URIs it builds: use a 4-digit one.
    node: SiphonProcess = siphon_factory("sipsak", sip_port=free_port(below=10000))
    node.start(script_text=(EXAMPLES / "registrar.py").read_text())
    port = node.sip_port
    aor = f"sip:alice@127.0.0.1:{port}"

    bad = sipsak(port, tmp_path, "not-the-password", 600)
    assert bad.returncode != 0, f"wrong password accepted:\n{bad.stdout}{bad.stderr}"
    assert node.contacts(aor) is None, "a binding was stored despite the wrong password"

    ok = sipsak(port, tmp_path, "secret", 600)
    assert ok.returncode == 0, f"sipsak failed ({ok.returncode}):\n{ok.stdout}{ok.stderr}\n" \
                               f"{node.tail()}"
    contacts = node.contacts(aor)
    assert contacts is not None, f"no binding for {aor}: {node.registrations()}"
    assert [c["uri"] for c in contacts] == ["sip:alice@127.0.0.1:5080"], contacts
    assert 590 <= contacts[0]["expires_remaining"] <= 600, contacts
    assert contacts[0]["user_agent"].startswith("sipsak"), contacts

    gone = sipsak(port, tmp_path, "secret", 0)
    assert gone.returncode == 0, f"sipsak -x 0 failed:\n{gone.stdout}{gone.stderr}"
    assert node.contacts(aor) is None, f"binding left after -x 0: {node.contacts(aor)}"
    node.wait_output(f"{aor} deregistered: 0 contact(s)")  # the example's on_change log line


@pytest.mark.timeout(90)
def test_sipp_register_with_digest_50_users(siphon: SiphonProcess, tmp_path: Path) -> None:
    assert shutil.which("sipp"), "sipp is not installed (Debian package sip-tester)"
    users = [f"user{i:03d}" for i in range(50)]
    assert all(u in USERS for u in users)  # the node's auth.credentials hold them
    csv = tmp_path / "users.csv"
    csv.write_text("SEQUENTIAL\n" + "".join(
        f"{u};{USERS[u]};[authentication username={u} password={USERS[u]}];\n" for u in users))
    siphon.start()

    result = run(["sipp", f"127.0.0.1:{siphon.sip_port}", "-sf", str(SIPP_SCENARIO),
                  "-inf", str(csv), "-m", "50", "-r", "50", "-i", "127.0.0.1",
                  "-p", str(free_port()), "-nostdin", "-timeout", "30s", "-timeout_error",
                  "-trace_err", "-trace_stat"], tmp_path, timeout=60)
    errors = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*_errors.log"))
    assert result.returncode == 0, (
        f"sipp exit code {result.returncode} (0 = every call succeeded)\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-2000:]}\n{errors[-3000:]}\n{siphon.tail()}")

    bindings = siphon.registrations()
    expected = {f"sip:{u}@example.com" for u in users}
    assert {b["aor"] for b in bindings} == expected
    assert len(bindings) == 50
    assert all(b["user_agent"] == "SIPp register_auth" for b in bindings), bindings[:3]
    status, stats = siphon.admin("GET", "/admin/stats")
    assert status == 200 and stats["registrations_active"] == 50, stats
