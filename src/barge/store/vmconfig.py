"""barge's VM configuration (``config.json`` in a VM directory).

Unknown fields are preserved on rewrite, so a newer barge's additions survive an older one.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from barge.errors import IntegrityError, UsageError
from barge.untrusted import load_json

SCHEMA_VERSION = 1
OSES = ("linux", "darwin", "windows")
ARCHES = ("x86_64", "aarch64")
BOOT_METHODS = ("uefi", "bios", "kernel")
#: A disk file name: letters, digits, '.', '_', '-'; never starting with '.' (so never '.',
#: '..' or hidden); at most 255 characters. Vetu's disk names (which may start with '_' or '-')
#: are all of this shape.
_DISK_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")
_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_USER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
#: the SSH user when a VM names none (barge's NoCloud seed gives root the store's key)
DEFAULT_SSH_USER = "root"


def validate_ssh_user(user: str) -> str:
    if not _USER_RE.match(user):
        raise UsageError(f"invalid user name {user!r}: letters, digits, '_', '.', '-'")
    return user


# OCI platform names <-> barge's arch names
OCI_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
FROM_OCI_ARCH = {"amd64": "x86_64", "arm64": "aarch64", "x86_64": "x86_64", "aarch64": "aarch64"}


def validate_disk_name(name: str) -> str:
    if not isinstance(name, str) or not _DISK_NAME_RE.fullmatch(name):
        raise IntegrityError(f"invalid disk file name {name!r}")
    return name


def random_mac() -> str:
    """A random locally administered unicast MAC in QEMU's 52:54:00 range."""
    b = os.urandom(3)
    return "52:54:00:" + ":".join(f"{x:02x}" for x in b)


@dataclass
class Disk:
    name: str
    size: int
    format: str = "raw"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "format": self.format}


