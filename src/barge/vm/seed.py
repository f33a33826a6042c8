"""The NoCloud seed: a ``cidata`` volume with ``meta-data`` and ``user-data`` for cloud-init.

cloud-init's NoCloud datasource looks for a filesystem labelled ``cidata`` (ISO9660 or vfat).
barge writes the ISO9660 image itself (no root-only tools, no genisoimage): a primary volume
descriptor with ISO9660 names (``USER-DATA.;1``, which Linux shows as ``user-data``) and a
Joliet supplementary descriptor carrying the exact names, one root directory each, the files,
and the path tables. The image is rebuilt for every run into the VM's runtime directory and
attached read-only as the last virtio disk.

``user-data`` puts the store's public key at the top level ``ssh_authorized_keys`` (cloud-init
gives those to the default user, and the tiny test guest reads them there) and under ``root``
with ``disable_root: false``, so ``barge ssh NAME`` works as ``root`` on any cloud image; a
user's own ``--cloud-init FILE`` replaces it verbatim. The instance-id is derived from the
VM's identity and the user-data, so a clone, a new key or new user-data is a new instance to
cloud-init (which then applies the keys again).
"""

from __future__ import annotations

import hashlib
import re
import struct
import time
from pathlib import Path

SECTOR = 2048
PADDING_SECTORS = 150
VOLUME_ID = "cidata"


def hostname_for(name: str) -> str:
    """An RFC 1123 host name from a VM name (letters, digits, '-'; at most 63 characters)."""
    host = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return host or "barge"


def instance_id(vm_id: str, user_data: bytes) -> str:
    h = hashlib.sha256(vm_id.encode() + b"\0" + user_data).hexdigest()
    return f"barge-{h[:20]}"


def default_user_data(public_keys: list[str]) -> bytes:
    keys = [k.strip() for k in public_keys if k.strip()]
    top = "".join(f"  - {k}\n" for k in keys)
    root = "".join(f"      - {k}\n" for k in keys)
    text = (
        "#cloud-config\n"
        "# written by barge: the store's SSH key for the default user and for root\n"
        "disable_root: false\n"
        "ssh_pwauth: false\n"
        f"ssh_authorized_keys:\n{top}"
        "users:\n"
        "  - default\n"
        "  - name: root\n"
        f"    ssh_authorized_keys:\n{root}"
    )
    return text.encode()


def nocloud_files(
    vm_name: str, vm_id: str, public_keys: list[str], user_data: bytes | None = None
) -> dict[str, bytes]:
    data = user_data if user_data is not None else default_user_data(public_keys)
    meta = f"instance-id: {instance_id(vm_id, data)}\nlocal-hostname: {hostname_for(vm_name)}\n"
    return {"meta-data": meta.encode(), "user-data": data}


def write_seed(path: Path, files: dict[str, bytes]) -> None:
    path.write_bytes(build_iso(files))


# -- ISO9660 + Joliet -------------------------------------------------------------------------


def _both16(v: int) -> bytes:
    return struct.pack("<H", v) + struct.pack(">H", v)


def _both32(v: int) -> bytes:
    return struct.pack("<I", v) + struct.pack(">I", v)


def _dir_date(t: time.struct_time) -> bytes:
    return bytes([t.tm_year - 1900, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, 0])


def _vd_date(t: time.struct_time) -> bytes:
    return time.strftime("%Y%m%d%H%M%S", t).encode() + b"00" + b"\0"


def _dir_record(ident: bytes, extent: int, size: int, is_dir: bool, t: time.struct_time) -> bytes:
    body = (
        b"\0"  # extended attribute record length
        + _both32(extent)
        + _both32(size)
        + _dir_date(t)
        + bytes([2 if is_dir else 0, 0, 0])
        + _both16(1)
        + bytes([len(ident)])
        + ident
    )
    if (len(body) + 1) % 2:
        body += b"\0"  # records have an even length, the padding included
    return bytes([len(body) + 1]) + body


def _path_table(root_extent: int, big_endian: bool) -> bytes:
    fmt = ">IH" if big_endian else "<IH"
    return bytes([1, 0]) + struct.pack(fmt, root_extent, 1) + b"\0\0"


def _iso_name(name: str) -> bytes:
    base, dot, ext = name.upper().partition(".")
    return f"{base}.{ext if dot else ''};1".encode("ascii", "replace")


