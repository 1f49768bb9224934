"""``replay verify``: read the whole log and check it.

* every record is intact and decodes (each damaged one is named, reading goes on);
* per AoR and binding key, within one Call-ID the CSeq of successive binding
  events never decreases (a binding's expiry ends its sequence);
* the projection built from the log equals a snapshot file (at the snapshot's
  position) or a live node's registrations (at the node's position).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from events.log import Position
from events.schema import (
    BindingAdded,
    BindingExpired,
    BindingRefreshed,
    BindingRemoved,
    event_key,
)
from projections import registrar as reg
from replay import snapshot as snap_mod
from replay.source import LogUnavailable, ReplayError, Source
from replay.state import Progress, Projection, binding_row

MAX_LISTED = 1000
"""Problems listed in a report (all are counted)."""

_COMPARED = ("aor", "uri", "q", "expires_at", "source", "transport", "call_id", "cseq",
             "node", "registered_at", "user_agent", "path", "params", "instance", "reg_id")


@dataclass(slots=True)
class Problem:
    kind: str
    """``damaged``, ``cseq`` or ``state``."""
    partition: int | None
    offset: int | None
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "partition": self.partition, "offset": self.offset,
                "message": self.message}


@dataclass(slots=True)
class Report:
    log: str
    records: int = 0
    position: Position = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    compared_with: str | None = None
    compared_at: Position | None = None
    aors: int = 0
    bindings: int = 0
    trunks: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.counts

    def add(self, kind: str, partition: int | None, offset: int | None, message: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.problems) < MAX_LISTED:
            self.problems.append(Problem(kind, partition, offset, message))

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "log": self.log, "records": self.records,
                "position": {str(p): o for p, o in sorted(self.position.items())},
                "problem_counts": self.counts,
                "problems": [p.as_dict() for p in self.problems],
                "compared_with": self.compared_with,
                "compared_at": None if self.compared_at is None else
                {str(p): o for p, o in sorted(self.compared_at.items())},
                "aors": self.aors, "bindings": self.bindings, "trunks": self.trunks,
                "notes": self.notes}


class _CSeqCheck:
    """Per (AoR, binding key): the last Call-ID/CSeq seen and where."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.last: dict[tuple[str, str], tuple[str, int, int, int]] = {}

    def see(self, partition: int, offset: int, ev: Any) -> None:
        if isinstance(ev, BindingAdded | BindingRefreshed):
            key, call_id, cseq = ev.binding.key, ev.binding.call_id, ev.binding.cseq
        elif isinstance(ev, BindingRemoved):
            key, call_id, cseq = ev.key, ev.call_id, ev.cseq
        elif isinstance(ev, BindingExpired):
            self.last.pop((ev.aor, ev.key), None)
            return
        else:
            return
        if not call_id:
            return  # admin removals carry no Call-ID
        ident = (ev.aor, key)
        prev = self.last.get(ident)
        if prev is not None and prev[0] == call_id and cseq < prev[1]:
            self.report.add("cseq", partition, offset,
                            f"{ev.aor} binding {key}: CSeq {cseq} after CSeq {prev[1]} "
                            f"(partition {prev[2]} offset {prev[3]}) in Call-ID {call_id}")
        self.last[ident] = (call_id, cseq, partition, offset)


def _compare_rows(report: Report, ours: list[dict[str, Any]], theirs: list[dict[str, Any]],
                  last_touch: dict[str, tuple[int, int]], what: str,
                  near: Callable[[dict[str, Any]], bool] = lambda row: False) -> None:
    def index(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(r["aor"], r["uri"]): {k: r.get(k) for k in _COMPARED} for r in rows}

    mine, other = index(ours), index(theirs)
    for ident in sorted(set(mine) | set(other)):
        a, b = mine.get(ident), other.get(ident)
        if a == b:
            continue
        if (a is None and b is not None and near(b)) or (b is None and a is not None
                                                         and near(a)):
            continue  # lapsing right at the comparison time
        aor, uri = ident
        where = last_touch.get(aor)
        if a is None:
            msg = f"{aor} {uri}: in {what}, not in the log's projection"
        elif b is None:
            msg = f"{aor} {uri}: in the log's projection, not in {what}"
        else:
            fields = [k for k in _COMPARED if a.get(k) != b.get(k)]
            msg = (f"{aor} {uri}: differs in {', '.join(fields)} (log: "
                   f"{', '.join(f'{k}={a.get(k)!r}' for k in fields)}; {what}: "
                   f"{', '.join(f'{k}={b.get(k)!r}' for k in fields)})")
        if where is not None:
            msg += f"; last event of the AoR at partition {where[0]} offset {where[1]}"
        report.add("state", None if where is None else where[0],
                   None if where is None else where[1], msg)


def _rows(state: reg.RegistrarState, at: float, *, live_only: bool) -> list[dict[str, Any]]:
    out = []
    for aor in sorted(state.aors):
        bindings = (reg.lookup(state, aor, at) if live_only
                    else list(state.aors[aor].values()))
        out.extend(binding_row(aor, b, at) for b in bindings)
    return out


