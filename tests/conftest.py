"""A real Kafka broker for the Kafka backend tests (one per test session).

Uses ``KAFKA_BOOTSTRAP`` from the environment when set; otherwise starts a
single-node KRaft broker with ``scripts/kafka.sh start`` in a temporary
directory (fetching its jars from Maven Central first if needed) and stops it
when the session ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "kafka.sh"
ENV_KEYS = ("KAFKA_BOOTSTRAP", "KAFKA_SASL_BOOTSTRAP", "KAFKA_SSL_BOOTSTRAP", "KAFKA_SSL_CAFILE")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kafka: needs a Kafka broker (started by scripts/kafka.sh)")


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT, check=False)


def _say(request: pytest.FixtureRequest, text: str) -> None:
    """Write past pytest's output capture (the figures are the point)."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        sys.stderr.write("\n" + text + "\n")


@pytest.fixture(scope="session")
def kafka_broker(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """``KAFKA_BOOTSTRAP`` of a running broker, and when it has them
    ``KAFKA_SASL_BOOTSTRAP`` (SASL_PLAINTEXT, PLAIN, user siphon / siphon-secret),
    ``KAFKA_SSL_BOOTSTRAP`` and ``KAFKA_SSL_CAFILE`` (SSL, the CA to trust)."""
    if os.environ.get("KAFKA_BOOTSTRAP"):
        yield {k: os.environ[k] for k in ENV_KEYS if os.environ.get(k)}
        return
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"Kafka tests need {' and '.join(missing)} (or KAFKA_BOOTSTRAP)")
    run_dir = tmp_path_factory.mktemp("kafka")
    t0 = time.monotonic()
    try:
        started = _script("start", "--sasl", "--ssl", "--dir", str(run_dir), timeout=900)
    except subprocess.TimeoutExpired:
        _script("stop", "--dir", str(run_dir), timeout=120)
        raise
    took = time.monotonic() - t0
    if started.returncode != 0:
        pytest.fail(f"scripts/kafka.sh start failed ({started.returncode}):\n"
                    f"{started.stdout}\n{started.stderr}", pytrace=False)
    found = dict(line.split("=", 1) for line in started.stdout.splitlines() if "=" in line)
    assert found.get("KAFKA_BOOTSTRAP"), f"no KAFKA_BOOTSTRAP in output: {started.stdout!r}"
    _say(request, f"[kafka] broker {found['KAFKA_BOOTSTRAP']} ready after {took:.1f} s "
         f"(fetch if needed + start; dir {run_dir})\n{started.stderr.rstrip()}")
    try:
        yield found
    finally:
        stopped = _script("stop", "--dir", str(run_dir), timeout=120)
        if stopped.returncode != 0:
            _say(request, f"[kafka] stop failed: {stopped.stderr}")


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: dict[str, str]) -> str:
    """``host:port`` of the broker's PLAINTEXT listener."""
    return kafka_broker["KAFKA_BOOTSTRAP"]


@pytest.fixture(scope="session")
def kafka_sasl_bootstrap(kafka_broker: dict[str, str]) -> str:
    """``host:port`` of the broker's SASL_PLAINTEXT listener (PLAIN, siphon/siphon-secret)."""
    if "KAFKA_SASL_BOOTSTRAP" not in kafka_broker:
        pytest.skip("no SASL listener (KAFKA_BOOTSTRAP given without KAFKA_SASL_BOOTSTRAP)")
    return kafka_broker["KAFKA_SASL_BOOTSTRAP"]


@pytest.fixture(scope="session")
def kafka_ssl(kafka_broker: dict[str, str]) -> tuple[str, str]:
    """``(host:port, CA file)`` of the broker's SSL listener."""
    if "KAFKA_SSL_BOOTSTRAP" not in kafka_broker or "KAFKA_SSL_CAFILE" not in kafka_broker:
        pytest.skip("no SSL listener (KAFKA_BOOTSTRAP given without KAFKA_SSL_BOOTSTRAP "
                    "and KAFKA_SSL_CAFILE)")
    return kafka_broker["KAFKA_SSL_BOOTSTRAP"], kafka_broker["KAFKA_SSL_CAFILE"]
