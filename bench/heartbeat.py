#!/usr/bin/env python3
"""Trunk heartbeat (PATCH /trunks/{id}) throughput of the built-in registry, alone and
while SIPp drives authenticated REGISTERs at a fixed rate.

Starts one ``siphon run`` node (embedded log, examples/registrar.py, ``trunks.enabled``,
``http.listen`` and the admin API on free ports), PUTs ``--trunks`` trunks, then runs
three phases of ``--duration`` seconds each:

  (a) baseline: SIPp REGISTER -> 401 -> REGISTER with digest -> 200 at ``--rate``/s
      (bench/sipp/register_auth.xml, helpers of bench/register.py);
  (b) heartbeats alone: ``wrk`` (``--client wrk``, the default when it is on PATH;
      ``--threads`` threads, ``--conns`` keep-alive connections) or ``--procs`` Python
      processes each running an aiohttp pool of ``--conns`` connections
      (``--client aiohttp``) PATCH random trunks as fast as they can; every answer must
      be 204; latency p50/p99;
  (c) both at once: the heartbeat load runs for as long as SIPp does (it is stopped
      when SIPp ends), so the REGISTER rate of (c) is measured under heartbeat load
      throughout.

It prints registrations/s, heartbeats/s, the REGISTER drop of (c) vs (a), the CPU of
siphon / SIPp / the heartbeat clients / the rest of the machine, and how many events the
log grew by (``GET /admin/stats`` log_position before/after each phase) to show the
heartbeat thinning (one ``trunk.heartbeat`` per trunk per ``lease_secs / 3`` at most).
Before (b) and (c) all trunks are PUT again so their leases are fresh.

It also prints the siphon event-loop CPU per registration (a) and per heartbeat (b), in
microseconds (main-thread CPU from /proc), which is what decides whether one loop can
serve both loads.

Example:  python bench/heartbeat.py
          python bench/heartbeat.py --rate 600 --duration 10 --conns 32
          python bench/heartbeat.py --client aiohttp --procs 2 --conns 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U
import register as R

TARGET_HB = 3000.0
TARGET_DROP = 30.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = U.arg_parser(__doc__, see_readme=True,
                     epilog=f"Targets: >= {TARGET_HB:,.0f} heartbeats/s while REGISTER "
                            f"throughput drops by <= {TARGET_DROP:.0f}%%. Needs sipp on PATH.")
    p.add_argument("--rate", type=int, default=600,
                   help="SIPp REGISTERs/s offered in (a) and (c) (default 600)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per phase (default 10)")
    p.add_argument("--trunks", type=int, default=200, help="trunks to PUT (default 200)")
    p.add_argument("--client", choices=("wrk", "aiohttp"),
                   help="heartbeat load tool (default: wrk when on PATH, else aiohttp)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--procs", type=int, default=2,
                   help="aiohttp client processes (default 2)")
    p.add_argument("--conns", type=int, default=32,
                   help="keep-alive connections (wrk: in all; aiohttp: per process; "
                        "default 32)")
    p.add_argument("--token", help="trunks.token: every request carries "
                   "'Authorization: Bearer TOKEN' (default: no token)")
    p.add_argument("--lease-secs", type=int, default=9,
                   help="trunks.lease_secs (default 9: a heartbeat event per trunk at most "
                        "every 3 s, so the thinning shows within a phase)")
    p.add_argument("--users", type=int, default=10_000, help="SIP users (default 10000)")
    p.add_argument("--log-level", default="warning", choices=U.LOG_LEVELS,
                   help="siphon log level (default warning: no log line per request)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds between phases")
    U.add_common_args(p, json=False, files="config, log, SIPp and heartbeat client files")
    # internal: run as a heartbeat client process
    p.add_argument("--_client", metavar="URL", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- client process


async def _client(base: str, trunks: int, conns: int, duration: float,
                  token: str | None = None) -> dict:
    import aiohttp

    lat: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    connector = aiohttp.TCPConnector(limit=conns, force_close=False)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        stop = time.monotonic() + duration

        async def worker(seed: int) -> None:
            nonlocal errors
            rnd = random.Random(seed)
            while time.monotonic() < stop and not _STOP:
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


_STOP: list[int] = []  # SIGINT ends the run early (phase (c): when SIPp is done)


def client_main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGINT, lambda *_: _STOP.append(1))
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    out = asyncio.run(_client(args._client, args.trunks, args.conns, args.duration,
                              args.token))
    json.dump(out, sys.stdout)
    return 0


def _summary(statuses: dict[str, int], errors: int, wall: float, requests: int,
             p50: float, p99: float, cpu: float) -> dict:
    ok = statuses.get("204", 0)
    return {"requests": requests, "ok": ok, "statuses": statuses, "errors": errors,
            "wall": wall, "per_s": ok / wall if wall else 0.0, "p50": p50, "p99": p99,
            "cpu": cpu}


class AiohttpLoad:
    """``--procs`` Python client processes (aiohttp pools) started together; results and
    CPU after ``wait()``; ``stop()`` ends them early."""

    def __init__(self, args: argparse.Namespace, base: str, workdir: Path, tag: str,
                 duration: float) -> None:
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        for i in range(args.procs):
            out = workdir / f"hb_{tag}_{i}.json"
            cmd = [sys.executable, __file__, "--_client", base, "--trunks", str(args.trunks),
                   "--conns", str(args.conns), "--duration", str(duration)]
            if args.token:
                cmd += ["--token", args.token]
            with open(out, "wb") as f:
                self.procs.append((subprocess.Popen(cmd, stdout=f, env=U.siphon_env()), out))

    def stop(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)

    def wait(self) -> dict:
        lat: list[float] = []
        statuses: dict[str, int] = {}
        errors, cpu, wall = 0, 0.0, 0.0
        for proc, out in self.procs:
            cpu += U.wait_rusage(proc)[1]
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

        return _summary(statuses, errors, wall, n, pct(0.50), pct(0.99), cpu)


WRK_SCRIPT = """\
-- PATCH a random trunk per request; count answers by status (thread-local, summed in done)
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
request = function()
  return wrk.format("PATCH", string.format("/trunks/trunk-%05d", math.random(0, TRUNKS - 1)))
