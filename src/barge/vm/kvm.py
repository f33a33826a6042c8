"""The KVM probe: use KVM only when ``/dev/kvm`` is present *and usable*, else TCG with a reason.

A ``/dev/kvm`` that opens is not enough. Some hosts expose a paravirtual nested KVM
(``kvm_pvm``): it answers every ioctl and runs small test code, but stock guest kernels never
reach their console under it (QEMU's ``-cpu host`` even aborts setting an MSR). So the probe,
in order: the device exists and opens read-write; ``KVM_GET_API_VERSION`` is 12; the KVM
vendor module is not ``kvm_pvm``; on x86 the CPU has hardware virtualization (``vmx``/``svm``
in ``/proc/cpuinfo``: a KVM without it is a software one); ``KVM_CREATE_VM`` works; and a
bounded test boot: a one-vCPU VM runs three real-mode instructions (``mov al, 0x42``,
``out 0x10, al``, ``hlt``) and must exit with that I/O write and then the halt, within 2 s.
Each failure is a sentence saying why, shown once as the TCG warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import platform
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from barge.errors import UnsupportedError

KVM_API_VERSION = 12
_KVM_GET_API_VERSION = 0xAE00
_KVM_CREATE_VM = 0xAE01
_KVM_GET_VCPU_MMAP_SIZE = 0xAE04
_KVM_CREATE_VCPU = 0xAE41
_KVM_SET_USER_MEMORY_REGION = 0x4020AE46
_KVM_SET_TSS_ADDR = 0xAE47
_KVM_RUN = 0xAE80
_KVM_GET_REGS = 0x8090AE81
_KVM_SET_REGS = 0x4090AE82
_KVM_GET_SREGS = 0x8138AE83
_KVM_SET_SREGS = 0x4138AE84
_KVM_EXIT_IO = 2
_KVM_EXIT_HLT = 5
_TEST_BOOT_SECONDS = 2.0


@dataclass(frozen=True)
class Accel:
    """The accelerator a VM runs with, and why it is not KVM when it is not."""

    name: str  # "kvm" or "tcg"
    reason: str | None = None  # the warning to show once, when KVM was wanted but unusable

    @property
    def warning(self) -> str | None:
        if self.name == "tcg" and self.reason:
            return f"KVM not used: {self.reason}; running under TCG (emulation, much slower)"
        return None


def host_arch() -> str:
    m = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def choose(requested: str, guest_arch: str, *, arch: str | None = None) -> Accel:
    """The accelerator for a guest: ``requested`` is ``auto``, ``kvm`` or ``tcg``."""
    arch = arch or host_arch()
    if requested == "tcg":
        return Accel("tcg")
    if guest_arch != arch:
        why = f"the guest is {guest_arch} and this host {arch} (emulated)"
        if requested == "kvm":
            raise UnsupportedError(f"--accel kvm: {why}")
        return Accel("tcg", why)
    found = probe(arch)
    if requested == "kvm" and found.name != "kvm":
        raise UnsupportedError(f"--accel kvm: KVM is not usable here: {found.reason}")
    return found


def probe(
    arch: str | None = None,
    *,
    dev: Path = Path("/dev/kvm"),
    sys_module: Path = Path("/sys/module"),
    cpuinfo: Path = Path("/proc/cpuinfo"),
    test_boot: bool = True,
) -> Accel:
    """Probe KVM on this host (paths are parameters so the logic can be tested)."""
    arch = arch or host_arch()
    if not dev.exists():
        return Accel("tcg", f"{dev} does not exist (no KVM on this host)")
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            return Accel(
                "tcg", f"cannot open {dev}: permission denied (add the user to group 'kvm')"
            )
        return Accel("tcg", f"cannot open {dev}: {e.strerror}")
    try:
        try:
            version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
        except OSError as e:
            return Accel("tcg", f"{dev} is not a KVM device ({e.strerror})")
        if version != KVM_API_VERSION:
            return Accel("tcg", f"{dev} speaks KVM API {version}, not {KVM_API_VERSION}")
        if (sys_module / "kvm_pvm").exists():
            return Accel(
                "tcg",
                f"{dev} is a paravirtual nested KVM (kvm_pvm), under which stock guest kernels "
                "never reach their console",
            )
        if arch == "x86_64":
            flags = _cpu_flags(cpuinfo)
            if flags is not None and not flags & {"vmx", "svm"}:
                return Accel(
                    "tcg",
                    f"the CPU has no hardware virtualization (no vmx/svm flag), so {dev} is not "
                    "a hardware KVM",
                )
        if arch != "x86_64" or not test_boot:
            try:
                os.close(fcntl.ioctl(fd, _KVM_CREATE_VM, 0))
            except OSError as e:
                return Accel("tcg", f"KVM_CREATE_VM failed: {e.strerror}")
            return Accel("kvm")
        failure = _bounded_test_boot(fd)
        if failure is not None:
            return Accel("tcg", f"a test boot under KVM failed: {failure}")
        return Accel("kvm")
    finally:
        os.close(fd)


def _cpu_flags(cpuinfo: Path) -> set[str] | None:
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def _bounded_test_boot(kvm_fd: int) -> str | None:
    """Run the real-mode test in a thread, so a KVM that never returns cannot hang barge."""
    result: list[str | None] = []

    def target() -> None:
        try:
            result.append(_test_boot(kvm_fd))
        except OSError as e:
            result.append(f"{e.strerror or e}")

    t = threading.Thread(target=target, name="kvm-probe", daemon=True)
    t.start()
    t.join(_TEST_BOOT_SECONDS)
    if not result:
        return f"the test vCPU did not halt within {_TEST_BOOT_SECONDS:.0f} s"
    return result[0]


def _test_boot(kvm_fd: int) -> str | None:
    fds: list[int] = []
    maps: list[mmap.mmap] = []
    try:
        vm = fcntl.ioctl(kvm_fd, _KVM_CREATE_VM, 0)
        fds.append(vm)
        mem = mmap.mmap(-1, 0x10000)
        maps.append(mem)
        code = bytes([0xB0, 0x42, 0xE6, 0x10, 0xF4])  # mov al,0x42; out 0x10,al; hlt
        mem[0x1000 : 0x1000 + len(code)] = code
        c_buf = ctypes.c_char.from_buffer(mem)
        addr = ctypes.addressof(c_buf)
        del c_buf
        # struct kvm_userspace_memory_region: slot, flags, guest_phys_addr, size, userspace_addr
        fcntl.ioctl(vm, _KVM_SET_USER_MEMORY_REGION, struct.pack("=IIQQQ", 0, 0, 0, 0x10000, addr))
        with contextlib.suppress(OSError):  # Intel needs it for real mode
            fcntl.ioctl(vm, _KVM_SET_TSS_ADDR, 0x7FFBD000)
        vcpu = fcntl.ioctl(vm, _KVM_CREATE_VCPU, 0)
        fds.append(vcpu)
        run = mmap.mmap(vcpu, fcntl.ioctl(kvm_fd, _KVM_GET_VCPU_MMAP_SIZE), mmap.MAP_SHARED)
        maps.append(run)
        sregs = bytearray(312)
        fcntl.ioctl(vcpu, _KVM_GET_SREGS, sregs)
        struct.pack_into("=Q", sregs, 0, 0)  # cs.base
        struct.pack_into("=H", sregs, 12, 0)  # cs.selector
        fcntl.ioctl(vcpu, _KVM_SET_SREGS, bytes(sregs))
        regs = bytearray(144)
        fcntl.ioctl(vcpu, _KVM_GET_REGS, regs)
        struct.pack_into("=QQ", regs, 128, 0x1000, 0x2)  # rip, rflags
        fcntl.ioctl(vcpu, _KVM_SET_REGS, bytes(regs))
        fcntl.ioctl(vcpu, _KVM_RUN, 0)
        reason = struct.unpack_from("=I", run, 8)[0]
        if reason != _KVM_EXIT_IO:
            return f"the test vCPU exited with reason {reason}, not an I/O write"
        _dir, _size, port, _count, off = struct.unpack_from("=BBHIQ", run, 32)
        if port != 0x10 or run[off] != 0x42:
            return f"the test vCPU wrote {run[off]:#x} to port {port:#x}, not 0x42 to 0x10"
        fcntl.ioctl(vcpu, _KVM_RUN, 0)
        reason = struct.unpack_from("=I", run, 8)[0]
        if reason != _KVM_EXIT_HLT:
            return f"the test vCPU exited with reason {reason}, not a halt"
        return None
    finally:
        for m in reversed(maps):
            m.close()
        for fd in reversed(fds):
            os.close(fd)
