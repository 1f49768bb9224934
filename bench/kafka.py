#!/usr/bin/env python3
"""Kafka backend benchmarks: REGISTER throughput, cross-node visibility, warm boot.

Runs against ``--bootstrap`` (default: $KAFKA_BOOTSTRAP) or, when neither is given, a
single-node broker it starts with scripts/kafka.sh in its work directory (and stops
at the end). Every part uses fresh topics (``--partitions``, default 6 = siphon's).

1. throughput: one ``siphon run`` node (``registrar.backend: kafka``,
   examples/registrar.py, 10,000 static users) driven by SIPp with
   bench/sipp/register_auth.xml (REGISTER -> 401 -> REGISTER with digest -> 200; the
   200 goes out once Kafka acked the event and the node applied it) at increasing
   rates, as bench/register.py does; stops after --stop-after steps in a row that
   miss (failures >= 0.5 % or < 95 % of the offered rate achieved).
2. visibility: nodes A and B on one topic. A Python asyncio client registers users
   on A at --vis-rate/s and measures, per registration, the time from A's 200 to the
   binding being visible on B, two ways (all times on the client's one clock):
   * on_change: B runs a script whose ``@registrar.on_change`` sends a UDP datagram
     naming the AoR to the client. B is put in a consumer group of its own
     (``group_id`` differs from A's), so it owns every partition and its callbacks
     run for every event, each only after B's projection applied it (the node awaits
     ``wait_applied`` first). Latency = datagram arrival - 200 arrival. Every
     registration is measured, and B serves no extra traffic. It is an upper bound:
     the callback consumer may fetch a little after the projection's consumer.
   * probe: for every --probe-every-th registration the client sends OPTIONS for the
     AoR to B right after A's 200, and again 1 ms after each 404, until B's script
     (``registrar.lookup(ruri)`` -> 200, else 404) answers 200. Latency = that 200's
     arrival - A's 200. Direct, but its resolution is one OPTIONS round trip + 1 ms
     (printed), and it loads B, hence the sampling.
3. boot: writes --boot-events realistic events (added/refreshed/removed/expired of
   ~--boot-aors phones, ending now) straight into a topic with aiokafka in large
   record batches (siphon's key and partitioning), then starts a new node on it
   --boot-runs times and measures process start -> /ready 200, plus the rebuild time
   the node logs.

CPU is shown per process (siphon's event-loop thread and its other threads, the
broker when this script started it, SIPp, this client) and 'other' = the rest of the
machine, from /proc, as % of one core. Targets: >= 1,500 registrations/s;
visibility p99 <= 50 ms; warm boot of 1M events <= 10 s.

Examples:
    python bench/kafka.py
    python bench/kafka.py --parts throughput --rates 500,750,1000 --py-spy 750
    python bench/kafka.py --parts boot --boot-events 1000000 --py-spy-boot
    KAFKA_BOOTSTRAP=127.0.0.1:9092 python bench/kafka.py --parts visibility
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import re
import secrets
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U
import register as R

KAFKA_SH = U.REPO / "scripts" / "kafka.sh"
TARGET_RATE = 1500
TARGET_P99_MS = 50.0
TARGET_BOOT_S = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = U.arg_parser(__doc__, see_readme=True)
    p.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP"),
                   help="Kafka bootstrap host:port (default $KAFKA_BOOTSTRAP; if unset, a "
                        "broker is started with scripts/kafka.sh and stopped at the end)")
    p.add_argument("--parts", default="throughput,visibility,boot",
                   help="comma-separated parts to run (default all three)")
    p.add_argument("--partitions", type=int, default=6, help="partitions per topic (default 6)")
    p.add_argument("--log-level", default="info", choices=U.LOG_LEVELS,
                   help="siphon log level (default info: the example script logs every "
                        "on_change)")
    g = p.add_argument_group("throughput")
    g.add_argument("--rates", default="500,1000,1500,2000",
                   help="registrations/s to offer, in order (default 500,1000,1500,2000)")
    g.add_argument("--duration", type=float, default=10.0, help="seconds per step (default 10)")
    g.add_argument("--users", type=int, default=10_000, help="static users (default 10000)")
    U.add_step_args(g, stop_after=1)
    U.add_common_args(g, workdir=False, json=False, py_spy=True)
    g = p.add_argument_group("visibility")
    g.add_argument("--vis-rate", default="500",
                   help="registrations/s on node A; several comma-separated rates run one "
                        "after the other on the same two nodes (default 500)")
    g.add_argument("--vis-duration", type=float, default=10.0, help="seconds (default 10)")
    g.add_argument("--probe-every", type=int, default=5,
                   help="probe B with OPTIONS for every Nth registration (default 5; 0=never)")
    g.add_argument("--py-spy-vis", action="store_true",
                   help="py-spy node B during the visibility run")
    g = p.add_argument_group("boot")
    g.add_argument("--boot-events", type=int, default=1_000_000,
                   help="events in the topic (default 1000000)")
    g.add_argument("--boot-aors", type=int, default=100_000, help="AoRs (default 100000)")
    g.add_argument("--boot-runs", type=int, default=2, help="timed boots (default 2)")
    g.add_argument("--boot-topic",
                   help="boot from this existing topic (e.g. kept from an earlier run with "
                        "--bootstrap) instead of writing a new one")
    g.add_argument("--py-spy-boot", action="store_true",
                   help="py-spy the last boot (start -> ready) and print its hot spots")
    U.add_common_args(p, files="configs, logs, SIPp files and a started broker")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- broker


class Broker:
    """The broker used: given (--bootstrap) or started here with scripts/kafka.sh."""

    def __init__(self, bootstrap: str | None, workdir: Path) -> None:
        self.bootstrap = bootstrap or ""
        self.dir = workdir / "kafka"
        self.started = False
        self.pid: int | None = None

    def start(self) -> None:
        if self.bootstrap:
            with contextlib.suppress(ValueError, IndexError):
                self.pid = pid_listening(int(self.bootstrap.rsplit(":", 1)[1]))
            return
        t0 = time.monotonic()
        env = {**os.environ, "PYTHON": sys.executable}
        out = subprocess.run(["bash", str(KAFKA_SH), "start", "--dir", str(self.dir)],
                             capture_output=True, text=True, env=env, timeout=900, check=False)
        if out.returncode != 0:
            raise SystemExit(f"scripts/kafka.sh start failed:\n{out.stdout}\n{out.stderr}")
        found = dict(ln.split("=", 1) for ln in out.stdout.splitlines() if "=" in ln)
        self.bootstrap = found["KAFKA_BOOTSTRAP"]
        self.started = True
        with contextlib.suppress(OSError, ValueError):
            self.pid = int((self.dir / "kafka.pid").read_text().split()[0])
        print(f"  started a broker on {self.bootstrap} in {time.monotonic() - t0:.1f} s "
              f"(pid {self.pid}, dir {self.dir})")

    def cpu(self) -> float:
        if self.pid is None:
            return 0.0
        try:
            return U.cpu_seconds(self.pid)
        except OSError:
            return 0.0

    def stop(self) -> None:
        if self.started:
            subprocess.run(["bash", str(KAFKA_SH), "stop", "--dir", str(self.dir)],
                           capture_output=True, timeout=120, check=False)


def pid_listening(port: int) -> int | None:
    """The pid of the local process listening on TCP ``port`` (to show a given broker's
    CPU), from /proc/net/tcp* and /proc/*/fd; None if not found."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        return int(pid)
    return None


# ---------------------------------------------------------------------------- nodes


def make_node(workdir: Path, name: str, *, bootstrap: str, topic: str, group: str,
              partitions: int, users: dict[str, str], log_level: str,
              script: Path = U.EXAMPLE_SCRIPT, udp_port: int | None = None) -> U.Siphon:
    d = workdir / name
    d.mkdir(parents=True, exist_ok=True)
    admin_port = U.free_port(1)
    udp_port = udp_port or U.free_port(2)
    config = d / "siphon.yaml"
    U.write_config(config, backend="kafka",
                   kafka={"bootstrap": bootstrap, "topic": topic, "partitions": partitions,
                          "group_id": group},
                   users=users, udp_port=udp_port, admin_port=admin_port, log_level=log_level,
                   script=script, instance_id=f"bench-{name}")
    node = U.Siphon(config, d, admin_port)
    node.udp_port = udp_port  # type: ignore[attr-defined]
    return node


class CpuWindow:
    """CPU seconds of some processes and of the whole machine over a window."""

    def __init__(self, pids: dict[str, int | None], broker: Broker) -> None:
        self.pids = {k: v for k, v in pids.items() if v}
        self.broker = broker
        self.t0 = time.monotonic()
        self.busy0 = U.system_busy()
        self.self0 = time.process_time()
        self.cpu0 = {k: U.thread_cpu(pid) for k, pid in self.pids.items()}
        self.broker0 = broker.cpu()

    def report(self, extra_s: float = 0.0) -> dict[str, float]:
        """% of one core per process; 'other' = machine minus all of them and
        ``extra_s`` (e.g. SIPp's CPU seconds)."""
        wall = time.monotonic() - self.t0
        out: dict[str, float] = {"wall_s": wall}
        ours = 0.0
        for k, pid in self.pids.items():
            try:
                now = U.thread_cpu(pid)
            except OSError:
                continue
            loop = now["main"] - self.cpu0[k]["main"]
            thr = now["threads"] - self.cpu0[k]["threads"]
            out[f"{k}_loop"] = 100 * loop / wall
            out[f"{k}_threads"] = 100 * thr / wall
            ours += loop + thr
        broker = self.broker.cpu() - self.broker0
        me = time.process_time() - self.self0
        out["broker"] = 100 * broker / wall
        out["client"] = 100 * me / wall
        out["extra"] = 100 * extra_s / wall
        busy = U.system_busy() - self.busy0
        out["other"] = max(0.0, 100 * (busy - ours - broker - me - extra_s) / wall)
        return out


def fmt_cpu(c: dict[str, float], names: list[str]) -> str:
    parts = [f"{n} {c.get(n + '_loop', 0) + c.get(n + '_threads', 0):.0f}% "
             f"({c.get(n + '_loop', 0):.0f}+{c.get(n + '_threads', 0):.0f})" for n in names]
    parts.append(f"broker {c['broker']:.0f}%" if c["broker"] else "broker n/a (not ours)")
    if c.get("client", 0) >= 1:
        parts.append(f"client {c['client']:.0f}%")
    if c.get("extra", 0):
        parts.append(f"SIPp {c['extra']:.0f}%")
    parts.append(f"other {c['other']:.0f}%")
    return ", ".join(parts)


# ---------------------------------------------------------------------------- 1. throughput


def part_throughput(args: argparse.Namespace, broker: Broker, workdir: Path) -> dict[str, Any]:
    print("\n== 1. REGISTER throughput of one node (Kafka backend, SIPp digest REGISTER) ==")
    wd = workdir / "throughput"
    wd.mkdir()
    users_csv = wd / "users.csv"
    creds = R.write_users(users_csv, args.users)
    topic = f"bench-throughput-{uuid.uuid4().hex[:8]}"
    node = make_node(wd, "node", bootstrap=broker.bootstrap, topic=topic, group=topic,
                     partitions=args.partitions, users=creds, log_level=args.log_level)
    node.start()
    print(f"  topic {topic} ({args.partitions} partitions), script {U.EXAMPLE_SCRIPT.name}, "
          f"log level {args.log_level}, {args.users} users; siphon pid {node.pid} ready in "
          f"{node.ready_after:.2f} s")
    sipp_args = argparse.Namespace(port=node.udp_port, sipp_port=U.free_port(2))  # type: ignore[attr-defined]
    hdr = (f"{'offered/s':>9} {'ok/s':>6} {'fail%':>6} {'retr':>6} {'rt mean':>8} {'p50':>6} "
           f"{'p95':>6} {'p99':>6} {'loop us/reg':>11}  CPU (% of a core: loop+threads)")
    print(hdr)
    print("-" * 120)
    steps: list[dict[str, Any]] = []
    unsustained = 0
    try:
        for rate in U.parse_rates(args.rates):
            calls = max(1, round(rate * args.duration))
            win = CpuWindow({"siphon": node.pid}, broker)
            spy = None
            spy_out = wd / f"py-spy_{rate}.txt"
            if args.py_spy == rate:
                spy = U.start_py_spy(node.pid, args.duration, spy_out)
            rc, st, wall, sipp_cpu = R.run_sipp(rate, calls, sipp_args, wd, users_csv)
            cpu = win.report(extra_s=sipp_cpu)
            if not node.alive():
                print(f"siphon died during the {rate}/s step:\n{node.log_tail()}")
                break
            s = R.make_step(rate, calls, rc, st, wall, sipp_cpu, 0.0, 0.0, 0.0, cpu["wall_s"],
                            U.proc_status(node.pid), 0.0)
            s.siphon_loop_pct, s.siphon_threads_pct = cpu["siphon_loop"], cpu["siphon_threads"]
            s.siphon_cpu_pct = s.siphon_loop_pct + s.siphon_threads_pct
            s.loop_us_per_reg = 1e4 * cpu["siphon_loop"] * cpu["wall_s"] / max(1, s.successful)
            s.other_cpu_pct = cpu["other"]
            s.sustained = (s.fail_pct < args.fail_threshold
                           and s.achieved >= args.min_achieved * rate)
            steps.append({**asdict(s), "cpu": cpu})
            print(f"{rate:>9} {s.achieved:>6.0f} {s.fail_pct:>6.2f} {s.retransmissions:>6} "
                  f"{s.rt_mean_ms:>6.1f}ms {U.fmt_rtd(s.rt_p50_ms):>6} {U.fmt_rtd(s.rt_p95_ms):>6} "
                  f"{U.fmt_rtd(s.rt_p99_ms):>6} {s.loop_us_per_reg:>11.0f}  "
                  f"{fmt_cpu(cpu, ['siphon'])}  RSS {U.fmt_bytes(s.siphon_rss)}  "
                  f"{'sustained' if s.sustained else 'NOT sustained'}"
                  + (f" [sipp exit {rc}; {s.failed} failed, {s.timeouts} timeouts]"
                     if s.failed or rc else ""), flush=True)
            U.finish_py_spy(spy, spy_out, f"the node at {rate}/s")
            unsustained = 0 if s.sustained else unsustained + 1
            if args.stop_after and unsustained >= args.stop_after:
                break
            time.sleep(args.settle)
    finally:
        node.stop()
    best = max((s for s in steps if s["sustained"]), key=lambda s: s["rate"], default=None)
    if best is None:
        print("  highest sustained rate: none")
    else:
        print(f"  highest sustained rate: {best['rate']}/s offered, {best['achieved']:.0f}/s "
              f"achieved, {best['fail_pct']:.2f}% failed (target >= {TARGET_RATE}/s: "
              f"{'MET' if best['rate'] >= TARGET_RATE else 'MISSED'})")
    calm = [s for s in steps if s["sustained"]] or steps[:1]
    if calm:
        us = min(s["loop_us_per_reg"] for s in calm)
        print(f"  event-loop CPU per registration: {us:.0f} us -> at most ~{1e6 / us:.0f}/s "
              "with a whole core for the event loop")
    return {"steps": steps, "best_rate": best["rate"] if best else 0}


# ---------------------------------------------------------------------------- 2. visibility

PROBE_SCRIPT = '''\
# bench/kafka.py node B: answers OPTIONS from its projection, reports on_change over UDP
import socket

from siphon import proxy, registrar

_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
_COLLECTOR = ("127.0.0.1", {port})


@proxy.on_request
def route(request):
    if request.method == "OPTIONS":
        if registrar.lookup(request.ruri):
            request.reply(200, "OK")
        else:
            request.reply(404, "Not Found")
        return
    request.reply(403, "Forbidden")


@registrar.on_change
def changed(aor, event_type, contacts):
    _sock.sendto(f"{{aor}} {{event_type}}".encode(), _COLLECTOR)
'''


def _digest(user: str, password: str, challenge: str, method: str, uri: str) -> str:
    params = dict(re.findall(r'(\w+)="?([^",]+)"?', challenge))
    realm, nonce = params["realm"], params["nonce"]
    ha1 = hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()
    ha2 = hashlib.md5(f"{method}:{uri}".encode()).hexdigest()
    cnonce = secrets.token_hex(8)
    resp = hashlib.md5(f"{ha1}:{nonce}:00000001:{cnonce}:auth:{ha2}".encode()).hexdigest()
    return (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
            f'response="{resp}", algorithm=MD5, qop=auth, nc=00000001, cnonce="{cnonce}"')


_HDR = re.compile(rb"^([A-Za-z-]+)[ \t]*:[ \t]*(.*)$", re.M)


class Client(asyncio.DatagramProtocol):
    """Minimal SIP UAC over one UDP socket: transactions matched by (Call-ID, CSeq);
    every answer is stamped with the loop time it arrived."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.port = 0
        self.pending: dict[tuple[bytes, bytes], asyncio.Future[tuple[int, dict, float]]] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = asyncio.get_running_loop().time()
        try:
            status = int(data[8:11])
        except ValueError:
            return
        if status < 200:
            return
        head = data.split(b"\r\n\r\n", 1)[0]
        hdrs = {k.lower(): v.strip() for k, v in _HDR.findall(head)}
        key = (hdrs.get(b"call-id", b""), hdrs.get(b"cseq", b""))
        fut = self.pending.get(key)
        if fut is not None and not fut.done():
            fut.set_result((status, hdrs, now))

    async def transact(self, data: bytes, call_id: str, cseq: str, server: tuple[str, int],
                       timeout: float = 8.0) -> tuple[int, dict, float] | None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[int, dict, float]] = loop.create_future()
        key = (call_id.encode(), cseq.encode())
        self.pending[key] = fut
        deadline = loop.time() + timeout
        interval = 0.5
        try:
            while True:
                self.transport.sendto(data, server)
                wait = min(interval, deadline - loop.time())
                if wait <= 0:
                    return None
                done, _ = await asyncio.wait({fut}, timeout=wait)
                if done:
                    return fut.result()
                interval = min(interval * 2, 4.0)
        finally:
            self.pending.pop(key, None)

    def request(self, method: str, ruri: str, *, to: str, from_: str, call_id: str,
                cseq: int, extra: str = "") -> bytes:
        return (f"{method} {ruri} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch=z9hG4bK{secrets.token_hex(8)};"
                f"rport\r\nMax-Forwards: 70\r\nFrom: {from_}\r\nTo: <{to}>\r\n"
                f"Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n{extra}"
                "Content-Length: 0\r\n\r\n").encode()

    async def register(self, server: tuple[str, int], user: str,
                       password: str) -> tuple[int | None, float, float]:
        """REGISTER with digest; (status, time sent, time the final answer arrived)."""
        aor = f"sip:{user}@example.com"
        from_ = f"<{aor}>;tag={secrets.token_hex(4)}"
        call_id = f"{secrets.token_hex(8)}@bench"
        contact = f"Contact: <sip:{user}@127.0.0.1:{self.port}>\r\nExpires: 600\r\n"
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        first = await self.transact(
            self.request("REGISTER", "sip:example.com", to=aor, from_=from_, call_id=call_id,
                         cseq=1, extra=contact), call_id, "1 REGISTER", server)
        if first is None or first[0] != 401:
            return (None if first is None else first[0]), t0, loop.time()
        auth = _digest(user, password, first[1][b"www-authenticate"].decode(), "REGISTER",
                       "sip:example.com")
        second = await self.transact(
            self.request("REGISTER", "sip:example.com", to=aor, from_=from_, call_id=call_id,
                         cseq=2, extra=contact + f"Authorization: {auth}\r\n"),
            call_id, "2 REGISTER", server)
        if second is None:
            return None, t0, loop.time()
        return second[0], t0, second[2]

    async def options(self, server: tuple[str, int], ruri: str,
                      timeout: float = 2.0) -> tuple[int, float] | None:
        call_id = f"{secrets.token_hex(8)}@probe"
        got = await self.transact(
            self.request("OPTIONS", ruri, to=ruri, call_id=call_id, cseq=1,
                         from_=f"<sip:probe@example.com>;tag={call_id[:6]}"),
            call_id, "1 OPTIONS", server, timeout)
        return None if got is None else (got[0], got[2])


class Collector(asyncio.DatagramProtocol):
    """Receives B's on_change datagrams: first arrival time per AoR."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.count = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = asyncio.get_running_loop().time()
        self.count += 1
        aor = data.split(b" ", 1)[0].decode()
        self.first.setdefault(aor, now)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def dist(values: list[float]) -> str:
    return (f"n={len(values)} p50 {pct(values, .5):.1f} ms, p90 {pct(values, .9):.1f}, "
            f"p99 {pct(values, .99):.1f}, max {max(values, default=float('nan')):.1f}")


async def visibility_run(args: argparse.Namespace, rate: float, a: U.Siphon, b: U.Siphon,
                         users: dict[str, str], collector: Collector,
                         broker: Broker) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_datagram_endpoint(Client, local_addr=("127.0.0.1", 0))
    a_addr = ("127.0.0.1", a.udp_port)  # type: ignore[attr-defined]
    b_addr = ("127.0.0.1", b.udp_port)  # type: ignore[attr-defined]
    # Probe resolution: OPTIONS round trip to B for an AoR nobody registered.
    rtts = []
    for _ in range(50):
        t = loop.time()
        got = await client.options(b_addr, "sip:nobody@example.com")
        if got is not None:
            rtts.append(1000 * (got[1] - t))
    names = list(users)
    n = len(names)
    ok_at: dict[str, float] = {}
    reg_rt: list[float] = []
    probe_lat: list[float] = []
    probe_sent = 0
    failed = 0

    async def probe(aor: str, t_ok: float) -> None:
        nonlocal probe_sent
        deadline = t_ok + 5.0
        while loop.time() < deadline:
            probe_sent += 1
            got = await client.options(b_addr, aor, timeout=1.0)
            if got is not None and got[0] == 200:
                probe_lat.append(1000 * (got[1] - t_ok))
                return
            await asyncio.sleep(0.001)

    async def one(i: int) -> None:
        nonlocal failed
        user = names[i]
        status, t0, t_ok = await client.register(a_addr, user, users[user])
        if status != 200:
            failed += 1
            return
        aor = f"sip:{user}@example.com"
        ok_at[aor] = t_ok
        reg_rt.append(1000 * (t_ok - t0))
        if args.probe_every and i % args.probe_every == 0:
            await probe(aor, t_ok)

    win = CpuWindow({"A": a.pid, "B": b.pid}, broker)
    spy = spy_out = None
    if args.py_spy_vis:
        spy_out = b.logfile.parent / f"py-spy_B_{rate:g}.txt"
        spy = U.start_py_spy(b.pid, args.vis_duration, spy_out)
    t_start = loop.time()
    tasks = []
    for i in range(n):
        delay = t_start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    sent_for = loop.time() - t_start
    await asyncio.sleep(1.0)  # late on_change datagrams
    cpu = win.report()
    client.transport.close()
    if spy is not None and spy_out is not None:
        U.finish_py_spy(spy, spy_out, "node B during the visibility run")
    change_lat = [1000 * (collector.first[aor] - t) for aor, t in ok_at.items()
                  if aor in collector.first]
    missing = len(ok_at) - len(change_lat)
    return {"rate": rate, "registrations": n, "ok": len(ok_at), "failed": failed,
            "seconds": sent_for,
            "reg_rt_ms": reg_rt, "on_change_ms": change_lat, "on_change_missing": missing,
            "probe_ms": probe_lat, "probe_rtt_ms": rtts, "probes_sent": probe_sent,
            "cpu": cpu, "datagrams": collector.count}


def part_visibility(args: argparse.Namespace, broker: Broker, workdir: Path) -> dict[str, Any]:
    rates = [float(r) for r in str(args.vis_rate).split(",") if r.strip()]
    print(f"\n== 2. cross-node visibility at {', '.join(f'{r:g}' for r in rates)} "
          "registrations/s (200 on A -> binding visible on B) ==")
    wd = workdir / "visibility"
    wd.mkdir()
    counts = [round(r * args.vis_duration) for r in rates]
    users = {f"user{i:05d}": "password" for i in range(max(args.users, sum(counts)))}
    names = list(users)
    topic = f"bench-visibility-{uuid.uuid4().hex[:8]}"

    async def run() -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        ctransport, collector = await loop.create_datagram_endpoint(
            Collector, local_addr=("127.0.0.1", 0))
        port = ctransport.get_extra_info("sockname")[1]
        script = wd / "probe_b.py"
        script.write_text(PROBE_SCRIPT.format(port=port))
        a = make_node(wd, "A", bootstrap=broker.bootstrap, topic=topic, group=topic + ".a",
                      partitions=args.partitions, users=users, log_level=args.log_level)
        b = make_node(wd, "B", bootstrap=broker.bootstrap, topic=topic, group=topic + ".b",
                      partitions=args.partitions, users={}, log_level=args.log_level,
                      script=script)
        out = []
        try:
            await asyncio.to_thread(a.start)
            await asyncio.to_thread(b.start)
            print(f"  topic {topic}; A (pid {a.pid}, examples/registrar.py, group "
                  f"{topic}.a) and B (pid {b.pid}, probe script, group {topic}.b: B owns every "
                  "partition of its callback group)")
            await asyncio.sleep(3.0)  # let both callback groups settle
            first = 0
            for rate, count in zip(rates, counts, strict=True):
                chunk = {u: users[u] for u in names[first:first + count]}
                first += count
                r = await visibility_run(args, rate, a, b, chunk, collector, broker)
                print_visibility(args, r)
                out.append(r)
                await asyncio.sleep(2.0)
        finally:
            a.stop()
            b.stop()
            ctransport.close()
        return out

    results = asyncio.run(run())
    summaries = []
    for r in results:
        summary = {k: v for k, v in r.items() if not k.endswith("_ms")}
        for k in ("reg_rt_ms", "on_change_ms", "probe_ms", "probe_rtt_ms"):
            summary[k] = {"n": len(r[k]), "p50": pct(r[k], .5), "p90": pct(r[k], .9),
                          "p99": pct(r[k], .99), "max": max(r[k], default=None)}
        summaries.append(summary)
    return {"runs": summaries}


def print_visibility(args: argparse.Namespace, r: dict[str, Any]) -> None:
    print(f"  -- offered {r['rate']:g}/s: {r['ok']} of {r['registrations']} REGISTERs got 200 "
          f"from A over {r['seconds']:.1f} s ({r['ok'] / r['seconds']:.0f}/s); "
          f"{r['failed']} failed")
    print(f"  A's REGISTER response time (first REGISTER -> 200): {dist(r['reg_rt_ms'])}")
    print(f"  visibility via B's on_change (every registration, upper bound): "
          f"{dist(r['on_change_ms'])}; {r['on_change_missing']} never reported")
    print(f"  visibility via OPTIONS probes to B (every {args.probe_every}th): "
          f"{dist(r['probe_ms'])}; {r['probes_sent']} probes; probe round trip "
          f"p50 {pct(r['probe_rtt_ms'], .5):.2f} ms (the probe's resolution is that + 1 ms)")
    print(f"  CPU: {fmt_cpu(r['cpu'], ['A', 'B'])}")
    p99 = pct(r["on_change_ms"], .99)
    p99_probe = pct(r["probe_ms"], .99)
    print(f"  target p99 <= {TARGET_P99_MS:g} ms: on_change p99 {p99:.1f} ms "
          f"{'MET' if p99 <= TARGET_P99_MS else 'MISSED'}; probe p99 {p99_probe:.1f} ms "
          f"{'MET' if p99_probe <= TARGET_P99_MS else 'MISSED'}")


# ---------------------------------------------------------------------------- 3. boot


async def fill_topic(bootstrap: str, topic: str, partitions: int, n: int,
                     aors: int) -> dict[str, float]:
    """Create ``topic`` and write ``n`` events into it in large record batches."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from events.codec import encode
    from events.kafka import TOPIC_CONFIG, kafka_partition

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1, topic_configs=TOPIC_CONFIG)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                enable_idempotence=True, max_batch_size=1024 * 1024,
                                max_request_size=2 * 1024 * 1024, linger_ms=50)
    await producer.start()
    t0 = time.monotonic()
    nbytes = 0
    cache: dict[bytes, int] = {}
    try:
        batches: dict[int, Any] = {}
        inflight: list[asyncio.Future[Any]] = []
        # ~aors users' phones at 20 events/s of simulated time, ending now
        for event in U.registrar_events(n, aors, seed=7, start=time.time() - n / 20.0):
            key = event.aor.encode()
            p = cache.get(key)
            if p is None:
                p = cache[key] = kafka_partition(key, partitions)
            value = encode(event)
            nbytes += len(value)
            batch = batches.get(p)
            if batch is None:
                batch = batches[p] = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:
                inflight.append(await producer.send_batch(batch, topic, partition=p))
                batch = batches[p] = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
                if len(inflight) > 64:
                    await asyncio.gather(*inflight)
                    inflight.clear()
        for p, batch in batches.items():
            if batch.record_count():
                inflight.append(await producer.send_batch(batch, topic, partition=p))
        await asyncio.gather(*inflight)
    finally:
        await producer.stop()
    took = time.monotonic() - t0
    return {"events": n, "seconds": took, "bytes": nbytes}


def part_boot(args: argparse.Namespace, broker: Broker, workdir: Path) -> dict[str, Any]:
    print(f"\n== 3. warm boot of a new node from a topic of {args.boot_events:,} events ==")
    wd = workdir / "boot"
    wd.mkdir()
    if args.boot_topic:
        topic = args.boot_topic
        filled: dict[str, Any] = {"reused": topic}
        print(f"  reusing topic {topic} (written by an earlier run)")
    else:
        topic = f"bench-boot-{uuid.uuid4().hex[:8]}"
        filled = asyncio.run(fill_topic(broker.bootstrap, topic, args.partitions,
                                        args.boot_events, args.boot_aors))
        print(f"  wrote {filled['events']:,} events ({U.fmt_bytes(filled['bytes'])} of "
              f"payload, ~{args.boot_aors:,} AoRs) into {topic} in {filled['seconds']:.1f} s "
              f"({filled['events'] / filled['seconds']:,.0f} events/s)")
    runs = []
    for i in range(args.boot_runs):
        node = make_node(wd, f"node{i}", bootstrap=broker.bootstrap, topic=topic,
                         group=f"{topic}.run{i}", partitions=args.partitions, users={},
                         log_level=args.log_level)
        profile = args.py_spy_boot and i == args.boot_runs - 1
        win = CpuWindow({}, broker)
        spy = None
        spy_out = node.logfile.parent / "py-spy_boot.txt"
        node.spawn()
        if profile:
            spy = U.start_py_spy(node.pid, 600, spy_out)
        peak = 0
        while not node.is_ready():
            if not node.alive():
                raise SystemExit(f"the booting node exited:\n{node.log_tail()}")
            with contextlib.suppress(OSError, KeyError):
                peak = max(peak, U.rss(node.pid))
            if time.monotonic() - node.started > 600:
                node.stop()
                raise SystemExit("the node was not ready within 600 s")
            time.sleep(0.02)
        ready = time.monotonic() - node.started
        cpu = U.thread_cpu(node.pid)
        wincpu = win.report(extra_s=cpu["main"] + cpu["threads"])  # 'extra' = the node
        status = U.proc_status(node.pid)
        U.finish_py_spy(spy, spy_out, "the boot (start -> ready)", interrupt=True)
        node.stop()
        text = node.log_text()
        m = re.search(r"projection rebuilt from (\d+) events in ([\d.]+)s: (\d+) AoRs, "
                      r"(\d+) bindings", text)
        rebuilt = (int(m.group(1)), float(m.group(2)), int(m.group(3)),
                   int(m.group(4))) if m else (0, float("nan"), 0, 0)
        run = {"ready_s": ready, "events": rebuilt[0], "rebuild_s": rebuilt[1],
               "aors": rebuilt[2], "bindings": rebuilt[3], "loop_cpu_s": cpu["main"],
               "threads_cpu_s": cpu["threads"], "rss": status.get("VmRSS", 0),
               "hwm": status.get("VmHWM", 0), "broker_pct": wincpu["broker"],
               "other_pct": wincpu["other"], "profiled": profile}
        runs.append(run)
        print(f"  boot {i + 1}{' (under py-spy)' if profile else ''}: ready {ready:.2f} s "
              f"after start; it logged 'rebuilt from {rebuilt[0]:,} events in "
              f"{rebuilt[1]:.2f} s' ({rebuilt[0] / max(rebuilt[1], 1e-9):,.0f} events/s; "
              f"{rebuilt[2]:,} AoRs, {rebuilt[3]:,} bindings); CPU loop {cpu['main']:.1f} s + "
              f"threads {cpu['threads']:.1f} s; RSS {U.fmt_bytes(run['rss'])} (peak "
              f"{U.fmt_bytes(run['hwm'])}); broker {wincpu['broker']:.0f}%, other "
              f"{wincpu['other']:.0f}% of a core")
    timed = [r for r in runs if not r["profiled"]] or runs
    best = min(r["ready_s"] for r in timed)
    print(f"  best start -> ready: {best:.2f} s (target <= {TARGET_BOOT_S:g} s for 1M events: "
          f"{'MET' if best <= TARGET_BOOT_S else 'MISSED'})")
    return {"topic": topic, "fill": filled, "runs": runs, "best_ready_s": best}


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"throughput", "visibility", "boot"}
    if unknown:
        print(f"kafka.py: unknown parts {sorted(unknown)}", file=sys.stderr)
        return 2
    if "throughput" in parts and U.sipp_missing("kafka.py"):
        return 2
    workdir = U.make_workdir(args.workdir, "kafka")
    broker = Broker(args.bootstrap, workdir)
    print("siphon Kafka backend benchmark")
    print(f"  workdir {workdir}; cores {os.cpu_count()}; load average "
          f"{U.load_average(' ')}")
    results: dict[str, Any] = {}
    try:
        broker.start()
        print(f"  broker {broker.bootstrap} (pid {broker.pid or '?'}"
              + (")" if broker.started or broker.pid else ": its CPU is in 'other')"))
        if "throughput" in parts:
            results["throughput"] = part_throughput(args, broker, workdir)
        if "visibility" in parts:
            results["visibility"] = part_visibility(args, broker, workdir)
        if "boot" in parts:
            results["boot"] = part_boot(args, broker, workdir)
    finally:
        broker.stop()
        U.finish(args, workdir, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
