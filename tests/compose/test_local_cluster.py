"""The compose topology run by ``compose/local-cluster``: Kafka and three ``siphon run``
processes with exactly compose/config/siphon.yaml.

The broker is the session's ``kafka_broker`` when that fixture is visible from here
(or ``KAFKA_BOOTSTRAP`` when set): the cluster then gets a topic of its own. Otherwise
``local-cluster start`` provisions one with scripts/kafka.sh, as it does for a person.

In order, on one cluster: every node is ready and runs the compose config; the image's
and compose's healthcheck commands pass against live nodes; a REGISTER (sipsak, digest)
through node 1 is visible on nodes 2 and 3; a trunk PUT on node 2 is served by node 3;
/metrics on each node; bad requests on the metrics port; node 1 killed with SIGKILL
while nodes 2 and 3 keep answering (REGISTER, lookups, trunks), then node 1 started
again catches up; ``stop`` leaves no process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.compose.conftest import COMPOSE_FILE, DOCKERFILE, LOCAL_CLUSTER, NODE_CONFIG, REPO

# 600 s: on a fresh machine the first `start` also fetches the broker's jars (Maven).
pytestmark = [pytest.mark.kafka, pytest.mark.integration, pytest.mark.timeout(600)]

NODES = ("node1", "node2", "node3")
PARTITIONS = 6  # compose/config/siphon.yaml's default


# ---------------------------------------------------------------------------- cluster


@dataclass
class LocalCluster:
    dir: Path
    env: dict[str, str]
    values: dict[str, str] = field(default_factory=dict)
    start_output: str = ""

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(LOCAL_CLUSTER), *args, "--dir", str(self.dir)],
                              capture_output=True, text=True, timeout=timeout, env=self.env,
                              cwd=REPO, check=False)

    def reload(self) -> None:
        text = (self.dir / "cluster.env").read_text()
        self.values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def port(self, node: str, kind: str) -> int:
        return int(self.values[f"{node.upper()}_{kind.upper()}"].rsplit(":", 1)[1])

    def pid(self, node: str) -> int:
        return int(self.values[f"{node.upper()}_PID"])

    def log(self, node: str) -> str:
        return (self.dir / node / "siphon.log").read_text(errors="replace")

    def tail(self, node: str, lines: int = 30) -> str:
        return f"--- {node} ---\n" + "\n".join(self.log(node).splitlines()[-lines:])

    def admin(self, node: str, path: str, timeout: float = 5.0) -> tuple[int, bytes, dict]:
        return http("GET", f"http://127.0.0.1:{self.port(node, 'admin')}{path}", timeout=timeout)

    def registration(self, node: str, aor: str) -> list[dict[str, Any]] | None:
        status, body, _ = self.admin(node, "/admin/registrations/" + urllib.request.quote(aor))
        if status == 404:
            return None
        assert status == 200, (status, body)
        return json.loads(body)["contacts"]

    def metrics(self, node: str) -> dict[str, list[tuple[dict[str, str], float]]]:
        status, body, headers = self.admin(node, "/metrics")
        assert status == 200, (status, body)
        assert headers.get("Content-Type", "").startswith("text/plain")
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                out.setdefault(sample.name, []).append((sample.labels, sample.value))
        return out


def http(method: str, url: str, body: bytes | None = None,
         timeout: float = 5.0) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def eventually(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


def shared_broker(request: pytest.FixtureRequest) -> str | None:
    """The bootstrap of the session's broker, if there is one to share."""
    with contextlib.suppress(pytest.FixtureLookupError):
        return request.getfixturevalue("kafka_broker")["KAFKA_BOOTSTRAP"]
    return os.environ.get("KAFKA_BOOTSTRAP") or None


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    bootstrap = shared_broker(request)
    if bootstrap is None:
        missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
        if missing:
            pytest.skip(f"local-cluster needs {' and '.join(missing)} for Kafka "
                        "(or KAFKA_BOOTSTRAP)")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SIPHON_") and k != "KAFKA_BOOTSTRAP"}
    env.update(PYTHON=sys.executable, SIPHON_LOG_LEVEL="info")
    c = LocalCluster(tmp_path_factory.mktemp("local-cluster"), env)
    suffix = uuid.uuid4().hex[:8]
    args = ["start", "--ports", "free", "--topic", f"siphon-compose-{suffix}",
            "--group", f"siphon-compose-{suffix}", "--timeout", "120"]
    if bootstrap:
        args += ["--kafka-bootstrap", bootstrap]
    t0 = time.monotonic()
    started = c.cli(*args, timeout=600)
    took = time.monotonic() - t0
    try:
        assert started.returncode == 0, \
            f"local-cluster start failed ({started.returncode}):\n{started.stdout}{started.stderr}"
        c.start_output = started.stdout
        c.reload()
        sys.stderr.write(f"\n[local-cluster] up in {took:.1f} s "
                         f"({'shared broker ' + bootstrap if bootstrap else 'own broker'})\n")
        yield c
    finally:
        stopped = c.cli("stop", timeout=180)
        pids = [int(v) for k, v in c.values.items() if k.endswith("_PID") and v]
        for pid in pids:  # never leave a node behind, whatever happened
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert stopped.returncode == 0, f"local-cluster stop:\n{stopped.stdout}{stopped.stderr}"


