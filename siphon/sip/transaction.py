"""Server transactions (RFC 3261 §17.2), sans-IO with an injectable clock.

The table matches incoming requests to transactions (§17.2.3, with the RFC
2543 fallback for branches lacking the magic cookie), absorbs
retransmissions, replays the last response and expires finished
transactions with timer J (non-INVITE) / H and I (INVITE).
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from siphon.sip.message import Request

T1 = 0.5
T2 = 4.0
T4 = 5.0
MAGIC_COOKIE = "z9hG4bK"


class State(enum.Enum):
    TRYING = "trying"
    PROCEEDING = "proceeding"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    TERMINATED = "terminated"


def server_key(request: Request) -> tuple[str, ...]:
    """Transaction key of a request (§17.2.3); ACK and CANCEL map to their INVITE's key
    space via the method component (``INVITE`` for ACK).

    Besides branch, sent-by and method, the key holds the Call-ID and CSeq number: a
    retransmission (and the ACK of a non-2xx) always repeats them, whereas a different
    request that merely reuses a branch (RFC 4475 messages, broken clients) must not be
    answered with another request's response (wrong Call-ID/CSeq, §8.2.6)."""
    via = request.top_via
    method = "INVITE" if request.method == "ACK" else request.method
    seq, _ = request.cseq
    if via is not None:
        branch = via.branch or ""
        if branch.startswith(MAGIC_COOKIE):
            return ("3261", branch, via.sent_by.lower(), method, request.call_id, str(seq))
    # RFC 2543 matching: Request-URI, To tag, From tag, Call-ID, CSeq number, top Via.
    return (
        "2543",
        request.uri,
        request.to.tag or "",
        request.from_.tag or "",
        request.call_id,
        str(seq),
        method,
        str(via) if via else "",
    )


@dataclass(slots=True)
class ServerTransaction:
    """One server transaction: remembers the last response to replay it."""

    key: tuple[str, ...]
    method: str
    reliable: bool
    created: float
    state: State = State.TRYING
    last_response: bytes | None = None
    last_status: int = 0
    expires_at: float | None = None
    """When the transaction is forgotten (timer J / H / I), None while active."""
    data: dict[str, object] = field(default_factory=dict)
    wire: int | None = field(default=None, repr=False, compare=False)
    """``hash()`` of the request's datagram (see ``ServerTransactionTable.match_datagram``)."""
    on_expiry: Callable[[ServerTransaction], None] | None = field(
        default=None, repr=False, compare=False)
    """Told when ``expires_at`` is set (the table schedules the removal)."""

    def _expire_at(self, when: float) -> None:
        self.expires_at = when
        if self.on_expiry is not None:
            self.on_expiry(self)

    @property
    def is_invite(self) -> bool:
        return self.method == "INVITE"

    def on_response(self, status: int, wire: bytes, now: float) -> None:
        """Record the response the TU sends (§17.2.1 / §17.2.2 state changes)."""
        if self.state in (State.COMPLETED, State.CONFIRMED, State.TERMINATED):
            return
        self.last_response = wire
        self.last_status = status
        if status < 200:
            self.state = State.PROCEEDING
            return
        if self.is_invite and status < 300:
            # 2xx to INVITE: the transaction ends; the ACK is end to end. It is kept for
            # timer L (RFC 6026 "Accepted") so retransmitted INVITEs are still absorbed.
            self.state = State.TERMINATED
            self._expire_at(now + 64 * T1)
            return
        self.state = State.COMPLETED
        if self.is_invite:
            self._expire_at(now + 64 * T1)  # timer H
        else:
            self._expire_at(now + (0.0 if self.reliable else 64 * T1))  # timer J

    def on_retransmission(self) -> bytes | None:
        """A retransmitted request: what to send back (the last response), if anything."""
        if self.state in (State.PROCEEDING, State.COMPLETED):
            return self.last_response
        return None

    def on_ack(self, now: float) -> None:
        """ACK for a non-2xx final response to INVITE (§17.2.1): absorbed, timer I."""
        if self.is_invite and self.state == State.COMPLETED:
            self.state = State.CONFIRMED
            self._expire_at(now + (0.0 if self.reliable else T4))


# Transactions the TU never answered are dropped after this long (timer-B-like).
UNANSWERED_LIFETIME = 64 * T1 * 4


