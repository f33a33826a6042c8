"""Real guests for tests: fixtures, a NoCloud seed builder and a plain-QEMU runner.

Fixtures (session-scoped; see docs/guests.md):

* ``tiny_guest``    Debian's kernel + a busybox/dropbear initramfs (scripts/build-guest.py tiny);
                    never skips: a build failure is a test error
* ``debian_guest``  a debootstrapped Debian 12 disk (scripts/build-guest.py debian); skips
                    with a reason when it cannot be built within DEBIAN_BUILD_BOUND

Helpers, independent of barge: :func:`build_guest`, :func:`make_seed` (a ``cidata`` volume,
ISO9660 or vfat), :class:`Qemu` (qemu-system-x86_64 under TCG with a serial log, a QMP socket
and a user-mode network forwarding a free loopback port to the guest's port 22),
:func:`ssh_keypair`. Every QEMU is stopped by its PID; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILDER = REPO / "scripts" / "build-guest.py"
TINY_READY = "barge-tiny-guest: ready"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# A cold build of the Debian guest (debootstrap) is bounded, counted from the start of the
# session (it builds in the background while other tests run); a warm one returns at once.
DEBIAN_BUILD_BOUND = float(os.environ.get("BARGE_DEBIAN_BUILD_BOUND", "900"))


@dataclass(frozen=True)
class Guest:
    dir: Path
    kernel: Path  # Debian's stock bzImage
    initramfs: Path
    cmdline: str
    disk: Path | None
    user: str
    boot: str  # "kernel" | "uefi"
    notes: dict[str, Any] = field(default_factory=dict)  # guest.json
    # The same kernel uncompressed (ELF), booted by QEMU through its PVH entry point: under TCG
    # that skips ~10 s of decompression. None where the kernel has no PVH entry.
    kernel_pvh: Path | None = None


class GuestBuild:
    """scripts/build-guest.py KIND running in the background: started as soon as the session's
    tests are collected (a cold Debian build then overlaps the tests that run before it), waited
    for by the fixture. A warm cache answers in well under a second."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.started = time.monotonic()
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(BUILDER), kind],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,  # only the directory is printed there
            stderr=self.stderr,
            text=True,
        )

    def result(self, bound: float) -> Guest:
        """The guest, once built; TimeoutExpired (the build stopped) after `bound` seconds from
        the start of the build."""
        try:
            out, _ = self.proc.communicate(
                timeout=max(1.0, self.started + bound - time.monotonic())
            )
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        if self.proc.returncode != 0:
            self.stderr.seek(0)
            err = self.stderr.read().decode(errors="replace")
            raise RuntimeError(f"build-guest.py {self.kind} failed ({self.proc.returncode}): {err}")
        return load_guest(Path(out.strip().splitlines()[-1]))

    def stop(self) -> None:
        """SIGTERM (the builder unwinds: unmounts, removes its temp dir), then SIGKILL."""
        stop_process(self.proc, grace=60)
        self.stderr.close()


def stop_process(proc: subprocess.Popen[Any], grace: float) -> None:
    """Stop a child by its PID: SIGTERM, `grace` seconds, SIGKILL; every wait bounded."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


_builds: dict[str, GuestBuild] = {}


def start_build(kind: str) -> GuestBuild:
    if kind not in _builds:
        _builds[kind] = GuestBuild(kind)
    return _builds[kind]


def load_guest(d: Path) -> Guest:
    info = json.loads((d / "guest.json").read_text())
    return Guest(
        dir=d,
        kernel=d / info["kernel"],
        initramfs=d / info["initramfs"],
        cmdline=(d / "cmdline").read_text().strip(),
        disk=d / info["disk"] if info.get("disk") else None,
        user=info["user"],
        boot=info["boot"],
        notes=info,
        kernel_pvh=d / info["kernel_pvh"] if info.get("kernel_pvh") else None,
    )


def build_guest(kind: str, timeout: float = 900.0) -> Guest:
    """Build (or find in the cache) a guest with scripts/build-guest.py."""
    return start_build(kind).result(timeout)


FIXTURE_KINDS = {"tiny_guest": "tiny", "debian_guest": "debian"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The Debian guest's tests run last, so that its build overlaps everything else.
    items.sort(key=lambda item: item.get_closest_marker("debian_guest") is not None)


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    wanted = {f for item in session.items for f in getattr(item, "fixturenames", ())}
    for fixture, kind in FIXTURE_KINDS.items():
        if fixture in wanted:
            start_build(kind)


def pytest_sessionfinish() -> None:
    for build in _builds.values():
        build.stop()


@pytest.fixture(scope="session")
def tiny_guest() -> Guest:
    return build_guest("tiny", timeout=600)


@pytest.fixture(scope="session")
def debian_guest() -> Guest:
    try:
        return build_guest("debian", timeout=DEBIAN_BUILD_BOUND)
    except subprocess.TimeoutExpired:
        pytest.skip(
            f"the Debian guest did not build within {DEBIAN_BUILD_BOUND:.0f} s "
            "(BARGE_DEBIAN_BUILD_BOUND)"
        )


# -- seeds and keys ----------------------------------------------------------------------------


def ssh_keypair(directory: Path) -> Path:
    """A fresh ed25519 key pair; returns the private key's path (public: + '.pub')."""
    key = directory / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "barge-test", "-f", str(key)],
        check=True,
    )
    return key


