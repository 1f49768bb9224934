"""The built-in trunk registry: REST register/heartbeat/discover/deregister, state in the log.

Every change is an event (``trunk.registered``, ``trunk.heartbeat``,
``trunk.deregistered``, ``trunk.expired``) on the node's EventLog, so every
replica and the SIP routing see the same live trunks.

Heartbeats are thinned: a PATCH only appends a ``trunk.heartbeat`` event when
the last one recorded is at least a third of the lease old. A trunk
heartbeating at any interval shorter than two thirds of its lease therefore
never expires, while thousands of heartbeats per second cost at most one
event per trunk per ``lease_secs / 3``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from events.log import EventLog, LogError
from events.schema import (
    Event,
    Trunk,
    TrunkDeregistered,
    TrunkExpired,
    TrunkHeartbeat,
    TrunkRegistered,
)
from projections import trunks as proj
from projections.runner import ProjectionRunner
from siphon.registrar.service import run_periodically
from siphon.script.http_api import HttpRequest, Response
from siphon.sip.errors import SipSyntaxError
from siphon.sip.uri import parse_uri

log = logging.getLogger("siphon.trunks")

TRANSPORTS = ("tcp", "tls", "udp")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}")
_JSON = {"Content-Type": "application/json"}
_RESERVED = ("id", "sip_uri", "transport", "enabled", "status", "heartbeat_seconds")


class TrunkError(ValueError):
    """A request the registry refuses; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error(status: int, message: str) -> Response:
    return Response(status, _JSON, json.dumps({"status": status, "error": message}).encode())


def check_id(trunk_id: str) -> str:
    """Trunk ids are short tokens: no slashes, dots-only names or control characters."""
    if not _ID_RE.fullmatch(trunk_id) or trunk_id in (".", ".."):
        raise TrunkError(400, "invalid trunk id (letters, digits, '.', '_', '-'; at most 128)")
    return trunk_id


def parse_record(body: bytes) -> Trunk:
    """Validate a PUT body into a Trunk (400 on anything wrong, nothing logged)."""
    try:
        text = body.decode("utf-8") if body else "{}"
    except UnicodeDecodeError:
        raise TrunkError(400, "body is not UTF-8") from None
    try:
        record = json.loads(text)
    except ValueError:
        raise TrunkError(400, "malformed trunk record (invalid JSON)") from None
    if not isinstance(record, dict):
        raise TrunkError(400, "a trunk record must be a JSON object")
    sip_uri = record.get("sip_uri")
    if not sip_uri:
        raise TrunkError(400, "sip_uri is required")
    if not isinstance(sip_uri, str):
        raise TrunkError(400, "sip_uri must be a string")
    try:
        if not parse_uri(sip_uri).is_sip:
            raise SipSyntaxError("not sip:/sips:")
    except SipSyntaxError as exc:
        raise TrunkError(400, f"sip_uri is not a SIP URI: {exc.reason}") from None
    transport = record.get("transport", "udp")
    if transport not in TRANSPORTS:
        raise TrunkError(400, f"transport must be one of {sorted(TRANSPORTS)}")
    enabled = record.get("enabled", True)
    if not isinstance(enabled, bool):
        raise TrunkError(400, "enabled must be true or false")
    attributes = {k: v for k, v in record.items() if k not in _RESERVED}
    return Trunk(sip_uri=sip_uri, transport=transport, enabled=enabled, attributes=attributes)


