#!/usr/bin/env python3
"""Full-call throughput and proxy-added latency of one ``siphon run`` node, driven by SIPp.

    SIPp UAC --INVITE--> siphon --INVITE--> SIPp UAS   (record-routed: ACK and BYE
             <-100------        <-180/200--            follow the route set through
             <-180/200--                               siphon too)
             --ACK/BYE-> siphon --ACK/BYE-> ...
             <-200------        <-200------

What it does:

1. generates a config in a temporary directory (embedded event log there, static
   credentials for the callee, admin API) running examples/registrar.py, and starts
   ``python -m siphon.cli run -c CONFIG``;
2. registers the callee ``sip:callee@example.com`` with a SIPp REGISTER carrying digest
   credentials, sent from the UAS's own port (so the binding points at the UAS);
3. throughput: for each rate, starts a SIPp UAS (bench/sipp/call_uas.xml, -m N; it
   copies the Record-Route back) and a SIPp UAC (bench/sipp/call_uac.xml) at that call
   rate for ``--duration`` seconds (-l bounds the concurrent calls), and reports per step
   the offered and achieved calls/s, failed calls, retransmissions, INVITE->200 response
   times (per call, from -trace_rtt), siphon's CPU and RSS, SIPp's CPU, and what siphon
   logged at WARNING or above; then the highest sustained rate (< --fail-threshold %
   failed calls and >= --min-achieved of the offered rate achieved);
4. latency: at ``--latency-rate`` calls/s, INVITE->200 times of the UAC calling the UAS
   directly vs through siphon: p50/p90/p99 of both and the difference, i.e. the latency
   siphon adds (the INVITE and the 180/200 each cross siphon once). SIPp's rtd timers
   (-trace_rtt) have a 1 ms resolution, so the per-call times are taken from the UAC's
   -trace_msg timestamps (microseconds; INVITE sent -> 200 OK for the INVITE received),
   with the -trace_rtt figures printed alongside.

SIPp itself runs on the same 2 cores: the UAC and UAS CPU are printed per step, and
'other' is everything else that kept the machine busy (before each run the script waits
up to --wait-idle s for the machine to be quiet).

Diagnostics: siphon runs (unchanged) under a gc.callbacks hook that logs every
generation-2 collection and every collection >= 5 ms ("GCPAUSE" lines in siphon.log,
summed per step; --no-gc-trace runs it plainly). --heap-census N also logs the tracked
objects every N s (commonest types; ProxySession / Branch / ServerTransaction /
TimerHandle counts; the sizes of Forwarder.branches/.sessions and of the server
transaction table; what holds a ProxySession), and --idle-after S shows what is still
held once the load stopped. --py-spy RATE profiles siphon during that step.

Examples:
    python bench/calls.py
    python bench/calls.py --rates 100,300,500 --duration 5 --py-spy 500
    python bench/calls.py --skip-throughput --latency-rate 100 --latency-duration 20
    python bench/calls.py --rates 100 --duration 20 --latency-rate 0 --heap-census 30 \\
        --idle-after 200
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U

UAC_XML = U.BENCH / "sipp" / "call_uac.xml"
UAS_XML = U.BENCH / "sipp" / "call_uas.xml"
REGISTER_XML = U.REPO / "tests" / "integration" / "sipp" / "register_auth.xml"
DEFAULT_RATES = "50,100,200,300,400,500,600,800"
CALLEE, PASSWORD = "callee", "secret"
SPY_RATE = 200  # py-spy samples/s


@dataclass
class Run:
    """One SIPp UAC (+ UAS) run and siphon's figures over it."""

    label: str
    rate: int
    calls: int
    uac_rc: int = -1
    uas_rc: int = -1
    created: int = 0
    successful: int = 0
    failed: int = 0
    unfinished: int = 0
    fail_pct: float = 0.0
    sent_per_s: float = 0.0       # INVITEs actually started per second (SIPp may lag)
    achieved_per_s: float = 0.0   # calls completed (200 for the BYE) per second
    uac_retrans: int = 0
    uas_retrans: int = 0
    uac_timeouts: int = 0
    uac_unexpected: int = 0
    uas_failed: int = 0
    invite_ms: dict[str, float] = field(default_factory=dict)   # from -trace_rtt (1 ms res.)
    bye_ms: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    siphon_cpu_pct: float = 0.0
    siphon_loop_pct: float = 0.0
    siphon_threads_pct: float = 0.0
    uac_cpu_pct: float = 0.0
    uas_cpu_pct: float = 0.0
    other_cpu_pct: float = 0.0
    siphon_rss: int = 0
    siphon_peak_loop_pct: float = 0.0   # busiest 1 s of the event-loop thread
    busy_pct: float = 0.0               # whole machine, % of one core (2 cores = 200 %)
    gc: dict[str, float] = field(default_factory=dict)
    siphon_log_warnings: int = 0
    siphon_log_sample: list[str] = field(default_factory=list)
    errors_sample: list[str] = field(default_factory=list)
    sustained: bool = False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = U.arg_parser(__doc__)
    p.add_argument("--rates", default=DEFAULT_RATES,
                   help=f"comma-separated call rates (calls/s) to offer (default {DEFAULT_RATES})")
    p.add_argument("--duration", type=float, default=10.0,
                   help="seconds per step: the UAC places rate*duration calls (default 10)")
    p.add_argument("--hold", type=int, default=500,
                   help="ms between the ACK and the BYE (SIPp -d; default 500)")
    p.add_argument("--limit", type=int, default=0,
                   help="max concurrent calls of the UAC (SIPp -l; default max(200, 3*rate))")
    U.add_step_args(p)
    p.add_argument("--latency-rate", type=int, default=100,
                   help="calls/s of the latency comparison (default 100; 0 skips it)")
    p.add_argument("--latency-duration", type=float, default=10.0,
                   help="seconds of each latency run (default 10)")
    p.add_argument("--wait-idle", type=float, default=60.0,
                   help="before each run, wait up to this many seconds for the machine to be "
                        "quiet (other processes < --idle-threshold %% of one core; default 60, "
                        "0 = don't wait)")
    p.add_argument("--idle-threshold", type=float, default=20.0,
                   help="%% of one core that other processes may use for the machine to count "
                        "as quiet (default 20)")
    p.add_argument("--no-gc-trace", action="store_true",
                   help="run siphon plainly, without the gc.callbacks hook that logs "
                        "garbage-collector pauses (generation 2, or >= 5 ms) to its log")
    p.add_argument("--heap-census", type=float, default=0.0, metavar="SECONDS",
                   help="(with the gc hook) log the number of tracked objects and the "
                        "commonest types in siphon every SECONDS, and print the last census "
                        "after each step and after --idle-after (default 0 = off)")
    p.add_argument("--idle-after", type=float, default=0.0, metavar="SECONDS",
                   help="after the last run, leave siphon idle this long and print its RSS "
                        "and heap census: what is still held once transactions expired "
                        "(default 0 = skip)")
    p.add_argument("--skip-throughput", action="store_true", help="only the latency comparison")
    p.add_argument("--log-level", default="info", choices=U.LOG_LEVELS,
                   help="siphon log level (default info)")
    U.add_common_args(p, port=True, py_spy=True)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- siphon