def make_seed(
    path: Path,
    *,
    keys: Sequence[str],
    hostname: str,
    instance_id: str = "i-barge-test",
    fs: str = "iso9660",
    label: str = "cidata",
    user: str | None = None,
) -> Path:
    """A NoCloud seed: meta-data and a #cloud-config user-data listing `keys` at top level and
    (with `user`) under that default user, as barge writes it. ISO9660 (genisoimage, Joliet
    and Rock Ridge) or vfat (mkfs.vfat + mcopy, no mount)."""
    meta = f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n"
    lines = ["#cloud-config", "ssh_authorized_keys:", *(f"  - {k}" for k in keys)]
    if user:
        lines += [
            "users:",
            "  - default",
            f"  - name: {user}",
            "    sudo: ALL=(ALL) NOPASSWD:ALL",
            "    shell: /bin/bash",
            "    ssh_authorized_keys:",
            *(f"      - {k}" for k in keys),
        ]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        (src / "meta-data").write_text(meta)
        (src / "user-data").write_text("\n".join(lines) + "\n")
        files = [str(src / "user-data"), str(src / "meta-data")]
        path.unlink(missing_ok=True)
        if fs == "iso9660":
            subprocess.run(
                ["genisoimage", "-quiet", "-o", str(path), "-V", label, "-J", "-r", *files],
                check=True,
            )
        elif fs == "vfat":
            subprocess.run(
                ["mkfs.vfat", "-C", "-n", label, str(path), "1024"], check=True, capture_output=True
            )
            subprocess.run(["mcopy", "-i", str(path), *files, "::"], check=True)
        else:
            raise ValueError(f"unknown seed filesystem {fs}")
    return path


# -- QEMU ---------------------------------------------------------------------------------------


