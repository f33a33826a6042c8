"""Measure the choices of barge's disk format on this machine (one core per measurement).

    .venv/bin/python bench/codecs.py [--corpus-mib 128] [--blake3-path DIR] [--markdown]

* codecs: zstd levels 1 and 3, lz4 as raw blocks and as LZ4 frames: compression and
  decompression throughput (MB/s of uncompressed data) and ratio, on compressible data (files
  under /usr/lib and /usr/share concatenated) and on random data, at 4 MiB, 1 MiB and 256 KiB
  frames;
* frame hashes: hashlib sha256 vs BLAKE3 (``--blake3-path``: a directory holding an unpacked
  blake3 wheel; barge does not depend on it);
* zero-frame detection: barge.disk.sparse.is_zero vs bytearray.startswith (what the encoder uses);
* the index size of a 200 GiB disk at each frame size.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lz4.block
import lz4.frame
import zstandard

from barge.disk.index import ChunkMeta, FrameIndex, FrameInfo

MiB = 1 << 20
FRAME_SIZES = (4 * MiB, 1 * MiB, 256 << 10)


def pin_one_core() -> None:
    try:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[-1]})
    except (AttributeError, OSError):
        pass


def corpus(limit: int) -> bytes:
    """Compressible data: regular files under /usr/lib and /usr/share, in path order."""
    out = bytearray()
    for root in ("/usr/lib", "/usr/share"):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                if os.path.islink(p) or not os.path.isfile(p):
                    continue
                try:
                    out += Path(p).read_bytes()[: limit - len(out)]
                except OSError:
                    continue
                if len(out) >= limit:
                    return bytes(out)
    return bytes(out)


def frames(data: bytes, fs: int) -> Iterator[memoryview]:
    mv = memoryview(data)
    for off in range(0, len(data), fs):
        yield mv[off : off + fs]


def best_of(fn: Callable[[], object], runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def codec_table(data: bytes, label: str, runs: int) -> list[tuple[str, ...]]:
    rows = []
    zc1 = zstandard.ZstdCompressor(level=1, write_checksum=False, write_content_size=True)
    zc3 = zstandard.ZstdCompressor(level=3, write_checksum=False, write_content_size=True)
    zd = zstandard.ZstdDecompressor()

    def lz4f(b: memoryview) -> bytes:
        return bytes(
            lz4.frame.compress(
                b,
                block_size=lz4.frame.BLOCKSIZE_MAX4MB,
                content_checksum=False,
                block_checksum=False,
                store_size=True,
            )
        )

    codecs: list[tuple[str, Callable[[memoryview], bytes], Callable[[bytes, int], bytes]]] = [
        ("zstd-1", zc1.compress, lambda c, n: zd.decompress(c, max_output_size=n)),
        ("zstd-3", zc3.compress, lambda c, n: zd.decompress(c, max_output_size=n)),
        (
            "lz4 block",
            lambda b: lz4.block.compress(b, store_size=False),
            lambda c, n: lz4.block.decompress(c, uncompressed_size=n),
        ),
        ("lz4 frame", lz4f, lambda c, n: lz4.frame.decompress(c)),
    ]
    for fs in FRAME_SIZES:
        pieces = list(frames(data, fs))
        for name, comp, decomp in codecs:
            out: list[bytes] = []

            def run_c(
                comp: Callable[[memoryview], bytes] = comp,
                out: list[bytes] = out,
                pieces: list[memoryview] = pieces,
            ) -> None:
                out.clear()
                out.extend(comp(p) for p in pieces)

            tc = best_of(run_c, runs)
            csize = sum(len(c) for c in out)
            sizes = [len(p) for p in pieces]
            comp_out = list(out)

            def run_d(
                decomp: Callable[[bytes, int], bytes] = decomp,
                comp_out: list[bytes] = comp_out,
                sizes: list[int] = sizes,
            ) -> None:
                for c, n in zip(comp_out, sizes, strict=True):
                    decomp(c, n)

            td = best_of(run_d, runs)
            rows.append(
                (
                    label,
                    f"{fs >> 10} KiB",
                    name,
                    f"{len(data) / tc / 1e6:.0f}",
                    f"{len(data) / td / 1e6:.0f}",
                    f"{len(data) / csize:.3f}",
                )
            )
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows


def hash_table(blake3_path: str | None) -> list[tuple[str, str]]:
    buf = os.urandom(64 * MiB)
    rows = []
    for fs in (4 * MiB, 256 << 10):
        pieces = list(frames(buf, fs))
        t = best_of(lambda pieces=pieces: [hashlib.sha256(p).digest() for p in pieces])
        rows.append((f"sha256 (hashlib), {fs >> 10} KiB pieces", f"{len(buf) / t / 1e9:.2f}"))
    if blake3_path:
        sys.path.insert(0, blake3_path)
        try:
            import blake3
        except ImportError as exc:
            rows.append(("blake3", f"not importable: {exc}"))
        else:
            for fs in (4 * MiB, 256 << 10):
                pieces = list(frames(buf, fs))
                t = best_of(lambda pieces=pieces: [blake3.blake3(p).digest() for p in pieces])
                rows.append(
                    (f"blake3 (1 thread), {fs >> 10} KiB pieces", f"{len(buf) / t / 1e9:.2f}")
                )
    return rows


def zero_table() -> list[tuple[str, str]]:
    from barge.disk.chunker import is_zero_prefix
    from barge.disk.sparse import is_zero

    buf = bytearray(4 * MiB)
    n = 20
    t1 = best_of(lambda: [is_zero(buf) for _ in range(n)])
    t2 = best_of(lambda: [is_zero_prefix(buf, len(buf)) for _ in range(n)])
    return [
        ("sparse.is_zero (memoryview compare)", f"{n * len(buf) / t1 / 1e9:.1f}"),
        ("chunker.is_zero_prefix (bytearray.startswith)", f"{n * len(buf) / t2 / 1e9:.1f}"),
    ]


def index_table(disk: int = 200 << 30, chunk: int = 512 * MiB) -> list[tuple[str, str, str]]:
    rng = random.Random(1)
    rows = []
    for fs in FRAME_SIZES:
        chunks = []
        for off in range(0, disk, chunk):
            fl = []
            coff = 0
            for uoff in range(0, chunk, fs):
                cs = rng.randrange(fs // 4, fs // 2)
                fl.append(FrameInfo(uoff, fs, coff, cs, "sha256:" + rng.randbytes(32).hex(), False))
                coff += cs
            digest = "sha256:" + rng.randbytes(32).hex()
            chunks.append(
                ChunkMeta(
                    "disk.img",
                    off,
                    chunk,
                    digest,
                    coff,
                    "sha256:" + rng.randbytes(32).hex(),
                    fs,
                    "zstd",
                    tuple(fl),
                )
            )
        idx = FrameIndex.build({"disk.img": disk}, chunks, frame_size=fs)
        data = idx.to_bytes()
        t = time.perf_counter()
        FrameIndex.from_bytes(data)
        parse = time.perf_counter() - t
        rows.append(
            (f"{fs >> 10} KiB", f"{disk // fs}", f"{len(data) / 1e6:.2f} MB (parse {parse:.2f} s)")
        )
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows


def md(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus-mib", type=int, default=128)
    ap.add_argument("--random-mib", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--blake3-path", default=None)
    ap.add_argument("--skip-codecs", action="store_true")
    args = ap.parse_args()
    pin_one_core()
    print(f"# barge disk-format measurements ({os.cpu_count()} CPUs, 1 core pinned)\n")
    if not args.skip_codecs:
        text = corpus(args.corpus_mib * MiB)
        rnd = os.urandom(args.random_mib * MiB)
        rows = codec_table(text, f"/usr ({len(text) >> 20} MiB)", args.runs)
        rows += codec_table(rnd, f"random ({len(rnd) >> 20} MiB)", args.runs)
        hdr = ("data", "frame", "codec", "compress MB/s", "decompress MB/s", "ratio")
        print(md(hdr, rows) + "\n")
    print(md(("hash", "GB/s"), hash_table(args.blake3_path)) + "\n")
    print(md(("zero test, 4 MiB", "GB/s"), zero_table()) + "\n")
    print(md(("frame size", "frames (200 GiB)", "index JSON"), index_table()) + "\n")


if __name__ == "__main__":
    main()