class VMConfig:
    """Typed accessors over the raw JSON document, which keeps fields barge doesn't know."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data
        self._validate()

    @classmethod
    def new(
        cls,
        *,
        os_name: str,
        arch: str,
        cpus: int,
        memory: int,
        disks: list[Disk],
        boot: str = "uefi",
        mac: str | None = None,
    ) -> VMConfig:
        return cls(
            {
                "schemaVersion": SCHEMA_VERSION,
                "os": os_name,
                "arch": arch,
                "cpus": cpus,
                "memory": memory,
                "boot": boot,
                "macAddress": mac or random_mac(),
                "disks": [d.to_dict() for d in disks],
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> VMConfig:
        doc = load_json(data, "VM config")
        if not isinstance(doc, dict):
            raise IntegrityError("VM config is not a JSON object")
        return cls(doc)

    def to_bytes(self) -> bytes:
        return (json.dumps(self._data, indent=2, sort_keys=True) + "\n").encode()

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data)

    def _validate(self) -> None:
        d = self._data
        v = d.get("schemaVersion")
        if not isinstance(v, int) or v < 1:
            raise IntegrityError("VM config has no valid schemaVersion")
        if v > SCHEMA_VERSION:
            raise IntegrityError(
                f"VM config schemaVersion {v} is newer than this barge understands "
                f"({SCHEMA_VERSION}); upgrade barge"
            )
        for key, typ in (("cpus", int), ("memory", int)):
            if not isinstance(d.get(key), typ) or d[key] <= 0:
                raise IntegrityError(f"VM config field {key!r} must be a positive integer")
        if not isinstance(d.get("os"), str) or not isinstance(d.get("arch"), str):
            raise IntegrityError("VM config needs string fields 'os' and 'arch'")
        disks = d.get("disks")
        if not isinstance(disks, list) or not disks:
            raise IntegrityError("VM config needs a non-empty 'disks' list")
        names = set()
        for disk in disks:
            if not isinstance(disk, dict):
                raise IntegrityError("VM config 'disks' entries must be objects")
            name = validate_disk_name(disk.get("name", ""))
            if name in names or name == "config.json":
                raise IntegrityError(f"VM config names disk {name!r} twice or reserved")
            names.add(name)
            size = disk.get("size")
            if not isinstance(size, int) or size < 0:
                raise IntegrityError(f"disk {name!r} has an invalid size")
        mac = d.get("macAddress")
        if mac is not None and (not isinstance(mac, str) or not _MAC_RE.match(mac)):
            raise IntegrityError(f"VM config has an invalid macAddress {mac!r}")
        for key in ("kernel", "initramfs", "nvram"):
            if d.get(key) is not None:
                name = validate_disk_name(d[key])
                if name in names or name == "config.json":
                    raise IntegrityError(f"VM config names {name!r} as {key} and as a disk")
        for key in ("cmdline", "sshUser", "instanceUuid"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise IntegrityError(f"VM config field {key!r} must be a string")
        user = d.get("sshUser")
        if user is not None and not _USER_RE.match(user):
            raise IntegrityError(f"VM config has an invalid sshUser {user!r}")

    # -- accessors -------------------------------------------------------------------------
    @property
    def os(self) -> str:
        return str(self._data["os"])

    @property
    def arch(self) -> str:
        return str(self._data["arch"])

    @property
    def cpus(self) -> int:
        return int(self._data["cpus"])

    @cpus.setter
    def cpus(self, value: int) -> None:
        if value < 1:
            raise UsageError("cpus must be at least 1")
        self._data["cpus"] = value

    @property
    def memory(self) -> int:
        return int(self._data["memory"])

    @memory.setter
    def memory(self, value: int) -> None:
        if value < 1 << 20:
            raise UsageError("memory must be at least 1 MiB")
        self._data["memory"] = value

    @property
    def boot(self) -> str:
        return str(self._data.get("boot", "uefi"))

    @property
    def kernel(self) -> str | None:
        """The kernel's file name in the VM directory (direct kernel boot)."""
        v = self._data.get("kernel")
        return str(v) if v else None

    @property
    def initramfs(self) -> str | None:
        v = self._data.get("initramfs")
        return str(v) if v else None

    @property
    def cmdline(self) -> str:
        return str(self._data.get("cmdline") or "")

    @property
    def nvram(self) -> str | None:
        """The file name of the VM's EFI variable store, once one was made."""
        v = self._data.get("nvram")
        return str(v) if v else None

    @property
    def ssh_user(self) -> str:
        return str(self._data.get("sshUser") or DEFAULT_SSH_USER)

    def set_kernel_boot(self, kernel: str, initramfs: str | None, cmdline: str) -> None:
        self._data.update(boot="kernel", kernel=kernel, cmdline=cmdline)
        if initramfs:
            self._data["initramfs"] = initramfs
        else:
            self._data.pop("initramfs", None)
        self._validate()

    @property
    def mac_address(self) -> str | None:
        mac = self._data.get("macAddress")
        return str(mac) if mac else None

    @mac_address.setter
    def mac_address(self, value: str) -> None:
        self._data["macAddress"] = value

    @property
    def disks(self) -> list[Disk]:
        return [
            Disk(str(d["name"]), int(d["size"]), str(d.get("format", "raw")))
            for d in self._data["disks"]
        ]

    def set_disk_size(self, name: str, size: int) -> None:
        for d in self._data["disks"]:
            if d["name"] == name:
                d["size"] = size
                return
        raise UsageError(f"no disk named {name!r}")

    @property
    def source(self) -> dict[str, Any] | None:
        """Where this VM came from (format, reference, digest), when it was pulled."""
        src = self._data.get("source")
        return dict(src) if isinstance(src, dict) else None

    @source.setter
    def source(self, value: dict[str, Any] | None) -> None:
        if value is None:
            self._data.pop("source", None)
        else:
            self._data["source"] = value

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self._data[key] = value

    @property
    def platform(self) -> str:
        """OCI platform string, e.g. ``linux/amd64``."""
        return f"{self.os}/{OCI_ARCH.get(self.arch, self.arch)}"
