"""Shared helpers of the benchmarks in bench/ (not a benchmark itself).

* process figures from /proc (RSS, CPU ticks) for a running ``siphon run``;
* the command-line options and work directory every benchmark has;
* starting / stopping ``siphon run`` on a generated config (embedded or Kafka log);
* SIPp: users files, its statistics CSV, waiting for it with its CPU;
* py-spy: recording a node and summarizing the samples;
* realistic registrar events (bindings shaped like real phones' REGISTERs).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
EXAMPLE_SCRIPT = REPO / "examples" / "registrar.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

if str(REPO) not in sys.path:  # run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------- /proc


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, VmSize... of ``pid`` in bytes (from /proc/PID/status)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Vm") and line.rstrip().endswith("kB"):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0]) * 1024
    return out


def rss(pid: int | None = None) -> int:
    """Resident set size in bytes (VmRSS) of ``pid`` (default: this process)."""
    return proc_status(pid or os.getpid())["VmRSS"]


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds used so far by every thread of ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of ``pid``: ``main`` (the event loop) and the others
    (SQLite writer/reader threads, asyncio.to_thread workers), summed."""
    main = other = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        secs = (int(fields[11]) + int(fields[12])) / CLK_TCK
        if int(tid) == pid:
            main += secs
        else:
            other += secs
    return {"main": main, "threads": other}