end
response = function(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  local total, parts = {}, {}
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses")) do total[code] = (total[code] or 0) + n end
  end
  for code, n in pairs(total) do parts[#parts + 1] = string.format('"%d": %d', code, n) end
  local e = summary.errors
  io.write(string.format(
    '@@{"requests": %d, "duration_us": %d, "errors": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"statuses": {%s}}\\n', summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, latency:percentile(50),
    latency:percentile(99), table.concat(parts, ", ")))
end
"""


class WrkLoad:
    """One ``wrk`` process (``--threads`` threads, ``--conns`` keep-alive connections)
    PATCHing random trunks flat out; ``stop()`` (SIGINT) ends it early with its report."""

    def __init__(self, args: argparse.Namespace, base: str, workdir: Path, tag: str,
                 duration: float) -> None:
        script = workdir / "heartbeat.lua"
        script.write_text(f"TRUNKS = {args.trunks}\n" + WRK_SCRIPT)
        self.out = workdir / f"wrk_{tag}.out"
        cmd = ["wrk", f"-t{args.threads}", f"-c{max(args.conns, args.threads)}",
               f"-d{max(1, round(duration))}s", "--timeout", "10s", "-s", str(script), base]
        if args.token:
            cmd[1:1] = ["-H", f"Authorization: Bearer {args.token}"]
        with open(self.out, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def wait(self) -> dict:
        _, cpu = U.wait_rusage(self.proc)
        text = self.out.read_text(errors="replace")
        line = next((ln[2:] for ln in text.splitlines() if ln.startswith("@@")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no report:\n{text}")
        data = json.loads(line)
        return _summary(data["statuses"], data["errors"], data["duration_us"] / 1e6,
                        data["requests"], data["p50_us"] / 1000, data["p99_us"] / 1000, cpu)


def heartbeat_load(args: argparse.Namespace, base: str, workdir: Path, tag: str,
                   duration: float) -> AiohttpLoad | WrkLoad:
    cls = WrkLoad if args.client == "wrk" else AiohttpLoad
    return cls(args, base, workdir, tag, duration)


# ---------------------------------------------------------------------------- helpers


def log_position(admin_port: int) -> int:
    _, body = U.http("GET", f"http://127.0.0.1:{admin_port}/admin/stats")
    return sum(json.loads(body)["log_position"].values())


def put_trunks(base: str, n: int, token: str | None = None) -> dict[int, int]:
    codes: dict[int, int] = {}
    for i in range(n):
        code, _ = U.http("PUT", f"{base}/trunks/trunk-{i:05d}",
                       {"sip_uri": f"sip:gw{i}.example.net", "transport": "udp"}, token)
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
               hb: AiohttpLoad | WrkLoad | None = None) -> tuple[R.Step, dict, dict | None]:
    calls = max(1, round(args.rate * args.duration))
    meter = Meter(node.pid)
    try:
        rc, st, wall, sipp_cpu = R.run_sipp(args.rate, calls, args, workdir, users_csv)
    finally:
        if hb is not None:  # the heartbeat load ran for as long as SIPp: stop it now
            hb.stop()
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
          f"p95 {U.fmt_rtd(step.rt_p95_ms)} ms")


def print_hb(h: dict) -> None:
    bad = {k: v for k, v in h["statuses"].items() if k != "204"}
    print(f"  heartbeats: {h['ok']} x 204 in {h['wall']:.1f}s = {h['per_s']:.0f}/s, "
          f"p50 {h['p50']:.2f} ms, p99 {h['p99']:.2f} ms"
          + (f"; NOT 204: {bad}" if bad else "; all 204")
          + (f"; {h['errors']} connection errors" if h["errors"] else ""))


# ---------------------------------------------------------------------------- main


def client_desc(args: argparse.Namespace) -> str:
    auth = ", with a bearer token" if args.token else ""
    if args.client == "wrk":
        return f"wrk, {args.threads} thread(s) x {args.conns} keep-alive conns in all{auth}"
    return f"aiohttp pools, {args.procs} procs x {args.conns} keep-alive conns{auth}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._client:
        return client_main(args)
    if U.sipp_missing("heartbeat.py"):
        return 2
    if args.client is None:
        args.client = "wrk" if shutil.which("wrk") else "aiohttp"
    elif args.client == "wrk" and shutil.which("wrk") is None:
        print("heartbeat.py: wrk is not on PATH (apt-get install wrk)", file=sys.stderr)
        return 2
    args.port, args.sipp_port = U.free_port(2), U.free_port(2)
    http_port, admin_port = U.free_port(1), U.free_port(1)
    workdir = U.make_workdir(args.workdir, "heartbeat")
    users_csv = workdir / "users.csv"
    creds = R.write_users(users_csv, args.users)
    config, log_path = workdir / "siphon.yaml", workdir / "events.db"
    U.fresh_log(log_path)
    U.write_config(config, log_path=log_path, users=creds, udp_port=args.port,
                   admin_port=admin_port, log_level=args.log_level)
    with open(config, "a") as f:
        f.write(f'http:\n  listen: "127.0.0.1:{http_port}"\n'
                f"trunks:\n  enabled: true\n  heartbeat_seconds: {max(1, args.lease_secs // 3)}\n"
                f"  lease_secs: {args.lease_secs}\n"
                + (f"  token: {json.dumps(args.token)}\n" if args.token else ""))
    base = f"http://127.0.0.1:{http_port}"

    print("siphon trunk heartbeat benchmark (built-in registry, embedded log) + SIPp REGISTER")
    print(f"  workdir {workdir}  [{U.disk_of(workdir)}]   cores {os.cpu_count()}, "
          f"load average {U.load_average()}")
    print(f"  REGISTER rate {args.rate}/s, {args.duration:.0f} s per phase; {args.trunks} trunks, "
          f"lease {args.lease_secs} s (event at most every {args.lease_secs / 3:.1f} s/trunk); "
          f"heartbeat clients: {client_desc(args)}")
    node = U.Siphon(config, workdir, admin_port)
    node.start()
    U.print_ready(node, show_rss=False)
    try:
        codes = put_trunks(base, args.trunks, args.token)
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
        put_trunks(base, args.trunks, args.token)
        pos0 = log_position(admin_port)
        mb = Meter(node.pid)
        b = heartbeat_load(args, base, workdir, "b", args.duration).wait()
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
        put_trunks(base, args.trunks, args.token)
        pos0 = log_position(admin_port)
        hb = heartbeat_load(args, base, workdir, "c", 20 * args.duration + 60)
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
    room = max(0.0, 1e6 - args.rate * us_reg) / us_hb if us_hb else float("nan")
    est_c = 1e6 * mc["loop"] / mc["window"]
    used_c = c.achieved * us_reg + ch["per_s"] * us_hb
    print(f"  a whole core for the loop would leave room for ~{room:,.0f} heartbeats/s beside "
          f"{args.rate} REGISTER/s; in (c) the loop ran {est_c / 1e4:.0f}% of a core and "
          f"{c.achieved:.0f} REGISTER/s x {us_reg:.0f} us + {ch['per_s']:.0f} heartbeats/s x "
          f"{us_hb:.0f} us account for {used_c / 1e4:.0f}%")
    print(f"  load average at the end: {U.load_average()} "
          f"(1 / 5 / 15 min; load of other jobs on this machine skews wall-clock rates)")
    U.finish(args, workdir, indent="  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