# Runs ``siphon.cli run -c CONFIG`` unchanged, with a gc.callbacks hook that writes one
# "GCPAUSE" line to stderr (siphon.log) per generation-2 collection and per collection
# that took >= 5 ms: garbage-collector pauses stop the event loop.
#
# With a census interval > 0 it also writes, every that many seconds, a "HEAPCENSUS" line:
# the number of objects the collector tracks and the most common types among them.
GC_TRACE = """
import gc, sys, time, runpy, threading, collections
_t = [0.0, 0.0]
def _cb(phase, info, _t=_t, _pc=time.perf_counter, _tt=time.thread_time):
    if phase == "start":
        _t[0], _t[1] = _pc(), _tt()
        return
    ms, cpu = 1000 * (_pc() - _t[0]), 1000 * (_tt() - _t[1])
    if info["generation"] == 2 or ms >= 5:
        sys.stderr.write("GCPAUSE gen=%d ms=%.1f cpu_ms=%.1f collected=%d objects=%d\\n" % (
            info["generation"], ms, cpu, info["collected"], len(gc.get_objects(2))
            if info["generation"] == 2 else -1))
        sys.stderr.flush()
gc.callbacks.append(_cb)
_WATCH = ("ProxySession", "Branch", "ServerTransaction", "ClientTransaction", "Request",
          "Response", "TimerHandle", "Task", "Future")
def _chain(obj, skip, depth=6):
    # types of what holds obj, then what holds the first holder, ... (one path)
    out = []
    for _ in range(depth):
        refs = [r for r in gc.get_referrers(obj)
                if r is not skip and type(r).__name__ not in ("frame", "list_iterator")]
        if not refs:
            break
        out.append("|".join(sorted({type(r).__qualname__ for r in refs})))
        obj = refs[0]
    return " <- ".join(out)
def _census(every):
    while True:
        time.sleep(every)
        objs = gc.get_objects()
        counts = collections.Counter(type(o).__qualname__ for o in objs)
        top = counts.most_common(10)
        held = {}
        tables = []
        for o in objs:
            name = type(o).__name__
            if name == "Forwarder":
                tables.append("Forwarder.branches=%d Forwarder.sessions=%d" % (
                    len(getattr(o, "branches", ())), len(getattr(o, "sessions", ()))))
            elif name == "ServerTransactionTable":
                tables.append("ServerTransactionTable=%d" % len(o))
        for o in objs:
            if type(o).__name__ == "ProxySession":
                m = getattr(getattr(o, "request", None), "method", "?")
                if m not in held:
                    held[m] = _chain(o, objs)
                if len(held) >= 2:
                    break
        n = len(objs)
        del objs
        sys.stderr.write("HEAPCENSUS t=%.0f tracked=%d %s | %s | %s\\n" % (
            time.time(), n, " ".join("%s=%d" % kv for kv in top),
            " ".join("%s=%d" % (w, counts.get(w, 0)) for w in _WATCH), " ".join(tables)))
        for m, c in held.items():
            sys.stderr.write("HEAPREF ProxySession(%s) <- %s\\n" % (m, c))
        sys.stderr.flush()
if float(sys.argv[2]) > 0:
    threading.Thread(target=_census, args=(float(sys.argv[2]),), daemon=True).start()
sys.argv = ["siphon", "run", "-c", sys.argv[1]]
runpy.run_module("siphon.cli", run_name="__main__", alter_sys=True)
"""
CENSUS_EVERY = [0.0]


