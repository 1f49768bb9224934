#!/usr/bin/env python3
"""Trunk heartbeat (PATCH /trunks/{id}) throughput of the built-in registry, alone and
while SIPp drives authenticated REGISTERs at a fixed rate.

Starts one ``siphon run`` node (embedded log, examples/registrar.py, ``trunks.enabled``,
``http.listen`` and the admin API on free ports), PUTs ``--trunks`` trunks, then runs
three phases of ``--duration`` seconds each:

  (a) baseline: SIPp REGISTER -> 401 -> REGISTER with digest -> 200 at ``--rate``/s
      (bench/sipp/register_auth.xml, helpers of bench/register.py);
  (b) heartbeats alone: ``--procs`` separate Python processes, each an aiohttp client
      pool of ``--conns`` keep-alive connections, PATCH random trunks as fast as they
      can; every answer must be 204; latency p50/p99;
  (c) both at once.

It prints registrations/s, heartbeats/s, the REGISTER drop of (c) vs (a), the CPU of
siphon / SIPp / the heartbeat clients / the rest of the machine, and how many events the
log grew by (``GET /admin/stats`` log_position before/after each phase) to show the
heartbeat thinning (one ``trunk.heartbeat`` per trunk per ``lease_secs / 3`` at most).
Before (b) and (c) all trunks are PUT again so their leases are fresh.

Example:  python bench/heartbeat.py
          python bench/heartbeat.py --rate 600 --duration 10 --procs 2 --conns 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U
import register as R

TARGET_HB = 3000.0
TARGET_DROP = 30.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " (see the module docstring / bench/README.md)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Targets: >= {TARGET_HB:,.0f} heartbeats/s while REGISTER throughput "
               f"drops by <= {TARGET_DROP:.0f}%%. Needs sipp on PATH.")
    p.add_argument("--rate", type=int, default=600,
                   help="SIPp REGISTERs/s offered in (a) and (c) (default 600)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per phase (default 10)")
    p.add_argument("--trunks", type=int, default=200, help="trunks to PUT (default 200)")
    p.add_argument("--procs", type=int, default=2,
                   help="heartbeat client processes (default 2)")
    p.add_argument("--conns", type=int, default=32,
                   help="keep-alive connections per client process (default 32)")
    p.add_argument("--lease-secs", type=int, default=9,
                   help="trunks.lease_secs (default 9: a heartbeat event per trunk at most "
                        "every 3 s, so the thinning shows within a phase)")
    p.add_argument("--users", type=int, default=10_000, help="SIP users (default 10000)")
    p.add_argument("--log-level", default="warning",
                   choices=("debug", "info", "warning", "error"),
                   help="siphon log level (default warning: no log line per request)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds between phases")
    p.add_argument("--workdir", type=Path, help="work directory (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    # internal: run as a heartbeat client process
    p.add_argument("--_client", metavar="URL", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- client process


async def _client(base: str, trunks: int, conns: int, duration: float) -> dict:
    import aiohttp

    lat: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    connector = aiohttp.TCPConnector(limit=conns, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        stop = time.monotonic() + duration

        async def worker(seed: int) -> None:
            nonlocal errors
            rnd = random.Random(seed)
            while time.monotonic() < stop:
                url = f"{base}/trunks/trunk-{rnd.randrange(trunks):05d}"
                t0 = time.perf_counter()
                try:
                    async with session.patch(url) as resp:
                        await resp.read()
                        statuses[resp.status] = statuses.get(resp.status, 0) + 1
                except (aiohttp.ClientError, OSError):
                    errors += 1
                    continue
                lat.append(time.perf_counter() - t0)

        t0 = time.monotonic()
        await asyncio.gather(*(worker(os.getpid() * 1000 + i) for i in range(conns)))
        wall = time.monotonic() - t0
    return {"lat": lat, "statuses": {str(k): v for k, v in statuses.items()},
            "errors": errors, "wall": wall}


def client_main(args: argparse.Namespace) -> int:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    out = asyncio.run(_client(args._client, args.trunks, args.conns, args.duration))
    json.dump(out, sys.stdout)
    return 0


class HeartbeatLoad:
    """``--procs`` client processes started together; results and CPU after ``wait()``."""

    def __init__(self, args: argparse.Namespace, base: str, workdir: Path, tag: str) -> None:
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        for i in range(args.procs):
            out = workdir / f"hb_{tag}_{i}.json"
            cmd = [sys.executable, __file__, "--_client", base, "--trunks", str(args.trunks),
                   "--conns", str(args.conns), "--duration", str(args.duration)]
            with open(out, "wb") as f:
                self.procs.append((subprocess.Popen(cmd, stdout=f, env=U.siphon_env()), out))

    def wait(self) -> dict:
        lat: list[float] = []
        statuses: dict[str, int] = {}
        errors, cpu, wall = 0, 0.0, 0.0
        for proc, out in self.procs:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            cpu += usage.ru_utime + usage.ru_stime
            data = json.loads(out.read_text() or "{}")
            lat += data.get("lat", [])
            errors += data.get("errors", 0)
            wall = max(wall, data.get("wall", 0.0))
            for k, v in data.get("statuses", {}).items():
                statuses[k] = statuses.get(k, 0) + v
        lat.sort()
        n = len(lat)

        def pct(q: float) -> float:
            return 1000 * lat[min(n - 1, int(q * n))] if n else float("nan")

        ok = statuses.get("204", 0)
        return {"requests": n, "ok": ok, "statuses": statuses, "errors": errors,
                "wall": wall, "per_s": ok / wall if wall else 0.0, "p50": pct(0.50),
                "p99": pct(0.99), "cpu": cpu}


# ---------------------------------------------------------------------------- helpers


def http(method: str, url: str, body: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def log_position(admin_port: int) -> int:
    _, body = http("GET", f"http://127.0.0.1:{admin_port}/admin/stats")
    return sum(json.loads(body)["log_position"].values())


def put_trunks(base: str, n: int) -> dict[int, int]:
    codes: dict[int, int] = {}
    for i in range(n):
        code, _ = http("PUT", f"{base}/trunks/trunk-{i:05d}",
                       {"sip_uri": f"sip:gw{i}.example.net", "transport": "udp"})
        codes[code] = codes.get(code, 0) + 1
    return codes


class Meter:
    """CPU of siphon (loop + threads) and of the whole machine over a phase."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.t0 = time.monotonic()
        self.thr0 = U.thread_cpu(pid)
        self.busy0 = U.system_busy()

    def done(self) -> dict:
        window = time.monotonic() - self.t0
        thr = U.thread_cpu(self.pid)
        loop = thr["main"] - self.thr0["main"]
        threads = thr["threads"] - self.thr0["threads"]
        return {"window": window, "loop": loop, "threads": threads,
                "busy": U.system_busy() - self.busy0}


