"""A running siphon node: log, projection, registrar, script, transports, admin API."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import tempfile
import time
from typing import Any

from aiohttp import web

from events.embedded import EmbeddedLog
from events.log import EventLog, LogError, Record
from projections.registrar import CHANGE_TYPES
from projections.runner import ProjectionRunner
from projections.trunks import TRUNK_CHANGES
from replay.snapshot import Snapshotter, log_identity, snapshot_path
from siphon.admin import AdminApi
from siphon.auth.service import AuthService
from siphon.config import Config
from siphon.core import SipCore
from siphon.http_server import HttpServer, protected
from siphon.http_server import route as http_route
from siphon.metrics import Metrics
from siphon.proxy.forwarder import Forwarder
from siphon.proxy.routing import NextHop
from siphon.registrar.plan import Limits
from siphon.registrar.service import Registrar
from siphon.script import namespaces
from siphon.script import registry as reg
from siphon.script.http_api import Route
from siphon.script.loader import ScriptError, load_script
from siphon.transport import Transports
from siphon.trunks import TrunkService

log = logging.getLogger("siphon")


CALLBACK_GROUP = "siphon-callbacks"
"""Consumer group whose partition owners run on_change callbacks and expiry sweeps."""
COMMIT_INTERVAL = 0.5
"""Seconds between commits of the callback position (bounds re-delivery after a crash)."""


class StartupError(Exception):
    """The node cannot start; the message says why."""


def make_log(cfg: Config) -> EventLog:
    """The EventLog backend the config asks for."""
    if cfg.registrar.backend == "kafka":
        if cfg.registrar.kafka is None:
            raise StartupError("registrar.backend is kafka but registrar.kafka is missing")
        from events.kafka import KafkaLog

        return KafkaLog(cfg.registrar.kafka, cfg.server.instance_id)
    from replay.snapshot import snapshot_path

    # With a snapshot the boot reads only the tail: skip the O(file) quick_check too
    # (the tail's records are still checked; `siphon replay verify` checks the rest).
    return EmbeddedLog(cfg.registrar.path, group_commit_max=cfg.registrar.group_commit_max,
                       quick_check=not snapshot_path(cfg).exists())


SERVING_GC_THRESHOLDS = (50_000, 20, 100)
SERVING_SWITCH_INTERVAL = 0.001
"""GIL switch interval while serving (Python's default: 5 ms). The embedded log's
writer thread takes the GIL back after every SQLite call; from a busy event loop
each take waited up to the interval, so a commit of 200 events took ~50 ms instead
of ~10 (bench/log_commit.py). The loop only yields when another thread asks."""


class Node:
    """Everything one ``siphon run`` process holds."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.node = cfg.server.instance_id
        self.started_at = time.time()
        self.realm = cfg.auth.realm
        self.log = make_log(cfg)
        self.runner = ProjectionRunner(self.log)
        r = cfg.registrar
        self.registrar = Registrar(
            self.log, self.runner,
            Limits(r.default_expires, r.min_expires, r.max_expires, r.max_contacts), self.node,
            owns=lambda aor: self.log.partition_for(aor) in self.log.owned_partitions(
                CALLBACK_GROUP))
        self.trunk_service = TrunkService(
            self.log, self.runner, self.node, heartbeat_seconds=cfg.trunks.heartbeat_seconds,
            lease_secs=cfg.trunks.lease_secs,
            owns=lambda key: self.log.partition_for(key) in self.log.owned_partitions(
                CALLBACK_GROUP))
        self.http_servers: list[HttpServer] = []
        self.auth = AuthService(cfg.auth)
        self.transports = Transports(self._receive, max_message_size=cfg.server.max_message_size,
                                     idle_timeout=cfg.server.tcp_idle_timeout,
                                     max_connections=cfg.server.max_connections,
                                     udp_receive_buffer=cfg.server.udp_receive_buffer)
        self.core = SipCore(
            domains=cfg.domain.local, registrar=self.registrar, auth=self.auth,
            send=self.transports.send, server_header=cfg.server.server_header,
            max_message_size=cfg.server.max_message_size, max_headers=cfg.server.max_headers,
            enforce_auth_aor_match=r.enforce_auth_aor_match,
        )
        self.tasks: list[asyncio.Task[Any]] = []
        self.admin_runner: web.AppRunner | None = None
        self.stopping = asyncio.Event()
        self.on_change_failures = 0
        self.log_end: dict[int, int] = {}
        """End offsets of the log, refreshed periodically (consumer lag)."""
        self.metrics = Metrics(self)
        self.registrar.observe_append = self.metrics.observe_append()
        self.failure: BaseException | None = None

    def clock(self) -> float:
        return time.time()

    def _receive(self, data: bytes, source: Any) -> None:
        self.core.receive(data, source)

    # ---- start-up --------------------------------------------------------------------
    async def start(self) -> None:
        """Load the script, listen (answering 503 until ready), rebuild the projection
        from the log up to the end it has now, then follow it and serve."""
        namespaces.bind(self)
        if self.cfg.script.path:
            reg.registry = load_script(self.cfg.script.path, self.cfg.script.include_paths)
        for lst in self.cfg.listen.udp:
            bound = await self.transports.listen_udp(lst.host, lst.port)
            log.info("listening on udp %s:%d", *bound)
        for lst in self.cfg.listen.tcp:
            bound = await self.transports.listen_tcp(lst.host, lst.port)
            log.info("listening on tcp %s:%d", *bound)
        for lst in self.cfg.listen.ws:
            bound = await self.transports.listen_ws(lst.host, lst.port)
            log.info("listening on ws %s:%d", *bound)
        self._setup_proxy()
        if self.cfg.admin is not None:
            api = AdminApi(self.registrar, lambda: self.core.ready and not self.core.draining,
                           token=self.cfg.admin.auth.token,
                           protect_reads=self.cfg.admin.auth.protect_reads,
                           metrics=self.metrics.render)
            self.admin_runner = web.AppRunner(api.app(), access_log=None)
            await self.admin_runner.setup()
            host, port = self.cfg.admin.host_port
            site = web.TCPSite(self.admin_runner, host, port)
            await site.start()
            log.info("admin API on http://%s:%d", host, port)
        if self.cfg.registrar.snapshot_interval > 0:
            where = snapshot_path(self.cfg).parent
            try:
                where.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=where).close()
            except OSError as exc:
                raise StartupError(
                    f"cannot write snapshots in {where}: {exc.strerror or exc}") from None
        await self.log.open()
        # Warm boot: the newest valid snapshot (replay.snapshot), then only the tail.
        self.snapshotter = Snapshotter(
            self.runner, self.log, snapshot_path(self.cfg), identity=log_identity(self.cfg),
            node=self.node, interval=self.cfg.registrar.snapshot_interval)
        await self.snapshotter.restore()
        # Rebuilding reads every record through the backend's checks (CRC, decoding,
        # gaps), so a damaged log stops start-up with the offset named.
        t0 = time.monotonic()
        count = await self.runner.rebuild(progress=self._rebuild_progress)
        took = time.monotonic() - t0
        log.info("projection rebuilt from %d events in %.2fs: %d AoRs, %d bindings",
                 count, took, len(self.runner.state.aors), self.runner.state.binding_count())
        self._critical(self.runner.run(), "projection")
        self._critical(self._dispatch_on_change(), "on_change")
        self.tasks.append(asyncio.create_task(
            self.registrar.run_sweeper(self.cfg.registrar.sweep_interval), name="sweeper"))
        self.tasks.append(asyncio.create_task(
            self.trunk_service.run_sweeper(self.cfg.registrar.sweep_interval),
            name="trunk-sweeper"))
        self.tasks.append(asyncio.create_task(self._track_log_end(), name="log-end"))
        if self.cfg.registrar.snapshot_interval > 0:
            self.tasks.append(asyncio.create_task(self.snapshotter.run(), name="snapshots"))
        if self.snapshotter.restored:  # warm boot: check the history it skipped, meanwhile
            self._critical(self.snapshotter.guard_history(), "history check")
        await self._start_http()
        # Serving allocates many short-lived objects per request; the default GC
        # thresholds (700, 10, 10) then spend ~10 % of the loop re-scanning the live
        # projection and transaction tables. Young collections every 50,000
        # allocations keep cycles bounded at a fraction of that cost.
        gc.set_threshold(*SERVING_GC_THRESHOLDS)
        sys.setswitchinterval(SERVING_SWITCH_INTERVAL)
        self.core.ready = True
        log.info("siphon node %s ready", self.node)

    async def _start_http(self) -> None:
        """Run ``@http.on_startup`` hooks, then serve script routes (``http.listen``) and
        the built-in trunk registry (there, or on ``trunks.listen``)."""
        for hook in reg.registry.http_startup:
            try:
                result = hook.fn()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("http.on_startup hook %s failed",
                              getattr(hook.fn, "__name__", hook.fn))
        tcfg = self.cfg.trunks
        builtin: list[Route] = []
        if tcfg.enabled:
            token = tcfg.token or self.cfg.http.token
            svc = self.trunk_service
            builtin = [
                http_route(f"{tcfg.prefix}/{{id}}", ["PUT", "PATCH", "GET", "DELETE"],
                           protected(svc.handle_one, token)),
                http_route(tcfg.prefix, ["GET"], protected(svc.handle_list, token)),
            ]
        max_body = self.cfg.http.max_body_bytes
        if self.cfg.http.host_port is not None:
            shared = builtin if tcfg.listen is None else []
            server = HttpServer(lambda: [*reg.registry.http_routes, *shared],
                                max_body_bytes=max_body,
                                middleware=lambda: reg.registry.http_middleware)
            await server.start(*self.cfg.http.host_port)
            self.http_servers.append(server)
            log.info("http listener on %s", self.cfg.http.listen)
        elif reg.registry.http_routes:
            log.warning("the script declares HTTP routes but http.listen is not set")
        if tcfg.enabled and tcfg.host_port is not None:
            server = HttpServer(lambda: builtin, max_body_bytes=max_body)
            await server.start(*tcfg.host_port)
            self.http_servers.append(server)
            log.info("trunk registry on %s%s", tcfg.listen, tcfg.prefix)

    async def _track_log_end(self, interval: float = 2.0) -> None:
        """Refresh the log's end offsets (for the consumer lag metric)."""
        while True:
            try:
                self.log_end = await self.log.end_position()
            except (LogError, OSError, TimeoutError) as exc:
                log.debug("cannot read the log end: %s", exc)
            await asyncio.sleep(interval)

    def _critical(self, coro: Any, name: str) -> None:
        """Run a task the node cannot live without: if it fails, the node stops with an
        error (a damaged log record under the ``stop`` policy, a bug) rather than serve
        stale state silently."""
        task = asyncio.create_task(coro, name=name)
        self.tasks.append(task)

        def done(t: asyncio.Task[Any]) -> None:
            if t.cancelled() or self.stopping.is_set():
                return
            exc = t.exception()
            log.critical("%s stopped: %s; shutting the node down", name,
                         exc if exc is not None else "ended")
            self.failure = exc or RuntimeError(f"{name} ended")
            self.stopping.set()

        task.add_done_callback(done)

    def _advertised(self, host: str, advertise: str | None) -> str:
        if advertise:
            return advertise
        if host in ("0.0.0.0", "::", ""):
            return self.cfg.advertised_address or "127.0.0.1"
        return host

    def _setup_proxy(self) -> None:
        """Our identity (listeners, advertised names, local domains) and the forwarder."""
        identity = self.core.identity
        identity.domains.update(d.lower() for d in self.cfg.domain.local)
        self.via_addresses: dict[str, tuple[str, int]] = {}
        configured = {t: lst for t, lst in self.cfg.listen.all()}
        for transport, host, port in self.transports.bound:
            lst = configured.get(transport)
            name = self._advertised(host, lst.advertise if lst is not None else None)
            identity.add(name, port)
            identity.add(host, port)
            if self.cfg.advertised_address:
                identity.add(self.cfg.advertised_address, port)
            self.via_addresses.setdefault(transport, (name, port))

        async def send(data: bytes, hop: NextHop, conn_id: str) -> bool:
            return await self.transports.send_to(data, hop.host, hop.port, hop.transport,
                                                 conn_id)

        def via_address(transport: str) -> tuple[str, int]:
            return (self.via_addresses.get(transport) or self.via_addresses.get("udp")
                    or next(iter(self.via_addresses.values())))

        self.core.forwarder = Forwarder(identity=identity, send=send, via_address=via_address)
        self.core.flow_transport = self.transports.flow_transport

    def _rebuild_progress(self, done: int, elapsed: float) -> None:
        if done and done % 200_000 < 10_000:
            log.info("rebuilding projection: %d events (%.0f/s)", done, done / max(elapsed, 1e-9))

    async def _dispatch_on_change(self) -> None:
        """Run ``@registrar.on_change`` callbacks, in log order, for the events of the
        partitions this node owns in the ``callbacks`` group (every event once
        cluster-wide; at least once across crashes: the position is committed after
        the callbacks ran), each once this node's projection has applied it."""
        last_commit = time.monotonic()
        pending: dict[int, int] = {}
        try:
            async for batch in self.log.owned(CALLBACK_GROUP):
                for rec in batch:
                    change = CHANGE_TYPES.get(type(rec.event))
                    if change is not None and reg.registry.on_change:
                        await self.runner.wait_applied(rec.partition, rec.offset)
                        await self._run_on_change(rec, change)
                    trunk_change = TRUNK_CHANGES.get(type(rec.event))
                    if trunk_change is not None and reg.registry.trunk_on_change:
                        await self.runner.wait_applied(rec.partition, rec.offset)
                        await self._run_trunk_on_change(rec, trunk_change)
                    pending[rec.partition] = rec.offset + 1
                if time.monotonic() - last_commit >= COMMIT_INTERVAL:
                    await self._commit_callbacks(pending)
                    last_commit = time.monotonic()
        finally:
            await self._commit_callbacks(pending)

    async def _commit_callbacks(self, pending: dict[int, int]) -> None:
        if not pending:
            return
        try:
            await self.log.commit(CALLBACK_GROUP, dict(pending))
            pending.clear()
        except LogError as exc:
            log.warning("cannot commit on_change position: %s", exc)

    async def _run_trunk_on_change(self, rec: Record, change: str) -> None:
        trunk_id = rec.event.trunk_id  # type: ignore[union-attr]
        record = self.trunk_service.view(trunk_id)
        for handler in reg.registry.trunk_on_change:
            try:
                result = handler.fn(trunk_id, change, record)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                self.on_change_failures += 1
                log.exception("trunks.on_change handler %s failed for %s %s",
                              getattr(handler.fn, "__name__", handler.fn), trunk_id, change)

    async def _run_on_change(self, rec: Record, change: str) -> None:
        aor = rec.event.aor
        contacts = namespaces.contacts_of(aor)
        for handler in reg.registry.on_change:
            try:
                result = handler.fn(aor, change, contacts)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                self.on_change_failures += 1
                log.exception("on_change handler %s failed for %s %s",
                              getattr(handler.fn, "__name__", handler.fn), aor, change)

    # ---- shutdown --------------------------------------------------------------------
    def reload_script(self) -> None:
        """SIGHUP: load the script again; on failure the running one stays. Bindings
        live in the log and projection, so nothing is dropped."""
        if not self.cfg.script.path:
            return
        try:
            reg.registry = load_script(self.cfg.script.path, self.cfg.script.include_paths)
        except ScriptError as exc:
            log.error("script reload failed, keeping the running script: %s", exc)
            return
        log.info("script %s reloaded", self.cfg.script.path)

    async def stop(self) -> None:
        """Graceful stop: refuse new SIP transactions (503) and /ready, let in-flight
        ones finish (bounded by server.drain_secs), stop listeners, commit the
        callback position, flush and close the log."""
        drain = float(self.cfg.server.drain_secs)
        deadline = time.monotonic() + drain
        await self.core.drain(timeout=drain)
        forwarder = self.core.forwarder
        while forwarder is not None and forwarder.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # calls being set up: let them finish
        await self.transports.close()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
        for server in self.http_servers:
            await server.close()
        if self.auth.http is not None:
            await self.auth.http.close()
        try:
            await self.log.close()
        except LogError as exc:
            log.warning("closing the log: %s", exc)
        namespaces.bind(None)


async def serve(cfg: Config) -> None:
    """Run a node until SIGTERM/SIGINT."""
    node = Node(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, node.stopping.set)
    loop.add_signal_handler(signal.SIGHUP, node.reload_script)
    try:
        await node.start()
    except BaseException:
        await node.stop()
        raise
    await node.stopping.wait()
    log.info("shutting down")
    await node.stop()
    if node.failure is not None:
        raise node.failure