def system_busy() -> float:
    """CPU seconds all cores spent busy (not idle/iowait) since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def free_port(kind: int = 1) -> int:
    """A port free on 127.0.0.1 for TCP (kind 1) or UDP (kind 2) right now."""
    import socket

    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def disk_of(path: Path) -> str:
    """Filesystem type and device holding ``path`` (to show the log is on local disk)."""
    best = ("?", "?", "")
    real = str(Path(path).resolve())
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[2]):
                best = (dev, fstype, mnt)
    return f"{best[1]} on {best[0]} (mounted at {best[2]})"


# ---------------------------------------------------------------------------- processes, HTTP


def wait_rusage(proc: subprocess.Popen[bytes], timeout: float | None = None) -> tuple[int, float]:
    """Wait for ``proc`` (after ``timeout`` s SIGINT, then SIGKILL 5 s later); returns
    (exit code, CPU seconds it used, from wait4's rusage)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    signalled = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, 0 if deadline is None else os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime
        if deadline is not None and time.monotonic() > deadline:
            # SIPp quits on SIGINT/SIGTERM and still writes its final statistics.
            proc.send_signal(signal.SIGINT if signalled == 0 else signal.SIGKILL)
            signalled += 1
            deadline = time.monotonic() + 5
        time.sleep(0.05)


def load_average(sep: str = " / ") -> str:
    """The 1 / 5 / 15 min load averages."""
    return sep.join(f"{x:.2f}" for x in os.getloadavg())


def http(method: str, url: str, body: dict | None = None, token: str | None = None,
         timeout: float = 10.0) -> tuple[int, bytes]:
    """(status, body) of an HTTP request (JSON ``body``, bearer ``token``); an HTTP error
    status is returned, not raised."""
    import json
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# ---------------------------------------------------------------------------- command line

LOG_LEVELS = ("debug", "info", "warning", "error")


def arg_parser(doc: str, *, see_readme: bool = False,
               epilog: str | None = None) -> argparse.ArgumentParser:
    """The parser of a benchmark described by its module docstring ``doc``: the first
    paragraph as description, the rest as epilog (unless ``epilog`` is given)."""
    description = doc.split("\n\n")[0]
    if see_readme:
        description += " (see the module docstring / bench/README.md)"
    return argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n\n", 1)[1] if epilog is None else epilog)


def add_common_args(p: Any, *, workdir: bool = True, json: bool = True, port: bool = False,
                    py_spy: bool = False, files: str = "config, log and SIPp files") -> None:
    """Options that mean the same in every benchmark: --workdir and --keep (``files``
    says what goes there), --json, and with ``port``/``py_spy`` --port (siphon's UDP
    port) and --py-spy RATE. ``p`` is a parser or an argument group."""
    if port:
        p.add_argument("--port", type=int, help="siphon UDP port (default: a free one)")
    if workdir:
        p.add_argument("--workdir", type=Path,
                       help=f"directory for {files} (default: a temp dir, removed unless --keep)")
        p.add_argument("--keep", action="store_true", help="keep the work directory")
    if py_spy:
        p.add_argument("--py-spy", type=int, metavar="RATE",
                       help="record siphon with py-spy during the step at RATE and print the "
                            "hottest functions (needs `pip install py-spy`)")
    if json:
        p.add_argument("--json", type=Path, help="also write the results as JSON to this file")


def add_step_args(p: Any, *, stop_after: int = 2, fail_threshold: float = 0.5,
                  min_achieved: float = 0.95, settle: float = 3.0) -> None:
    """Options of benchmarks that offer increasing rates step by step: what makes a step
    sustained, when to stop, the pause between steps."""
    p.add_argument("--fail-threshold", type=float, default=fail_threshold,
                   help="max failed calls in %% for a step to count as sustained "
                        f"(default {fail_threshold:g})")
    p.add_argument("--min-achieved", type=float, default=min_achieved,
                   help="min achieved/offered ratio for a step to count as sustained "
                        f"(default {min_achieved:g})")
    p.add_argument("--stop-after", type=int, default=stop_after,
                   help="stop after this many consecutive unsustained steps "
                        f"(default {stop_after}, 0=never)")
    p.add_argument("--settle", type=float, default=settle,
                   help=f"seconds to wait between steps (default {settle:g})")


def sipp_missing(prog: str) -> bool:
    """True, and says so on stderr, when sipp is not on PATH."""
    if shutil.which("sipp") is None:
        print(f"{prog}: sipp is not on PATH", file=sys.stderr)
        return True
    return False


def parse_rates(text: str) -> list[int]:
    """--rates: comma-separated whole numbers."""
    return [int(r) for r in text.split(",") if r.strip()]


def make_workdir(given: Path | None, name: str) -> Path:
    """``given`` (--workdir), or a new temp dir ``siphon-bench-NAME-*``; created."""
    workdir = given or Path(tempfile.mkdtemp(prefix=f"siphon-bench-{name}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def finish(args: argparse.Namespace, workdir: Path, results: Any = None,
           indent: str = "") -> None:
    """The end of a run: write ``results`` to --json (if given), then keep the work
    directory (--keep or --workdir: say where) or remove it."""
    if results is not None and getattr(args, "json", None):
        import json

        args.json.write_text(json.dumps(results, indent=2, default=str))
    if args.keep or args.workdir:
        print(f"{indent}files kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def fresh_log(log_path: Path) -> None:
    """Remove an embedded log (and its -wal/-shm) left by an earlier run."""
    for stale in (log_path, Path(f"{log_path}-wal"), Path(f"{log_path}-shm")):
        stale.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- siphon


def siphon_command(config: Path) -> list[str]:
    """``siphon run -c CONFIG`` with the interpreter running the benchmark."""
    return [sys.executable, "-m", "siphon.cli", "run", "-c", str(config)]


def siphon_env() -> dict[str, str]:
    """Environment for the child: the repo first on sys.path (a stale editable install
    may otherwise resolve ``siphon`` to a namespace package without its exports)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


class Siphon:
    """A ``siphon run`` child process; its stderr goes to ``<workdir>/siphon.log``."""

    def __init__(self, config: Path, workdir: Path, admin_port: int) -> None:
        self.config = config
        self.admin_port = admin_port
        self.logfile = workdir / "siphon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.ready_after = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spawn(self) -> None:
        """Start the process (not waiting for it to be ready)."""
        self.started = time.monotonic()
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                siphon_command(self.config), stdout=log, stderr=subprocess.STDOUT,
                env=siphon_env(), cwd=str(self.config.parent), start_new_session=True,
            )

    def start(self, timeout: float = 600.0) -> None:
        """Start the process and wait until it is ready (raises if it is not)."""
        self.spawn()
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"siphon exited with {self.proc.returncode} while starting:\n"
                                   + self.log_tail())
            if self.is_ready():
                self.ready_after = time.monotonic() - self.started
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("siphon did not become ready in time:\n" + self.log_tail())

    def is_ready(self) -> bool:
        """The admin API's /ready answers 200 (SIP is being served)."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready",
                                        timeout=1) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def write_config(path: Path, *, log_path: Path | None = None,
                 users: dict[str, str] | None = None, udp_port: int = 15060,
                 admin_port: int = 19091, min_expires: int = 10, log_level: str = "info",
                 script: Path = EXAMPLE_SCRIPT, group_commit_max: int = 2000,
                 backend: str = "embedded", kafka: dict[str, Any] | None = None,
                 instance_id: str = "bench-node-1") -> None:
    """A siphon.yaml for a benchmark node: embedded log at ``log_path``, or with
    ``backend="kafka"`` the Kafka log ``kafka`` describes (``bootstrap``, ``topic``,
    ``partitions``, optional ``group_id``; ``log_path``, if given, then only places the
    projection snapshot next to it)."""
    lines = [
        "# generated by bench/ - a benchmark node",
        "listen:",
        f'  udp: ["127.0.0.1:{udp_port}"]',
        "domain:",
        '  local: ["example.com", "127.0.0.1"]',
        "script:",
        f'  path: "{script}"',
        "registrar:",
        f"  backend: {backend}",
    ]
    if backend == "embedded":
        assert log_path is not None, "the embedded backend needs log_path"
    if log_path is not None:
        lines.append(f'  path: "{log_path}"')
    lines += [
        "  default_expires: 3600",
        "  max_expires: 7200",
        f"  min_expires: {min_expires}",
        "  max_contacts: 10",
    ]
    if backend == "embedded":
        lines.append(f"  group_commit_max: {group_commit_max}")
    elif backend == "kafka":
        assert kafka is not None, "backend='kafka' needs kafka={...}"
        lines += [
            "  kafka:",
            f'    bootstrap_servers: ["{kafka["bootstrap"]}"]',
            f'    topic: "{kafka["topic"]}"',
            f"    partitions: {kafka['partitions']}",
        ]
        if "group_id" in kafka:
            lines.append(f'    group_id: "{kafka["group_id"]}"')
    else:
        raise ValueError(f"unknown backend {backend!r}")
    lines += [
        "auth:",
        '  realm: "example.com"',
        "  backend: static",
        '  nonce_secret: "siphon-benchmark-nonce-secret-0123456789abcdef"',
    ]
    if users:
        lines.append("  credentials:")
        lines.extend(f'    {name}: "{password}"' for name, password in users.items())
    lines += [
        "admin:",
        f'  listen: "127.0.0.1:{admin_port}"',
        "server:",
        f"  instance_id: {instance_id}",
        "log:",
        f"  level: {log_level}",
    ]
    path.write_text("\n".join(lines) + "\n")


def print_ready(node: Siphon, show_rss: bool = True) -> None:
    """The started node's pid, how long it took to be ready (and its RSS)."""
    print(f"  siphon pid {node.pid} ready in {node.ready_after:.2f}s"
          + (f", RSS {fmt_bytes(rss(node.pid))}" if show_rss else ""))


# ---------------------------------------------------------------------------- SIPp

RTD_BUCKETS = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000)  # ms, register_auth.xml's rtd


def write_sipp_users(path: Path, names: Iterable[str], password: str) -> None:
    """A SIPp injection file, one user a line: ``name;[authentication ...]`` (SIPp does
    not expand [fieldN] inside [authentication], but does a keyword stored in a field)."""
    with open(path, "w") as f:
        f.write("SEQUENTIAL\n")
        for name in names:
            f.write(f"{name};[authentication username={name} password={password}]\n")


def read_sipp_stats(path: Path) -> dict[str, str]:
    """The last row of SIPp's -trace_stat CSV as {column: value} ({} if none yet)."""
    if not path.exists():
        return {}
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    if len(lines) < 2:
        return {}
    header = lines[0].rstrip(";").split(";")
    last = lines[-1].rstrip(";").split(";")
    return dict(zip(header, last, strict=False))


def stat_int(st: dict[str, str], name: str) -> int:
    """A counter of a SIPp statistics row (0 if absent or not a number)."""
    try:
        return int(float(st.get(name, "0") or 0))
    except ValueError:
        return 0


def sipp_elapsed(st: dict[str, str], fallback: float) -> float:
    """Seconds from SIPp's start to its last statistics row (``fallback`` if unknown)."""
    try:
        return float(st["CurrentTime"].split("\t")[-1]) - float(st["StartTime"].split("\t")[-1])
    except (KeyError, ValueError):
        return fallback


def rtd_ms(text: str) -> float:
    """SIPp's ``HH:MM:SS:uuuuuu`` to milliseconds."""
    try:
        h, m, s, us = (int(x) for x in text.split(":"))
    except ValueError:
        return float("nan")
    return ((h * 60 + m) * 60 + s) * 1000 + us / 1000


def rtd_buckets(st: dict[str, str], rtd: str = "reg") -> list[int]:
    """Counts of SIPp's response time repartition of ``rtd`` (RTD_BUCKETS, then >= last)."""
    counts = [stat_int(st, f"ResponseTimeRepartition{rtd}_<{b}") for b in RTD_BUCKETS]
    counts.append(stat_int(st, f"ResponseTimeRepartition{rtd}_>={RTD_BUCKETS[-1]}"))
    return counts


def percentile_from_buckets(counts: list[int], q: float) -> float:
    """Upper bound (ms) of the bucket holding quantile ``q`` (SIPp's repartition)."""
    total = sum(counts)
    if not total:
        return float("nan")
    seen = 0
    for bound, n in zip((*RTD_BUCKETS, float("inf")), counts, strict=True):
        seen += n
        if seen >= q * total:
            return bound
    return float("inf")


def fmt_rtd(v: float) -> str:
    """A bucket bound of percentile_from_buckets (or a time in ms) for a table."""
    if v != v:  # nan
        return "-"
    return ">5s" if v == float("inf") else f"<{v:.0f}" if v in RTD_BUCKETS else f"{v:.1f}"


# ---------------------------------------------------------------------------- py-spy


def start_py_spy(pid: int, seconds: float, out: Path, *, rate: int = 250,
                 nonblocking: bool = False, echo: bool = False) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` of ``pid`` for ``seconds`` (at least 1) into ``out`` (raw
    collapsed stacks per thread); None (and a note) when py-spy is not installed."""
    exe = shutil.which("py-spy")
    if exe is None:
        print("  (py-spy not found: pip install py-spy)")
        return None
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
           "--rate", str(rate), "--format", "raw", "--threads"]
    if nonblocking:
        cmd.append("--nonblocking")
    cmd += ["--output", str(out)]
    if echo:
        print("  py-spy: " + " ".join(cmd))
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def finish_py_spy(spy: subprocess.Popen[bytes] | None, out: Path, title: str,
                  interrupt: bool = False) -> None:
    """Wait for (or with ``interrupt``, stop) a start_py_spy recording and print
    summarize_by_role of it."""
    if spy is None:
        return
    if interrupt and spy.poll() is None:
        spy.send_signal(signal.SIGINT)  # py-spy writes what it has on Ctrl-C
    try:
        spy.wait(60)
    except subprocess.TimeoutExpired:
        spy.kill()
    if out.exists():
        print(f"\npy-spy profile of {title} ({out}):")
        print(summarize_by_role(out))
    else:
        print(f"  (no py-spy output for {title})")


def frame_name(frame: str) -> str:
    """``func (file)`` of a py-spy raw frame ``func (path/to/file.py:123)``, the path
    relative to the repo / site-packages / the standard library."""
    func, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("/work/main/", "site-packages/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{func} ({file})"


def _collapsed(path: Path) -> Iterator[tuple[str, list[str], int]]:
    """(thread frame or "?", the other frames, samples) per line of py-spy's raw output."""
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = "?"
        if frames and frames[0].startswith("thread ("):
            thread, frames = frames[0], frames[1:]
        yield thread, frames, int(count)


IDLE_LEAVES = {
    # py-spy cannot always tell a thread waiting in C from a busy one: the event loop
    # thread waiting in uvloop's epoll (or running uvloop's own C code) shows up as
    # Runner.run itself, a pool thread waiting for work as _worker itself.
    "event loop thread": "Runner.run (asyncio/runners.py)",
    "other threads": "_worker (concurrent/futures/thread.py)",
}


def summarize_by_role(path: Path, top: int = 25) -> str:
    """Per thread group (event loop / worker threads): the functions with the most self
    and inclusive samples and self samples per source file, from py-spy's raw output.
    Shares are of the samples where Python code ran (see IDLE_LEAVES)."""
    groups: dict[str, dict[str, dict[str, int]]] = {}
    totals: dict[str, int] = {}
    idle: dict[str, int] = {}
    for _, frames, n in _collapsed(path):
        group = "event loop thread" if any("cmd_run" in f for f in frames) else "other threads"
        names = [frame_name(f) for f in frames]
        if names[-1] == IDLE_LEAVES[group]:
            idle[group] = idle.get(group, 0) + n
            continue
        g = groups.setdefault(group, {"self": {}, "incl": {}, "file": {}})
        totals[group] = totals.get(group, 0) + n
        g["self"][names[-1]] = g["self"].get(names[-1], 0) + n
        file = names[-1].rsplit(" (", 1)[-1].rstrip(")")
        g["file"][file] = g["file"].get(file, 0) + n
        for name in set(names):
            g["incl"][name] = g["incl"].get(name, 0) + n
    if not totals:
        return "  (no samples)"
    out = []
    for group in sorted(groups):
        total = totals[group]
        out.append(f"  == {group}: {total} samples in Python code "
                   f"({idle.get(group, 0)} more in {IDLE_LEAVES[group].split()[0]} itself: "
                   f"native code or waiting); shares are of the {total} ==")
        g = groups[group]
        out.append("  -- self, by function --")
        for name, n in sorted(g["self"].items(), key=lambda kv: -kv[1])[:top]:
            out.append(f"  {100 * n / total:5.1f}%  {name}")
        out.append("  -- self, by source file --")
        for name, n in sorted(g["file"].items(), key=lambda kv: -kv[1])[:15]:
            out.append(f"  {100 * n / total:5.1f}%  {name}")
        out.append("  -- inclusive --")
        for name, n in sorted(g["incl"].items(), key=lambda kv: -kv[1]):
            if n / total < 0.02 or len(out) > 400:
                break
            if name.split(" (")[0] in ("run", "_run_module_as_main", "main", "_run_code",
                                       "<module>", "cmd_run", "Runner.run", "Thread.run",
                                       "Thread._bootstrap", "Thread._bootstrap_inner"):
                continue
            out.append(f"  {100 * n / total:5.1f}%  {name}")
    return "\n".join(out)


def summarize_by_thread(path: Path, seconds: float, rate: int, top: int = 25) -> str:
    """Per OS thread (the busiest is the event loop), the hottest functions (self and
    inclusive) from py-spy's raw output recorded at ``rate`` samples/s for ``seconds``.
    With --nonblocking some stacks are cut short; they still count for their thread.
    Time the garbage collector takes shows up in whatever frame allocated when it ran
    (e.g. Headers.__init__), time in uvloop's C code (epoll, socket calls, callbacks'
    glue) as Runner.run itself."""
    groups: dict[str, dict[str, dict[str, int]]] = {}
    totals: dict[str, int] = {}
    for thread, frames, n in _collapsed(path):
        if not frames:
            continue
        g = groups.setdefault(thread, {"self": {}, "incl": {}})
        totals[thread] = totals.get(thread, 0) + n
        names = [frame_name(f) for f in frames]
        g["self"][names[-1]] = g["self"].get(names[-1], 0) + n
        for name in set(names):
            g["incl"][name] = g["incl"].get(name, 0) + n
    if not totals:
        return "  (no samples)"
    out = []
    ordered = sorted(totals, key=lambda t: -totals[t])
    for rank, thread in enumerate(ordered):
        total = totals[thread]
        busy = 100 * total / (rate * seconds)
        if rank == 0:
            out.append(f"  == {thread}, the event loop: {total} samples (~{busy:.0f}% of one "
                       "core busy); shares below are of these samples ==")
            g = groups[thread]
            out.append("  -- self --")
            for name, n in sorted(g["self"].items(), key=lambda kv: -kv[1])[:top]:
                out.append(f"  {100 * n / total:5.1f}%  {name}")
            out.append("  -- inclusive --")
            for name, n in sorted(g["incl"].items(), key=lambda kv: -kv[1])[:top + 10]:
                out.append(f"  {100 * n / total:5.1f}%  {name}")
        else:
            hot = sorted(groups[thread]["self"].items(), key=lambda kv: -kv[1])[:3]
            out.append(f"  == {thread}: {total} samples (~{busy:.1f}% of a core): "
                       + ", ".join(f"{name} {n}" for name, n in hot))
    return "\n".join(out)


# ---------------------------------------------------------------------------- events

DOMAIN = "example.com"
NODE = "siphon-node-1"
USER_AGENTS = (
    "Linphone-Desktop/5.2.4 (Ubuntu 22.04.3 LTS) LinphoneSDK/5.3.30",
    "Zoiper rv2.10.19.3",
    "Yealink SIP-T46S 66.86.0.15",
    "PolycomVVX-VVX_450-UA/6.4.3.5018",
    "MicroSIP/3.21.3",
    "Grandstream GXP2170 1.0.11.23",
    "Bria iOS release 6.11.1 stamp 117564",
    "Cisco/SPA504G-7.6.2f",
    "Obihai/OBi200-3.2.2.5921",
    "baresip v3.10.1 (x86_64/linux)",
)
TRANSPORTS = ("udp", "udp", "udp", "tcp", "tls")
LOCAL = {"udp": "192.0.2.10:5060", "tcp": "192.0.2.10:5060", "tls": "192.0.2.10:5061"}
EDGE_PATH = "<sip:edge1.example.com;lr;ob>"


def aor_name(i: int) -> str:
    return f"sip:user{i:07d}@{DOMAIN}"


class Device:
    """One phone of a user: what stays the same across its REGISTERs."""

    __slots__ = ("call_id", "conn_id", "cseq", "instance", "ip", "port", "reg_id",
                 "transport", "ua", "user")

    def __init__(self, rnd: random.Random, user: int) -> None:
        self.user = user
        self.transport = rnd.choice(TRANSPORTS)
        self.ip = f"{rnd.choice((198, 203, 100))}.{rnd.randrange(256)}.{rnd.randrange(256)}." \
                  f"{rnd.randrange(1, 255)}"
        self.port = rnd.randrange(1024, 65535)
        self.ua = rnd.choice(USER_AGENTS)
        u = f"{rnd.getrandbits(128):032x}"
        self.instance = (f"<urn:uuid:{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}>"
                         if rnd.random() < 0.6 else "")
        self.reg_id = 1 if self.instance else 0
        self.call_id = f"{rnd.getrandbits(96):024x}@{self.ip}"
        self.cseq = rnd.randrange(1, 1000)
        self.conn_id = f"tcp-{rnd.randrange(1, 10**6)}" if self.transport != "udp" else ""

    def key(self) -> str:
        if self.instance:
            return f"instance:{self.instance}:{self.reg_id}"
        return f"sip:user{self.user:07d}@{self.ip}:{self.port};transport={self.transport}"

    def uri(self) -> str:
        uri = f"sip:user{self.user:07d}@{self.ip}:{self.port};transport={self.transport}"
        return uri + ";ob" if self.instance else uri


def make_binding(dev: Device, now: float, expires: int = 3600):  # -> Binding
    from events.schema import Binding

    dev.cseq += 1
    params: list[tuple[str, str | None]] = []
    if dev.instance:
        params = [("+sip.instance", f'"{dev.instance}"'), ("reg-id", str(dev.reg_id))]
    return Binding(
        key=dev.key(), uri=dev.uri(), expires_at=now + expires, q=1.0, call_id=dev.call_id,
        cseq=dev.cseq, source=f"{dev.ip}:{dev.port}", transport=dev.transport,
        local=LOCAL[dev.transport], conn_id=dev.conn_id, instance=dev.instance,
        reg_id=dev.reg_id, path=[EDGE_PATH] if dev.transport == "tls" else [],
        params=params, user_agent=dev.ua, registered_at=now, node=NODE,
    )


def live_binding_events(n: int, seed: int = 1, now: float | None = None,
                        expires: int = 7200) -> Iterator:
    """``n`` BindingAdded events for ``n`` distinct live bindings (about 1.25 per AoR:
    most users have one phone, some two or three), expiring ``expires`` s after ``now``."""
    from events.schema import BindingAdded

    rnd = random.Random(seed)
    now = time.time() if now is None else now
    made = user = 0
    while made < n:
        devices = 1 if rnd.random() < 0.8 else rnd.choice((2, 2, 3))
        for _ in range(min(devices, n - made)):
            dev = Device(rnd, user)
            yield BindingAdded(ts=now, node=NODE, aor=aor_name(user),
                               binding=make_binding(dev, now, expires))
            made += 1
        user += 1


def registrar_events(n: int, aors: int, seed: int, start: float) -> Iterator:
    """``n`` events of ~``aors`` users' phones from ``start`` on, ~20 events/s of
    simulated time: ~23 % added, 63 % refreshed, 6 % removed, 7 % expired. Every event
    is consistent with the state built so far (refreshes and removals name a live
    binding, expiries carry its expires_at), so applying them does real work."""
    from events.schema import BindingAdded, BindingExpired, BindingRefreshed, BindingRemoved

    rnd = random.Random(seed)
    t = start
    live: dict[int, dict[str, tuple[Device, float]]] = {}
    for _ in range(n):
        t += rnd.expovariate(20.0)
        user = rnd.randrange(aors)
        aor = aor_name(user)
        devices = live.get(user)
        r = rnd.random()
        if not devices or (r > 0.97 and len(devices) < 3):
            dev = Device(rnd, user)
            b = make_binding(dev, t, rnd.choice((600, 1800, 3600)))
            live.setdefault(user, {})[b.key] = (dev, b.expires_at)
            yield BindingAdded(ts=t, node=NODE, aor=aor, binding=b)
            continue
        key = rnd.choice(list(devices))
        dev, expires_at = devices[key]
        ev: Any
        if r < 0.80:
            b = make_binding(dev, t, rnd.choice((600, 1800, 3600)))
            devices[key] = (dev, b.expires_at)
            ev = BindingRefreshed(ts=t, node=NODE, aor=aor, binding=b)
        elif r < 0.88:
            del devices[key]
            ev = BindingRemoved(ts=t, node=NODE, aor=aor, key=key, call_id=dev.call_id,
                                cseq=dev.cseq + 1, source=f"{dev.ip}:{dev.port}",
                                transport=dev.transport, user_agent=dev.ua)
        else:
            del devices[key]
            ev = BindingExpired(ts=t, node=NODE, aor=aor, key=key, expires_at=expires_at)
        if not devices:
            del live[user]
        yield ev
