"""``siphon replay`` against real nodes: replay to now equals the live state, warm boot
from snapshots (and a damaged snapshot ignored), a copy boots a node with the same
state, Ctrl-C and kill -9 during a copy resume without duplicates."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, USERS, SiphonProcess
from sipclient import UdpClient

from events.embedded import EmbeddedLog
from events.schema import Binding, BindingAdded, BindingRefreshed, Event

pytestmark = pytest.mark.integration

STABLE = ("aor", "uri", "q", "expires_at", "source", "transport", "instance", "reg_id",
          "path", "params", "user_agent", "call_id", "cseq", "node", "registered_at")


def replay(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO),
                                                       os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "siphon.cli", "replay", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def stable(rows: list[dict[str, Any]]) -> list[tuple]:
    return sorted(tuple(json.dumps(r[k]) for k in STABLE) for r in rows)


def register_some(node: SiphonProcess, first: int, count: int) -> None:
    """REGISTERs over real SIP: some AoRs with two contacts, some removed again."""
    with UdpClient(node.sip_port) as ua:
        for i in range(first, first + count):
            user = f"user{i:03d}"
            contacts = [f"<sip:{user}@192.0.2.{i % 200 + 1}:5060>"]
            if i % 4 == 0:
                contacts.append(f"<sip:{user}@198.51.100.{i % 200 + 1}:5062;transport=tcp>")
            resp, _ = ua.register(user, USERS[user], contact=contacts, expires=3600)
            assert resp.status == 200, resp
            if i % 5 == 0:  # deregister again
                resp, _ = ua.register(user, USERS[user], contact=contacts[0], expires=0)
                assert resp.status == 200, resp


def test_replay_to_now_equals_the_live_node_and_verifies_against_it(
        siphon: SiphonProcess) -> None:
    siphon.start()
    register_some(siphon, 0, 30)
    status, _ = siphon.admin("DELETE", "/admin/registrations/sip:user001@example.com")
    assert status == 200
    live = siphon.registrations()
    assert len(live) > 20

    out = replay("state", "-c", str(siphon.config_path), "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    replayed = [r for r in rows if r["kind"] == "binding"]
    assert stable(replayed) == stable(live)
    assert rows[-1]["kind"] == "summary" and rows[-1]["bindings_live"] == len(live)

    check = replay("verify", "-c", str(siphon.config_path), "--against-node",
                   f"http://127.0.0.1:{siphon.admin_port}")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "the projection matches" in check.stdout

    history = replay("state", "-c", str(siphon.config_path), "--aor",
                     "sip:user004@example.com", "--json")
    assert history.returncode == 0, history.stderr
    events = [json.loads(x) for x in history.stdout.splitlines()]
    assert [e["change"] for e in events if e["kind"] == "event"] == [
        "registered", "registered"]
    assert len(events[-1]["bindings"]) == 2


def test_warm_boot_from_snapshot_and_a_damaged_snapshot_is_ignored(
        siphon: SiphonProcess) -> None:
    siphon.start({"registrar": {"snapshot_interval": 0.3}})
    snapshot = Path(str(siphon.log_db) + ".snapshot")
    register_some(siphon, 0, 20)
    deadline = time.monotonic() + 10
    while not snapshot.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert snapshot.exists(), siphon.tail()
    register_some(siphon, 20, 10)  # the tail (maybe partly in a newer snapshot)
    before = siphon.registrations()

    siphon.restart(graceful=False)  # kill -9: the snapshot may lag the log
    text = siphon.output().split("===== start #2")[1]
    assert "projection loaded from snapshot" in text, siphon.tail()
    assert stable(siphon.registrations()) == stable(before)

    siphon.stop()
    for path in (snapshot, Path(str(snapshot) + ".prev")):
        if path.exists():
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
    siphon.restart()
    text = siphon.output().split("===== start #3")[1]
    assert "ignoring snapshot" in text and "checksum mismatch" in text, siphon.tail()
    assert "projection loaded from snapshot" not in text
    assert stable(siphon.registrations()) == stable(before)


def test_damage_behind_a_snapshot_still_stops_the_node_naming_the_offset(
        siphon: SiphonProcess, run_cli: Any) -> None:
    import zlib

    siphon.start({"registrar": {"snapshot_interval": 60}})
    register_some(siphon, 0, 10)
    assert siphon.stop() == 0  # writes a last snapshot covering every record
    garbage = b'{"type":"binding.added.v1","ts":"not a number"}'
    with sqlite3.connect(siphon.log_db) as db:
        db.execute('UPDATE records SET payload = ?, crc = ? WHERE "offset" = 3',
                   (garbage, zlib.crc32(garbage)))
    rc, out = run_cli(siphon.config_path)
    assert rc == 3, out
    # ready at once from the snapshot, then the history check finds the damage
    assert "projection loaded from snapshot" in out and "ready" in out, out
    assert "history check stopped" in out and "offset 3" in out, out
    assert str(siphon.log_db) in out and "Traceback" not in out, out


def test_a_node_started_on_a_copy_comes_up_with_the_same_state(siphon_factory: Any) -> None:
    a = siphon_factory("a")
    a.start({"registrar": {"snapshot_interval": 0}})
    register_some(a, 0, 25)
    before = a.registrations()
    b = siphon_factory("b")
    b.write_files({"registrar": {"snapshot_interval": 0}})
    out = replay("copy", "-c", str(a.config_path), "--to", str(b.config_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("copied ")
    b.start({"registrar": {"snapshot_interval": 0}})
    assert stable(b.registrations()) == stable(before)


# ------------------------------------------------------------------- interrupted copy


async def big_log(path: Path, n: int) -> None:
    log = EmbeddedLog(path, group_commit_max=50_000)
    await log.open()
    batch: list[Event] = []
    for i in range(n):
        b = Binding(key=f"k{i % 3}", uri=f"sip:u{i % 5000}@10.0.{i % 200}.1:5060",
                    expires_at=1_700_003_600.0 + i, call_id=f"c{i % 5000}", cseq=i,
                    user_agent="Linphone/5.2 (Ubuntu)", source="10.0.0.1:5060")
        cls = BindingAdded if i < 15_000 else BindingRefreshed
        batch.append(cls(ts=1_700_000_000.0 + i / 100, node="n1",
                         aor=f"sip:u{i % 5000}@example.com", binding=b))
        if len(batch) == 50_000:
            await log.append(batch)
            batch = []
    if batch:
        await log.append(batch)
    await log.close()


def copied_rows(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
            return int(db.execute("SELECT COUNT(*) FROM records").fetchone()[0])
    except sqlite3.Error:
        return 0


def payloads(path: Path) -> list[bytes]:
    with sqlite3.connect(path) as db:
        return [r[0] for r in db.execute('SELECT payload FROM records ORDER BY "offset"')]


def config(path: Path, log: Path) -> Path:
    path.write_text(f"listen: {{udp: ['127.0.0.1:15060']}}\ndomain: {{local: [example.com]}}\n"
                    f"registrar: {{path: '{log}'}}\nauth: {{nonce_secret: test}}\n")
    return path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_an_interrupted_copy_resumes_without_duplicates(tmp_path: Path, sig: int) -> None:
    src, dst = tmp_path / "src.db", tmp_path / "dst.db"
    asyncio.run(big_log(src, 300_000))
    a, b = config(tmp_path / "a.yaml", src), config(tmp_path / "b.yaml", dst)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "siphon.cli", "replay", "copy", "-c", str(a),
                             "--to", str(b)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while copied_rows(dst) < 20_000 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    at_stop = copied_rows(dst)
    assert 0 < at_stop < 300_000
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert "Traceback" not in err
        assert "interrupted:" in err and "progress saved at source position 0:" in err
        assert "run the same command again to resume" in err
        saved = int(err.split("progress saved at source position 0:")[1].split(";")[0])
        assert saved == at_stop  # the state saved is exactly what the target holds
    else:
        assert proc.returncode == -signal.SIGKILL
    again = replay("copy", "-c", str(a), "--to", str(b), "--json")
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["resumed_from"] == {"0": at_stop}
    assert result["copied"] == 300_000 - at_stop and result["total_copied"] == 300_000
    assert payloads(dst) == payloads(src)
