"""Verify: prove an image intact, wherever it is.

* A registry image or an OCI layout (``oci:``/``oci-archive:``): every blob of every manifest
  (every child of an index) is read in full, its size and sha256 checked against its
  descriptor. With ``deep``, barge chunks are also decompressed frame by frame, each frame and
  each chunk checked against its uncompressed digest, the frame index validated (offsets on the
  frame grid, no overlaps, every layer indexed and every indexed chunk a layer); Tart chunks
  (Apple LZ4) and Vetu chunks (LZ4 frames) are decoded and checked against their
  uncompressed-digest annotations. Decoded bytes go to ``/dev/null``: nothing is stored.
* A local VM: its config is valid and every disk is present with its declared size.
* A cached image: the same, plus its manifest hashes to its digest and, for a barge image,
  every frame of every disk hashes to what the stored frame index says.

Faults are collected (the first is the verdict); anything else (network, auth) is raised.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from barge.cache import find_cached
from barge.disk.decoder import DecodeBuffers, decode_chunk
from barge.disk.index import ChunkMeta, FrameIndex, zero_digest
from barge.disk.sparse import data_extents
from barge.disk.streams import stream_decoder
from barge.errors import IntegrityError, NotFoundError, UnsupportedError
from barge.formats import detect_format
from barge.formats.tart import REORDERED_MESSAGE, parse_tart_manifest
from barge.formats.vetu import parse_vetu_manifest
from barge.image import MAX_SMALL_BLOB, parse_barge_manifest
from barge.oci.types import Descriptor, Manifest
from barge.progress import NullReporter, Reporter, Task
from barge.store import Store, VMConfig
from barge.transfer.end import End
from barge.transfer.open import Ends, is_vm_name
from barge.units import format_size
from barge.untrusted import load_json

READ_SIZE = 1 << 20
MAX_FAULTS = 100
MAX_INDEX_DEPTH = 4


@dataclass(frozen=True)
class Fault:
    """One thing wrong with an image: what (a blob, a manifest, a disk) and why."""

    what: str  # "blob sha256:…", "manifest sha256:…", "disk disk.img"
    message: str

    def __str__(self) -> str:
        return f"{self.what}: {self.message}"


@dataclass
class VerifyReport:
    """What a verification found: what was checked (blobs, bytes, frames) and every fault
    (``ok`` when none; :meth:`verdict` is the one-line summary)."""

    target: str
    kind: str  # "registry" | "oci" | "oci-archive" | "vm" | "cache"
    deep: bool = False
    digest: str | None = None
    formats: list[str] = field(default_factory=list)
    manifests: int = 0
    blobs: int = 0
    bytes: int = 0
    frames: int = 0
    faults: list[Fault] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.faults

    def verdict(self) -> str:
        if self.ok:
            what = "blobs" if self.kind not in ("vm", "cache") else "files"
            extra = f", {self.frames} frames" if self.frames else ""
            return (
                f"OK: {self.blobs} {what}{extra}, {format_size(self.bytes)} "
                f"({self.bytes} bytes) verified"
            )
        more = f" (and {len(self.faults) - 1} more)" if len(self.faults) > 1 else ""
        return f"FAILED: {self.faults[0]}{more}"

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "kind": self.kind,
            "ok": self.ok,
            "deep": self.deep,
            "digest": self.digest,
            "formats": self.formats,
            "manifests": self.manifests,
            "blobs": self.blobs,
            "bytes": self.bytes,
            "frames": self.frames,
            "faults": [{"what": f.what, "message": f.message} for f in self.faults],
            "verdict": self.verdict(),
        }


class _Hashing:
    """Read through ``src``, hashing and counting every byte."""

    def __init__(self, src: BinaryIO) -> None:
        self.src = src
        self.h = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        self.h.update(data)
        self.count += len(data)
        return data

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        data = self.src.read(len(view))
        k = len(data)
        view[:k] = data
        self.h.update(data)
        self.count += k
        return k

    def drain(self) -> None:
        while self.read(READ_SIZE):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.h.hexdigest()


class _Verifier:
    def __init__(
        self, end: End, report: VerifyReport, *, deep: bool, concurrency: int, reporter: Reporter
    ) -> None:
        self.end = end
        self.report = report
        self.deep = deep
        self.concurrency = 1 if end.serial else concurrency
        self.reporter = reporter
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._null = -1

    def fault(self, what: str, message: str) -> None:
        with self._lock:
            if len(self.report.faults) < MAX_FAULTS:
                self.report.faults.append(Fault(what, message))

    def _add(self, blobs: int = 0, nbytes: int = 0, frames: int = 0) -> None:
        with self._lock:
            self.report.blobs += blobs
            self.report.bytes += nbytes
            self.report.frames += frames

    def run(self, manifest: Manifest) -> None:
        self._null = os.open(os.devnull, os.O_WRONLY)
        try:
            self.manifest(manifest, 0)
        finally:
            os.close(self._null)

    def manifest(self, m: Manifest, depth: int) -> None:
        self.report.manifests += 1
        what = f"manifest {m.digest}"
        if m.is_index:
            if depth >= MAX_INDEX_DEPTH:
                self.fault(what, "image indexes nested too deeply")
                return
            try:
                children = m.index().manifests
            except ValueError as e:
                self.fault(what, f"invalid index: {e}")
                return
            for d in children:
                try:
                    child = self.end.get_manifest(d.digest)
                except (IntegrityError, NotFoundError) as e:
                    self.fault(f"manifest {d.digest}", e.message)
                    continue
                if child.size != d.size:
                    self.fault(
                        f"manifest {d.digest}", f"{child.size} bytes, the index says {d.size}"
                    )
                self.manifest(child, depth + 1)
            return
        try:
            doc = m.json()
            im = m.image()
        except ValueError as e:
            self.fault(what, f"invalid manifest: {e}")
            return
        fmt = detect_format(doc)
        if fmt not in self.report.formats:
            self.report.formats.append(fmt)
        if fmt == "tart":
            fault = _tart_fault(doc)
            if fault is not None and (not self.deep or fault == REORDERED_MESSAGE):
                self.fault(what, fault)  # with --deep, deep_checks reports a malformed one
        deep: dict[str, Callable[[BinaryIO], int]] = {}
        if self.deep:
            try:
                deep = self.deep_checks(fmt, doc)
            except (IntegrityError, UnsupportedError, NotFoundError) as e:
                self.fault(what, e.message)
        blobs: dict[str, Descriptor] = {}
        for d in (im.config, *im.layers):
            if not d.urls:
                blobs.setdefault(d.digest, d)
        todo = [d for d in blobs.values() if d.digest not in self._seen]
        self._seen.update(d.digest for d in todo)
        task = self.reporter.task(f"verifying {m.digest[:19]}", sum(d.size for d in todo))
        if self.concurrency <= 1:
            for d in todo:
                self.blob(d, deep.get(d.digest), task)
        else:
            with ThreadPoolExecutor(self.concurrency, thread_name_prefix="verify") as pool:
                list(pool.map(lambda d: self.blob(d, deep.get(d.digest), task), todo))

    def blob(self, d: Descriptor, check: Callable[[BinaryIO], int] | None, task: Task) -> None:
        what = f"blob {d.digest}"
        try:
            with self.end.open_blob(d.digest) as raw:
                src = _Hashing(raw)
                frames = check(src) if check is not None else 0  # type: ignore[arg-type]
                while True:
                    piece = src.read(READ_SIZE)
                    if not piece:
                        break
                    task.advance(len(piece))
        except (IntegrityError, NotFoundError) as e:
            self.fault(what, e.message)
            return
        if src.count != d.size:
            self.fault(what, f"{src.count} bytes, its descriptor says {d.size}")
            return
        if src.digest != d.digest:
            self.fault(what, f"content hashes to {src.digest}")
            return
        self._add(blobs=1, nbytes=d.size, frames=frames)

    # -- deep checks per format ------------------------------------------------------------
    def deep_checks(self, fmt: str, doc: dict[str, Any]) -> dict[str, Callable[[BinaryIO], int]]:
        if fmt == "barge":
            return self._deep_barge(doc)
        if fmt in ("tart", "vetu"):
            return self._deep_streams(fmt, doc)
        return {}

    def _read_small(self, digest: str, limit: int) -> bytes:
        return self.end.read_blob(digest, limit)

    def _deep_barge(self, doc: dict[str, Any]) -> dict[str, Callable[[BinaryIO], int]]:
        img = parse_barge_manifest(doc)
        index = FrameIndex.from_bytes(self._read_small(img.index.digest, 256 << 20))
        img.check_index(index)
        cfg = VMConfig.from_bytes(self._read_small(img.vm_config.digest, MAX_SMALL_BLOB))
        if {d.name: d.size for d in cfg.disks} != {d.name: d.size for d in index.disks}:
            raise IntegrityError("the VM config and the disk index disagree on disks and sizes")
        by_digest: dict[str, ChunkMeta] = {}
        for c in index.chunks:
            by_digest.setdefault(c.digest, c)
        tls = threading.local()
        null = self._null

        def make(meta: ChunkMeta) -> Callable[[BinaryIO], int]:
            def check(src: BinaryIO) -> int:
                bufs = getattr(tls, "bufs", None)
                if bufs is None or not bufs.fits(meta.frame_size):
                    bufs = tls.bufs = DecodeBuffers(meta.frame_size)
                decode_chunk(src, null, meta, buffers=bufs, verify_layer=False, sparse=True)
                return len(meta.frames)

            return check

        return {digest: make(meta) for digest, meta in by_digest.items()}

    def _deep_streams(self, fmt: str, doc: dict[str, Any]) -> dict[str, Callable[[BinaryIO], int]]:
        chunks: list[Any]
        if fmt == "tart":
            chunks = list(parse_tart_manifest(doc).disk_chunks)
        else:
            chunks = [c for d in parse_vetu_manifest(doc).disks for c in d.chunks]
        decoder = stream_decoder(fmt)

        def make(usize: int, udigest: str, digest: str) -> Callable[[BinaryIO], int]:
            def check(src: BinaryIO) -> int:
                h = hashlib.sha256()
                n = 0
                for piece in decoder(src, expected_size=usize):
                    h.update(piece)
                    n += len(piece)
                got = "sha256:" + h.hexdigest()
                if got != udigest:
                    raise IntegrityError(
                        f"decodes to {got} ({n} bytes), its annotation says {udigest}"
                    )
                return 1

            return check

        return {c.descriptor.digest: make(c.size, c.digest, c.descriptor.digest) for c in chunks}


def verify_end(
    end: End,
    manifest: Manifest,
    target: str,
    *,
    deep: bool = False,
    concurrency: int = 4,
    reporter: Reporter | None = None,
) -> VerifyReport:
    """Verify ``manifest`` (and, for an index, every child) and every blob it names."""
    kind = end.ref.scheme if end.ref is not None else "registry"
    report = VerifyReport(target, kind, deep, manifest.digest)
    _Verifier(
        end, report, deep=deep, concurrency=concurrency, reporter=reporter or NullReporter()
    ).run(manifest)
    return report


# ---------------------------------------------------------------------------------------------
# local VMs and cached images


def verify_dir(path: Path, target: str, kind: str, *, digest: str | None = None) -> VerifyReport:
    """A VM directory (local VM or cache entry): config, disks, and (cache) the frame index."""
    report = VerifyReport(target, kind, digest=digest)
    try:
        cfg = VMConfig.from_bytes((path / "config.json").read_bytes())
    except FileNotFoundError:
        report.faults.append(Fault("config.json", "missing"))
        return report
    except (ValueError, IntegrityError) as e:
        report.faults.append(Fault("config.json", f"invalid: {e}"))
        return report
    except Exception as e:  # VMConfig raises BargeError subclasses for bad content
        report.faults.append(Fault("config.json", f"invalid: {e}"))
        return report
    report.blobs += 1
    for d in cfg.disks:
        p = path / d.name
        try:
            st = os.stat(p)
        except FileNotFoundError:
            report.faults.append(Fault(f"disk {d.name}", "missing"))
            continue
        if st.st_size != d.size:
            report.faults.append(
                Fault(f"disk {d.name}", f"{st.st_size} bytes, the config declares {d.size}")
            )
            continue
        report.blobs += 1
    if kind != "cache":
        report.bytes = sum(d.size for d in cfg.disks)
        return report
    mpath = path / "manifest.json"
    if digest is not None:
        try:
            got = "sha256:" + hashlib.sha256(mpath.read_bytes()).hexdigest()
        except FileNotFoundError:  # every pull writes it: its absence is damage
            report.faults.append(Fault(f"manifest {digest}", "manifest.json is missing"))
        else:
            if got != digest:
                report.faults.append(Fault(f"manifest {digest}", f"manifest.json hashes to {got}"))
    fmt = (cfg.source or {}).get("format")
    if fmt:
        report.formats.append(str(fmt))
    if fmt == "tart" and mpath.is_file():
        try:
            fault = _tart_fault(load_json(mpath.read_bytes(), "manifest.json"))
        except IntegrityError as e:
            fault = e.message
        if fault is not None:
            report.faults.append(Fault(f"manifest {digest}", fault))
    ipath = path / "index.json"
    if not ipath.exists():
        if fmt == "barge":  # a barge pull always stores its frame index
            report.faults.append(Fault("index.json", "missing: the frames cannot be checked"))
        report.bytes = sum(d.size for d in cfg.disks)
        return report
    try:
        index = FrameIndex.from_bytes(ipath.read_bytes())
    except (IntegrityError, UnsupportedError) as e:
        report.faults.append(Fault("index.json", e.message))
        return report
    if {d.name: d.size for d in cfg.disks} != {d.name: d.size for d in index.disks}:
        report.faults.append(Fault("index.json", "disagrees with config.json on disks and sizes"))
        return report
    if report.faults:
        return report
    for disk in index.disks:
        fd = os.open(path / disk.name, os.O_RDONLY)
        try:
            for fr in disk.iter_frames():
                ok, got = _frame_ok(fd, fr.offset, fr.usize, fr.digest, fr.zero)
                report.frames += 1
                report.bytes += fr.usize
                if not ok:
                    report.faults.append(
                        Fault(
                            f"disk {disk.name}",
                            f"frame at offset {fr.offset} ({fr.usize} bytes) hashes to {got}, "
                            f"the index says {fr.digest}",
                        )
                    )
                    if len(report.faults) >= MAX_FAULTS:
                        return report
        finally:
            os.close(fd)
    return report


def _tart_fault(doc: Any) -> str | None:
    """Why a Tart manifest is not right for both readers (barge's and Tart's), or None."""
    try:
        img = parse_tart_manifest(doc)
    except (IntegrityError, UnsupportedError) as e:
        return e.message
    return REORDERED_MESSAGE if img.reordered else None


def _frame_ok(fd: int, off: int, n: int, digest: str, zero: bool) -> tuple[bool, str]:
    extents = list(data_extents(fd, off, off + n))
    if not extents:
        z = zero_digest(n)
        return z == digest, z
    data = os.pread(fd, n, off)
    if len(data) != n:
        return False, f"a short read ({len(data)} bytes)"
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    return got == digest, got


def verify(
    store: Store,
    text: str,
    *,
    deep: bool = False,
    insecure: bool = False,
    concurrency: int = 4,
    remote: bool = False,
    platform: str | None = None,
    reporter: Reporter | None = None,
) -> VerifyReport:
    """Verify a local VM (by name), a cached image (a reference that is cached, unless
    ``remote``), an image in a registry, or an OCI layout."""
    if is_vm_name(text):
        vm = store.get_vm(text)
        with store.lock_vm(vm.name, shared=True):
            return verify_dir(vm.path, text, "vm")
    if not remote:  # the cached copy, if any
        rows = find_cached(store, text)
        if rows:
            digest = rows[0][3]
            with store.lease("verify") as lease_id:
                store.catalog.lease_add(lease_id, "image", [digest])
                lock = store.image_lock(digest, shared=True, wait=True)
                try:
                    path = store.image_path(digest)
                    if not path.is_dir():
                        raise NotFoundError(f"cached image {digest} is gone; pull it again")
                    return verify_dir(path, text, "cache", digest=digest)
                finally:
                    lock.release()
    with Ends(store, insecure=insecure) as ends:
        src = ends.open(text, "source", "verify")
        m = src.manifest(platform)
        return verify_end(src.end, m, text, deep=deep, concurrency=concurrency, reporter=reporter)


def report_json(reports: list[VerifyReport]) -> str:
    return json.dumps([r.to_json() for r in reports], indent=2)


__all__ = ["Fault", "VerifyReport", "verify", "verify_dir", "verify_end"]
