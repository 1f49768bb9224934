#!/usr/bin/env python3
"""Three siphon nodes on one Kafka topic (compose/local-cluster), SIPp load spread
over all three: total authenticated registrations/s, cross-node visibility, lag.

The cluster is the compose topology run as processes by ``compose/local-cluster``
(exactly compose/config/siphon.yaml; Kafka from scripts/kafka.sh unless
--kafka-bootstrap). Users ``user00000..`` / "password" reach every node through
``SIPHON_AUTH_USERS`` (a YAML flow mapping the config reads), the script is the
registrar recipe, the log level the compose default (info).

For each total rate R: three SIPp processes, one per node, each at R/3 calls/s on
its own third of the users, run bench/sipp/register_auth.xml (REGISTER -> 401 ->
REGISTER with digest -> 200; a 200 is sent once the event is acknowledged by Kafka
and applied by that node). Meanwhile:

* visibility probes: a Python UAC registers ``probeNN@example.com`` on one node
  (round robin) with a fresh Call-ID; from the moment the 200 arrives it polls the
  two other nodes' admin API (``GET /admin/registrations/{aor}``) every
  --poll-ms until they show that Call-ID. The time to the first poll that sees it
  is an upper bound of the cross-node visibility, quantised by the poll interval
  (plus one admin round trip, reported too: the admin API shares the node's event
  loop with SIP); p50/p99/max over every (probe, other node) pair. Before the
  load, --idle-probes probes give the baseline;
* every --scrape-interval s, /metrics of each node: ``siphon_consumer_lag`` summed
  over partitions (end offsets as the node last read them, refreshed every 2 s, minus
  the node's applied position), applied events, REGISTER outcomes.

Example:  python bench/cluster.py
          python bench/cluster.py --rates 150,300 --duration 10 --keep
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U
import register as R

LOCAL_CLUSTER = U.REPO / "compose" / "local-cluster"
NODES = ("node1", "node2", "node3")
DEFAULT_RATES = "150,300,450,600,750"
PASSWORD = "password"
PROBE_USERS = 40
MAX_ENV_BYTES = 120_000  # one environment string must stay under Linux's 128 KiB


# ---------------------------------------------------------------------------- cluster


class Cluster:
    """``compose/local-cluster`` in a work directory."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.dir = workdir / "cluster"
        self.env = env
        self.values: dict[str, str] = {}
        self.state: dict = {}

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(LOCAL_CLUSTER), *args, "--dir", str(self.dir)],
                              env=self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=U.REPO, check=False)

    def start(self, bootstrap: str | None) -> float:
        args = ["start", "--ports", "free", "--topic", f"siphon-bench-{secrets.token_hex(4)}",
                "--timeout", "180"]
        if bootstrap:
            args += ["--kafka-bootstrap", bootstrap]
        t0 = time.monotonic()
        done = self.cli(*args)
        if done.returncode != 0:
            raise RuntimeError(f"local-cluster start failed:\n{done.stdout}{done.stderr}")
        self.values = dict(line.split("=", 1) for line in
                           (self.dir / "cluster.env").read_text().splitlines() if "=" in line)
        self.state = json.loads((self.dir / "cluster.json").read_text())
        return time.monotonic() - t0

    def stop(self) -> None:
        done = self.cli("stop", timeout=300)
        if done.returncode != 0:
            print(f"local-cluster stop: {done.stdout}{done.stderr}", file=sys.stderr)

    def port(self, node: str, kind: str) -> int:
        return int(self.values[f"{node.upper()}_{kind.upper()}"].rsplit(":", 1)[1])

    def pid(self, node: str) -> int:
        return int(self.values[f"{node.upper()}_PID"])

    def kafka_pid(self) -> int | None:
        kdir = self.state.get("kafka", {}).get("dir")
        try:
            return int(Path(kdir, "kafka.pid").read_text().split()[0]) if kdir else None
        except (OSError, ValueError, IndexError):
            return None

    def alive(self, node: str) -> bool:
        return Path(f"/proc/{self.pid(node)}").exists()


# ---------------------------------------------------------------------------- scraping


