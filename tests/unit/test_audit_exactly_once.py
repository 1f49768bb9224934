"""Exactly once: an ingestion interrupted anywhere (exception, Ctrl-C, SIGKILL of the
process) and run again gives the same database as one clean run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_audit_support import ingest, random_history, snapshot, write_log

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "events.db"
    await write_log(path, random_history(2000, seed=3))
    return path


@pytest.fixture
async def clean(tmp_path: Path, log_path: Path) -> dict:
    db = tmp_path / "clean.duckdb"
    assert await ingest(log_path, db, batch_size=300) == 2000
    return snapshot(db)


class Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
async def test_interrupted_in_a_batch_then_rerun(tmp_path: Path, log_path: Path, clean: dict,
                                                 exc: type[BaseException]) -> None:
    db = tmp_path / "audit.duckdb"
    calls = 0

    def fail() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:  # inside the 3rd batch's transaction, after its raw rows
            raise exc("interrupted")

    with pytest.raises(exc):
        await ingest(log_path, db, batch_size=300, fail=fail)
    partial = snapshot(db)
    assert partial["audit_position"] == [(0, 600)]
    assert len(partial["events_raw"]) == 600  # the 3rd batch left nothing behind
    assert await ingest(log_path, db, batch_size=300) == 1400
    assert snapshot(db) == clean


async def test_interrupted_before_derivation_then_rerun(tmp_path: Path, log_path: Path,
                                                       clean: dict) -> None:
    """Raw batches committed, the derived tables not yet advanced (they are, while
    catching up, every DERIVE_EVERY records): the next run derives what is missing."""
    db = tmp_path / "audit.duckdb"
    calls = 0

    def fail() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise Boom("interrupted")

    with pytest.raises(Boom):
        await ingest(log_path, db, batch_size=300, fail=fail, derive_every=10**9)
    partial = snapshot(db)
    assert partial["audit_position"] == [(0, 600)] and len(partial["events_raw"]) == 600
    assert partial["audit_derived"] == [] and partial["binding_sessions_closed"] == []
    assert await ingest(log_path, db, batch_size=300) == 1400
    assert snapshot(db) == clean


async def test_process_killed_mid_transaction_then_rerun(tmp_path: Path, log_path: Path,
                                                         clean: dict) -> None:
    db, flag = tmp_path / "audit.duckdb", tmp_path / "in-transaction"
    child = textwrap.dedent(f"""
        import asyncio, sys, time
        sys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]
        from test_audit_support import ingest
        calls = 0
        def hang():
            global calls
            calls += 1
            if calls == 4:
                open({str(flag)!r}, "w").close()
                time.sleep(120)
        asyncio.run(ingest(__import__("pathlib").Path({str(log_path)!r}),
                           __import__("pathlib").Path({str(db)!r}), batch_size=300, fail=hang))
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], env={**os.environ})
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.poll() is None, "the ingesting child died early"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    partial = snapshot(db)
    assert partial["audit_position"] == [(0, 900)]
    assert len(partial["events_raw"]) == 900
    assert await ingest(log_path, db, batch_size=500) == 1100
    assert snapshot(db) == clean
