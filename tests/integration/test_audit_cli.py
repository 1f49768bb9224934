"""``siphon audit`` as a user runs it: sync, reports, formats, plots, and bad input."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "unit"))
from test_audit_support import append_raw, crafted_history, write_log  # noqa: E402

WINDOW = ["--from", "2026-01-01T06:00:00Z", "--to", "2026-01-02T06:00:00Z"]


def audit(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SIPHON_AUDIT_DB", None)
    return subprocess.run([sys.executable, "-m", "siphon.cli", "audit", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A config whose embedded log holds the crafted history plus an unknown record."""
    log = tmp_path / "var" / "events.db"
    log.parent.mkdir()
    asyncio.run(write_log(log, crafted_history()))
    append_raw(log, [b'{"type":"call.started.v1","ts":1767254400.0,"node":"n1"}'])
    (tmp_path / "siphon.yaml").write_text(
        'listen:\n  udp: ["127.0.0.1:15099"]\ndomain:\n  local: ["example.com"]\n'
        "registrar:\n  backend: embedded\n  path: var/events.db\n")
    return tmp_path


def synced(site: Path) -> Path:
    r = audit("sync", "-c", "siphon.yaml", "--db", "audit.duckdb", cwd=site)
    assert r.returncode == 0, r.stderr
    return site / "audit.duckdb"


def test_sync_progress_and_unknown_warning(site: Path) -> None:
    r = audit("sync", "-c", "siphon.yaml", "--db", "audit.duckdb", cwd=site)
    assert r.returncode == 0, r.stderr
    assert "ingested 19/19 records" in r.stderr  # not a terminal: progress lines
    assert "synced 19 records" in r.stderr
    assert "unknown event type: call.started.v1" in r.stderr
    assert "unknown_events" in r.stderr
    again = audit("sync", "-c", "siphon.yaml", "--db", "audit.duckdb", cwd=site)
    assert again.returncode == 0 and "synced 0 records" in again.stderr
    r = audit("sql", "SELECT count(*) AS n FROM events_raw", "--db", "audit.duckdb", cwd=site)
    assert r.stdout.splitlines() == ["n", "19"]


def test_reports_and_formats(site: Path) -> None:
    synced(site)
    r = audit("charging", *WINDOW, "--format", "csv", cwd=site)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert {row["aor"]: float(row["registered_s"]) for row in rows}["sip:alice@example.com"] \
        == 14400.0
    r = audit("charging", *WINDOW, "--per", "day", "--format", "json", cwd=site)
    data = json.loads(r.stdout)
    assert {"aor": "sip:bob@example.com", "day": "2026-01-02 00:00:00", "registered_s": 7200.0,
            "binding_s": 7200.0, "sessions": 1} in data
    r = audit("registered-at", "--at", "2026-01-01T07:15:00", "--format", "json", cwd=site)
    assert [d["binding_key"] for d in json.loads(r.stdout)] == ["a2", "a1"]
    r = audit("history", "--aor", "sip:bob@example.com", "--format", "csv", cwd=site)
    assert [row["type"] for row in csv.DictReader(io.StringIO(r.stdout))] == [
        "binding.added.v1", "binding.added.v1", "binding.removed.v1", "binding.expired.v1",
        "binding.removed.v1"]
    r = audit("churn", "--per", "day", "--format", "table", cwd=site)
    assert r.returncode == 0 and "registrations" in r.stdout and "2026-01-01" in r.stdout
    r = audit("trunk-uptime", *WINDOW, "--format", "csv", cwd=site)
    assert r.returncode == 0 and r.stdout.startswith("trunk_id,up_s,uptime_pct")
    r = audit("charging", *WINDOW, "--format", "parquet", "--output", "c.parquet", cwd=site)
    assert r.returncode == 0, r.stderr
    assert duckdb.sql(f"SELECT count(*) FROM '{site / 'c.parquet'}'").fetchall() == [(6,)]
    r = audit("charging", *WINDOW, "--format", "parquet", cwd=site)
    assert r.returncode == 2 and "--output" in r.stderr


