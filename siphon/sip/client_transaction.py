"""Client transactions (RFC 3261 §17.1) and server INVITE timer G (§17.2.1), sans-IO.

Nothing here does I/O or reads a clock: every entry point takes ``now`` and returns
a list of effects for the driver to carry out, and :meth:`next_deadline` tells the
driver when to call ``on_timer`` next (one timer per transaction is enough).

Effects:

* :class:`Send` - put ``data`` on the wire to the transaction's destination
  (the request, a retransmission of it, or the ACK for a non-2xx final response);
* :class:`Deliver` - pass the response just given to ``on_response`` up to the TU;
* :class:`Timeout` - timer B / F fired (the TU acts as if it received a 408);
* :class:`TransportError` - the transport reported a failure (§17.1.4, a 503 for a proxy);
* :class:`Terminated` - the transaction is over: the driver forgets it.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass

from siphon.sip.message import Headers, Message, Request
from siphon.sip.parser import parse_message
from siphon.sip.transaction import MAGIC_COOKIE, T1, T2, T4

TIMER_D = 32.0
"""Timer D over unreliable transports (§17.1.1.2: at least 32 s)."""


@dataclass(frozen=True, slots=True)
class Send:
    """Transmit ``data`` to the transaction's destination."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Deliver:
    """Pass the response with ``status`` (the one just received) to the TU."""

    status: int


@dataclass(frozen=True, slots=True)
class Timeout:
    """Timer B or F fired: no final response arrived in time (TU generates 408)."""


@dataclass(frozen=True, slots=True)
class TransportError:
    """The transport failed to send the request (§17.1.4; a proxy treats it as 503)."""


@dataclass(frozen=True, slots=True)
class Terminated:
    """The transaction reached the Terminated state and can be discarded."""


Effect = Send | Deliver | Timeout | TransportError | Terminated


class ClientState(enum.Enum):
    CALLING = "calling"
    TRYING = "trying"
    PROCEEDING = "proceeding"
    COMPLETED = "completed"
    TERMINATED = "terminated"


def branch() -> str:
    """A fresh RFC 3261 branch id: the magic cookie plus 96 random bits."""
    return MAGIC_COOKIE + secrets.token_hex(12)


def transaction_id(message: Message) -> tuple[str, str]:
    """Client transaction key (§17.1.3): top Via branch and CSeq method.

    Works on a response (to find its transaction) as well as on the request a
    client transaction sends (to file it). A missing branch gives ``""``."""
    via = message.top_via
    return (via.branch or "" if via is not None else "", message.cseq[1])


def build_ack(invite: Request, response_to: str) -> Request:
    """The ACK for a non-2xx final response to ``invite`` (§17.1.1.3).

    Same Request-URI, Call-ID, From and CSeq number as the INVITE, the INVITE's top
    Via only, its Route headers, and the To header of the response (with its tag)."""
    headers = Headers()
    vias = invite.headers.get_list("Via")
    if vias:
        headers.add("Via", vias[0])
    for route in invite.headers.get_all("Route"):
        headers.add("Route", route)
    headers.add("Max-Forwards", invite.headers.get("Max-Forwards") or "70")
    headers.add("From", invite.headers.get("From") or "")
    headers.add("To", response_to)
    headers.add("Call-ID", invite.call_id)
    headers.add("CSeq", f"{invite.cseq[0]} ACK")
    return Request("ACK", invite.uri, headers, version=invite.version)


