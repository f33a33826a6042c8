"""Machine limits, measured in the same run as the push/pull figures they bound.

    .venv/bin/python bench/limits.py [--small]

* disk read: the reference disk's data extents read sequentially (8 MiB preads), once after
  ``posix_fadvise(DONTNEED)`` on the file (cold, if the kernel drops the pages) and once warm;
* sha256: hashlib, one core, over 4 MiB buffers of the reference data;
* zstd-3, zstd-1, lz4: one-core compression of the reference data in 4 MiB frames (barge's
  frame size): input MB/s and ratio;
* registry intake: two parallel monolithic ``curl`` uploads (POST, then PUT ?digest= with the
  body streamed from the file) of a 1 GiB random blob into a fresh ``docker-registry``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lz4.frame  # noqa: E402
import zstandard  # noqa: E402

from common import OUT, GiB, MiB, Registry, rate, registry  # noqa: E402
from refdisk import Spec, build, data_extents, spec_for  # noqa: E402

FRAME = 4 * MiB


def read_disk(path: Path) -> dict[str, Any]:
    """Sequential read of the data extents: cold (after DONTNEED) and warm."""
    out: dict[str, Any] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        ext = data_extents(fd, size)
        buf = bytearray(8 * MiB)
        mv = memoryview(buf)
        for label in ("cold", "warm"):
            if label == "cold":
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            total = 0
            for off, n in ext:
                end = off + n
                while off < end:
                    got = os.preadv(fd, [mv[: min(len(buf), end - off)]], off)
                    if got <= 0:
                        break
                    off += got
                    total += got
            dt = time.perf_counter() - t0
            out[f"read_{label}_MBps"] = round(rate(total, dt), 1)
        out["read_bytes"] = total
    finally:
        os.close(fd)
    out["note"] = (
        "cold = after posix_fadvise(DONTNEED) on the file; the host may still cache the "
        "virtual disk, so cold is an upper bound for a real cold read"
    )
    return out


def sample(path: Path, spec: Spec, nbytes: int) -> bytes:
    """``nbytes`` of the reference data (holes skipped): half from the filesystem's data
    extents, half from the random part."""
    half = nbytes // 2
    fs = bytearray()
    fd = os.open(path, os.O_RDONLY)
    try:
        for off, n in data_extents(fd, spec.fs_size):
            if off >= spec.fs_size or len(fs) >= half:
                break
            fs += os.pread(fd, min(n, half - len(fs), spec.fs_size - off), off)
        off, n = spec.random_pieces[0]
        rnd = os.pread(fd, min(half, n), off)
    finally:
        os.close(fd)
    return bytes(fs) + rnd


def cpu_limits(data: bytes, fs_len: int) -> dict[str, Any]:
    mv = memoryview(data)
    frames = [mv[i : i + FRAME] for i in range(0, len(data), FRAME)]
    out: dict[str, Any] = {"sample_bytes": len(data)}

    t0 = time.perf_counter()
    for fr in frames:
        hashlib.sha256(fr).digest()
    out["sha256_MBps"] = round(rate(len(data), time.perf_counter() - t0), 1)

    codecs: list[tuple[str, Any]] = [
        ("zstd-3", zstandard.ZstdCompressor(level=3).compress),
        ("zstd-1", zstandard.ZstdCompressor(level=1).compress),
        ("lz4", lambda b: lz4.frame.compress(b, compression_level=0)),
    ]
    for name, fn in codecs:
        csize = cfs = 0
        t0 = time.perf_counter()
        for i, fr in enumerate(frames):
            n = len(fn(fr))
            csize += n
            if i * FRAME < fs_len:
                cfs += n
        dt = time.perf_counter() - t0
        out[f"{name}_MBps"] = round(rate(len(data), dt), 1)
        out[f"{name}_ratio"] = round(len(data) / csize, 3)
        out[f"{name}_ratio_fs"] = round(fs_len / max(1, cfs), 3)
    return out


def random_blob(size: int) -> tuple[Path, str]:
    """A cached random blob and its sha256 digest."""
    path = OUT / f"random-{size // MiB}m.blob"
    dig = path.with_suffix(".sha256")
    if path.exists() and dig.exists() and path.stat().st_size == size:
        return path, dig.read_text().strip()
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // (16 * MiB)):
            b = os.urandom(16 * MiB)
            h.update(b)
            f.write(b)
    digest = "sha256:" + h.hexdigest()
    dig.write_text(digest)
    return path, digest


def _post(reg: Registry, repo: str) -> str:
    r = subprocess.run(
        ["curl", "-sS", "-f", "-X", "POST", "-D", "-", "-o", "/dev/null",
         f"{reg.url}/v2/{repo}/blobs/uploads/"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    for line in r.stdout.splitlines():
        if line.lower().startswith("location:"):
            loc = line.split(":", 1)[1].strip()
            return loc if loc.startswith("http") else reg.url + loc
    raise RuntimeError(f"no Location in POST response:\n{r.stdout}")


def registry_intake(size: int = 1 * GiB, parallel: int = 2) -> dict[str, Any]:
    """Two parallel monolithic curl uploads of a random blob into a fresh registry."""
    path, digest = random_blob(size)
    with open(path, "rb") as f:  # warm the page cache: intake, not disk, is measured
        while f.read(16 * MiB):
            pass
    with registry("intake") as reg:
        locs = [_post(reg, f"bench/intake{i}") for i in range(parallel)]
        procs = []
        t0 = time.perf_counter()
        try:
            for loc in locs:
                sep = "&" if "?" in loc else "?"
                procs.append(
                    subprocess.Popen(
                        [
                            "curl",
                            "-sS",
                            "-f",
                            "-o",
                            "/dev/null",
                            "-X",
                            "PUT",
                            "-H",
                            "Content-Type: application/octet-stream",
                            "-H",
                            "Expect:",
                            "-T",
                            str(path),
                            f"{loc}{sep}digest={digest}",
                        ],
                        stdin=subprocess.DEVNULL,
                    )  # fmt: skip
                )
            codes = [p.wait(timeout=600) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=10)
        dt = time.perf_counter() - t0
        if any(codes):
            raise RuntimeError(f"curl uploads failed: {codes}")
    return {
        "intake_MBps": round(rate(size * parallel, dt), 1),
        "intake_seconds": round(dt, 2),
        "intake_bytes": size * parallel,
        "intake_parallel": parallel,
    }


def measure(spec: Spec, *, intake_size: int = 1 * GiB) -> dict[str, Any]:
    path = build(spec)
    out: dict[str, Any] = {}
    out.update(read_disk(path))
    n = min(512 * MiB, 2 * min(spec.fs_size, spec.random_pieces[0][1]))
    data = sample(path, spec, n)
    out.update(cpu_limits(data, len(data) - min(n // 2, spec.random_pieces[0][1])))
    del data
    out.update(registry_intake(intake_size))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    spec = spec_for(args.small)
    print(json.dumps(measure(spec, intake_size=256 * MiB if args.small else GiB), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
