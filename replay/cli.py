"""``siphon replay``: state at a point in time, disaster-recovery copy, verify, snapshot.

Exit codes: 0 done; 1 ``verify`` found problems (or another failure); 2 bad usage
or config; 3 a log cannot be opened, reached or read (damaged record named); 4
the request does not fit the log (time before its first event, offset past its
end, unknown AoR, target holding something else); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from events.log import LogCorruption
from replay import snapshot as snap_mod
from replay import ui
from replay.source import BadInput, ReplayError, Source, open_source
from replay.state import (
    DEFAULT_MAX_SKEW,
    Projection,
    Replayed,
    Step,
    Target,
    aor_history,
    binding_row,
    event_row,
    fmt_time,
    parse_target,
    parse_time,
    rebuild,
    trunk_row,
)
from siphon.config import Config, ConfigError, load_config

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_LOG = 3
EXIT_BAD_INPUT = 4
EXIT_INTERRUPTED = 130

T = TypeVar("T")


class _Usage(Exception):
    """Bad usage found after argument parsing (exit 2)."""


def _say(msg: str) -> None:
    print(f"siphon replay: {msg}", file=sys.stderr)


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise _Usage(str(exc)) from None


def _run(coro: Awaitable[T]) -> T:
    """Run on uvloop when available; Ctrl-C cancels the coroutine (its cleanups run)
    and raises KeyboardInterrupt here."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


@contextlib.contextmanager
def _gc_off() -> Iterator[None]:
    """A replay allocates millions of long-lived objects and no cycles: the cyclic GC
    would only rescan them."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _meter(args: argparse.Namespace, what: str) -> ui.Meter:
    return ui.Meter(what, enabled=not args.json and ui.is_tty(sys.stderr)
                    and not getattr(args, "quiet", False))


def _position_text(position: dict[int, int]) -> str:
    return ",".join(f"{p}:{o}" for p, o in sorted(position.items())) or "-"


def _common(p: argparse.ArgumentParser, config_help: str = "config naming the log") -> None:
    p.add_argument("-c", "--config", default="siphon.yaml", help=config_help)
    p.add_argument("--json", action="store_true", help="JSON output for scripts")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECS",
                   help="Kafka connect/metadata timeout (10)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_parser(sub: Any) -> None:
    """Register ``siphon replay ...`` on the ``siphon`` command's subparsers."""
    replay = sub.add_parser(
        "replay", help="point-in-time state, disaster-recovery copy, verify, snapshot",
        description="Replay the event log: state at a point in time, copy it into another "
                    "log, verify it, write a snapshot. Exit codes: 0 ok, 1 problems found, "
                    "2 usage/config, 3 log unavailable or damaged, 4 request outside the "
                    "log, 130 interrupted.")
    actions = replay.add_subparsers(dest="replay_command", required=True, metavar="ACTION")

    state = actions.add_parser(
        "state", help="registrar and trunk state at a point in time",
        description="Rebuild the registrar and trunk projections as they were at --at: "
                    "events with ts <= T are applied and bindings live at T are shown (an "
                    "offset: up to and including that record). --aor follows one AoR "
                    "through time.")
    _common(state)
    state.add_argument("--at", metavar="WHEN",
                       help="now (default), an ISO time (2026-11-23T10:00:00Z; no zone = "
                            "local), @<unix secs>, an offset (embedded log), or "
                            "partition:offset,... (inclusive)")
    state.add_argument("--aor", help="follow one AoR: each event touching it, with the "
                                     "resulting bindings")
    state.add_argument("--snapshot", metavar="FILE",
                       help="start from this snapshot (default: the config's, when valid)")
    state.add_argument("--no-snapshot", action="store_true", help="replay from the start")
    state.add_argument("--max-skew", type=float, default=DEFAULT_MAX_SKEW, metavar="SECS",
                       help="time targets: records of a partition are in time order give or "
                            f"take this much ({DEFAULT_MAX_SKEW:g})")
    state.set_defaults(func=cmd_state)

    cp = actions.add_parser(
        "copy", help="copy the log into another log (resumable)",
        description="Disaster-recovery copy of the log named by -c into the one named by "
                    "--to (embedded or Kafka, either way), in order per AoR. Rerun the same "
                    "command to resume or catch up: nothing is written twice.")
    _common(cp, "config naming the source log")
    cp.add_argument("--to", required=True, metavar="DST.yaml",
                    help="config naming the target log")
    cp.add_argument("--from", dest="since", metavar="WHEN", help="only events at/after")
    cp.add_argument("--until", metavar="WHEN", help="only events at/before")
    cp.add_argument("--aor", action="append", default=[], metavar="AOR",
                    help="only this AoR's events (repeatable)")
    cp.add_argument("--state-file", metavar="FILE",
                    help="Kafka target: checkpoint file (default: <DST.yaml>.copy.json)")
    cp.set_defaults(func=cmd_copy)

    ver = actions.add_parser(
        "verify", help="check every record, CSeq order and the projection",
        description="Read the whole log: every record must decode; within one Call-ID the "
                    "CSeq of successive events of a binding never decreases; the projection "
                    "must equal a snapshot or a live node. Exit 1 with a report naming the "
                    "offsets otherwise.")
    _common(ver)
    against = ver.add_mutually_exclusive_group()
    against.add_argument("--against-snapshot", metavar="FILE",
                         help="compare with this snapshot (at its position)")
    against.add_argument("--against-node", metavar="URL",
                         help="compare with a running node's admin API (http://host:port)")
    ver.add_argument("--token", help="admin API bearer token (--against-node)")
    ver.set_defaults(func=cmd_verify)

    snap = actions.add_parser(
        "snapshot", help="write a snapshot of the log's projection now",
        description="Rebuild the projection from the log (from the newest valid snapshot) "
                    "and write a snapshot a node boots from (default: the config's "
                    "registrar.snapshot_path).")
    _common(snap)
    snap.add_argument("-o", "--output", metavar="FILE", help="snapshot file to write")
    snap.add_argument("--no-snapshot", action="store_true", help="replay from the start")
    snap.set_defaults(func=cmd_snapshot)


