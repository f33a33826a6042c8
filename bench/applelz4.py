"""Decode throughput: Apple LZ4 stream (barge.disk.applelz4) vs LZ4 frame (barge.disk.lz4frame)
of the same data, in the same run. Target: Apple LZ4 within 1.5x of LZ4 frame.

    .venv/bin/python bench/applelz4.py [--mib 64] [--repeat 3]

Data: a disk-like mix of text (the Gutenberg vector, repeated), zeros and random bytes.
Two Apple streams are measured: barge's encoder output (independent blocks) and a stream whose
blocks use the previous block as dictionary, as Apple's framework writes.
"""

from __future__ import annotations

import argparse
import io
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import lz4.block
import lz4.frame

from barge.disk import applelz4, lz4frame

VECTOR = Path(__file__).resolve().parent.parent / "tests" / "testdata" / "apple-lz4" / "pg2554.txt"


def make_data(mib: int) -> bytes:
    text = VECTOR.read_bytes() if VECTOR.exists() else b"The quick brown fox. " * 60000
    size = mib << 20
    parts = []
    have = 0
    i = 0
    while have < size:
        kind = i % 4
        piece = (
            text[: 4 << 20]
            if kind in (0, 1)
            else bytes(4 << 20)
            if kind == 2
            else os.urandom(1 << 20)
        )
        parts.append(piece)
        have += len(piece)
        i += 1
    return b"".join(parts)[:size]


def apple_with_dict(data: bytes) -> bytes:
    """An Apple-style stream whose bv41 blocks reference the previous block."""
    out = []
    prev = b""
    for i in range(0, len(data), applelz4.BLOCK_SIZE):
        block = data[i : i + applelz4.BLOCK_SIZE]
        comp = lz4.block.compress(block, store_size=False, dict=prev)
        if len(comp) < len(block):
            out.append(b"bv41" + struct.pack("<II", len(block), len(comp)) + comp)
        else:
            out.append(b"bv4-" + struct.pack("<I", len(block)) + block)
        prev = block
    out.append(b"bv4$")
    return b"".join(out)


def best(fn: Callable[[], int], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    data = make_data(args.mib)
    n = len(data)
    apple_indep = applelz4.encode(data)
    apple_dict = apple_with_dict(data)
    frame = lz4.frame.compress(data, block_size=lz4.frame.BLOCKSIZE_MAX4MB)
    assert applelz4.decode(apple_dict) == data

    def sink(_: bytes) -> None:
        pass

    results = {
        "apple-lz4 (independent blocks)": best(
            lambda: applelz4.decode_into(io.BytesIO(apple_indep), sink, expected_size=n),
            args.repeat,
        ),
        "apple-lz4 (dictionary blocks)": best(
            lambda: applelz4.decode_into(io.BytesIO(apple_dict), sink, expected_size=n), args.repeat
        ),
        "lz4-frame (barge.disk.lz4frame)": best(
            lambda: lz4frame.decode_into(io.BytesIO(frame), sink, expected_size=n), args.repeat
        ),
    }
    print(
        f"data: {n >> 20} MiB; compressed: apple(indep) {len(apple_indep) >> 20} MiB, "
        f"apple(dict) {len(apple_dict) >> 20} MiB, frame {len(frame) >> 20} MiB"
    )
    for name, t in results.items():
        print(f"{name:34s} {n / t / (1 << 20):8.0f} MiB/s  ({t * 1000:.0f} ms)")
    ref = results["lz4-frame (barge.disk.lz4frame)"]
    for name in ("apple-lz4 (independent blocks)", "apple-lz4 (dictionary blocks)"):
        ratio = results[name] / ref
        verdict = "OK" if ratio <= 1.5 else "SLOWER THAN TARGET"
        print(f"ratio {name} / lz4-frame: {ratio:.2f}x  (target <= 1.5x: {verdict})")


if __name__ == "__main__":
    main()
