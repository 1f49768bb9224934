#!/usr/bin/env python3
"""Audit projection speed: ingesting an embedded log into DuckDB, and charging over it.

Writes N registrar events (default 10,000,000; the rebuild.py mix over ~100k AoRs:
23 % added, 63 % refreshed, 6 % removed, 7 % expired, ~590 B of JSON each) into an
embedded log through ``EmbeddedLog.append`` in 50,000-event batches (or reuses
``--log``), then:

1. ingests it into a new DuckDB file the way ``siphon audit sync`` does
   (``EmbeddedRawSource`` -> ``AuditProjector``, 245,760 records per transaction,
   sessions derived every 2M records) and prints events/s (target >= 300,000/s), the
   CPU it used (all threads) and the load average;
2. times ``charging --per day`` over the whole history (best of 3; target <= 2 s): the
   query with its result held in DuckDB (what ``--format parquet`` writes from), and
   with the rows fetched into Python tuples (what the csv/json/table output does);
3. prints the DuckDB file size per million events;
4. with ``--generic N``, also ingests the first N records through the generic
   ``EventLog.read`` path (decode + re-encode), for comparison.

Example:  python bench/audit.py --events 2000000 --log /tmp/audit-2m.db --keep
          python bench/audit.py --log /tmp/bench-runs/rebuild-1m.db --generic 200000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U  # (puts the repo on sys.path)
import rebuild

INGEST_TARGET = 300_000
CHARGING_TARGET = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--events", type=int, default=10_000_000, help="events to write (10M)")
    p.add_argument("--aors", type=int, default=100_000, help="distinct AoRs (100000)")
    p.add_argument("--log", type=Path, help="embedded log to use (written if missing)")
    p.add_argument("--db", type=Path, help="DuckDB file to write (default: a temp file)")
    p.add_argument("--batch", type=int, default=245_760, help="records per transaction")
    p.add_argument("--generic", type=int, default=0,
                   help="also ingest this many records through EventLog.read (0: skip)")
    p.add_argument("--threads", type=int, default=0,
                   help="DuckDB threads while ingesting (0: DuckDB's default, one per core)")
    p.add_argument("--keep", action="store_true", help="keep the temporary files")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def ingest(log: Path, db: Path, batch: int, generic: int = 0,
                 threads: int = 0) -> dict[str, float]:
    from events.embedded import EmbeddedLog
    from projections.duckdb import (
        AuditProjector,
        EmbeddedRawSource,
        EventLogSource,
        catch_up,
        connect,
        ensure_schema,
    )

    con = connect(db)
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    ensure_schema(con)
    projector = AuditProjector(con)
    if generic:
        source = EventLogSource(EmbeddedLog(log), f"embedded:{log.absolute()}")
        end = {0: generic}
    else:
        source = EmbeddedRawSource(log)
        end = None
    await source.open()
    last = [time.perf_counter()]

    def progress(done: int, total: int) -> None:
        if sys.stdout.isatty() and time.perf_counter() - last[0] > 1:
            last[0] = time.perf_counter()
            print(f"\r  ingested {done:>11,}/{total:,}", end="", flush=True)

    load0 = os.getloadavg()[0]
    c0, t0 = cpu(), time.perf_counter()
    try:
        done = await catch_up(projector, source, batch_size=batch, progress=progress, end=end)
    finally:
        await source.close()
    t1, c1 = time.perf_counter(), cpu()
    counts = projector.counts()
    con.close()  # checkpoints
    t2 = time.perf_counter()
    if sys.stdout.isatty():
        print()
    return {"events": done, "seconds": t1 - t0, "cpu": c1 - c0, "close": t2 - t1,
            "load": (load0 + os.getloadavg()[0]) / 2, **counts}


def charging(db: Path) -> dict[str, object]:
    from projections.duckdb import connect, reports

    con = connect(db, read_only=True)
    try:
        lo, hi = con.execute("SELECT min(started_at), max(effective_end) "
                             "FROM binding_sessions").fetchone()
        sql = reports.charging(reports.to_us(lo), reports.to_us(hi) + 1, "day")
        held, fetched, rows = [], [], 0
        for _ in range(3):
            c0, t0 = cpu(), time.perf_counter()
            con.execute(f"CREATE OR REPLACE TEMP TABLE _report AS {sql}")
            held.append((time.perf_counter() - t0, cpu() - c0))
            t0 = time.perf_counter()
            rows = len(con.execute(sql).fetchall())
            fetched.append(time.perf_counter() - t0)
        return {"held": held, "fetched": fetched, "rows": rows}
    finally:
        con.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="siphon-audit-bench-"))
    log = args.log or tmp / "events.db"
    db = args.db or tmp / "audit.duckdb"
    for f in (db, Path(f"{db}.wal")):
        f.unlink(missing_ok=True)
    try:
        if not log.exists():
            print(f"writing {args.events:,} events to {log} ...")
            w = asyncio.run(rebuild.write_log(log, args.events, args.aors, 50_000, args.seed))
            print(f"  written in {w['gen_s'] + w['append_s']:.0f} s "
                  f"(generate {w['gen_s']:.0f} s, append {w['append_s']:.0f} s), "
                  f"avg payload {w['avg_payload']:.0f} B")
        n = asyncio.run(rebuild.count_events(log))
        print(f"log: {log} ({n:,} events, {U.fmt_bytes(log.stat().st_size)}, "
              f"disk {U.disk_of(log)})")
        r = asyncio.run(ingest(log, db, args.batch, threads=args.threads))
        rate = r["events"] / r["seconds"]
        size = db.stat().st_size
        print(f"ingest: {r['events']:,} events in {r['seconds']:.1f} s = {rate:,.0f} events/s "
              f"(target >= {INGEST_TARGET:,}: {'met' if rate >= INGEST_TARGET else 'MISSED'}); "
              f"CPU {r['cpu']:.1f} s = {r['cpu'] / r['events'] * 1e6:.1f} us/event; "
              f"close (checkpoint) {r['close']:.1f} s; load average ~{r['load']:.1f}; "
              f"peak RSS {U.fmt_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}")
        print(f"  rows: events_raw {r['events_raw']:,}, sessions closed "
              f"{r['binding_sessions_closed']:,}, open {r['binding_open']:,}")
        print(f"duckdb file: {U.fmt_bytes(size)} = {size / r['events'] * 1e6 / 2**20:,.0f} MiB "
              f"per million events")
        ch = charging(db)
        held, fetched = ch["held"], ch["fetched"]
        best = min(t for t, _ in held)
        print(f"charging --per day over everything ({ch['rows']:,} rows): query "
              f"best {best:.3f} s of {', '.join(f'{t:.3f}' for t, _ in held)} (CPU "
              f"{min(c for _, c in held):.2f} s; target <= {CHARGING_TARGET} s: "
              f"{'met' if best <= CHARGING_TARGET else 'MISSED'}); with the rows fetched "
              f"into Python: best {min(fetched):.3f} s")
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
              f"on {os.cpu_count()} CPUs")
        if r["events"] < 10_000_000:
            k = 10_000_000 / r["events"]
            print(f"extrapolated to 10M events: ingest ~{10_000_000 / rate:,.0f} s at the same "
                  f"rate, file ~{U.fmt_bytes(size * k)}, charging ~{best * k:.1f} s "
                  "(linear in sessions)")
        if args.generic:
            gdb = tmp / "generic.duckdb"
            g = asyncio.run(ingest(log, gdb, args.batch, generic=args.generic))
            print(f"generic EventLog.read path: {g['events']:,} events in {g['seconds']:.1f} s "
                  f"= {g['events'] / g['seconds']:,.0f} events/s")
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