# ------------------------------------------------------------------------- the node


def _get_json(url: str, token: str | None, timeout: float = 10.0) -> tuple[Any, dict[str, str]]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raise LogUnavailable(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise LogUnavailable(f"{url}: cannot query the node: {exc}") from exc


def fetch_node_state(base: str, token: str | None = None,
                     attempts: int = 5) -> tuple[list[dict[str, Any]], Position, float, bool]:
    """The node's registrations, the log position they reflect, when they were listed,
    and whether the position held still while listing."""
    base = base.rstrip("/")
    for attempt in range(attempts):
        stats, _ = _get_json(f"{base}/admin/stats", token)
        before = {int(p): int(o) for p, o in stats.get("log_position", {}).items()}
        listed_at = time.time()
        rows: list[dict[str, Any]] = []
        offset = 0
        while True:
            page, headers = _get_json(
                f"{base}/admin/registrations?limit=100000&offset={offset}", token)
            rows.extend(page)
            if "Link" not in headers and "link" not in headers:
                break
            offset += 100_000
        stats, _ = _get_json(f"{base}/admin/stats", token)
        after = {int(p): int(o) for p, o in stats.get("log_position", {}).items()}
        if before == after:
            return rows, after, listed_at, True
        if attempt + 1 < attempts:
            time.sleep(0.2)
    return rows, after, listed_at, False


# ------------------------------------------------------------------------- verify


async def verify(source: Source, *, snapshot_file: str | None = None,
                 node_url: str | None = None, node_token: str | None = None,
                 progress: Progress | None = None,
                 on_total: Callable[[int], None] | None = None) -> Report:
    """Check the whole log (and its projection against a snapshot or a node)."""
    report = Report(log=source.label)
    begin = await source.begin_position()
    end = await source.end_position()
    stop = dict(end)
    compare_at: Position | None = None
    expected_state = None
    node_rows: list[dict[str, Any]] = []
    listed_at = 0.0
    if snapshot_file is not None:
        try:
            snap = await asyncio.to_thread(snap_mod.read, snapshot_file)
            await snap_mod.check(snap, identity=source.identity,
                                 partitions=source.partitions, end=end, read=source.read,
                                 name=snapshot_file)
        except snap_mod.SnapshotError as exc:
            raise ReplayError(f"cannot compare: {exc}") from exc
        compare_at = dict(snap.position)
        expected_state = snap_mod.to_states(snap)
        report.compared_with = f"snapshot {snapshot_file}"
    elif node_url is not None:
        node_rows, node_pos, listed_at, steady = await asyncio.to_thread(
            fetch_node_state, node_url, node_token)
        if not steady:
            report.notes.append("the node's position kept moving while it was listed: "
                                "differences may be registrations in flight")
        compare_at = node_pos
        for p, off in node_pos.items():
            stop[p] = max(stop.get(p, 0), off)
        report.compared_with = f"node {node_url}"
    report.compared_at = compare_at
    if on_total is not None:
        on_total(sum(max(0, off - begin.get(p, 0)) for p, off in stop.items()))

    proj = Projection()
    cseq = _CSeqCheck(report)
    last_touch: dict[str, tuple[int, int]] = {}

    def damaged(p: int, o: int, reason: str) -> None:
        report.add("damaged", p, o, reason)

    async for batch in source.read(None, stop, on_problem=damaged):
        report.records += len(batch)
        for rec in batch:
            ev = rec.event
            cseq.see(rec.partition, rec.offset, ev)
            if compare_at is not None and rec.offset >= compare_at.get(rec.partition, 0):
                continue
            proj.apply(ev)
            last_touch[event_key(ev)] = (rec.partition, rec.offset)
        if progress is not None:
            progress(len(batch))
    report.position = stop
    report.aors = len(proj.registrar.aors)
    report.bindings = proj.registrar.binding_count()
    report.trunks = len(proj.trunks.trunks)
    if expected_state is not None:
        ours = _rows(proj.registrar, 0.0, live_only=False)
        theirs = _rows(expected_state[0], 0.0, live_only=False)
        _compare_rows(report, ours, theirs, last_touch, f"snapshot {snapshot_file}")
        mine_t, their_t = proj.trunks.trunks, expected_state[1].trunks
        for tid in sorted(set(mine_t) | set(their_t)):
            if mine_t.get(tid) != their_t.get(tid):
                where = last_touch.get(f"trunk:{tid}")
                report.add("state", None if where is None else where[0],
                           None if where is None else where[1],
                           f"trunk {tid}: log {mine_t.get(tid)!r} != snapshot "
                           f"{their_t.get(tid)!r}")
    elif node_url is not None:
        ours = _rows(proj.registrar, listed_at, live_only=True)
        _compare_rows(report, ours, node_rows, last_touch, f"node {node_url}",
                      near=lambda row: abs(float(row["expires_at"]) - listed_at) < 2.0)
    return report