class ServerTransactionTable:
    """Active server transactions, with bounded size and clock-driven expiry.

    Removal is scheduled on a heap when a transaction's timer starts, so expiring
    costs O(log n) per transaction rather than a scan of the whole table.
    """

    def __init__(self, clock: Callable[[], float], max_size: int = 200_000,
                 expire_interval: float = 1.0) -> None:
        self._clock = clock
        self._items: dict[tuple[str, ...], ServerTransaction] = {}
        self._timers: list[tuple[float, int, tuple[str, ...]]] = []
        self._datagrams: dict[int, tuple[str, ...]] = {}
        """``hash()`` of a request datagram -> its transaction's key (pruned when it
        holds twice as many entries as the table)."""
        self._last_created = float("-inf")
        self._seq = itertools.count()
        self.max_size = max_size
        self.expire_interval = expire_interval
        self._last_expire = clock()

    def __len__(self) -> int:
        return len(self._items)

    def _schedule(self, tx: ServerTransaction) -> None:
        # The heap holds keys, not transactions: a transaction that left the table
        # (or whose timer moved) is not kept alive by a stale heap entry.
        assert tx.expires_at is not None
        heapq.heappush(self._timers, (tx.expires_at, next(self._seq), tx.key))

    def match(self, request: Request,
              key: tuple[str, ...] | None = None) -> ServerTransaction | None:
        """The transaction a request (retransmission, ACK) belongs to, if any
        (a transaction whose timer J / H / I ran out is gone). ``key``: the request's
        :func:`server_key` when the caller has it already."""
        if key is None:
            key = server_key(request)
        tx = self._items.get(key)
        if tx is not None and tx.expires_at is not None and tx.expires_at <= self._clock():
            del self._items[key]
            return None
        return tx

    def match_datagram(self, data: bytes) -> ServerTransaction | None:
        """The live transaction started by an identical datagram (a UDP retransmission),
        found without parsing; None otherwise. (Matched by ``hash()``, keyed per process,
        and confirmed by the Call-ID in the datagram; holding each request's octets
        for the transaction's 32 s would cost more memory than the responses do.)"""
        h = hash(data)
        key = self._datagrams.get(h)
        if key is None:
            return None
        tx = self._items.get(key)
        if tx is None or tx.wire != h or key[4].encode("utf-8", "surrogateescape") not in data \
                or (tx.expires_at is not None and tx.expires_at <= self._clock()):
            return None
        return tx

    def create(self, request: Request, reliable: bool,
               key: tuple[str, ...] | None = None,
               datagram: bytes | None = None) -> ServerTransaction | None:
        """Start a transaction; None when the table is full (caller answers 503).
        ``datagram``: the request as received over UDP, for :meth:`match_datagram`."""
        # Creation times never decrease, so the table (a dict) is in creation order
        # even if an injected clock steps back; expire() relies on it.
        now = self._last_created = max(self._clock(), self._last_created)
        if now - self._last_expire >= self.expire_interval:
            self.expire()
        if len(self._items) >= self.max_size:
            self.expire()
            if len(self._items) >= self.max_size:
                return None
        tx = ServerTransaction(server_key(request) if key is None else key, request.method,
                               reliable, now, on_expiry=self._schedule)
        self._items[tx.key] = tx
        if datagram is not None:
            tx.wire = h = hash(datagram)
            datagrams = self._datagrams
            datagrams[h] = tx.key
            if len(datagrams) > 2 * len(self._items) + 1024:  # drop the departed ones
                self._datagrams = {t.wire: k for k, t in self._items.items()
                                   if t.wire is not None}
        return tx

    def discard(self, tx: ServerTransaction) -> None:
        if self._items.get(tx.key) is tx:
            del self._items[tx.key]

    def expire(self) -> int:
        """Forget finished transactions whose timer ran out; returns how many."""
        now = self._clock()
        self._last_expire = now
        removed = 0
        timers = self._timers
        items = self._items
        while timers and timers[0][0] <= now:
            key = heapq.heappop(timers)[2]
            tx = items.get(key)
            if tx is not None and tx.expires_at is not None and tx.expires_at <= now:
                del items[key]
                removed += 1
        # Unanswered ones, oldest first (the dict keeps creation order).
        horizon = now - UNANSWERED_LIFETIME
        stale = []
        for key, tx in items.items():
            if tx.created > horizon:
                break
            if tx.expires_at is None:
                stale.append(key)
        for key in stale:
            del items[key]
        return removed + len(stale)
