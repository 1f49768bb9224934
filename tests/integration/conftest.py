"""Fixtures for the integration suite: ``siphon run`` as a real subprocess.

Every test gets a :class:`SiphonProcess` bound to its ``tmp_path``: a config
file, a script file, the embedded event log and the process output all live
there. The process is always killed at teardown, whatever the test did.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

# pytest imports this file as ``conftest``; test modules may import it as ``conftest`` or
# ``tests.integration.conftest``. Make both names one module, so that free_port() keeps a
# single record of the ports it handed out.
sys.modules.setdefault("conftest", sys.modules[__name__])
sys.modules.setdefault("tests.integration.conftest", sys.modules[__name__])

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
CONFORMANCE = REPO.parent / "shared" / "conformance" / "rfc4475"

NONCE_SECRET = "integration-tests-nonce-secret-0123456789abcdef"
REALM = "example.com"
USERS = {"alice": "secret", "bob": "secret", **{f"user{i:03d}": f"pw{i:03d}" for i in range(100)}}

# A script that saves every REGISTER, challenging only those that carry credentials;
# other requests are looked up (404 when nobody is registered).
CONFORMANCE_SCRIPT = '''\
from siphon import auth, log, proxy, registrar


@proxy.on_request
def route(request):
    if request.method == "REGISTER":
        if request.has_header("Authorization") and not auth.require_digest(request):
            return
        registrar.save(request)
        return
    if not registrar.lookup(request.ruri):
        request.reply(404, "Not Found")
        return
    request.fork(registrar.lookup(request.ruri))


@registrar.on_change
def changed(aor, event_type, contacts):
    log.info(f"on_change {aor} {event_type} {len(contacts)}")
'''

# Digest-protected registrar (the examples/registrar.py logic) plus an on_change log.
AUTH_SCRIPT = '''\
from siphon import auth, log, proxy, registrar


@proxy.on_request
def route(request):
    if request.method == "REGISTER":
        if not auth.require_digest(request):
            return
        registrar.save(request)
        return
    if request.method == "OPTIONS" and request.ruri.user is None:
        request.reply(200, "OK")
        return
    if not registrar.lookup(request.ruri):
        request.reply(404, "Not Found")
        return
    request.fork(registrar.lookup(request.ruri))


@registrar.on_change
def changed(aor, event_type, contacts):
    log.info(f"on_change {aor} {event_type} {len(contacts)}")
'''


def _port_is_free(port: int) -> bool:
    """True if ``port`` can be bound on 127.0.0.1 for both UDP and TCP right now."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("127.0.0.1", port))
        udp.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        udp.close()
        tcp.close()


_handed_out: set[int] = set()


