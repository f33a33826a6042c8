"""Local VM operations: create, get, set, clone, rename, delete.

This is the library API the CLI wraps. Each operation takes the VM's lock, builds anything new
in a staging directory and renames it into place, so another process never sees a half VM.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from barge.disk.clone import clone_file
from barge.disk.sparse import allocated_bytes, can_reflink
from barge.errors import ConflictError, NoSpaceError, UsageError
from barge.store import VM, Disk, Store, VMConfig, validate_vm_name
from barge.store.space import is_no_space
from barge.store.vmconfig import ARCHES, OSES, random_mac, validate_ssh_user
from barge.vm.boot import INITRAMFS_FILE, KERNEL_FILE, validate_create
from barge.vm.state import status

DEFAULT_DISK_NAME = "disk.img"
# files of a cached image that describe it rather than belong to the VM
CACHE_METADATA = frozenset({"config.json", "manifest.json", "index.json"})
_QEMU_IMAGE_FORMATS = {"qcow2", "vmdk", "vdi", "vhdx", "vpc", "qed", "qcow", "parallels", "dmg"}


@dataclass(frozen=True)
class CloneResult:
    """A VM made by a clone: how its disks were copied (``reflink``: copy-on-write, or
    ``sparse-copy``) and how many bytes that wrote."""

    vm: VM
    method: str  # "reflink" or "sparse-copy"
    bytes_written: int


def _qemu_img_info(path: Path) -> dict[str, Any]:
    if shutil.which("qemu-img") is None:
        raise UsageError("qemu-img is not installed (Debian package qemu-utils)")
    proc = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "unreadable"
        raise UsageError(f"{path} is not a readable disk image: {msg}")
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


def _check_space(directory: Path, needed: int) -> None:
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise NoSpaceError(
            f"not enough space in {directory}: need {needed} bytes, {free} available"
        )


def import_disk(src: Path, dst: Path, *, min_size: int | None = None) -> int:
    """Import a raw or qcow2 (or other qemu-img format) image as a sparse raw disk.

    Returns the virtual size. A raw source must look like a disk (a non-empty multiple of 512
    bytes); anything qemu-img recognises as an image format is converted."""
    if not src.is_file():
        raise UsageError(f"--from-disk {src}: no such file")
    info = _qemu_img_info(src)
    fmt = str(info.get("format", ""))
    vsize = int(info.get("virtual-size", 0))
    if fmt == "raw":
        vsize = src.stat().st_size  # qemu-img rounds a raw file's size up to a sector
        if vsize == 0 or vsize % 512:
            raise UsageError(
                f"--from-disk {src} is not a disk image: qemu-img sees no image format and its "
                f"size ({vsize} bytes) is not a non-empty multiple of 512"
            )
    elif fmt not in _QEMU_IMAGE_FORMATS:
        raise UsageError(f"--from-disk {src}: unsupported image format {fmt!r}")
    data_estimate = int(info.get("actual-size", vsize))
    _check_space(dst.parent, data_estimate)
    proc = subprocess.run(
        ["qemu-img", "convert", "-q", "-f", fmt, "-O", "raw", "-S", "4k", str(src), str(dst)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        err = proc.stderr.strip()
        if "No space left" in err:
            raise NoSpaceError(f"no space left while importing {src}")
        raise UsageError(f"cannot import {src}: {err or 'qemu-img convert failed'}")
    size = os.path.getsize(dst)
    if min_size is not None and min_size > size:
        os.truncate(dst, min_size)
        size = min_size
    return size


def create_vm(
    store: Store,
    name: str,
    *,
    disk_size: int | None = None,
    from_disk: Path | None = None,
    cpus: int = 2,
    memory: int = 4 << 30,
    os_name: str = "linux",
    arch: str = "x86_64",
    boot: str = "uefi",
    kernel: Path | None = None,
    initramfs: Path | None = None,
    cmdline: str = "",
    ssh_user: str | None = None,
) -> VM:
    validate_vm_name(name)
    validate_create(boot, kernel, initramfs, arch)
    if ssh_user is not None:
        validate_ssh_user(ssh_user)
    if os_name not in OSES:
        raise UsageError(f"unknown --os {os_name!r}: choose one of {', '.join(OSES)}")
    if arch not in ARCHES:
        raise UsageError(f"unknown --arch {arch!r}: choose one of {', '.join(ARCHES)}")
    if cpus < 1:
        raise UsageError("--cpus must be at least 1")
    if disk_size is None and from_disk is None:
        raise UsageError("give --disk-size, --from-disk, or both")
    with store.lock_vm(name):
        if store.vm_exists(name):
            raise ConflictError(f"a VM named {name!r} already exists")
        with store.staging("create") as tmp:
            disk = tmp / DEFAULT_DISK_NAME
            if from_disk is not None:
                size = import_disk(Path(from_disk), disk, min_size=disk_size)
            else:
                assert disk_size is not None
                with open(disk, "wb") as f:
                    f.truncate(disk_size)
                size = disk_size
            cfg = VMConfig.new(
                os_name=os_name,
                arch=arch,
                cpus=cpus,
                memory=memory,
                disks=[Disk(DEFAULT_DISK_NAME, size)],
                boot=boot,
            )
            if kernel is not None:
                clone_file(kernel, tmp / KERNEL_FILE)
                if initramfs is not None:
                    clone_file(initramfs, tmp / INITRAMFS_FILE)
                cfg.set_kernel_boot(
                    KERNEL_FILE, INITRAMFS_FILE if initramfs is not None else None, cmdline
                )
            elif cmdline:
                raise UsageError("--cmdline goes with --boot kernel")
            if ssh_user is not None:
                cfg.set("sshUser", ssh_user)
            (tmp / "config.json").write_bytes(cfg.to_bytes())
            store.publish_dir(tmp, store.vm_path(name))
    return store.get_vm(name)


def set_vm(
    store: Store,
    name: str,
    *,
    cpus: int | None = None,
    memory: int | None = None,
    disk_size: int | None = None,
) -> VM:
    with store.lock_vm(name):
        vm = store.get_vm(name)
        cfg = vm.config
        if cpus is not None:
            cfg.cpus = cpus
        if memory is not None:
            cfg.memory = memory
        if disk_size is not None:
            disk = cfg.disks[0]
            if disk_size < disk.size:
                raise UsageError(
                    f"disk size can only grow: {name!r} has {disk.size} bytes, asked for "
                    f"{disk_size}; shrinking would cut off data"
                )
            if disk_size > disk.size:
                os.truncate(vm.disk_path(disk.name), disk_size)
                cfg.set_disk_size(disk.name, disk_size)
        store.write_config(vm, cfg)
        return store.get_vm(name)


def clone_vm(store: Store, src: str, dst: str) -> CloneResult:
    """Clone a local VM: copy-on-write where the filesystem can, else a sparse copy."""
    validate_vm_name(dst)
    hint = f"or `barge clone --force {src} {dst}` for a crash-consistent copy of it running"
    with store.lock_vm(src, shared=True, running_hint=hint), store.lock_vm(dst):
        vm = store.get_vm(src)
        if store.vm_exists(dst):
            raise ConflictError(f"a VM named {dst!r} already exists")
        return clone_dir(store, vm.path, vm.config, dst)


def clone_dir(store: Store, src_dir: Path, config: VMConfig, dst: str) -> CloneResult:
    """Make local VM ``dst`` from a VM-shaped directory (a VM or a cached image).

    The caller holds ``dst``'s lock and whatever protects ``src_dir``. Refused up front (exit
    9) when a copy would not fit (no copy-on-write here); running out of space mid-copy removes
    the partial copy and says so."""
    methods = set()
    written = 0
    with store.staging("clone") as tmp:
        if not can_reflink(tmp):
            needed = sum(allocated_bytes(src_dir / d.name) for d in config.disks)
            store.require_space(needed, f"clone a VM named {dst!r} (a full copy here)")
        for d in config.disks:
            try:
                method = clone_file(src_dir / d.name, tmp / d.name)
            except OSError as e:
                if not is_no_space(e):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                raise NoSpaceError(
                    f"no space left on the filesystem of {store.home} while cloning a VM named "
                    f"{dst!r}; the partial copy was removed",
                    hint=store.space_hint(None),
                ) from e
            methods.add(method)
            if method != "reflink":
                written += allocated_bytes(tmp / d.name)
        for extra in sorted(os.listdir(src_dir)):
            p = src_dir / extra
            if extra in CACHE_METADATA or extra.startswith(".") or not p.is_file():
                continue
            if extra in {d.name for d in config.disks}:
                continue
            shutil.copyfile(p, tmp / extra)  # e.g. NVRAM
        cfg = VMConfig(config.to_dict())
        cfg.mac_address = random_mac()  # two clones must not share a MAC on one network
        cfg.set("instanceUuid", None)  # a new machine to cloud-init (it made a new MAC too)
        (tmp / "config.json").write_bytes(cfg.to_bytes())
        store.publish_dir(tmp, store.vm_path(dst))
    method = "reflink" if methods == {"reflink"} else "sparse-copy"
    return CloneResult(store.get_vm(dst), method, written)


def rename_vm(store: Store, old: str, new: str) -> VM:
    validate_vm_name(new)
    if old == new:
        raise ConflictError(f"{old!r} is already called that")
    with store.lock_vm(old), store.lock_vm(new):
        store.get_vm(old)
        if store.vm_path(new).exists():
            raise ConflictError(f"a VM named {new!r} already exists")
        os.rename(store.vm_path(old), store.vm_path(new))
        store.catalog.forget_file_states(str(store.vm_path(old)))
    return store.get_vm(new)


def delete_vm(store: Store, name: str) -> None:
    hint = f"or `barge delete --force {name}` to stop and delete it"
    with store.lock_vm(name, running_hint=hint):
        vm = store.get_vm(name)
        trash = store.tmp_dir / f"gc-{uuid.uuid4().hex[:12]}"
        os.rename(vm.path, trash)  # disappears from `list` atomically
        store.catalog.forget_file_states(str(vm.path))
        shutil.rmtree(trash, ignore_errors=True)


def vm_info(store: Store, vm: VM) -> dict[str, Any]:
    cfg = vm.config
    info: dict[str, Any] = {
        "name": vm.name,
        "source": "local",
        "os": cfg.os,
        "arch": cfg.arch,
        "platform": cfg.platform,
        "cpus": cfg.cpus,
        "memory": cfg.memory,
        "boot": cfg.boot,
        "macAddress": cfg.mac_address,
        "disks": [
            {
                "name": d.name,
                "size": d.size,
                "allocated": allocated_bytes(vm.disk_path(d.name))
                if vm.disk_path(d.name).exists()
                else 0,
            }
            for d in cfg.disks
        ],
        "sizeOnDisk": store.vm_disk_usage(vm),
        "state": "stopped",
        "origin": cfg.source,
        "sshUser": cfg.ssh_user,
    }
    if cfg.boot == "kernel":
        info.update(kernel=cfg.kernel, initramfs=cfg.initramfs, cmdline=cfg.cmdline)
    if cfg.nvram:
        info["nvram"] = cfg.nvram
    run = status(vm.path, lambda: store.try_lock_vm(vm.name))
    if run["running"]:
        info.update(state="running", run=run)
    elif store.is_locked(vm.name):
        info["state"] = "locked"
    info["running"] = run["running"]
    return info