def scrape(cluster: Cluster, node: str) -> dict[str, float]:
    """The few series this benchmark watches, from one node's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = U.http("GET", f"http://127.0.0.1:{cluster.port(node, 'admin')}/metrics",
                          timeout=5)
    if status != 200:
        return {}
    out = {"lag": 0.0, "lag_max_partition": 0.0}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == "siphon_consumer_lag":
                out["lag"] += s.value
                out["lag_max_partition"] = max(out["lag_max_partition"], s.value)
            elif s.name == "siphon_projection_applied_events_total":
                out["applied"] = s.value
            elif s.name == "siphon_registrations_total":
                out[f"reg_{s.labels['outcome']}"] = s.value
            elif s.name == "siphon_bindings":
                out["bindings"] = s.value
    return out


class Scraper(threading.Thread):
    """Scrapes every node every ``interval`` s until stopped."""

    def __init__(self, cluster: Cluster, interval: float) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.interval = interval
        self.samples: list[tuple[float, str, dict[str, float]]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            t = time.monotonic()
            for node in NODES:
                try:
                    self.samples.append((t, node, scrape(self.cluster, node)))
                except OSError as exc:
                    self.samples.append((t, node, {"error": 1.0}))
                    print(f"  (scrape {node}: {exc})", file=sys.stderr)
            self.stopping.wait(max(0.0, self.interval - (time.monotonic() - t)))

    def stop(self) -> None:
        self.stopping.set()
        self.join()


# ---------------------------------------------------------------------------- probes


class Prober(threading.Thread):
    """Registers a probe AoR on one node, then times when the others show it."""

    def __init__(self, cluster: Cluster, rate: float, poll_ms: float, offset: int = 0) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.period = 1.0 / rate if rate > 0 else 0.0
        self.poll = poll_ms / 1000.0
        self.seq = offset
        self.visible_ms: list[float] = []
        self.register_ms: list[float] = []
        self.poll_ms: list[float] = []
        """Round trip of every admin API poll: how much of a visibility figure is the
        measuring itself (the admin API shares the node's event loop with SIP)."""
        self.failures: list[str] = []
        self.stopping = threading.Event()

    def one(self) -> None:
        from tests.integration.sipclient import UdpClient  # the test suite's small UAC

        origin = NODES[self.seq % 3]
        others = [n for n in NODES if n != origin]
        user = f"probe{self.seq % PROBE_USERS:02d}"
        self.seq += 1
        aor = f"sip:{user}@{U.DOMAIN}"
        call_id = f"{secrets.token_hex(8)}@bench-probe"
        with UdpClient(self.cluster.port(origin, "sip")) as ua:
            t_send = time.monotonic()
            try:
                resp, _ = ua.register(user, PASSWORD, call_id=call_id, expires=600)
            except AssertionError as exc:
                self.failures.append(f"{origin}: {exc}")
                return
            t0 = time.monotonic()
        if resp.status != 200:
            self.failures.append(f"{origin}: {resp.status} {resp.reason}")
            return
        self.register_ms.append(1000 * (t0 - t_send))
        path = "/admin/registrations/" + urllib.parse.quote(aor, safe="")
        pending = {n: f"http://127.0.0.1:{self.cluster.port(n, 'admin')}{path}" for n in others}
        deadline = t0 + 10.0
        while pending and time.monotonic() < deadline:
            for node, url in list(pending.items()):
                t_poll = time.monotonic()
                try:
                    status, body = U.http("GET", url, timeout=2)
                except OSError:
                    continue
                self.poll_ms.append(1000 * (time.monotonic() - t_poll))
                if status == 200 and any(c.get("call_id") == call_id
                                         for c in json.loads(body)["contacts"]):
                    self.visible_ms.append(1000 * (time.monotonic() - t0))
                    del pending[node]
            if pending:
                time.sleep(self.poll)
        for node in pending:
            self.failures.append(f"{aor} from {origin} not on {node} after 10 s")

    def run(self) -> None:
        while not self.stopping.is_set():
            t = time.monotonic()
            try:
                self.one()
            except OSError as exc:
                self.failures.append(str(exc))
            self.stopping.wait(max(0.0, self.period - (time.monotonic() - t)))

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


# ---------------------------------------------------------------------------- SIPp


@dataclass
class SippRun:
    node: str
    rate: int
    calls: int
    rc: int = -1
    ok: int = 0
    failed: int = 0
    elapsed: float = 0.0
    retrans: int = 0
    buckets: list[int] = field(default_factory=list)
    rt_mean_ms: float = 0.0
    cpu: float = 0.0


def start_sipp(run: SippRun, target: int, users_csv: Path, workdir: Path,
               tag: str) -> subprocess.Popen[bytes]:
    stf = workdir / f"stat_{tag}_{run.node}.csv"
    stf.unlink(missing_ok=True)
    cmd = [
        "sipp", f"127.0.0.1:{target}", "-sf", str(R.SCENARIO), "-inf", str(users_csv),
        "-key", "domain", U.DOMAIN, "-i", "127.0.0.1", "-p", str(U.free_port(2)),
        "-t", "u1", "-r", str(run.rate), "-rp", "1000", "-m", str(run.calls),
        "-l", str(max(run.rate * 10, 500)), "-nostdin", "-trace_stat", "-stf", str(stf),
        "-fd", "1", "-trace_err", "-error_file", str(workdir / f"errors_{tag}_{run.node}.log"),
    ]
    with open(workdir / f"sipp_{tag}_{run.node}.out", "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)


def finish_sipp(run: SippRun, proc: subprocess.Popen[bytes], workdir: Path, tag: str,
                wall0: float) -> None:
    run.rc, run.cpu = U.wait_rusage(proc)
    st = U.read_sipp_stats(workdir / f"stat_{tag}_{run.node}.csv")
    run.ok, run.failed = U.stat_int(st, "SuccessfulCall(C)"), U.stat_int(st, "FailedCall(C)")
    if run.rc != 0:
        run.failed = max(run.failed, run.calls - run.ok)
    run.elapsed = U.sipp_elapsed(st, time.monotonic() - wall0)
    run.retrans = U.stat_int(st, "Retransmissions(C)")
    run.buckets = U.rtd_buckets(st)
    run.rt_mean_ms = U.rtd_ms(st.get("ResponseTimereg(C)", ""))


# ---------------------------------------------------------------------------- steps


@dataclass
class Step:
    rate: int
    calls: int
    ok: int
    failed: int
    achieved: float
    fail_pct: float
    per_node_ok: dict[str, float]
    retrans: int
    rt_p50_ms: float
    rt_p95_ms: float
    rt_p99_ms: float
    vis_n: int
    vis_p50_ms: float
    vis_p99_ms: float
    vis_max_ms: float
    poll_p50_ms: float
    poll_p99_ms: float
    probe_reg_p50_ms: float
    probe_failures: int
    lag_max: dict[str, float]
    lag_max_partition: float
    lag_end: dict[str, float]
    applied: dict[str, float]
    cpu_pct: dict[str, float]
    sustained: bool = False


def run_step(rate: int, args: argparse.Namespace, cluster: Cluster, slices: dict[str, Path],
             workdir: Path) -> Step:
    per_node = rate // 3
    calls = max(1, round(per_node * args.duration))
    tag = str(rate)
    pids = {n: cluster.pid(n) for n in NODES}
    kafka = cluster.kafka_pid()
    if kafka:
        pids["kafka"] = kafka
    cpu0 = {n: U.cpu_seconds(p) for n, p in pids.items()}
    busy0, self0 = U.system_busy(), U.cpu_seconds(os.getpid())
    scraper = Scraper(cluster, args.scrape_interval)
    prober = Prober(cluster, args.probe_rate, args.poll_ms, offset=rate)
    scraper.start()
    prober.start()
    t0 = time.monotonic()
    runs = {n: SippRun(n, per_node, calls) for n in NODES}
    procs = {n: start_sipp(runs[n], cluster.port(n, "sip"), slices[n], workdir, tag)
             for n in NODES}
    for n in NODES:
        finish_sipp(runs[n], procs[n], workdir, tag, t0)
    window = time.monotonic() - t0
    busy = U.system_busy() - busy0
    cpu = {n: 100 * (U.cpu_seconds(p) - cpu0[n]) / window for n, p in pids.items()
           if Path(f"/proc/{p}").exists()}
    cpu["sipp x3"] = 100 * sum(r.cpu for r in runs.values()) / window
    cpu["probes"] = 100 * (U.cpu_seconds(os.getpid()) - self0) / window
    # Everything else on the machine: other processes' CPU (the figures are only as
    # good as the cores this run got).
    cpu["other"] = max(0.0, 100 * busy / window - sum(cpu.values()))
    prober.stop()
    time.sleep(args.scrape_interval * 3)  # let the lag gauge settle after the load
    scraper.stop()

    ok = sum(r.ok for r in runs.values())
    failed = sum(r.failed for r in runs.values())
    elapsed = max(r.elapsed for r in runs.values()) or window
    buckets = [sum(col) for col in zip(*(r.buckets for r in runs.values()), strict=True)]
    by_node: dict[str, list[tuple[float, dict[str, float]]]] = {n: [] for n in NODES}
    for t, node, sample in scraper.samples:
        by_node[node].append((t, sample))
    lag_max = {n: max((s.get("lag", 0.0) for _, s in by_node[n]), default=float("nan"))
               for n in NODES}
    lag_end = {n: by_node[n][-1][1].get("lag", float("nan")) if by_node[n] else float("nan")
               for n in NODES}
    lag_part = max((s.get("lag_max_partition", 0.0) for n in NODES for _, s in by_node[n]),
                   default=float("nan"))
    applied = {}  # events each node applied from the first to the last scrape
    for n in NODES:
        pts = [s["applied"] for _, s in by_node[n] if "applied" in s]
        applied[n] = pts[-1] - pts[0] if len(pts) >= 2 else float("nan")
    vis = prober.visible_ms
    step = Step(
        rate=rate, calls=3 * calls, ok=ok, failed=failed, achieved=ok / elapsed,
        fail_pct=100.0 * failed / max(1, 3 * calls),
        per_node_ok={n: r.ok / (r.elapsed or window) for n, r in runs.items()},
        retrans=sum(r.retrans for r in runs.values()),
        rt_p50_ms=U.percentile_from_buckets(buckets, 0.50),
        rt_p95_ms=U.percentile_from_buckets(buckets, 0.95),
        rt_p99_ms=U.percentile_from_buckets(buckets, 0.99),
        vis_n=len(vis), vis_p50_ms=quantile(vis, 0.50), vis_p99_ms=quantile(vis, 0.99),
        vis_max_ms=max(vis, default=float("nan")),
        poll_p50_ms=quantile(prober.poll_ms, 0.50), poll_p99_ms=quantile(prober.poll_ms, 0.99),
        probe_reg_p50_ms=statistics.median(prober.register_ms) if prober.register_ms
        else float("nan"),
        probe_failures=len(prober.failures), lag_max=lag_max, lag_max_partition=lag_part,
        lag_end=lag_end, applied=applied, cpu_pct=cpu)
    step.sustained = step.fail_pct < args.fail_threshold and \
        step.achieved >= args.min_achieved * (3 * per_node)
    for failure in prober.failures[:3]:
        print(f"  probe: {failure}")
    return step


def baseline(cluster: Cluster, args: argparse.Namespace) -> tuple[list[float], list[str]]:
    """Visibility with no load: ``args.idle_probes`` probes back to back."""
    prober = Prober(cluster, 0, args.poll_ms)
    for _ in range(args.idle_probes):
        prober.one()
    return prober.visible_ms, prober.failures


def fmt(v: float, unit: str = "") -> str:
    if v != v:
        return "-"
    if v == float("inf"):
        return ">5s"
    return f"{v:.0f}{unit}"


def print_step(s: Step) -> None:
    lag = "/".join(fmt(s.lag_max[n]) for n in NODES)
    end = "/".join(fmt(s.lag_end[n]) for n in NODES)
    applied = "/".join(fmt(s.applied[n]) for n in NODES)
    nodes_ok = "/".join(fmt(s.per_node_ok[n]) for n in NODES)
    cpu = " ".join(f"{k} {v:.0f}%" for k, v in s.cpu_pct.items())
    rt = f"{U.fmt_rtd(s.rt_p50_ms)}/{U.fmt_rtd(s.rt_p95_ms)}/{U.fmt_rtd(s.rt_p99_ms)}"
    print(f"{s.rate:>8} {s.achieved:>7.0f} {nodes_ok:>13} {s.fail_pct:>6.2f} {s.retrans:>6} "
          f"{rt:>15} {s.vis_n:>4} {fmt(s.vis_p50_ms):>5} {fmt(s.vis_p99_ms):>5} "
          f"{fmt(s.vis_max_ms):>5} {lag:>13} {end:>8} {applied:>14}  "
          f"{'yes' if s.sustained else 'NO'}", flush=True)
    print(f"{'':>8} admin poll round trip p50 {fmt(s.poll_p50_ms)} ms, p99 "
          f"{fmt(s.poll_p99_ms)} ms; probe REGISTER->200 p50 {fmt(s.probe_reg_p50_ms)} ms",
          flush=True)
    print(f"{'':>8} CPU: {cpu}", flush=True)


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = U.arg_parser(__doc__)
    p.add_argument("--rates", default=DEFAULT_RATES,
                   help=f"total registrations/s to offer, split evenly over the three nodes "
                        f"(default {DEFAULT_RATES})")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per step (default 15)")
    p.add_argument("--users", type=int, default=3000,
                   help="SIPp users, a third per node (default 3000; at most ~5000, they "
                        "travel in one environment variable)")
    p.add_argument("--kafka-bootstrap", help="use this broker (default: local-cluster starts "
                   "one with scripts/kafka.sh)")
    p.add_argument("--log-level", default="info", choices=U.LOG_LEVELS,
                   help="SIPHON_LOG_LEVEL of the nodes (default info, as in compose)")
    p.add_argument("--probe-rate", type=float, default=4.0,
                   help="visibility probes per second during a step (default 4)")
    p.add_argument("--poll-ms", type=float, default=5.0,
                   help="pause between admin API polls of a probe (default 5 ms)")
    p.add_argument("--idle-probes", type=int, default=30,
                   help="visibility probes before any load (default 30)")
    p.add_argument("--scrape-interval", type=float, default=1.0,
                   help="seconds between /metrics scrapes (default 1)")
    U.add_step_args(p)
    U.add_common_args(p, files="the cluster's configs and logs, and SIPp files")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if U.sipp_missing("cluster.py"):
        return 2
    rates = U.parse_rates(args.rates)
    if any(r % 3 for r in rates):
        print("cluster.py: rates must be multiples of 3 (one third per node)", file=sys.stderr)
        return 2
    users = [f"user{i:05d}" for i in range(args.users)]
    probes = [f"probe{i:02d}" for i in range(PROBE_USERS)]
    flow = "{" + ", ".join(f"{u}: {PASSWORD}" for u in (*users, *probes)) + "}"
    if len(flow) > MAX_ENV_BYTES:
        print(f"cluster.py: --users {args.users} makes SIPHON_AUTH_USERS {len(flow)} bytes; "
              f"keep it under {MAX_ENV_BYTES}", file=sys.stderr)
        return 2
    workdir = U.make_workdir(args.workdir, "cluster")
    slices = {}
    for i, node in enumerate(NODES):
        slices[node] = workdir / f"users_{node}.csv"
        U.write_sipp_users(slices[node], users[i::3], PASSWORD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIPHON_")}
    env.update(PYTHON=sys.executable, SIPHON_AUTH_USERS=flow, SIPHON_LOG_LEVEL=args.log_level)
    env.pop("KAFKA_BOOTSTRAP", None)
    cluster = Cluster(workdir, env)

    print("siphon cluster benchmark: 3 nodes (compose/config/siphon.yaml) on one Kafka topic")
    print(f"  workdir {workdir}   cores {os.cpu_count()}   users {args.users} "
          f"(+{PROBE_USERS} probe users)   log level {args.log_level}")
    took = cluster.start(args.kafka_bootstrap)
    kafka = cluster.state["kafka"]
    print(f"  cluster up in {took:.1f} s; kafka {kafka['bootstrap']} "
          f"({'started here' if kafka['owned'] else 'given'}), topic {cluster.state['topic']}, "
          f"nodes on SIP ports {', '.join(str(cluster.port(n, 'sip')) for n in NODES)}")
    steps: list[Step] = []
    try:
        idle, idle_fail = baseline(cluster, args)
        failed = f"; failures: {idle_fail[:3]}" if idle_fail else ""
        print(f"  visibility with no load: {len(idle)} samples, p50 {fmt(quantile(idle, .5))} ms,"
              f" p99 {fmt(quantile(idle, .99))} ms, max {fmt(max(idle, default=float('nan')))} "
              f"ms (poll every {args.poll_ms:g} ms){failed}")
        print()
        hdr = (f"{'offered':>8} {'ok/s':>7} {'ok/s n1/n2/n3':>13} {'fail%':>6} {'retr':>6} "
               f"{'rt p50/95/99 ms':>15} {'vis#':>4} {'v p50':>5} {'v p99':>5} {'v max':>5} "
               f"{'max lag n1/2/3':>13} {'lag end':>8} {'applied n1/2/3':>14}  sustained")
        print(hdr)
        print("-" * len(hdr))
        unsustained = 0
        for rate in rates:
            step = run_step(rate, args, cluster, slices, workdir)
            steps.append(step)
            print_step(step)
            dead = [n for n in NODES if not cluster.alive(n)]
            if dead:
                print(f"nodes died: {dead}")
                return 1
            unsustained = 0 if step.sustained else unsustained + 1
            if args.stop_after and unsustained >= args.stop_after:
                print(f"(stopping: {unsustained} unsustained steps in a row)")
                break
            time.sleep(args.settle)
    finally:
        cluster.stop()
    best = max((s for s in steps if s.sustained), key=lambda s: s.rate, default=None)
    print()
    if best is None:
        print("highest sustained total rate: none of the offered rates")
    else:
        print(f"highest sustained total rate: {best.rate}/s offered, {best.achieved:.0f}/s "
              f"achieved over 3 nodes; cross-node visibility p99 {fmt(best.vis_p99_ms)} ms "
              f"({best.vis_n} samples); consumer lag at most "
              f"{max(best.lag_max.values()):.0f} records, {max(best.lag_end.values()):.0f} "
              f"after the step")
    U.finish(args, workdir, [asdict(s) for s in steps])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
