"""Reader half of the embedded replay pipeline (standard library only).

Run as a child process (``python _reader.py PATH START STOP BATCH [payloads]``), it reads
the records ``[START, STOP)`` of an embedded log, checks offsets and CRCs, and
streams them on stdout while the parent decodes and applies the previous batch:
on a 2-core machine reading and checking overlap with decoding and applying.

Frames (little endian):

* ``B`` first:u64 count:u32 size:u32, then ``size`` bytes: the ``count`` good
  payloads from offset ``first`` as one JSON array (decoded in a single call);
* ``P`` (payload mode) first:u64 count:u32 size:u32, then ``count`` u32 lengths and
  ``size`` bytes: the ``count`` good payloads from offset ``first``, concatenated;
* ``E`` offset:u64 size:u32, then a UTF-8 reason: a damaged or missing record;
* ``Z``: the end.

:func:`check_rows` is also used in-process for short reads.
"""

from __future__ import annotations

import sqlite3
import struct
import sys
import zlib
from collections.abc import Iterator

SELECT = ('SELECT "offset", payload, crc FROM records '
          'WHERE "offset" >= ? AND "offset" < ? ORDER BY "offset"')
BATCH = struct.Struct("<QII")
ERROR = struct.Struct("<QI")

Item = tuple[str, int, object]
"""``("ok", first offset, [payloads])`` or ``("bad", offset, reason)``."""


def connect(path: str) -> sqlite3.Connection:
    """A connection that never writes (the log may belong to a running node)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA query_only=ON")
    return conn


def check_rows(rows: list[tuple[int, object, object]], start: int, stop: int) -> Iterator[Item]:
    """Split the rows of ``[start, stop)`` into runs of good payloads and problems."""
    crc32 = zlib.crc32
    if len(rows) == stop - start and all(
            type(p) is bytes and crc32(p) == c for _, p, c in rows):
        yield "ok", start, [p for _, p, _ in rows]
        return
    run: list[bytes] = []
    first = expected = start
    for offset, payload, crc in rows:
        problem = None
        if offset != expected:
            if run:
                yield "ok", first, run
                run = []
            yield "bad", expected, f"{offset - expected} record(s) missing (gap in offsets)"
        if not isinstance(payload, bytes):
            problem = f"payload is {type(payload).__name__}, not a blob"
        elif crc32(payload) != crc:
            problem = f"crc mismatch (stored {crc!r}, computed {crc32(payload)})"
        if problem is not None:
            if run:
                yield "ok", first, run
                run = []
            yield "bad", offset, problem
        else:
            if not run:
                first = offset
            run.append(payload)
        expected = offset + 1
    if run:
        yield "ok", first, run
    if expected < stop:
        yield "bad", expected, f"{stop - expected} record(s) missing (gap in offsets)"


def stream(path: str, start: int, stop: int, batch: int, out: object,
           payloads_mode: bool = False) -> None:
    """Write the frames of ``[start, stop)`` to the binary file ``out`` (``B`` frames,
    or ``P`` frames in payload mode)."""
    write = out.write  # type: ignore[attr-defined]
    conn = connect(path)
    # Memory-mapped reads: fewer copies of the pages (SQLite caps the size at its
    # compile-time maximum). Only here, in a child process: a file truncated under a
    # mapping raises SIGBUS, which then ends this reader, reported by its parent.
    conn.execute("PRAGMA mmap_size=8589934592")
    try:
        for lo in range(start, stop, batch):
            hi = min(stop, lo + batch)
            rows = conn.execute(SELECT, (lo, hi)).fetchall()
            for kind, offset, data in check_rows(rows, lo, hi):
                if kind == "ok":
                    payloads: list[bytes] = data  # type: ignore[assignment]
                    if payloads_mode:
                        body = b"".join(payloads)
                        write(b"P" + BATCH.pack(offset, len(payloads), len(body)))
                        write(struct.pack(f"<{len(payloads)}I", *map(len, payloads)))
                    else:
                        body = b"[" + b",".join(payloads) + b"]"
                        write(b"B" + BATCH.pack(offset, len(payloads), len(body)))
                    write(body)
                else:
                    reason = str(data).encode()
                    write(b"E" + ERROR.pack(offset, len(reason)))
                    write(reason)
        write(b"Z")
        out.flush()  # type: ignore[attr-defined]
    finally:
        conn.close()


def main(argv: list[str]) -> int:
    path, start, stop, batch = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    payloads_mode = argv[4:5] == ["payloads"]
    try:
        stream(path, start, stop, batch, sys.stdout.buffer, payloads_mode)
    except BrokenPipeError:  # the parent stopped reading (early stop, Ctrl-C)
        return 0
    except KeyboardInterrupt:
        return 130
    except sqlite3.Error as exc:
        print(f"cannot read {path}: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
