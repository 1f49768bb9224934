"""The deployment files, checked without a container engine.

* compose/docker-compose.yaml loads in the real Compose v2 (``docker-compose
  config``: the Compose Specification schema, interpolation, YAML merge keys,
  depends_on targets) and is dclint-clean; the topology is the one documented:
  Kafka (KRaft), three siphon nodes sharing one topic, the DuckDB audit follower,
  Prometheus scraping every node;
* compose/config/siphon.yaml is ONE file that every node can use: parsed with each
  node's environment from the compose file, it gives that node's id and ports and
  the shared broker, topic and nonce key;
* the Dockerfile is hadolint-clean, runs as a non-root user, checks /ready, and
  .dockerignore keeps everything it copies (and keeps .git, .venv, .cache out).
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from siphon.config import parse_config
from tests.compose.conftest import (
    COMPOSE_DIR,
    COMPOSE_FILE,
    CONFIG_DIR,
    DCLINT,
    DOCKERFILE,
    NODE_CONFIG,
    REPO,
    docker_compose,
    hadolint,
    npx,
    run,
)

NODES = ("siphon1", "siphon2", "siphon3")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The compose project as Compose itself resolves it (``config --format json``), with
    none of the caller's SIPHON_* variables (the defaults of the file)."""
    home = tmp_path_factory.mktemp("compose-home")
    done = run([docker_compose(), "-f", str(COMPOSE_FILE), "config", "--format", "json"],
               env={"PATH": "/usr/bin:/bin", "HOME": str(home)})
    assert done.returncode == 0, f"docker-compose config failed:\n{done.stderr}"
    return json.loads(done.stdout)


# ---------------------------------------------------------------------------- compose


def test_compose_file_is_valid_for_compose_v2() -> None:
    done = run([docker_compose(), "-f", str(COMPOSE_FILE), "config", "--quiet"])
    assert done.returncode == 0, f"docker-compose config rejected the file:\n{done.stderr}"


@pytest.mark.parametrize(("edit", "complaint"), [
    (("restart: unless-stopped", "restrat: unless-stopped"), "additional properties"),
    (("condition: service_healthy", "condition: service_happy"), "must be one of"),
    (("      siphon1:\n        condition: service_healthy",
      "      siphon9:\n        condition: service_healthy"), "undefined service"),
])
def test_compose_validator_rejects_broken_files(tmp_path: Path, edit: tuple[str, str],
                                                complaint: str) -> None:
    """The validator is a real one: a typo, a bad enum value, a dangling depends_on fail."""
    text = COMPOSE_FILE.read_text()
    assert edit[0] in text
    broken = tmp_path / "docker-compose.yaml"
    broken.write_text(text.replace(edit[0], edit[1], 1))
    done = run([docker_compose(), "-f", str(broken), "--project-directory", str(COMPOSE_DIR),
                "config", "--quiet"])
    assert done.returncode != 0, "a broken compose file was accepted"
    assert complaint in done.stderr, done.stderr


def test_compose_file_is_dclint_clean() -> None:
    done = run([npx(), "--yes", DCLINT, str(COMPOSE_FILE), "--max-warnings", "0"],
               timeout=300)
    assert done.returncode == 0, f"dclint:\n{done.stdout}\n{done.stderr}"
    assert "problem" not in done.stdout, done.stdout