class ClientTransaction:
    """An INVITE (§17.1.1) or non-INVITE (§17.1.2) client transaction.

    ``request`` is the encoded request as sent (top Via carrying our branch).
    The transaction is created in Calling (INVITE) / Trying state; :meth:`start`
    returns the first transmission and arms the timers. Timer values are the
    RFC defaults unless overridden; ``timer_d`` is used for INVITE over an
    unreliable transport (zero over a reliable one, like timer K).

    An INVITE transaction in Proceeding runs no timer (§17.1.1.2): a proxy must
    guard it with its own timer C (§16.8).
    """

    __slots__ = (
        "_ack",
        "_end_at",
        "_interval",
        "_parsed",
        "_retx_at",
        "_timeout_at",
        "created",
        "final_status",
        "method",
        "reliable",
        "request",
        "state",
        "t1",
        "t2",
        "t4",
        "timer_d",
    )

    def __init__(self, request: bytes, method: str, reliable: bool, now: float, *,
                 t1: float = T1, t2: float = T2, t4: float = T4, timer_d: float = TIMER_D,
                 parsed: Request | None = None) -> None:
        self.request = request
        self.method = method
        self.reliable = reliable
        self.created = now
        self.t1 = t1
        self.t2 = t2
        self.t4 = t4
        self.timer_d = timer_d
        self.state = ClientState.CALLING if self.is_invite else ClientState.TRYING
        self.final_status = 0
        self._parsed = parsed
        self._ack: bytes | None = None
        self._interval = t1
        self._retx_at: float | None = None  # timer A / E
        self._timeout_at: float | None = None  # timer B / F
        self._end_at: float | None = None  # timer D / K

    def __repr__(self) -> str:
        return f"<ClientTransaction {self.method} {self.state.value}>"

    @property
    def is_invite(self) -> bool:
        return self.method == "INVITE"

    @property
    def parsed(self) -> Request:
        """The request, parsed from :attr:`request` on first use."""
        if self._parsed is None:
            msg = parse_message(self.request, validate=False)
            if not isinstance(msg, Request):
                raise ValueError("client transaction bytes are not a request")
            self._parsed = msg
        return self._parsed

    @property
    def key(self) -> tuple[str, str]:
        """``(branch, method)``, what :func:`transaction_id` gives for its responses."""
        return transaction_id(self.parsed)

    @property
    def ack(self) -> bytes | None:
        """The ACK sent for a non-2xx final response (INVITE only), once there is one."""
        return self._ack

    @property
    def done(self) -> bool:
        return self.state is ClientState.TERMINATED

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` must next be called, None when no timer runs."""
        if self.state is ClientState.TERMINATED:
            return None
        times = [t for t in (self._retx_at, self._timeout_at, self._end_at) if t is not None]
        return min(times) if times else None

    def start(self, now: float) -> list[Effect]:
        """First transmission; arms timer A / E (unreliable only) and B / F."""
        if self._timeout_at is not None or self.state not in (
                ClientState.CALLING, ClientState.TRYING):
            return []
        self._timeout_at = now + 64 * self.t1
        if not self.reliable:
            self._interval = self.t1
            self._retx_at = now + self.t1
        return [Send(self.request)]

    def on_response(self, status: int, now: float, to_header: str | None = None
                    ) -> list[Effect]:
        """A response matched to this transaction (by :func:`transaction_id`).

        ``to_header`` (the response's To value) is required for a 300-699 response
        to INVITE that is not a retransmission: the ACK is built from it."""
        if self.is_invite:
            return self._invite_response(status, now, to_header)
        return self._non_invite_response(status, now)

    def on_timer(self, now: float) -> list[Effect]:
        """Fire the timers due at ``now``. At most one retransmission per call; a due
        timeout or end timer wins over a retransmission."""
        if self.state is ClientState.TERMINATED:
            return []
        if self._end_at is not None and self._end_at <= now:  # timer D / K
            return self._terminate()
        if self._timeout_at is not None and self._timeout_at <= now:  # timer B / F
            return [Timeout(), *self._terminate()]
        if self._retx_at is not None and self._retx_at <= now:  # timer A / E
            if self.is_invite:
                self._interval *= 2
            elif self.state is ClientState.PROCEEDING:
                self._interval = self.t2
            else:
                self._interval = min(2 * self._interval, self.t2)
            nxt = self._retx_at + self._interval
            self._retx_at = nxt if nxt > now else now + self._interval
            return [Send(self.request)]
        return []

    def on_transport_error(self) -> list[Effect]:
        """The transport could not send the request (§17.1.4)."""
        if self.state in (ClientState.CALLING, ClientState.TRYING, ClientState.PROCEEDING):
            return [TransportError(), *self._terminate()]
        return []

    def _terminate(self) -> list[Effect]:
        self.state = ClientState.TERMINATED
        self._retx_at = self._timeout_at = self._end_at = None
        return [Terminated()]

    def _invite_response(self, status: int, now: float, to_header: str | None
                         ) -> list[Effect]:
        state = self.state
        if state in (ClientState.CALLING, ClientState.PROCEEDING):
            if status < 200:
                self.state = ClientState.PROCEEDING
                self._retx_at = self._timeout_at = None  # timers A and B stop
                return [Deliver(status)]
            if status < 300:
                self.final_status = status
                return [Deliver(status), *self._terminate()]
            if to_header is None:
                raise ValueError("to_header is needed to ACK a non-2xx final response")
            self._ack = build_ack(self.parsed, to_header).encode()
            self.final_status = status
            self.state = ClientState.COMPLETED
            self._retx_at = self._timeout_at = None
            out: list[Effect] = [Send(self._ack), Deliver(status)]
            if self.reliable or self.timer_d <= 0:
                out.extend(self._terminate())
            else:
                self._end_at = now + self.timer_d
            return out
        if 200 <= status < 300:
            # A 2xx always reaches the TU (it is forwarded, and ACKed end to end),
            # including retransmissions arriving after the transaction ended.
            return [Deliver(status)]
        if state is ClientState.COMPLETED and status >= 300 and self._ack is not None:
            return [Send(self._ack)]  # retransmitted final response
        return []

    def _non_invite_response(self, status: int, now: float) -> list[Effect]:
        if self.state not in (ClientState.TRYING, ClientState.PROCEEDING):
            return []  # retransmissions absorbed in Completed
        if status < 200:
            self.state = ClientState.PROCEEDING
            return [Deliver(status)]
        self.final_status = status
        self.state = ClientState.COMPLETED
        self._retx_at = self._timeout_at = None
        out: list[Effect] = [Deliver(status)]
        if self.reliable or self.t4 <= 0:
            out.extend(self._terminate())  # timer K = 0
        else:
            self._end_at = now + self.t4
        return out


class InviteServerRetransmitter:
    """Timer G and H for a server INVITE transaction's non-2xx final response (§17.2.1).

    Over UDP the response is retransmitted at T1, 2*T1, ... capped at T2 until
    :meth:`on_ack` or timer H (64*T1 after the response). Over a reliable
    transport nothing is retransmitted; only H runs. Pair it with the
    :class:`~siphon.sip.transaction.ServerTransaction` that sent the response.
    """

    __slots__ = ("_g_at", "_interval", "acked", "h_at", "response", "t2", "timed_out")

    def __init__(self, response: bytes, now: float, *, reliable: bool = False,
                 t1: float = T1, t2: float = T2) -> None:
        self.response = response
        self.t2 = t2
        self.h_at = now + 64 * t1
        self._interval = min(t1, t2)
        self._g_at: float | None = None if reliable else now + self._interval
        self.acked = False
        self.timed_out = False

    @property
    def done(self) -> bool:
        return self.acked or self.timed_out

    def next_deadline(self) -> float | None:
        if self.done:
            return None
        return self.h_at if self._g_at is None else min(self._g_at, self.h_at)

    def on_timer(self, now: float) -> list[Send]:
        """Retransmit if timer G is due; past timer H, stop (``timed_out``)."""
        if self.done:
            return []
        if self.h_at <= now:
            self.timed_out = True
            self._g_at = None
            return []
        if self._g_at is None or self._g_at > now:
            return []
        self._interval = min(2 * self._interval, self.t2)
        nxt = self._g_at + self._interval
        self._g_at = nxt if nxt > now else now + self._interval
        return [Send(self.response)]

    def on_ack(self) -> None:
        """The ACK arrived (Confirmed): no more retransmissions."""
        self.acked = True
        self._g_at = None

