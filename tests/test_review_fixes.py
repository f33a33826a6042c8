"""Regression tests for bugs found in review (copy, verify, inspect, import)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from barge.errors import ExitCode, NoSpaceError
from barge.store import Store
from barge.transfer.copy import copy
from barge.transfer.pull import pull
from barge.transfer.push import push
from barge.verify import verify
from clitest import barge
from localvms import SMALL, make_vm
from registries import RunningRegistry
from seed import push_image, put_manifest


@pytest.fixture
def store(barge_home: Path, tmp_path: Path) -> Store:
    s = Store()
    make_vm(s, tmp_path)
    return s


def _open_archives() -> list[str]:
    """The .tar files this process holds open."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.endswith(".tar"):
            out.append(target)
    return out


def test_inspect_malformed_manifest_is_an_integrity_error(
    barge_home: Path, registry: RunningRegistry
) -> None:
    """A manifest the registry accepted but barge cannot parse: exit 6, not 'internal error'."""
    _, data = push_image(registry, "r/x", "ok")
    doc = json.loads(data)
    doc["layers"][0]["size"] = -1
    put_manifest(registry, "r/x", "bad", json.dumps(doc).encode())
    err = barge("inspect", f"{registry.host}/r/x:bad", code=ExitCode.INTEGRITY)
    assert "invalid manifest" in err and "internal error" not in err


def test_copy_from_archive_and_verify_archive_close_their_files(
    barge_home: Path, registry: RunningRegistry, tmp_path: Path
) -> None:
    """Reading an oci-archive (as a source, or to --verify one just written) leaks no fd."""
    push_image(registry, "r/x", "v1")
    store = Store()
    archive = tmp_path / "img.tar"
    src = f"{registry.host}/r/x:v1"
    copy(store, src, f"oci-archive:{archive}")

    def round_(i: int) -> None:
        copy(store, f"oci-archive:{archive}", f"oci:{tmp_path}/dir{i}")
        verify(store, f"oci-archive:{archive}")
        res = copy(store, src, f"oci-archive:{tmp_path}/w{i}.tar")  # then --verify's check
        assert verify(store, res.images[0].destination, remote=True).ok

    for i in range(2):
        round_(i)
    assert _open_archives() == []


def test_verify_cache_entry_without_manifest_or_frame_index_fails(
    store: Store, registry: RunningRegistry
) -> None:
    """verify promises manifest.json hashes to the digest and every frame is checked against
    index.json: a cache entry missing either is damaged, not OK."""
    ref = f"{registry.host}/team/vm:v1"
    push(store, "vm", [ref], SMALL)
    res = pull(store, ref)
    assert verify(store, ref).ok
    os.chmod(res.path, 0o755)
    (res.path / "index.json").unlink()
    rep = verify(store, ref)
    assert not rep.ok and rep.faults[0].what == "index.json", rep.faults
    (res.path / "manifest.json").unlink()
    err = barge("verify", ref, code=ExitCode.INTEGRITY)
    assert "manifest.json is missing" in err


def test_failed_import_keeps_no_cache_reference_to_the_layout(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """import is a pull then a clone: when the clone fails, the layout's cache entry goes too."""
    layout = tmp_path / "layout"
    barge("export", "vm", f"oci:{layout}", "--chunk-size", "8M")

    def no_space(*a: object, **k: object) -> None:
        raise NoSpaceError("no space left (simulated)")

    monkeypatch.setattr("barge.transfer.clone.clone_dir", no_space)
    barge("import", f"oci:{layout}", "vm2", code=ExitCode.NO_SPACE)
    assert json.loads(barge("list", "--source", "oci", "--format", "json")) == []
    assert not list(store.cache_dir.iterdir())
