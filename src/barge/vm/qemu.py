"""The QEMU command line: a :class:`LaunchSpec` in, argv out (pure, so it is unit-tested).

Headless by default (``-nodefaults``, ``-display none``): the serial console goes to a log
file (or the terminal with ``--serial``), control goes through a QMP socket, disks are
virtio-blk with ``discard=unmap`` and ``detect-zeroes=unmap`` (the guest's TRIM and zero
writes punch holes: disks stay sparse), the NoCloud seed is the last, read-only virtio disk,
and a virtio RNG feeds the guest's entropy pool (boots do not stall waiting for it). QEMU runs
with its runtime directory as working directory and gets the sockets and logs by relative
names, so deep store paths never exceed a Unix socket's 108-byte limit.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from barge.errors import BargeError, UnsupportedError
from barge.vm.boot import BootPlan

QEMU_PACKAGE = {"x86_64": "qemu-system-x86", "aarch64": "qemu-system-arm"}


@dataclass(frozen=True)
class Drive:
    path: Path
    format: str = "raw"
    readonly: bool = False


@dataclass(frozen=True)
class LaunchSpec:
    name: str
    arch: str
    accel: str  # "kvm" or "tcg"
    cpus: int
    memory_mib: int
    boot: BootPlan
    drives: list[Drive]
    mac: str | None = None
    netdev: str | None = None  # a "-netdev user,…" value, or None with tap
    tap: str | None = None  # tap interface name for bridged networking
    serial_log: str = "serial.log"  # relative to QEMU's working directory
    serial_stdio: bool = False
    qmp: str = "qmp.sock"
    vnc_display: int | None = None  # VNC display number on 127.0.0.1 (port 5900 + N)
    graphics: bool = False
    paused: bool = False
    extra: list[str] = field(default_factory=list)


def find_qemu(arch: str) -> str:
    binary = f"qemu-system-{arch}"
    path = shutil.which(binary)
    if path is None:
        pkg = QEMU_PACKAGE.get(arch)
        if pkg is None:
            raise UnsupportedError(f"barge cannot run {arch} guests")
        raise BargeError(
            f"QEMU is not installed: {binary} not found (Debian packages {pkg} and qemu-utils)"
        )
    return path


def _opt(value: str | Path) -> str:
    """A value inside a QEMU ``key=value,…`` list: commas are doubled."""
    return str(value).replace(",", ",,")


def uses_hvc_console(cmdline: str) -> bool:
    return re.search(r"(^|\s)console=hvc\d", cmdline) is not None


def build_argv(spec: LaunchSpec, qemu: str) -> list[str]:
    a = [qemu, "-nodefaults", "-no-user-config", "-name", _opt(spec.name)]
    a += ["-machine", "q35" if spec.arch == "x86_64" else "virt", "-accel", spec.accel]
    a += ["-cpu", "host" if spec.accel == "kvm" else "max"]
    a += ["-smp", str(spec.cpus), "-m", f"{spec.memory_mib}M"]

    b = spec.boot
    if b.method == "uefi":
        assert b.firmware is not None and b.nvram is not None
        a += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_opt(b.firmware)}"]
        a += ["-drive", f"if=pflash,format=raw,unit=1,file={_opt(b.nvram)}"]
    elif b.method == "kernel":
        assert b.kernel is not None
        a += ["-kernel", str(b.kernel)]
        if b.initramfs is not None:
            a += ["-initrd", str(b.initramfs)]
        if b.cmdline:
            a += ["-append", b.cmdline]

    for i, d in enumerate(spec.drives):
        opts = f"file={_opt(d.path)},if=none,id=disk{i},format={d.format}"
        if d.readonly:
            opts += ",readonly=on"
        else:
            opts += ",discard=unmap,detect-zeroes=unmap"
        a += ["-drive", opts, "-device", f"virtio-blk-pci,drive=disk{i}"]

    mac = f",mac={spec.mac}" if spec.mac else ""
    if spec.tap:
        a += ["-netdev", f"tap,id=net0,ifname={spec.tap},script=no,downscript=no"]
        a += ["-device", f"virtio-net-pci,netdev=net0{mac}"]
    elif spec.netdev:
        a += ["-netdev", spec.netdev, "-device", f"virtio-net-pci,netdev=net0{mac}"]

    a += ["-object", "rng-random,id=rng0,filename=/dev/urandom"]
    a += ["-device", "virtio-rng-pci,rng=rng0"]

    log = _opt(spec.serial_log)
    if spec.serial_stdio:
        a += ["-chardev", f"stdio,id=console0,signal=off,logfile={log}"]
    else:
        a += ["-chardev", f"file,id=console0,path={log}"]
    if b.method == "kernel" and uses_hvc_console(b.cmdline):
        a += ["-device", "virtio-serial-pci,id=vser0", "-device", "virtconsole,chardev=console0"]
    else:
        a += ["-serial", "chardev:console0"]

    a += ["-qmp", f"unix:{_opt(spec.qmp)},server=on,wait=off"]
    if spec.vnc_display is not None or spec.graphics:
        if spec.arch == "x86_64":
            a += ["-device", "VGA"]
        else:
            a += ["-device", "virtio-gpu-pci"]
        a += ["-device", "qemu-xhci", "-device", "usb-kbd", "-device", "usb-tablet"]
    if spec.vnc_display is not None:
        a += ["-vnc", f"127.0.0.1:{spec.vnc_display}"]
    if not spec.graphics:
        a += ["-display", "none"]
    if spec.paused:
        a.append("-S")
    return a + spec.extra