def sipsak_register(port: int, user: str, password: str, contact_port: int,
                    expires: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sipsak", "-U", "-C", f"sip:{user}@127.0.0.1:{contact_port}",
         "-s", f"sip:{user}@127.0.0.1:{port}", "-a", password, "-u", user, "-x", str(expires)],
        capture_output=True, text=True, timeout=30, check=False)


def value(metrics: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float:
    samples = [v for lab, v in metrics.get(name, []) if all(lab.get(k) == x
                                                            for k, x in labels.items())]
    assert samples, f"no {name}{labels} in /metrics ({sorted(metrics)})"
    return sum(samples)


# ---------------------------------------------------------------------------- tests


def test_nodes_run_the_compose_config_and_are_ready(cluster: LocalCluster) -> None:
    status = cluster.cli("status", timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count(" ready ") == 3, status.stdout
    for node in NODES:
        assert f"{node.upper()}_SIP=127.0.0.1:" in cluster.start_output
        cmdline = Path(f"/proc/{cluster.pid(node)}/cmdline").read_bytes().split(b"\0")
        assert str(NODE_CONFIG).encode() in cmdline, cmdline  # exactly compose/config/siphon.yaml
        environ = dict(kv.split(b"=", 1) for kv in
                       Path(f"/proc/{cluster.pid(node)}/environ").read_bytes().split(b"\0")
                       if b"=" in kv)
        assert environ[b"SIPHON_NODE_ID"] == node.encode()
        assert cluster.admin(node, "/ready")[0] == 200
        assert f"siphon node {node} ready" in cluster.log(node)


def healthcheck_commands() -> dict[str, list[str]]:
    """The /ready probes: the Dockerfile's HEALTHCHECK and the compose nodes' one."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith("HEALTHCHECK"))
    image = json.loads(line[line.index("CMD") + 3:].strip())
    compose = yaml.safe_load(COMPOSE_FILE.read_text())  # merge keys resolved
    node = compose["services"]["siphon1"]["healthcheck"]["test"]
    assert node[0] == "CMD" and image[0] == node[1] == "python"
    return {"Dockerfile HEALTHCHECK": [sys.executable, *image[1:]],
            "compose healthcheck": [sys.executable, *node[2:]]}


def test_container_healthchecks_pass_on_live_nodes(cluster: LocalCluster) -> None:
    """The exact probe commands of the image and of compose, run against these nodes
    (what the container engine would run inside each container)."""
    for what, cmd in healthcheck_commands().items():
        for node in NODES:
            env = dict(os.environ, SIPHON_ADMIN_LISTEN=f"0.0.0.0:{cluster.port(node, 'admin')}")
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=10,
                                  check=False)
            assert done.returncode == 0, f"{what} on {node}: {done.stderr}"
        with socket.socket() as sock:  # nothing listens there: unhealthy
            sock.bind(("127.0.0.1", 0))
            closed = sock.getsockname()[1]
        env = dict(os.environ, SIPHON_ADMIN_LISTEN=f"0.0.0.0:{closed}")
        done = subprocess.run(cmd, env=env, capture_output=True, timeout=10, check=False)
        assert done.returncode != 0, f"{what} passes with no node"


def test_register_on_node1_is_visible_on_nodes_2_and_3(cluster: LocalCluster) -> None:
    assert shutil.which("sipsak"), "sipsak is not installed (Debian package sipsak)"
    port = cluster.port("node1", "sip")
    aor = f"sip:alice@127.0.0.1:{port}" if port != 5060 else "sip:alice@127.0.0.1"
    bad = sipsak_register(port, "alice", "wrong-password", 5080)
    assert bad.returncode != 0, f"wrong password accepted:\n{bad.stdout}"
    ok = sipsak_register(port, "alice", "secret", 5080)
    assert ok.returncode == 0, f"sipsak: {ok.stdout}{ok.stderr}\n{cluster.tail('node1')}"
    contacts = cluster.registration("node1", aor)  # the 200 comes after node 1 applied it
    assert contacts and contacts[0]["uri"] == "sip:alice@127.0.0.1:5080", contacts
    assert contacts[0]["node"] == "node1"
    for node in ("node2", "node3"):
        found = eventually(lambda n=node: cluster.registration(n, aor),
                           f"{aor} on {node}", timeout=10)
        assert [c["uri"] for c in found] == ["sip:alice@127.0.0.1:5080"]
        assert found[0]["node"] == "node1"


def test_trunk_put_on_node2_is_served_by_node3(cluster: LocalCluster) -> None:
    record = {"sip_uri": "sip:gw1.example.net:5060", "transport": "udp", "carrier": "acme"}
    url2 = f"http://127.0.0.1:{cluster.port('node2', 'http')}/trunks/gw-compose"
    status, body, headers = http("PUT", url2, json.dumps(record).encode())
    assert status == 201, body
    assert headers.get("Location") == "/trunks/gw-compose"
    url3 = f"http://127.0.0.1:{cluster.port('node3', 'http')}/trunks/gw-compose"
    got = eventually(lambda: (r := http("GET", url3))[0] == 200 and json.loads(r[1]),
                     "trunk gw-compose on node3", timeout=10)
    assert got["sip_uri"] == record["sip_uri"] and got["carrier"] == "acme"
    listed = json.loads(http("GET", url3.rsplit("/", 1)[0] + "?enabled=true")[1])
    assert "gw-compose" in [t["id"] for t in listed["trunks"]]


def test_audit_follower_of_the_compose_file(cluster: LocalCluster, tmp_path: Path) -> None:
    """The compose ``audit`` service's command, with the nodes' config file: it ingests
    the topic into DuckDB (the file its healthcheck waits for) and stops on SIGINT."""
    compose = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["audit"]
    command = compose["command"]
    assert command[:2] == ["audit", "follow"]
    db = tmp_path / "audit.duckdb"
    args = [str(NODE_CONFIG) if a == "/etc/siphon/siphon.yaml" else
            str(db) if a.startswith("/var/lib/siphon/") else a for a in command]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIPHON_")}
    env.update(SIPHON_NODE_ID="audit", SIPHON_KAFKA_BOOTSTRAP=cluster.values["KAFKA_BOOTSTRAP"],
               SIPHON_KAFKA_TOPIC=cluster.values["SIPHON_KAFKA_TOPIC"],
               SIPHON_DATA_DIR=str(tmp_path), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "siphon.cli", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        eventually(lambda: db.exists() or proc.poll() is not None, "audit database", 30)
        assert proc.poll() is None, proc.communicate()
        check = compose["healthcheck"]["test"]
        assert check[:2] == ["CMD", "python"]
        probe = check[-1].replace("/var/lib/siphon/audit.duckdb", str(db))
        assert subprocess.run([sys.executable, "-c", probe], timeout=10).returncode == 0

        def ingested() -> int:
            done = subprocess.run(
                [sys.executable, "-m", "siphon.cli", "audit", "sql",
                 "select count(*) from events_raw where type in "
                 "('binding.added.v1', 'trunk.registered.v1')",
                 "--db", str(db), "--format", "csv"],
                env=env, capture_output=True, text=True, timeout=30, check=False)
            return int(done.stdout.split()[-1]) if done.returncode == 0 else 0

        eventually(lambda: ingested() >= 2, "alice's binding and the trunk in DuckDB", 30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # what compose's stop_signal sends
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "records ingested" in err, err


def test_metrics_on_every_node(cluster: LocalCluster) -> None:
    def converged() -> bool:
        return all(value(cluster.metrics(n), "siphon_bindings") >= 1
                   and value(cluster.metrics(n), "siphon_trunks", state="live") >= 1
                   for n in NODES)

    eventually(converged, "bindings and trunks on every node's /metrics", timeout=10)
    scraped = {n: cluster.metrics(n) for n in NODES}
    for node, m in scraped.items():
        assert value(m, "siphon_ready") == 1
        lag = m["siphon_consumer_lag"]
        assert sorted(int(lab["partition"]) for lab, _ in lag) == list(range(PARTITIONS))
        assert all(v >= 0 for _, v in lag)
        assert value(m, "siphon_projection_applied_events_total") >= 2, node
        assert "siphon_log_append_seconds_bucket" in m
    # Every node holds the same state; only node 1 answered the REGISTERs.
    assert len({value(m, "siphon_bindings") for m in scraped.values()}) == 1
    assert len({value(m, "siphon_trunks", state="live") for m in scraped.values()}) == 1
    assert value(scraped["node1"], "siphon_registrations_total", outcome="ok") >= 1
    assert value(scraped["node1"], "siphon_registrations_total", outcome="challenged") >= 1
    assert value(scraped["node2"], "siphon_registrations_total", outcome="ok") == 0


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def status_of(reply: bytes) -> int | None:
    line = reply.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[0].startswith(b"HTTP/") else None


def test_metrics_port_bad_requests(cluster: LocalCluster) -> None:
    """Unknown paths get 404, POST 405, malformed requests 400; the node keeps serving."""
    node, port = "node3", cluster.port("node3", "admin")
    for path in ("/nope", "/metrics/extra", "/metricsx", "/metrics/../../etc/passwd",
                 "/%2e%2e/metrics%00", "/admin/nope"):
        status = status_of(raw_exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n"
                                              "Connection: close\r\n\r\n".encode()))
        assert status == 404, (path, status)
    assert http("POST", f"http://127.0.0.1:{port}/metrics", b"{}")[0] == 405
    malformed = {
        "garbage request line": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        "bad version": b"GET /metrics HTTP/9.x\r\nHost: x\r\n\r\n",
        "header without colon": b"GET /metrics HTTP/1.1\r\nHost x\r\n\r\n",
        "huge header": b"GET /metrics HTTP/1.1\r\nX-A: " + b"a" * 70000 + b"\r\n\r\n",
        "bad content-length": b"GET /metrics HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    }
    for what, data in malformed.items():
        reply = raw_exchange(port, data)
        assert status_of(reply) == 400, (what, reply[:200])
    assert cluster.admin(node, "/metrics")[0] == 200
    assert os.path.exists(f"/proc/{cluster.pid(node)}")
    # aiohttp reports each unparsable request with a traceback (logger aiohttp.server);
    # nothing else may have raised.
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} )", cluster.log(node))
    raised = [r for r in records if "Traceback" in r and "aiohttp.server: Error handling" not in r]
    assert not raised, raised


def test_kill_node1_nodes_2_and_3_still_answer(cluster: LocalCluster) -> None:
    os.kill(cluster.pid("node1"), signal.SIGKILL)
    eventually(lambda: not Path(f"/proc/{cluster.pid('node1')}/cmdline").exists()
               or not Path(f"/proc/{cluster.pid('node1')}/cmdline").read_bytes(),
               "node1 gone", timeout=10)
    status = cluster.cli("status", timeout=60)
    assert status.returncode == 3, status.stdout
    assert "node1" in status.stdout and "NOT running" in status.stdout

    for node in ("node2", "node3"):
        assert cluster.admin(node, "/ready")[0] == 200
    port2 = cluster.port("node2", "sip")
    ok = sipsak_register(port2, "bob", "secret", 5081)
    assert ok.returncode == 0, f"sipsak via node2: {ok.stdout}{ok.stderr}\n{cluster.tail('node2')}"
    bob = f"sip:bob@127.0.0.1:{port2}" if port2 != 5060 else "sip:bob@127.0.0.1"
    alice_port = cluster.port("node1", "sip")
    alice = f"sip:alice@127.0.0.1:{alice_port}" if alice_port != 5060 else "sip:alice@127.0.0.1"
    eventually(lambda: cluster.registration("node3", bob), f"{bob} on node3", timeout=10)
    assert cluster.registration("node3", alice), "node 1's binding is gone from node 3"
    url3 = f"http://127.0.0.1:{cluster.port('node3', 'http')}/trunks/gw-compose"
    assert http("GET", url3)[0] == 200
    assert value(cluster.metrics("node2"), "siphon_ready") == 1

    # Bring node 1 back: `start` starts only what is missing; it rebuilds from the topic.
    again = cluster.cli("start", timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "restarting node1" in again.stdout
    cluster.reload()
    assert cluster.registration("node1", bob), "node 1 did not catch up after the restart"
    assert cluster.cli("status", timeout=60).returncode == 0


def test_unwritable_data_dir_stops_the_node(cluster: LocalCluster, tmp_path: Path) -> None:
    """A node whose SIPHON_DATA_DIR cannot hold files exits non-zero, naming it."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    free = []
    for _ in range(3):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            free.append(sock.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIPHON_")}
    env.update(SIPHON_NODE_ID="node-bad-data-dir", SIPHON_DATA_DIR=str(blocker / "data"),
               SIPHON_SIP_LISTEN=f"127.0.0.1:{free[0]}", SIPHON_HTTP_LISTEN=f"127.0.0.1:{free[1]}",
               SIPHON_ADMIN_LISTEN=f"127.0.0.1:{free[2]}",
               SIPHON_KAFKA_BOOTSTRAP=cluster.values["KAFKA_BOOTSTRAP"],
               SIPHON_KAFKA_TOPIC=cluster.values["SIPHON_KAFKA_TOPIC"],
               SIPHON_KAFKA_GROUP=f"bad-data-dir-{uuid.uuid4().hex[:6]}",
               PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "siphon.cli", "run", "-c", str(NODE_CONFIG)],
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            status = None
            with contextlib.suppress(OSError):
                status = http("GET", f"http://127.0.0.1:{free[2]}/ready", timeout=1)[0]
            if status == 200:
                break  # it serves with nowhere to keep its snapshots
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode not in (None, 0, -signal.SIGKILL), "the node started"
    assert str(blocker) in stderr, stderr


def test_stop_leaves_nothing_running(cluster: LocalCluster) -> None:
    pids = [cluster.pid(n) for n in NODES]
    stopped = cluster.cli("stop", timeout=180)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline")
        assert not cmdline.exists() or str(NODE_CONFIG).encode() not in cmdline.read_bytes()
    assert cluster.cli("status", timeout=60).returncode == 3
    # Each node kept its projection snapshot (written at the graceful stop) in its own
    # SIPHON_DATA_DIR, never next to the config file.
    topic = cluster.values["SIPHON_KAFKA_TOPIC"]
    for node in NODES:
        assert (cluster.dir / node / f"{topic}.snapshot").exists(), sorted(
            p.name for p in (cluster.dir / node).iterdir())
    assert not (NODE_CONFIG.parent / "var").exists()