class TrunkService:
    """Appends trunk events and answers from the trunk projection."""

    def __init__(self, log_: EventLog, runner: ProjectionRunner, node: str, *,
                 heartbeat_seconds: int = 30, lease_secs: int = 90,
                 clock: Callable[[], float] = time.time,
                 owns: Callable[[str], bool] = lambda key: True) -> None:
        self.log = log_
        self.runner = runner
        self.node = node
        self.heartbeat_seconds = heartbeat_seconds
        self.lease_secs = lease_secs
        self.clock = clock
        self.owns = owns
        self._locks: dict[str, asyncio.Lock] = {}
        self.heartbeats_thinned = 0

    @property
    def state(self) -> proj.TrunkState:
        return self.runner.trunks

    def _lock(self, trunk_id: str) -> asyncio.Lock:
        lock = self._locks.get(trunk_id)
        if lock is None:
            if len(self._locks) > 10_000:
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            lock = self._locks[trunk_id] = asyncio.Lock()
        return lock

    async def _commit(self, events: list[Event]) -> None:
        placed = await self.log.append(events)  # bounded by the log's append_timeout
        for partition, offset in placed:
            await self.runner.wait_applied(partition, offset)

    def view(self, trunk_id: str) -> dict[str, Any] | None:
        """The JSON record of a live trunk (the seed script's shape), or None."""
        entry = self.state.trunks.get(trunk_id)
        if entry is None or not proj.is_live(entry, self.clock()):
            return None
        return self._view(trunk_id, entry)

    def _view(self, trunk_id: str, entry: proj.TrunkEntry) -> dict[str, Any]:
        t = entry.trunk
        return {**t.attributes, "sip_uri": t.sip_uri, "transport": t.transport,
                "enabled": t.enabled, "id": trunk_id, "status": "up",
                "heartbeat_seconds": self.heartbeat_seconds}

    def live(self, enabled: bool | None = None, transport: str | None = None) -> list[
            dict[str, Any]]:
        return [self._view(tid, e) for tid, e in
                proj.live(self.state, self.clock(), enabled=enabled, transport=transport)]

    async def put(self, trunk_id: str, trunk: Trunk) -> tuple[bool, dict[str, Any]]:
        """Register or replace; returns (created, record)."""
        async with self._lock(trunk_id):
            now = self.clock()
            created = self.view(trunk_id) is None
            await self._commit([TrunkRegistered(
                ts=now, node=self.node, trunk_id=trunk_id, trunk=trunk,
                lease_expires_at=now + self.lease_secs, replaced=not created)])
            return created, self.view(trunk_id) or {}

    def heartbeat_thinned(self, trunk_id: str) -> bool:
        """The common case of a heartbeat, answered without the log, a lock or a
        coroutine: True when the trunk is live and its last recorded heartbeat is less
        than a third of the lease old (the lease needs no new event)."""
        entry = self.runner.trunks.trunks.get(trunk_id)
        if entry is None:
            return False
        now = self.clock()
        if proj.is_live(entry, now) and now - entry.last_heartbeat < self.lease_secs / 3:
            self.heartbeats_thinned += 1
            return True
        return False

    async def heartbeat(self, trunk_id: str) -> bool:
        """Refresh the lease; False for an unknown (or already expired) trunk."""
        if self.heartbeat_thinned(trunk_id):
            return True  # common case: no event, no lock
        async with self._lock(trunk_id):
            entry = self.state.trunks.get(trunk_id)
            now = self.clock()
            if entry is None or not proj.is_live(entry, now):
                return False
            if now - entry.last_heartbeat < self.lease_secs / 3:
                self.heartbeats_thinned += 1
                return True
            await self._commit([TrunkHeartbeat(ts=now, node=self.node, trunk_id=trunk_id,
                                               lease_expires_at=now + self.lease_secs)])
            return True

    async def delete(self, trunk_id: str) -> bool:
        async with self._lock(trunk_id):
            if trunk_id not in self.state.trunks:
                return False
            await self._commit([TrunkDeregistered(ts=self.clock(), node=self.node,
                                                  trunk_id=trunk_id)])
            return True

    async def sweep_once(self) -> int:
        now = self.clock()
        events: list[Event] = [
            TrunkExpired(ts=now, node=self.node, trunk_id=tid,
                         lease_expires_at=e.lease_expires_at)
            for tid, e in proj.lapsed(self.state, now) if self.owns(f"trunk:{tid}")
        ]
        if events:
            await self._commit(events)
        return len(events)

    async def run_sweeper(self, interval: float) -> None:
        """Expire lapsed trunks forever (the partition owner's job, like bindings)."""
        await run_periodically(self.sweep_once, interval, "trunk expiry sweep")

    # ---- REST (the seed trunk-registry contract) ---------------------------------------
    async def handle_one(self, req: HttpRequest) -> Response:
        try:
            trunk_id = check_id(req.path_params["id"])
            if req.method == "PATCH":  # the hot path: heartbeats
                if self.heartbeat_thinned(trunk_id) or await self.heartbeat(trunk_id):
                    return Response(204)
                return error(404, "unknown trunk — re-register with PUT")
            if req.method == "PUT":
                trunk = parse_record(req.body())
                created, record = await self.put(trunk_id, trunk)
                headers = dict(_JSON)
                if created:
                    headers["Location"] = req.path
                return Response(201 if created else 200, headers, json.dumps(record).encode())
            if req.method == "DELETE":
                await self.delete(trunk_id)
                return Response(204)
            record = self.view(trunk_id)
            if record is None:
                return error(404, "unknown trunk")
            return Response(200, _JSON, json.dumps(record).encode())
        except TrunkError as exc:
            return error(exc.status, str(exc))
        except (LogError, TimeoutError) as exc:
            log.error("trunk registry: log unavailable: %s", exc)
            return Response(503, {**_JSON, "Retry-After": "5"},
                            json.dumps({"status": 503, "error": "event log unavailable"}).encode())

    async def handle_list(self, req: HttpRequest) -> Response:
        want_enabled = req.query_params.get("enabled")
        want_transport = req.query_params.get("transport")
        enabled: bool | None = None
        if want_enabled is not None:
            if want_enabled.lower() not in ("true", "false"):
                return error(400, "enabled must be true or false")
            enabled = want_enabled.lower() == "true"
        trunks = self.live(enabled=enabled, transport=want_transport)
        return Response(200, _JSON, json.dumps({"trunks": trunks}).encode())
