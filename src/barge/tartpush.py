"""Push a local VM in Tart's format (``barge push NAME REF --format tart``).

What Tart's pull accepts (``shared/FORMAT.md`` §1, :mod:`barge.formats.tart`): an OCI manifest
whose layers are one Tart VM config, the disk cut into consecutive chunks (512 MiB by default,
the last shorter), each one Apple LZ4 stream, and exactly one NVRAM layer. Tart places chunk
*i* after chunks ``0..i-1``, so **every** region is a layer, all-zero ones included. barge adds
``dev.barge.disk.offset`` to each disk layer (Tart ignores it; barge then reads the image
order-independently).

Reuse follows barge's rule, *never send a byte the destination has*: each chunk is hashed
first (holes unread; nothing at all when the disk file is unchanged since the last push) and
its uncompressed digest looked up in the chunk index under codec ``applelz4``, frame size 0
and Tart's disk media type. A pull of a Tart image records every chunk there, so re-pushing a
clone of a pulled Tart image finds every original layer: HEAD (or a mount) instead of
compressing and uploading. Only unknown chunks are compressed, into a spool file under the
store's ``tmp/`` (bounded memory), and uploaded from it.

Files a pulled Tart image keeps in the VM directory make a re-push reproduce it: the VM config
layer (``tart-config.json``), the NVRAM (``nvram.bin``) and the OCI config with its labels
(``oci-config.json``). Without a VM config barge builds one from its own config (Linux only),
and says so. Without an NVRAM it refuses: Tart's pull needs an NVRAM layer, and the only thing
barge could put there, a zero-filled file, is almost certainly not an EFI variable store
Virtualization.framework accepts (it is created by ``VZEFIVariableStore(creatingVariableStoreAt:)``
in an undocumented format). ``PushOptions.placeholder_nvram`` (``--placeholder-nvram``) pushes
that zero-filled file anyway, for a VM whose NVRAM will be replaced on the Mac.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from barge import cancel
from barge.disk.applelz4 import AppleLZ4Encoder
from barge.disk.chunker import ChunkDigests, ChunkPlan, hash_chunk
from barge.disk.sizing import DEFAULT_FRAME_SIZE, format_size
from barge.disk.sparse import data_extents
from barge.errors import IntegrityError, LimitError, UnsupportedError, UsageError
from barge.formats import BlobDescriptor
from barge.formats import tart as tartfmt
from barge.image import Blob
from barge.oci.errors import LayerLimitExceeded
from barge.oci.types import OCI_CONFIG, OCI_MANIFEST, sha256_digest
from barge.store import VM
from barge.store.catalog import ChunkRow
from barge.store.vmconfig import OCI_ARCH
from barge.untrusted import load_json

if TYPE_CHECKING:
    from barge.push import Pusher, PushResult, _Target

#: The chunk-index codec of a Tart disk layer (one Apple LZ4 stream; no frames: size 0).
CODEC = "applelz4"
#: Files of a VM directory that become Tart's VM config, NVRAM and OCI config.
TART_CONFIG_FILE = "tart-config.json"
NVRAM_FILE = "nvram.bin"
OCI_CONFIG_FILE = "oci-config.json"
TART_FILES = frozenset({TART_CONFIG_FILE, NVRAM_FILE, OCI_CONFIG_FILE})
#: Files that are metadata of a cached image, never part of a VM.
_CACHE_METADATA = frozenset({"config.json", "manifest.json", "index.json"})
#: Disk bytes read (and fed to the encoder) at a time: memory stays bounded.
READ_SIZE = 1 << 20
_ZEROS = bytes(READ_SIZE)

__all__ = ["CODEC", "TartPush", "encode_chunk_stream", "push_tart"]


def encode_chunk_stream(fd: int, offset: int, length: int, out: BinaryIO) -> tuple[str, int]:
    """Compress ``[offset, offset+length)`` of ``fd`` as one Apple LZ4 stream into ``out``;
    holes are not read (they are fed as zeros). Returns ``(layer digest, layer size)``."""
    enc = AppleLZ4Encoder()
    h = hashlib.sha256()
    size = 0

    def emit(data: bytes) -> None:
        nonlocal size
        if data:
            out.write(data)
            h.update(data)
            size += len(data)

    end = offset + length
    pos = offset
    extents = [(o, o + n) for o, n in data_extents(fd, offset, end)] + [(end, end)]
    for data_start, data_end in extents:
        while pos < data_start:  # a hole
            n = min(READ_SIZE, data_start - pos)
            emit(enc.write(memoryview(_ZEROS)[:n]))
            pos += n
        while pos < data_end:
            n = min(READ_SIZE, data_end - pos)
            piece = os.pread(fd, n, pos)
            if not piece:
                raise UsageError(
                    f"the disk ended at {pos} while reading the chunk at {offset}+{length}: "
                    "was it modified during the push?"
                )
            emit(enc.write(piece))
            pos += len(piece)
    emit(enc.finish())
    return "sha256:" + h.hexdigest(), size


class TartPush:
    """One Tart-format push, driven by a :class:`barge.push.Pusher` (whose ``_ensure`` does
    HEAD, mount, then upload, and whose stats and notes it fills)."""

    def __init__(self, pusher: Pusher, vm: VM, targets: list[_Target], lease_id: str) -> None:
        self.p = pusher
        self.vm = vm
        self.targets = targets
        self.lease_id = lease_id
        self._lock = threading.Lock()

    # -- sizing ----------------------------------------------------------------------------
    def chunk_size(self, disk_size: int) -> int:
        size = self.p.opts.chunk_size or tartfmt.CHUNK_SIZE
        if size <= 0 or size % 4096:
            raise UsageError(f"--chunk-size {size} must be a positive multiple of 4096 for Tart")
        cap, source = self.p.layer_cap(self.targets)
        if cap is None:
            return size
        room = cap - 2  # the VM config and NVRAM layers
        if room < 1:
            raise LimitError(f"a Tart image needs at least 3 layers; {source} allows {cap}")
        need = -(-disk_size // size)
        if need <= room:
            return size
        raised = -(-disk_size // room)
        raised = -(-raised // (1 << 20)) * (1 << 20)
        self.p.note(
            f"chunk size raised from {format_size(size)} to {format_size(raised)} so that "
            f"{need} disk layers fit {cap} ({source}); Tart reads any chunk size"
        )
        return raised

    def plan(self, name: str, size: int, chunk_size: int) -> list[ChunkPlan]:
        """Consecutive chunks covering the disk. A VM pulled from a Tart image is cut where
        that image was (its ``chunkSizes``), so that unchanged chunks are the original layers;
        any part of the disk beyond them (it grew) is cut every ``chunk_size`` bytes."""
        plans: list[ChunkPlan] = []
        off = 0
        source = self.vm.config.source or {}
        sizes = source.get("chunkSizes") if source.get("format") == "tart" else None
        if self.p.opts.chunk_size is None and isinstance(sizes, list):
            keep: list[int] = []
            end = 0
            for n in sizes:
                if not isinstance(n, int) or n <= 0 or end + n > size:
                    break
                keep.append(n)
                end += n
            tail = -(-(size - end) // chunk_size)  # chunks for what the disk grew by
            cap, _ = self.p.layer_cap(self.targets)
            if cap is None or len(keep) + tail + 2 <= cap:
                for n in keep:
                    plans.append(ChunkPlan(name, off, n))
                    off += n
        plans += [
            ChunkPlan(name, o, min(chunk_size, size - o)) for o in range(off, size, chunk_size)
        ]
        return plans

    # -- the pipeline ----------------------------------------------------------------------
    def run(self) -> PushResult:
        from barge.push import PushResult

        vm, cfg, p = self.vm, self.vm.config, self.p
        disks = cfg.disks
        if len(disks) != 1:
            raise UnsupportedError(
                f"a Tart image holds exactly one disk; {vm.name!r} has {len(disks)} "
                f"({', '.join(d.name for d in disks)})",
                hint="push it in barge's format (the default), which holds any number of disks",
            )
        disk = disks[0]
        skipped = sorted(
            n
            for n in os.listdir(vm.path)
            if (vm.path / n).is_file()
            and not n.startswith(".")
            and n not in TART_FILES
            and n not in _CACHE_METADATA
            and n != disk.name
        )
        if skipped:
            p.note(f"not carried in Tart's format (it has no place for them): {', '.join(skipped)}")

        vm_config = self._vm_config()
        nvram = self._nvram()
        oci_config = self._oci_config(vm_config)

        chunk_size = self.chunk_size(disk.size)
        plans = self.plan(disk.name, disk.size, chunk_size)
        hash_frame = DEFAULT_FRAME_SIZE if chunk_size >= DEFAULT_FRAME_SIZE else chunk_size
        p.stats.chunks = p._chunks_total = len(plans)
        task = cancel.checked(p.reporter.task(f"pushing {vm.name} (Tart format)", disk.size))
        # the unchanged-disk fast path keys chunks by i * chunk_size: only for a regular cut
        regular = all(
            pl.offset == i * chunk_size and pl.length == min(chunk_size, disk.size - pl.offset)
            for i, pl in enumerate(plans)
        )
        known = p._known_digests(vm, chunk_size, hash_frame, "content") if regular else {}
        p._lease_id = self.lease_id

        fd = os.open(vm.disk_path(disk.name), os.O_RDONLY)
        before = os.fstat(fd)
        if before.st_size != disk.size:
            os.close(fd)
            raise IntegrityError(
                f"disk {disk.name!r} of {vm.name!r} is {before.st_size} bytes; its config says "
                f"{disk.size}"
            )
        rows: list[list[Any]] = []
        layers: list[tartfmt.DiskChunk] = []
        try:

            def work(plan: ChunkPlan) -> tuple[ChunkDigests, tartfmt.DiskChunk]:
                digests = known.get((plan.disk, plan.offset))
                if digests is None:
                    digests = hash_chunk(fd, plan, hash_frame, content_digest=True)
                    with self._lock:
                        p.stats.hashed_bytes += plan.length
                if digests.all_zero:
                    with self._lock:
                        p.stats.zero_chunks += 1  # still a layer: Tart places by order
                desc = self._ensure_chunk(fd, plan, digests.udigest)
                task.advance(plan.length)
                p.chunk_done(plan.length)
                return digests, tartfmt.DiskChunk(desc, plan.offset, plan.length, digests.udigest)

            workers = max(1, p.opts.concurrency)
            for digests, layer in cancel.parallel(work, plans, workers, name="tartpush"):
                rows.append([digests.udigest, [[d, z] for d, z in digests.frames]])  # disk order
                layers.append(layer)
            after = os.fstat(fd)
            if (before.st_size, before.st_mtime_ns, before.st_ctime_ns) != (
                after.st_size,
                after.st_mtime_ns,
                after.st_ctime_ns,
            ):
                raise UsageError(
                    f"disk {disk.name!r} of {vm.name!r} changed while it was being pushed; "
                    "stop whatever writes it and push again"
                )
        finally:
            if not cancel.abandoned():  # a worker still running may read through it
                os.close(fd)
        if regular:
            p._remember_digests(
                vm, chunk_size, hash_frame, {disk.name: rows}, {disk.name: before}, "content"
            )

        vm_blob = Blob(tartfmt.CONFIG_MEDIA_TYPE, vm_config)
        nvram_blob = Blob(tartfmt.NVRAM_MEDIA_TYPE, nvram)
        config_blob = Blob(OCI_CONFIG, oci_config)
        for blob in (config_blob, vm_blob, nvram_blob):
            for t in self.targets:
                p._ensure_small(t.end, blob)
        manifest = tartfmt.build_tart_manifest(
            _desc(config_blob),
            _desc(vm_blob),
            layers,
            _desc(nvram_blob),
            disk.size,
            _dt.datetime.now(_dt.UTC),
        )
        n_layers = len(layers) + 2
        digest = ""
        refs: list[str] = []
        for t in self.targets:
            tags: list[str | None] = [*t.tags] or [None]  # no tag: by digest (for an index)
            for tag in tags:
                try:
                    digest = t.end.put_manifest(manifest, OCI_MANIFEST, tag)
                except LayerLimitExceeded as e:
                    limit = f" (its limit: {e.limit})" if e.limit else ""
                    raise LimitError(
                        f"{t.end.label} refused the manifest: {n_layers} layers is over its "
                        f"layer limit{limit}",
                        hint=f"push again with --max-layers {e.limit or max(3, n_layers - 1)}",
                    ) from None
                refs.append(f"{t.end.label}:{tag}" if tag else f"{t.end.label}@{digest}")
        return PushResult(digest, len(manifest), refs, chunk_size, n_layers, p.stats, p.notes)

    # -- blobs -----------------------------------------------------------------------------
    def _ensure_chunk(self, fd: int, plan: ChunkPlan, udigest: str) -> BlobDescriptor:
        p = self.p
        cat = p.store.catalog
        mt = tartfmt.DISK_V2_MEDIA_TYPE
        row = cat.find_chunk(udigest, CODEC, 0, mt)
        if row is not None and all(
            p._ensure(t.end, row.cdigest, row.csize, None) for t in self.targets
        ):
            return BlobDescriptor(mt, row.cdigest, row.csize)
        spool = p.store.tmp_dir / (
            f"tartpush-{os.getpid()}-{threading.get_ident()}-{plan.offset}.layer"
        )
        cat.lease_add(self.lease_id, "path", [spool.name])
        try:
            with open(spool, "wb") as out:
                cdigest, csize = encode_chunk_stream(fd, plan.offset, plan.length, out)
                out.flush()
            with self._lock:
                p.stats.compressed_chunks += 1
            cat.put_chunk(ChunkRow(udigest, CODEC, 0, mt, cdigest, csize, []))

            def open_at(off: int) -> BinaryIO:
                f = open(spool, "rb")  # noqa: SIM115 - the uploader closes it
                f.seek(off)
                return f

            for t in self.targets:
                p._ensure(t.end, cdigest, csize, open_at)
            return BlobDescriptor(mt, cdigest, csize)
        finally:
            spool.unlink(missing_ok=True)

    # -- Tart's small files ----------------------------------------------------------------
    def _file(self, name: str) -> bytes | None:
        path: Path = self.vm.path / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(data) > tartfmt.MAX_VM_CONFIG_SIZE * 64:
            raise IntegrityError(f"{path} is too large ({len(data)} bytes)")
        return data

    def _vm_config(self) -> bytes:
        """The VM's ``tart-config.json`` as it is (so a re-push reproduces the layer), with
        cpuCount/memorySize updated when ``barge set`` changed them; else one built from
        barge's config."""
        cfg = self.vm.config
        data = self._file(TART_CONFIG_FILE)
        if data is not None:
            info = tartfmt.tart_vm_info(data)  # validates
            doc = load_json(data, TART_CONFIG_FILE)
            if info["os"] == "darwin":
                tartfmt.check_macos_identity(
                    doc.get("ecid"),
                    doc.get("hardwareModel"),
                    f"{TART_CONFIG_FILE} of {self.vm.name!r}",
                )
            if (info["cpuCount"], info["memorySize"]) == (cfg.cpus, cfg.memory):
                return data
            doc["cpuCount"], doc["memorySize"] = cfg.cpus, cfg.memory
            for key, value in (("cpuCountMin", cfg.cpus), ("memorySizeMin", cfg.memory)):
                if key in doc and doc[key] > value:
                    doc[key] = value
            self.p.note("Tart VM config: cpuCount/memorySize updated from the VM's settings")
            return json.dumps(doc, separators=(",", ":")).encode()
        if cfg.os not in ("darwin", "linux"):
            raise UnsupportedError(f"Tart images hold macOS or Linux VMs, not {cfg.os!r}")
        arch = OCI_ARCH.get(cfg.arch, cfg.arch)
        if arch != "arm64":
            self.p.note(f"the VM is {arch}: Tart runs arm64 VMs only (Apple Silicon)")
        disk_format = cfg.disks[0].format if cfg.disks[0].format in ("raw", "asif") else "raw"
        try:
            built = tartfmt.build_tart_vm_config(
                "darwin" if cfg.os == "darwin" else "linux",
                arch,
                cfg.cpus,
                cfg.memory,
                cfg.mac_address or "52:54:00:00:00:01",
                disk_format,
            )
        except ValueError as e:
            raise UnsupportedError(f"cannot describe {self.vm.name!r} to Tart: {e}") from None
        self.p.note("no tart-config.json in the VM: a Tart VM config was built from barge's")
        return built

    def _nvram(self) -> bytes:
        data = self._file(NVRAM_FILE)
        if data is not None:
            return data
        if not self.p.opts.placeholder_nvram:
            raise UnsupportedError(
                f"{self.vm.name!r} has no nvram.bin, and Tart's format needs an NVRAM layer: "
                "barge cannot create a valid EFI variable store (Apple's format is undocumented; "
                "a zero-filled file is almost certainly not one that Virtualization.framework "
                "boots)",
                hint="push a VM cloned from a Tart image (it keeps its nvram.bin), copy a "
                "nvram.bin made by Tart into the VM, or give --placeholder-nvram to push a "
                "zero-filled one that must be replaced on the Mac before the VM boots",
            )
        self.p.note(
            f"--placeholder-nvram: pushing a zero-filled {tartfmt.NVRAM_PLACEHOLDER_SIZE // 1024} "
            "KiB placeholder NVRAM layer; Tart pulls it, but it is not a valid EFI variable store: replace "
            "nvram.bin on the Mac before the VM boots"
        )
        return tartfmt.placeholder_nvram()

    def _oci_config(self, vm_config: bytes) -> bytes:
        """The VM's ``oci-config.json`` as it is (labels kept), plus any ``--label``; else the
        stub OCI config Tart writes."""
        labels = self.p.opts.labels
        data = self._file(OCI_CONFIG_FILE)
        if data is not None:
            if not labels:
                return data
            try:
                doc = load_json(data, OCI_CONFIG_FILE)
                have = doc.setdefault("config", {}).setdefault("Labels", {})
                if not isinstance(have, dict):
                    raise ValueError("Labels is not an object")
            except (ValueError, AttributeError) as e:
                raise IntegrityError(f"{OCI_CONFIG_FILE} is not a usable OCI config: {e}") from None
            have.update(labels)
            return json.dumps(doc, separators=(",", ":")).encode()
        info = tartfmt.tart_vm_info(vm_config)
        return tartfmt.build_tart_oci_config(
            info["os"], info["arch"], info["diskFormat"], labels=labels
        )


def _desc(blob: Blob) -> BlobDescriptor:
    return BlobDescriptor(blob.media_type, sha256_digest(blob.data), len(blob.data))


def push_tart(pusher: Pusher, vm: VM, targets: list[_Target], lease_id: str) -> PushResult:
    """The Tart branch of :meth:`barge.push.Pusher._push`."""
    return TartPush(pusher, vm, targets, lease_id).run()