def _pad(text: str, n: int, joliet: bool) -> bytes:
    if joliet:
        raw = text.encode("utf-16-be")[:n]
        return raw + b"\0 " * ((n - len(raw)) // 2) + b" " * ((n - len(raw)) % 2)
    return text.encode("ascii", "replace")[:n].ljust(n, b" ")


def build_iso(
    files: dict[str, bytes], *, volume_id: str = VOLUME_ID, now: float | None = None
) -> bytes:
    """An ISO9660 image (with Joliet names) holding ``files`` in its root directory."""
    t = time.gmtime(now if now is not None else time.time())
    names = sorted(files)
    # layout: 16 system sectors, PVD, SVD, terminator, 4 path tables, 2 root dirs, file data
    pvd_at, svd_at, term_at = 16, 17, 18
    lpt, mpt, jlpt, jmpt = 19, 20, 21, 22
    root_at, jroot_at = 23, 24
    extents: dict[str, int] = {}
    nxt = 25
    for n in names:
        extents[n] = nxt
        nxt += max(1, -(-len(files[n]) // SECTOR))
    # 150 sectors of padding, as genisoimage adds: readers probing other filesystems read
    # past a tiny image's end and give up (busybox's findfs does, below 128 KiB)
    total = nxt + PADDING_SECTORS

    def root_dir(joliet: bool, own: int) -> bytes:
        recs = _dir_record(b"\0", own, SECTOR, True, t) + _dir_record(b"\1", own, SECTOR, True, t)
        for n in names:
            ident = n.encode("utf-16-be") if joliet else _iso_name(n)
            recs += _dir_record(ident, extents[n], len(files[n]), False, t)
        if len(recs) > SECTOR:
            raise ValueError("too many seed files for one directory sector")
        return recs.ljust(SECTOR, b"\0")

    def descriptor(joliet: bool) -> bytes:
        root = root_at if not joliet else jroot_at
        d = bytearray(SECTOR)
        d[0] = 2 if joliet else 1
        d[1:6] = b"CD001"
        d[6] = 1
        d[8:40] = _pad("LINUX", 32, joliet)
        d[40:72] = _pad(volume_id, 32, joliet)
        d[80:88] = _both32(total)
        if joliet:
            d[88:91] = b"%/E"  # UCS-2 level 3
        d[120:124] = _both16(1)
        d[124:128] = _both16(1)
        d[128:132] = _both16(SECTOR)
        d[132:140] = _both32(10)
        d[140:144] = struct.pack("<I", jlpt if joliet else lpt)
        d[148:152] = struct.pack(">I", jmpt if joliet else mpt)
        d[156:190] = _dir_record(b"\0", root, SECTOR, True, t)
        for start, n in ((190, 128), (318, 128), (446, 128), (702, 37), (739, 37), (776, 37)):
            d[start : start + n] = _pad("", n, joliet)
        d[574:702] = _pad("BARGE", 128, joliet)
        d[813:830] = _vd_date(t)
        d[830:847] = _vd_date(t)
        d[847:864] = b"0" * 16 + b"\0"
        d[864:881] = b"0" * 16 + b"\0"
        d[881] = 1
        return bytes(d)

    terminator = bytearray(SECTOR)
    terminator[0] = 255
    terminator[1:7] = b"CD001\x01"
    sectors: dict[int, bytes] = {
        pvd_at: descriptor(False),
        svd_at: descriptor(True),
        term_at: bytes(terminator),
        lpt: _path_table(root_at, False).ljust(SECTOR, b"\0"),
        mpt: _path_table(root_at, True).ljust(SECTOR, b"\0"),
        jlpt: _path_table(jroot_at, False).ljust(SECTOR, b"\0"),
        jmpt: _path_table(jroot_at, True).ljust(SECTOR, b"\0"),
        root_at: root_dir(False, root_at),
        jroot_at: root_dir(True, jroot_at),
    }
    out = bytearray(total * SECTOR)
    for at, data in sectors.items():
        out[at * SECTOR : at * SECTOR + SECTOR] = data
    for n in names:
        out[extents[n] * SECTOR : extents[n] * SECTOR + len(files[n])] = files[n]
    return bytes(out)