def pct(sec: float, window: float) -> str:
    return f"{100 * sec / window:.0f}%"


def cpu_line(m: dict, sipp_cpu: float = 0.0, hb_cpu: float = 0.0) -> str:
    w = m["window"]
    siphon = m["loop"] + m["threads"]
    other = max(0.0, m["busy"] - siphon - sipp_cpu - hb_cpu)
    return (f"CPU (% of one core): siphon {pct(siphon, w)} (loop {pct(m['loop'], w)} + "
            f"threads {pct(m['threads'], w)}), SIPp {pct(sipp_cpu, w)}, heartbeat clients "
            f"{pct(hb_cpu, w)}, other {pct(other, w)}")


def sipp_phase(args: argparse.Namespace, workdir: Path, users_csv: Path, node: U.Siphon,
               hb: HeartbeatLoad | None = None) -> tuple[R.Step, dict, dict | None]:
    calls = max(1, round(args.rate * args.duration))
    meter = Meter(node.pid)
    rc, st, wall, sipp_cpu = R.run_sipp(args.rate, calls, args, workdir, users_csv)
    hbres = hb.wait() if hb is not None else None
    m = meter.done()
    step = R.make_step(args.rate, calls, rc, st, wall, sipp_cpu, m["loop"] + m["threads"],
                       m["loop"], m["threads"], m["window"], U.proc_status(node.pid), m["busy"])
    m["sipp_cpu"] = sipp_cpu
    return step, m, hbres


def print_sipp(step: R.Step) -> None:
    print(f"  REGISTER: offered {step.rate}/s, {step.successful}/{step.calls} ok, "
          f"{step.achieved:.0f} successful/s, {step.fail_pct:.2f}% failed, "
          f"{step.retransmissions} retransmissions, rt mean {step.rt_mean_ms:.1f} ms, "
          f"p95 {R._ms(step.rt_p95_ms)} ms")


