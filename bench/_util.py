"""Shared helpers of the benchmarks in bench/ (not a benchmark itself).

* process figures from /proc (RSS, CPU ticks) for a running ``siphon run``;
* starting / stopping ``siphon run`` on a generated config;
* realistic registrar events (bindings shaped like real phones' REGISTERs).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

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

    def start(self, timeout: float = 600.0) -> None:
        self.started = time.monotonic()
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                siphon_command(self.config), stdout=log, stderr=subprocess.STDOUT,
                env=siphon_env(), cwd=str(self.config.parent), start_new_session=True,
            )
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


def write_config(path: Path, *, log_path: Path, users: dict[str, str] | None = None,
                 udp_port: int = 15060, admin_port: int = 19091, min_expires: int = 10,
                 log_level: str = "info", script: Path = EXAMPLE_SCRIPT,
                 group_commit_max: int = 2000) -> None:
    """A siphon.yaml for a benchmark node (embedded log at ``log_path``)."""
    lines = [
        "# generated by bench/ - a benchmark node",
        "listen:",
        f'  udp: ["127.0.0.1:{udp_port}"]',
        "domain:",
        '  local: ["example.com", "127.0.0.1"]',
        "script:",
        f'  path: "{script}"',
        "registrar:",
        "  backend: embedded",
        f'  path: "{log_path}"',
        "  default_expires: 3600",
        "  max_expires: 7200",
        f"  min_expires: {min_expires}",
        "  max_contacts: 10",
        f"  group_commit_max: {group_commit_max}",
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
        "  instance_id: bench-node-1",
        "log:",
        f"  level: {log_level}",
    ]
    path.write_text("\n".join(lines) + "\n")


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
