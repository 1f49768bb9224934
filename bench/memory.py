#!/usr/bin/env python3
"""Memory per binding of the registrar projection (target <= 1.5 KB per binding).

Part 1 (projection alone): N live bindings (default 100,000; realistic contact
URIs, +sip.instance ids, Call-IDs, user agents, sources; ~1.25 bindings per AoR)
are encoded as the log stores them, then, in a fresh process, decoded with
events.codec.decode and applied with projections.registrar.apply to a
RegistrarState in batches of 10,000 (as a rebuild does). RSS is read before and
after (gc.collect() first), in another fresh process tracemalloc measures the
same build, and the retained objects are walked to show where the bytes go
(per Binding field, dicts, AoR keys).

Part 2 (a real node): the same N bindings are written to an embedded log; RSS
of `siphon run` is measured once it is ready on an empty log and once it has
rebuilt the N-binding log; (difference) / N is the per-binding cost in a real
process. Idle CPU of both nodes over a few seconds is shown too (the expiry
sweeper runs every second).

Example:  python bench/memory.py
          python bench/memory.py --bindings 50000 --skip-node
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U

TARGET = 1.5 * 1024
BATCH = 10_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = U.arg_parser(__doc__)
    p.add_argument("--bindings", type=int, default=100_000, help="live bindings (100000)")
    p.add_argument("--skip-node", action="store_true", help="skip part 2 (siphon run)")
    p.add_argument("--idle", type=float, default=5.0,
                   help="seconds over which the nodes' idle CPU is measured (5)")
    p.add_argument("--workdir", type=Path, help="work directory (default: temp, removed)")
    p.add_argument("--whatif", action="store_true",
                   help="also measure (tracemalloc) a prototype of the suggested slimming: "
                        "repeated strings shared, +sip.instance/reg-id not repeated in params, "
                        "empty path/params as the shared (), q=1.0 shared (bench-only code)")
    p.add_argument("--child", choices=("rss", "tracemalloc", "whatif"), help=argparse.SUPPRESS)
    p.add_argument("--payloads", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- part 1


def write_payloads(path: Path, n: int) -> float:
    """The events as stored in the log (JSON via events.codec), one per line."""
    from events.codec import encode

    total = 0
    with open(path, "wb") as f:
        for ev in U.live_binding_events(n):
            data = encode(ev)
            assert b"\n" not in data
            total += len(data)
            f.write(data + b"\n")
    return total / n


def build_state(path: Path):
    """Decode + apply every event of ``path`` in batches, like a rebuild."""
    from events.codec import decode
    from projections import registrar as proj

    state = proj.RegistrarState()
    offset = 0
    with open(path, "rb") as f:
        while True:
            lines = [f.readline() for _ in range(BATCH)]
            lines = [ln for ln in lines if ln]
            if not lines:
                break
            gc.disable()  # as EmbeddedLog does while decoding a batch
            events = [decode(ln[:-1]) for ln in lines]
            gc.enable()
            for ev in events:
                proj.apply_record(state, 0, offset, ev)
                offset += 1
            del lines, events
    return state


def child_rss(path: Path) -> dict:
    import events.codec  # noqa: F401  (imports are not part of the figure)
    import projections.registrar  # noqa: F401

    gc.collect()
    before = U.rss()
    t0 = time.perf_counter()
    state = build_state(path)
    took = time.perf_counter() - t0
    gc.collect()
    after = U.rss()
    n = state.binding_count()
    return {"before": before, "after": after, "bindings": n, "aors": len(state.aors),
            "build_s": took, "breakdown": breakdown(state)}


def child_tracemalloc(path: Path) -> dict:
    import tracemalloc

    import events.codec  # noqa: F401
    import projections.registrar  # noqa: F401

    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.get_traced_memory()[0]
    snap0 = tracemalloc.take_snapshot()
    state = build_state(path)
    gc.collect()
    after, peak = tracemalloc.get_traced_memory()
    snap1 = tracemalloc.take_snapshot()
    top = []
    for stat in snap1.compare_to(snap0, "lineno")[:6]:
        frame = stat.traceback[0]
        top.append((f"{frame.filename.replace(str(U.REPO) + '/', '')}:{frame.lineno}",
                    stat.size_diff, stat.count_diff))
    n = state.binding_count()
    return {"traced": after - before, "peak": peak - before, "bindings": n, "top": top}


def slim(state) -> None:
    """Prototype of the suggested changes, applied to a built state in place."""
    import msgspec

    shared: dict[str, str] = {}
    one = 1.0
    for bindings in state.aors.values():
        for key, b in list(bindings.items()):
            params = tuple(p for p in b.params if p[0] not in ("+sip.instance", "reg-id"))
            bindings[key] = msgspec.structs.replace(
                b, node=shared.setdefault(b.node, b.node),
                local=shared.setdefault(b.local, b.local),
                transport=shared.setdefault(b.transport, b.transport),
                user_agent=shared.setdefault(b.user_agent, b.user_agent),
                q=one if b.q == 1.0 else b.q,
                path=tuple(b.path) if b.path else (), params=params if params else ())


def child_whatif(path: Path) -> dict:
    import tracemalloc

    import events.codec  # noqa: F401
    import projections.registrar  # noqa: F401

    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.get_traced_memory()[0]
    state = build_state(path)
    slim(state)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    return {"traced": after - before, "bindings": state.binding_count(),
            "breakdown": breakdown(state)}


def breakdown(state) -> list[tuple[str, int]]:
    """Bytes retained by the state, by what holds them (each object counted once)."""
    from events.schema import Binding

    seen: set[int] = set()
    parts: dict[str, int] = {}

    def add(name: str, obj: object) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        kind = type(obj).__name__
        parts[f"{name} {kind}"] = parts.get(f"{name} {kind}", 0) + sys.getsizeof(obj)
        if isinstance(obj, list | tuple):
            for item in obj:
                add(name + "[]", item)

    add("state.aors", state.aors)
    for aor, bindings in state.aors.items():
        add("AoR key", aor)
        add("per-AoR {key: Binding}", bindings)
        for key, b in bindings.items():
            add("Binding.key", key)
            add("Binding itself (17 slots)", b)
            for field in Binding.__struct_fields__:
                add(f"Binding.{field}", getattr(b, field))
    return sorted(parts.items(), key=lambda kv: -kv[1])


def run_child(mode: str, payloads: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode,
           "--payloads", str(payloads)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=U.siphon_env(), check=False)
    if res.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{res.stdout}\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- part 2


async def write_log(path: Path, n: int) -> None:
    from events.embedded import EmbeddedLog

    log = EmbeddedLog(path, group_commit_max=50_000)
    await log.open()
    try:
        batch = []
        for ev in U.live_binding_events(n):
            batch.append(ev)
            if len(batch) == 50_000:
                await log.append(batch)
                batch = []
        if batch:
            await log.append(batch)
    finally:
        await log.close()


def measure_node(workdir: Path, log_path: Path, idle: float) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    admin = U.free_port(1)
    cfg = workdir / "siphon.yaml"
    U.write_config(cfg, log_path=log_path, udp_port=U.free_port(2), admin_port=admin,
                   log_level="info")
    node = U.Siphon(cfg, workdir, admin)
    node.start()
    try:
        time.sleep(1.0)
        st = U.proc_status(node.pid)
        cpu0, t0 = U.cpu_seconds(node.pid), time.monotonic()
        time.sleep(idle)
        cpu = (U.cpu_seconds(node.pid) - cpu0) / (time.monotonic() - t0)
        st2 = U.proc_status(node.pid)
        rebuilt = [ln for ln in node.log_text().splitlines() if "projection rebuilt" in ln]
    finally:
        node.stop()
    return {"rss": st["VmRSS"], "rss_after_idle": st2["VmRSS"], "hwm": st2["VmHWM"],
            "ready_s": node.ready_after, "idle_cpu": cpu,
            "rebuilt": rebuilt[-1].split(": ", 1)[-1] if rebuilt else "?"}


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child == "rss":
        print(json.dumps(child_rss(args.payloads)))
        return 0
    if args.child == "tracemalloc":
        print(json.dumps(child_tracemalloc(args.payloads)))
        return 0
    if args.child == "whatif":
        print(json.dumps(child_whatif(args.payloads)))
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="siphon-bench-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    n = args.bindings
    try:
        print(f"siphon registrar memory benchmark: {n:,} live bindings")
        payloads = workdir / "events.jsonl"
        avg = write_payloads(payloads, n)
        print(f"  events as stored: avg {avg:.0f} B of JSON per BindingAdded")
        print()
        print("part 1: RegistrarState built by decode + apply (fresh process each)")
        r = run_child("rss", payloads)
        per = (r["after"] - r["before"]) / r["bindings"]
        print(f"  {r['bindings']:,} bindings in {r['aors']:,} AoRs, built in {r['build_s']:.2f}s")
        print(f"  RSS before {U.fmt_bytes(r['before'])}, after {U.fmt_bytes(r['after'])}: "
              f"{per:,.0f} B/binding ({per / 1024:.2f} KiB)  target <= 1.5 KiB: "
              f"{'MET' if per <= TARGET else 'MISSED'}")
        t = run_child("tracemalloc", payloads)
        tper = t["traced"] / t["bindings"]
        print(f"  tracemalloc: {U.fmt_bytes(t['traced'])} retained = {tper:,.0f} B/binding "
              f"(peak while building {U.fmt_bytes(t['peak'])})")
        for where, size, count in t["top"]:
            print(f"     {size / t['bindings']:7.0f} B/binding  {count:>9,} blocks  {where}")
        total = sum(size for _, size in r["breakdown"])
        print(f"  retained objects by holder (sys.getsizeof, each object once): "
              f"{total / r['bindings']:,.0f} B/binding")
        for name, size in r["breakdown"]:
            if size / r["bindings"] >= 1:
                print(f"     {size / r['bindings']:7.1f} B/binding  {100 * size / total:5.1f}%  "
                      f"{name}")
        if args.whatif:
            w = run_child("whatif", payloads)
            wper = w["traced"] / w["bindings"]
            print(f"  what-if (prototype: repeated strings shared, params without the "
                  f"+sip.instance/reg-id copies, () for empty path/params, q=1.0 shared): "
                  f"{wper:,.0f} B/binding by tracemalloc ({tper - wper:+,.0f} saved)")
            for name, size in w["breakdown"][:8]:
                print(f"     {size / w['bindings']:7.1f} B/binding  {name}")
        if args.skip_node:
            return 0
        print()
        print("part 2: RSS of `siphon run` (log level info, examples/registrar.py)")
        log_path = workdir / "node" / "events.db"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        asyncio.run(write_log(log_path, n))
        print(f"  wrote {n:,} BindingAdded to {log_path} in {time.perf_counter() - t0:.1f}s "
              f"({U.fmt_bytes(log_path.stat().st_size)})")
        empty = measure_node(workdir / "empty", workdir / "empty" / "events.db", args.idle)
        print(f"  empty log : RSS {U.fmt_bytes(empty['rss'])} (ready in {empty['ready_s']:.2f}s), "
              f"idle CPU {100 * empty['idle_cpu']:.1f}%")
        full = measure_node(workdir / "node", log_path, args.idle)
        per_node = (full["rss"] - empty["rss"]) / n
        print(f"  {n:,} bindings: RSS {U.fmt_bytes(full['rss'])} "
              f"(after {args.idle:.0f}s idle {U.fmt_bytes(full['rss_after_idle'])}, "
              f"peak VmHWM {U.fmt_bytes(full['hwm'])}), ready in {full['ready_s']:.2f}s, "
              f"idle CPU {100 * full['idle_cpu']:.1f}%")
        print(f"     siphon: {full['rebuilt']}")
        print(f"  => {per_node:,.0f} B/binding ({per_node / 1024:.2f} KiB) in a real node "
              f"[(RSS with bindings - RSS empty) / {n:,}]  target <= 1.5 KiB: "
              f"{'MET' if per_node <= TARGET else 'MISSED'}")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
