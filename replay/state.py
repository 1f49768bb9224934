"""Point-in-time rebuild of the registrar and trunk projections, and one AoR's history.

A target is a moment: ``now`` (everything), a time ``T`` (events with ``ts <= T``
are applied; bindings and trunks are reported live at ``T``: ``expires_at > T``),
or offsets (records up to and including those offsets; liveness at the newest
applied event's time). The projections' own pure ``apply`` functions are used, so
a replay to now equals what a node following the same log holds.

Time targets assume the records of a partition are in ``ts`` order give or take
``max_skew`` seconds (one node: the append latency; several: their clock skew):
a partition is read until a record newer than ``T + max_skew``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from events import codec
from events.log import LogCorruption, Position, Record
from events.schema import TRUNK_EVENT_TYPES, Binding, Event
from projections import registrar as reg
from projections import trunks as trk
from replay.source import BadInput, OnProblem, Source

Progress = Callable[[int], None]
"""Called with the number of records just read (for progress bars)."""

DEFAULT_MAX_SKEW = 30.0

_TRUNK_TYPES = frozenset(TRUNK_EVENT_TYPES)
_OFFSETS_RE = re.compile(r"^\s*\d+\s*:\s*-?\d+\s*(,\s*\d+\s*:\s*-?\d+\s*)*$")


@dataclass(frozen=True, slots=True)
class Target:
    """Which moment to rebuild: ``time`` (Unix seconds), ``offsets`` (last record to
    apply per partition, inclusive; -1: none), or neither (now)."""

    time: float | None = None
    offsets: dict[int, int] | None = None
    text: str = "now"

    @property
    def is_now(self) -> bool:
        return self.time is None and self.offsets is None


def parse_time(text: str) -> float:
    """ISO 8601 (``2026-11-23T10:00:00Z``; no zone: local time) or ``@<unix secs>``."""
    text = text.strip()
    if text.startswith("@"):
        try:
            return float(text[1:])
        except ValueError:
            raise ValueError(f"{text!r}: expected @<unix seconds>") from None
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither an ISO time (2026-11-23T10:00:00Z), "
                         "@<unix seconds>, an offset nor partition:offset[,...]") from None
    return when.timestamp()


def parse_target(text: str | None) -> Target:
    """Parse ``--at``: ``now``, an ISO time, ``@secs``, an offset or ``p:o,p:o``."""
    if text is None or text.strip().lower() in ("", "now"):
        return Target()
    raw = text.strip()
    if raw.isascii() and raw.isdigit():
        return Target(offsets={0: int(raw)}, text=raw)
    if _OFFSETS_RE.match(raw):
        offsets: dict[int, int] = {}
        for part in raw.split(","):
            p, _, o = part.partition(":")
            if int(p) in offsets:
                raise ValueError(f"{raw!r}: partition {int(p)} given twice")
            offsets[int(p)] = int(o)
        return Target(offsets=offsets, text=raw)
    return Target(time=parse_time(raw), text=raw)


def fmt_time(ts: float | None) -> str:
    """``2026-11-23T10:00:00.123Z`` (UTC, milliseconds)."""
    if ts is None:
        return "-"
    when = dt.datetime.fromtimestamp(ts, dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


@dataclass(slots=True)
class Replayed:
    """What a rebuild produced."""

    registrar: reg.RegistrarState
    trunks: trk.TrunkState
    position: Position
    """Next offset per partition after the rebuild."""
    at: float
    """The moment liveness is judged at."""
    applied: int = 0
    read: int = 0
    first_ts: float | None = None
    last_ts: float | None = None
    snapshot: str | None = None
    """The snapshot the rebuild started from, if any."""
    problems: list[tuple[int, int, str]] = field(default_factory=list)

    def live_bindings(self) -> list[tuple[str, Binding]]:
        """(aor, binding) live at ``at``, AoRs sorted, best binding first."""
        return [(aor, b) for aor in sorted(self.registrar.aors)
                for b in reg.lookup(self.registrar, aor, self.at)]

    def live_bindings_of(self, aor: str) -> list[Binding]:
        return reg.lookup(self.registrar, aor, self.at)

    def live_trunks(self) -> list[tuple[str, trk.TrunkEntry]]:
        return trk.live(self.trunks, self.at)


class Projection:
    """Registrar + trunk projections fed record batches (position kept per batch)."""

    def __init__(self, registrar: reg.RegistrarState | None = None,
                 trunks: trk.TrunkState | None = None) -> None:
        self.registrar = registrar if registrar is not None else reg.RegistrarState()
        self.trunks = trunks if trunks is not None else trk.TrunkState()
        self.last_ts: float | None = None

    def apply(self, event: Event) -> str | None:
        if type(event) in _TRUNK_TYPES:
            return trk.apply(self.trunks, event)
        return reg.apply(self.registrar, event)

    def apply_batch(self, records: list[Record], until: float | None = None) -> int:
        """Apply records (only those with ``ts <= until`` when given); returns how many."""
        state, tstate, position = self.registrar, self.trunks, self.registrar.position
        apply_r, apply_t, trunk_types = reg.apply, trk.apply, _TRUNK_TYPES
        applied = 0
        last = self.last_ts
        for rec in records:
            ev = rec.event
            if until is not None and ev.ts > until:
                continue
            if type(ev) in trunk_types:
                apply_t(tstate, ev)
            else:
                apply_r(state, ev)
            position[rec.partition] = rec.offset + 1
            applied += 1
            if last is None or ev.ts > last:
                last = ev.ts
        self.last_ts = last
        return applied


async def _bounds(source: Source, target: Target
                  ) -> tuple[Position, Position, float | None]:
    """The log's first position, where a replay to ``target`` stops and the first
    event's time; :class:`BadInput` for a target outside the log."""
    begin = await source.begin_position()
    end = await source.end_position()
    stop = _stop_for(target, begin, end, source.partitions)
    first_ts = await source.first_ts()
    if target.time is not None:
        if first_ts is None:
            raise BadInput(f"--at {target.text}: the log holds no events yet")
        if target.time < first_ts:
            raise BadInput(f"--at {target.text}: {fmt_time(target.time)} is before the first "
                           f"event of the log ({fmt_time(first_ts)})")
    return begin, stop, first_ts


