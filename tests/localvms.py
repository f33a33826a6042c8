"""Local VMs for the registry tests: a sparse disk with text, random data, zeros and holes at
odd places, made into a VM in the store, and the small chunking (:data:`SMALL`) that keeps
pushes of it quick."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from barge.local import create_vm
from barge.store import Store
from barge.transfer.push import PushOptions

__all__ = ["SMALL", "make_disk", "make_vm"]

MiB = 1 << 20
SMALL = PushOptions(chunk_size=8 * MiB, frame_size=1 * MiB)


def make_disk(path: Path, size: int, seed: int = 1) -> None:
    """A sparse disk: text, random data, zeros and holes at odd places."""
    rnd = hashlib.sha256(str(seed).encode()).digest()
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(1 * MiB + 123)
        f.write((b"barge copy test data %d\n" % seed) * 30000)
        f.seek(9 * MiB)
        f.write(os.urandom(2 * MiB))
        f.seek(size - 5000)
        f.write(rnd * 100)


def make_vm(store: Store, tmp: Path, name: str = "vm", seed: int = 1, **kw: str) -> Path:
    disk = tmp / f"{name}.raw"
    make_disk(disk, 24 * MiB + 4096, seed)
    create_vm(store, name, from_disk=disk, **kw)  # type: ignore[arg-type]
    return store.vm_path(name) / "disk.img"
