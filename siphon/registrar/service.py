"""The registrar service: turns REGISTERs into log events and answers from the projection."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from events.log import EventLog, LogError
from events.schema import Binding, BindingExpired, BindingRemoved, Event
from projections import registrar as proj
from projections.runner import ProjectionRunner
from siphon.registrar.plan import Limits, Plan, RegisterInput, plan_register

log = logging.getLogger("siphon.registrar")


@dataclass(slots=True)
class SaveResult:
    """Status of a save and, on success, the AoR's bindings after it."""

    status: int
    reason: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    bindings: list[Binding] = field(default_factory=list)


class Registrar:
    """Decides REGISTER outcomes against the projection and appends them to the log.

    Decisions for one AoR are serialised (a per-AoR lock held from decision to
    apply), different AoRs proceed concurrently and share the log's group commit.
    """

    def __init__(self, log_: EventLog, runner: ProjectionRunner, limits: Limits, node: str,
                 clock: Callable[[], float] = time.time,
                 owns: Callable[[str], bool] = lambda aor: True) -> None:
        self.log = log_
        self.runner = runner
        self.limits = limits
        self.node = node
        self.clock = clock
        self.owns = owns
        self.observe_append: Callable[[float], None] = lambda seconds: None
        """Whether this node sweeps an AoR (its partition's owner does, cluster-wide)."""
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def state(self) -> proj.RegistrarState:
        return self.runner.state

    def lookup(self, aor: str) -> list[Binding]:
        """Live bindings of a (normalised) AoR, best first."""
        return proj.lookup(self.state, aor, self.clock())

    async def _commit(self, events: list[Event]) -> None:
        """Append durably, then wait until this node's projection applied the events.

        The log bounds the append (its ``append_timeout``: :class:`LogError` past it)."""
        if not events:
            return
        started = time.monotonic()
        placed = await self.log.append(events)
        self.observe_append(time.monotonic() - started)
        last: dict[int, int] = {}
        for partition, offset in placed:
            last[partition] = max(offset, last.get(partition, -1))
        for partition, offset in last.items():
            await self.runner.wait_applied(partition, offset)

    async def save(self, req: RegisterInput) -> SaveResult:
        """Apply a REGISTER; 200 only once its events are durable and applied."""
        lock = self._locks.get(req.aor)
        if lock is None:
            lock = self._locks[req.aor] = asyncio.Lock()
        try:
            async with lock:
                now = self.clock()
                plan: Plan = plan_register(req, self.state.aors.get(req.aor, {}), now,
                                           self.limits, self.node)
                if plan.status != 200:
                    return SaveResult(plan.status, plan.reason, plan.headers)
                try:
                    await self._commit(plan.events)
                except (LogError, TimeoutError, OSError) as exc:
                    log.error("log append failed for %s: %s", req.aor, exc)
                    return SaveResult(503, "Service Unavailable", [("Retry-After", "5")])
                return SaveResult(200, "OK", bindings=self.lookup(req.aor))
        finally:
            if not lock.locked() and not getattr(lock, "_waiters", None):
                self._locks.pop(req.aor, None)

    async def remove_aor(self, aor: str, reason: str = "admin") -> int:
        """Remove every binding of ``aor`` (admin DELETE); returns how many."""
        now = self.clock()
        bindings = self.state.aors.get(aor, {})
        events: list[Event] = [
            BindingRemoved(ts=now, node=self.node, aor=aor, key=key, reason=reason)
            for key in bindings
        ]
        await self._commit(events)
        return len(events)

    async def sweep_once(self, limit: int = 5000) -> int:
        """Append ``binding.expired`` for lapsed bindings; returns how many."""
        now = self.clock()
        lapsed = [(aor, b) for aor, b in proj.expired(self.state, now, limit) if self.owns(aor)]
        events: list[Event] = [
            BindingExpired(ts=now, node=self.node, aor=aor, key=b.key, expires_at=b.expires_at)
            for aor, b in lapsed
        ]
        await self._commit(events)
        return len(events)

    async def run_sweeper(self, interval: float) -> None:
        """Sweep forever; a failing log is retried on the next round."""
        await run_periodically(self.sweep_once, interval, "expiry sweep")


async def run_periodically(step: Callable[[], Awaitable[object]], interval: float,
                           what: str) -> None:
    """Run ``step`` every ``interval`` seconds forever; a log failure is logged and the
    next round retries (used by the binding and trunk expiry sweepers)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await step()
        except (LogError, TimeoutError, OSError) as exc:
            log.warning("%s failed: %s", what, exc)
