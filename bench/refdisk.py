"""The benchmark's reference disk, cached under bench/out/ and rebuilt only when missing.

    .venv/bin/python bench/refdisk.py [--small] [--force]

* full (default): an 8 GiB sparse raw file holding about 2 GiB of data: an ext4 filesystem
  (``mke2fs -t ext4 -d``, no mount) in the first 2 GiB holding ~1 GiB of real files copied from
  /usr/share and /usr/lib (compressible), 1 GiB of ``os.urandom`` data in 4 pieces at
  scattered, unaligned offsets after it, and holes everywhere else;
* ``--small``: a 1 GiB disk with ~256 MiB of data in the same shape, to iterate quickly.

Version 2 (``v2_disk``) changes the reference the way a package upgrade does: ~192 MiB of new
file content in 6 clusters (3 over old file data, 3 in the filesystem's free space) plus 2048
4 KiB metadata writes (3 in 4 in the first 64 MiB, where ext4 keeps inode tables and
bitmaps, the rest scattered over the filesystem), ~200 MB in all.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT, GiB, KiB, MiB, fmt_bytes  # noqa: E402

V2_MODEL = 2  # bump when build_v2 changes, so the cached v2 disk is rebuilt
SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


@dataclass(frozen=True)
class Spec:
    name: str
    disk_size: int
    fs_size: int  # the ext4 filesystem at offset 0
    files_bytes: int  # real files copied into it
    random_pieces: tuple[tuple[int, int], ...]  # (offset, length)
    # version 2
    clusters: tuple[tuple[int, int], ...]  # (offset, length) of new file data
    meta_writes: int  # scattered 4 KiB writes inside the filesystem

    @property
    def random_bytes(self) -> int:
        return sum(n for _, n in self.random_pieces)


FULL = Spec(
    name="ref-8g",
    disk_size=8 * GiB,
    fs_size=2 * GiB,
    files_bytes=1 * GiB,
    random_pieces=(
        (2 * GiB + 300 * MiB, 256 * MiB),
        (3 * GiB + 700 * MiB, 256 * MiB),
        (5 * GiB + 100 * MiB, 256 * MiB),
        (7 * GiB + 333 * MiB, 256 * MiB),
    ),
    clusters=(
        (200 * MiB, 32 * MiB),
        (520 * MiB, 32 * MiB),
        (900 * MiB, 32 * MiB),
        (1300 * MiB, 32 * MiB),
        (1500 * MiB, 32 * MiB),
        (1800 * MiB, 32 * MiB),
    ),
    meta_writes=2048,
)

SMALL = Spec(
    name="ref-1g",
    disk_size=1 * GiB,
    fs_size=256 * MiB,
    files_bytes=128 * MiB,
    random_pieces=((300 * MiB, 64 * MiB), (700 * MiB, 64 * MiB)),
    clusters=((40 * MiB, 8 * MiB), (120 * MiB, 8 * MiB), (200 * MiB, 8 * MiB)),
    meta_writes=512,
)


def spec_for(small: bool) -> Spec:
    return SMALL if small else FULL


def disk_path(spec: Spec) -> Path:
    return OUT / f"{spec.name}.raw"


def v2_path(spec: Spec) -> Path:
    return OUT / f"{spec.name}-v2.raw"


def _real_files(roots: tuple[str, ...], quota: int) -> list[tuple[str, int]]:
    """Regular files under each root, in path order, up to quota / len(roots) bytes per root."""
    picked: list[tuple[str, int]] = []
    per_root = quota // len(roots)
    for root in roots:
        got = 0
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if not os.path.isfile(p) or os.path.islink(p) or st.st_size == 0:
                    continue
                if not os.access(p, os.R_OK):
                    continue
                picked.append((p, st.st_size))
                got += st.st_size
                if got >= per_root:
                    break
            if got >= per_root:
                break
    return picked


def _stage(files: list[tuple[str, int]], stage: Path) -> int:
    total = 0
    for src, _size in files:
        dst = stage / src.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(src, dst)
        except OSError:
            continue
        total += dst.stat().st_size
    return total


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the data regions of a sparse file (SEEK_DATA/SEEK_HOLE)."""
    out: list[tuple[int, int]] = []
    off = 0
    for _ in range(1 << 20):
        try:
            start = os.lseek(fd, off, SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, SEEK_HOLE)
        out.append((start, end - start))
        off = end
        if off >= size:
            break
    return out


def _write_random(fd: int, offset: int, length: int) -> None:
    step = 16 * MiB
    done = 0
    while done < length:
        n = min(step, length - done)
        os.pwrite(fd, os.urandom(n), offset + done)
        done += n


