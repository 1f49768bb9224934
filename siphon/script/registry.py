"""Handlers registered by the operator's script through the decorators."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Handler:
    fn: Callable[..., Any]
    methods: frozenset[str] | None = None
    """Methods this request handler is for (None: all)."""

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)


@dataclass(slots=True)
class Registry:
    """Everything one load of the script registered."""

    on_request: list[Handler] = field(default_factory=list)
    on_change: list[Handler] = field(default_factory=list)
    trunk_on_change: list[Handler] = field(default_factory=list)
    http_routes: list[Any] = field(default_factory=list)
    """``siphon.script.http_api.Route`` objects, in registration order."""
    http_startup: list[Handler] = field(default_factory=list)
    http_middleware: list[Handler] = field(default_factory=list)

    def request_handlers(self, method: str) -> list[Handler]:
        return [h for h in self.on_request if h.methods is None or method in h.methods]


registry = Registry()
"""The registry the decorators write into (replaced on each script load)."""
