"""events.deadlines: coarse deadlines sharing one timer per slot (KafkaLog.append)."""

from __future__ import annotations

import asyncio
import time

import pytest

from events.deadlines import Deadlines


async def _bounded(deadlines: Deadlines, work: asyncio.Future[object]) -> object:
    entry = deadlines.enter()
    try:
        return await work
    except asyncio.CancelledError:
        if deadlines.timed_out(entry):
            raise TimeoutError from None
        raise
    finally:
        deadlines.leave(entry)


async def test_stuck_task_times_out_within_seconds_plus_slot() -> None:
    deadlines = Deadlines(0.1, slot=0.02)
    never = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(_bounded(deadlines, never))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await task
    assert 0.09 <= time.monotonic() - started < 0.5
    assert task.cancelling() == 0  # the deadline's cancellation was taken back


async def test_finished_span_is_never_cancelled_later() -> None:
    deadlines = Deadlines(0.05, slot=0.01)
    loop = asyncio.get_running_loop()

    async def quick_then_linger() -> str:
        done = loop.create_future()
        loop.call_soon(done.set_result, "ok")
        result = await _bounded(deadlines, done)
        await asyncio.sleep(0.15)  # well past the deadline: must not be interrupted
        return str(result)

    assert await quick_then_linger() == "ok"


async def test_outside_cancellation_is_not_turned_into_a_timeout() -> None:
    deadlines = Deadlines(5.0)
    never = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(_bounded(deadlines, never))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_tasks_entering_together_share_one_timer() -> None:
    deadlines = Deadlines(0.2, slot=1.0)
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(200)]
    tasks = [asyncio.ensure_future(_bounded(deadlines, f)) for f in futures]
    await asyncio.sleep(0)
    assert sum(len(members) for members in deadlines._slots.values()) == 200
    assert len(deadlines._slots) <= 2  # (the 200 entered within one or two slots)
    for f in futures[:100]:
        f.set_result(1)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[:100] == [1] * 100
    assert all(isinstance(r, TimeoutError) for r in results[100:])
    assert not deadlines._slots


def test_enter_outside_a_task_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        Deadlines(1.0).enter()
