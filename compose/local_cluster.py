"""The compose topology without containers: Kafka plus three ``siphon run`` processes.

Run it through ``compose/local-cluster`` (which picks the Python interpreter).

Every node runs ``siphon run -c compose/config/siphon.yaml`` -- exactly the file the
containers of compose/docker-compose.yaml mount -- with the node id, the ports and
the broker given through the environment variables that file reads
(``SIPHON_NODE_ID``, ``SIPHON_SIP_LISTEN``, ``SIPHON_HTTP_LISTEN``,
``SIPHON_ADMIN_LISTEN``, ``SIPHON_KAFKA_BOOTSTRAP``, ...). Other ``SIPHON_*``
variables of the caller's environment (``SIPHON_AUTH_USERS``, ``SIPHON_LOG_LEVEL``,
...) reach every node unchanged.

State lives in one directory (``--dir``, default ``<repo>/.cache/local-cluster``):
``cluster.json`` (pids, ports, broker), ``cluster.env`` (the printed KEY=VALUE
lines), ``nodeN/`` (the node's ``SIPHON_DATA_DIR``: its projection snapshots, plus
``siphon.log`` and ``siphon.pid``), and ``kafka/`` when the broker was started here
(``scripts/kafka.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIG = HERE / "config" / "siphon.yaml"
KAFKA_SH = REPO / "scripts" / "kafka.sh"
DEFAULT_DIR = REPO / ".cache" / "local-cluster"
NODES = ("node1", "node2", "node3")
# The ports of compose/docker-compose.yaml (siphon1..3 publish the same on 127.0.0.1).
COMPOSE_PORTS = {
    "node1": {"sip": 5060, "http": 8081, "admin": 9191},
    "node2": {"sip": 5062, "http": 8082, "admin": 9192},
    "node3": {"sip": 5064, "http": 8083, "admin": 9193},
}
HOST = "127.0.0.1"
EXIT_NOT_RUNNING = 3


class ClusterError(Exception):
    """What went wrong, for stderr; the command exits 1."""


def say(text: str) -> None:
    print(text, flush=True)


def warn(text: str) -> None:
    print(f"local-cluster: {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- helpers


def port_free(port: int) -> bool:
    """``port`` can be bound on 127.0.0.1 for TCP and UDP right now."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, port))
            except OSError:
                return False
    return True


