"""An incremental pull holds its base image: a prune meanwhile cannot take it away.

The base (the cached image an incremental pull clones and copies frames from) was chosen from
the cache with no lease and no lock on it, so a ``prune`` running at the same time could
remove it between the choice and its use: the pull then failed on the missing files. The pull
now leases the base and holds its image lock (shared, as a clone does) until it ends.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from barge.disk.index import FrameIndex
from barge.local import create_vm
from barge.store import Store
from barge.transfer import decode_barge
from barge.transfer.decode_barge import BargeDecoding
from barge.transfer.pull import pull
from barge.transfer.push import PushOptions, push
from clitest import sha256_file
from registries import RunningRegistry

MiB = 1 << 20
SMALL = PushOptions(chunk_size=4 * MiB, frame_size=1 * MiB)


def _two_versions(tmp_path: Path, registry: RunningRegistry) -> tuple[Store, str, str, Path]:
    """v1 and v2 of one VM pushed; v2 differs from v1 in one frame and has v1's frame 3 moved
    to frame 9 (so the pull both keeps frames in place and copies one from the base)."""
    rng = random.Random(10)
    disk = tmp_path / "src.raw"
    with open(disk, "wb") as f:
        f.write(rng.randbytes(12 * MiB))
    vm_home = Store(tmp_path / "vm-home")
    create_vm(vm_home, "vm", from_disk=disk)
    vm_disk = vm_home.vm_path("vm") / "disk.img"
    v1 = f"{registry.host}/lease/vm:v1"
    push(vm_home, "vm", [v1], SMALL)
    with open(vm_disk, "r+b") as f:
        f.seek(3 * MiB)
        moved = f.read(MiB)
        f.seek(9 * MiB)
        f.write(moved)
        f.seek(5 * MiB)
        f.write(rng.randbytes(MiB))
    v2 = f"{registry.host}/lease/vm:v2"
    push(vm_home, "vm", [v2], SMALL)
    return vm_home, v1, v2, vm_disk


@pytest.mark.parametrize("when", ["after-choosing", "while-copying-frames"])
def test_prune_during_an_incremental_pull_keeps_its_base(
    tmp_path: Path,
    barge_home: Path,
    registry: RunningRegistry,
    monkeypatch: pytest.MonkeyPatch,
    when: str,
) -> None:
    _vm_home, v1, v2, vm_disk = _two_versions(tmp_path, registry)
    store = Store()
    base = pull(store, v1)
    pruned: list[str] = []

    def prune() -> None:  # what `barge prune --space-budget 0` does, on its own connection
        other = Store(store.home)
        try:
            pruned.extend(r.digest for r in other.gc(space_budget=0))
        finally:
            other.close()

    if when == "after-choosing":
        real_find = BargeDecoding._find_base

        def find_then_prune(self: BargeDecoding, *a: Any) -> Any:
            found = real_find(self, *a)
            prune()
            return found

        monkeypatch.setattr(BargeDecoding, "_find_base", find_then_prune)
    else:
        real_read = decode_barge._LocalFrames.read

        def prune_then_read(self: Any, *a: Any) -> Any:
            if not pruned:
                prune()
                pruned.append("ran")
            return real_read(self, *a)

        monkeypatch.setattr(decode_barge._LocalFrames, "read", prune_then_read)

    res = pull(store, v2)
    assert res.base == base.path.name  # the pull did use v1 as its base
    assert base.digest not in pruned
    assert (store.cache_dir / base.path.name / "disk.img").is_file()
    assert sha256_file(res.path / "disk.img") == sha256_file(vm_disk)
    FrameIndex.from_bytes((base.path / "index.json").read_bytes())  # the base is whole
    # the hold ends with the pull: now a prune can take the base
    assert base.digest in {r.digest for r in store.gc(space_budget=0)}
    assert not os.path.exists(base.path)