def test_topology(model: dict[str, Any]) -> None:
    services = model["services"]
    assert set(services) == {"kafka", *NODES, "audit", "prometheus"}

    kafka = services["kafka"]
    assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", kafka["image"]), kafka["image"]
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert "test" in kafka["healthcheck"]

    ids, sip_ports = set(), set()
    for name in NODES:
        node = services[name]
        assert node["build"]["context"] == str(REPO)
        assert Path(node["build"]["dockerfile"]).name == "Dockerfile"
        assert node["command"] == ["run", "-c", "/etc/siphon/siphon.yaml"]
        assert node["depends_on"]["kafka"]["condition"] == "service_healthy"
        assert node["healthcheck"]["test"][0] == "CMD"
        assert "/ready" in node["healthcheck"]["test"][-1]
        mounts = {v["target"]: v for v in node["volumes"]}
        assert mounts["/etc/siphon"]["source"] == str(CONFIG_DIR)
        assert mounts["/etc/siphon"]["read_only"]
        data = mounts["/var/lib/siphon"]  # SIPHON_DATA_DIR's default: snapshots
        assert data["type"] == "volume" and data["source"] == f"{name}-data"
        env = node["environment"]
        assert env["SIPHON_KAFKA_BOOTSTRAP"] == "kafka:9092"
        assert env["SIPHON_KAFKA_TOPIC"] == "siphon.events"  # one topic for all
        assert env["SIPHON_NODE_ID"] == name
        ids.add(env["SIPHON_NODE_ID"])
        sip_ports.add(env["SIPHON_SIP_LISTEN"])
        published = {(p["target"], p["protocol"]) for p in node["ports"]}
        port = int(env["SIPHON_SIP_LISTEN"].rsplit(":", 1)[1])
        assert {(port, "udp"), (port, "tcp")} <= published
        assert all(p["host_ip"] == "127.0.0.1" for p in node["ports"])
    assert len(ids) == len(sip_ports) == 3
    secrets = {services[n]["environment"]["SIPHON_NONCE_SECRET"] for n in NODES}
    assert len(secrets) == 1 and secrets != {""}, "every node needs the same nonce secret"

    audit = services["audit"]
    assert audit["command"][:2] == ["audit", "follow"]
    db = audit["command"][audit["command"].index("--db") + 1]
    volume = {v["target"]: v for v in audit["volumes"]}["/var/lib/siphon"]
    assert volume["type"] == "volume" and db.startswith("/var/lib/siphon/")
    assert audit["command"][audit["command"].index("-c") + 1] == "/etc/siphon/siphon.yaml"
    assert audit["depends_on"]["kafka"]["condition"] == "service_healthy"

    prom = services["prometheus"]
    assert prom["image"].startswith("prom/prometheus:v")
    mount = {v["target"]: v for v in prom["volumes"]}["/etc/prometheus/prometheus.yml"]
    assert mount["source"] == str(CONFIG_DIR / "prometheus.yml")
    assert set(model["volumes"]) >= {"kafka-data", "audit-data", "prometheus-data",
                                     *(f"{n}-data" for n in NODES)}


