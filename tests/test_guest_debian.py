"""The full Debian guest (scripts/build-guest.py debian) booted with plain QEMU under TCG, by
direct kernel boot and through OVMF, both at once: cloud-init reads a NoCloud seed, makes the
user `debian` with passwordless sudo, and sshd answers with the seed's key.

Marked `debian_guest` (deselect with `-m "not debian_guest"` for quick runs). It skips, with
the reason, only when the guest is still booting at the bound (TCG is slow; 50-95 s to sshd is
normal); a guest that panics, drops to an emergency shell or powers off fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from guests import (
    OVMF_CODE,
    OVMF_VARS,
    Guest,
    Qemu,
    kernel_boot_args,
    make_seed,
    run_builder,
    ssh_keypair,
    uefi_args,
)

pytestmark = [pytest.mark.debian_guest, pytest.mark.timeout(1800)]

SSH_BOUND = float(os.environ.get("BARGE_DEBIAN_BOOT_BOUND", "420"))
FATAL = ("Kernel panic", "emergency mode", "Cannot open access to console", "ALERT! ")


def overlay(guest: Guest, path: Path) -> Path:
    """A qcow2 overlay over the cached disk: the cache stays pristine, nothing is copied."""
    assert guest.disk is not None
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(guest.disk), str(path)],
        check=True,
    )
    return path


def test_debian_guest_files(debian_guest: Guest) -> None:
    g = debian_guest
    assert (g.user, g.boot, g.notes["kind"]) == ("debian", "uefi", "debian")
    assert g.disk is not None and g.disk.stat().st_size == g.notes["disk_size"]
    # sparse: far less allocated than its size
    assert g.disk.stat().st_blocks * 512 < g.disk.stat().st_size // 2
    assert g.kernel.read_bytes()[0x202:0x206] == b"HdrS"
    assert g.cmdline.startswith("root=UUID=")
    with open(g.disk, "rb") as f:
        disk = f.read(0x400)
    assert disk[0x1FE:0x200] == b"\x55\xaa" and disk[0x200:0x208] == b"EFI PART"
    out = subprocess.run(
        ["sfdisk", "--json", str(g.disk)], capture_output=True, text=True, check=True
    ).stdout
    assert "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" in out  # an EFI system partition
    files = subprocess.run(
        ["mdir", "-b", "-/", "-i", f"{g.disk}@@{g.notes['partitions']['esp']['start']}", "::/"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
    ).stdout.split()
    for name in ("::/EFI/BOOT/BOOTX64.EFI", "::/vmlinuz", "::/initrd.img"):
        assert name in files, files
    installed = g.notes["installed_packages"]
    assert installed > 100
    for pkg in ("systemd", "openssh-server", "cloud-init", "sudo", "linux-image-amd64"):
        assert pkg in (g.dir / "packages.json").read_text()


def wait_ssh_or_skip(vm: Qemu, key: Path, what: str) -> float:
    try:
        return vm.wait_ssh(key, "debian", SSH_BOUND)
    except AssertionError:
        serial = vm.serial_text()
        if vm.proc is not None and vm.proc.poll() is None and not any(f in serial for f in FATAL):
            pytest.skip(
                f"{what}: still booting after {SSH_BOUND:.0f} s under TCG (bound "
                f"BARGE_DEBIAN_BOOT_BOUND), having had {vm.cpu_seconds():.0f} CPU s (host load "
                f"{os.getloadavg()[0]:.1f}); serial log tail:\n{vm.tail(8)}"
            )
        raise


def test_debian_guest_boots_by_kernel_and_through_ovmf(debian_guest: Guest, tmp_path: Path) -> None:
    assert OVMF_CODE.exists() and OVMF_VARS.exists(), "apt package ovmf"
    key = ssh_keypair(tmp_path)
    pub = Path(f"{key}.pub").read_text().strip()
    vms: dict[str, Qemu] = {}
    for way in ("kernel", "uefi"):
        d = tmp_path / way
        d.mkdir()
        seed = make_seed(d / "seed.iso", keys=[pub], hostname=f"deb-{way}", user="debian")
        disk = overlay(debian_guest, d / "disk.qcow2")
        drives = [
            "-drive",
            f"file={disk},if=virtio,format=qcow2,discard=unmap",
            "-drive",
            f"file={seed},media=cdrom,readonly=on",
        ]
        boot = kernel_boot_args(debian_guest) if way == "kernel" else uefi_args(d)
        vms[way] = Qemu(d, [*boot, *drives], memory=1024)
    try:
        # both at once: TCG runs each guest on one host thread
        for vm in vms.values():
            vm.start()
        times, cpu = {}, {}
        for way, vm in vms.items():
            times[way] = wait_ssh_or_skip(vm, key, f"{way} boot")
            cpu[way] = vm.cpu_seconds()
            r = vm.ssh(key, "debian", "hostname; id -un; sudo -n id -u; cat /proc/cmdline")
            assert r.returncode == 0, r
            lines = r.stdout.splitlines()
            assert lines[:3] == [f"deb-{way}", "debian", "0"], r.stdout
            if way == "kernel":
                assert lines[3] == debian_guest.cmdline
            else:  # through systemd-boot's entry, from the ESP
                assert "root=UUID=" in lines[3] and "initrd=" in lines[3], lines[3]
        r = vms["uefi"].ssh(key, "debian", "test -d /sys/firmware/efi && echo efi")
        assert r.stdout.strip() == "efi", r
        stops = {}
        t0 = time.monotonic()
        for vm in vms.values():  # both at once
            vm.qmp("system_powerdown")
        for way, vm in vms.items():
            assert vm.wait_exit(90) == 0
            stops[way] = time.monotonic() - t0
        assert (tmp_path / "uefi" / "OVMF_VARS.fd").stat().st_size == OVMF_VARS.stat().st_size
    finally:
        for vm in vms.values():
            vm.stop()
    print(
        "\ndebian guest (TCG, two at once): ssh after "
        + ", ".join(f"{w} {t:.0f} s ({cpu[w]:.0f} CPU s)" for w, t in times.items())
        + f", load {os.getloadavg()[0]:.1f}; power-down "
        + ", ".join(f"{w} {t:.0f} s" for w, t in stops.items())
    )


def test_debian_plan_without_an_apt_index_is_one_clear_error(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BARGE_GUEST_CACHE": str(tmp_path / "cache"),
        "BARGE_DEBIAN_MIRROR": "http://mirror.invalid/debian",
    }
    r = run_builder("debian", env=env)
    assert r.returncode == 1
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith("build-guest: error: no apt index for http://mirror.invalid/debian bookworm")
    )
    assert not list((tmp_path / "cache").glob("debian-*"))
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
