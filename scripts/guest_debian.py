"""The full Debian guest for scripts/build-guest.py (`build-guest.py debian`).

debootstrap (minbase) of Debian 12 with systemd, udev, openssh-server, cloud-init (NoCloud) and
linux-image-amd64, then a raw GPT disk assembled without mounting anything: an EFI system
partition (FAT, systemd-boot as the removable-media loader, the kernel and initrd beside it)
written with mkfs.vfat --offset and mtools, and an ext4 root written with mke2fs -d at its
offset. The kernel, initrd and command line are also kept beside the disk for direct kernel
boot. The only mounts are the ones debootstrap's second stage makes inside the new root (proc,
sys), undone before anything is deleted. See docs/guests.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

SUITE = "bookworm"
MIRROR = os.environ.get("BARGE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
INCLUDE = [
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "openssh-server",
    "cloud-init",
    "cloud-guest-utils",  # growpart: cloud-init grows the root partition when the disk grows
    "python3-cffi-backend",  # provides a virtual package cloud-init needs; debootstrap
    # resolves no virtual packages itself
    "sudo",
    "linux-image-amd64",
    "zstd",  # the initrd's compressor
    "e2fsprogs",
    "iproute2",
    "procps",
]
BOOTLOADER_PKG = "systemd-boot-efi"
DEB_CACHE = ".debootstrap-debs"
DISK_SIZE = 2 << 30
ESP_START = 1 << 20
ESP_SIZE = 64 << 20
ROOT_START = ESP_START + ESP_SIZE
ROOT_LABEL = "barge-root"
ESP_LABEL = "BARGE-ESP"

# dpkg leaves these out of the guest (docs, translations, and kernel modules for hardware no VM
# has: sound, cameras, Wi-Fi, InfiniBand, industrial I/O, physical GPUs and NICs except Intel's,
# SCSI HBAs). The config stays in the guest, so later installs keep it small too.
DPKG_EXCLUDES = """\
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-exclude=/lib/modules/*/kernel/sound/*
path-exclude=/lib/modules/*/kernel/drivers/media/*
path-exclude=/lib/modules/*/kernel/drivers/net/wireless/*
path-exclude=/lib/modules/*/kernel/net/wireless/*
path-exclude=/lib/modules/*/kernel/net/mac80211/*
path-exclude=/lib/modules/*/kernel/drivers/bluetooth/*
path-exclude=/lib/modules/*/kernel/net/bluetooth/*
path-exclude=/lib/modules/*/kernel/drivers/infiniband/*
path-exclude=/lib/modules/*/kernel/drivers/iio/*
path-exclude=/lib/modules/*/kernel/drivers/staging/*
path-exclude=/lib/modules/*/kernel/drivers/comedi/*
path-exclude=/lib/modules/*/kernel/drivers/isdn/*
path-exclude=/lib/modules/*/kernel/drivers/gpu/drm/amd/*
path-exclude=/lib/modules/*/kernel/drivers/gpu/drm/radeon/*
path-exclude=/lib/modules/*/kernel/drivers/gpu/drm/nouveau/*
path-exclude=/lib/modules/*/kernel/drivers/gpu/drm/i915/*
path-exclude=/lib/modules/*/kernel/drivers/net/ethernet/*
path-include=/lib/modules/*/kernel/drivers/net/ethernet/intel/*
path-exclude=/lib/modules/*/kernel/drivers/scsi/*/*
"""

# The initrd holds only what mounting the root of a VM takes (not MODULES=most's every storage
# driver): small and quick to unpack under TCG.
INITRAMFS_CONF = "MODULES=list\nCOMPRESS=zstd\n"
INITRAMFS_MODULES = [
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "ahci",
    "nvme",
    "ext4",
    "crc32c_generic",
]

CLOUD_CFG = """\
# barge: the NoCloud seed (a cidata volume) or nothing; networking is systemd-networkd's.
datasource_list: [NoCloud, None]
network: {config: disabled}
# /etc/hosts names the seed's hostname (sudo looks it up)
manage_etc_hosts: true
# RSA host keys take seconds to make under TCG
ssh_genkeytypes: [ed25519, ecdsa]
cloud_init_modules:
  - migrator
  - seed_random
  - bootcmd
  - write-files
  - growpart
  - resizefs
  - disk_setup
  - mounts
  - set_hostname
  - update_hostname
  - update_etc_hosts
  - users-groups
  - ssh
cloud_config_modules:
  - set-passwords
  - timezone
  - runcmd
cloud_final_modules:
  - package-update-upgrade-install
  - write-files-deferred
  - scripts-vendor
  - scripts-per-once
  - scripts-per-boot
  - scripts-per-instance
  - scripts-user
  - ssh-authkey-fingerprints
  - keys-to-console
  - final-message
  - power-state-change
"""

NETWORK = """\
[Match]
Name=en* eth*

[Network]
DHCP=yes
"""

# udev would load these for devices QEMU emulates; a VM has no use for them and under TCG each
# costs seconds of boot: nested KVM (-cpu max offers SVM/VMX), watchdog, SMBus, PC speaker,
# CPU frequency, AES-NI glue (nothing in the guest needs kernel AES at boot).
MODPROBE_BLACKLIST = [
    "kvm",
    "kvm_amd",
    "kvm_intel",
    "iTCO_wdt",
    "iTCO_vendor_support",
    "lpc_ich",
    "i2c_i801",
    "i2c_smbus",
    "pcspkr",
    "powernow_k8",
    "acpi_cpufreq",
    "intel_rapl_msr",
    "intel_rapl_common",
    "joydev",
    "serio_raw",
    "sg",
    "floppy",
    "parport_pc",
    "ppdev",
    "aesni_intel",
    "ghash_clmulni_intel",
]

# Units a headless test VM does not need at boot (masked): each costs seconds under TCG. Kernel
# modules systemd preloads (the guest loads them on demand anyway), pseudo-filesystems nothing
# here uses, binfmt, a console getty on a VT nobody sees, e2fsprogs' scrub.
MASKED_UNITS = [
    "e2scrub_reap.service",
    "getty@tty1.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "dev-hugepages.mount",
    "dev-mqueue.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    "modprobe@configfs.service",
    "modprobe@dm_mod.service",
    "modprobe@drm.service",
    "modprobe@efi_pstore.service",
    "modprobe@fuse.service",
    "modprobe@loop.service",
]

# sshd will not start without host keys, and the image ships none (each VM makes its own):
# cloud-init makes them; this makes them if cloud-init did not.
SSH_KEYGEN_UNIT = """\
[Unit]
Description=SSH host keys (if cloud-init made none)
After=cloud-init.service
Before=ssh.service
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
"""


def plan(bg: Any) -> list[Any]:
    """What decides the guest's content: the mirror's package index for the suite (its digest
    from apt's copy of the signed InRelease: debootstrap installs the versions that index
    lists), debootstrap's own version and the bootloader package."""
    host = re.sub(r"^\w+://", "", MIRROR).rstrip("/").replace("/", "_")
    release = Path("/var/lib/apt/lists") / f"{host}_dists_{SUITE}_InRelease"
    try:
        text = release.read_text(errors="replace")
    except OSError as e:
        raise bg.BuildError(
            f"no apt index for {MIRROR} {SUITE} ({release}): add it to apt's sources and run "
            "`apt-get update`, or set BARGE_DEBIAN_MIRROR"
        ) from e
    sha256 = text[text.index("SHA256:") :] if "SHA256:" in text else ""
    m = re.search(r"^ ([0-9a-f]{64})\s+\d+ main/binary-amd64/Packages$", sha256, re.M)
    if not m:
        raise bg.BuildError(f"{release} lists no main/binary-amd64/Packages")
    debootstrap = bg.run(["dpkg-query", "-W", "-f=${Version}", "debootstrap"]).stdout
    boot = bg.candidates([BOOTLOADER_PKG])[BOOTLOADER_PKG]
    return [
        bg.Package(f"index:{MIRROR} {SUITE} main/binary-amd64", m.group(1)),
        bg.Package("debootstrap (host)", debootstrap.strip()),
        boot,
    ]


def write(root: Path, rel: str, text: str, mode: int = 0o644) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    p.chmod(mode)


def enable(root: Path, unit: str, target: str, source_dir: str = "lib/systemd/system") -> None:
    """What `systemctl enable` does for a unit with `WantedBy=target` (no systemd needed)."""
    wants = root / "etc/systemd/system" / f"{target}.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / unit
    link.unlink(missing_ok=True)
    link.symlink_to(f"/{source_dir}/{unit}")


def debootstrap(bg: Any, root: Path) -> None:
    bg.log(f"debootstrap {SUITE} (first stage) from {MIRROR}")
    # debootstrap fetches its ~200 packages one at a time (~1 min); keeping them beside the
    # guest cache makes a rebuild (a changed builder) skip that. `--prune` clears it.
    debs = bg.cache_root() / DEB_CACHE
    debs.mkdir(parents=True, exist_ok=True)
    bg.run(
        [
            "debootstrap",
            "--foreign",
            "--variant=minbase",
            f"--cache-dir={debs}",
            f"--include={','.join(INCLUDE)}",
            SUITE,
            str(root),
            MIRROR,
        ]
    )
    # Before the second stage installs anything: what dpkg leaves out, no fsync per file (the
    # disk is assembled and fsynced afterwards), the initrd's configuration.
    write(root, "etc/dpkg/dpkg.cfg.d/barge-excludes", DPKG_EXCLUDES)
    write(root, "etc/dpkg/dpkg.cfg.d/barge-build-unsafe-io", "force-unsafe-io\n")
    write(root, "etc/initramfs-tools/conf.d/barge", INITRAMFS_CONF)
    write(root, "etc/initramfs-tools/modules", "\n".join(INITRAMFS_MODULES) + "\n")
    bg.log("debootstrap (second stage: unpack and configure)")
    try:
        bg.run(["chroot", str(root), "/debootstrap/debootstrap", "--second-stage"])
    except bg.BuildError as e:
        log = root / "debootstrap/debootstrap.log"
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
        raise bg.BuildError(f"{e}\n" + "\n".join(tail)) from e
    finally:
        bg.unmount_under(root)


def configure(root: Path, root_uuid: str, esp_uuid: str) -> None:
    """Make the tree a VM guest: fstab, network, cloud-init, no host keys or machine id."""
    (root / "etc/dpkg/dpkg.cfg.d/barge-build-unsafe-io").unlink()
    write(
        root,
        "etc/fstab",
        f"UUID={root_uuid} / ext4 errors=remount-ro 0 1\n"
        f"UUID={esp_uuid} /boot/efi vfat umask=0077,nofail 0 2\n",
    )
    (root / "boot/efi").mkdir(parents=True, exist_ok=True)
    write(root, "etc/hostname", "debian\n")
    write(root, "etc/hosts", "127.0.0.1 localhost\n127.0.1.1 debian\n::1 localhost\n")
    # QEMU user-mode networking's resolver (no systemd-resolved in this image)
    write(root, "etc/resolv.conf", "nameserver 10.0.2.3\n")
    write(root, "etc/systemd/network/80-barge-dhcp.network", NETWORK)
    enable(root, "systemd-networkd.service", "multi-user.target")
    enable(root, "systemd-networkd.socket", "sockets.target")
    write(root, "etc/cloud/cloud.cfg.d/90-barge.cfg", CLOUD_CFG)
    # ds-identify (a long shell script run as a systemd generator: ~10 s under TCG) would only
    # search for the datasources datasource_list already names
    write(root, "etc/cloud/ds-identify.cfg", "policy: enabled\n")
    write(root, "etc/systemd/system/barge-ssh-keygen.service", SSH_KEYGEN_UNIT)
    enable(root, "barge-ssh-keygen.service", "multi-user.target", "etc/systemd/system")
    write(
        root,
        "etc/modprobe.d/barge-vm.conf",
        "# barge test guest: drivers a QEMU VM does not need (see guest_debian.py)\n"
        + "".join(f"blacklist {m}\n" for m in MODPROBE_BLACKLIST),
    )
    for unit in MASKED_UNITS:
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    # an empty machine-id: each VM (each clone) gets its own at first boot
    write(root, "etc/machine-id", "")
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (root / d).glob("*"):
            if p.is_file():
                p.unlink()
    for p in (root / "var/log").rglob("*"):
        if p.is_file():
            p.write_bytes(b"")
    shutil.rmtree(root / "tmp", ignore_errors=True)
    (root / "tmp").mkdir(mode=0o1777)
    (root / "tmp").chmod(0o1777)


def installed(root: Path) -> dict[str, str]:
    """Package -> version, from the new root's dpkg status."""
    out: dict[str, str] = {}
    status = (root / "var/lib/dpkg/status").read_text(errors="replace")
    for block in status.split("\n\n"):
        name = re.search(r"^Package: (\S+)", block, re.M)
        version = re.search(r"^Version: (\S+)", block, re.M)
        if name and version and re.search(r"^Status: install ok installed", block, re.M):
            out[name.group(1)] = version.group(1)
    return dict(sorted(out.items()))


def assemble(
    bg: Any, root: Path, efi_loader: Path, disk: Path, ids: dict[str, str], cmdline: str
) -> None:
    """The raw GPT disk, written in place (sparse): ESP then ext4 root, nothing mounted."""
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    sector = 512
    root_size = DISK_SIZE - ROOT_START - (1 << 20)  # the backup GPT lives in the last MiB
    script = (
        f"label: gpt\nlabel-id: {ids['disk']}\nunit: sectors\nfirst-lba: 2048\n"
        f"start={ESP_START // sector}, size={ESP_SIZE // sector}, "
        f"type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid={ids['esp_part']}, name=ESP\n"
        f"start={ROOT_START // sector}, size={root_size // sector}, "
        f"type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid={ids['root_part']}, name=root\n"
    )
    bg.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(disk)], input=script)

    esp_id = ids["esp_fs"].replace("-", "")
    bg.run(
        [
            "mkfs.vfat",
            "-F",
            "32",
            "-S",
            str(sector),
            "-s",
            "1",
            "-n",
            ESP_LABEL,
            "-i",
            esp_id,
            f"--offset={ESP_START // sector}",
            str(disk),
            str(ESP_SIZE // 1024),
        ]
    )
    img = f"{disk}@@{ESP_START}"
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    bg.run(["mmd", "-i", img, "::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"], env=env)
    entry = (
        f"title Debian 12 (barge)\nlinux /vmlinuz\ninitrd /initrd.img\noptions {cmdline}\n"
    ).encode()
    staging = disk.parent / "esp-staging"
    staging.mkdir()
    (staging / "loader.conf").write_text("default barge.conf\ntimeout 0\neditor no\n")
    (staging / "barge.conf").write_bytes(entry)
    for src, dst in (
        (efi_loader, "::/EFI/BOOT/BOOTX64.EFI"),
        (root / "vmlinuz", "::/vmlinuz"),
        (root / "initrd.img", "::/initrd.img"),
        (staging / "loader.conf", "::/loader/loader.conf"),
        (staging / "barge.conf", "::/loader/entries/barge.conf"),
    ):
        bg.run(["mcopy", "-i", img, "-o", str(src.resolve()), dst], env=env)
    shutil.rmtree(staging)

    bg.log("mke2fs -d: the root filesystem, written into the disk at its offset")
    bg.run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            ROOT_LABEL,
            "-U",
            ids["root_fs"],
            "-E",
            f"offset={ROOT_START},lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0",
            "-d",
            str(root),
            str(disk),
            f"{root_size // 1024}k",
        ]
    )


def build(bg: Any, pkgs: list[Any], work: Path, out: Path) -> dict[str, object]:
    """debootstrap, configure, assemble: disk.raw, vmlinuz, initrd.img, cmdline into `out`."""
    seed = hashlib.sha256("".join(f"{p.name}={p.version}\n" for p in pkgs).encode()).digest()
    ids = {
        name: str(uuid.UUID(bytes=hashlib.sha256(seed + name.encode()).digest()[:16], version=4))
        for name in ("disk", "esp_part", "root_part", "root_fs")
    }
    ids["esp_fs"] = hashlib.sha256(seed + b"esp_fs").hexdigest()[:8].upper()
    esp_uuid = f"{ids['esp_fs'][:4]}-{ids['esp_fs'][4:]}"
    cmdline = f"root=UUID={ids['root_fs']} ro console=ttyS0"

    root = work / "root"
    steps: dict[str, float] = {}
    t = time.monotonic()
    try:
        debootstrap(bg, root)
        steps["debootstrap"] = time.monotonic() - t
        configure(root, ids["root_fs"], esp_uuid)
        versions = installed(root)
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if len(kernels) != 1 or not (root / "initrd.img").exists():
            raise bg.BuildError(f"expected one kernel and an initrd in /boot, found {kernels}")
        release = kernels[0].name.removeprefix("vmlinuz-")

        boot = [p for p in pkgs if p.name == BOOTLOADER_PKG]
        debs = bg.download(boot, work / "debs")
        bg.unpack(debs.values(), work / "sdboot")
        loader = work / "sdboot/usr/lib/systemd/boot/efi/systemd-bootx64.efi"
        if not loader.is_file():
            raise bg.BuildError(f"{BOOTLOADER_PKG} has no {loader.name}")

        t = time.monotonic()
        assemble(bg, root, loader, out / "disk.raw", ids, cmdline)
        steps["disk"] = time.monotonic() - t
        shutil.copyfile(root / "vmlinuz", out / "vmlinuz")
        vmlinux = bg.pvh_vmlinux((root / "vmlinuz").read_bytes())
        if vmlinux is not None:
            (out / "vmlinux").write_bytes(vmlinux)
        shutil.copyfile(root / "initrd.img", out / "initrd.img")
        (out / "cmdline").write_text(cmdline + "\n")
        (out / "packages.json").write_text(json.dumps(versions, indent=1) + "\n")
    finally:
        bg.unmount_under(root)
    st = os.stat(out / "disk.raw")
    return {
        "kind": "debian",
        "user": "debian",
        "arch": "x86_64",
        "boot": "uefi",
        "disk": "disk.raw",
        "kernel": "vmlinuz",
        "kernel_pvh": "vmlinux" if (out / "vmlinux").exists() else None,
        "initramfs": "initrd.img",
        "cmdline": cmdline,
        "kernel_release": release,
        "disk_size": st.st_size,
        "disk_allocated": st.st_blocks * 512,
        "partitions": {
            "esp": {"start": ESP_START, "size": ESP_SIZE, "fs_uuid": esp_uuid},
            "root": {"start": ROOT_START, "fs_uuid": ids["root_fs"], "label": ROOT_LABEL},
        },
        "bootloader": f"systemd-boot ({BOOTLOADER_PKG} {boot[0].version}), EFI/BOOT/BOOTX64.EFI",
        "installed_packages": len(versions),
        "build_steps_seconds": {k: round(v, 1) for k, v in steps.items()},
        "notes": "cloud-init (NoCloud or None) makes the user `debian` (sudo without password),"
        " installs the seed's keys and makes the SSH host keys at first boot; the kernel and"
        " initrd on the ESP are copies that a kernel upgrade inside the guest does not update",
    }
