#!/usr/bin/env python3
"""Group-commit latency of the embedded log while the event loop's thread is busy.

The embedded log writes in a thread; the event loop keeps the GIL while it works.
Every time the sqlite3 module steps a statement it releases the GIL and must win
it back, waiting up to the interpreter's switch interval (5 ms) when another
thread is running Python code. Under REGISTER load that wait, paid per statement,
decided how long a commit took. This benchmark appends groups of ``--group``
events in one ``append`` and prints the commit latency (append -> durable), first
with the process idle, then with a thread spinning Python code as a busy event
loop does.

Example:  python bench/log_commit.py --group 2000 --repeat 5
          python bench/log_commit.py --group 200 --switch-interval 0.005
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import _util as U

from events.embedded import EmbeddedLog
from siphon.app import SERVING_SWITCH_INTERVAL


async def measure(path: Path, group: int, repeat: int, busy: bool) -> list[float]:
    events = list(U.registrar_events(group * repeat, 10_000, seed=1, start=time.time()))
    log = EmbeddedLog(path, group_commit_max=group, append_timeout=120.0)
    await log.open()
    stop = threading.Event()

    def spin() -> None:  # pure Python work holding the GIL, like a busy event loop
        n = 0
        while not stop.is_set():
            n += 1

    spinner = threading.Thread(target=spin, daemon=True)
    if busy:
        spinner.start()
    took: list[float] = []
    try:
        for i in range(repeat):
            t0 = time.perf_counter()
            await log.append(events[i * group : (i + 1) * group])
            took.append((time.perf_counter() - t0) * 1000)
    finally:
        stop.set()
        if busy:
            spinner.join()
        await log.close()
    return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group", type=int, default=2000, help="events per append (default 2000)")
    p.add_argument("--repeat", type=int, default=5, help="appends per case (default 5)")
    p.add_argument("--switch-interval", type=float, default=SERVING_SWITCH_INTERVAL,
                   help="sys.setswitchinterval() in seconds (default: siphon's while "
                        f"serving, {SERVING_SWITCH_INTERVAL:g}; Python's own is 0.005)")
    args = p.parse_args()
    sys.setswitchinterval(args.switch_interval)
    with tempfile.TemporaryDirectory(prefix="siphon-bench-log-commit-") as work:
        for busy in (False, True):
            took = asyncio.run(measure(Path(work) / f"events-{busy}.db", args.group,
                                       args.repeat, busy))
            print(f"{'busy' if busy else 'idle'} process: commit of {args.group} events "
                  f"median {statistics.median(took):.1f} ms, max {max(took):.1f} ms "
                  f"({', '.join(f'{t:.0f}' for t in took)})")


if __name__ == "__main__":
    main()
