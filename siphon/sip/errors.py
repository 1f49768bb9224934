"""Errors raised by the sans-IO SIP layer."""

from __future__ import annotations


class SipSyntaxError(ValueError):
    """Malformed SIP text; ``status`` is the response a server should send."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class SipNeedMoreData(Exception):
    """A stream holds an incomplete message so far (framing only)."""
