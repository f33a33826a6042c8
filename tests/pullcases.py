"""Differential cases for every pull path (tests/test_pull_differential.py, ``make fuzz``).

A :class:`Case` is two versions of an image (disks built from seeded edits: random data, text,
written zeros, punched holes, moved data; sizes grown or shrunk; barge, Tart or Vetu format;
chunk size, frame size and codec per version) and what happens between pulling v1 and v2: the
base barge picks or one forced on it, a pull killed part-way and its staging directory tampered
with, ``clone REF`` instead of ``pull``, v2 pulled from a ``barge copy`` of it.

:func:`run_case` publishes both versions (to a real registry or an OCI layout directory: the
same pull code reads both), pulls v2 fresh into an empty cache, pulls v1 then v2 into another,
and asserts that the incremental result, the fresh result and the source disks are the same
bytes, and that the two cached images hold the same files.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from unittest import mock

from barge.disk.index import FrameIndex
from barge.disk.sparse import punch_hole
from barge.local import create_vm
from barge.oci.layout import OCILayout
from barge.store import Disk, Store, VMConfig
from barge.transfer.clone import clone_image
from barge.transfer.copy import copy
from barge.transfer.decode_barge import BargeDecoding
from barge.transfer.layout import ArchiveReadEnd, LayoutEnd
from barge.transfer.pull import PullResult, pull
from barge.transfer.push import PushOptions, push
from barge.transfer.registry import RegistryEnd
from registries import RunningRegistry
from vmimages import TartChunk, push_tart, push_vetu, stored_stream

KiB = 1024
MiB = 1 << 20

#: Files of a cached image compared between the incremental and the fresh pull (config.json
#: apart: it names where the image came from).
SOURCE_FIELD = "source"


@dataclass(frozen=True)
class Edit:
    """One change to a disk: ``kind`` over ``[offset, offset + length)`` (clipped to the
    disk). ``random``/``text``: data from ``seed``; ``zeros``: zero bytes written (allocated);
    ``hole``: punched out (a trimmed region); ``copy``: the bytes at ``source`` copied here
    (data that moved)."""

    kind: str
    offset: int
    length: int
    source: int = 0
    seed: int = 0


@dataclass(frozen=True)
class DiskSpec:
    name: str
    size: int
    edits: tuple[Edit, ...] = ()


@dataclass(frozen=True)
class Version:
    """One image version. v2's disk of a name v1 also has starts as v1's disk, cut or grown
    to its size, then edited."""

    disks: tuple[DiskSpec, ...]
    fmt: str = "barge"  # "barge", "tart" (one disk, disk.img) or "vetu"
    chunk_size: int = 1 * MiB
    frame_size: int = 256 * KiB
    codec: str = "zstd"
    tart_offsets: bool = True  # Tart: layers carry dev.barge.disk.offset (else placed by order)


@dataclass(frozen=True)
class Tamper:
    """Damage done to the staging directory a killed pull left. ``bytes``: random bytes at
    ``offset`` of disk ``disk`` (an index into v2's disks; the file is made if missing);
    ``grow``: junk appended past the disk's end; ``shrink``: the file cut to ``offset``;
    ``junk``: stray files and a directory; ``symlink``: the disk replaced by a link to a file
    outside (which must stay untouched)."""

    kind: str
    disk: int = 0
    offset: int = 0
    length: int = 4096
    seed: int = 0


@dataclass(frozen=True)
class Case:
    v1: Version
    v2: Version
    base: str = "auto"  # "auto": barge picks; "forced": v1's cache entry is the base
    kill_after: int | None = None  # blob bytes read before the first pull of v2 is killed
    tamper: tuple[Tamper, ...] = ()  # applied to the staging directory after the kill
    clone: bool = False  # v2 through clone_image (``barge clone REF``)
    copy: bool = False  # v2 pulled from a ``barge copy`` of it into another layout
    expect_base: bool | None = None  # named cases: whether the pull must have used a base
    expect_kill: bool = False  # named cases: the kill must land before the pull ends


@dataclass
class Target:
    """Where versions are published: a real registry, or an OCI layout directory."""

    registry: RunningRegistry | None = None
    layout_dir: Path | None = None
    repo: str = "diff/vm"
    _layout: OCILayout | None = field(default=None, repr=False)

    def ref(self, tag: str) -> str:
        if self.registry is not None:
            return f"{self.registry.host}/{self.repo}:{tag}"
        assert self.layout_dir is not None
        return f"oci:{self.layout_dir}:{tag}"

    @property
    def sink(self) -> RunningRegistry | OCILayout:
        if self.registry is not None:
            return self.registry
        if self._layout is None:
            assert self.layout_dir is not None
            self._layout = OCILayout(self.layout_dir, create=True)
        return self._layout


# -- disks ------------------------------------------------------------------------------------


def _apply(fd: int, size: int, e: Edit) -> None:
    off = min(e.offset, size)
    n = min(e.length, size - off)
    if n <= 0:
        return
    if e.kind == "random":
        os.pwrite(fd, random.Random(e.seed).randbytes(n), off)
    elif e.kind == "text":
        line = b"barge differential pull test, line %d\n" % e.seed
        os.pwrite(fd, (line * (n // len(line) + 1))[:n], off)
    elif e.kind == "zeros":
        os.pwrite(fd, bytes(n), off)
    elif e.kind == "hole":
        if not punch_hole(fd, off, n):
            os.pwrite(fd, bytes(n), off)
    elif e.kind == "copy":
        src = min(e.source, size)
        data = os.pread(fd, min(n, size - src), src)
        os.pwrite(fd, data, off)
    else:
        raise AssertionError(f"unknown edit {e.kind!r}")


def write_disk(path: Path, history: list[DiskSpec]) -> None:
    """Build a disk by replaying its versions' sizes and edits."""
    with open(path, "wb"):
        pass
    fd = os.open(path, os.O_RDWR)
    try:
        for spec in history:
            os.ftruncate(fd, spec.size)
            for e in spec.edits:
                _apply(fd, spec.size, e)
    finally:
        os.close(fd)


def build_disks(case: Case, work: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Every disk of v1 and of v2, as (sparse) files under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    v1 = {d.name: d for d in case.v1.disks}
    one = {d.name: work / f"v1-{d.name}" for d in case.v1.disks}
    for d in case.v1.disks:
        write_disk(one[d.name], [d])
    two = {d.name: work / f"v2-{d.name}" for d in case.v2.disks}
    for d in case.v2.disks:
        write_disk(two[d.name], [v1[d.name], d] if d.name in v1 else [d])
    return one, two


# -- publishing -------------------------------------------------------------------------------


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def publish(v: Version, disks: dict[str, Path], target: Target, tag: str, store: Store) -> str:
    """Publish one version at ``target`` under ``tag``; returns the reference to pull. A
    barge version's disk files are moved into a local VM (holes and written zeros kept as
    they are) and pushed."""
    ref = target.ref(tag)
    if v.fmt == "barge":
        name = f"src-{tag}"
        create_vm(store, name, disk_size=v.disks[0].size)
        vm = store.get_vm(name)
        os.unlink(vm.path / "disk.img")
        for d in v.disks:
            os.replace(disks[d.name], vm.path / d.name)
        doc = vm.config.to_dict()
        doc["disks"] = [Disk(d.name, d.size).to_dict() for d in v.disks]
        store.write_config(vm, VMConfig(doc))
        opts = PushOptions(chunk_size=v.chunk_size, frame_size=v.frame_size, codec=v.codec)
        push(store, name, [ref], opts)
    elif v.fmt == "tart":
        assert [d.name for d in v.disks] == ["disk.img"], "a Tart image has one disk, disk.img"
        data = disks["disk.img"].read_bytes()
        chunks = [TartChunk(stored_stream(p), p) for p in _pieces(data, v.chunk_size)]
        push_tart(target.sink, target.repo, tag, chunks, offsets=v.tart_offsets, os_name="linux")
    elif v.fmt == "vetu":
        parts = {d.name: _pieces(disks[d.name].read_bytes(), v.chunk_size) for d in v.disks}
        push_vetu(target.sink, target.repo, tag, parts)
    else:
        raise AssertionError(f"unknown format {v.fmt!r}")
    return ref


# -- a pull killed part-way -------------------------------------------------------------------


class Killed(BaseException):
    """Raised out of a blob stream to stop a pull dead (a BaseException, as nothing in barge
    should catch a kill)."""


class _Budget:
    def __init__(self, n: int) -> None:
        import threading

        self.left = n
        self.lock = threading.Lock()

    def take(self, n: int) -> int:
        with self.lock:
            if self.left <= 0:
                raise Killed
            k = min(n, self.left)
            self.left -= k
            return k


class _KilledStream(io.RawIOBase):
    """A blob stream that dies once the shared budget of bytes is spent."""

    def __init__(self, src: BinaryIO, budget: _Budget) -> None:
        super().__init__()
        self.src = src
        self.budget = budget

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b)
        k = self.budget.take(len(view))
        data = self.src.read(k)
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.src.close()
        super().close()


def killed_pull(store: Store, ref: str, budget: int) -> bool:
    """Pull ``ref``, killing it once ``budget`` bytes of blob streams were read; True when the
    kill landed (False: the pull finished first)."""
    b = _Budget(budget)

    def wrap(orig: Any) -> Any:
        def open_blob(self: Any, digest: str, offset: int = 0) -> BinaryIO:
            return _KilledStream(orig(self, digest, offset), b)  # type: ignore[return-value]

        return open_blob

    with (
        mock.patch.object(LayoutEnd, "open_blob", wrap(LayoutEnd.open_blob)),
        mock.patch.object(ArchiveReadEnd, "open_blob", wrap(ArchiveReadEnd.open_blob)),
        mock.patch.object(RegistryEnd, "open_blob", wrap(RegistryEnd.open_blob)),
    ):
        try:
            pull(store, ref)
        except Killed:
            return True
    return False


def tamper(store: Store, digest: str, v2: Version, ops: tuple[Tamper, ...], work: Path) -> Path:
    """Damage (or make) the staging directory of the pull of ``digest``; returns the victim
    file a ``symlink`` tamper points at."""
    staging = store.tmp_dir / f"pull-{digest.removeprefix('sha256:')}"
    staging.mkdir(parents=True, exist_ok=True)
    victim = work / "victim.bin"
    victim.write_bytes(b"must stay as it is\n" * 100)
    for t in ops:
        spec = v2.disks[t.disk % len(v2.disks)]
        path = staging / spec.name
        if t.kind in ("bytes", "grow", "shrink") and path.is_symlink():
            continue  # a symlink tamper came first: leave it (and its target) as it is
        if t.kind in ("bytes", "grow", "shrink") and not path.is_file():
            path.unlink(missing_ok=True)
            with open(path, "wb") as f:
                f.truncate(spec.size)
        if t.kind == "bytes":
            with open(path, "r+b") as f:
                f.seek(t.offset % max(1, spec.size + 8192))
                f.write(random.Random(t.seed).randbytes(max(1, t.length)))
        elif t.kind == "grow":
            with open(path, "ab") as f:
                f.write(random.Random(t.seed).randbytes(max(1, t.length)))
        elif t.kind == "shrink":
            os.truncate(path, t.offset % max(1, spec.size))
        elif t.kind == "junk":
            (staging / "junk.bin").write_bytes(b"junk")
            (staging / "junkdir").mkdir(exist_ok=True)
            (staging / "junkdir" / "x").write_bytes(b"x")
        elif t.kind == "symlink":
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            path.symlink_to(victim)
        else:
            raise AssertionError(f"unknown tamper {t.kind!r}")
    return victim


@contextmanager
def forced_base(base: PullResult) -> Iterator[None]:
    """Make the pull use ``base`` as its base image whatever it shares with the new one."""
    index = FrameIndex.from_bytes((base.path / "index.json").read_bytes())
    with mock.patch.object(BargeDecoding, "_find_base", lambda self, idx: (base.path, index)):
        yield


# -- checks -----------------------------------------------------------------------------------


def _image_files(path: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(path.iterdir()):
        assert p.is_file() and not p.is_symlink(), f"{p} is not a plain file"
        data = p.read_bytes()
        if p.name == "config.json":
            doc = json.loads(data)
            doc.pop(SOURCE_FIELD, None)
            data = json.dumps(doc, sort_keys=True).encode()
        out[p.name] = data
    return out


def assert_disks(where: Path, disks: dict[str, bytes], what: str) -> None:
    for name, want in disks.items():
        got = (where / name).read_bytes()
        if got != want:
            bad = next(
                (i for i in range(min(len(got), len(want))) if got[i] != want[i]),
                min(len(got), len(want)),
            )
            raise AssertionError(
                f"{what}: disk {name!r} differs from the source from byte {bad} "
                f"({len(got)} vs {len(want)} bytes)"
            )


def run_case(case: Case, work: Path, target: Target) -> list[str]:
    """Run one case end to end (see the module docstring); raises AssertionError on any
    difference. Returns what happened, as labels (for hypothesis' statistics)."""
    files1, files2 = build_disks(case, work / "disks")
    one = {n: p.read_bytes() for n, p in files1.items()}
    two = {n: p.read_bytes() for n, p in files2.items()}
    src = Store(work / "src-home")
    ref1 = publish(case.v1, files1, target, "v1", src)
    ref2 = publish(case.v2, files2, target, "v2", src)

    fresh = pull(Store(work / "fresh-home"), ref2)
    assert_disks(fresh.path, two, "fresh pull of v2")

    store = Store(work / "inc-home")
    first = pull(store, ref1)
    assert_disks(first.path, one, "pull of v1")
    ref = ref2
    if case.copy:
        ref = f"oci:{work / 'copied'}:v2"
        copy(src, ref2, ref)
    force = case.base == "forced" and case.v1.fmt == "barge"
    victim = None
    killed = False
    with forced_base(first) if force else nullcontext():
        if case.kill_after is not None:
            killed = killed_pull(store, ref, case.kill_after)
            if case.expect_kill:
                assert killed, "the kill should land before the pull ends"
            if killed:
                victim = tamper(store, fresh.digest, case.v2, case.tamper, work)
        if case.clone:
            res, cloned = clone_image(store, ref, "clone")
            assert_disks(cloned.vm.path, two, "clone REF of v2")
        else:
            res = pull(store, ref)
    assert res.digest == fresh.digest
    assert_disks(res.path, two, "incremental pull of v2")
    assert _image_files(res.path) == _image_files(fresh.path), "the cached images differ"
    assert not list(store.tmp_dir.glob("pull-*")), "a staging directory was left behind"
    if victim is not None:
        assert victim.read_bytes() == b"must stay as it is\n" * 100, "wrote through a symlink"
    if case.expect_base is not None and case.kill_after is None:
        assert (res.base is not None) == case.expect_base, f"base used: {res.base}"
    return [
        f"{case.v1.fmt} -> {case.v2.fmt}",
        "resumed a killed pull" if killed else "base used" if res.base else "no base",
        *(["forced base"] if force else []),
        *(["tampered"] if killed and case.tamper else []),
        *(["clone REF"] if case.clone else []),
        *(["from a copy"] if case.copy else []),
    ]
