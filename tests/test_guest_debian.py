"""The full Debian guest (scripts/build-guest.py debian) run by barge itself under TCG, by
direct kernel boot and through OVMF, both at once: `barge create --from-disk`, `barge run
--detach`, cloud-init reads barge's NoCloud seed, makes the user `debian` with passwordless
sudo and barge's store key, `barge exec` runs commands as `debian`, `barge stop` powers off.

Marked `debian_guest` (deselect with `-m "not debian_guest"` for quick runs). It skips, with
the reason, only when the guest is still booting at the bound (TCG is slow; 50-95 s to sshd is
normal); a guest that panics, drops to an emergency shell or powers off fails."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from guests import OVMF_CODE, OVMF_VARS, Guest, run_builder

pytestmark = [pytest.mark.debian_guest, pytest.mark.timeout(1800)]

SSH_BOUND = float(os.environ.get("BARGE_DEBIAN_BOOT_BOUND", "420"))
BARGE = str(Path(sys.executable).parent / "barge")
FATAL = ("Kernel panic", "emergency mode", "Cannot open access to console", "ALERT! ")


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


def cpu_seconds(pid: int) -> float:
    """CPU time QEMU has used so far (user + system): what a boot costs on an idle host."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def barge_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BARGE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def guest_exec(name: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    """``barge exec NAME CMD…``, again when ssh itself failed before the command ran (exit 255
    with an identification-exchange error): cloud-init's config stage restarts sshd while the
    guest already answers, which resets connections made at that moment."""
    for _ in range(6):
        r = barge_cli("exec", name, *cmd)
        if r.returncode != 255 or "kex_exchange_identification" not in r.stderr:
            return r
        time.sleep(5)
    return r


def run_info(name: str) -> dict[str, Any]:
    r = barge_cli("get", name, "--format", "json")
    assert r.returncode == 0, r
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def wait_ssh_or_skip(name: str, home: Path, started: float) -> float:
    """``barge ip --wait`` up to the bound; a guest still booting then (no panic, no emergency
    shell, QEMU alive) skips with the reason, anything else fails."""
    left = max(1.0, SSH_BOUND - (time.monotonic() - started))
    r = barge_cli("ip", name, "--wait", f"{left:.0f}", timeout=left + 60)
    if r.returncode == 0:
        return time.monotonic() - started
    serial = (home / "vms" / name / ".run" / "serial.log").read_text(errors="replace")
    run = run_info(name).get("run") or {}
    if run.get("running") and not any(f in serial for f in FATAL):
        pytest.skip(
            f"{name}: still booting after {SSH_BOUND:.0f} s under TCG (bound "
            f"BARGE_DEBIAN_BOOT_BOUND), having had {cpu_seconds(run['pid']):.0f} CPU s (host "
            f"load {os.getloadavg()[0]:.1f}); serial log tail:\n"
            + "\n".join(serial.splitlines()[-8:])
        )
    raise AssertionError(f"{name} did not answer SSH: {r.stderr}")


def test_debian_guest_through_barge_by_kernel_and_uefi(
    debian_guest: Guest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`barge create --from-disk` (UEFI, its own NVRAM) and a kernel-booted VM of the same
    disk, `barge run --detach` both at once, `barge exec` as `debian` (cloud-init from barge's
    seed and store key), `barge stop` both at once."""
    assert OVMF_CODE.exists() and OVMF_VARS.exists(), "apt package ovmf"
    g = debian_guest
    assert g.disk is not None
    home = tmp_path / "home"
    monkeypatch.setenv("BARGE_HOME", str(home))
    monkeypatch.delenv("BARGE_ACCEL", raising=False)
    common = ["--from-disk", str(g.disk), "--user", "debian", "--memory", "1024", "--cpus", "1"]
    kernel = getattr(g, "kernel_pvh", None) or g.kernel
    initrd = ["--initramfs", str(g.initramfs)] if g.initramfs else []
    creates = {
        "deb-uefi": ["--boot", "uefi"],
        "deb-kernel": ["--kernel", str(kernel), *initrd, "--cmdline", g.cmdline],
    }
    for name, args in creates.items():
        r = barge_cli("create", name, *common, *args)
        assert r.returncode == 0, r
    assert run_info("deb-uefi")["boot"] == "uefi" and run_info("deb-kernel")["boot"] == "kernel"
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        for name in creates:  # both at once: TCG runs each guest on one host thread
            r = barge_cli("run", name, "--detach")
            assert r.returncode == 0, r
        for name in creates:
            times[name] = wait_ssh_or_skip(name, home, t0)
            print(f"\n{name}: ssh after {times[name]:.0f} s", flush=True)
            cpu[name] = cpu_seconds(run_info(name)["run"]["pid"])
            r = guest_exec(name, "sh", "-c", "hostname; id -un; sudo -n id -u; cat /proc/cmdline")
            assert r.returncode == 0, r
            lines = r.stdout.splitlines()
            assert lines[:3] == [name, "debian", "0"], r.stdout
            if name == "deb-kernel":
                assert lines[3] == g.cmdline
            else:  # through systemd-boot's entry, from the ESP
                assert "root=UUID=" in lines[3] and "initrd=" in lines[3], lines[3]
        r = guest_exec("deb-uefi", "test", "-d", "/sys/firmware/efi")
        assert r.returncode == 0, r
        r = guest_exec("deb-kernel", "sh", "-c", "exit 7")
        assert r.returncode == 7, r
        nvram = home / "vms" / "deb-uefi" / run_info("deb-uefi")["nvram"]
        assert nvram.stat().st_size == OVMF_VARS.stat().st_size
        t1 = time.monotonic()
        stops = {
            n: subprocess.Popen(
                [BARGE, "stop", n, "--timeout", "120"], stdout=subprocess.PIPE, text=True
            )
            for n in creates
        }
        stop_s = {}
        for name, proc in stops.items():  # both at once
            out, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0 and out.startswith(f"stopped {name} (powered off"), out
            stop_s[name] = time.monotonic() - t1
    finally:
        for name in creates:
            run = (run_info(name).get("run") or {}) if (home / "vms" / name).exists() else {}
            if run.get("running"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(run["pid"], signal.SIGKILL)
    print(
        "\ndebian guest through barge (TCG, two at once): ssh after "
        + ", ".join(f"{w} {t:.0f} s ({cpu[w]:.0f} CPU s)" for w, t in times.items())
        + f", load {os.getloadavg()[0]:.1f}; power-down "
        + ", ".join(f"{w} {t:.0f} s" for w, t in stop_s.items())
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
