"""Boot methods and whether a guest can run on this host.

* ``kernel`` — direct kernel boot: QEMU loads the kernel (and initramfs) from the VM
  directory with the command line from the VM config. Vetu images are exactly this (their
  ``kernel``, ``initramfs`` and ``cmdline``), so a pulled Vetu image boots unchanged.
* ``uefi`` — the firmware (Debian's ``ovmf``; ``qemu-efi-aarch64`` on arm64) boots the disk.
  Its variable store, the VM's NVRAM, is a per-VM copy of the firmware's ``*_VARS`` template
  made on first boot and kept in the VM directory as ``efi-vars.fd`` (it travels with push and
  clone: boot entries survive).
* ``bios`` — SeaBIOS boots the disk's MBR (x86 only).

Files are checked before QEMU starts: a missing kernel is "not found", a kernel without a
kernel header or an NVRAM that is not a firmware volume of the template's size is "corrupt"
(exit 6), with the path.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from barge.errors import IntegrityError, NotFoundError, UnsupportedError, UsageError
from barge.store import VM
from barge.store.vmconfig import VMConfig

NVRAM_FILE = "efi-vars.fd"
KERNEL_FILE = "kernel"
INITRAMFS_FILE = "initramfs"

#: (code, vars template) pairs, preferred first; the one whose template size matches an
#: existing NVRAM is used for that VM
FIRMWARE: dict[str, list[tuple[str, str]]] = {
    "x86_64": [
        ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
        ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
        ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
        ("/usr/share/edk2/x64/OVMF_CODE.4m.fd", "/usr/share/edk2/x64/OVMF_VARS.4m.fd"),
    ],
    "aarch64": [
        ("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd"),
        ("/usr/share/edk2/aarch64/QEMU_CODE.fd", "/usr/share/edk2/aarch64/QEMU_VARS.fd"),
    ],
}
FIRMWARE_PACKAGE = {"x86_64": "ovmf", "aarch64": "qemu-efi-aarch64"}


@dataclass(frozen=True)
class BootPlan:
    method: str  # "kernel", "uefi" or "bios"
    kernel: Path | None = None
    initramfs: Path | None = None
    cmdline: str = ""
    firmware: Path | None = None  # UEFI code (read-only pflash)
    nvram: Path | None = None  # the VM's variable store (writable pflash)


def check_host(name: str, cfg: VMConfig, host: str) -> None:
    """Refuse, in one line, a guest that cannot run on this host at all."""
    src = cfg.source or {}
    if cfg.os == "darwin":
        raise UnsupportedError(
            f"VM {name!r} is a macOS guest: it runs only under Apple's Virtualization.framework "
            "on a Mac, not on QEMU"
        )
    if src.get("format") == "tart" and cfg.arch != host:
        raise UnsupportedError(
            f"VM {name!r} is a Tart image for Apple Silicon ({cfg.arch}) and this host is "
            f"{host}: it cannot run here (pull, push, clone and verify still work)"
        )
    if cfg.boot not in ("kernel", "uefi", "bios"):
        raise UnsupportedError(f"VM {name!r} has an unknown boot method {cfg.boot!r}")
    if cfg.boot == "bios" and cfg.arch != "x86_64":
        raise UnsupportedError(f"VM {name!r}: BIOS boot exists only for x86_64 guests")


def looks_like_kernel(head: bytes, arch: str) -> bool:
    """A Linux kernel image QEMU can load: x86 bzImage (``HdrS`` at 0x202), an ELF vmlinux
    (PVH), an arm64 ``Image`` (``ARMd`` at 0x38), or a PE/EFI-stub or gzip-wrapped arm64
    image."""
    if head[:4] == b"\x7fELF":
        return True
    if arch == "x86_64":
        return head[0x202:0x206] == b"HdrS"
    return head[0x38:0x3C] == b"ARM\x64" or head[:2] in (b"MZ", b"\x1f\x8b")


def _kernel_file(vm: VM, name: str, what: str) -> Path:
    path = vm.path / name
    if not path.is_file():
        raise NotFoundError(
            f"VM {vm.name!r} boots a kernel but its {what} file {path} is missing",
            hint="recreate the VM with `barge create --kernel`, or clone it again",
        )
    return path


def _firmware(arch: str, existing_size: int | None) -> tuple[Path, Path]:
    pairs = [(Path(c), Path(v)) for c, v in FIRMWARE.get(arch, [])]
    present = [(c, v) for c, v in pairs if c.is_file() and v.is_file()]
    if not present:
        raise UnsupportedError(
            f"UEFI firmware for {arch} is not installed (Debian package "
            f"{FIRMWARE_PACKAGE.get(arch, 'ovmf')})"
        )
    if existing_size is not None:
        for c, v in present:
            if v.stat().st_size == existing_size:
                return c, v
    return present[0]


def _check_nvram(path: Path, template: Path) -> None:
    size, want = path.stat().st_size, template.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if size != want or head[40:44] != b"_FVH":
        what = f"{size} bytes, expected {want}" if size != want else "no firmware volume header"
        raise IntegrityError(
            f"the VM's NVRAM {path} is corrupt ({what} like {template.name})",
            hint=f"remove it to boot with a fresh copy of {template} (EFI boot entries are lost)",
        )


def plan(vm: VM, note: Callable[[str], None]) -> tuple[BootPlan, VMConfig | None]:
    """The boot material of ``vm``; makes its NVRAM on first UEFI boot. Returns the plan and
    a changed config to save (the NVRAM's name), if any. The caller holds the VM's lock."""
    cfg = vm.config
    if cfg.boot == "kernel":
        kernel = _kernel_file(vm, cfg.kernel or KERNEL_FILE, "kernel")
        with open(kernel, "rb") as f:
            head = f.read(0x400)
        if not looks_like_kernel(head, cfg.arch):
            raise IntegrityError(
                f"VM {vm.name!r}: {kernel} is not a Linux kernel for {cfg.arch} "
                "(no kernel image header)"
            )
        initramfs = None
        if cfg.initramfs:
            initramfs = _kernel_file(vm, cfg.initramfs, "initramfs")
        elif (vm.path / INITRAMFS_FILE).is_file():
            initramfs = vm.path / INITRAMFS_FILE
        if initramfs is not None and initramfs.stat().st_size == 0:
            raise IntegrityError(f"VM {vm.name!r}: the initramfs {initramfs} is empty")
        return BootPlan("kernel", kernel, initramfs, cfg.cmdline), None
    if cfg.boot == "bios":
        return BootPlan("bios"), None
    name = cfg.nvram or NVRAM_FILE
    nvram = vm.path / name
    exists = nvram.is_file()
    code, template = _firmware(cfg.arch, nvram.stat().st_size if exists else None)
    changed = None
    if exists:
        _check_nvram(nvram, template)
    else:
        if cfg.nvram:
            note(f"the VM's NVRAM {nvram} is missing: starting from a fresh copy of {template}")
        tmp = vm.path / f".{name}.{uuid.uuid4().hex[:8]}"
        shutil.copyfile(template, tmp)
        tmp.rename(nvram)
        if cfg.nvram != name:
            changed = VMConfig(cfg.to_dict())
            changed.set("nvram", name)
    return BootPlan("uefi", firmware=code, nvram=nvram), changed


def validate_create(boot: str, kernel: Path | None, initramfs: Path | None, arch: str) -> None:
    """The checks of ``barge create --boot/--kernel/--initramfs``."""
    if boot != "kernel":
        if kernel is not None or initramfs is not None:
            raise UsageError("--kernel and --initramfs go with --boot kernel")
        return
    if kernel is None:
        raise UsageError("--boot kernel needs --kernel FILE")
    for what, p in (("--kernel", kernel), ("--initramfs", initramfs)):
        if p is not None and not p.is_file():
            raise UsageError(f"{what} {p}: no such file")
    with open(kernel, "rb") as f:
        head = f.read(0x400)
    if not looks_like_kernel(head, arch):
        raise UsageError(f"--kernel {kernel} is not a Linux kernel image for {arch}")