def _stop_for(target: Target, begin: Position, end: Position, partitions: int) -> Position:
    """The (exclusive) stop position the target asks for; checks offsets against the log."""
    if target.offsets is None:
        return dict(end)
    offsets = target.offsets
    if partitions > 1 and list(offsets) == [0] and (
            target.text.isascii() and target.text.isdigit()):
        raise BadInput(f"--at {target.text}: this log has {partitions} partitions; give "
                       "partition:offset for each (e.g. 0:120,1:98,...)")
    stop: Position = {}
    for p, off in sorted(offsets.items()):
        if not 0 <= p < partitions:
            raise BadInput(f"--at {target.text}: partition {p} does not exist "
                           f"(the log has {partitions})")
        last = end.get(p, 0) - 1
        if off > last:
            where = "the log" if partitions == 1 else f"partition {p}"
            raise BadInput(f"--at {target.text}: offset {off} is past the end of {where} "
                           + (f"(its last offset is {last})" if last >= 0 else "(it is empty)"))
        if 0 <= off < begin.get(p, 0):
            raise BadInput(f"--at {target.text}: offset {off} of partition {p} is before its "
                           f"first record (offset {begin[p]})")
        stop[p] = off + 1
    return stop


async def rebuild(source: Source, target: Target, *, start: Projection | None = None,
                  start_position: Position | None = None, snapshot_name: str | None = None,
                  progress: Progress | None = None,
                  on_problem: OnProblem | None = None, max_skew: float = DEFAULT_MAX_SKEW,
                  clock: Callable[[], float] = time.time,
                  on_total: Callable[[int], None] | None = None) -> Replayed:
    """Rebuild both projections as they were at ``target``.

    ``start``/``start_position`` resume from a snapshot (the caller checked that it
    precedes the target). Raises :class:`BadInput` for a target outside the log.
    """
    begin, stop, first_ts = await _bounds(source, target)
    proj = start if start is not None else Projection()
    pos = dict(start_position or {})
    if on_total is not None:
        on_total(sum(max(0, off - pos.get(p, begin.get(p, 0))) for p, off in stop.items()))
    until = target.time
    horizon = None if until is None else until + max_skew
    passed: set[int] = set()
    todo = {p for p, off in stop.items() if off > pos.get(p, 0)}
    out = Replayed(proj.registrar, proj.trunks, proj.registrar.position, 0.0,
                   first_ts=first_ts, snapshot=snapshot_name)
    problems = out.problems

    def problem(p: int, o: int, reason: str) -> None:
        problems.append((p, o, reason))
        if on_problem is not None:
            on_problem(p, o, reason)

    records = sum(max(0, off - pos.get(p, begin.get(p, 0))) for p, off in stop.items())
    if todo and until is None and codec.slim_usable() and reg.rebuild_pays(
            proj.registrar, records) and await _rebuild_fast(
            source, proj, pos, stop, out, problem if on_problem else None, progress):
        todo = set()
    if todo:
        batches = source.read(pos, stop, on_problem=problem if on_problem else None)
        async with contextlib.aclosing(batches):  # type: ignore[type-var]
            async for batch in batches:
                out.read += len(batch)
                out.applied += proj.apply_batch(batch, until)
                if progress is not None:
                    progress(len(batch))
                if horizon is not None:
                    for rec in batch:
                        if rec.event.ts > horizon:
                            passed.add(rec.partition)
                    if passed >= todo:
                        break
    for p, off in stop.items():  # skipped (newer) records still count as read through
        if target.time is None and off > proj.registrar.position.get(p, 0):
            proj.registrar.position[p] = off
    out.last_ts = proj.last_ts
    if target.time is not None:
        out.at = target.time
    elif target.offsets is not None:
        out.at = proj.last_ts if proj.last_ts is not None else clock()
    else:
        out.at = clock()
    return out