class Qemu:
    """qemu-system-x86_64 under TCG, headless: serial to a file, QMP on a unix socket, user-mode
    network with 127.0.0.1:<free port> forwarded to the guest's port 22."""

    def __init__(self, workdir: Path, args: Sequence[str], memory: int = 256, cpus: int = 1):
        self.workdir = workdir
        self.serial = workdir / "serial.log"
        # unix socket paths are short (108 bytes): keep the socket in a short private dir
        self._sockdir = tempfile.mkdtemp(prefix="bq-")
        self.qmp_path = Path(self._sockdir) / "qmp"
        self.cmd = [
            "qemu-system-x86_64",
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            str(cpus),
            "-m",
            str(memory),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            f"file:{self.serial}",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-netdev",
            "user,id=n0,hostfwd=tcp:127.0.0.1:0-:22",
            "-device",
            "virtio-net-pci,netdev=n0",
            *args,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.port = 0
        self._qmp: socket.socket | None = None
        self._qmp_buf = b""

    def start(self) -> Qemu:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=open(self.workdir / "qemu.out", "wb"),  # noqa: SIM115 - closed with the child
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while not self.qmp_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU did not start: {self.output()}")
            time.sleep(0.02)
        # the socket file exists from bind(), a moment before QEMU listens on it
        while True:
            self._qmp = socket.socket(socket.AF_UNIX)
            self._qmp.settimeout(10)
            try:
                self._qmp.connect(str(self.qmp_path))
                break
            except ConnectionRefusedError:
                self._qmp.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"QEMU did not start: {self.output()}") from None
                time.sleep(0.02)
        self._qmp_read()  # greeting
        self.qmp("qmp_capabilities")
        usernet = self.qmp("human-monitor-command", {"command-line": "info usernet"})
        m = re.search(r"TCP\[HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)", usernet)
        if not m:
            raise RuntimeError(f"no host forward in `info usernet`: {usernet!r}")
        self.port = int(m.group(1))
        return self

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "qemu.out").read_text(errors="replace")
        return ""

    def _qmp_read(self) -> dict[str, Any]:
        assert self._qmp is not None
        while True:
            while b"\n" not in self._qmp_buf:
                chunk = self._qmp.recv(65536)
                if not chunk:
                    raise ConnectionError("QMP closed")
                self._qmp_buf += chunk
            line, self._qmp_buf = self._qmp_buf.split(b"\n", 1)
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:
                return msg

    def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        assert self._qmp is not None
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self._qmp.sendall(json.dumps(req).encode() + b"\n")
        reply = self._qmp_read()
        if "error" in reply:
            raise RuntimeError(f"QMP {command}: {reply['error']}")
        return reply.get("return")

    def serial_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.serial.read_text(errors="replace")
        return ""

    def wait_serial(self, text: str, timeout: float) -> float:
        """Seconds from start until `text` appears on the serial console."""
        deadline = time.monotonic() + timeout
        while text not in self.serial_text():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited before {text!r}: {self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {text!r} on the serial console in {timeout} s: {self.tail()}"
                )
            time.sleep(0.05)
        return time.monotonic() - self.started

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.serial_text().splitlines()[-lines:]) + "\n" + self.output()

    def ssh_cmd(self, key: Path, user: str, command: str, connect_timeout: float = 5) -> list[str]:
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"ConnectTimeout={connect_timeout:.0f}",
            "-o",
            "LogLevel=ERROR",
            "-i",
            str(key),
            "-p",
            str(self.port),
            f"{user}@127.0.0.1",
            command,
        ]

    def ssh(
        self, key: Path, user: str, command: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        # ConnectTimeout bounds the banner exchange too: a guest on a loaded host's TCG can take
        # longer than the readiness probe's 5 s to answer a second connection
        connect = max(5.0, min(30.0, timeout / 2))
        return subprocess.run(
            self.ssh_cmd(key, user, command, connect),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def wait_ssh(self, key: Path, user: str, timeout: float) -> float:
        """Seconds from start until `ssh true` succeeds."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited before sshd answered: {self.tail()}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                last = self.ssh(key, user, "true", timeout=15)
                if last.returncode == 0:
                    return time.monotonic() - self.started
            time.sleep(0.2)
        raise AssertionError(f"sshd did not answer in {timeout} s ({last}): {self.tail()}")

    def cpu_seconds(self) -> float:
        """CPU time QEMU has used so far (user + system, all threads): what a boot costs on an
        idle host, whatever the load on this one."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Stop QEMU by its PID (terminate, then kill), close QMP, remove the socket dir."""
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self.proc is not None:
            stop_process(self.proc, grace=5)
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def __enter__(self) -> Qemu:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def kernel_boot_args(guest: Guest, cmdline_extra: str = "", pvh: bool = True) -> list[str]:
    """Direct kernel boot of `guest` (its kernel, initramfs and cmdline); `pvh`: the
    uncompressed kernel where the guest has one."""
    kernel = guest.kernel_pvh if pvh and guest.kernel_pvh else guest.kernel
    cmdline = f"{guest.cmdline} {cmdline_extra}".strip()
    return ["-kernel", str(kernel), "-initrd", str(guest.initramfs), "-append", cmdline]


def uefi_args(workdir: Path) -> list[str]:
    """OVMF with a per-VM copy of the variable store."""
    vars_copy = workdir / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, vars_copy)
    return [
        "-drive",
        f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive",
        f"if=pflash,format=raw,unit=1,file={vars_copy}",
    ]


@contextlib.contextmanager
def running(workdir: Path, args: Sequence[str], **kw: Any) -> Iterator[Qemu]:
    vm = Qemu(workdir, args, **kw)
    try:
        yield vm.start()
    finally:
        vm.stop()


def run_builder(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run scripts/build-guest.py ARGS (bounded), capturing its output."""
    return subprocess.run(
        [sys.executable, str(BUILDER), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace with a bridge br0 at 10.0.2.2/24 (the tiny guest's gateway when no
    DHCP answers, which then takes 10.0.2.15)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("bridged networking needs root and iproute2")
    name = f"barge-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (
            "link add br0 type bridge",
            "addr add 10.0.2.2/24 dev br0",
            "link set br0 up",
            "link set lo up",
        ):
            subprocess.run(["ip", "-n", name, *cmd.split()], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
