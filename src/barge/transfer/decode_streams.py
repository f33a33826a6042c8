"""Decoding Tart and Vetu images into the cache: each disk layer one compressed stream.

Tart's and Vetu's layers carry no frame index, so they cannot be fetched in part: every disk is
decoded whole, into a new file (no base image, no resume: an interrupted pull starts over).
Layer order is the only placement information there is, unless a Tart image carries barge's
``dev.barge.disk.offset`` annotations (:mod:`barge.formats.tart` decides). Each layer's
compressed digest is checked by the source's reader or here, its decoded length and sha256
against its annotations; only then does its range enter the disk's coverage ledger.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any, BinaryIO

from barge import cancel
from barge.disk.coverage import Coverage
from barge.disk.decoder import DiskWriter, write_zero_aware
from barge.disk.sparse import can_reflink
from barge.disk.streams import STREAM_CODECS, stream_decoder
from barge.errors import IntegrityError, UnsupportedError
from barge.formats import tart as tartfmt
from barge.formats import vetu as vetufmt
from barge.image import MAX_SMALL_BLOB
from barge.progress import Task
from barge.store import Disk, VMConfig
from barge.store.catalog import ChunkRow
from barge.store.vmconfig import FROM_OCI_ARCH, random_mac
from barge.transfer.decode import Staging, reset_staging
from barge.transfer.end import OpenAt

__all__ = ["TART_CHUNK_CODEC", "StreamDecoding"]

#: The chunk-index codec name of a Tart disk layer (one Apple LZ4 stream, no frames).
TART_CHUNK_CODEC = STREAM_CODECS["tart"]


@dataclass(frozen=True)
class _Layer:
    disk: str
    csize: int
    offset: int
    usize: int
    udigest: str


class StreamDecoding:
    """Tart's or Vetu's image (``fmt``) decoded into a staging directory."""

    starts_over = True
    base: str | None = None

    def __init__(self, st: Staging, doc: dict[str, Any], fmt: str) -> None:
        self.st = st
        self.format = fmt
        self.decoder = stream_decoder(fmt)
        self.writers: dict[str, DiskWriter] = {}
        self.tasks: dict[str, Task] = {}
        self.layers: dict[str, list[_Layer]] = {}
        self.disks: list[Disk] = []
        self._finish: Any = None
        reset_staging(st.path, keep=set())  # disks are decoded whole, into new files
        try:
            if fmt == "tart":
                self._open_tart(doc)
            else:
                self._open_vetu(doc)
        except BaseException:
            self.close()
            raise

    # -- the formats -----------------------------------------------------------------------
    def _open_tart(self, doc: dict[str, Any]) -> None:
        st = self.st
        img = tartfmt.parse_tart_manifest(doc)
        if img.offsets_from == "order":
            st.note("Tart image without offsets: disk chunks placed by layer order (as Tart does)")
        elif img.reordered:
            st.note(f"warning: {tartfmt.REORDERED_MESSAGE}; `barge verify` fails it")
        if img.ignored:
            st.note(
                "Tart image: ignored layers of unknown types (as Tart does): "
                f"{', '.join(sorted(set(img.ignored)))}"
            )
        vm_json = st.read_small(img.vm_config.digest, tartfmt.MAX_VM_CONFIG_SIZE)
        info = tartfmt.tart_vm_info(vm_json)
        if "diskFormatUnknown" in info:
            st.note(
                f"Tart VM config: unknown diskFormat {info['diskFormatUnknown'][:40]!r} read as "
                "raw (as Tart does)"
            )
        nvram = st.read_small(img.nvram.digest, MAX_SMALL_BLOB)
        oci_cfg = st.read_small(img.config.digest, MAX_SMALL_BLOB)
        (st.path / "tart-config.json").write_bytes(vm_json)
        (st.path / "nvram.bin").write_bytes(nvram)
        (st.path / "oci-config.json").write_bytes(oci_cfg)
        # the layers say nothing about zeros: their compressed size is what the disk takes at
        # least (all-zero blocks become holes, data is rarely smaller than its compression)
        least = sum(c.descriptor.size for c in img.disk_chunks)
        st.require_space(least, image=least, reflink=can_reflink(st.path))
        self._add_disk("disk.img", img.disk_size, img.disk_chunks)

        def finish() -> None:
            if info["diskFormat"] != "raw":
                st.note(
                    f"Tart disk format {info['diskFormat']!r}: disk.img holds that format as "
                    "is (kept for re-pushing; it is not a raw disk)"
                )
            cfg = VMConfig.new(
                os_name=str(info["os"]),
                arch=FROM_OCI_ARCH.get(str(info["arch"]), str(info["arch"])),
                cpus=int(info["cpuCount"]),
                memory=int(info["memorySize"]),
                disks=[Disk("disk.img", img.disk_size, str(info["diskFormat"]))],
                mac=str(info.get("macAddress") or random_mac()),
            )
            # the chunk boundaries, so that a Tart-format re-push cuts the disk the same way
            cfg.source = {**self._source, "chunkSizes": [c.size for c in img.disk_chunks]}
            (st.path / "config.json").write_bytes(cfg.to_bytes())
            # every chunk is verified: a re-push of a clone reuses these layers as they are
            for c in img.disk_chunks:
                st.store.catalog.put_chunk(
                    ChunkRow(
                        c.digest,
                        TART_CHUNK_CODEC,
                        0,
                        tartfmt.DISK_V2_MEDIA_TYPE,
                        c.descriptor.digest,
                        c.descriptor.size,
                        [],
                    )
                )

        self._finish = finish

    def _open_vetu(self, doc: dict[str, Any]) -> None:
        st = self.st
        img = vetufmt.parse_vetu_manifest(doc)
        if img.ignored:
            st.note(
                f"Vetu image: ignored layers of unknown types (as Vetu does): "
                f"{', '.join(sorted(set(img.ignored)))}"
            )
        vm_json = st.read_small(img.vm_config.digest, MAX_SMALL_BLOB)
        vm = vetufmt.vetu_vm_info(vm_json)
        vetufmt.check_disks_listed(img, vm)
        if not img.disks:
            raise IntegrityError("Vetu image has no disk layers")
        (st.path / "vetu-config.json").write_bytes(vm_json)
        (st.path / "kernel").write_bytes(st.read_small(img.kernel.digest, MAX_SMALL_BLOB * 4))
        if img.initramfs is not None:
            (st.path / "initramfs").write_bytes(
                st.read_small(img.initramfs.digest, MAX_SMALL_BLOB * 8)
            )
        least = sum(c.descriptor.size for d in img.disks for c in d.chunks)
        st.require_space(least, image=least, reflink=can_reflink(st.path))
        for d in img.disks:
            self._add_disk(d.name, d.size, d.chunks)

        def finish() -> None:
            for name in vm.disks:
                if name not in {d.name for d in img.disks}:
                    st.note(f"Vetu VM config lists disk {name!r} but the image has no layer for it")
            if vm.arch not in FROM_OCI_ARCH:
                raise UnsupportedError(f"Vetu VM config: unknown arch {vm.arch[:40]!r}")
            cfg = VMConfig.new(
                os_name="linux",
                arch=FROM_OCI_ARCH[vm.arch],
                cpus=vm.cpus or 1,
                memory=vm.memory or 1 << 30,
                disks=self.disks,
                boot="kernel",
                mac=vm.mac,
            )
            # Vetu boots the kernel directly with the config's command line: so does `barge run`
            cfg.set_kernel_boot(
                "kernel", "initramfs" if img.initramfs is not None else None, vm.cmdline
            )
            cfg.source = self._source
            (st.path / "config.json").write_bytes(cfg.to_bytes())

        self._finish = finish

    @property
    def _source(self) -> dict[str, Any]:
        return {**self.st.origin, "format": self.format}

    def _add_disk(self, name: str, size: int, chunks: Any) -> None:
        path = self.st.path / name
        with open(path, "wb"):
            pass
        self.disks.append(Disk(name, size))
        total = sum(c.size for c in chunks)
        self.tasks[name] = cancel.checked(self.st.reporter.task(f"pulling {name}", total))
        self.writers[name] = DiskWriter(path, size)
        for c in chunks:
            self.layers.setdefault(c.descriptor.digest, []).append(
                _Layer(name, c.descriptor.size, c.offset, c.size, c.digest)
            )

    # -- decoding --------------------------------------------------------------------------
    def needs(self, digest: str) -> bool:
        return digest in self.layers

    def put(self, digest: str, open_at: OpenAt) -> None:
        for layer in self.layers.get(digest, []):
            self._decode(digest, layer, open_at)

    def _decode(self, digest: str, layer: _Layer, open_at: OpenAt) -> None:
        """Decode one layer at its offset, verifying its compressed digest (by the reader, or
        here) and its uncompressed digest; its range enters the ledger once both matched."""
        st = self.st
        out = self.writers[layer.disk]
        task = self.tasks[layer.disk]
        h = hashlib.sha256()
        offset, usize = layer.offset, layer.usize
        out.zero(offset, usize)
        pos = offset
        with open_at(0) as raw:
            # a registry's reader checks the digest itself at EOF; other ends (OCI layouts)
            # are hashed here. The size is bounded for both.
            src = _CheckedBlob(raw, digest, layer.csize, hash=not st.source.verifies_reads)
            for piece in self.decoder(src, expected_size=usize):
                h.update(piece)
                write_zero_aware(out, pos, piece)
                pos += len(piece)
                task.advance(len(piece))
            src.finish()
        if pos - offset != usize:
            raise IntegrityError(
                f"layer {digest} decodes to {pos - offset} bytes, its annotation says {usize}"
            )
        if "sha256:" + h.hexdigest() != layer.udigest:
            raise IntegrityError(
                f"layer {digest} decodes to sha256:{h.hexdigest()}, its annotation says "
                f"{layer.udigest}"
            )
        out.record(offset, usize)
        st.count(fetched_bytes=layer.csize, whole_layers=1)

    # -- the end ---------------------------------------------------------------------------
    def finish(self) -> list[Coverage]:
        for w in self.writers.values():
            w.fsync()
        self.close()
        self._finish()
        return [w.coverage for w in self.writers.values()]

    def close(self) -> None:
        if not cancel.abandoned():  # a worker still running may write through them
            for w in self.writers.values():
                w.close()


class _CheckedBlob(io.RawIOBase):
    """A compressed blob read through a decoder: never more than the descriptor's size, and
    (with ``hash``) the digest checked when :meth:`finish` is called after the decoder."""

    def __init__(self, src: BinaryIO, digest: str, size: int, *, hash: bool) -> None:
        super().__init__()
        self.src = src
        self.digest = digest
        self.size = size
        self.got = 0
        self.h = hashlib.sha256() if hash and digest.startswith("sha256:") else None

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            n = self.size + 1 - self.got
        data = self.src.read(max(0, min(n, self.size + 1 - self.got)))
        self.got += len(data)
        if self.got > self.size:
            raise IntegrityError(
                f"layer {self.digest} is larger than the {self.size} bytes its descriptor says"
            )
        if self.h is not None:
            self.h.update(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def finish(self) -> None:
        """Read to the end (the decoder stopped at its end marker) and check size and digest."""
        for _ in range(2):
            if not self.read(1 << 16):
                break
        if self.got != self.size:
            raise IntegrityError(
                f"layer {self.digest} is {self.got} bytes; its descriptor says {self.size}"
            )
        if self.h is not None and "sha256:" + self.h.hexdigest() != self.digest:
            raise IntegrityError(
                f"layer {self.digest} has digest sha256:{self.h.hexdigest()} (corrupt blob)"
            )