def run_command(args: argparse.Namespace, body: Callable[[], Awaitable[int]],
                on_interrupt: Callable[[], None] | None = None) -> int:
    """Run a command body, turning every expected failure into a message + exit code."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        return _run(body())
    except KeyboardInterrupt:
        if on_interrupt is not None:
            on_interrupt()
        else:
            _say("interrupted")
        return EXIT_INTERRUPTED
    except _Usage as exc:
        _say(str(exc))
        return EXIT_USAGE
    except LogCorruption as exc:
        _say(f"the event log is damaged: {exc}")
        return EXIT_LOG
    except ReplayError as exc:
        _say(str(exc))
        return exc.exit_code


def _target(text: str | None) -> Target:
    try:
        return parse_target(text)
    except ValueError as exc:
        raise _Usage(f"--at: {exc}") from None


# ---------------------------------------------------------------------------- state


def _accepts(target: Target, stop_offsets: dict[int, int] | None,
             max_skew: float) -> Callable[[snap_mod.Snapshot], bool]:
    def accept(snap: snap_mod.Snapshot) -> bool:
        if target.is_now:
            return True
        if target.offsets is not None:
            return all(off <= target.offsets.get(p, -1) + 1 for p, off in snap.position.items())
        assert target.time is not None
        if snap.last_ts is not None:
            return snap.last_ts <= target.time
        newest = max((a.ts for a in snap.anchors), default=None)
        return newest is None or newest + max_skew <= target.time
    return accept


async def _start_from_snapshot(args: argparse.Namespace, cfg: Config, source: Source,
                               target: Target) -> tuple[Projection | None, str | None]:
    if args.no_snapshot:
        return None, None
    path = Path(args.snapshot) if args.snapshot else snap_mod.snapshot_path(cfg)
    if args.snapshot and not path.exists():
        raise _Usage(f"--snapshot {path}: no such file")
    end = await source.end_position()
    found = await snap_mod.load_valid(
        path, identity=source.identity, partitions=source.partitions, end=end,
        read=source.read, warn=lambda m: _say(m) if not args.json else None,
        accept=_accepts(target, target.offsets, getattr(args, "max_skew", DEFAULT_MAX_SKEW)))
    if found is None:
        return None, None
    snap, where = found
    proj = Projection(*snap_mod.to_states(snap))
    proj.last_ts = snap.last_ts if snap.last_ts is not None else max(
        (a.ts for a in snap.anchors), default=None)
    return proj, str(where)


def cmd_state(args: argparse.Namespace) -> int:
    return run_command(args, lambda: _state(args))


async def _state(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    target = _target(args.at)
    source = open_source(cfg, connect_timeout=args.timeout)
    async with source:
        if target.offsets is not None and source.partitions > 1:
            missing = sorted(set(range(source.partitions)) - set(target.offsets))
            if missing and not (target.text.isascii() and target.text.isdigit()):
                _say(f"--at names no offset for partitions {missing}: none of their "
                     "records are applied")
        if args.aor:
            t0 = time.monotonic()
            steps, out = await aor_history(source, _aor(args.aor), target)
            _print_history(args, _aor(args.aor), steps, out, time.monotonic() - t0)
            return EXIT_OK
        start, snap_name = await _start_from_snapshot(args, cfg, source, target)
        meter = _meter(args, "replaying")
        with meter.shown(), _gc_off():
            out = await rebuild(
                source, target, start=start,
                start_position=None if start is None else dict(start.registrar.position),
                snapshot_name=snap_name, progress=meter.advance, on_total=meter.set_total,
                max_skew=args.max_skew)
        _print_state(args, target, out, meter)
    return EXIT_OK


def _aor(text: str) -> str:
    text = text.strip()
    return text if ":" in text.split("@", 1)[0] else f"sip:{text}"


def _summary(target: Target, out: Replayed, meter: ui.Meter) -> dict[str, Any]:
    return {"kind": "summary", "target": target.text, "at": fmt_time(out.at), "at_ts": out.at,
            "position": {str(p): o for p, o in sorted(out.position.items())},
            "events_applied": out.applied, "records_read": out.read,
            "snapshot": out.snapshot, "aors": len(out.registrar.aors),
            "bindings_live": len(out.live_bindings()), "trunks_live": len(out.live_trunks()),
            "first_event": fmt_time(out.first_ts), "last_event": fmt_time(out.last_ts),
            "elapsed_s": round(meter.elapsed(), 3),
            "events_per_s": round(out.read / max(meter.elapsed(), 1e-9))}


def _print_state(args: argparse.Namespace, target: Target, out: Replayed,
                 meter: ui.Meter) -> None:
    bindings = out.live_bindings()
    trunks = out.live_trunks()
    summary = _summary(target, out, meter)
    if args.json:
        for aor, b in bindings:
            ui.json_line({"kind": "binding", **binding_row(aor, b, out.at)})
        for tid, entry in trunks:
            ui.json_line({"kind": "trunk", **trunk_row(tid, entry, out.at)})
        ui.json_line(summary)
        return
    caption = (f"{summary['bindings_live']} bindings of {summary['aors']} AoRs, "
               f"{summary['trunks_live']} trunks; {out.read:,} records read"
               + (f" after snapshot {out.snapshot}" if out.snapshot else "")
               + f" in {meter.elapsed():.2f}s ({summary['events_per_s']:,}/s); "
               f"position {_position_text(out.position)}")
    ui.table(f"Registrations at {fmt_time(out.at)}",
             ["AoR", "Contact", "Expires", "q", "Transport", "Source", "Call-ID", "CSeq",
              "User-Agent"],
             [(aor, b.uri, f"{fmt_time(b.expires_at)} ({max(0, int(b.expires_at - out.at))}s)",
               b.q, b.transport, b.source, b.call_id, b.cseq, b.user_agent)
              for aor, b in bindings], caption=caption)
    if trunks:
        ui.table(f"Trunks at {fmt_time(out.at)}",
                 ["Id", "SIP URI", "Transport", "Enabled", "Lease until"],
                 [(tid, e.trunk.sip_uri, e.trunk.transport, e.trunk.enabled,
                   fmt_time(e.lease_expires_at)) for tid, e in trunks])


def _print_history(args: argparse.Namespace, aor: str, steps: list[Step], out: Replayed,
                   elapsed: float) -> None:
    if args.json:
        for step in steps:
            ui.json_line({"kind": "event", **event_row(step.record), "change": step.change,
                          "bindings": [binding_row(aor, b, step.record.event.ts)
                                       for b in step.bindings]})
        ui.json_line({"kind": "state", "aor": aor, "at": fmt_time(out.at), "at_ts": out.at,
                      "events": len(steps), "elapsed_s": round(elapsed, 3),
                      "bindings": [binding_row(aor, b, out.at)
                                   for b in out.live_bindings_of(aor)]})
        return
    rows = []
    for step in steps:
        row = event_row(step.record)
        rows.append((row["time"], f"{row['partition']}:{row['offset']}", row["type"],
                     step.change or "(no change)", row.get("key", ""), row.get("call_id", ""),
                     row.get("cseq", ""), "; ".join(b.uri for b in step.bindings) or "-"))
    ui.table(f"History of {aor}",
             ["Time", "Offset", "Event", "Change", "Binding key", "Call-ID", "CSeq",
              "Bindings after"], rows,
             caption=f"{len(steps)} events in {elapsed:.2f}s")
    live = out.live_bindings_of(aor)
    ui.table(f"{aor} at {fmt_time(out.at)}", ["Contact", "Expires", "Call-ID", "CSeq"],
             [(b.uri, fmt_time(b.expires_at), b.call_id, b.cseq) for b in live])


# ----------------------------------------------------------------------------- copy


def cmd_copy(args: argparse.Namespace) -> int:
    from replay.copy import CopyResult

    result = CopyResult()

    def interrupted() -> None:
        saved = _position_text(result.position)
        if args.json:
            ui.json_line({"kind": "interrupted", **result.as_dict()})
        _say(f"interrupted: {result.copied:,} records copied this run "
             f"({result.total_copied:,} in all); progress saved at source position {saved}; "
             "run the same command again to resume")

    return run_command(args, lambda: _copy(args, result), on_interrupt=interrupted)


async def _copy(args: argparse.Namespace, result: Any) -> int:
    from replay.copy import Filter, copy, open_target, source_id

    cfg = _load(args.config)
    dst = _load(args.to)
    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError as exc:
        raise _Usage(f"--from/--until: {exc}") from None
    if since is not None and until is not None and since > until:
        raise _Usage("--from is after --until")
    if source_id(cfg) == source_id(dst):
        raise BadInput("the source and the target are the same log")
    filt = Filter(since, until, frozenset(_aor(a) for a in args.aor) if args.aor else None)
    source = open_source(cfg, connect_timeout=args.timeout)
    target = open_target(dst, args.to, connect_timeout=args.timeout, state_file=args.state_file)
    async with source:
        await target.open()
        try:
            meter = _meter(args, "copying")
            with meter.shown():
                try:
                    await copy(source, source_id(cfg), target, filt, result=result,
                               progress=meter.advance, on_total=meter.set_total)
                except ReplayError as exc:
                    if result.copied or result.resumed_from is not None:
                        exc.args = (f"{exc}; {result.copied:,} records copied this run, "
                                    "progress saved at source position "
                                    f"{_position_text(result.position)}: rerun to resume",)
                    raise
        finally:
            await target.close()
    if args.json:
        ui.json_line({"kind": "copy", **result.as_dict(), "elapsed_s": round(meter.elapsed(), 3)})
    else:
        how = (f"resumed from {_position_text(result.resumed_from)}; "
               if result.resumed_from is not None else "")
        print(f"copied {result.copied:,} records ({how}{result.read:,} read, "
              f"{result.skipped_present:,} already in the target) from {result.source} "
              f"to {result.target} in {meter.elapsed():.2f}s; source position "
              f"{_position_text(result.position)}")
    return EXIT_OK


# --------------------------------------------------------------------------- verify


def cmd_verify(args: argparse.Namespace) -> int:
    return run_command(args, lambda: _verify(args))


async def _verify(args: argparse.Namespace) -> int:
    from replay.verify import verify

    cfg = _load(args.config)
    source = open_source(cfg, connect_timeout=args.timeout)
    async with source:
        meter = _meter(args, "verifying")
        with meter.shown(), _gc_off():
            report = await verify(source, snapshot_file=args.against_snapshot,
                                  node_url=args.against_node, node_token=args.token,
                                  progress=meter.advance, on_total=meter.set_total)
    if args.json:
        ui.json_line({**report.as_dict(), "elapsed_s": round(meter.elapsed(), 3)})
    else:
        compared = (f"; projection compared with {report.compared_with} at position "
                    f"{_position_text(report.compared_at or {})}"
                    if report.compared_with else "")
        print(f"{report.log}: {report.records:,} records read in {meter.elapsed():.2f}s, "
              f"{report.aors:,} AoRs, {report.bindings:,} bindings, {report.trunks} trunks"
              f"{compared}")
        for note in report.notes:
            print(f"note: {note}")
        if report.ok:
            print("OK: every record decodes, CSeq order holds"
                  + (", the projection matches" if report.compared_with else ""))
        else:
            counts = ", ".join(f"{n} {kind}" for kind, n in sorted(report.counts.items()))
            print(f"FAILED: {counts}")
            for p in report.problems:
                where = (f"partition {p.partition} offset {p.offset}"
                         if p.offset is not None else "-")
                print(f"  [{p.kind}] {where}: {p.message}")
            listed = len(report.problems)
            total = sum(report.counts.values())
            if listed < total:
                print(f"  ... and {total - listed} more")
    return EXIT_OK if report.ok else EXIT_FAILED


# ------------------------------------------------------------------------- snapshot


def cmd_snapshot(args: argparse.Namespace) -> int:
    return run_command(args, lambda: _snapshot(args))


async def _snapshot(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    path = Path(args.output) if args.output else snap_mod.snapshot_path(cfg)
    source = open_source(cfg, connect_timeout=args.timeout)
    target = Target()
    async with source:
        args.snapshot = None
        start, snap_name = await _start_from_snapshot(args, cfg, source, target)
        meter = _meter(args, "replaying")
        with meter.shown(), _gc_off():
            out = await rebuild(
                source, target, start=start,
                start_position=None if start is None else dict(start.registrar.position),
                snapshot_name=snap_name, progress=meter.advance, on_total=meter.set_total)
        snap = snap_mod.capture(out.registrar, out.trunks, identity=source.identity,
                                partitions=source.partitions, node="siphon-replay",
                                last_ts=out.last_ts)
        snap.anchors = await snap_mod.anchors_at(source.read, snap.position)
        size = await asyncio.to_thread(snap_mod.write, path, snap)
    info = {"kind": "snapshot", "path": str(path), "bytes": size,
            "position": {str(p): o for p, o in sorted(snap.position.items())},
            "aors": len(snap.aors), "bindings": snap.bindings, "trunks": len(snap.trunks),
            "records_read": out.read, "from_snapshot": snap_name,
            "elapsed_s": round(meter.elapsed(), 3)}
    if args.json:
        ui.json_line(info)
    else:
        print(f"snapshot written to {path}: {size:,} bytes, position "
              f"{_position_text(snap.position)}, {len(snap.aors):,} AoRs, {snap.bindings:,} "
              f"bindings, {len(snap.trunks)} trunks ({out.read:,} records read"
              + (f" after {snap_name}" if snap_name else "") + f", {meter.elapsed():.2f}s)")
    return EXIT_OK