def gc_traced_command(config: Path) -> list[str]:
    return [sys.executable, "-c", GC_TRACE, str(config), str(CENSUS_EVERY[0])]


def last_census(node: U.Siphon) -> str:
    lines = node.log_text().splitlines()
    idx = max((i for i, ln in enumerate(lines) if ln.startswith("HEAPCENSUS")), default=None)
    if idx is None:
        return ""
    refs = [ln for ln in lines[idx + 1 : idx + 3] if ln.startswith("HEAPREF")]
    return "\n          ".join([lines[idx], *refs])


def gc_pauses(lines: list[str]) -> dict[str, float]:
    """Count / total / max ms of the GCPAUSE lines (gen 2, or >= 5 ms) in ``lines``."""
    pauses = [(int(m.group(1)), float(m.group(2)), int(m.group(3)))
              for m in (re.search(r"GCPAUSE gen=(\d) ms=([\d.]+) .*objects=(-?\d+)",
                                  ln) for ln in lines) if m]
    gen2 = [ms for g, ms, _ in pauses if g == 2]
    return {"gen2": len(gen2), "gen2_max_ms": max(gen2, default=0.0),
            "gen2_total_ms": sum(gen2), "slow": len(pauses),
            "max_ms": max((ms for _, ms, _ in pauses), default=0.0),
            "total_ms": sum(ms for _, ms, _ in pauses),
            "gen2_objects": max((o for g, _, o in pauses if g == 2), default=0)}