async def _rebuild_fast(source: Source, proj: Projection, pos: Position, stop: Position,
                        out: Replayed, on_problem: OnProblem | None,
                        progress: Progress | None) -> bool:
    """The whole range through :class:`projections.registrar.Rebuild` (slim decoding,
    survivors decoded at the end); False (projection untouched) when the source cannot
    or a surviving record needs the full decoder."""
    batches = source.read_payloads(pos, stop, on_problem=on_problem)
    if batches is None:
        return False
    saved = {tid: dataclasses.replace(e) for tid, e in proj.trunks.trunks.items()}
    read = out.read

    def other(event: Event) -> None:
        if type(event) in _TRUNK_TYPES:
            trk.apply(proj.trunks, event)
        else:
            reg.apply(proj.registrar, event)

    def bad(partition: int, offset: int, reason: str) -> None:
        if on_problem is None:
            raise LogCorruption(partition, offset, f"{reason} in {source.label}")
        on_problem(partition, offset, reason)

    rebuild = reg.Rebuild(proj.registrar, other, bad)
    try:
        async with contextlib.aclosing(batches):  # type: ignore[type-var]
            async for partition, offsets, payloads in batches:
                rebuild.feed(partition, offsets, payloads)
                out.read += len(payloads)
                if progress is not None:
                    progress(len(payloads))
        rebuild.finish()
    except reg.NeedFullRebuild:
        proj.trunks.trunks = saved
        out.read = read
        return False
    out.applied += rebuild.count - rebuild.skipped
    if rebuild.last_ts is not None and (proj.last_ts is None or rebuild.last_ts > proj.last_ts):
        proj.last_ts = rebuild.last_ts
    return True


# ------------------------------------------------------------------------ AoR history


@dataclass(slots=True)
class Step:
    """One event touching the AoR and the AoR's bindings right after it."""

    record: Record
    change: str | None
    bindings: list[Binding]
    """Live at the event's time, best first."""


async def aor_history(source: Source, aor: str, target: Target,
                      on_problem: OnProblem | None = None) -> tuple[list[Step], Replayed]:
    """Every event of ``aor`` up to ``target`` with the bindings it left, and the
    AoR's state at the target. Raises :class:`BadInput` when the log never names it."""
    _, stop, first_ts = await _bounds(source, target)
    p = source.partition_for(aor)
    proj = Projection()
    steps: list[Step] = []
    seen = 0
    if stop.get(p, 0) > 0:
        async for batch in source.read(None, {p: stop[p]}, key=aor, on_problem=on_problem):
            seen += len(batch)
            for rec in batch:
                ev = rec.event
                if target.time is not None and ev.ts > target.time:
                    continue
                change = proj.apply(ev)
                proj.registrar.position[rec.partition] = rec.offset + 1
                if proj.last_ts is None or ev.ts > proj.last_ts:
                    proj.last_ts = ev.ts
                steps.append(Step(rec, change, reg.lookup(proj.registrar, aor, ev.ts)))
    if not seen:
        raise BadInput(f"no event in {source.label} names AoR {aor!r} "
                       f"(AoRs are canonical, e.g. sip:alice@example.com)")
    if target.time is not None:
        at = target.time
    elif target.offsets is not None:
        at = proj.last_ts if proj.last_ts is not None else time.time()
    else:
        at = time.time()
    out = Replayed(proj.registrar, proj.trunks, proj.registrar.position, at,
                   applied=len(steps), read=seen, first_ts=first_ts, last_ts=proj.last_ts)
    return steps, out


# ------------------------------------------------------------------------- rendering


binding_row = reg.binding_view
"""A binding as ``GET /admin/registrations`` shows it (the admin API's own view)."""


def trunk_row(trunk_id: str, entry: trk.TrunkEntry, at: float) -> dict[str, Any]:
    t = entry.trunk
    return {"id": trunk_id, "sip_uri": t.sip_uri, "transport": t.transport,
            "enabled": t.enabled, "attributes": dict(t.attributes),
            "lease_expires_at": entry.lease_expires_at,
            "lease_remaining": max(0, int(entry.lease_expires_at - at)),
            "registered_at": entry.registered_at, "last_heartbeat": entry.last_heartbeat}


def event_row(rec: Record) -> dict[str, Any]:
    """The essentials of one record (for ``--aor`` histories and reports)."""
    ev = rec.event
    row: dict[str, Any] = {"partition": rec.partition, "offset": rec.offset, "ts": ev.ts,
                           "time": fmt_time(ev.ts),
                           "type": type(ev).__struct_config__.tag,  # type: ignore[attr-defined]
                           "node": ev.node}
    binding = getattr(ev, "binding", None)
    if binding is not None:
        row.update(key=binding.key, uri=binding.uri, expires_at=binding.expires_at,
                   call_id=binding.call_id, cseq=binding.cseq, source=binding.source)
    else:
        for name in ("key", "reason", "call_id", "cseq", "expires_at"):
            value = getattr(ev, name, None)
            if value not in (None, ""):
                row[name] = value
    return row

