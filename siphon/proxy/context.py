"""The response context of a forked request (RFC 3261 §16.7), as pure code.

A :class:`ResponseContext` is told about each branch's responses and answers
what to do: forward this response upstream now, cancel the other branches,
or (once every branch is finished) send the best final response.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Do(enum.Enum):
    FORWARD = "forward"
    """Send this branch's response upstream now."""
    CANCEL_OTHERS = "cancel_others"
    """CANCEL every other pending branch (INVITE only)."""
    SEND_BEST = "send_best"
    """Every branch finished without 2xx/6xx: send the stored best response."""


@dataclass(slots=True)
class Outcome:
    actions: list[Do] = field(default_factory=list)
    best: int | None = None
    """Branch whose stored final response is the best (with SEND_BEST)."""


def rank(status: int, local: bool) -> tuple[int, int, int]:
    """Sort key of a final response: lower is better (§16.7 step 6).

    Answers from real peers beat ones generated here (408 timeouts, 503
    unreachable); then 6xx, then the lowest class; within a class 401/407 (so
    the caller can authenticate) before other codes, then the lowest code.
    """
    klass = status // 100
    order = 0 if klass == 6 else klass
    auth = 0 if status in (401, 407) else 1
    return (1 if local else 0, order, auth * 1000 + status)


class ResponseContext:
    """Tracks the branches of one forwarded request."""

    def __init__(self, branches: int, is_invite: bool) -> None:
        self.is_invite = is_invite
        self.finals: list[tuple[int, bool] | None] = [None] * branches
        self.sent_final = False
        self.forwarded_100 = False

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finals)

    def add_branch(self) -> int:
        self.finals.append(None)
        return len(self.finals) - 1

    def on_response(self, branch: int, status: int, local: bool = False) -> Outcome:
        """A response (or a local 408/503 for a failed branch) arrived on ``branch``."""
        out = Outcome()
        if status < 200:
            if not self.sent_final and status != 100:
                out.actions.append(Do.FORWARD)
            return out
        if status < 300:
            first = not self.sent_final
            if self.finals[branch] is None:
                self.finals[branch] = (status, local)
            self.sent_final = True
            out.actions.append(Do.FORWARD)  # every 2xx goes upstream (§16.7 step 5)
            if first and self.is_invite:
                out.actions.append(Do.CANCEL_OTHERS)
            return out
        if self.finals[branch] is not None:
            return out  # retransmission of a final already recorded
        self.finals[branch] = (status, local)
        if self.sent_final:
            return out
        if status >= 600:
            self.sent_final = True
            out.actions.append(Do.FORWARD)
            if self.is_invite:
                out.actions.append(Do.CANCEL_OTHERS)
            return out
        if self.done:
            self.sent_final = True
            out.actions.append(Do.SEND_BEST)
            out.best = self.best()
        return out

    def best(self) -> int | None:
        candidates = [(rank(f[0], f[1]), i) for i, f in enumerate(self.finals) if f is not None]
        return min(candidates)[1] if candidates else None

    def pending(self) -> list[int]:
        return [i for i, f in enumerate(self.finals) if f is None]
