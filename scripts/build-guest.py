#!/usr/bin/env python3
"""Build a real guest for barge's tests and demo from Debian packages, once, and cache it.

    build-guest.py tiny      Debian's stock kernel + an initramfs (busybox-static, dropbear)
    build-guest.py debian    a debootstrapped Debian 12 disk (systemd, sshd, cloud-init) that
                             boots through OVMF or by direct kernel boot

The guest lands in ${BARGE_GUEST_CACHE:-~/.cache/barge/guests}/<kind>-<key>/ where <key>
hashes this file and the exact versions of every Debian package used; the directory is built
beside it and renamed into place, so it is either complete or absent. A second call finds it and
returns at once. The directory is printed as the last line on stdout; progress goes to stderr.
Packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x` into a temporary
directory: nothing is installed on the host. Standard library only. See docs/guests.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import lzma
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCH = "amd64"
MULTIARCH = "x86_64-linux-gnu"
KERNEL_META = "linux-image-amd64"


class BuildError(Exception):
    """A build step failed; the message says which and why."""


def log(msg: str) -> None:
    print(f"build-guest: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]
    except FileNotFoundError as e:
        raise BuildError(f"{cmd[0]} not found (run scripts/setup.sh)") from e
    except subprocess.CalledProcessError as e:
        tail = (e.stderr or e.stdout or "").strip().splitlines()[-5:]
        raise BuildError(f"{' '.join(cmd[:4])}… failed ({e.returncode}): {' | '.join(tail)}") from e


# --------------------------------------------------------------------------------------------
# Debian packages: resolve exact versions, download, unpack


@dataclass(frozen=True)
class Package:
    name: str
    version: str


def candidates(names: Iterable[str]) -> dict[str, Package]:
    """The candidate version of each package (what `apt-get download NAME` would fetch)."""
    names = sorted(set(names))
    proc = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", *names], text=True, capture_output=True
    )
    found: dict[str, Package] = {}
    for block in proc.stdout.split("\n\n"):
        name = re.search(r"^Package: (\S+)", block, re.M)
        version = re.search(r"^Version: (\S+)", block, re.M)
        if name and version:
            found.setdefault(name.group(1), Package(name.group(1), version.group(1)))
    missing = [n for n in names if n not in found]
    if missing:
        raise BuildError(
            f"apt has no candidate for {', '.join(missing)} (run `apt-get update`?): "
            + proc.stderr.strip()[:300]
        )
    return found


def depends_graph(roots: Iterable[str]) -> dict[str, list[str]]:
    """Depends/Pre-Depends of `roots`, recursively, first alternatives only, in one apt call."""
    out = run(["apt-cache", "depends", "--recurse", "--important", *sorted(set(roots))]).stdout
    graph: dict[str, list[str]] = {}
    cur: list[str] = []
    in_alternatives = False
    virtual_pending = False
    for line in out.splitlines():
        if not line.startswith(" "):
            cur = graph.setdefault(line.strip(), [])
            in_alternatives = virtual_pending = False
            continue
        m = re.match(r"^ ([ |])(?:Pre)?Depends: (.+)$", line)
        if m:
            name = m.group(2).strip()
            if not in_alternatives:  # the first alternative of a group decides
                if name.startswith("<"):
                    virtual_pending = True
                else:
                    cur.append(name)
            in_alternatives = m.group(1) == "|"
        elif line.startswith("    ") and virtual_pending:  # providers of a virtual package
            cur.append(line.strip())
            virtual_pending = False
    return graph


def closure(
    roots: Iterable[str], stop: Iterable[str] = (), graph: dict[str, list[str]] | None = None
) -> list[str]:
    """Names of `roots` and what they need at run time, not descending below `stop`."""
    roots = list(roots)
    graph = graph if graph is not None else depends_graph(roots)
    stop = set(stop)
    seen: list[str] = []
    todo = list(roots)
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        seen.append(name)
        if name not in stop:
            todo.extend(graph.get(name, []))
    return seen


def kernel_image(graph: dict[str, list[str]]) -> str:
    """The image package linux-image-amd64 points at (e.g. linux-image-6.1.0-57-amd64)."""
    image = [d for d in graph.get(KERNEL_META, []) if d.startswith("linux-image-")]
    if not image:
        raise BuildError(f"{KERNEL_META} depends on no linux-image package")
    return image[0]


def download(pkgs: Iterable[Package], dest: Path) -> dict[str, Path]:
    """`apt-get download` exact versions into dest; returns name -> .deb path."""
    pkgs = sorted(pkgs, key=lambda p: p.name)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root"]
            + [f"{p.name}={p.version}" for p in pkgs],
            cwd=dest,
        )
    except BuildError as e:
        raise BuildError(f"{e} (apt's lists may be stale: run `apt-get update`)") from e
    debs: dict[str, Path] = {}
    for deb in dest.glob("*.deb"):
        debs[deb.name.split("_", 1)[0]] = deb
    missing = [p.name for p in pkgs if p.name not in debs]
    if missing:
        raise BuildError(f"apt-get download left no .deb for {', '.join(missing)}")
    return debs


def unpack(debs: Iterable[Path], root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        run(["dpkg-deb", "-x", str(deb), str(root)])


# --------------------------------------------------------------------------------------------
# ELF: the few facts the tiny guest needs (shared-library needs, interpreter, module info)


@dataclass
class Elf:
    needed: list[str]
    interp: str | None
    sections: dict[str, bytes]


def read_elf(path: Path) -> Elf:
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BuildError(f"{path}: not a 64-bit little-endian ELF file")
    (phoff, shoff) = struct.unpack_from("<QQ", data, 0x20)
    (phentsize, phnum, shentsize, shnum, shstrndx) = struct.unpack_from("<HHHHH", data, 0x36)
    interp = None
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type == 3:  # PT_INTERP
            interp = data[p_offset : p_offset + p_filesz].rstrip(b"\0").decode()
    shdrs = []
    for i in range(shnum):
        name, typ, _, _, off, size, link = struct.unpack_from(
            "<IIQQQQI", data, shoff + i * shentsize
        )
        shdrs.append((name, typ, off, size, link))
    sections: dict[str, bytes] = {}
    if shdrs:
        _, _, stroff, strsize, _ = shdrs[shstrndx]
        names = data[stroff : stroff + strsize]
        for name, _typ, off, size, _link in shdrs:
            label = names[name : names.index(b"\0", name)].decode()
            sections[label] = data[off : off + size]
    needed: list[str] = []
    dynamic = sections.get(".dynamic", b"")
    dynstr = sections.get(".dynstr", b"")
    for i in range(0, len(dynamic) - 15, 16):
        tag, val = struct.unpack_from("<qQ", dynamic, i)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            needed.append(dynstr[val : dynstr.index(b"\0", val)].decode())
    return Elf(needed, interp, sections)


def modinfo(path: Path) -> dict[str, str]:
    info: dict[str, str] = {}
    for item in read_elf(path).sections.get(".modinfo", b"").split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            info.setdefault(key, value)
    return info


def pvh_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed kernel inside a bzImage, if QEMU can boot it through its PVH entry.

    It is the same kernel (the ELF the bzImage's decompressor would unpack), but QEMU jumps to
    its PVH entry point directly: under TCG that skips ~10 s of decompressing and relocating.
    None when the payload is not xz or the ELF has no PVH entry note (Xen note type 18)."""
    if bzimage[0x202:0x206] != b"HdrS":
        return None
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    if not payload.startswith(b"\xfd7zXZ\0"):
        return None
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if not elf.startswith(b"\x7fELF"):
        return None
    with tempfile.NamedTemporaryFile() as f:
        f.write(elf)
        f.flush()
        notes = read_elf(Path(f.name)).sections.get(".notes", b"")
    i = 0
    while i + 12 <= len(notes):
        namesz, descsz, typ = struct.unpack_from("<III", notes, i)
        if notes[i + 12 : i + 12 + namesz] == b"Xen\0" and typ == 18:
            return elf
        i += 12 + (-(-namesz // 4) * 4) + (-(-descsz // 4) * 4)
    return None


def in_root(root: Path, path: str) -> Path:
    """Resolve `path` (absolute inside the unpacked tree `root`), following symlinks there."""
    parts = [p for p in path.split("/") if p]
    cur = root
    hops = 0
    while parts:
        cur = cur / parts.pop(0)
        if cur.is_symlink():
            hops += 1
            if hops > 40:
                raise BuildError(f"symlink loop resolving {path}")
            target = os.readlink(cur)
            rest = [p for p in target.split("/") if p]
            cur = root if target.startswith("/") else cur.parent
            parts = rest + parts
    return cur


# --------------------------------------------------------------------------------------------
# cpio (newc) writer: deterministic, owners root, device nodes without mknod


class Cpio:
    def __init__(self) -> None:
        self.entries: dict[str, tuple[int, bytes, int]] = {}  # path -> (mode, data, rdev)

    def dir(self, path: str, mode: int = 0o755) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self.entries.setdefault("/".join(parts[:i]), (0o040000 | mode, b"", 0))

    def _parent(self, path: str) -> str:
        path = path.strip("/")
        if "/" in path:
            self.dir(path.rsplit("/", 1)[0])
        return path

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.entries[self._parent(path)] = (0o100000 | mode, data, 0)

    def symlink(self, path: str, target: str) -> None:
        self.entries[self._parent(path)] = (0o120777, target.encode(), 0)

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.entries[self._parent(path)] = (0o020000 | mode, b"", (major << 8) | minor)

    def write(self) -> bytes:
        out = bytearray()

        def pad() -> None:
            out.extend(b"\0" * (-len(out) % 4))

        # Parents sort before their children; the kernel needs directories first.
        names = sorted(self.entries, key=lambda p: p.split("/"))
        for ino, name in enumerate([*names, "TRAILER!!!"], start=1):
            mode, data, rdev = self.entries.get(name, (0, b"", 0))
            raw = name.encode() + b"\0"
            fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF, len(raw), 0]
            out.extend(b"070701" + "".join(f"{f:08x}" for f in fields).encode() + raw)
            pad()
            out.extend(data)
            pad()
        return bytes(out)


# --------------------------------------------------------------------------------------------
# The tiny guest

# Kernel modules the tiny guest loads at boot (with their dependencies, from the same kernel).
# Debian 12's config has all of these as modules (=m): virtio transport, net, disks, rng; the
# AHCI (q35) and PIIX (pc) paths for a CD-ROM seed; iso9660/vfat (with vfat's default codepage
# and charset); the ACPI power button and the evdev device acpid reads it from. SCSI/SATA
# disks (sd_mod, virtio_scsi) are left out: guest disks are virtio-blk (/dev/vdX).
TINY_MODULES = {
    # loaded first, alone: what both groups below share
    "core": ["virtio_pci"],
    # loaded in the foreground, then the network is configured ...
    "net": ["virtio_net"],
    # ... while these load in the background (the AHCI probe alone takes ~0.4 s under TCG)
    "rest": [
        "virtio_blk",
        "virtio_rng",
        "ahci",
        "ata_piix",
        "sr_mod",
        "isofs",
        "vfat",
        "nls_cp437",
        "nls_ascii",
        "nls_utf8",
        "button",
        "evdev",
    ],
}
TINY_PACKAGES = ["busybox-static", "dropbear-bin"]
TINY_CMDLINE = "console=ttyS0 quiet"

INITTAB = """\
::sysinit:/etc/init.d/rcS
::ctrlaltdel:/bin/poweroff
::shutdown:/etc/init.d/rcK
"""

RC_S = r"""#!/bin/sh
# barge tiny guest: bring the machine up, install keys from a NoCloud seed, start dropbear.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run /tmp /var/log /mnt/seed
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
syslogd -O /var/log/messages
hostname barge-tiny

say() { echo "barge-tiny-guest: $*" > /dev/ttyS0; }
up() { cut -d' ' -f1 /proc/uptime; }
t_init=$(up)

modprobe -a @core@ || say "modprobe @core@ failed"
modprobe -a @net@ || say "modprobe @net@ failed"
(modprobe -a @rest@ || say "modprobe @rest@ failed") &
rest=$!
t_mod=$(up)

ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    udhcpc -i eth0 -s /etc/udhcpc.script -q -n -t 4 -T 1 -A 1 >/dev/null 2>&1 || {
        say "no DHCP answer on eth0: using 10.0.2.15/24 via 10.0.2.2"
        ip addr add 10.0.2.15/24 dev eth0
        ip route add default via 10.0.2.2
        echo "nameserver 10.0.2.3" > /etc/resolv.conf
    }
else
    say "no eth0"
fi
wait $rest
t_net=$(up)

# NoCloud seed: a filesystem labelled cidata (ISO9660 or vfat; vfat labels are often upper
# case). Disks and CDs probe asynchronously; wait up to 3 s for one to show up.
seed=""
i=0
while [ $i -lt 30 ]; do
    seed=$(findfs LABEL=cidata 2>/dev/null || findfs LABEL=CIDATA 2>/dev/null)
    [ -n "$seed" ] && break
    sleep 0.1; i=$((i + 1))
done
mkdir -p /root/.ssh
chmod 700 /root /root/.ssh
: > /root/.ssh/authorized_keys
if [ -n "$seed" ] && mount -o ro "$seed" /mnt/seed; then
    [ -f /mnt/seed/user-data ] && awk -f /etc/seed-keys.awk /mnt/seed/user-data \
        > /root/.ssh/authorized_keys
    name=""
    [ -f /mnt/seed/meta-data ] && name=$(sed -n 's/^local-hostname:[ \t]*//p' /mnt/seed/meta-data)
    [ -f /mnt/seed/user-data ] && uhost=$(sed -n 's/^hostname:[ \t]*//p' /mnt/seed/user-data) &&
        [ -n "$uhost" ] && name=$uhost
    name=$(echo "$name" | head -n1 | tr -d "\"'\r ")
    [ -n "$name" ] && hostname "$name" && echo "$name" > /etc/hostname
    umount /mnt/seed
    say "seed $seed: $(grep -c . /root/.ssh/authorized_keys) key(s), hostname $(hostname)"
else
    say "no NoCloud seed (label cidata): no keys installed"
fi
chmod 600 /root/.ssh/authorized_keys
printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$(hostname)" > /etc/hosts
t_seed=$(up)

# The host key is made at boot, so every VM (and every clone of one) has its own.
mkdir -p /etc/dropbear
key=/etc/dropbear/dropbear_ed25519_host_key
dropbearkey -t ed25519 -f $key 2>/dev/null | grep '^ssh-' > /etc/dropbear/host_key.pub
{
    echo "-----BEGIN SSH HOST KEY KEYS-----"
    cat /etc/dropbear/host_key.pub
    echo "-----END SSH HOST KEY KEYS-----"
} > /dev/ttyS0

# The ACPI power button (QMP system_powerdown) runs /etc/acpi/PWRF/00000080: sync, power off.
acpid -c /etc/acpi -l /var/log/acpid.log

dropbear -s -p 22 -r $key
i=0
while ! netstat -ltn 2>/dev/null | grep -q ':22 '; do
    [ $i -ge 100 ] && { say "dropbear did not start"; break; }
    sleep 0.05; i=$((i + 1))
done
t_ssh=$(up)
say "up $t_ssh s (kernel $t_init, modules $t_mod, net+modules $t_net, seed $t_seed)," \
    "$(ip -4 -o addr show eth0 2>/dev/null | awk '{print $4}')"
say "ready"
"""

# Keys from a #cloud-config user-data: the YAML list under the top-level key
# `ssh_authorized_keys:` (block style: one `- key` per line, quoted or not).
SEED_KEYS_AWK = r"""
/^ssh_authorized_keys:[ \t\r]*$/ { inlist = 1; next }
inlist && /^[ \t]*(#.*)?\r?$/ { next }
inlist && /^[ \t]*- / {
    sub(/^[ \t]*- [ \t]*/, ""); sub(/[ \t\r]+$/, "")
    if ($0 ~ /^".*"$/ || $0 ~ /^'.*'$/) $0 = substr($0, 2, length($0) - 2)
    if ($0 != "") print
    next
}
{ inlist = 0 }
"""

RC_K = """#!/bin/sh
# Shutdown (busybox init runs this on poweroff/reboot): flush what was written to the disks.
echo "barge-tiny-guest: powering off" > /dev/ttyS0
sync
"""

POWER_BUTTON = """#!/bin/sh
sync
poweroff
"""

UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done ;;
esac
exit 0
"""

ETC_FILES = {
    "etc/inittab": INITTAB,
    "etc/seed-keys.awk": SEED_KEYS_AWK,
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nsshd:x:100:65534::/run/sshd:/bin/false\n",
    "etc/group": "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
    "etc/shadow": "root:*:19000:0:99999:7:::\n",
    "etc/shells": "/bin/sh\n/bin/ash\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n",
    "etc/profile": "export PATH=/usr/sbin:/usr/bin:/sbin:/bin\nexport PS1='\\h:\\w\\$ '\n",
    "etc/os-release": 'NAME="barge tiny guest"\nID=barge-tiny\nID_LIKE=debian\n',
}
EXECUTABLES = {
    "etc/init.d/rcS": RC_S,
    "etc/init.d/rcK": RC_K,
    "etc/acpi/PWRF/00000080": POWER_BUTTON,
    "etc/udhcpc.script": UDHCPC_SCRIPT,
}


def tiny_plan() -> list[Package]:
    graph = depends_graph([*TINY_PACKAGES, KERNEL_META])
    kernel = kernel_image(graph)
    names = closure([*TINY_PACKAGES, kernel], stop=[kernel], graph=graph)
    return list(candidates(names).values())


def add_elf_with_libs(cpio: Cpio, root: Path, path: str) -> None:
    """Copy the executable at `path` and every shared library it needs (transitively)."""
    libdirs = [f"/lib/{MULTIARCH}", f"/usr/lib/{MULTIARCH}", "/lib64", "/lib", "/usr/lib"]
    todo = [path]
    done: set[str] = set()
    while todo:
        cur = todo.pop()
        if cur in done:
            continue
        done.add(cur)
        real = in_root(root, cur)
        if not real.is_file():
            raise BuildError(f"{cur} is missing from the unpacked packages")
        cpio.file(cur, real.read_bytes(), 0o755)
        elf = read_elf(real)
        if elf.interp and elf.interp not in done:
            todo.append(elf.interp)
        for soname in elf.needed:
            for d in libdirs:
                if in_root(root, f"{d}/{soname}").is_file():
                    todo.append(f"{d}/{soname}")
                    break
            else:
                raise BuildError(f"{cur} needs {soname}, found in no unpacked package")


def add_modules(cpio: Cpio, root: Path, release: str, wanted: Iterable[str]) -> list[str]:
    """Copy `wanted` modules and what they depend on, with a modules.dep for modprobe; returns
    the module file names in load order."""
    moddir = root / "lib/modules" / release
    by_name = {p.name[: -len(".ko")].replace("-", "_"): p for p in moddir.rglob("*.ko")}
    builtin = {
        Path(line.strip()).name.removesuffix(".ko").replace("-", "_")
        for line in (moddir / "modules.builtin").read_text().splitlines()
    }
    order: list[str] = []
    deps: dict[str, list[str]] = {}
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order or name in builtin:
            return
        if name not in by_name:
            raise BuildError(f"kernel {release} has no module {name} (and it is not built in)")
        if name in visiting:
            raise BuildError(f"module dependency cycle at {name}")
        visiting.add(name)
        direct = [d.replace("-", "_") for d in modinfo(by_name[name]).get("depends", "").split(",")]
        deps[name] = [d for d in direct if d and d not in builtin]
        for dep in deps[name]:
            visit(dep)
        order.append(name)

    for name in wanted:
        visit(name)

    def rel(name: str) -> str:
        return by_name[name].relative_to(moddir).as_posix()

    dep_lines = []
    for name in order:
        cpio.file(f"lib/modules/{release}/{rel(name)}", by_name[name].read_bytes())
        # modules.dep lists every dependency, the ones to load first last (as depmod does)
        needs = [m for m in order if m in transitive(name, deps)]
        dep_lines.append(f"{rel(name)}: {' '.join(rel(m) for m in reversed(needs))}".rstrip())
    cpio.file(f"lib/modules/{release}/modules.dep", "\n".join(dep_lines).encode() + b"\n")
    for extra in ("modules.builtin", "modules.order"):
        cpio.file(f"lib/modules/{release}/{extra}", (moddir / extra).read_bytes())
    return [by_name[m].name for m in order]


def transitive(name: str, deps: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    todo = list(deps.get(name, []))
    while todo:
        d = todo.pop()
        if d not in out:
            out.add(d)
            todo.extend(deps.get(d, []))
    return out


def build_tiny(pkgs: list[Package], work: Path, out: Path) -> dict[str, object]:
    """Kernel, initramfs and cmdline of the tiny guest, written into `out`."""
    debs = download(pkgs, work / "debs")
    root = work / "root"
    unpack(debs.values(), root)
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise BuildError(f"expected one kernel in the image package, found {kernels}")
    release = kernels[0].name.removeprefix("vmlinuz-")

    cpio = Cpio()
    for d in ("dev", "proc", "sys", "run", "tmp", "root", "mnt", "etc/dropbear", "var/log"):
        cpio.dir(d, 0o1777 if d == "tmp" else 0o755)
    cpio.symlink("var/run", "/run")
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    busybox = (root / "bin/busybox").read_bytes()
    cpio.file("bin/busybox", busybox, 0o755)
    applets = run([str(root / "bin/busybox"), "--list-full"]).stdout.split()
    for applet in applets:
        if applet != "bin/busybox":
            cpio.symlink(applet, "/bin/busybox")
    cpio.symlink("init", "/bin/busybox")
    for prog in ("/usr/sbin/dropbear", "/usr/bin/dropbearkey"):
        add_elf_with_libs(cpio, root, prog)
    # glibc's getpwnam() reads /etc/passwd through nss_files (built into libc.so.6 since 2.34).
    for path, text in ETC_FILES.items():
        cpio.file(path, text.encode(), 0o640 if path == "etc/shadow" else 0o644)
    for path, text in EXECUTABLES.items():
        for group, names in TINY_MODULES.items():
            text = text.replace(f"@{group}@", " ".join(names))
        cpio.file(path, text.encode(), 0o755)
    modules = add_modules(cpio, root, release, [m for g in TINY_MODULES.values() for m in g])

    # Uncompressed: the kernel then has nothing to inflate (~1-2 s saved under TCG); barge's
    # own disk codec compresses it when it is pushed.
    (out / "initramfs.img").write_bytes(cpio.write())
    shutil.copyfile(kernels[0], out / "vmlinuz")
    vmlinux = pvh_vmlinux(kernels[0].read_bytes())
    if vmlinux is not None:
        (out / "vmlinux").write_bytes(vmlinux)
    (out / "cmdline").write_text(TINY_CMDLINE + "\n")
    return {
        "kind": "tiny",
        "user": "root",
        "arch": "x86_64",
        "boot": "kernel",
        "kernel": "vmlinuz",
        "kernel_pvh": "vmlinux" if vmlinux is not None else None,
        "initramfs": "initramfs.img",
        "cmdline": TINY_CMDLINE,
        "kernel_release": release,
        "modules": [m.removesuffix(".ko") for m in modules],
        "host_keys": "ed25519, generated at boot, printed on ttyS0 between"
        " -----BEGIN SSH HOST KEY KEYS----- and -----END SSH HOST KEY KEYS-----",
        "ready": "barge-tiny-guest: ready",
    }


# --------------------------------------------------------------------------------------------
# Cache and driver


def cache_root() -> Path:
    env = os.environ.get("BARGE_GUEST_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "barge" / "guests"


def builder_sources(kind: str) -> list[Path]:
    """The files whose code decides what a build of `kind` produces."""
    here = Path(__file__).resolve()
    return [here] + ([here.with_name("guest_debian.py")] if kind == "debian" else [])


def builder_hash(kind: str) -> str:
    h = hashlib.sha256()
    for src in builder_sources(kind):
        h.update(hashlib.sha256(src.read_bytes()).digest())
    return h.hexdigest()


def cache_key(kind: str, pkgs: list[Package]) -> str:
    h = hashlib.sha256(f"{builder_hash(kind)}\n{kind}\n".encode())
    for p in sorted(pkgs, key=lambda p: p.name):
        h.update(f"{p.name}={p.version}\n".encode())
    return h.hexdigest()[:16]


def apt_fingerprint() -> str:
    """Changes whenever apt's idea of the candidate versions can: its lists and sources."""
    h = hashlib.sha256()
    paths: list[Path] = []
    for pattern in ("lists/*", "../../../etc/apt/sources.list*", "../../../etc/apt/pref*"):
        paths.extend(Path("/var/lib/apt").glob(pattern))
    for d in [p for p in paths if p.is_dir()]:
        paths.extend(d.iterdir())
    for p in sorted(paths):
        with contextlib.suppress(OSError):
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def plan(kind: str) -> list[Package]:
    """The exact packages a build of `kind` uses. Resolving asks apt (seconds: this host keeps
    no pkgcache.bin), so the answer is kept beside the cache until apt's lists change."""
    saved = cache_root() / f".plan-{kind}.json"
    fingerprint = apt_fingerprint()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(saved.read_text())
        if data["fingerprint"] == fingerprint and data["builder"] == builder_hash(kind):
            return [Package(n, v) for n, v in data["packages"]]
    pkgs = PLANS[kind]()
    saved.parent.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_name(f"{saved.name}.{os.getpid()}")
    tmp.write_text(
        json.dumps(
            {
                "fingerprint": fingerprint,
                "builder": builder_hash(kind),
                "packages": [[p.name, p.version] for p in pkgs],
            }
        )
    )
    os.replace(tmp, saved)
    return pkgs


def fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*"), reverse=True):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def build_lock(root: Path, name: str) -> Iterator[None]:
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def debian_module() -> Any:
    """scripts/guest_debian.py: the Debian guest's builder (kept apart so that working on it
    does not change the tiny guest's cache key)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import guest_debian

    return guest_debian


PLANS: dict[str, Callable[[], list[Package]]] = {
    "tiny": tiny_plan,
    "debian": lambda: debian_module().plan(sys.modules[__name__]),
}
BUILDERS: dict[str, Callable[[list[Package], Path, Path], dict[str, object]]] = {
    "tiny": build_tiny,
    "debian": lambda pkgs, work, out: debian_module().build(sys.modules[__name__], pkgs, work, out),
}


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first (from /proc/self/mountinfo)."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def unmount_under(path: Path) -> None:
    """Undo every mount below `path` (debootstrap's proc/sys/dev in a chroot)."""
    for point in mounts_under(path):
        subprocess.run(["umount", "-l", point], capture_output=True)
    left = mounts_under(path)
    if left:
        raise BuildError(f"still mounted under {path}: {left}")


def remove_tree(path: Path) -> None:
    """rm -rf that never descends into a mount (a killed chroot build leaves some)."""
    if path.exists():
        unmount_under(path)
        shutil.rmtree(path)


def build(kind: str, force: bool = False) -> Path:
    pkgs = plan(kind)
    key = cache_key(kind, pkgs)
    root = cache_root()
    final = root / f"{kind}-{key}"
    if final.is_dir() and not force:
        return final
    with build_lock(root, kind):
        if final.is_dir() and not force:  # another process built it while we waited
            return final
        for stale in root.glob(f".tmp-{kind}-*"):  # left by a killed build; we hold the lock
            remove_tree(stale)
        start = time.monotonic()
        log(f"building {kind} guest {key} in {root}")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{kind}-", dir=root))
        try:
            work = tmp / "work"
            out = tmp / "out"
            work.mkdir()
            out.mkdir()
            info = BUILDERS[kind](pkgs, work, out)
            info["packages"] = {p.name: p.version for p in sorted(pkgs, key=lambda p: p.name)}
            info["key"] = key
            info["build_seconds"] = round(time.monotonic() - start, 1)
            (out / "guest.json").write_text(json.dumps(info, indent=2) + "\n")
            fsync_tree(out)
            if final.exists():  # --force: move the old one aside, then swap in the new one
                os.rename(final, tmp / "old")
            os.rename(out, final)
        finally:
            remove_tree(tmp)
        log(f"built {final.name} in {time.monotonic() - start:.1f} s")
    return final


def prune(kind: str) -> list[Path]:
    """Remove the cached guests of `kind` other than the current one."""
    keep = cache_root() / f"{kind}-{cache_key(kind, plan(kind))}"
    gone = []
    with build_lock(cache_root(), kind):
        for d in sorted(cache_root().glob(f"{kind}-*")):
            if d.is_dir() and d != keep:
                remove_tree(d)
                gone.append(d)
        if kind == "debian":
            debs = cache_root() / debian_module().DEB_CACHE
            if debs.exists():
                remove_tree(debs)
                gone.append(debs)
    return gone


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=sorted(PLANS))
    ap.add_argument(
        "--print-dir",
        action="store_true",
        help="print the cached guest's directory without building; exit 3 if it is not built",
    )
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument(
        "--prune", action="store_true", help="remove the other cached guests of this kind"
    )
    args = ap.parse_args(argv)

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the clean-up (unmounts, temp dirs)

    signal.signal(signal.SIGTERM, terminate)
    try:
        if args.prune:
            for d in prune(args.kind):
                log(f"removed {d}")
        if args.print_dir:
            path = cache_root() / f"{args.kind}-{cache_key(args.kind, plan(args.kind))}"
            print(path)
            return 0 if path.is_dir() else 3
        print(build(args.kind, force=args.force))
        return 0
    except BuildError as e:
        print(f"build-guest: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("build-guest: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