def print_hb(h: dict) -> None:
    bad = {k: v for k, v in h["statuses"].items() if k != "204"}
    print(f"  heartbeats: {h['ok']} x 204 in {h['wall']:.1f}s = {h['per_s']:.0f}/s, "
          f"p50 {h['p50']:.2f} ms, p99 {h['p99']:.2f} ms"
          + (f"; NOT 204: {bad}" if bad else "; all 204")
          + (f"; {h['errors']} connection errors" if h["errors"] else ""))


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._client:
        return client_main(args)
    if shutil.which("sipp") is None:
        print("heartbeat.py: sipp is not on PATH", file=sys.stderr)
        return 2
    args.port, args.sipp_port = U.free_port(2), U.free_port(2)
    http_port, admin_port = U.free_port(1), U.free_port(1)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="siphon-bench-heartbeat-"))
    workdir.mkdir(parents=True, exist_ok=True)
    users_csv = workdir / "users.csv"
    creds = R.write_users(users_csv, args.users)
    config, log_path = workdir / "siphon.yaml", workdir / "events.db"
    for stale in (log_path, Path(f"{log_path}-wal"), Path(f"{log_path}-shm")):
        stale.unlink(missing_ok=True)
    U.write_config(config, log_path=log_path, users=creds, udp_port=args.port,
                   admin_port=admin_port, log_level=args.log_level)
    with open(config, "a") as f:
        f.write(f'http:\n  listen: "127.0.0.1:{http_port}"\n'
                f"trunks:\n  enabled: true\n  heartbeat_seconds: {max(1, args.lease_secs // 3)}\n"
                f"  lease_secs: {args.lease_secs}\n")
    base = f"http://127.0.0.1:{http_port}"

    print("siphon trunk heartbeat benchmark (built-in registry, embedded log) + SIPp REGISTER")
    print(f"  workdir {workdir}  [{U.disk_of(workdir)}]   cores {os.cpu_count()}")
    print(f"  REGISTER rate {args.rate}/s, {args.duration:.0f} s per phase; {args.trunks} trunks, "
          f"lease {args.lease_secs} s (event at most every {args.lease_secs / 3:.1f} s/trunk); "
          f"heartbeat clients {args.procs} procs x {args.conns} keep-alive conns (aiohttp)")
    node = U.Siphon(config, workdir, admin_port)
    node.start()
    print(f"  siphon pid {node.pid} ready in {node.ready_after:.2f}s")
    try:
        codes = put_trunks(base, args.trunks)
        print(f"  PUT {args.trunks} trunks: {codes}")
        if set(codes) - {200, 201}:
            print("  unexpected PUT status; siphon log:\n" + node.log_tail())
            return 1

        print("\n(a) baseline: SIPp REGISTER alone")
        pos0 = log_position(admin_port)
        a, ma, _ = sipp_phase(args, workdir, users_csv, node)
        pos_a = log_position(admin_port) - pos0
        print_sipp(a)
        print("  " + cpu_line(ma, ma["sipp_cpu"]))
        print(f"  log grew by {pos_a} events ({max(0, pos_a - a.successful)} beyond the "
              f"registrations: trunk.expired of the idle trunks whose lease ran out)")
        time.sleep(args.settle)

        print("\n(b) heartbeats alone")
        put_trunks(base, args.trunks)
        pos0 = log_position(admin_port)
        mb = Meter(node.pid)
        b = HeartbeatLoad(args, base, workdir, "b").wait()
        mb = mb.done()
        pos_b = log_position(admin_port) - pos0
        print_hb(b)
        print("  " + cpu_line(mb, 0.0, b["cpu"]))
        print(f"  log grew by {pos_b} events (trunk.heartbeat) for {b['ok']} heartbeats: "
              f"1 event per {b['ok'] / max(1, pos_b):.0f} heartbeats; "
              f"bound {args.trunks} trunks x ceil({args.duration:.0f} s / "
              f"{args.lease_secs / 3:.1f} s)")
        time.sleep(args.settle)

        print("\n(c) SIPp REGISTER + heartbeats at once")
        put_trunks(base, args.trunks)
        pos0 = log_position(admin_port)
        hb = HeartbeatLoad(args, base, workdir, "c")
        c, mc, ch = sipp_phase(args, workdir, users_csv, node, hb)
        assert ch is not None
        pos_c = log_position(admin_port) - pos0
        print_sipp(c)
        print_hb(ch)
        print("  " + cpu_line(mc, mc["sipp_cpu"], ch["cpu"]))
        print(f"  log grew by {pos_c} events: ~{max(0, pos_c - c.successful)} beyond the "
              f"{c.successful} registrations (trunk.heartbeat) for {ch['ok']} heartbeats")
        if not node.alive():
            print("siphon died:\n" + node.log_tail())
            return 1
    finally:
        node.stop()

    drop = 100 * (a.achieved - c.achieved) / a.achieved if a.achieved else float("nan")
    all_204 = all(set(h["statuses"]) <= {"204"} and not h["errors"] for h in (b, ch))
    print("\nsummary")
    print(f"  REGISTER/s: alone {a.achieved:.0f}, with heartbeats {c.achieved:.0f} "
          f"-> drop {drop:.1f}% (target <= {TARGET_DROP:.0f}%: "
          f"{'MET' if drop <= TARGET_DROP else 'MISSED'})")
    print(f"  heartbeats/s: alone {b['per_s']:.0f} (p50 {b['p50']:.2f} / p99 {b['p99']:.2f} ms), "
          f"with REGISTER load {ch['per_s']:.0f} (p50 {ch['p50']:.2f} / p99 {ch['p99']:.2f} ms) "
          f"(target >= {TARGET_HB:,.0f}/s under load: "
          f"{'MET' if ch['per_s'] >= TARGET_HB else 'MISSED'}); all 204: {all_204}")
    us_reg = 1e6 * ma["loop"] / max(1, a.successful)
    us_hb = 1e6 * mb["loop"] / max(1, b["ok"])
    need = (args.rate * us_reg + TARGET_HB * us_hb) / 1e4
    print(f"  siphon event-loop CPU: {us_reg:.0f} us/registration (a), {us_hb:.0f} us/heartbeat "
          f"(b) -> {args.rate}/s + {TARGET_HB:,.0f} heartbeats/s need ~{need:.0f}% of one core "
          f"for the loop; it got {pct(mc['loop'], mc['window'])} in (c) while the rest of the "
          f"machine used {pct(max(0.0, mc['busy'] - mc['loop'] - mc['threads']), mc['window'])}")
    if args.keep or args.workdir:
        print(f"  files kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