def free_port(*, below: int | None = None) -> int:
    """A port free for both UDP and TCP on 127.0.0.1, never handed out twice.

    ``below`` asks for a port under that number, picked from a deterministic-but-spread
    range: sipsak 0.9.8.1 truncates five-digit ports in the URIs it builds (it sends
    ``REGISTER sip:127.0.0.1:2506`` for ``-s sip:alice@127.0.0.1:25060``).
    """
    if below is not None:
        start = 2000 + (os.getpid() * 37) % (below - 2000)
        for i in range(below - 2000):
            port = 2000 + (start - 2000 + i) % (below - 2000)
            if port not in _handed_out and _port_is_free(port):
                _handed_out.add(port)
                return port
        raise RuntimeError(f"no free port below {below}")
    for _ in range(100):
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        if port not in _handed_out and _port_is_free(port):
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port")


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class SiphonProcess:
    """One siphon node run as ``python -m siphon.cli run -c CONFIG`` in ``workdir``."""

    def __init__(self, workdir: Path, name: str = "node", *, sip_port: int | None = None):
        self.workdir = workdir
        self.name = name
        self.sip_port = sip_port or free_port()
        self.admin_port = free_port()
        self.config_path = workdir / f"{name}.yaml"
        self.script_path = workdir / f"{name}_script.py"
        self.log_db = workdir / f"{name}-log.db"
        self.output_path = workdir / f"{name}.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.config: dict[str, Any] = {}
        self.starts = 0

    # ---- config ------------------------------------------------------------------
    def base_config(self) -> dict[str, Any]:
        return {
            "listen": {
                "udp": [f"127.0.0.1:{self.sip_port}"],
                "tcp": [f"127.0.0.1:{self.sip_port}"],
            },
            "domain": {"local": ["example.com", "127.0.0.1"]},
            "script": {"path": str(self.script_path)},
            "registrar": {
                "backend": "embedded",
                "path": str(self.log_db),
                "default_expires": 3600,
                "min_expires": 60,
                "max_expires": 7200,
                "max_contacts": 10,
            },
            "auth": {
                "realm": REALM,
                "backend": "static",
                "credentials": dict(USERS),
                "nonce_secret": NONCE_SECRET,
                "algorithms": ["MD5", "SHA-256"],
            },
            "admin": {"listen": f"127.0.0.1:{self.admin_port}"},
            "server": {"instance_id": f"it-{self.name}", "drain_secs": 2},
            "log": {"level": "info"},
        }

    def write_files(self, config_overrides: dict[str, Any] | None = None,
                    script_text: str | None = None) -> None:
        self.config = deep_merge(self.base_config(), config_overrides or {})
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.script_path.write_text(script_text if script_text is not None else AUTH_SCRIPT)

    # ---- lifecycle ---------------------------------------------------------------
    def _spawn(self) -> None:
        self.starts += 1
        with self.output_path.open("ab") as out:
            out.write(f"\n===== start #{self.starts} of {self.name} =====\n".encode())
        out = self.output_path.open("ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "siphon.cli", "run", "-c", str(self.config_path)],
            cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )
        out.close()

    def start(self, config_overrides: dict[str, Any] | None = None,
              script_text: str | None = None, *, wait: bool = True,
              timeout: float = 20.0) -> SiphonProcess:
        """Write config + script and start the node; by default wait for ``/ready``."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.write_files(config_overrides, script_text)
        self._spawn()
        if wait:
            self.wait_ready(timeout)
        return self

    def restart(self, *, graceful: bool = True, timeout: float = 20.0) -> SiphonProcess:
        """Stop (SIGTERM, or SIGKILL with graceful=False) and start with the same files."""
        if self.proc is not None and self.proc.poll() is None:
            if graceful:
                self.stop()
            else:
                self.kill9()
        self._spawn()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"siphon exited with {self.proc.returncode} before /ready\n{self.tail()}")
            try:
                status, _ = self.admin("GET", "/ready", timeout=1.0)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"siphon not ready after {timeout}s\n{self.tail()}")

    def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError(f"siphon did not exit within {timeout}s\n{self.tail()}") from None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not stop in time. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
                raise AssertionError(
                    f"siphon ignored SIGTERM for {timeout}s\n{self.tail()}") from None
        return self.proc.returncode

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kb(self) -> int:
        """Resident set size of the process (VmRSS), kB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc status")

    # ---- output ------------------------------------------------------------------
    def output(self) -> str:
        try:
            return self.output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 60) -> str:
        text = self.output().splitlines()[-lines:]
        return f"--- last {len(text)} lines of {self.output_path} ---\n" + "\n".join(text)

    def wait_output(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.output()
            if needle in text:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in the server output after {timeout}s\n{self.tail()}")

    # ---- admin API ---------------------------------------------------------------
    def admin(self, method: str, path: str, timeout: float = 10.0) -> tuple[int, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                return exc.code, json.loads(body or b"null")
            except ValueError:
                return exc.code, body.decode(errors="replace")

    def admin_get(self, path: str) -> Any:
        status, body = self.admin("GET", path)
        assert status == 200, f"GET {path} -> {status} {body}\n{self.tail()}"
        return body

    def registrations(self) -> list[dict[str, Any]]:
        return self.admin_get("/admin/registrations?limit=100000")

    def aors(self) -> set[str]:
        return {b["aor"] for b in self.registrations()}

    def contacts(self, aor: str) -> list[dict[str, Any]] | None:
        """The AoR's bindings from ``GET /admin/registrations/{aor}``; None on 404."""
        status, body = self.admin("GET", "/admin/registrations/" + urllib.request.quote(aor))
        if status == 404:
            return None
        assert status == 200, f"GET registration {aor} -> {status} {body}"
        return body["contacts"]


@pytest.fixture
def siphon(tmp_path: Path) -> Iterator[SiphonProcess]:
    """A not-yet-started node in tmp_path; always killed at teardown."""
    node = SiphonProcess(tmp_path)
    try:
        yield node
    finally:
        node.kill9()


@pytest.fixture
def siphon_factory(tmp_path: Path) -> Iterator[Any]:
    """Make several nodes (each in its own sub-directory); all killed at teardown."""
    nodes: list[SiphonProcess] = []

    def make(name: str = "node", **kwargs: Any) -> SiphonProcess:
        workdir = tmp_path / name
        workdir.mkdir()
        node = SiphonProcess(workdir, name, **kwargs)
        nodes.append(node)
        return node

    try:
        yield make
    finally:
        for node in nodes:
            node.kill9()


@pytest.fixture
def run_cli(tmp_path: Path) -> Any:
    """Run ``siphon run`` to completion (for start-up failures); returns (rc, output)."""

    def run(config_path: Path, timeout: float = 20.0) -> tuple[int, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        proc = subprocess.Popen(
            [sys.executable, "-m", "siphon.cli", "run", "-c", str(config_path)],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise AssertionError(
                f"siphon run did not exit within {timeout}s:\n{out.decode(errors='replace')}"
            ) from None
        return proc.returncode, out.decode(errors="replace")

    return run
