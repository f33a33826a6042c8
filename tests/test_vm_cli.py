"""The local VM commands, end to end through the real CLI entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from barge.errors import ExitCode
from clitest import barge


def listing() -> list[dict]:
    return json.loads(barge("list", "--format", "json"))


def test_create_list_get_set_clone_rename_delete(barge_home: Path) -> None:
    barge("create", "vm1", "--disk-size", "20G", "--cpus", "3", "--memory", "2G")
    rows = listing()
    assert [r["name"] for r in rows] == ["vm1"]
    info = json.loads(barge("get", "vm1", "--format", "json"))
    assert info["cpus"] == 3 and info["memory"] == 2 << 30
    assert info["disks"][0]["size"] == 20 << 30
    assert info["disks"][0]["allocated"] < 1 << 20  # sparse

    # write 8 MiB of data 1 GiB into the disk, then clone: about 8 MiB written, holes kept
    disk = barge_home / "vms" / "vm1" / "disk.img"
    with open(disk, "r+b") as f:
        f.seek(1 << 30)
        f.write(os.urandom(8 << 20))
    out = barge("clone", "vm1", "vm2")
    assert "vm2" in out
    clone_disk = barge_home / "vms" / "vm2" / "disk.img"
    assert clone_disk.stat().st_size == 20 << 30
    assert clone_disk.stat().st_blocks * 512 < 16 << 20
    with open(disk, "rb") as a, open(clone_disk, "rb") as b:
        a.seek(1 << 30)
        b.seek(1 << 30)
        assert a.read(8 << 20) == b.read(8 << 20)
    c1 = json.loads(barge("get", "vm1", "--format", "json"))
    c2 = json.loads(barge("get", "vm2", "--format", "json"))
    assert c1["macAddress"] != c2["macAddress"]

    barge("set", "vm2", "--cpus", "1", "--disk-size", "21G")
    assert json.loads(barge("get", "vm2", "--format", "json"))["disks"][0]["size"] == 21 << 30
    err = barge("set", "vm2", "--disk-size", "10G", code=ExitCode.USAGE)
    assert "only grow" in err
    barge("rename", "vm2", "vm3")
    assert sorted(r["name"] for r in listing()) == ["vm1", "vm3"]
    barge("delete", "vm3")
    assert [r["name"] for r in listing()] == ["vm1"]
    assert os.listdir(barge_home / "tmp") == []


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["get", "nope"], ExitCode.NOT_FOUND, "no VM named 'nope'"),
        (["delete", "nope"], ExitCode.NOT_FOUND, "no VM named"),
        (["create", "a/b", "--disk-size", "1G"], ExitCode.USAGE, "path separators"),
        (["create", "..", "--disk-size", "1G"], ExitCode.USAGE, "'..'"),
        (["create", "", "--disk-size", "1G"], ExitCode.USAGE, "empty"),
        (["create", "ok", "--disk-size", "lots"], ExitCode.USAGE, "invalid --disk-size"),
        (["create", "ok", "--disk-size", "0"], ExitCode.USAGE, "greater than zero"),
        (["create", "ok"], ExitCode.USAGE, "--disk-size"),
        (["create", "ok", "--disk-size", "1G", "--arch", "mips"], ExitCode.USAGE, "--arch"),
        (["rename", "nope", "x"], ExitCode.NOT_FOUND, "no VM named"),
        (["clone", "nope", "x"], ExitCode.NOT_FOUND, "no VM named"),
    ],
)
def test_bad_input_is_one_clear_line(
    barge_home: Path, args: list[str], code: int, needle: str
) -> None:
    err = barge(*args, code=code)
    assert needle in err
    assert listing() == []


def test_existing_names_conflict(barge_home: Path) -> None:
    barge("create", "a", "--disk-size", "1M")
    barge("create", "b", "--disk-size", "1M")
    assert "already exists" in barge("create", "a", "--disk-size", "1M", code=ExitCode.CONFLICT)
    assert "already exists" in barge("clone", "a", "b", code=ExitCode.CONFLICT)
    assert "already exists" in barge("rename", "a", "b", code=ExitCode.CONFLICT)
    assert sorted(r["name"] for r in listing()) == ["a", "b"]


def test_import_qcow2_and_raw_keeps_sparse(barge_home: Path, tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"\x5a" * (1 << 20))
    qcow = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow)], check=True)
    barge("create", "fromraw", "--from-disk", str(raw))
    barge("create", "fromqcow", "--from-disk", str(qcow), "--disk-size", "128M")
    for name, size in (("fromraw", 64 << 20), ("fromqcow", 128 << 20)):
        disk = barge_home / "vms" / name / "disk.img"
        assert disk.stat().st_size == size
        assert disk.stat().st_blocks * 512 <= 2 << 20
        with open(disk, "rb") as f:
            f.seek(32 << 20)
            assert f.read(1 << 20) == b"\x5a" * (1 << 20)


def test_import_rejects_non_disks(barge_home: Path, tmp_path: Path) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("hello\n")
    err = barge("create", "x", "--from-disk", str(txt), code=ExitCode.USAGE)
    assert "not a disk image" in err
    err = barge("create", "x", "--from-disk", str(tmp_path / "missing.img"), code=ExitCode.USAGE)
    assert "no such file" in err
    assert listing() == []


def test_locked_vm_is_refused(barge_home: Path) -> None:
    from barge.store import Store

    barge("create", "busy", "--disk-size", "1M")
    store = Store()
    with store.lock_vm("busy"):
        err = barge("set", "busy", "--cpus", "4", code=ExitCode.BUSY)
        assert "in use" in err
        barge("delete", "busy", code=ExitCode.BUSY)
    barge("delete", "busy")


def test_half_written_vm_is_never_listed(barge_home: Path) -> None:
    """A process killed while creating leaves debris only in tmp/, which list ignores and GC
    removes once the process's lease is gone."""
    code = (
        "import os, sys\n"
        "from barge.store import Store\n"
        "s = Store()\n"
        "cm = s.staging('create')\n"
        "p = cm.__enter__()\n"
        "(p / 'config.json').write_text('{}')\n"
        "os._exit(9)\n"
    )
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code], env=env, check=False)
    assert proc.returncode == 9
    from barge.store import Store

    store = Store()
    assert len(os.listdir(store.tmp_dir)) == 1
    assert listing() == []
    # the dead process's lease expires; the debris goes once it is old enough
    debris = store.tmp_dir / os.listdir(store.tmp_dir)[0]
    os.utime(debris, (0, 0))
    store.gc()
    assert os.listdir(store.tmp_dir) == []


def test_config_preserves_unknown_fields(barge_home: Path) -> None:
    barge("create", "vm", "--disk-size", "1M")
    cfg_path = barge_home / "vms" / "vm" / "config.json"
    doc = json.loads(cfg_path.read_text())
    doc["futureField"] = {"x": [1, 2]}
    cfg_path.write_text(json.dumps(doc))
    barge("set", "vm", "--cpus", "5")
    doc = json.loads(cfg_path.read_text())
    assert doc["futureField"] == {"x": [1, 2]} and doc["cpus"] == 5


def test_console_script_help_has_no_traceback(barge_home: Path) -> None:
    exe = Path(sys.executable).parent / "barge"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    for cmd in ("create", "list", "get", "set", "clone", "rename", "delete"):
        assert cmd in out.stdout
    bad = subprocess.run([str(exe), "get", "zz"], capture_output=True, text=True, check=False)
    assert bad.returncode == ExitCode.NOT_FOUND
    assert bad.stderr.startswith("barge: error: no VM named 'zz'")
