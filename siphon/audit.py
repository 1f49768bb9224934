"""``siphon audit``: the DuckDB audit/charging projection of the event log.

``sync`` catches the audit database up with the log named by a config, ``follow``
keeps doing so; ``sql`` and the named reports read it (read only: they never change
a table). Exit codes: 0 fine, 1 a query failed, 2 bad usage or config,
3 the database or log cannot be used (missing, locked, damaged).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

EXIT_QUERY = 1
EXIT_USAGE = 2
EXIT_UNUSABLE = 3

DEFAULT_DB = "audit.duckdb"
REPORTS = ("registered-at", "charging", "trunk-uptime", "churn", "history")


class _Fail(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _err(message: str) -> None:
    print(f"siphon audit: {message}", file=sys.stderr)


# ------------------------------------------------------------------------- parser


def add_parser(sub: Any) -> None:
    """Register ``siphon audit`` on the ``siphon`` command's subparsers."""
    audit = sub.add_parser(
        "audit", help="audit and charging: a DuckDB projection of the event log",
        description="Project the event log into a DuckDB database (raw events, binding "
                    "sessions, trunk leases) and ask it questions.")
    cmds = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")

    def db_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db", default=os.environ.get("SIPHON_AUDIT_DB", DEFAULT_DB),
                       help="audit database file (default: $SIPHON_AUDIT_DB or audit.duckdb)")

    def out_args(p: argparse.ArgumentParser, plot: bool = False) -> None:
        p.add_argument("--format", choices=("table", "csv", "json", "parquet"),
                       help="output format (default: table on a terminal, csv otherwise)")
        p.add_argument("--output", "-o", help="write to this file (required for parquet)")
        p.add_argument("--wait", type=float, default=10.0,
                       help="seconds to wait while another process writes the database "
                            "(default 10)")
        if plot:
            p.add_argument("--plot", metavar="PNG", help="also draw the time series to PNG")

    sync = cmds.add_parser("sync", help="catch up with the log",
                           description="Ingest every record appended since the last sync.")
    sync.add_argument("-c", "--config", default="siphon.yaml", help="config file (siphon.yaml)")
    db_arg(sync)
    sync.add_argument("--batch", type=int, default=245_760,
                      help="records per transaction (default 245760: two DuckDB row "
                           "groups, which are then written once, compressed)")
    sync.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    sync.set_defaults(audit_func=cmd_sync)

    follow = cmds.add_parser("follow", help="keep ingesting as the log grows (Ctrl-C stops)",
                             description="Catch up, then ingest new records as they come. "
                                         "The database is held only while writing.")
    follow.add_argument("-c", "--config", default="siphon.yaml", help="config file")
    db_arg(follow)
    follow.add_argument("--batch", type=int, default=245_760,
                        help="most records per transaction (default 245760)")
    follow.set_defaults(audit_func=cmd_follow)

    sql = cmds.add_parser("sql", help="run a read-only SQL query",
                          description="Run SQL on the audit database (opened read only). "
                                      "Tables: events_raw, binding_sessions_closed, "
                                      "binding_open, audit_aors, trunk_leases_closed, "
                                      "trunk_open; views: "
                                      "events, binding_sessions, trunk_leases, event_log, "
                                      "unknown_events, event_counts, active_bindings, "
                                      "lapsed_bindings, churn_hourly, aor_totals.")
    sql.add_argument("query", help="the SQL text")
    db_arg(sql)
    out_args(sql)
    sql.set_defaults(audit_func=cmd_sql)

    reg = cmds.add_parser("registered-at", help="who was registered where at a moment",
                          description="Bindings live at --at, as the registrar saw them.")
    reg.add_argument("--at", required=True, help="ISO 8601 time (naive = UTC) or Unix seconds")
    reg.add_argument("--aor", help="only this AoR")
    db_arg(reg)
    out_args(reg)
    reg.set_defaults(audit_func=cmd_report, report="registered-at")

    chg = cmds.add_parser("charging", help="registered seconds per AoR in a window",
                          description="Registered time per AoR in [--from, --to), sessions "
                                      "clipped to the window (and to each bucket with --per).")
    chg.add_argument("--from", dest="from_", required=True, help="window start (ISO/Unix)")
    chg.add_argument("--to", required=True, help="window end (ISO/Unix), exclusive")
    chg.add_argument("--per", choices=("day", "hour"), help="one row per AoR and UTC day/hour")
    chg.add_argument("--aor", help="only this AoR")
    db_arg(chg)
    out_args(chg, plot=True)
    chg.set_defaults(audit_func=cmd_report, report="charging")

    trunk = cmds.add_parser("trunk-uptime", help="trunk up time in a window",
                            description="Per trunk: time up, share of [--from, --to), up "
                                        "intervals and heartbeats.")
    trunk.add_argument("--from", dest="from_", required=True, help="window start (ISO/Unix)")
    trunk.add_argument("--to", required=True, help="window end (ISO/Unix), exclusive")
    db_arg(trunk)
    out_args(trunk)
    trunk.set_defaults(audit_func=cmd_report, report="trunk-uptime")

    churn = cmds.add_parser("churn", help="registrations, refreshes, expiries per interval",
                            description="Binding events per UTC hour or day.")
    churn.add_argument("--from", dest="from_", help="start (ISO/Unix; default: the first)")
    churn.add_argument("--to", help="end, exclusive (ISO/Unix; default: the last)")
    churn.add_argument("--per", choices=("hour", "day"), default="hour", help="bucket (hour)")
    db_arg(churn)
    out_args(churn, plot=True)
    churn.set_defaults(audit_func=cmd_report, report="churn")

    hist = cmds.add_parser("history", help="every record of one AoR",
                           description="The log's records of one AoR, in order.")
    hist.add_argument("--aor", required=True, help="the AoR, e.g. sip:alice@example.com")
    db_arg(hist)
    out_args(hist)
    hist.set_defaults(audit_func=cmd_report, report="history")

    audit.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``siphon audit ...`` (set as the parser's ``func``)."""
    try:
        return int(args.audit_func(args))
    except _Fail as exc:
        _err(str(exc))
        return exc.code
    except BrokenPipeError:  # e.g. `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


# ------------------------------------------------------------------------- ingesting


def _source(config_path: str) -> Any:
    from events.log import LogError
    from projections.duckdb import EmbeddedRawSource, EventLogSource
    from siphon.config import ConfigError, load_config

    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        raise _Fail(str(exc), EXIT_USAGE) from None
    reg = cfg.registrar
    if reg.backend == "embedded":
        return EmbeddedRawSource(reg.path)
    try:
        from events.kafka import KafkaLog
    except ImportError as exc:  # pragma: no cover - aiokafka is a dependency
        raise _Fail(f"kafka backend unavailable: {exc}", EXIT_UNUSABLE) from None
    if reg.kafka is None:
        raise _Fail(f"{config_path}: registrar.kafka is required for backend kafka",
                    EXIT_USAGE)
    kafka = reg.kafka
    identity = f"kafka:{','.join(kafka.bootstrap_servers)}/{kafka.topic}"
    try:
        return EventLogSource(KafkaLog(kafka, cfg.server.instance_id), identity)
    except LogError as exc:
        raise _Fail(str(exc), EXIT_UNUSABLE) from None


def _open_rw(db: str) -> Any:
    from projections.duckdb import AuditError, connect, ensure_schema

    try:
        con = connect(db, wait=0.0)
    except AuditError as exc:
        raise _Fail(str(exc), EXIT_UNUSABLE) from None
    try:
        ensure_schema(con)
    except AuditError as exc:
        con.close()
        raise _Fail(str(exc), EXIT_UNUSABLE) from None
    return con


class _Progress:
    """A rich progress bar on a terminal; a line every few seconds otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self.last = 0.0
        self.last_done = -1
        self.bar: Any = None
        self.task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.tty:
            if self.bar is None:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                )

                self.bar = Progress(TextColumn("ingesting"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                    transient=False)
                self.bar.start()
                self.task = self.bar.add_task("ingest", total=total, rate="")
            self.bar.update(self.task, completed=done, total=total, rate=self._rate(done))
            return
        now = time.monotonic()
        if done == self.last_done:
            return
        if done in (0, total) or now - self.last >= 5.0:
            self.last, self.last_done = now, done
            pct = 100.0 * done / total if total else 100.0
            print(f"siphon audit: ingested {done:,}/{total:,} records ({pct:.1f} %, "
                  f"{self._rate(done)})", file=sys.stderr, flush=True)

    def _rate(self, done: int) -> str:
        elapsed = time.monotonic() - self.start
        return f"{done / elapsed:,.0f} records/s" if elapsed > 0 and done else ""

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _log_errors() -> tuple[type[BaseException], ...]:
    from events.log import LogError
    from projections.duckdb import AuditError

    return (LogError, AuditError)


def cmd_sync(args: argparse.Namespace) -> int:
    from projections.duckdb import AuditProjector, catch_up

    source = _source(args.config)
    con = _open_rw(args.db)
    progress = _Progress(args.quiet)
    projector = AuditProjector(con)
    before = projector.position()

    async def go() -> int:
        await source.open()
        try:
            return await catch_up(projector, source, batch_size=args.batch, progress=progress)
        finally:
            await source.close()

    started = time.monotonic()
    try:
        done = asyncio.run(go())
    except _log_errors() as exc:
        raise _Fail(str(exc), EXIT_UNUSABLE) from None
    except KeyboardInterrupt:
        progress.close()
        _err(f"interrupted; the database holds everything up to log position "
             f"{projector.position()} (sync again to continue)")
        return 130
    finally:
        progress.close()
        pos = projector.position()
        unknown = _unknown_since(con, before)
        con.close()
    for typ, error, count in unknown:
        _err(f"warning: {count:,} record(s) not understood ({error}: {typ or 'no type'}); "
             "kept in events_raw, see the unknown_events view")
    if not args.quiet:
        elapsed = time.monotonic() - started
        rate = f", {done / elapsed:,.0f} records/s" if done and elapsed > 0 else ""
        print(f"synced {done:,} records in {elapsed:.1f} s{rate}; log position {pos}",
              file=sys.stderr)
    return 0


def _unknown_since(con: Any, before: dict[int, int]) -> list[tuple[Any, ...]]:
    """Records not understood among those ingested after position ``before``."""
    cond = " AND ".join(f"NOT (log_partition = {int(p)} AND log_offset < {int(o)})"
                        for p, o in before.items()) or "true"
    return con.execute(f"SELECT type, error, count(*) FROM events_raw WHERE NOT known AND "
                       f"{cond} GROUP BY ALL ORDER BY 3 DESC").fetchall()


def cmd_follow(args: argparse.Namespace) -> int:
    from projections.duckdb import follow

    source = _source(args.config)
    _open_rw(args.db).close()  # create/check the schema now, and fail fast if locked
    total = 0

    def on_batch(n: int, end: dict[int, int]) -> None:
        nonlocal total
        total += n
        print(f"siphon audit: +{n:,} records (total {total:,}), log position {end}",
              file=sys.stderr, flush=True)

    async def go() -> None:
        await source.open()
        try:
            await follow(args.db, source, batch_size=args.batch, on_batch=on_batch)
        finally:
            await source.close()

    try:
        asyncio.run(go())
    except _log_errors() as exc:
        raise _Fail(str(exc), EXIT_UNUSABLE) from None
    except KeyboardInterrupt:
        print(f"siphon audit: stopped; {total:,} records ingested", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------- reading


def _open_ro(args: argparse.Namespace) -> Any:
    from projections.duckdb import AuditError, connect

    try:
        return connect(args.db, read_only=True, wait=args.wait)
    except AuditError as exc:
        raise _Fail(str(exc), EXIT_UNUSABLE) from None


def _times(args: argparse.Namespace, required: bool = True) -> tuple[int | None, int | None]:
    from projections.duckdb.reports import parse_time, to_us

    out: list[int | None] = []
    for name, text in (("--from", args.from_), ("--to", args.to)):
        if text is None:
            out.append(None)
            continue
        try:
            out.append(to_us(parse_time(text)))
        except ValueError as exc:
            raise _Fail(f"{name}: {exc}", EXIT_USAGE) from None
    frm, to = out
    if frm is not None and to is not None and frm >= to:
        raise _Fail(f"--from ({args.from_}) must be before --to ({args.to})", EXIT_USAGE)
    return frm, to


def _report_sql(args: argparse.Namespace) -> str:
    from projections.duckdb import reports

    name = args.report
    if name == "registered-at":
        try:
            at = reports.to_us(reports.parse_time(args.at))
        except ValueError as exc:
            raise _Fail(f"--at: {exc}", EXIT_USAGE) from None
        return reports.registered_at(at, args.aor)
    if name == "history":
        return reports.history(args.aor)
    if name == "churn":
        frm, to = _times(args, required=False)
        return reports.churn(frm, to, args.per)
    frm, to = _times(args)
    assert frm is not None and to is not None
    if name == "charging":
        return reports.charging(frm, to, args.per, args.aor)
    if name == "trunk-uptime":
        return reports.trunk_uptime(frm, to)
    raise _Fail(f"unknown report {name!r} (reports: {', '.join(REPORTS)})", EXIT_USAGE)


def cmd_report(args: argparse.Namespace) -> int:
    sql = _report_sql(args)
    if getattr(args, "plot", None) and args.report == "charging" and args.per is None:
        raise _Fail("--plot needs --per day|hour for charging (a time series)", EXIT_USAGE)
    return _run_query(args, sql)


def cmd_sql(args: argparse.Namespace) -> int:
    return _run_query(args, args.query)


def _run_query(args: argparse.Namespace, sql: str) -> int:
    import duckdb

    fmt = args.format or ("table" if sys.stdout.isatty() and not args.output else "csv")
    if fmt == "parquet" and not args.output:
        raise _Fail("--format parquet needs --output FILE", EXIT_USAGE)
    con = _open_ro(args)
    try:
        if fmt == "parquet":
            out = Path(args.output)
            try:
                con.execute(f"COPY ({sql.strip().rstrip(';')}) TO "
                            f"'{str(out).replace(chr(39), chr(39) * 2)}' (FORMAT parquet)")
            except duckdb.Error as exc:
                raise _Fail(str(exc), EXIT_QUERY) from None
            rows_n = con.execute(f"SELECT count(*) FROM read_parquet("
                                 f"'{str(out).replace(chr(39), chr(39) * 2)}')").fetchone()
            print(f"wrote {rows_n[0] if rows_n else 0:,} rows to {out}", file=sys.stderr)
            columns: list[str] = []
            rows: list[tuple[Any, ...]] = []
            if getattr(args, "plot", None):
                cur = con.execute(sql)
                columns = [d[0] for d in cur.description or []]
                rows = cur.fetchall()
        else:
            try:
                cur = con.execute(sql)
                columns = [d[0] for d in cur.description or []]
                rows = cur.fetchall() if cur.description else []
            except duckdb.Error as exc:
                raise _Fail(str(exc), EXIT_QUERY) from None
    finally:
        con.close()
    if fmt != "parquet":
        _write(fmt, columns, rows, args.output)
    if getattr(args, "plot", None):
        plot(args.report, columns, rows, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------- output


def _cell(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat(sep=" ") if isinstance(value, datetime) else value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _write(fmt: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]],
           output: str | None) -> None:
    stream = open(output, "w", newline="", encoding="utf-8") if output else sys.stdout
    try:
        if fmt == "csv":
            writer = csv.writer(stream)
            writer.writerow(columns)
            for row in rows:
                writer.writerow(["" if v is None else _cell(v) for v in row])
        elif fmt == "json":
            json.dump([{c: _cell(v) for c, v in zip(columns, row, strict=True)}
                       for row in rows], stream, indent=1, default=str)
            stream.write("\n")
        else:
            from rich.console import Console
            from rich.table import Table

            table = Table(show_lines=False, header_style="bold")
            for col in columns:
                table.add_column(col, overflow="fold")
            for row in rows:
                table.add_row(*("" if v is None else str(_cell(v)) for v in row))
            Console(file=stream, width=None if stream.isatty() else 200).print(table)
            print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})", file=sys.stderr)
    finally:
        if output:
            stream.close()


def plot(report: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]],
         path: str) -> None:
    """Draw a time-series report (churn; charging per day/hour) to a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    if report == "churn":
        when = [r[0] for r in rows]
        for i, label in enumerate(columns[1:], start=1):
            ax.plot(when, [r[i] for r in rows], marker="o", markersize=3, label=label)
        ax.set_ylabel(f"events per {columns[0]}")
        ax.set_title("Registration churn")
        ax.legend()
    elif report == "charging":
        per = columns[1]
        totals: dict[Any, float] = {}
        aors: dict[Any, set[Any]] = {}
        for row in rows:
            totals[row[1]] = totals.get(row[1], 0.0) + float(row[2])
            aors.setdefault(row[1], set()).add(row[0])
        when = sorted(totals)
        width = 0.8 if per == "day" else 0.8 / 24
        ax.bar(when, [totals[w] / 3600 for w in when], width=width, align="edge",
               color="#3b75af", label="registered hours (all AoRs)")
        ax.set_ylabel("registered hours")
        ax.set_ylim(0, max([totals[w] / 3600 for w in when], default=1) * 1.3 or 1)
        ax2 = ax.twinx()
        ax2.plot([w + (_half(per)) for w in when], [len(aors[w]) for w in when],
                 color="#d1603d", marker="o", label="AoRs registered")
        ax2.set_ylabel("AoRs with a binding")
        ax2.set_ylim(0, max([len(aors[w]) for w in when], default=1) * 1.3)
        ax.set_title(f"Registered time per {per}")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper left")
    else:
        raise _Fail(f"--plot is for churn and charging, not {report}", EXIT_USAGE)
    ax.set_xlabel("UTC")
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d %H:%M"))
    fig.autofmt_xdate()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _half(per: str) -> Any:
    from datetime import timedelta

    return timedelta(hours=12) if per == "day" else timedelta(minutes=30)



