"""A real Kafka broker for the Kafka backend tests (one per test session).

Uses ``KAFKA_BOOTSTRAP`` from the environment when set; otherwise starts a
single-node KRaft broker with ``scripts/kafka.sh start`` in a temporary
directory (fetching its jars from Maven Central first if needed) and stops it
when the session ends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "kafka.sh"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kafka: needs a Kafka broker (started by scripts/kafka.sh)")


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT, check=False)


def _say(request: pytest.FixtureRequest, text: str) -> None:
    """Write past pytest's output capture (the figures are the point)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        for line in text.splitlines():
            reporter.write_line(line)
    else:
        sys.stderr.write(text + "\n")


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a running Kafka broker."""
    given = os.environ.get("KAFKA_BOOTSTRAP")
    if given:
        yield given
        return
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"Kafka tests need {' and '.join(missing)} (or KAFKA_BOOTSTRAP)")
    run_dir = tmp_path_factory.mktemp("kafka")
    t0 = time.monotonic()
    started = _script("start", "--dir", str(run_dir), timeout=900)
    took = time.monotonic() - t0
    if started.returncode != 0:
        pytest.fail(f"scripts/kafka.sh start failed ({started.returncode}):\n"
                    f"{started.stdout}\n{started.stderr}", pytrace=False)
    bootstrap = next((line.split("=", 1)[1] for line in started.stdout.splitlines()
                      if line.startswith("KAFKA_BOOTSTRAP=")), "")
    assert bootstrap, f"no KAFKA_BOOTSTRAP in output: {started.stdout!r}"
    _say(request, f"[kafka] broker {bootstrap} ready after {took:.1f} s (fetch if needed + "
         f"start; dir {run_dir})\n{started.stderr.rstrip()}")
    try:
        yield bootstrap
    finally:
        stopped = _script("stop", "--dir", str(run_dir), timeout=120)
        if stopped.returncode != 0:
            _say(request, f"[kafka] stop failed: {stopped.stderr}")