class Sampler:
    """Samples siphon's CPU (all threads / event loop) and the machine's busy time every
    0.5 s in a thread, to get the figures of the window calls were being placed in
    (the UAC's own run also includes the 32 s timeouts of failed calls)."""

    def __init__(self, pid: int | None) -> None:
        import threading

        self.pid = pid
        self.samples: list[tuple[float, float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        cpu = loop = 0.0
        if self.pid is not None:
            try:
                cpu, loop = U.cpu_seconds(self.pid), U.thread_cpu(self.pid)["main"]
            except (FileNotFoundError, ProcessLookupError):
                pass
        self.samples.append((time.monotonic(), cpu, loop, U.system_busy()))

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def start(self) -> None:
        self._sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def window(self, t0: float, t1: float) -> tuple[float, float, float, float]:
        """(siphon %, event loop %, machine busy %, max event loop % over 1 s) in [t0, t1]."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return (float("nan"),) * 4
        a, b = inside[0], inside[-1]
        dt = b[0] - a[0]
        peak = 0.0
        for i in range(len(inside) - 2):
            x, y = inside[i], inside[i + 2]
            peak = max(peak, 100 * (y[2] - x[2]) / (y[0] - x[0]))
        return (100 * (b[1] - a[1]) / dt, 100 * (b[2] - a[2]) / dt, 100 * (b[3] - a[3]) / dt,
                peak)


# ---------------------------------------------------------------------------- SIPp


def register_callee(sip_port: int, uas_port: int, workdir: Path) -> None:
    """SIPp REGISTER with digest from ``uas_port``: the binding's Contact is the UAS."""
    users = workdir / "register.csv"
    users.write_text(f"SEQUENTIAL\n{CALLEE};{PASSWORD};"
                     f"[authentication username={CALLEE} password={PASSWORD}];\n")
    cmd = ["sipp", f"127.0.0.1:{sip_port}", "-sf", str(REGISTER_XML), "-inf", str(users),
           "-key", "domain", U.DOMAIN, "-i", "127.0.0.1", "-p", str(uas_port), "-m", "1",
           "-nostdin", "-timeout", "10s", "-timeout_error"]
    print("  register: " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, timeout=30, cwd=workdir)
    if proc.returncode != 0:
        raise RuntimeError("REGISTER failed:\n" + proc.stdout.decode(errors="replace")[-2000:])


def registered_contacts(admin_port: int) -> list[str]:
    url = f"http://127.0.0.1:{admin_port}/admin/registrations/sip:{CALLEE}@{U.DOMAIN}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    return [c.get("uri", str(c)) for c in body.get("contacts", [])]


def uas_command(port: int, calls: int, tag: str, workdir: Path) -> list[str]:
    return ["sipp", "-sf", str(UAS_XML), "-i", "127.0.0.1", "-p", str(port), "-t", "u1",
            "-m", str(calls), "-l", "15000", "-nostdin", "-buff_size", str(4 << 20),
            "-trace_stat", "-stf", str(workdir / f"uas_stat_{tag}.csv"), "-fd", "1",
            "-trace_err", "-error_file", str(workdir / f"uas_errors_{tag}.log")]


def uac_command(target: str, rate: int, calls: int, limit: int, hold: int, tag: str,
                workdir: Path, port: int, *, trace_msg: bool = False) -> list[str]:
    cmd = ["sipp", target, "-sf", str(UAC_XML), "-s", CALLEE, "-key", "domain", U.DOMAIN,
           "-i", "127.0.0.1", "-p", str(port), "-t", "u1", "-r", str(rate), "-rp", "1000",
           "-m", str(calls), "-l", str(limit), "-d", str(hold), "-nostdin",
           "-buff_size", str(4 << 20),
           "-timeout", f"{int(calls / max(rate, 1) + hold / 1000 + 60)}s",
           "-trace_stat", "-stf", str(workdir / f"uac_stat_{tag}.csv"), "-fd", "1",
           "-trace_rtt", "-rtt_freq", "100",
           "-trace_err", "-error_file", str(workdir / f"uac_errors_{tag}.log")]
    if trace_msg:
        cmd += ["-trace_msg", "-message_file", str(workdir / f"uac_messages_{tag}.log")]
    return cmd


def read_rtt(workdir: Path, scenario: str, pid: int) -> dict[str, list[tuple[float, float]]]:
    """SIPp -trace_rtt (<scenario>_<pid>_rtt.csv in the cwd): {rtd name: [(t_ms, rt_ms)]}
    where t_ms is when the timer stopped, in ms since SIPp started."""
    out: dict[str, list[tuple[float, float]]] = {}
    path = workdir / f"{scenario}_{pid}_rtt.csv"
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines()[1:]:
        parts = line.strip().split(";")
        if len(parts) >= 3:
            try:
                out.setdefault(parts[2], []).append((float(parts[0]), float(parts[1])))
            except ValueError:
                continue
    return out


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile ``q`` (0..1) of ``values``."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"n": len(values), "mean": sum(values) / len(values), "p50": percentile(values, .5),
            "p90": percentile(values, .9), "p99": percentile(values, .99),
            "max": max(values)}


_BLOCK = re.compile(r"^-{20,} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\n(UDP message (sent|received)"
                    r"[^\n]*)\n\n(.*?)(?=^-{20,} \d{4}-|\Z)", re.M | re.S)


def invite_times_from_messages(path: Path) -> list[float]:
    """Per call, ms from the first INVITE sent to the first 200 OK (CSeq INVITE) received,
    from the microsecond timestamps of a SIPp -trace_msg file."""
    from datetime import datetime

    sent: dict[str, float] = {}
    done: dict[str, float] = {}
    text = path.read_text(errors="replace")
    for m in _BLOCK.finditer(text):
        stamp, direction, msg = m.group(1), m.group(3), m.group(4)
        first = msg.split("\n", 1)[0]
        cid = re.search(r"^(?:Call-ID|i):\s*(\S+)", msg, re.M | re.I)
        cseq = re.search(r"^CSeq:\s*\d+\s+(\w+)", msg, re.M | re.I)
        if cid is None or cseq is None or cseq.group(1) != "INVITE":
            continue
        t = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()
        call = cid.group(1)
        if direction == "sent" and first.startswith("INVITE "):
            sent.setdefault(call, t)
        elif direction == "received" and first.startswith("SIP/2.0 200"):
            done.setdefault(call, t)
    return [1000 * (done[c] - sent[c]) for c in done if c in sent]


def error_sample(path: Path, n: int = 6) -> list[str]:
    """First lines of a SIPp -trace_err file that say what went wrong."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith(("---", "UDP message", "TCP message")) and (
                "rror" in line or "nexpected" in line or "Aborting" in line or "timeout" in line
                or "retrans" in line.lower() or line.startswith("SIP/2.0")):
            out.append(line[:200])
            if len(out) >= n:
                break
    return out


# ---------------------------------------------------------------------------- runs


def wait_idle(args: argparse.Namespace, node: U.Siphon | None) -> float:
    """Wait (up to --wait-idle s) until processes other than siphon keep less than
    --idle-threshold % of one core busy over a second; returns that last figure."""
    deadline = time.monotonic() + args.wait_idle
    while True:
        b0, t0 = U.system_busy(), time.monotonic()
        c0 = U.cpu_seconds(node.pid) if node is not None else 0.0
        time.sleep(1.0)
        c1 = U.cpu_seconds(node.pid) if node is not None else 0.0
        other = 100 * ((U.system_busy() - b0) - (c1 - c0)) / (time.monotonic() - t0)
        if other < args.idle_threshold or time.monotonic() > deadline:
            if other >= args.idle_threshold and args.wait_idle > 0:
                print(f"  (machine still busy: other processes use {other:.0f}% of a core)")
            return other


def run_calls(label: str, rate: int, duration: float, args: argparse.Namespace,
              node: U.Siphon | None, workdir: Path, uas_port: int, *, via_siphon: bool,
              trace_msg: bool = False, spy: bool = False, show_cmds: bool = False) -> Run:
    calls = max(1, round(rate * duration))
    limit = args.limit or max(200, 3 * rate)
    run = Run(label=label, rate=rate, calls=calls)
    tag = label
    for stale in workdir.glob(f"*_{tag}.*"):
        stale.unlink()
    uas_cmd = uas_command(uas_port, calls, tag, workdir)
    target = f"127.0.0.1:{args.port}" if via_siphon else f"127.0.0.1:{uas_port}"
    uac_cmd = uac_command(target, rate, calls, limit, args.hold, tag, workdir,
                          U.free_port(2), trace_msg=trace_msg)
    if show_cmds:
        print("  UAS: " + " ".join(uas_cmd))
        print("  UAC: " + " ".join(uac_cmd))
    if args.wait_idle > 0:
        wait_idle(args, node)
    log_offset = node.logfile.stat().st_size if node is not None and node.logfile.exists() else 0
    uas_out = open(workdir / f"uas_{tag}.out", "wb")
    uac_out = open(workdir / f"uac_{tag}.out", "wb")
    uas = subprocess.Popen(uas_cmd, stdout=uas_out, stderr=subprocess.STDOUT, cwd=workdir)
    time.sleep(0.3)
    if uas.poll() is not None:
        raise RuntimeError(f"SIPp UAS exited at once: {(workdir / f'uas_{tag}.out').read_text()}")
    if node is not None:
        cpu0, thr0 = U.cpu_seconds(node.pid), U.thread_cpu(node.pid)
    busy0 = U.system_busy()
    sampler = Sampler(node.pid if node is not None else None)
    sampler.start()
    t0 = time.monotonic()
    spy_proc = None
    if spy and node is not None:
        spy_proc = U.start_py_spy(node.pid, duration, workdir / f"py-spy_{tag}.txt",
                                  rate=SPY_RATE, nonblocking=True, echo=True)
    uac = subprocess.Popen(uac_cmd, stdout=uac_out, stderr=subprocess.STDOUT, cwd=workdir)
    run.uac_rc, uac_cpu = U.wait_rusage(uac)
    run.wall = time.monotonic() - t0
    if node is not None:
        cpu1, thr1 = U.cpu_seconds(node.pid), U.thread_cpu(node.pid)
        run.siphon_rss = U.rss(node.pid)
    # the UAS ends its last calls 0.5 s (timewait) after their BYE; unfinished ones are
    # calls whose ACK or BYE never arrived
    run.uas_rc, uas_cpu = U.wait_rusage(uas, timeout=3.0)
    busy = U.system_busy() - busy0
    sampler.stop()
    uas_out.close()
    uac_out.close()
    if spy_proc is not None:
        spy_proc.wait()
    # CPU figures over the window the calls were placed in (skipping the first second):
    # the UAC's run also lasts through the 32 s timeouts of failed calls, if any.
    window = run.wall
    sw = sampler.window(t0 + min(1.0, duration / 4), t0 + duration + args.hold / 1000)
    if node is not None:
        run.siphon_cpu_pct = 100 * (cpu1 - cpu0) / window
        run.siphon_loop_pct = 100 * (thr1["main"] - thr0["main"]) / window
        run.siphon_threads_pct = 100 * (thr1["threads"] - thr0["threads"]) / window
        if sw[0] == sw[0]:
            run.siphon_cpu_pct, run.siphon_loop_pct = sw[0], sw[1]
            run.siphon_threads_pct = sw[0] - sw[1]
            run.siphon_peak_loop_pct = sw[3]
    # SIPp's CPU is only known for its whole run (rusage), so it is averaged over the
    # placing window when the run was not much longer, else over its run
    sipp_window = window if window > duration + args.hold / 1000 + 5 else duration
    run.uac_cpu_pct = 100 * uac_cpu / sipp_window
    run.uas_cpu_pct = 100 * uas_cpu / sipp_window
    window_all = time.monotonic() - t0
    run.busy_pct = sw[2] if sw[2] == sw[2] else 100 * busy / window_all
    run.other_cpu_pct = max(0.0, run.busy_pct - run.siphon_cpu_pct - run.uac_cpu_pct
                            - run.uas_cpu_pct)

    st = U.read_sipp_stats(workdir / f"uac_stat_{tag}.csv")
    ust = U.read_sipp_stats(workdir / f"uas_stat_{tag}.csv")
    run.created = U.stat_int(st, "OutgoingCall(C)")
    run.successful = U.stat_int(st, "SuccessfulCall(C)")
    run.failed = U.stat_int(st, "FailedCall(C)")
    run.unfinished = max(0, calls - run.successful - run.failed)
    run.fail_pct = 100.0 * (run.failed + run.unfinished) / calls
    run.uac_retrans = U.stat_int(st, "Retransmissions(C)")
    run.uac_timeouts = U.stat_int(st, "FailedTimeoutOnRecv(C)") + U.stat_int(
        st, "FailedMaxUDPRetrans(C)")
    run.uac_unexpected = U.stat_int(st, "FailedUnexpectedMessage(C)")
    run.uas_retrans = U.stat_int(ust, "Retransmissions(C)")
    run.uas_failed = U.stat_int(ust, "FailedCall(C)")

    rtt = read_rtt(workdir, "call_uac", uac.pid)
    inv, bye = rtt.get("invite", []), rtt.get("bye", [])
    run.invite_ms = summary([rt for _, rt in inv])
    run.bye_ms = summary([rt for _, rt in bye])
    starts = sorted(t - rt for t, rt in inv)
    if len(starts) > 1 and starts[-1] > starts[0]:
        run.sent_per_s = 1000 * (len(starts) - 1) / (starts[-1] - starts[0])
    ends = sorted(t for t, _ in bye)
    if len(ends) > 1 and ends[-1] > ends[0]:
        run.achieved_per_s = 1000 * (len(ends) - 1) / (ends[-1] - ends[0])
        # failed calls leave gaps: scale by the share that succeeded over the same span
    elif run.successful:
        run.achieved_per_s = run.successful / max(1e-3, run.wall - args.hold / 1000)
    run.errors_sample = (error_sample(workdir / f"uac_errors_{tag}.log")
                         + error_sample(workdir / f"uas_errors_{tag}.log", 3))
    if node is not None:
        with open(node.logfile, "rb") as f:
            f.seek(log_offset)
            new = f.read().decode(errors="replace").splitlines()
        if not args.no_gc_trace:
            run.gc = gc_pauses(new)
        bad = [ln for ln in new if re.search(r"WARNING|ERROR|CRITICAL|Traceback|Error", ln)]
        run.siphon_log_warnings = len(bad)
        seen: list[str] = []
        for ln in bad:
            key = re.sub(r"\d+", "#", ln)[:100]
            if key not in {re.sub(r"\d+", "#", s)[:100] for s in seen}:
                seen.append(ln[:300])
            if len(seen) >= 5:
                break
        run.siphon_log_sample = seen
    run.sustained = (run.fail_pct < args.fail_threshold
                     and run.achieved_per_s >= args.min_achieved * rate)
    return run


def _f(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None or v != v else format(v, fmt)


def print_header() -> str:
    hdr = (f"{'offered/s':>9} {'calls':>6} {'sent/s':>7} {'ok/s':>7} {'fail%':>6} "
           f"{'retr':>11} {'inv p50':>7} {'p99':>6} {'max':>6}  {'siphon (loop+thr)':>17} "
           f"{'peak':>5} "
           f"{'UAC':>5} {'UAS':>5} {'other':>5} {'RSS':>9} {'GC2 n/max':>10}  sustained")
    print(hdr)
    print("-" * len(hdr))
    return hdr


def print_run(r: Run) -> None:
    inv = r.invite_ms
    gc2 = f"{r.gc.get('gen2', 0):.0f}/{r.gc.get('gen2_max_ms', 0):.0f}ms" if r.gc else "-"
    print(f"{r.rate:>9} {r.calls:>6} {r.sent_per_s:>7.0f} {r.achieved_per_s:>7.0f} "
          f"{r.fail_pct:>6.2f} {f'{r.uac_retrans}/{r.uas_retrans}':>11} "
          f"{_f(inv.get('p50'), '.0f'):>5}ms {_f(inv.get('p99'), '.0f'):>4}ms "
          f"{_f(inv.get('max'), '.0f'):>4}ms  {r.siphon_cpu_pct:>5.0f}% "
          f"{f'({r.siphon_loop_pct:.0f}+{r.siphon_threads_pct:.0f})':>11} "
          f"{r.siphon_peak_loop_pct:>4.0f}% "
          f"{r.uac_cpu_pct:>4.0f}% {r.uas_cpu_pct:>4.0f}% {r.other_cpu_pct:>4.0f}% "
          f"{U.fmt_bytes(r.siphon_rss):>9} {gc2:>10}  {'yes' if r.sustained else 'NO'}",
          flush=True)
    problems = []
    if r.failed or r.unfinished or r.uac_rc != 0:
        problems.append(f"UAC exit {r.uac_rc}: {r.failed} failed ({r.uac_timeouts} timeouts, "
                        f"{r.uac_unexpected} unexpected msgs), {r.unfinished} unfinished; "
                        f"UAS exit {r.uas_rc}, {r.uas_failed} failed")
    if r.gc and (r.gc.get("gen2") or r.gc.get("slow")):
        problems.append(f"siphon GC: {r.gc['slow']} collections >= 5 ms or gen 2, total "
                        f"{r.gc['total_ms']:.0f} ms, longest {r.gc['max_ms']:.0f} ms; "
                        f"{r.gc['gen2']} gen-2 collections (total {r.gc['gen2_total_ms']:.0f} "
                        f"ms), up to {r.gc['gen2_objects']:,} objects in gen 2")
    if r.siphon_log_warnings:
        problems.append(f"siphon logged {r.siphon_log_warnings} warning/error lines, e.g.:")
        problems.extend("    " + s for s in r.siphon_log_sample)
    if r.errors_sample and (r.failed or r.unfinished):
        problems.append("SIPp error trace (first lines):")
        problems.extend("    " + s for s in r.errors_sample)
    for p in problems:
        print("          " + p)


def latency_report(direct: list[float], proxied: list[float], rd: Run, rp: Run) -> dict:
    d, p = summary(direct), summary(proxied)
    print(f"{'':22} {'n':>6} {'mean':>8} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}   "
          f"(ms, INVITE sent -> 200 OK received, from -trace_msg timestamps)")
    for name, s in (("UAC -> UAS (direct)", d), ("UAC -> siphon -> UAS", p)):
        if s:
            print(f"{name:22} {s['n']:>6} {s['mean']:>8.3f} {s['p50']:>8.3f} {s['p90']:>8.3f} "
                  f"{s['p99']:>8.3f} {s['max']:>8.3f}")
    if d and p:
        print(f"{'added by siphon':22} {'':>6} {p['mean'] - d['mean']:>8.3f} "
              f"{p['p50'] - d['p50']:>8.3f} {p['p90'] - d['p90']:>8.3f} "
              f"{p['p99'] - d['p99']:>8.3f}")
    print("  -trace_rtt (SIPp rtd timer, 1 ms resolution): "
          f"direct p50 {_f(rd.invite_ms.get('p50'))} p99 {_f(rd.invite_ms.get('p99'))} "
          f"mean {_f(rd.invite_ms.get('mean'), '.2f')} ms; via siphon p50 "
          f"{_f(rp.invite_ms.get('p50'))} p99 {_f(rp.invite_ms.get('p99'))} "
          f"mean {_f(rp.invite_ms.get('mean'), '.2f')} ms")
    print(f"  BYE -> 200 (-trace_rtt): direct p50 {_f(rd.bye_ms.get('p50'))} p99 "
          f"{_f(rd.bye_ms.get('p99'))} ms; via siphon p50 {_f(rp.bye_ms.get('p50'))} p99 "
          f"{_f(rp.bye_ms.get('p99'))} ms")
    print(f"  failures: direct {rd.fail_pct:.2f}%, via siphon {rp.fail_pct:.2f}%; "
          f"siphon CPU at {rp.rate}/s {rp.siphon_cpu_pct:.0f}%; other processes "
          f"{rd.other_cpu_pct:.0f}% / {rp.other_cpu_pct:.0f}% of a core"
          + (f"; siphon GC {rp.gc.get('gen2', 0):.0f} gen-2 collections, longest pause "
             f"{rp.gc.get('max_ms', 0):.0f} ms" if rp.gc else ""))
    return {"direct": d, "siphon": p,
            "added": {k: p[k] - d[k] for k in ("mean", "p50", "p90", "p99")} if d and p else {}}


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if U.sipp_missing("calls.py"):
        return 2
    rates = U.parse_rates(args.rates)
    args.port = args.port or U.free_port(2)
    uas_port = U.free_port(2)
    workdir = U.make_workdir(args.workdir, "calls")
    config = workdir / "siphon.yaml"
    log_path = workdir / "events.db"
    U.fresh_log(log_path)
    admin_port = U.free_port(1)
    U.write_config(config, log_path=log_path, users={CALLEE: PASSWORD}, udp_port=args.port,
                   admin_port=admin_port, log_level=args.log_level)

    print("siphon call benchmark (INVITE/100/180/200/ACK/BYE/200, record-routed, UDP)")
    print(f"  workdir   {workdir}")
    print(f"  config    {config}  (script {U.EXAMPLE_SCRIPT}, log level {args.log_level})")
    print(f"  siphon    udp 127.0.0.1:{args.port}; callee UAS 127.0.0.1:{uas_port}; "
          f"cores {os.cpu_count()}")
    print(f"  scenarios {UAC_XML.name} / {UAS_XML.name}; hold {args.hold} ms; "
          f"{args.duration:g} s per step")
    if not args.no_gc_trace:
        U.siphon_command = gc_traced_command  # U.Siphon.start() looks it up at call time
        CENSUS_EVERY[0] = args.heap_census
        print("  siphon runs under a gc.callbacks hook (GCPAUSE lines in its log; "
              "--no-gc-trace to run it plainly)")
    node = U.Siphon(config, workdir, admin_port)
    print("  siphon: " + " ".join(U.siphon_command(config)).replace("\n", "\\n"))
    node.start()
    U.print_ready(node)
    results: dict = {"steps": [], "latency": {}}
    steps: list[Run] = []
    try:
        register_callee(args.port, uas_port, workdir)
        print(f"  sip:{CALLEE}@{U.DOMAIN} -> {registered_contacts(admin_port)}")
        if not args.skip_throughput:
            print()
            print("Throughput. CPU columns: % of one core while calls were placed (2 cores = "
                  "200%); siphon = all its threads, peak = its event-loop thread's busiest "
                  "second; other = processes other than siphon and SIPp. retr = UAC/UAS "
                  "retransmissions; inv = INVITE->200 (-trace_rtt); GC2 = siphon's "
                  "generation-2 collections / longest")
            unsustained = 0
            for i, rate in enumerate(rates):
                run = run_calls(f"step{rate}", rate, args.duration, args, node, workdir,
                                uas_port, via_siphon=True, spy=args.py_spy == rate,
                                show_cmds=i == 0)
                if i == 0:
                    print_header()
                steps.append(run)
                print_run(run)
                if args.heap_census and not args.no_gc_trace:
                    print("          " + last_census(node))
                if not node.alive():
                    print(f"siphon died during the {rate}/s step:\n{node.log_tail(40)}")
                    return 1
                spyfile = workdir / f"py-spy_step{rate}.txt"
                if args.py_spy == rate and spyfile.exists():
                    print(f"\n  py-spy profile of siphon at {rate}/s ({spyfile}):")
                    print(U.summarize_by_thread(spyfile, max(1, int(args.duration)), SPY_RATE))
                    print()
                unsustained = 0 if run.sustained else unsustained + 1
                if args.stop_after and unsustained >= args.stop_after:
                    print(f"(stopping: {unsustained} consecutive unsustained steps)")
                    break
                time.sleep(args.settle)
            results["steps"] = [asdict(s) for s in steps]
            best = max((s for s in steps if s.sustained), key=lambda s: s.rate, default=None)
            print()
            if best is None:
                print(f"highest sustained rate: none (< {args.fail_threshold}% failed and "
                      f">= {args.min_achieved:.0%} of the offered rate achieved)")
            else:
                print(f"highest sustained rate: {best.rate} calls/s offered, "
                      f"{best.achieved_per_s:.0f}/s completed, {best.fail_pct:.2f}% failed, "
                      f"siphon CPU {best.siphon_cpu_pct:.0f}%, SIPp UAC+UAS CPU "
                      f"{best.uac_cpu_pct + best.uas_cpu_pct:.0f}% "
                      f"(target >= 500 calls/s: {'MET' if best.rate >= 500 else 'MISSED'})")
            peak = max(steps, key=lambda s: s.achieved_per_s, default=None)
            if peak is not None:
                print(f"highest completed rate in any step: {peak.achieved_per_s:.0f} calls/s "
                      f"(offered {peak.rate}/s, {peak.fail_pct:.2f}% failed)")
            results["highest_sustained"] = best.rate if best else None

        if args.latency_rate:
            time.sleep(args.settle)
            rate = args.latency_rate
            print()
            print(f"Proxy-added latency at {rate} calls/s ({args.latency_duration:g} s each)")
            rd = run_calls(f"direct{rate}", rate, args.latency_duration, args, None, workdir,
                           uas_port, via_siphon=False, trace_msg=True, show_cmds=True)
            time.sleep(args.settle)
            rp = run_calls(f"siphon{rate}", rate, args.latency_duration, args, node, workdir,
                           uas_port, via_siphon=True, trace_msg=True, show_cmds=True)
            direct = invite_times_from_messages(workdir / f"uac_messages_direct{rate}.log")
            proxied = invite_times_from_messages(workdir / f"uac_messages_siphon{rate}.log")
            results["latency"] = latency_report(direct, proxied, rd, rp)
            results["latency_runs"] = [asdict(rd), asdict(rp)]
        if args.idle_after:
            print()
            print(f"siphon RSS right after the runs: {U.fmt_bytes(U.rss(node.pid))}; "
                  f"idle for {args.idle_after:g} s...")
            time.sleep(args.idle_after)
            print(f"siphon RSS after {args.idle_after:g} s idle: {U.fmt_bytes(U.rss(node.pid))}")
            if args.heap_census and not args.no_gc_trace:
                print("  " + last_census(node))
    finally:
        status = U.proc_status(node.pid) if node.alive() else {}
        tail = node.log_tail(15)
        node.stop()
    print()
    print(f"siphon peak RSS (VmHWM) {U.fmt_bytes(status.get('VmHWM', 0))}")
    print("siphon log tail:")
    print("\n".join("  " + ln for ln in tail.splitlines()))
    U.finish(args, workdir, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