def test_prometheus_scrapes_every_node(model: dict[str, Any]) -> None:
    prom = yaml.safe_load((CONFIG_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    siphon = jobs["siphon"]
    assert siphon.get("metrics_path", "/metrics") == "/metrics"
    targets = {t for sc in siphon["static_configs"] for t in sc["targets"]}
    admin = {n: model["services"][n]["environment"]["SIPHON_ADMIN_LISTEN"] for n in NODES}
    expected = {f"{n}:{listen.rsplit(':', 1)[1]}" for n, listen in admin.items()}
    assert targets == expected


def test_one_config_file_serves_every_node(model: dict[str, Any]) -> None:
    """config/siphon.yaml with each node's compose environment: valid, and that node's."""
    text = NODE_CONFIG.read_text()
    seen = set()
    for name in NODES:
        env = model["services"][name]["environment"]
        cfg = parse_config(text, base_dir=CONFIG_DIR, source=str(NODE_CONFIG), env=env)
        assert cfg.server.instance_id == name
        assert cfg.registrar.backend == "kafka"
        assert cfg.registrar.kafka is not None
        assert cfg.registrar.kafka.bootstrap_servers == ["kafka:9092"]
        assert cfg.registrar.kafka.topic == "siphon.events"
        assert cfg.auth.nonce_secret == env["SIPHON_NONCE_SECRET"]
        assert cfg.trunks.enabled
        assert cfg.admin is not None and cfg.admin.listen == env["SIPHON_ADMIN_LISTEN"]
        assert cfg.http.listen == env["SIPHON_HTTP_LISTEN"]
        assert [lst.address for lst in cfg.listen.udp] == [env["SIPHON_SIP_LISTEN"]]
        assert [lst.address for lst in cfg.listen.tcp] == [env["SIPHON_SIP_LISTEN"]]
        assert cfg.script.path == str(CONFIG_DIR / "registrar.py")
        # the node's own files (projection snapshots) go to its data volume
        assert Path(cfg.registrar.path).parent == Path(env.get("SIPHON_DATA_DIR",
                                                               "/var/lib/siphon"))
        assert not [w for w in cfg.warnings if "not set" in w], cfg.warnings
        seen.add((cfg.listen.udp[0].port, cfg.admin.listen, cfg.http.listen))
    assert len(seen) == 3


def test_recipe_is_the_example_recipe() -> None:
    """compose/config/registrar.py is the registrar recipe, kept verbatim."""
    assert (CONFIG_DIR / "registrar.py").read_bytes() == \
        (REPO / "examples" / "registrar.py").read_bytes()


# ---------------------------------------------------------------------------- Dockerfile


def test_dockerfile_is_hadolint_clean() -> None:
    done = run([hadolint(), "--failure-threshold", "style", str(DOCKERFILE)])
    assert done.returncode == 0, f"hadolint:\n{done.stdout}{done.stderr}"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_shape() -> None:
    ins = dockerfile_instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert froms and all("PYTHON_IMAGE" in f for f in froms)
    assert any(rest.startswith("PYTHON_IMAGE=python:3.11-slim") for word, rest in ins
               if word == "ARG")
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any("pip install" in rest and " ." in rest for word, rest in ins if word == "RUN")
    assert json.loads(dict(ins)["ENTRYPOINT"]) == ["siphon"]
    exposed = set(dict(ins)["EXPOSE"].split())
    assert {"5060/udp", "5060/tcp", "8080/tcp", "9091/tcp"} <= exposed
    health = dict(ins)["HEALTHCHECK"]
    assert "/ready" in health and "urllib" in health and "curl" not in health


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule (last match wins; a pattern matching a parent
    directory matches everything under it)."""
    parts = path.split("/")

    def match(pattern: str) -> bool:
        pat = [p for p in pattern.strip("/").split("/") if p]

        def rec(i: int, j: int) -> bool:
            if i == len(pat):
                return True  # the pattern matched a prefix: a parent directory
            if j == len(parts):
                return False
            if pat[i] == "**":
                return any(rec(i + 1, k) for k in range(j, len(parts) + 1))
            return fnmatch.fnmatchcase(parts[j], pat[i]) and rec(i + 1, j + 1)

        return rec(0, 0)

    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        if match(raw[1:] if negate else raw):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    sources = []
    for word, rest in dockerfile_instructions():
        if word == "COPY" and "--from=" not in rest:
            sources += rest.split()[:-1]
    assert sources
    for src in sources:
        files = [p for p in (REPO / src).rglob("*") if p.is_file()] if (REPO / src).is_dir() \
            else [REPO / src]
        assert files, f"COPY {src}: nothing there"
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            if "__pycache__" in rel or rel.endswith(".pyc"):
                assert _ignored(rel, patterns), f"{rel} would be sent to the build"
                continue
            assert not _ignored(rel, patterns), f".dockerignore drops {rel} (COPY {src})"
    for kept_out in (".git/HEAD", ".venv/bin/python", ".cache/kafka-4.4.0/pom.xml",
                     "var/siphon-log.db", "tests/unit/test_config.py", "bench/register.py",
                     "compose/docker-compose.yaml", "siphon.egg-info/PKG-INFO"):
        assert _ignored(kept_out, patterns), f"{kept_out} would be sent to the build"
