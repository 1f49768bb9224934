#!/usr/bin/env python3
"""Projection rebuild speed: replaying the embedded event log into RegistrarState.

Writes N registrar events (default 1,000,000: a BindingAdded / BindingRefreshed /
BindingRemoved / BindingExpired mix over ~100k AoRs, with realistic field
sizes: instance ids, Call-IDs, user agents, sources...) into an embedded log
through ``events.embedded.EmbeddedLog.append`` in big batches, then, in a fresh
Python process, times ``await ProjectionRunner(log).rebuild()`` (the log is opened
first; its open time, which includes SQLite's quick_check, is shown apart).
Prints events/s; the target is >= 200,000 events/s.

--breakdown also times, in the fresh process, the stages a rebuild is made of,
done back to back without asyncio or threads: reading the rows from SQLite,
crc32, msgspec decoding, and applying to the projection. --profile runs the
rebuild under cProfile and prints the top functions.

Example:  python bench/rebuild.py
          python bench/rebuild.py --events 200000 --breakdown --profile
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U

TARGET = 200_000


# Slim views of the stored events for the --whatif decode prototype (bench-only).


class SlimBinding(msgspec.Struct):
    key: str
    expires_at: float


class SlimAdded(msgspec.Struct, tag="binding.added.v1", tag_field="type"):
    aor: str
    binding: SlimBinding


class SlimRefreshed(msgspec.Struct, tag="binding.refreshed.v1", tag_field="type"):
    aor: str
    binding: SlimBinding


class SlimRemoved(msgspec.Struct, tag="binding.removed.v1", tag_field="type"):
    aor: str
    key: str


class SlimExpired(msgspec.Struct, tag="binding.expired.v1", tag_field="type"):
    aor: str
    key: str
    expires_at: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = U.arg_parser(__doc__)
    p.add_argument("--events", type=int, default=1_000_000, help="events to write (1000000)")
    p.add_argument("--aors", type=int, default=100_000, help="distinct AoRs (100000)")
    p.add_argument("--batch", type=int, default=50_000,
                   help="events per EmbeddedLog.append call while writing (50000)")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed rebuilds, each in a fresh process (3; the best is the figure)")
    p.add_argument("--log", type=Path,
                   help="log file to (re)use: written only when it does not hold --events "
                        "events yet (default: a new one in a temp dir, removed at the end)")
    p.add_argument("--breakdown", action="store_true",
                   help="time the stages (SQLite read, crc, decode, apply) separately")
    p.add_argument("--whatif", action="store_true",
                   help="with --breakdown: also time prototypes of suggested changes "
                        "(msgpack payloads; a type-dispatched apply loop)")
    p.add_argument("--profile", action="store_true", help="also run one rebuild under cProfile")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--child", choices=("rebuild", "rebuild-nogc", "profile", "breakdown"),
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- events


def generate(n: int, aors: int, seed: int):
    """Yield ``n`` events simulating ~100k users' phones registering over a day
    (_util.registrar_events: each consistent with the state built so far, so applying
    them does real work). Returns (via StopIteration.value) the counts per type."""
    counts = {"BindingAdded": 0, "BindingRefreshed": 0, "BindingRemoved": 0,
              "BindingExpired": 0}
    for ev in U.registrar_events(n, aors, seed, start=time.time() - 86_400.0):
        counts[type(ev).__name__] += 1
        yield ev
    return counts


async def write_log(path: Path, n: int, aors: int, batch: int, seed: int) -> dict[str, object]:
    from events.codec import encode
    from events.embedded import EmbeddedLog

    log = EmbeddedLog(path, group_commit_max=max(batch, 2000))
    await log.open()
    gen = generate(n, aors, seed)
    counts: dict[str, int] = {}
    written = payload_bytes = 0
    gen_s = append_s = 0.0
    try:
        while True:
            t0 = time.perf_counter()
            chunk = []
            try:
                for _ in range(batch):
                    chunk.append(next(gen))
            except StopIteration as stop:
                counts = stop.value
            t1 = time.perf_counter()
            if chunk:
                payload_bytes += sum(len(encode(e)) for e in chunk[:1000]) * len(chunk) // min(
                    1000, len(chunk))
                await log.append(chunk)
                written += len(chunk)
            t2 = time.perf_counter()
            gen_s += t1 - t0
            append_s += t2 - t1
            if sys.stdout.isatty():
                print(f"\r  written {written:>9,} events", end="", flush=True)
            if len(chunk) < batch:
                break
    finally:
        await log.close()
    if sys.stdout.isatty():
        print()
    return {"written": written, "counts": counts, "gen_s": gen_s, "append_s": append_s,
            "avg_payload": payload_bytes / max(1, written)}


async def count_events(path: Path) -> int:
    from events.embedded import EmbeddedLog

    log = EmbeddedLog(path)
    await log.open()
    try:
        return (await log.end_position()).get(0, 0)
    finally:
        await log.close()


# ---------------------------------------------------------------------------- child


async def child_rebuild(path: Path, nogc: bool = False) -> dict[str, float]:
    """In a fresh process: open the log, rebuild, report (with the time the cyclic GC
    took during the rebuild, measured through gc.callbacks)."""
    import gc

    gc_time = [0.0, 0]
    started: list[float] = []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            gc_time[0] += time.perf_counter() - started.pop()
            gc_time[1] += 1

    t0 = time.perf_counter()
    from events.embedded import EmbeddedLog
    from projections.runner import ProjectionRunner

    t1 = time.perf_counter()
    log = EmbeddedLog(path)
    await log.open()
    t2 = time.perf_counter()
    runner = ProjectionRunner(log)
    gc.callbacks.append(on_gc)
    if nogc:
        gc.disable()
    import resource

    def children_cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime

    cpu0, kids0, main0 = time.process_time(), children_cpu(), time.thread_time()
    count = await runner.rebuild()
    t3 = time.perf_counter()
    cpu = time.process_time() - cpu0
    main_cpu = time.thread_time() - main0
    kids = children_cpu() - kids0
    gc.callbacks.remove(on_gc)
    await log.close()
    return {"import_s": t1 - t0, "open_s": t2 - t1, "rebuild_s": t3 - t2, "events": count,
            "aors": len(runner.state.aors), "bindings": runner.state.binding_count(),
            "rss": U.rss(), "gc_s": gc_time[0], "gc_runs": gc_time[1], "cpu_s": cpu,
            "main_cpu_s": main_cpu, "reader_cpu_s": kids,
            "load": os.getloadavg()[0]}


def child_breakdown(path: Path, whatif: bool = False) -> dict[str, float]:
    """The rebuild's stages back to back, synchronously, on the same rows."""
    import gc
    import sqlite3
    import zlib

    from events.codec import decode
    from projections import registrar as proj

    out: dict[str, float] = {}
    conn = sqlite3.connect(path, isolation_level=None)
    t0 = time.perf_counter()
    rows = conn.execute('SELECT payload, crc FROM records ORDER BY "offset"').fetchall()
    out["sqlite_read_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ok = sum(1 for payload, crc in rows if zlib.crc32(payload) == crc)
    out["crc_s"] = time.perf_counter() - t0
    assert ok == len(rows)
    payloads = [p for p, _ in rows]
    del rows
    gc.disable()  # as EmbeddedLog does while decoding a batch
    t0 = time.perf_counter()
    events = [decode(p) for p in payloads]
    out["decode_s"] = time.perf_counter() - t0
    gc.enable()
    state = proj.RegistrarState()
    t0 = time.perf_counter()
    for offset, ev in enumerate(events):
        proj.apply_record(state, 0, offset, ev)
    out["apply_s"] = time.perf_counter() - t0
    out["events"] = len(events)
    conn.close()
    if whatif:
        out.update(child_whatif(payloads, events))
    return out


def child_whatif(payloads: list[bytes], events: list) -> dict[str, float]:
    """Prototypes of two suggested changes, timed on the same events (bench-only code):
    msgpack instead of JSON payloads, and a type-dispatched apply loop that updates
    the position once per batch."""
    import gc

    import msgspec

    from events.schema import (
        BindingAdded,
        BindingExpired,
        BindingRefreshed,
        BindingRemoved,
        Event,
    )
    from projections import registrar as proj

    out: dict[str, float] = {}
    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder(Event)
    packed = [enc.encode(e) for e in events]
    out["msgpack_bytes"] = sum(map(len, packed)) / len(packed)
    out["json_bytes"] = sum(map(len, payloads)) / len(payloads)
    from events.codec import decode

    gc.disable()
    t0 = time.perf_counter()
    again = [decode(p) for p in payloads]  # JSON again, in the same conditions
    out["json_decode_again_s"] = time.perf_counter() - t0
    del again
    t0 = time.perf_counter()
    again = [dec.decode(p) for p in packed]
    out["msgpack_decode_s"] = time.perf_counter() - t0
    del again, packed

    slim = msgspec.json.Decoder(SlimAdded | SlimRefreshed | SlimRemoved | SlimExpired)
    t0 = time.perf_counter()
    again = [slim.decode(p) for p in payloads]
    out["slim_decode_s"] = time.perf_counter() - t0
    gc.enable()
    del again

    def upsert(aors: dict, ev) -> None:
        bindings = aors.get(ev.aor)
        if bindings is None:
            aors[ev.aor] = {ev.binding.key: ev.binding}
            return
        key = ev.binding.key
        bindings.pop(key, None)
        bindings[key] = ev.binding

    def remove(aors: dict, ev) -> None:
        bindings = aors.get(ev.aor)
        if bindings is not None and bindings.pop(ev.key, None) is not None and not bindings:
            del aors[ev.aor]

    def expire(aors: dict, ev) -> None:
        bindings = aors.get(ev.aor)
        if bindings is None:
            return
        current = bindings.get(ev.key)
        if current is not None and current.expires_at == ev.expires_at:
            del bindings[ev.key]
            if not bindings:
                del aors[ev.aor]

    dispatch = {BindingAdded: upsert, BindingRefreshed: upsert, BindingRemoved: remove,
                BindingExpired: expire}

    def apply_batch(state, partition: int, first: int, batch: list) -> None:
        aors = state.aors
        for ev in batch:
            fn = dispatch.get(type(ev))
            if fn is not None:
                fn(aors, ev)
        state.position[partition] = first + len(batch)

    state = proj.RegistrarState()
    t0 = time.perf_counter()
    for i in range(0, len(events), 10_000):
        apply_batch(state, 0, i, events[i:i + 10_000])
    out["apply_dispatch_s"] = time.perf_counter() - t0
    check = proj.RegistrarState()
    for offset, ev in enumerate(events):
        proj.apply_record(check, 0, offset, ev)
    out["dispatch_same_state"] = float(check.aors == state.aors)
    return out


def run_child(args: argparse.Namespace, path: Path, mode: str) -> dict | str:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--log", str(path)]
    if args.whatif:
        cmd.append("--whatif")
    res = subprocess.run(cmd, capture_output=True, text=True, env=U.siphon_env(), check=False)
    if res.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{res.stdout}\n{res.stderr}")
    if mode == "profile":
        return res.stdout
    return json.loads(res.stdout.strip().splitlines()[-1])


def child_main(args: argparse.Namespace) -> int:
    if args.child in ("rebuild", "rebuild-nogc"):
        print(json.dumps(asyncio.run(child_rebuild(args.log, args.child == "rebuild-nogc"))))
    elif args.child == "breakdown":
        print(json.dumps(child_breakdown(args.log, args.whatif)))
    else:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        res = asyncio.run(child_rebuild(args.log))
        prof.disable()
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("tottime").print_stats(15)
        stats.sort_stats("cumulative").print_stats(25)
        print(f"(under cProfile: {res['events']:,} events in {res['rebuild_s']:.2f}s)")
        print(_trim_pstats(buf.getvalue()))
    return 0


def _trim_pstats(text: str) -> str:
    keep = []
    for line in text.splitlines():
        if line.strip().startswith(("Ordered by", "ncalls")) or (
                line[:1] == " " and line.strip() and line.strip()[0].isdigit()):
            keep.append(line.replace(str(U.REPO) + "/", ""))
    return "\n".join(keep)


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    tmp = None
    if args.log is None:
        tmp = Path(tempfile.mkdtemp(prefix="siphon-bench-rebuild-"))
        args.log = tmp / "events.db"
    print("siphon projection rebuild benchmark")
    where = args.log.parent if args.log.parent.exists() else Path("/tmp")
    print(f"  log {args.log}  [{U.disk_of(where)}]")
    try:
        have = asyncio.run(count_events(args.log)) if args.log.exists() else 0
        if have != args.events:
            for p in (args.log, Path(f"{args.log}-wal"), Path(f"{args.log}-shm")):
                p.unlink(missing_ok=True)
            print(f"  writing {args.events:,} events over {args.aors:,} AoRs "
                  f"(EmbeddedLog.append, {args.batch:,} per call)")
            w = asyncio.run(write_log(args.log, args.events, args.aors, args.batch, args.seed))
            print("  mix: " + ", ".join(f"{k} {v:,} ({100 * v / w['written']:.0f}%)"
                                         for k, v in w["counts"].items()))
            print(f"  generating {w['gen_s']:.1f}s; appending {w['append_s']:.1f}s = "
                  f"{w['written'] / w['append_s']:,.0f} events/s durable bulk append; "
                  f"avg payload {w['avg_payload']:.0f} B")
        else:
            print(f"  reusing the {have:,} events already in the log")
        size = sum(p.stat().st_size for p in args.log.parent.glob(args.log.name + "*"))
        print(f"  log size {U.fmt_bytes(size)}")
        print()
        results = []
        for i in range(args.repeat):
            r = run_child(args, args.log, "rebuild")
            assert isinstance(r, dict)
            results.append(r)
            print(f"  run {i + 1}: open {r['open_s']:.2f}s, rebuild {r['events']:,} events in "
                  f"{r['rebuild_s']:.2f}s = {r['events'] / r['rebuild_s']:,.0f} events/s "
                  f"(CPU us/event: {r['main_cpu_s'] / max(1, r['events']) * 1e6:.2f} event "
                  f"loop, {r['cpu_s'] / max(1, r['events']) * 1e6:.2f} process, "
                  f"{r['reader_cpu_s'] / max(1, r['events']) * 1e6:.2f} reader child; "
                  f"load {r['load']:.2f}) "
                  f"(GC {r['gc_s']:.2f}s in {r['gc_runs']} runs) "
                  f"-> {r['aors']:,} AoRs, {r['bindings']:,} bindings, "
                  f"RSS {U.fmt_bytes(r['rss'])}", flush=True)
        best = min(results, key=lambda r: r["rebuild_s"])
        rate = best["events"] / best["rebuild_s"]
        print()
        print(f"rebuild: {rate:,.0f} events/s (best of {len(results)}; "
              f"{best['events']:,} events in {best['rebuild_s']:.2f}s); target >= "
              f"{TARGET:,}/s: {'MET' if rate >= TARGET else 'MISSED'}")
        print(f"log open before it (incl. quick_check): {best['open_s']:.2f}s")
        if args.breakdown:
            b = run_child(args, args.log, "breakdown")
            assert isinstance(b, dict)
            n = b["events"]
            total = b["sqlite_read_s"] + b["crc_s"] + b["decode_s"] + b["apply_s"]
            print()
            print("stages, synchronous, same rows (fresh process):")
            for name in ("sqlite_read_s", "crc_s", "decode_s", "apply_s"):
                print(f"  {name[:-2]:<12} {b[name]:6.2f}s  {1e6 * b[name] / n:6.2f} us/event  "
                      f"{n / b[name]:>12,.0f} events/s")
            print(f"  {'sum':<12} {total:6.2f}s  {1e6 * total / n:6.2f} us/event  "
                  f"{n / total:>12,.0f} events/s   (rebuild() took {best['rebuild_s']:.2f}s: "
                  f"{best['rebuild_s'] - total:+.2f}s of batching/threads/asyncio/GC overhead)")
            if args.whatif:
                print("what-if prototypes (bench-only code, same events):")
                r = run_child(args, args.log, "rebuild-nogc")
                assert isinstance(r, dict)
                print(f"  rebuild() with the cyclic GC disabled throughout (fresh process): "
                      f"{r['rebuild_s']:.2f}s = {r['events'] / r['rebuild_s']:,.0f} events/s")
                print(f"  msgpack payloads: {b['msgpack_bytes']:.0f} B/event instead of "
                      f"{b['json_bytes']:.0f}; decode {b['msgpack_decode_s']:.2f}s = "
                      f"{1e6 * b['msgpack_decode_s'] / n:.2f} us/event "
                      f"(JSON timed again alongside: {1e6 * b['json_decode_again_s'] / n:.2f})")
                print(f"  JSON decoded into slim structs (aor, key, expires_at only): "
                      f"{1e6 * b['slim_decode_s'] / n:.2f} us/event")
                print(f"  type-dispatched apply, position set once per batch: "
                      f"{b['apply_dispatch_s']:.2f}s = "
                      f"{1e6 * b['apply_dispatch_s'] / n:.2f} us/event (now "
                      f"{1e6 * b['apply_s'] / n:.2f}); same final state: "
                      f"{'yes' if b['dispatch_same_state'] else 'NO'}")
        if args.profile:
            print()
            print("cProfile of one rebuild (fresh process):")
            print(run_child(args, args.log, "profile"))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