def free_ports(count: int, below: int = 10000) -> list[int]:
    """``count`` distinct ports free for TCP and UDP. SIP ports stay under 10000 (four
    digits) because sipsak 0.9.8 mangles five-digit ports in the URIs it builds."""
    found: list[int] = []
    start = 2000 + (os.getpid() * 97) % (below - 2000)
    for i in range(below - 2000):
        port = 2000 + (start - 2000 + i) % (below - 2000)
        if port not in found and port_free(port):
            found.append(port)
            if len(found) == count:
                return found
    raise ClusterError(f"no {count} free ports below {below}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our child, not yet reaped) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def is_our_node(pid: int) -> bool:
    """``pid`` still runs ``siphon ... run -c <CONFIG>`` (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(CONFIG).encode() in cmdline and b"run" in cmdline and pid_alive(pid)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def ready(admin_port: int) -> bool:
    try:
        return http_get(f"http://{HOST}:{admin_port}/ready", timeout=1.0)[0] == 200
    except OSError:
        return False


def tcp_open(hostport: str, timeout: float = 1.0) -> bool:
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return f"(no {path})"
    return "\n".join(f"    {line}" for line in text)


# ---------------------------------------------------------------------------- state


class Cluster:
    """The state directory and ``cluster.json``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory.resolve()
        self.file = self.dir / "cluster.json"
        self.state: dict[str, Any] = {}
        if self.file.exists():
            self.state = json.loads(self.file.read_text())

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        tmp.chmod(0o600)  # it holds the nonce secret
        tmp.replace(self.file)
        lines = [f"KAFKA_BOOTSTRAP={self.state['kafka']['bootstrap']}",
                 f"SIPHON_KAFKA_TOPIC={self.state['topic']}"]
        for name, node in self.state["nodes"].items():
            key = name.upper()
            lines += [f"{key}_PID={node.get('pid', '')}",
                      f"{key}_SIP={HOST}:{node['ports']['sip']}",
                      f"{key}_HTTP={HOST}:{node['ports']['http']}",
                      f"{key}_ADMIN={HOST}:{node['ports']['admin']}"]
        (self.dir / "cluster.env").write_text("\n".join(lines) + "\n")

    def node_dir(self, name: str) -> Path:
        return self.dir / name

    def log_path(self, name: str) -> Path:
        return self.node_dir(name) / "siphon.log"

    def running_nodes(self) -> list[str]:
        return [name for name, node in self.state.get("nodes", {}).items()
                if node.get("pid") and is_our_node(node["pid"])]


# ---------------------------------------------------------------------------- kafka


def kafka_sh(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(KAFKA_SH), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO, check=False)


def start_kafka(cluster: Cluster, port: int | None) -> str:
    kdir = cluster.dir / "kafka"
    if kafka_sh("status", "--dir", str(kdir), timeout=30).returncode == 0:
        bootstrap = (kdir / "bootstrap").read_text().strip()
        say(f"kafka: already running on {bootstrap} (dir {kdir})")
        return bootstrap
    args = ["start", "--dir", str(kdir)]
    if port:
        args += ["--port", str(port)]
    say(f"kafka: starting a broker with scripts/kafka.sh (dir {kdir}) ...")
    try:
        done = kafka_sh(*args, timeout=900)
    except subprocess.TimeoutExpired:
        kafka_sh("stop", "--dir", str(kdir), timeout=120)
        raise ClusterError("scripts/kafka.sh start did not finish in 900 s") from None
    found = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    if done.returncode != 0 or not found.get("KAFKA_BOOTSTRAP"):
        raise ClusterError(f"scripts/kafka.sh start failed ({done.returncode}):\n"
                           f"{done.stdout}{done.stderr}")
    return found["KAFKA_BOOTSTRAP"]


def stop_kafka(cluster: Cluster) -> None:
    kdir = cluster.dir / "kafka"
    done = kafka_sh("stop", "--dir", str(kdir), timeout=120)
    if done.returncode != 0:
        warn(f"scripts/kafka.sh stop failed ({done.returncode}): {done.stderr.strip()}")
    else:
        say(f"kafka: stopped (dir {kdir})")


# ---------------------------------------------------------------------------- nodes


def node_env(cluster: Cluster, name: str) -> dict[str, str]:
    """The caller's environment plus what tells this node apart (config/siphon.yaml)."""
    st = cluster.state
    ports = st["nodes"][name]["ports"]
    env = dict(os.environ)
    env.update({
        "SIPHON_NODE_ID": name,
        "SIPHON_SIP_LISTEN": f"{HOST}:{ports['sip']}",
        "SIPHON_HTTP_LISTEN": f"{HOST}:{ports['http']}",
        "SIPHON_ADMIN_LISTEN": f"{HOST}:{ports['admin']}",
        "SIPHON_ADVERTISE": HOST,
        "SIPHON_KAFKA_BOOTSTRAP": st["kafka"]["bootstrap"],
        "SIPHON_KAFKA_TOPIC": st["topic"],
        "SIPHON_KAFKA_GROUP": st["group"],
        "SIPHON_NONCE_SECRET": st["nonce_secret"],
        "SIPHON_DATA_DIR": str(cluster.node_dir(name)),
        "PYTHONUNBUFFERED": "1",
    })
    # The repository first on sys.path: a stale editable install cannot shadow it.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def spawn(cluster: Cluster, name: str, python: str) -> int:
    ndir = cluster.node_dir(name)
    ndir.mkdir(parents=True, exist_ok=True)
    log = cluster.log_path(name)
    with log.open("ab") as out:
        out.write(f"\n===== local-cluster: {name} starting at "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
        out.flush()
        proc = subprocess.Popen(
            [python, "-m", "siphon.cli", "run", "-c", str(CONFIG)],
            cwd=ndir, env=node_env(cluster, name), stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    (ndir / "siphon.pid").write_text(f"{proc.pid}\n")
    cluster.state["nodes"][name]["pid"] = proc.pid
    return proc.pid


def wait_ready(cluster: Cluster, names: list[str], timeout: float) -> dict[str, float]:
    """Seconds until each node answered /ready 200; ClusterError if one exits or the
    time runs out (with the end of its log)."""
    t0 = time.monotonic()
    took: dict[str, float] = {}
    while len(took) < len(names):
        for name in names:
            if name in took:
                continue
            node = cluster.state["nodes"][name]
            if not pid_alive(node["pid"]):
                raise ClusterError(f"{name} (pid {node['pid']}) exited while starting; "
                                   f"{cluster.log_path(name)}:\n{tail(cluster.log_path(name))}")
            if ready(node["ports"]["admin"]):
                took[name] = time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            late = [n for n in names if n not in took]
            raise ClusterError(f"{', '.join(late)} not ready after {timeout:g} s; "
                               + "".join(f"\n{cluster.log_path(n)}:\n{tail(cluster.log_path(n))}"
                                         for n in late))
        time.sleep(0.1)
    return took


def terminate(cluster: Cluster, names: list[str], timeout: float = 20.0) -> None:
    """SIGTERM (graceful: drain, commit, close), SIGKILL after ``timeout`` s."""
    pids = {n: cluster.state["nodes"][n]["pid"] for n in names}
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for name, pid in pids.items():
        if pid_alive(pid):
            warn(f"{name} (pid {pid}) ignored SIGTERM for {timeout:g} s: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------- commands


def describe(cluster: Cluster) -> None:
    st = cluster.state
    for name, node in st["nodes"].items():
        p = node["ports"]
        say(f"{name}  pid {node['pid']:<7}  sip udp+tcp {HOST}:{p['sip']}  "
            f"trunks http://{HOST}:{p['http']}/trunks  admin http://{HOST}:{p['admin']} "
            f"(/ready /metrics)")
    say(f"logs in {cluster.dir}/nodeN/siphon.log; these lines in {cluster.dir / 'cluster.env'}:")
    say((cluster.dir / "cluster.env").read_text().rstrip())


def cmd_start(args: argparse.Namespace) -> int:
    cluster = Cluster(args.dir)
    python = args.python or os.environ.get("SIPHON_PYTHON") or sys.executable
    running = cluster.running_nodes()
    if cluster.state and not running:
        # Every node is gone (crashed, killed): start afresh. A broker started here
        # earlier is reused by start_kafka() if it still runs.
        cluster.state = {}
    if cluster.state:
        missing = [n for n in NODES if n not in running]
        if not missing:
            say("local-cluster: already running")
            describe(cluster)
            return 0
        say(f"local-cluster: restarting {', '.join(missing)} (the others run)")
        st = cluster.state
        if st["kafka"]["owned"]:
            port = int(st["kafka"]["bootstrap"].rpartition(":")[2])
            st["kafka"]["bootstrap"] = start_kafka(cluster, port)
        for name in missing:
            spawn(cluster, name, python)
        cluster.save()
        took = wait_ready(cluster, missing, args.timeout)
        cluster.save()
        for name in missing:
            say(f"{name}: ready in {took[name]:.1f} s")
        describe(cluster)
        return 0

    bootstrap = args.kafka_bootstrap or os.environ.get("KAFKA_BOOTSTRAP") or ""
    if args.ports == "compose":
        ports = {n: dict(p) for n, p in COMPOSE_PORTS.items()}
    else:
        picked = free_ports(3 * len(NODES))
        ports = {n: {"sip": picked[3 * i], "http": picked[3 * i + 1],
                     "admin": picked[3 * i + 2]} for i, n in enumerate(NODES)}
    busy = [f"{n} {kind} {port}" for n, p in ports.items() for kind, port in p.items()
            if not port_free(port)]
    if busy:
        raise ClusterError(f"ports in use: {', '.join(busy)} (--ports free picks free ones)")
    owned = not bootstrap
    if owned:
        bootstrap = start_kafka(cluster, args.kafka_port)
    elif not tcp_open(bootstrap.split(",")[0]):
        warn(f"nothing answers on {bootstrap} yet; the nodes will say what they find")
    cluster.state = {
        "config": str(CONFIG),
        "python": python,
        "topic": args.topic or os.environ.get("SIPHON_KAFKA_TOPIC") or "siphon.events",
        "group": args.group or os.environ.get("SIPHON_KAFKA_GROUP") or "siphon",
        "nonce_secret": os.environ.get("SIPHON_NONCE_SECRET") or secrets.token_hex(32),
        "kafka": {"bootstrap": bootstrap, "owned": owned,
                  "dir": str(cluster.dir / "kafka") if owned else None},
        "nodes": {n: {"ports": ports[n], "pid": None} for n in NODES},
    }
    say(f"starting {len(NODES)} nodes: {CONFIG} on kafka {bootstrap}, "
        f"topic {cluster.state['topic']}")
    try:
        for name in NODES:
            spawn(cluster, name, python)
        cluster.save()
        took = wait_ready(cluster, list(NODES), args.timeout)
    except BaseException:
        started = [n for n in NODES if cluster.state["nodes"][n]["pid"]]
        terminate(cluster, started, timeout=10)
        if owned:
            stop_kafka(cluster)
        cluster.file.unlink(missing_ok=True)
        raise
    say("ready: " + ", ".join(f"{n} in {took[n]:.1f} s" for n in NODES))
    describe(cluster)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    cluster = Cluster(args.dir)
    if not cluster.state:
        say(f"local-cluster: nothing to stop in {cluster.dir}")
        return 0
    running = cluster.running_nodes()
    if running:
        terminate(cluster, running, timeout=args.timeout)
        for name in running:
            say(f"{name}: stopped (pid {cluster.state['nodes'][name]['pid']})")
    if cluster.state["kafka"].get("owned") and not args.keep_kafka:
        stop_kafka(cluster)
    cluster.file.unlink(missing_ok=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cluster = Cluster(args.dir)
    if not cluster.state:
        say(f"not running (no {cluster.file})")
        return EXIT_NOT_RUNNING
    healthy = True
    kafka = cluster.state["kafka"]
    kafka_up = tcp_open(kafka["bootstrap"].split(",")[0])
    healthy &= kafka_up
    say(f"kafka  {kafka['bootstrap']}  {'up' if kafka_up else 'DOWN'}"
        f"{'  (started here: ' + kafka['dir'] + ')' if kafka.get('owned') else ''}")
    for name, node in cluster.state["nodes"].items():
        p = node["ports"]
        alive = bool(node.get("pid")) and is_our_node(node["pid"])
        is_ready = alive and ready(p["admin"])
        healthy &= is_ready
        state = "ready" if is_ready else "running, NOT ready" if alive else "NOT running"
        say(f"{name}  pid {node.get('pid')}  {state}  sip {HOST}:{p['sip']}  "
            f"admin {HOST}:{p['admin']}  http {HOST}:{p['http']}")
    return 0 if healthy else EXIT_NOT_RUNNING


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compose/local-cluster",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The three-node topology of compose/docker-compose.yaml as processes on "
                    "this machine:\nKafka (scripts/kafka.sh, unless KAFKA_BOOTSTRAP names a "
                    "broker) and three `siphon run`\nwith exactly compose/config/siphon.yaml, "
                    "ports and broker given through its ${...} variables.",
        epilog="examples:\n"
               "  compose/local-cluster start                 # ports as in compose\n"
               "  compose/local-cluster start --ports free    # any free ports (CI)\n"
               "  KAFKA_BOOTSTRAP=127.0.0.1:9092 compose/local-cluster start\n"
               "  compose/local-cluster status; compose/local-cluster stop\n"
               "exit status: 0 ok; 1 failure (message on stderr); 3 status: not all running\n"
               "Other SIPHON_* variables (SIPHON_AUTH_USERS, SIPHON_LOG_LEVEL, ...) reach "
               "every node.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", type=Path, default=Path(os.environ.get(
        "SIPHON_CLUSTER_DIR", DEFAULT_DIR)),
        help="state directory (default $SIPHON_CLUSTER_DIR or %(default)s)")

    start = sub.add_parser("start", parents=[common], help="start Kafka (if needed) and the "
                           "three nodes, wait for /ready, print the ports; starts only the "
                           "missing nodes of a running cluster")
    start.add_argument("--kafka-bootstrap", metavar="HOST:PORT",
                       help="use this broker (default $KAFKA_BOOTSTRAP; none: start one)")
    start.add_argument("--kafka-port", type=int, help="port of a broker started here "
                       "(default: a free one)")
    start.add_argument("--ports", choices=("compose", "free"), default="compose",
                       help="compose: 5060/5062/5064, 8081-8083, 9191-9193 as in "
                            "docker-compose.yaml; free: any free ports (default compose)")
    start.add_argument("--topic", help="Kafka topic (default $SIPHON_KAFKA_TOPIC or "
                       "siphon.events)")
    start.add_argument("--group", help="consumer group prefix (default $SIPHON_KAFKA_GROUP "
                       "or siphon)")
    start.add_argument("--python", help="interpreter for the nodes (default "
                       "$SIPHON_PYTHON or this one)")
    start.add_argument("--timeout", type=float, default=90.0,
                       help="seconds to wait for /ready (default 90)")
    start.set_defaults(func=cmd_start)

    stop = sub.add_parser("stop", parents=[common], help="stop the nodes (SIGTERM, then "
                          "SIGKILL) and the broker if it was started here")
    stop.add_argument("--keep-kafka", action="store_true", help="leave the broker running")
    stop.add_argument("--timeout", type=float, default=20.0,
                      help="seconds before SIGKILL (default 20)")
    stop.set_defaults(func=cmd_stop)

    status = sub.add_parser("status", parents=[common], help="show the broker and each "
                            "node; exit 0 when all are up and ready, 3 otherwise")
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ClusterError as exc:
        warn(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `local-cluster start | head`: the work is done all the same
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
