#!/usr/bin/env python3
"""Authenticated REGISTER throughput of one ``siphon run`` node, driven by SIPp.

Generates a config in a temporary directory (embedded event log on local disk,
static credentials user00000..user09999 / "password", small min_expires) with
examples/registrar.py as the script, starts ``siphon run`` and runs SIPp with
bench/sipp/register_auth.xml (REGISTER -> 401 -> REGISTER with digest
credentials -> 200; each 200 is sent only once the event is fsync'd and applied)
at increasing call rates. For each step it prints the offered rate, the
achieved rate of successful registrations, the failure percentage (from SIPp's
exit code and its -trace_stat statistics file), response times, siphon's RSS
and CPU (event-loop thread and the other threads), and SIPp's CPU; then the
highest sustained rate: < FAIL% failed calls and >= 95% of the offered rate
achieved.

Example:  python bench/register.py
          python bench/register.py --rates 500,1000 --duration 5 --py-spy 1000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U

SCENARIO = U.BENCH / "sipp" / "register_auth.xml"
DEFAULT_RATES = "250,500,1000,1500,2000,2500,3000"


@dataclass
class Step:
    rate: int
    calls: int
    sipp_rc: int
    successful: int
    failed: int
    created: int
    elapsed: float
    achieved: float
    fail_pct: float
    retransmissions: int
    timeouts: int
    unexpected: int
    rt_mean_ms: float
    rt_p50_ms: float
    rt_p95_ms: float
    rt_p99_ms: float
    siphon_cpu_pct: float
    siphon_loop_pct: float
    siphon_threads_pct: float
    sipp_cpu_pct: float
    siphon_rss: int
    siphon_hwm: int
    other_cpu_pct: float
    loop_us_per_reg: float
    sustained: bool = False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = U.arg_parser(__doc__, see_readme=True,
                     epilog="Needs sipp on PATH. Every step runs a fresh SIPp against the same "
                            "siphon node; the node's log starts empty.")
    p.add_argument("--rates", default=DEFAULT_RATES,
                   help=f"comma-separated registrations/s to offer (default {DEFAULT_RATES})")
    p.add_argument("--duration", type=float, default=10.0,
                   help="seconds per step: SIPp sends rate*duration calls (default 10)")
    p.add_argument("--users", type=int, default=10_000, help="number of users (default 10000)")
    U.add_step_args(p)
    p.add_argument("--log-level", default="info", choices=U.LOG_LEVELS,
                   help="siphon log level; 'info' (the example config's) also writes the "
                        "script's on_change log line per registration (default info)")
    p.add_argument("--group-commit-max", type=int, default=2000,
                   help="registrar.group_commit_max (default 2000, siphon's default)")
    p.add_argument("--sipp-port", type=int, help="SIPp UDP port (default: a free one)")
    U.add_common_args(p, port=True, py_spy=True)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- SIPp


def write_users(path: Path, users: int) -> dict[str, str]:
    creds = {f"user{i:05d}": "password" for i in range(users)}
    U.write_sipp_users(path, creds, "password")
    return creds


def run_sipp(rate: int, calls: int, args: argparse.Namespace, workdir: Path,
             users_csv: Path) -> tuple[int, dict[str, str], float, float]:
    """Run one SIPp step; returns (exit code, final stats row, wall s, SIPp CPU s)."""
    stf = workdir / f"stat_{rate}.csv"
    stf.unlink(missing_ok=True)
    cmd = [
        "sipp", f"127.0.0.1:{args.port}", "-sf", str(SCENARIO), "-inf", str(users_csv),
        "-key", "domain", U.DOMAIN, "-i", "127.0.0.1", "-p", str(args.sipp_port), "-t", "u1",
        "-r", str(rate), "-rp", "1000", "-m", str(calls), "-l", str(max(rate * 10, 1000)),
        "-nostdin", "-trace_stat", "-stf", str(stf), "-fd", "1",
        "-trace_err", "-error_file", str(workdir / f"errors_{rate}.log"),
        "-trace_screen", "-screen_file", str(workdir / f"screen_{rate}.log"),
    ]
    t0 = time.monotonic()
    with open(workdir / f"sipp_{rate}.out", "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
        rc, cpu = U.wait_rusage(proc)
    wall = time.monotonic() - t0
    return rc, U.read_sipp_stats(stf), wall, cpu


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if U.sipp_missing("register.py"):
        return 2
    rates = U.parse_rates(args.rates)
    args.port = args.port or U.free_port(2)
    args.sipp_port = args.sipp_port or U.free_port(2)
    workdir = U.make_workdir(args.workdir, "register")
    users_csv = workdir / "users.csv"
    creds = write_users(users_csv, args.users)
    config = workdir / "siphon.yaml"
    log_path = workdir / "events.db"
    U.fresh_log(log_path)
    admin_port = U.free_port(1)
    U.write_config(config, log_path=log_path, users=creds, udp_port=args.port,
                   admin_port=admin_port, min_expires=10, log_level=args.log_level,
                   group_commit_max=args.group_commit_max)

    print("siphon REGISTER benchmark (digest auth, durable embedded log)")
    print(f"  workdir   {workdir}")
    print(f"  event log {log_path}  [{U.disk_of(workdir)}]")
    print(f"  script    {U.EXAMPLE_SCRIPT}   log level {args.log_level}")
    print(f"  scenario  {SCENARIO}   users {args.users}   cores {os.cpu_count()}")
    node = U.Siphon(config, workdir, admin_port)
    node.start()
    U.print_ready(node)
    print("  CPU columns are % of one core over the step; 'loop us/reg' = event-loop thread "
          "CPU per successful registration;\n  'other' = CPU used by everything else on the "
          "machine during the step")
    print()
    hdr = (f"{'offered/s':>9} {'calls':>6} {'ok/s':>7} {'fail%':>6} {'retr':>6} "
           f"{'rt mean':>8} {'p50':>6} {'p95':>6} {'p99':>6}  {'siphon CPU':>10} "
           f"{'(loop+thr)':>11} {'loop us/reg':>11} {'SIPp CPU':>8} {'other':>6} {'RSS':>9}  "
           "sustained")
    print(hdr)
    print("-" * len(hdr))
    steps: list[Step] = []
    unsustained = 0
    try:
        for rate in rates:
            calls = max(1, round(rate * args.duration))
            cpu0, thr0 = U.cpu_seconds(node.pid), U.thread_cpu(node.pid)
            busy0 = U.system_busy()
            t0 = time.monotonic()
            spy = None
            if args.py_spy == rate:
                spy = U.start_py_spy(node.pid, args.duration, workdir / f"py-spy_{rate}.txt")
            rc, st, wall, sipp_cpu = run_sipp(rate, calls, args, workdir, users_csv)
            cpu1, thr1 = U.cpu_seconds(node.pid), U.thread_cpu(node.pid)
            busy = U.system_busy() - busy0
            if not node.alive():
                print(f"siphon died during the {rate}/s step:\n{node.log_tail()}")
                return 1
            if spy is not None:
                spy.wait()
            step = make_step(rate, calls, rc, st, wall, sipp_cpu, cpu1 - cpu0,
                             thr1["main"] - thr0["main"], thr1["threads"] - thr0["threads"],
                             time.monotonic() - t0, U.proc_status(node.pid), busy)
            step.sustained = (step.fail_pct < args.fail_threshold
                              and step.achieved >= args.min_achieved * rate)
            steps.append(step)
            print_step(step)
            if spy is not None and (workdir / f"py-spy_{rate}.txt").exists():
                print(f"\npy-spy profile of siphon at {rate}/s "
                      f"({workdir / f'py-spy_{rate}.txt'}):")
                print(f"  (siphon CPU over the step from /proc: event loop thread "
                      f"{step.siphon_loop_pct:.0f}%, other threads {step.siphon_threads_pct:.0f}%"
                      f" of one core)")
                print(U.summarize_by_role(workdir / f"py-spy_{rate}.txt"))
                print()
            unsustained = 0 if step.sustained else unsustained + 1
            if args.stop_after and unsustained >= args.stop_after:
                print(f"(stopping: {unsustained} consecutive unsustained steps)")
                break
            time.sleep(args.settle)
    finally:
        status = U.proc_status(node.pid) if node.alive() else {}
        node.stop()
    best = max((s for s in steps if s.sustained), key=lambda s: s.rate, default=None)
    print()
    print(f"siphon peak RSS (VmHWM) {U.fmt_bytes(status.get('VmHWM', 0))}; "
          f"log file {U.fmt_bytes(sum(p.stat().st_size for p in workdir.glob('events.db*')))}")
    if best is None:
        print(f"highest sustained rate: none of the offered rates (< {args.fail_threshold}% "
              f"failures and >= {args.min_achieved:.0%} of offered achieved)")
    else:
        print(f"highest sustained rate: {best.rate} registrations/s offered, "
              f"{best.achieved:.0f}/s achieved, {best.fail_pct:.2f}% failed "
              f"(target >= 2000/s: {'MET' if best.rate >= 2000 else 'MISSED'})")
    calm = [s for s in steps if s.sustained and s.rate <= 500] or steps[:1]
    if calm:
        us = min(s.loop_us_per_reg for s in calm)
        print(f"event-loop CPU per registration at low load: {us:.0f} us -> at most "
              f"~{1e6 / us:.0f} registrations/s while the event loop has a whole core")
    peak = max(steps, key=lambda s: s.achieved, default=None)
    if peak is not None:
        print(f"highest achieved rate in any step: {peak.achieved:.0f} successful/s "
              f"(offered {peak.rate}/s, {peak.fail_pct:.2f}% failed)")
    U.finish(args, workdir, [asdict(s) for s in steps])
    return 0


def make_step(rate: int, calls: int, rc: int, st: dict[str, str], wall: float,
              sipp_cpu: float, siphon_cpu: float, loop_cpu: float, thr_cpu: float,
              window: float, status: dict[str, int], busy: float) -> Step:
    def num(name: str) -> int:
        return U.stat_int(st, name)

    ok, failed, created = num("SuccessfulCall(C)"), num("FailedCall(C)"), num("OutgoingCall(C)")
    # Calls SIPp never finished (e.g. killed) count as failed too.
    failed = max(failed, calls - ok) if rc != 0 else failed
    elapsed = U.sipp_elapsed(st, wall)
    elapsed = elapsed if elapsed > 0 else wall
    buckets = U.rtd_buckets(st)
    return Step(
        rate=rate, calls=calls, sipp_rc=rc, successful=ok, failed=failed, created=created,
        elapsed=elapsed, achieved=ok / elapsed, fail_pct=100.0 * failed / max(1, calls),
        retransmissions=num("Retransmissions(C)"), timeouts=num("FailedTimeoutOnRecv(C)")
        + num("FailedMaxUDPRetrans(C)"), unexpected=num("FailedUnexpectedMessage(C)"),
        rt_mean_ms=U.rtd_ms(st.get("ResponseTimereg(C)", "")),
        rt_p50_ms=U.percentile_from_buckets(buckets, 0.50),
        rt_p95_ms=U.percentile_from_buckets(buckets, 0.95),
        rt_p99_ms=U.percentile_from_buckets(buckets, 0.99),
        siphon_cpu_pct=100 * siphon_cpu / window, siphon_loop_pct=100 * loop_cpu / window,
        siphon_threads_pct=100 * thr_cpu / window, sipp_cpu_pct=100 * sipp_cpu / wall,
        siphon_rss=status.get("VmRSS", 0), siphon_hwm=status.get("VmHWM", 0),
        other_cpu_pct=max(0.0, 100 * (busy - siphon_cpu - sipp_cpu) / window),
        loop_us_per_reg=1e6 * loop_cpu / max(1, ok),
    )


def print_step(s: Step) -> None:
    print(f"{s.rate:>9} {s.calls:>6} {s.achieved:>7.0f} {s.fail_pct:>6.2f} "
          f"{s.retransmissions:>6} {s.rt_mean_ms:>6.1f}ms {U.fmt_rtd(s.rt_p50_ms):>6} "
          f"{U.fmt_rtd(s.rt_p95_ms):>6} {U.fmt_rtd(s.rt_p99_ms):>6}  {s.siphon_cpu_pct:>9.0f}% "
          f"{f'({s.siphon_loop_pct:.0f}+{s.siphon_threads_pct:.0f})':>11} "
          f"{s.loop_us_per_reg:>11.0f} "
          f"{s.sipp_cpu_pct:>7.0f}% {s.other_cpu_pct:>5.0f}% {U.fmt_bytes(s.siphon_rss):>9}  "
          f"{'yes' if s.sustained else 'NO'}"
          + (f"  [sipp exit {s.sipp_rc}; {s.failed} failed, {s.timeouts} timeouts, "
             f"{s.unexpected} unexpected]" if s.failed or s.sipp_rc not in (0,) else ""),
          flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
