"""A node given compose/config/siphon.yaml with one bad environment value refuses to
start: it exits non-zero, naming the problem on stderr (no broker needed: each case
fails before, or at, the connection to Kafka). And ``local-cluster start`` with nodes
that cannot start says which and why, exits 1 and leaves nothing running.

(An unwritable SIPHON_DATA_DIR needs a reachable broker to be told apart from a
connection failure: it is in test_local_cluster.py.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.compose.conftest import LOCAL_CLUSTER, NODE_CONFIG, REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

EXIT_CONFIG = 2
EXIT_STARTUP = 3


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """What local-cluster gives a node (free ports, a data dir), plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIPHON_")}
    env.update({
        "SIPHON_NODE_ID": "bad-input",
        "SIPHON_SIP_LISTEN": f"127.0.0.1:{closed_port()}",
        "SIPHON_HTTP_LISTEN": f"127.0.0.1:{closed_port()}",
        "SIPHON_ADMIN_LISTEN": f"127.0.0.1:{closed_port()}",
        "SIPHON_KAFKA_BOOTSTRAP": f"127.0.0.1:{closed_port()}",
        "SIPHON_DATA_DIR": str(tmp_path),
        "SIPHON_NONCE_SECRET": "bad-input-test-nonce-secret",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                      if p),
    })
    env.update(overrides)
    return env


def run_node(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "siphon.cli", "run", "-c", str(NODE_CONFIG)],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, check=False)


def not_a_dir(tmp_path: Path) -> Path:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    return blocker


def fill_in(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


Case = Callable[[Path], tuple[dict[str, str], int | None, list[str]]]
CASES: dict[str, Case] = {
    # an unknown key, arriving through an env value (a YAML flow mapping of users)
    "unknown key": lambda tmp: (
        {"SIPHON_AUTH_USERS": "{carol: {passwd: pw3}}"}, EXIT_CONFIG,
        ["unknown key 'auth.users.carol.passwd'"]),
    "listen port out of range": lambda tmp: (
        {"SIPHON_SIP_LISTEN": "127.0.0.1:99999"}, EXIT_CONFIG,
        ["listen.udp[0]", "out of range"]),
    "admin listen not host:port": lambda tmp: (
        {"SIPHON_ADMIN_LISTEN": "9191"}, EXIT_CONFIG, ["admin.listen"]),
    "log level": lambda tmp: (
        {"SIPHON_LOG_LEVEL": "loud"}, EXIT_CONFIG, ["log.level", "loud"]),
    "zero partitions": lambda tmp: (
        {"SIPHON_KAFKA_PARTITIONS": "0"}, EXIT_CONFIG, ["registrar.kafka.partitions"]),
    "no broker listening": lambda tmp: (
        {"SIPHON_KAFKA_BOOTSTRAP": "127.0.0.1:{port}"}, EXIT_STARTUP,
        ["kafka 127.0.0.1:{port}", "cannot connect"]),
    "unresolvable broker": lambda tmp: (
        {"SIPHON_KAFKA_BOOTSTRAP": "kafka.invalid:9092"}, EXIT_STARTUP,
        ["kafka kafka.invalid:9092", "cannot connect"]),
    "admin port taken": lambda tmp: (
        {"SIPHON_ADMIN_LISTEN": "127.0.0.1:{taken}"}, EXIT_STARTUP,
        ["cannot start", "127.0.0.1", "{taken}"]),
    "log file in a non-directory": lambda tmp: (
        {"SIPHON_LOG_FILE": f"{not_a_dir(tmp)}/siphon.log"}, None,
        [f"{tmp}/a-file/siphon.log", "Not a directory"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_node_refuses_a_bad_env_value(tmp_path: Path, case: str) -> None:
    overrides, code, needles = CASES[case](tmp_path)
    port = closed_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        fill = {"port": str(port), "taken": str(taken.getsockname()[1])}
        overrides = {k: fill_in(v, fill) for k, v in overrides.items()}
        done = run_node(node_env(tmp_path, **overrides), tmp_path)
    assert done.returncode != 0, f"{case}: the node started\n{done.stderr}"
    if code is not None:
        assert done.returncode == code, (case, done.returncode, done.stderr)
    for needle in needles:
        assert fill_in(needle, fill) in done.stderr, (case, needle, done.stderr)
    if code == EXIT_CONFIG:  # config errors: one line naming the key, no traceback
        assert "Traceback" not in done.stderr, done.stderr
        assert str(NODE_CONFIG) in done.stderr


def test_local_cluster_reports_nodes_that_cannot_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SIPHON_") and k != "KAFKA_BOOTSTRAP"}
    env["PYTHON"] = sys.executable
    state = tmp_path / "cluster"
    broker = f"127.0.0.1:{closed_port()}"
    done = subprocess.run(
        ["bash", str(LOCAL_CLUSTER), "start", "--dir", str(state), "--ports", "free",
         "--kafka-bootstrap", broker, "--timeout", "60"],
        env=env, capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "exited while starting" in done.stderr, done.stderr
    assert f"kafka {broker}" in done.stderr and "cannot connect" in done.stderr, done.stderr
    status = subprocess.run(["bash", str(LOCAL_CLUSTER), "status", "--dir", str(state)],
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    assert status.returncode == 3, status.stdout
    leftovers = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(state) in os.readlink(proc / "cwd"):
                    leftovers.append(proc.name)
            except OSError:
                continue
    assert not leftovers, f"processes left running in {state}: {leftovers}"


def test_local_cluster_help_and_usage_errors() -> None:
    helped = subprocess.run(["bash", str(LOCAL_CLUSTER), "--help"], capture_output=True,
                            text=True, timeout=30, check=False,
                            env=dict(os.environ, PYTHON=sys.executable))
    assert helped.returncode == 0
    for word in ("start", "stop", "status", "compose/config/siphon.yaml", "KAFKA_BOOTSTRAP"):
        assert word in helped.stdout
    wrong = subprocess.run(["bash", str(LOCAL_CLUSTER), "restart"], capture_output=True,
                           text=True, timeout=30, check=False,
                           env=dict(os.environ, PYTHON=sys.executable))
    assert wrong.returncode == 2 and "invalid choice" in wrong.stderr


def test_audit_follower_refuses_an_unusable_database_dir(tmp_path: Path) -> None:
    """The compose ``audit`` service's command with its --db in a directory that cannot
    hold files: exit 3 naming the file (before any connection to Kafka)."""
    db = not_a_dir(tmp_path) / "audit.duckdb"
    env = node_env(tmp_path, SIPHON_NODE_ID="audit")
    done = subprocess.run(
        [sys.executable, "-m", "siphon.cli", "audit", "follow", "-c", str(NODE_CONFIG),
         "--db", str(db)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == EXIT_STARTUP, (done.returncode, done.stderr)
    assert str(db) in done.stderr, done.stderr
