"""Event-loop CPU per authenticated REGISTER, in process (no sockets, no SIPp).

A real :class:`siphon.app.Node` (embedded log in a temp dir, examples/registrar.py,
10,000 static users) is started in this process; its SIP core is fed the same two
datagrams per registration that ``bench/register.py``'s SIPp scenario sends
(REGISTER, 401, REGISTER with ``Authorization``, 200). ``--concurrency`` users
register at a time, so group commit batches them as under load.

It prints event-loop thread CPU per registration (``time.thread_time``) and the
in-process rate; ``--profile`` adds a cProfile of the event loop. Use it to iterate
on the SIP path; ``register.py`` stays the end-to-end figure.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import hashlib
import logging
import pstats
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _util import EXAMPLE_SCRIPT, write_config

from siphon.app import Node
from siphon.config import load_config
from siphon.script.request import Source

REALM = "example.com"
_NONCE_RE = re.compile(r'nonce="([^"]+)"')


def _register(user: str, seq: int, branch: str, call_id: str, auth: str | None) -> bytes:
    lines = [
        f"REGISTER sip:{REALM} SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-{branch}",
        "Max-Forwards: 70",
        f"From: <sip:{user}@{REALM}>;tag=4242-{call_id}",
        f"To: <sip:{user}@{REALM}>",
        f"Call-ID: {call_id}///127.0.0.1",
        f"CSeq: {seq} REGISTER",
        f"Contact: <sip:{user}@127.0.0.1:5061;transport=UDP>",
    ]
    if auth:
        lines.append(auth)
    lines += ["Expires: 600", "User-Agent: SIPp-siphon-bench/3.6", "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _authorization(user: str, password: str, nonce: str) -> str:
    ha1 = hashlib.md5(f"{user}:{REALM}:{password}".encode()).hexdigest()
    ha2 = hashlib.md5(f"REGISTER:sip:{REALM}".encode()).hexdigest()
    cnonce, nc = "6b8b4567", "00000001"
    resp = hashlib.md5(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}".encode()).hexdigest()
    return (f'Authorization: Digest username="{user}",realm="{REALM}",cnonce="{cnonce}",'
            f'nc={nc},qop=auth,uri="sip:{REALM}",nonce="{nonce}",response="{resp}",'
            f"algorithm=MD5")


async def run(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="siphon-bench-sip-path-"))
    users = {f"user{i:05d}": "password" for i in range(10_000)}
    cfg_path = work / "siphon.yaml"
    backend: dict = {}
    if args.kafka:  # the same node on the Kafka backend, fresh topic
        topic = f"bench-sip-path-{uuid.uuid4().hex[:8]}"
        backend = {"backend": "kafka",
                   "kafka": {"bootstrap": args.kafka, "topic": topic, "partitions": 6}}
    write_config(cfg_path, log_path=work / "events.db", users=users, udp_port=0,
                 admin_port=0, log_level="warning", script=EXAMPLE_SCRIPT, **backend)
    logging.basicConfig(level=logging.WARNING)
    node = Node(load_config(cfg_path))
    await node.start()
    waiting: dict[str, asyncio.Future[bytes]] = {}

    def send(data: bytes, source: Source) -> None:
        head = data[: data.find(b"\r\n\r\n")].decode()
        call_id = re.search(r"\r\nCall-ID: (\S+)", head).group(1)  # type: ignore[union-attr]
        fut = waiting.pop(call_id, None)
        if fut is not None and not fut.done():
            fut.set_result(data)

    node.core.send = send
    src = Source("udp", ("127.0.0.1", 5061), ("127.0.0.1", 5060))
    loop = asyncio.get_running_loop()

    async def one(n: int) -> None:
        user = f"user{n % 10_000:05d}"
        call_id = f"{n}-bench"
        fut = waiting[f"{call_id}///127.0.0.1"] = loop.create_future()
        node.core.receive(_register(user, 1, f"{n}a", call_id, None), src)
        first = await fut
        nonce = _NONCE_RE.search(first.decode()).group(1)  # type: ignore[union-attr]
        fut = waiting[f"{call_id}///127.0.0.1"] = loop.create_future()
        node.core.receive(_register(user, 2, f"{n}b", call_id,
                                    _authorization(user, "password", nonce)), src)
        final = await fut
        if not final.startswith(b"SIP/2.0 200"):
            raise SystemExit(f"unexpected answer: {final[:200]!r}")

    async def batch(start: int, count: int) -> None:
        todo = iter(range(start, start + count))

        async def client() -> None:  # (a semaphore's wake-ups would cost O(waiters))
            for n in todo:
                await one(n)

        await asyncio.gather(*(client() for _ in range(min(args.concurrency, count))))

    await batch(0, min(2000, args.count))  # warm-up: caches, first binding per user
    if args.gc_threshold:
        gc.set_threshold(*(int(x) for x in args.gc_threshold.split(",")))
    if args.gc == "off":
        gc.disable()
    elif args.gc == "freeze":
        gc.collect()
        gc.freeze()
    gc_time = [0.0, 0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_time[1] = time.thread_time_ns()
        else:
            gc_time[0] += (time.thread_time_ns() - gc_time[1]) / 1e9

    gc.callbacks.append(on_gc)
    prof = cProfile.Profile() if args.profile else None
    t0, c0 = time.perf_counter(), time.thread_time()
    if prof:
        prof.enable()
    per_batch: list[float] = []  # CPU us per registration of each batch of --batch
    for start in range(0, args.count, args.batch):
        size = min(args.batch, args.count - start)
        b0 = time.thread_time()
        await batch(10_000_000 + start, size)
        per_batch.append((time.thread_time() - b0) / size * 1e6)
    if prof:
        prof.disable()
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    per_batch.sort()
    print(f"{args.count} registrations, concurrency {args.concurrency}: "
          f"{cpu / args.count * 1e6:.0f} us event-loop CPU per registration "
          f"(batches of {args.batch}: min {per_batch[0]:.0f}, "
          f"median {per_batch[len(per_batch) // 2]:.0f}), "
          f"{args.count / wall:.0f}/s in process (wall {wall:.2f}s); "
          f"GC {gc_time[0] / args.count * 1e6:.0f} us/registration")
    if prof:
        pstats.Stats(prof).sort_stats(args.sort).print_stats(args.top)
        prof.dump_stats(str(work / "profile.out"))
        print("profile saved in", work / "profile.out")
    await node.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=10_000, help="registrations to time")
    p.add_argument("--batch", type=int, default=2000, help="registrations per timed batch")
    p.add_argument("--concurrency", type=int, default=200, help="registrations in flight")
    p.add_argument("--kafka", metavar="HOST:PORT",
                   help="use the Kafka backend on this broker (a fresh topic)")
    p.add_argument("--gc", choices=("on", "off", "freeze"), default="on",
                   help="garbage collector during the timed part")
    p.add_argument("--gc-threshold", metavar="G0,G1,G2",
                   help="gc.set_threshold() for the timed part (default: siphon's own)")
    p.add_argument("--profile", action="store_true", help="cProfile the timed part")
    p.add_argument("--sort", default="tottime", help="cProfile sort key (tottime, cumtime)")
    p.add_argument("--top", type=int, default=40, help="cProfile rows to print")
    args = p.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    import uvloop  # as `siphon run` does

    uvloop.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