def build(spec: Spec, *, force: bool = False) -> Path:
    """Build the reference disk of ``spec`` if it is missing (or ``force``); return its path."""
    path = disk_path(spec)
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists() and not force:
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stage = OUT / f"{spec.name}-stage"
    shutil.rmtree(stage, ignore_errors=True)
    tmp = path.with_suffix(".tmp")
    try:
        (stage / "etc").mkdir(parents=True)
        files = _real_files(("/usr/share", "/usr/lib"), spec.files_bytes)
        staged = _stage(files, stage)
        shutil.copyfile("/etc/os-release", stage / "etc" / "os-release")
        tmp.unlink(missing_ok=True)
        with open(tmp, "wb") as f:
            f.truncate(spec.fs_size)
        subprocess.run(
            [
                "mke2fs",
                "-q",
                "-F",
                "-t",
                "ext4",
                "-L",
                "barge-bench",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1",
                "-d",
                str(stage),
                str(tmp),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=900,
        )
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.ftruncate(fd, spec.disk_size)
            for off, n in spec.random_pieces:
                _write_random(fd, off, n)
            os.fsync(fd)
            st = os.fstat(fd)
            ext = data_extents(fd, spec.disk_size)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        info = {
            "spec": asdict(spec),
            "staged_file_bytes": staged,
            "files": len(files),
            "allocated_bytes": st.st_blocks * 512,
            "data_bytes": sum(n for _, n in ext),
            "extents": len(ext),
            "build_seconds": round(time.perf_counter() - t0, 1),
        }
        meta.write_text(json.dumps(info, indent=2))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        tmp.unlink(missing_ok=True)
    v2_path(spec).unlink(missing_ok=True)
    v2_path(spec).with_suffix(".json").unlink(missing_ok=True)
    return path


def info(spec: Spec) -> dict[str, object]:
    return dict(json.loads(disk_path(spec).with_suffix(".json").read_text()))


def _new_file_data(length: int, skip: int) -> bytes:
    """Real file content (compressible) not in the reference: files after the picked ones."""
    out = bytearray()
    seen = 0
    for dirpath, dirnames, filenames in os.walk("/usr/lib"):
        dirnames.sort(reverse=True)  # the reference took /usr/lib in forward order
        for name in sorted(filenames, reverse=True):
            p = os.path.join(dirpath, name)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            try:
                data = Path(p).read_bytes()
            except OSError:
                continue
            seen += len(data)
            if seen <= skip:
                continue
            out += data[: length - len(out)]
            if len(out) >= length:
                return bytes(out)
    return bytes(out) + os.urandom(length - len(out))


def build_v2(spec: Spec, *, force: bool = False) -> Path:
    """Version 2 of the reference disk (a package upgrade's worth of change), cached."""
    src = build(spec)
    path = v2_path(spec)
    meta = path.with_suffix(".json")
    fresh = path.exists() and meta.exists() and not force
    if fresh and json.loads(meta.read_text()).get("model") == V2_MODEL:
        return path
    t0 = time.perf_counter()
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    subprocess.run(
        ["cp", "--sparse=always", "--reflink=auto", str(src), str(tmp)], check=True, timeout=600
    )
    rng = random.Random(20240601)
    fd = os.open(tmp, os.O_RDWR)
    try:
        total_new = sum(n for _, n in spec.clusters)
        data = _new_file_data(total_new, skip=0)
        pos = 0
        for off, n in spec.clusters:
            os.pwrite(fd, data[pos : pos + n], off)
            pos += n
        blocks = spec.fs_size // (4 * KiB)
        meta_blocks = min(blocks, 64 * MiB // (4 * KiB))
        for i in range(spec.meta_writes):
            # 3 in 4 land where ext4 (flex_bg) keeps inode tables, bitmaps and descriptors,
            # the first 64 MiB; the rest anywhere (directory and extent blocks)
            b = rng.randrange(meta_blocks) if i % 4 else rng.randrange(blocks)
            old = bytearray(os.pread(fd, 4 * KiB, b * 4 * KiB).ljust(4 * KiB, b"\0"))
            at = rng.randrange(0, 4 * KiB - 64)
            old[at : at + 64] = rng.randbytes(64)  # an inode, a bitmap word, a dirent
            os.pwrite(fd, bytes(old), b * 4 * KiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    diff = diff_blocks(src, path)
    meta.write_text(
        json.dumps(
            {
                "model": V2_MODEL,
                "changed_bytes_4k": diff["changed_bytes"],
                "changed_frames_4m": diff["frames_4m"],
                "changed_regions_512m": diff["regions_512m"],
                "build_seconds": round(time.perf_counter() - t0, 1),
            },
            indent=2,
        )
    )
    return path


def diff_blocks(a: Path, b: Path, block: int = 4 * KiB) -> dict[str, object]:
    """Bytes that differ between two disks at ``block`` granularity, and the 512 MiB regions
    holding them. Reads only the union of both files' data extents."""
    size = max(a.stat().st_size, b.stat().st_size)
    fa = os.open(a, os.O_RDONLY)
    fb = os.open(b, os.O_RDONLY)
    changed = 0
    regions: set[int] = set()
    frames: set[int] = set()
    step = 8 * MiB
    try:
        ext = sorted(data_extents(fa, size) + data_extents(fb, size))
        merged: list[list[int]] = []
        for off, n in ext:
            if merged and off <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], off + n)
            else:
                merged.append([off, off + n])
        for start, end in merged:
            off = start - start % block
            while off < end:
                n = min(step, end - off)
                x = os.pread(fa, n, off)
                y = os.pread(fb, n, off)
                if x != y:
                    x = x.ljust(n, b"\0")
                    y = y.ljust(n, b"\0")
                    for i in range(0, n, block):
                        if x[i : i + block] != y[i : i + block]:
                            changed += block
                            regions.add((off + i) // (512 * MiB))
                            frames.add((off + i) // (4 * MiB))
                off += n
    finally:
        os.close(fa)
        os.close(fb)
    return {"changed_bytes": changed, "frames_4m": len(frames), "regions_512m": sorted(regions)}


def v2_info(spec: Spec) -> dict[str, object]:
    return dict(json.loads(v2_path(spec).with_suffix(".json").read_text()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="1 GiB disk with ~256 MiB of data")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--v2", action="store_true", help="also build version 2")
    args = ap.parse_args()
    spec = spec_for(args.small)
    p = build(spec, force=args.force)
    i = info(spec)
    print(f"{p}: {fmt_bytes(spec.disk_size)} sparse, {fmt_bytes(int(i['data_bytes']))} data")  # type: ignore[call-overload]
    print(json.dumps(i, indent=2))
    if args.v2:
        p2 = build_v2(spec, force=args.force)
        print(f"{p2}: {json.dumps(v2_info(spec))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
