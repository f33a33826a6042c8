"""The tiny guest (scripts/build-guest.py tiny) booted with plain QEMU under TCG: NoCloud seeds
(ISO9660 on a CD, vfat on a virtio disk), SSH with a generated key, exit codes, ACPI power-down,
poweroff from inside; and the builder's cache (hits without apt, killed builds leave nothing)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from guests import (
    BUILDER,
    TINY_READY,
    Guest,
    kernel_boot_args,
    make_seed,
    run_builder,
    running,
    ssh_keypair,
)

pytestmark = pytest.mark.timeout(600)


def builder_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_guest", BUILDER)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["build_guest"] = mod
    spec.loader.exec_module(mod)
    return mod


def read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """An independent reader of the initramfs (cpio newc): path -> (mode, data)."""
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", f"bad cpio magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        body = data[pos : pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def pubkey(key: Path) -> str:
    return Path(f"{key}.pub").read_text().strip()


def test_tiny_guest_files(tiny_guest: Guest) -> None:
    info = tiny_guest.notes
    assert (info["kind"], info["user"], info["arch"], info["boot"]) == (
        "tiny",
        "root",
        "x86_64",
        "kernel",
    )
    assert tiny_guest.kernel.read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage
    assert tiny_guest.kernel_pvh is not None
    assert tiny_guest.kernel_pvh.read_bytes()[:4] == b"\x7fELF"
    assert tiny_guest.cmdline.startswith("console=ttyS0")
    assert any(name.startswith("linux-image-") for name in info["packages"])
    files = read_newc(tiny_guest.initramfs.read_bytes())
    release = info["kernel_release"]
    assert files["init"] == (0o120777, b"/bin/busybox")
    assert files["dev/console"][0] == 0o020600
    for path in ("usr/sbin/dropbear", "lib64/ld-linux-x86-64.so.2", "etc/init.d/rcS"):
        assert files[path][0] & 0o170000 == 0o100000, path
    dep_text = files[f"lib/modules/{release}/modules.dep"][1].decode()
    deps = {mod: rest.split() for mod, _, rest in (x.partition(":") for x in dep_text.splitlines())}
    # every module listed is in the initramfs, and so is everything it needs; each line lists
    # all of a module's dependencies with the ones to load first last (depmod's order)
    for mod, needs in deps.items():
        assert f"lib/modules/{release}/{mod}" in files
        for i, d in enumerate(needs):
            assert set(deps[d]) <= set(needs[i + 1 :]), (mod, d)
    assert {"libata.ko", "libahci.ko", "scsi_mod.ko"} <= {
        Path(d).name for d in deps["kernel/drivers/ata/ahci.ko"]
    }
    names = {Path(m).name.removesuffix(".ko") for m in deps}
    assert {"virtio_net", "virtio_blk", "isofs", "vfat", "button", "evdev", "sr_mod"} <= names


SEED_CASES = [
    # (user-data, expected keys)
    ("#cloud-config\nssh_authorized_keys:\n  - ssh-ed25519 AAAA a@b\n", ["ssh-ed25519 AAAA a@b"]),
    (
        "#cloud-config\nssh_authorized_keys:\n- 'ssh-ed25519 AAAA q@1'\n-  \"ssh-rsa BBBB q@2\"\n",
        ["ssh-ed25519 AAAA q@1", "ssh-rsa BBBB q@2"],
    ),
    (
        "#cloud-config\r\nssh_authorized_keys:\r\n  - ssh-ed25519 CRLF x@y\r\n",
        ["ssh-ed25519 CRLF x@y"],
    ),
    (
        # comments and blank lines inside the list; the next key ends it; a user's own keys
        # (indented, under users:) are not root's
        "#cloud-config\nhostname: h\nssh_authorized_keys:\n  # first\n  - ssh-ed25519 K1 k\n\n"
        "  - ssh-ed25519 K2 k\npackages:\n  - ssh-ed25519 NOTAKEY\nusers:\n  - name: debian\n"
        "    ssh_authorized_keys:\n      - ssh-ed25519 USERKEY u\n",
        ["ssh-ed25519 K1 k", "ssh-ed25519 K2 k"],
    ),
    ("#cloud-config\nusers:\n  - default\n", []),
]


@pytest.mark.parametrize(
    ("user_data", "keys"), SEED_CASES, ids=["indented", "quoted", "crlf", "mixed", "none"]
)
def test_seed_key_parser_with_the_guests_busybox(
    tiny_guest: Guest, tmp_path: Path, user_data: str, keys: list[str]
) -> None:
    """The awk program the init runs, run by the guest's own busybox on this host."""
    files = read_newc(tiny_guest.initramfs.read_bytes())
    busybox = tmp_path / "busybox"
    busybox.write_bytes(files["bin/busybox"][1])
    busybox.chmod(0o755)
    (tmp_path / "keys.awk").write_bytes(files["etc/seed-keys.awk"][1])
    (tmp_path / "user-data").write_text(user_data, newline="")
    out = subprocess.run(
        [str(busybox), "awk", "-f", str(tmp_path / "keys.awk"), str(tmp_path / "user-data")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.splitlines() == keys


def test_tiny_guest_iso_seed_on_cdrom_ssh_and_acpi_powerdown(
    tiny_guest: Guest, tmp_path: Path
) -> None:
    key = ssh_keypair(tmp_path)
    seed = make_seed(tmp_path / "seed.iso", keys=[pubkey(key)], hostname="tiny-iso", fs="iso9660")
    args = [*kernel_boot_args(tiny_guest), "-drive", f"file={seed},media=cdrom,readonly=on"]
    with running(tmp_path, args) as vm:
        t_ready = vm.wait_serial(TINY_READY, 240)
        t_ssh = vm.wait_ssh(key, "root", 60)
        cpu = vm.cpu_seconds()
        r = vm.ssh(key, "root", "hostname; id -u; echo to-stderr >&2; exit 7")
        assert (r.returncode, r.stdout, r.stderr) == (7, "tiny-iso\n0\n", "to-stderr\n")
        r = vm.ssh(key, "root", "cat /proc/cmdline; grep -c . /root/.ssh/authorized_keys")
        assert r.returncode == 0 and r.stdout.split("\n")[1] == "1", r
        assert "seed /dev/sr0: 1 key(s), hostname tiny-iso" in vm.serial_text()
        # the ACPI power button (QMP system_powerdown): the guest syncs and powers off
        t0 = time.monotonic()
        vm.qmp("system_powerdown")
        assert vm.wait_exit(30) == 0
        t_off = time.monotonic() - t0
        assert "barge-tiny-guest: powering off" in vm.serial_text()
    print(
        f"\ntiny guest (PVH kernel, TCG): ready {t_ready:.1f} s, ssh {t_ssh:.1f} s "
        f"({cpu:.1f} CPU s, load {os.getloadavg()[0]:.1f}), power-down {t_off:.1f} s"
    )


def test_tiny_guest_stock_kernel_vfat_seed_data_disk_and_poweroff(
    tiny_guest: Guest, tmp_path: Path
) -> None:
    """Debian's bzImage as is; an upper-case-labelled vfat seed on virtio; a data disk written
    through ssh survives `poweroff` run inside the guest."""
    key = ssh_keypair(tmp_path)
    seed = make_seed(
        tmp_path / "seed.img", keys=[pubkey(key)], hostname="tiny-vfat", fs="vfat", label="CIDATA"
    )
    data = tmp_path / "data.raw"
    data.write_bytes(b"\0" * (4 << 20))
    args = [
        *kernel_boot_args(tiny_guest, pvh=False),
        "-drive",
        f"file={seed},if=virtio,format=raw,readonly=on",
        "-drive",
        f"file={data},if=virtio,format=raw,discard=unmap",
    ]
    with running(tmp_path, args) as vm:
        t_ready = vm.wait_serial(TINY_READY, 300)
        t_ssh = vm.wait_ssh(key, "root", 60)
        cpu = vm.cpu_seconds()
        r = vm.ssh(key, "root", "hostname; ls /dev/vd*; printf barge-data | dd of=/dev/vdb")
        assert r.returncode == 0, r
        assert r.stdout.split() == ["tiny-vfat", "/dev/vda", "/dev/vdb"]
        subprocess.run(vm.ssh_cmd(key, "root", "poweroff"), capture_output=True, timeout=30)
        assert vm.wait_exit(30) == 0
    assert data.read_bytes()[:10] == b"barge-data"
    print(
        f"\ntiny guest (stock bzImage, TCG): ready {t_ready:.1f} s, ssh {t_ssh:.1f} s "
        f"({cpu:.1f} CPU s, load {os.getloadavg()[0]:.1f})"
    )


# -- the builder's cache -------------------------------------------------------------------------


def test_cached_guest_is_found_without_apt(tiny_guest: Guest, tmp_path: Path) -> None:
    """A warm cache answers at once and needs neither apt-get nor apt-cache (or the network)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    env = {**os.environ, "PATH": str(bindir)}
    r = run_builder("tiny", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == str(tiny_guest.dir)
    r = run_builder("tiny", "--print-dir", env=env)
    assert (r.returncode, r.stdout.strip()) == (0, str(tiny_guest.dir))
    # an empty cache must resolve packages: without apt that is one clear line, exit 1
    env["BARGE_GUEST_CACHE"] = str(tmp_path / "empty")
    r = run_builder("tiny", env=env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "build-guest: error: apt-cache not found (run scripts/setup.sh)"
    )
    assert not list((tmp_path / "empty").glob("tiny-*"))


def test_killed_build_leaves_no_guest(tmp_path: Path) -> None:
    """SIGKILL mid-build: no guest directory appears; the next build clears the leftovers.
    SIGTERM: the builder cleans up after itself and exits 130."""
    cache = tmp_path / "cache"
    env = {**os.environ, "BARGE_GUEST_CACHE": str(cache)}

    def start_and_kill(old: list[Path], sig: int = signal.SIGKILL) -> int:
        proc = subprocess.Popen(
            [sys.executable, str(BUILDER), "tiny"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not [p for p in cache.glob(".tmp-tiny-*/work") if p.parent not in old]:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(sig)
        return proc.wait(timeout=30)

    start_and_kill([])
    first = list(cache.glob(".tmp-tiny-*"))
    assert len(first) == 1 and not list(cache.glob("tiny-*"))
    r = run_builder("tiny", "--print-dir", env=env)
    assert r.returncode == 3 and not Path(r.stdout.strip()).exists()
    start_and_kill(first)
    assert not first[0].exists()  # the second build removed the first one's leftovers
    assert not list(cache.glob("tiny-*"))
    second = list(cache.glob(".tmp-tiny-*"))
    assert start_and_kill(second, signal.SIGTERM) == 130
    assert not list(cache.glob(".tmp-tiny-*")) and not list(cache.glob("tiny-*"))
    shutil.rmtree(cache)


def test_cache_key_follows_package_versions() -> None:
    bg = builder_module()
    a = [bg.Package("busybox-static", "1:1.35.0-4"), bg.Package("linux-image-x", "6.1.1-1")]
    b = [bg.Package("busybox-static", "1:1.35.0-4"), bg.Package("linux-image-x", "6.1.1-2")]
    assert bg.cache_key("tiny", a) == bg.cache_key("tiny", list(reversed(a)))
    assert bg.cache_key("tiny", a) != bg.cache_key("tiny", b)
    assert bg.cache_key("tiny", a) != bg.cache_key("debian", a)
