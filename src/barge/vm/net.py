"""Networking of a run: user-mode (QEMU's slirp) with forwarded ports, or a tap on a bridge.

User-mode networking needs no privileges: the guest gets 10.0.2.15/24 from QEMU's DHCP server,
and host ports on 127.0.0.1 are forwarded into it — a free one to the guest's port 22 (barge
picks it; if another process takes it before QEMU binds it, barge retries with another), plus
``--publish [ADDR:]HOST:GUEST[/tcp|/udp]``, where a taken HOST port is an error.

``--net-bridged IF`` (root only) gives the guest a tap device that QEMU creates and barge
enslaves to the bridge ``IF`` while the guest is still paused, so the guest is on the LAN
from its first packet; the tap vanishes with QEMU. The guest's address is then whatever it got
on that LAN: barge finds it by the VM's MAC in the host's neighbour (ARP) table. While
``ip --wait`` waits, barge prods the bridge's own IPv4 subnets (up to a /22) with one UDP
datagram per address, so the host ARPs for each and learns the guest's MAC.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from barge.errors import BargeError, UsageError

LOOPBACK = "127.0.0.1"
_PUBLISH_RE = re.compile(
    r"^(?:(?P<addr>[0-9.]+|\[[0-9a-fA-F:]+\]):)?(?P<host>\d+):(?P<guest>\d+)(?:/(?P<proto>tcp|udp))?$"
)


@dataclass(frozen=True)
class Forward:
    host_addr: str
    host_port: int
    guest_port: int
    proto: str = "tcp"

    def hostfwd(self) -> str:
        return f"hostfwd={self.proto}:{self.host_addr}:{self.host_port}-:{self.guest_port}"

    def to_json(self) -> dict[str, object]:
        return {
            "hostAddress": self.host_addr,
            "hostPort": self.host_port,
            "guestPort": self.guest_port,
            "protocol": self.proto,
        }

    def __str__(self) -> str:
        return f"{self.host_addr}:{self.host_port}->{self.guest_port}/{self.proto}"


def parse_publish(text: str) -> Forward:
    m = _PUBLISH_RE.match(text.strip())
    if not m:
        raise UsageError(
            f"invalid --publish {text!r}: expected [ADDR:]HOST:GUEST[/tcp|/udp], e.g. 8080:80"
        )
    host, guest = int(m["host"]), int(m["guest"])
    for what, port in (("host", host), ("guest", guest)):
        if not 1 <= port <= 65535:
            raise UsageError(f"invalid --publish {text!r}: {what} port {port} is out of range")
    addr = (m["addr"] or LOOPBACK).strip("[]")
    return Forward(addr, host, guest, m["proto"] or "tcp")


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def port_available(addr: str, port: int, proto: str = "tcp") -> bool:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(_family(addr), kind) as s:
        try:
            s.bind((addr, port))
        except OSError:
            return False
    return True


def free_port(addr: str = LOOPBACK) -> int:
    with socket.socket(_family(addr), socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        port: int = s.getsockname()[1]
        return port


def check_published(forwards: list[Forward]) -> None:
    seen: set[tuple[str, int, str]] = set()
    for f in forwards:
        key = (f.host_addr, f.host_port, f.proto)
        if key in seen:
            raise UsageError(f"--publish {f}: host port {f.host_port} is given twice")
        seen.add(key)
        if not port_available(f.host_addr, f.host_port, f.proto):
            raise UsageError(
                f"--publish {f}: {f.host_addr}:{f.host_port}/{f.proto} is already in use on "
                "this host; choose another host port"
            )


def user_netdev(ssh: Forward | None, forwards: list[Forward]) -> str:
    parts = ["user", "id=net0"]
    parts += [f.hostfwd() for f in ([ssh] if ssh else []) + forwards]
    return ",".join(parts)


# -- bridged ----------------------------------------------------------------------------------


def tap_name(vm_path: Path) -> str:
    """A tap name unique to the VM (IFNAMSIZ allows 15 characters)."""
    return "barge" + hashlib.sha256(str(vm_path).encode()).hexdigest()[:10]


def check_bridge(bridge: str, sys_class_net: Path = Path("/sys/class/net")) -> None:
    if os.geteuid() != 0:
        raise UsageError("--net-bridged needs root (it creates a tap device)")
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,15}", bridge) or not (sys_class_net / bridge).exists():
        raise UsageError(f"--net-bridged {bridge}: no such network interface")
    if not (sys_class_net / bridge / "bridge").is_dir():
        raise UsageError(f"--net-bridged {bridge}: {bridge} is not a bridge")


def attach_tap(tap: str, bridge: str) -> None:
    proc = subprocess.run(
        ["ip", "link", "set", "dev", tap, "master", bridge, "up"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BargeError(
            f"cannot attach tap {tap} to bridge {bridge}: {proc.stderr.strip() or 'ip failed'}"
        )


def neighbour_address(mac: str, arp_table: Path = Path("/proc/net/arp")) -> str | None:
    """The IPv4 address the host's ARP table has for ``mac`` (complete entries only)."""
    try:
        lines = arp_table.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        cols = line.split()
        if len(cols) >= 4 and cols[3].lower() == mac.lower() and int(cols[2], 16) & 0x2:
            return cols[0]
    return None


def bridge_networks(bridge: str) -> list[ipaddress.IPv4Interface]:
    proc = subprocess.run(
        ["ip", "-j", "-4", "addr", "show", "dev", bridge],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        doc = json.loads(proc.stdout or "[]")
    except ValueError:
        return []
    nets = []
    for link in doc if isinstance(doc, list) else []:
        for a in link.get("addr_info", []):
            if a.get("family") == "inet":
                nets.append(ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}"))
    return nets


def prod_neighbours(bridge: str, max_hosts: int = 1024) -> int:
    """Make the host ARP for every address of the bridge's subnets (a UDP datagram to the
    discard port of each), so a guest that has been silent gets a neighbour entry."""
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        for iface in bridge_networks(bridge):
            if iface.network.num_addresses > max_hosts:
                continue
            for host in iface.network.hosts():
                if host == iface.ip:
                    continue
                try:
                    s.sendto(b"\0", (str(host), 9))
                    sent += 1
                except OSError:
                    continue
    return sent
