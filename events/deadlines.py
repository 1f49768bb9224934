"""Coarse per-task deadlines sharing one timer per time slot.

``asyncio.timeout`` arms a timer per use: a ``TimerHandle`` pushed on (and, cancelled,
left in) the loop's heap. Around every log append of every REGISTER that costs a few
per cent of the event loop. :class:`Deadlines` puts the tasks that start within one
``slot`` of each other under a single timer, so each one is cancelled between
``seconds`` and ``seconds + slot`` after it entered, unless it left before.
"""

from __future__ import annotations

import asyncio


class Deadline:
    """One task's entry (see :meth:`Deadlines.enter`)."""

    __slots__ = ("base", "expired", "slot", "task")

    def __init__(self, task: asyncio.Task[object], slot: int) -> None:
        self.task = task
        self.slot = slot
        self.base = task.cancelling()
        self.expired = False


class Deadlines:
    """Cancel tasks still inside their ``enter``/``leave`` span ``seconds`` after entering
    (plus up to ``slot``). Use from one event loop::

        entry = deadlines.enter()
        try:
            await work()
        except asyncio.CancelledError:
            if deadlines.timed_out(entry):
                raise TimeoutError from None
            raise  # cancelled by someone else
        finally:
            deadlines.leave(entry)
    """

    def __init__(self, seconds: float, slot: float = 0.05) -> None:
        if seconds <= 0 or slot <= 0:
            raise ValueError("seconds and slot must be positive")
        self.seconds = seconds
        self.slot = slot
        self._slots: dict[int, set[Deadline]] = {}

    def enter(self) -> Deadline:
        """Put the current task under a deadline ``seconds`` (to ``+ slot``) from now."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Deadlines.enter() must be called from a task")
        loop = task.get_loop()
        key = int(loop.time() / self.slot)
        entry = Deadline(task, key)
        members = self._slots.get(key)
        if members is None:
            members = self._slots[key] = set()
            loop.call_at((key + 1) * self.slot + self.seconds, self._fire, key)
        members.add(entry)
        return entry

    def leave(self, entry: Deadline) -> None:
        """End the span (whether it completed, failed or expired)."""
        members = self._slots.get(entry.slot)
        if members is not None:
            members.discard(entry)

    @staticmethod
    def timed_out(entry: Deadline) -> bool:
        """In ``except CancelledError``: whether the cancellation is this deadline's
        alone (then it is taken back: the task is no longer being cancelled)."""
        if not entry.expired:
            return False
        entry.expired = False
        return entry.task.uncancel() <= entry.base

    def _fire(self, key: int) -> None:
        for entry in self._slots.pop(key, ()):
            entry.expired = True
            entry.task.cancel()