def test_plots_are_pngs(site: Path) -> None:
    synced(site)
    for args in (["churn", "--per", "hour"], ["charging", *WINDOW, "--per", "day"]):
        out = site / f"{args[0]}.png"
        r = audit(*args, "--format", "csv", "--plot", str(out), cwd=site)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    r = audit("charging", *WINDOW, "--plot", "x.png", cwd=site)
    assert r.returncode == 2 and "--per" in r.stderr


def test_bad_sql_leaves_tables_alone(site: Path) -> None:
    db = synced(site)
    before = duckdb.connect(str(db), read_only=True).execute(
        "SELECT count(*) FROM events_raw").fetchone()
    r = audit("sql", "SELEKT * FROM events_raw", cwd=site)
    assert r.returncode == 1 and "Parser Error" in r.stderr and "SELEKT" in r.stderr
    r = audit("sql", "SELECT nope FROM events_raw", cwd=site)
    assert r.returncode == 1 and 'column "nope"' in r.stderr.lower()
    r = audit("sql", "DELETE FROM events_raw", cwd=site)
    assert r.returncode == 1 and "read-only" in r.stderr
    r = audit("sql", "DROP TABLE binding_open", cwd=site)
    assert r.returncode == 1
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM events_raw").fetchone() == before
    assert con.execute("SELECT count(*) FROM binding_open").fetchone() == (3,)


def test_bad_arguments(site: Path) -> None:
    synced(site)
    r = audit("charging", "--from", "2026-01-02", "--to", "2026-01-01", cwd=site)
    assert r.returncode == 2 and "--from (2026-01-02) must be before --to (2026-01-01)" \
        in r.stderr
    r = audit("charging", "--from", "yesterday", "--to", "2026-01-01", cwd=site)
    assert r.returncode == 2 and "not an ISO 8601 time" in r.stderr
    r = audit("chargin", *WINDOW, cwd=site)
    assert r.returncode == 2 and "invalid choice: 'chargin'" in r.stderr
    assert "charging" in r.stderr and "registered-at" in r.stderr
    r = audit("sql", "SELECT 1", "--db", "missing.duckdb", cwd=site)
    assert r.returncode == 3 and "no audit database there" in r.stderr
    r = audit("sync", "-c", "nope.yaml", cwd=site)
    assert r.returncode == 2 and "config file not found" in r.stderr
    (site / "siphon.yaml").write_text((site / "siphon.yaml").read_text().replace(
        "var/events.db", "var/other.db"))
    r = audit("sync", "-c", "siphon.yaml", "--db", "audit.duckdb", cwd=site)
    assert r.returncode == 3 and "no event log there" in r.stderr
    for cmd in ("sync", "follow", "sql", "registered-at", "charging", "trunk-uptime",
                "churn", "history"):
        assert audit(cmd, "--help", cwd=site).returncode == 0


def test_locked_database(site: Path) -> None:
    db = synced(site)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
         "print('ready', flush=True); time.sleep(60)", str(db)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        started = time.monotonic()
        r = audit("sql", "SELECT 1", "--wait", "0.5", cwd=site)
        assert r.returncode == 3, r.stderr
        assert f"in use by another process (PID {holder.pid}" in r.stderr
        assert time.monotonic() - started < 30
        r = audit("sync", "-c", "siphon.yaml", "--db", "audit.duckdb", cwd=site)
        assert r.returncode == 3 and "in use by another process" in r.stderr
    finally:
        holder.kill()
        holder.wait()
    assert audit("sql", "SELECT 1", cwd=site).returncode == 0


def test_follow_picks_up_new_records_and_stops_cleanly(site: Path) -> None:
    synced(site)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "siphon.cli", "audit", "follow", "-c",
                             "siphon.yaml", "--db", "audit.duckdb"], cwd=site, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)
        append_raw(site / "var" / "events.db",
                   [b'{"type":"call.ended.v1","ts":1767254500.0,"node":"n1"}'])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # reports can read between follow's writes
            r = audit("sql", "SELECT count(*) FROM events_raw", "--wait", "5", cwd=site)
            if r.returncode == 0 and r.stdout.splitlines()[-1] == "20":
                break
            time.sleep(0.3)
        else:
            pytest.fail(f"follow did not ingest the new record: {r.stderr}")
    finally:
        proc.send_signal(__import__("signal").SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopped" in err and "Traceback" not in err
