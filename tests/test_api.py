"""The public Python API, used the way a Python user would: ``import barge`` and nothing else
from barge (a real registry on loopback behind it)."""

from __future__ import annotations

import hashlib
import inspect
import random
import socket
import tarfile
from pathlib import Path
from typing import Any

import pytest

import barge
from registries import RunningRegistry


def _disk(path: Path, size: int = 24 << 20) -> str:
    """A raw disk with data in some places and holes elsewhere; its sha256."""
    rng = random.Random(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in (0, size // 3, size - (1 << 20)):
            f.seek(off)
            f.write(rng.randbytes(300_000))
    return _sha(path)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return h.hexdigest()


class Recorder:
    """A barge.Reporter that keeps everything it is told."""

    def __init__(self) -> None:
        self.tasks: list[tuple[str, int | None]] = []
        self.advanced = 0
        self.notes: list[str] = []

    def task(self, description: str, total: int | None) -> Recorder:
        self.tasks.append((description, total))
        return self

    def advance(self, n: int) -> None:
        self.advanced += n

    def add_total(self, n: int) -> None:
        pass

    def note(self, message: str) -> None:
        self.notes.append(message)

    def close(self) -> None:
        pass


def test_every_public_name_exists_and_is_documented() -> None:
    assert barge.__all__ == sorted(barge.__all__, key=lambda n: (n.islower(), n))
    for name in barge.__all__:
        obj = getattr(barge, name)
        if name == "__version__":
            continue
        if callable(obj):
            doc = inspect.getdoc(obj) or ""
            # a dataclass without one gets its signature as a docstring: that is none
            assert doc and not doc.startswith(f"{name}("), f"barge.{name} has no docstring"


def test_every_public_function_is_typed() -> None:
    for name in barge.__all__:
        obj = getattr(barge, name)
        if not inspect.isfunction(obj):
            continue
        sig = inspect.signature(obj)
        assert sig.return_annotation is not inspect.Signature.empty, name
        for p in sig.parameters.values():
            assert p.annotation is not inspect.Parameter.empty, f"{name}({p.name})"


def test_errors_are_one_hierarchy_with_exit_codes() -> None:
    families = {
        barge.UsageError: barge.ExitCode.USAGE,
        barge.NotFoundError: barge.ExitCode.NOT_FOUND,
        barge.ConflictError: barge.ExitCode.CONFLICT,
        barge.BusyError: barge.ExitCode.BUSY,
        barge.IntegrityError: barge.ExitCode.INTEGRITY,
        barge.RegistryError: barge.ExitCode.REGISTRY,
        barge.AuthError: barge.ExitCode.AUTH,
        barge.NoSpaceError: barge.ExitCode.NO_SPACE,
        barge.LimitError: barge.ExitCode.LIMIT,
        barge.UnsupportedError: barge.ExitCode.UNSUPPORTED,
        barge.NotRunningError: barge.ExitCode.NOT_RUNNING,
        barge.Interrupted: barge.ExitCode.INTERRUPTED,
    }
    for cls, code in families.items():
        assert issubclass(cls, barge.BargeError)
        assert cls.exit_code == code
    assert issubclass(barge.AuthError, barge.RegistryError)
    assert issubclass(barge.ReferenceError, barge.UsageError)


def test_push_pull_clone_round_trip(
    barge_home: Path, tmp_path: Path, registry: RunningRegistry
) -> None:
    src = tmp_path / "src.raw"
    digest = _disk(src)
    info = barge.create("vm", barge.CreateOptions(from_disk=src))
    assert info["source"] == "local" and info["disks"][0]["size"] == src.stat().st_size
    rec = Recorder()
    ref = f"{registry.host}/api/vm:v1"
    pushed = barge.push("vm", [ref], barge.PushOptions(chunk_size=8 << 20), reporter=rec)
    assert pushed.references == [f"{registry.host}/api/vm:v1"]
    assert rec.tasks and rec.advanced == src.stat().st_size
    pulled = barge.pull(ref, reporter=rec)
    assert _sha(pulled.path / "disk.img") == digest
    assert not pulled.up_to_date and barge.pull(ref).up_to_date
    cloned = barge.clone(ref, "copy")
    assert cloned.pulled is not None and cloned.pulled.digest == pushed.digest
    assert _sha(Path(barge.Store().vm_path("copy")) / "disk.img") == digest
    names = [v["name"] for v in barge.list_vms()]
    assert names == ["copy", "vm"]
    assert [i["reference"] for i in barge.list_images()] == [ref]
    assert barge.get(ref)["digest"] == pushed.digest


def test_copy_then_verify_is_copy_verify(
    barge_home: Path, tmp_path: Path, registry: RunningRegistry
) -> None:
    """The composition the CLI's copy --verify is: a copy, then a verify of where it went."""
    _disk(tmp_path / "d.raw", 12 << 20)
    barge.create("vm", barge.CreateOptions(from_disk=tmp_path / "d.raw"))
    barge.push("vm", f"{registry.host}/a/vm:v1")
    archive = tmp_path / "vm.tar"
    res = barge.copy(f"{registry.host}/a/vm:v1", f"oci-archive:{archive}:v1")
    (image,) = res.images
    assert image.destination == f"oci-archive:{archive}:v1@{image.digest}"
    report = barge.verify(image.destination, barge.VerifyOptions(deep=True, remote=True))
    assert report.ok and report.kind == "oci-archive" and report.frames > 0
    # the archive, one byte of its biggest blob flipped: the same check finds it
    with tarfile.open(archive) as tar:
        biggest = max(tar.getmembers(), key=lambda m: m.size)
    data = bytearray(archive.read_bytes())
    data[biggest.offset_data + biggest.size // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    bad = barge.verify(image.destination, barge.VerifyOptions(remote=True))
    assert not bad.ok and bad.faults[0].what == f"blob sha256:{Path(biggest.name).name}"


def test_errors_reach_the_caller_typed(
    barge_home: Path, registry: RunningRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(barge.NotFoundError):
        barge.pull(f"{registry.host}/nothing/here:v1")
    with pytest.raises(barge.NotFoundError):
        barge.push("no-such-vm", f"{registry.host}/x/y:v1")
    barge.create("vm", barge.CreateOptions(disk_size=4 << 20))
    with pytest.raises(barge.UsageError, match="a digest names existing content"):
        barge.push("vm", f"{registry.host}/x/y@sha256:" + "a" * 64)
    with pytest.raises(barge.ReferenceError):
        barge.pull("Not A Reference")
    with pytest.raises(barge.ConflictError):
        barge.create("vm", barge.CreateOptions(disk_size=4 << 20))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("BARGE_RETRY_TIMEOUT", "1")
    with pytest.raises(barge.RegistryError) as e:
        barge.pull(f"127.0.0.1:{port}/x/y:v1")
    assert e.value.exit_code == barge.ExitCode.REGISTRY


def test_a_store_of_ones_own(barge_home: Path, tmp_path: Path, registry: RunningRegistry) -> None:
    """``store=`` keeps everything in that store: nothing in $BARGE_HOME."""
    store = barge.Store(tmp_path / "mine")
    barge.create("vm", barge.CreateOptions(disk_size=4 << 20), store=store)
    assert [v["name"] for v in barge.list_vms(store=store)] == ["vm"]
    res: Any = barge.push("vm", f"{registry.host}/own/vm:v1", store=store)
    assert barge.pull(f"{registry.host}/own/vm:v1", store=store).digest == res.digest
    assert (tmp_path / "mine" / "vms" / "vm").is_dir()
    assert not (barge_home / "vms").exists() and not (barge_home / "cache").exists()
