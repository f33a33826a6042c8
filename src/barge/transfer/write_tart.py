"""Tart's image writer (``barge push NAME REF --format tart``).

One of the two :class:`~barge.transfer.local.ImageWriter` s. What Tart's pull accepts
(``shared/FORMAT.md`` §1, :mod:`barge.formats.tart`): an OCI manifest whose layers are one Tart
VM config, the disk cut into consecutive chunks (512 MiB by default, the last shorter), each one
Apple LZ4 stream, and exactly one NVRAM layer. Tart places chunk *i* after chunks ``0..i-1``, so
**every** region is a layer, all-zero ones included. barge adds ``dev.barge.disk.offset`` to
each disk layer (Tart ignores it; barge then reads the image order-independently).

Reuse follows the pipeline's rule, *never send a byte the destination has*: each chunk is
hashed first (holes unread; nothing at all when the disk file is unchanged since the last push)
and its uncompressed digest looked up in the chunk index under codec ``applelz4``, frame size 0
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
in an undocumented format). ``placeholder_nvram`` (``--placeholder-nvram``) pushes that
zero-filled file anyway, for a VM whose NVRAM will be replaced on the Mac.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from barge.disk.chunker import ChunkDigests, ChunkPlan, hash_chunk
from barge.disk.sizing import DEFAULT_FRAME_SIZE
from barge.disk.streams import STREAM_CODECS, encode_region
from barge.errors import IntegrityError, LimitError, UnsupportedError, UsageError
from barge.formats import tart as tartfmt
from barge.image import Blob
from barge.oci.errors import LayerLimitExceeded
from barge.oci.types import OCI_CONFIG, Descriptor, sha256_digest
from barge.store import VM
from barge.store.catalog import ChunkRow
from barge.store.vmconfig import OCI_ARCH
from barge.transfer.end import End
from barge.transfer.local import Encoded, Encoding, LayerCap, extra_files
from barge.transfer.pipeline import open_file_at, spool_path
from barge.units import format_size
from barge.untrusted import load_json

__all__ = ["CODEC", "TART_FILES", "TartWriter"]

#: The chunk-index codec of a Tart disk layer (one Apple LZ4 stream; no frames: size 0).
CODEC = STREAM_CODECS["tart"]
#: Files of a VM directory that become Tart's VM config, NVRAM and OCI config.
TART_CONFIG_FILE = "tart-config.json"
NVRAM_FILE = "nvram.bin"
OCI_CONFIG_FILE = "oci-config.json"
TART_FILES = frozenset({TART_CONFIG_FILE, NVRAM_FILE, OCI_CONFIG_FILE})


class TartWriter:
    """Writes Tart's format (plus barge's offset annotations)."""

    format = "tart"
    digest_kind = "content"

    def __init__(
        self, *, chunk_size: int | None, labels: dict[str, str], placeholder_nvram: bool
    ) -> None:
        self.requested_chunk = chunk_size
        self.labels = labels
        self.placeholder_nvram = placeholder_nvram
        self.frame_size = DEFAULT_FRAME_SIZE
        self.chunk_size = 0
        self._regular = False
        self._vm: VM | None = None
        self.vm_config = b""
        self.nvram = b""
        self.oci_config = b""

    @property
    def task_label(self) -> str:
        assert self._vm is not None
        return f"pushing {self._vm.name} (Tart format)"

    def regular(self) -> int | None:
        """The unchanged-disk fast path keys chunks by ``i * chunk_size``: only for a regular
        cut."""
        return self.chunk_size if self._regular else None

    def start(self, enc: Encoding) -> None:
        pass

    # -- sizing ----------------------------------------------------------------------------
    def plan(self, vm: VM, cap: LayerCap, note: Callable[[str], None]) -> list[ChunkPlan]:
        self._vm = vm
        disks = vm.config.disks
        if len(disks) != 1:
            raise UnsupportedError(
                f"a Tart image holds exactly one disk; {vm.name!r} has {len(disks)} "
                f"({', '.join(d.name for d in disks)})",
                hint="push it in barge's format (the default), which holds any number of disks",
            )
        disk = disks[0]
        skipped = [n for n in extra_files(vm) if n not in TART_FILES]
        if skipped:
            note(f"not carried in Tart's format (it has no place for them): {', '.join(skipped)}")
        self.vm_config = self._vm_config(vm, note)
        self.nvram = self._nvram(vm, note)
        self.oci_config = self._oci_config(vm, self.vm_config)
        self.chunk_size = self._chunk_size(disk.size, cap, note)
        plans = self._cut(vm, disk.name, disk.size, self.chunk_size, cap)
        self.frame_size = (
            DEFAULT_FRAME_SIZE if self.chunk_size >= DEFAULT_FRAME_SIZE else self.chunk_size
        )
        self._regular = all(
            pl.offset == i * self.chunk_size
            and pl.length == min(self.chunk_size, disk.size - pl.offset)
            for i, pl in enumerate(plans)
        )
        return plans

    def _chunk_size(self, disk_size: int, cap: LayerCap, note: Callable[[str], None]) -> int:
        size = self.requested_chunk or tartfmt.CHUNK_SIZE
        if size <= 0 or size % 4096:
            raise UsageError(f"--chunk-size {size} must be a positive multiple of 4096 for Tart")
        if cap.limit is None:
            return size
        room = cap.limit - 2  # the VM config and NVRAM layers
        if room < 1:
            raise LimitError(
                f"a Tart image needs at least 3 layers; {cap.source} allows {cap.limit}"
            )
        need = -(-disk_size // size)
        if need <= room:
            return size
        raised = -(-disk_size // room)
        raised = -(-raised // (1 << 20)) * (1 << 20)
        note(
            f"chunk size raised from {format_size(size)} to {format_size(raised)} so that "
            f"{need} disk layers fit {cap.limit} ({cap.source}); Tart reads any chunk size"
        )
        return raised

    def _cut(self, vm: VM, name: str, size: int, chunk_size: int, cap: LayerCap) -> list[ChunkPlan]:
        """Consecutive chunks covering the disk. A VM pulled from a Tart image is cut where
        that image was (its ``chunkSizes``), so that unchanged chunks are the original layers;
        any part of the disk beyond them (it grew) is cut every ``chunk_size`` bytes."""
        plans: list[ChunkPlan] = []
        off = 0
        source = vm.config.source or {}
        sizes = source.get("chunkSizes") if source.get("format") == "tart" else None
        if self.requested_chunk is None and isinstance(sizes, list):
            keep: list[int] = []
            end = 0
            for n in sizes:
                if not isinstance(n, int) or n <= 0 or end + n > size:
                    break
                keep.append(n)
                end += n
            tail = -(-(size - end) // chunk_size)  # chunks for what the disk grew by
            if cap.limit is None or len(keep) + tail + 2 <= cap.limit:
                for n in keep:
                    plans.append(ChunkPlan(name, off, n))
                    off += n
        plans += [
            ChunkPlan(name, o, min(chunk_size, size - o)) for o in range(off, size, chunk_size)
        ]
        return plans

    # -- one chunk -------------------------------------------------------------------------
    def chunk(
        self, enc: Encoding, fd: int, plan: ChunkPlan, known: ChunkDigests | None
    ) -> tuple[ChunkDigests, tartfmt.DiskChunk]:
        digests = known
        if digests is None:
            digests = hash_chunk(fd, plan, self.frame_size, content_digest=True)
            enc.count(hashed_bytes=plan.length)
        if digests.all_zero:
            enc.count(zero_chunks=1)  # still a layer: Tart places by order
        desc = self._ensure_chunk(enc, fd, plan, digests.udigest)
        enc.task.advance(plan.length)
        return digests, tartfmt.DiskChunk(desc, plan.offset, plan.length, digests.udigest)

    def _ensure_chunk(self, enc: Encoding, fd: int, plan: ChunkPlan, udigest: str) -> Descriptor:
        cat = enc.store.catalog
        mt = tartfmt.DISK_V2_MEDIA_TYPE
        row = cat.find_chunk(udigest, CODEC, 0, mt)
        first: int | None = None
        if row is not None:
            first = enc.sender.first_missing(Descriptor(mt, row.cdigest, row.csize), enc.ends)
            if first is None:
                return Descriptor(mt, row.cdigest, row.csize)
        spool = spool_path(enc.store.tmp_dir, "tartpush", plan.offset)
        cat.lease_add(enc.lease_id, "path", [spool.name])
        try:
            with open(spool, "wb") as out:
                cdigest, csize = encode_region(fd, plan.offset, plan.length, out)
                out.flush()
            enc.count(compressed_chunks=1)
            cat.put_chunk(ChunkRow(udigest, CODEC, 0, mt, cdigest, csize, []))
            blob = Descriptor(mt, cdigest, csize)
            ends = enc.ends
            if row is not None and first is not None and row.cdigest == cdigest:
                # asked already, and missing it; the ends after it: not asked yet
                enc.sender.upload(ends[first], blob, open_file_at(spool))
                enc.sender.send(blob, open_file_at(spool), ends[first + 1 :])
            else:
                enc.sender.send(blob, open_file_at(spool), ends)
            return Descriptor(mt, cdigest, csize)
        finally:
            spool.unlink(missing_ok=True)

    # -- the image -------------------------------------------------------------------------
    def finish(self, enc: Encoding, results: list[tuple[ChunkPlan, ChunkDigests, Any]]) -> Encoded:
        disk = enc.vm.config.disks[0]
        layers: list[tartfmt.DiskChunk] = [chunk for _, _, chunk in results]
        vm_blob = Blob(tartfmt.CONFIG_MEDIA_TYPE, self.vm_config)
        nvram_blob = Blob(tartfmt.NVRAM_MEDIA_TYPE, self.nvram)
        config_blob = Blob(OCI_CONFIG, self.oci_config)
        manifest = tartfmt.build_tart_manifest(
            _desc(config_blob),
            _desc(vm_blob),
            layers,
            _desc(nvram_blob),
            disk.size,
            _dt.datetime.now(_dt.UTC),
        )
        return Encoded(
            [config_blob, vm_blob, nvram_blob], manifest, len(layers) + 2, self.chunk_size
        )

    def refused(self, end: End, e: LayerLimitExceeded, layers: int) -> LimitError:
        limit = f" (its limit: {e.limit})" if e.limit else ""
        return LimitError(
            f"{end.label} refused the manifest: {layers} layers is over its layer limit{limit}",
            hint=f"push again with --max-layers {e.limit or max(3, layers - 1)}",
        )

    # -- Tart's small files ----------------------------------------------------------------
    @staticmethod
    def _file(vm: VM, name: str) -> bytes | None:
        path: Path = vm.path / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(data) > tartfmt.MAX_VM_CONFIG_SIZE * 64:
            raise IntegrityError(f"{path} is too large ({len(data)} bytes)")
        return data

    def _vm_config(self, vm: VM, note: Callable[[str], None]) -> bytes:
        """The VM's ``tart-config.json`` as it is (so a re-push reproduces the layer), with
        cpuCount/memorySize updated when ``barge set`` changed them; else one built from
        barge's config."""
        cfg = vm.config
        data = self._file(vm, TART_CONFIG_FILE)
        if data is not None:
            info = tartfmt.tart_vm_info(data)  # validates
            doc = load_json(data, TART_CONFIG_FILE)
            if info["os"] == "darwin":
                tartfmt.check_macos_identity(
                    doc.get("ecid"),
                    doc.get("hardwareModel"),
                    f"{TART_CONFIG_FILE} of {vm.name!r}",
                )
            if (info["cpuCount"], info["memorySize"]) == (cfg.cpus, cfg.memory):
                return data
            doc["cpuCount"], doc["memorySize"] = cfg.cpus, cfg.memory
            for key, value in (("cpuCountMin", cfg.cpus), ("memorySizeMin", cfg.memory)):
                if key in doc and doc[key] > value:
                    doc[key] = value
            note("Tart VM config: cpuCount/memorySize updated from the VM's settings")
            return json.dumps(doc, separators=(",", ":")).encode()
        if cfg.os not in ("darwin", "linux"):
            raise UnsupportedError(f"Tart images hold macOS or Linux VMs, not {cfg.os!r}")
        arch = OCI_ARCH.get(cfg.arch, cfg.arch)
        if arch != "arm64":
            note(f"the VM is {arch}: Tart runs arm64 VMs only (Apple Silicon)")
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
            raise UnsupportedError(f"cannot describe {vm.name!r} to Tart: {e}") from None
        note("no tart-config.json in the VM: a Tart VM config was built from barge's")
        return built

    def _nvram(self, vm: VM, note: Callable[[str], None]) -> bytes:
        data = self._file(vm, NVRAM_FILE)
        if data is not None:
            return data
        if not self.placeholder_nvram:
            raise UnsupportedError(
                f"{vm.name!r} has no nvram.bin, and Tart's format needs an NVRAM layer: "
                "barge cannot create a valid EFI variable store (Apple's format is undocumented; "
                "a zero-filled file is almost certainly not one that Virtualization.framework "
                "boots)",
                hint="push a VM cloned from a Tart image (it keeps its nvram.bin), copy a "
                "nvram.bin made by Tart into the VM, or give --placeholder-nvram to push a "
                "zero-filled one that must be replaced on the Mac before the VM boots",
            )
        note(
            f"--placeholder-nvram: pushing a zero-filled {tartfmt.NVRAM_PLACEHOLDER_SIZE // 1024} "
            "KiB placeholder NVRAM layer; Tart pulls it, but it is not a valid EFI variable store: replace "
            "nvram.bin on the Mac before the VM boots"
        )
        return tartfmt.placeholder_nvram()

    def _oci_config(self, vm: VM, vm_config: bytes) -> bytes:
        """The VM's ``oci-config.json`` as it is (labels kept), plus any ``--label``; else the
        stub OCI config Tart writes."""
        labels = self.labels
        data = self._file(vm, OCI_CONFIG_FILE)
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


def _desc(blob: Blob) -> Descriptor:
    return Descriptor(blob.media_type, sha256_digest(blob.data), len(blob.data))
