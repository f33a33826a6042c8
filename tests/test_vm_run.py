"""barge run/stop/ip/ssh/exec with real QEMU (TCG here) and the tiny guest (tests/guests.py).

Guest boots are few and shared: one module-wide store, one VM (``tiny``) booted detached for
the exec/lock/clone/stop tests, then again in the foreground for Ctrl-C; its push → pull →
clone copy boots once (and has its QEMU killed); a Vetu image made from the tiny guest boots
once; a kernel without an initramfs (a guest that never answers SSH) boots once; the firmware
paths (UEFI with its NVRAM, BIOS) start QEMU without an OS. Everything else fails before QEMU.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from barge.errors import ExitCode
from barge.vm import state
from clitest import barge
from registries import RunningRegistry
from vmimages import push_vetu

# the tiny guest and its `tiny_guest` fixture come from tests/guests.py (the guests branch,
# registered in conftest's pytest_plugins); until that is merged these tests cannot run
pytest.importorskip("guests", reason="tests/guests.py (the tiny guest) is not merged")
if TYPE_CHECKING:
    from guests import Guest

BARGE = str(Path(sys.executable).parent / "barge")
MARKER_OFFSET = 1 << 20  # where the tests write markers on the guest's /dev/vda
SSH_WAIT = "150"  # seconds; a busy 2-core machine boots the tiny guest in 15-30 s


def cli(*args: str, timeout: float = 180, **kw: Any) -> subprocess.CompletedProcess[str]:
    """The real console script (exec/ssh hand stdout/stderr to ssh, beyond CliRunner)."""
    return subprocess.run(
        [BARGE, *args], capture_output=True, text=True, timeout=timeout, check=False, **kw
    )


def info(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(barge("get", name, "--format", "json"))
    return doc


def kernel_of(g: Guest) -> Path:
    return getattr(g, "kernel_pvh", None) or g.kernel


def read_at(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def write_marker(name: str, text: str) -> None:
    res = cli(
        "exec",
        name,
        "sh",
        "-c",
        f"printf {text} | dd of=/dev/vda bs=4096 seek={MARKER_OFFSET // 4096} conv=fsync && sync",
    )
    assert res.returncode == 0, res


def read_marker(name: str, n: int) -> str:
    res = cli(
        "exec", name, "dd", "if=/dev/vda", "bs=4096", f"skip={MARKER_OFFSET // 4096}", "count=1"
    )
    assert res.returncode == 0, res
    return res.stdout[:n]


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while state.process_start_ticks(pid) is not None:
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One store for the module; every QEMU still running at the end is stopped by its PID."""
    base = tmp_path_factory.mktemp("vm")
    h = base / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BARGE_HOME", str(h))
        mp.setenv("DOCKER_CONFIG", str(base / "docker"))
        for var in ("BARGE_REGISTRY_USERNAME", "BARGE_REGISTRY_PASSWORD", "BARGE_ACCEL"):
            mp.delenv(var, raising=False)
        try:
            yield h
        finally:
            for vm_dir in (h / "vms").glob("*"):
                st = state.running(vm_dir)
                if st is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(st.pid, signal.SIGKILL)
                    wait_gone(st.pid)


def create_kernel_vm(name: str, g: Guest, cmdline: str, *, initramfs: bool = True) -> str:
    extra = ["--initramfs", str(g.initramfs)] if initramfs else []
    barge(
        "create",
        name,
        "--kernel",
        str(kernel_of(g)),
        *extra,
        "--cmdline",
        cmdline,
        "--disk-size",
        "64M",
        "--cpus",
        "1",
        "--memory",
        "256M",
    )
    return name


@pytest.fixture(scope="module")
def tiny(home: Path, tiny_guest: Guest) -> str:
    return create_kernel_vm("tiny", tiny_guest, tiny_guest.cmdline)


# -- failures before QEMU runs ------------------------------------------------------------------


def test_create_records_the_kernel_boot(tiny: str, home: Path, tiny_guest: Guest) -> None:
    doc = info(tiny)
    assert doc["boot"] == "kernel" and doc["kernel"] == "kernel"
    assert doc["initramfs"] == "initramfs" and doc["cmdline"] == tiny_guest.cmdline
    assert doc["state"] == "stopped" and doc["running"] is False and doc["sshUser"] == "root"
    vm_dir = home / "vms" / tiny
    assert (vm_dir / "kernel").read_bytes() == kernel_of(tiny_guest).read_bytes()
    text = barge("get", tiny)
    assert "boot:     kernel" in text and f"cmdline:  {tiny_guest.cmdline}" in text


def test_runs_refused_before_qemu(
    tiny: str, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a taken --publish port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = barge("run", tiny, "--detach", "--publish", f"{port}:80", code=ExitCode.USAGE)
        assert f"127.0.0.1:{port}/tcp is already in use" in err
    # a guest this host cannot run at all, or not without a missing QEMU
    barge("create", "mac", "--disk-size", "1M", "--os", "darwin", "--arch", "aarch64")
    err = barge("run", "mac", code=ExitCode.UNSUPPORTED)
    assert "macOS guest" in err and len(err.strip().splitlines()) == 1
    if shutil.which("qemu-system-aarch64") is None:
        barge("create", "arm", "--disk-size", "1M", "--arch", "aarch64")
        err = barge("run", "arm", code=ExitCode.FAILURE)
        assert "qemu-system-aarch64 not found (Debian packages qemu-system-arm" in err
    # the NVRAM of a UEFI VM is corrupt
    barge("create", "efi", "--disk-size", "1M", "--boot", "uefi")
    cfg_path = home / "vms" / "efi" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["nvram"] = "efi-vars.fd"
    cfg_path.write_text(json.dumps(cfg))
    (home / "vms" / "efi" / "efi-vars.fd").write_bytes(b"\0" * 4096)
    err = barge("run", "efi", code=ExitCode.INTEGRITY)
    assert "NVRAM" in err and "corrupt" in err and "remove it" in err
    # no display for --graphics
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert "use --vnc" in barge("run", tiny, "--graphics", code=ExitCode.USAGE)
    # no QEMU on this host
    monkeypatch.setenv("PATH", str(tmp_path))
    err = barge("run", tiny, code=ExitCode.FAILURE)
    assert err.strip() == (
        "barge: error: QEMU is not installed: qemu-system-x86_64 not found "
        "(Debian packages qemu-system-x86 and qemu-utils)"
    )
    monkeypatch.undo()
    for name in ("mac", "arm", "efi"):
        if (home / "vms" / name).exists():
            barge("delete", name)
    assert not (home / "vms" / tiny / ".run" / "state.json").exists()


def test_corrupt_or_missing_kernel(tiny: str, home: Path) -> None:
    barge("clone", tiny, "broken")
    kernel = home / "vms" / "broken" / "kernel"
    good = kernel.read_bytes()
    kernel.write_bytes(os.urandom(64 * 1024).replace(b"HdrS", b"xxxx").replace(b"\x7fELF", b"x"))
    assert "is not a Linux kernel" in barge("run", "broken", code=ExitCode.INTEGRITY)
    kernel.unlink()
    assert "kernel file" in barge("run", "broken", code=ExitCode.NOT_FOUND)
    # a kernel whose header is right but whose body is cut off: QEMU itself refuses it
    kernel.write_bytes(good[:8192])
    err = barge("run", "broken", "--detach", code=ExitCode.FAILURE)
    assert "QEMU failed to start 'broken'" in err and "qemu.log" in err
    assert info("broken")["state"] == "stopped"
    barge("delete", "broken")  # the lock was not left behind


# -- one detached boot of `tiny`: exec, locks, a clone of it running, stop ------------------------


def test_run_detached_ip_and_exec(tiny: str, home: Path, tmp_path: Path) -> None:
    extra_ro, extra_rw = tmp_path / "ro.img", tmp_path / "rw.img"
    extra_ro.write_bytes(b"read-only-disk" + bytes((1 << 20) - 14))
    extra_rw.write_bytes(bytes(1 << 20))
    t0 = time.monotonic()
    out = barge(
        "run",
        tiny,
        "--detach",
        "--memory",
        "320M",
        "--disk",
        f"{extra_ro}:ro",
        "--disk",
        str(extra_rw),
    )
    assert "tiny is running (ssh 127.0.0.1:" in out
    ip = cli("ip", tiny, "--wait", SSH_WAIT)
    assert ip.returncode == 0, ip
    print(f"\ntiny guest: run --detach to SSH in {time.monotonic() - t0:.1f} s (TCG)")
    host, port = ip.stdout.strip().rsplit(":", 1)
    assert host == "127.0.0.1" and port.isdigit()
    doc = info(tiny)
    assert doc["state"] == "running" and doc["run"]["ssh"] == ip.stdout.strip()
    assert (home / "vms" / tiny / ".run").stat().st_mode & 0o777 == 0o700
    assert doc["run"]["accel"] in ("kvm", "tcg")
    row = next(r for r in json.loads(barge("list", "--format", "json")) if r["name"] == tiny)
    assert row["running"] is True and row["state"] == "running"
    assert f"running (ssh {ip.stdout.strip()}" in barge("list")

    res = cli("exec", tiny, "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (res.returncode, res.stdout, res.stderr) == (7, "out\n", "err\n")
    res = cli("exec", tiny, "printf", "%s|", "a b", "c'd", "$HOME")
    assert (res.returncode, res.stdout) == (0, "a b|c'd|$HOME|")  # words passed as they are
    res = cli("exec", tiny, "cat", input="from stdin\n")
    assert res.stdout == "from stdin\n"
    res = cli("ssh", tiny, "--", "echo", "hi", "$((6*7))")  # ssh: the remote shell parses
    assert (res.returncode, res.stdout) == (0, "hi 42\n")
    assert cli("exec", tiny, "hostname").stdout.strip() == "tiny"  # from the seed's meta-data

    # --memory for this run; --disk FILE[:ro] after the VM's disk (vda), the seed last
    mem_kib = int(
        cli("exec", tiny, "sed", "-n", "s/MemTotal: *//p", "/proc/meminfo").stdout.split()[0]
    )
    assert 250 << 10 < mem_kib <= 320 << 10
    res = cli(
        "exec", tiny, "sh", "-c", "cat /sys/block/vdb/ro /sys/block/vdc/ro; head -c 14 /dev/vdb"
    )
    assert res.stdout == "1\n0\nread-only-disk", res
    assert cli("exec", tiny, "sh", "-c", "echo x > /dev/vdb").returncode != 0
    assert cli("exec", tiny, "sh", "-c", "printf rw-ok > /dev/vdc && sync").returncode == 0
    assert extra_rw.read_bytes()[:5] == b"rw-ok"

    # discard=unmap: the guest's TRIM punches holes in the disk file, which stays sparse
    disk = home / "vms" / tiny / "disk.img"
    before = disk.stat().st_blocks
    fill = "dd if=/dev/urandom of=/dev/vda bs=1M seek=8 count=8 conv=fsync 2>/dev/null"
    assert cli("exec", tiny, "sh", "-c", fill).returncode == 0
    grown = disk.stat().st_blocks
    assert (grown - before) * 512 >= 8 << 20
    res = cli("exec", tiny, "blkdiscard", "-o", str(8 << 20), "-l", str(8 << 20), "/dev/vda")
    assert res.returncode == 0, res
    assert cli("exec", tiny, "sync").returncode == 0
    assert (grown - disk.stat().st_blocks) * 512 >= 6 << 20

    write_marker(tiny, "barge-marker-1")


def test_running_vm_is_locked(tiny: str, home: Path) -> None:
    assert info(tiny)["state"] == "running"
    for args, extra in (
        (["run", tiny, "--detach"], ""),
        (["set", tiny, "--cpus", "2"], ""),
        (["delete", tiny], "barge delete --force"),
        (["rename", tiny, "other"], ""),
        (["clone", tiny, "copy"], "barge clone --force"),
        (["push", tiny, "127.0.0.1:1/x:y"], ""),
    ):
        err = barge(*args, code=ExitCode.BUSY)
        assert f"VM '{tiny}' is running (QEMU pid" in err and f"barge stop {tiny}" in err, args
        assert extra in err
    assert sorted(os.listdir(home / "vms")) == [tiny]


def test_clone_force_copies_a_running_vm(tiny: str, home: Path) -> None:
    out = barge("clone", "--force", tiny, "snap")
    assert "cloned tiny to snap" in out
    snap = home / "vms" / "snap"
    assert read_at(snap / "disk.img", MARKER_OFFSET, 14) == b"barge-marker-1"
    assert not (snap / ".run").exists()  # the runtime state stays with the original
    assert info("snap")["state"] == "stopped" and info(tiny)["state"] == "running"
    assert cli("exec", tiny, "true").returncode == 0  # resumed after the copy
    barge("delete", "snap")


def test_stop_powers_off_through_acpi(tiny: str, home: Path) -> None:
    pid = info(tiny)["run"]["pid"]
    out = barge("stop", tiny)
    assert out.startswith("stopped tiny (powered off,"), out
    wait_gone(pid, 5)
    run_dir = home / "vms" / tiny / ".run"
    assert not (run_dir / "state.json").exists() and not (run_dir / "qmp.sock").exists()
    assert "powering off" in (run_dir / "serial.log").read_text(errors="replace")
    assert info(tiny)["state"] == "stopped"
    assert read_at(home / "vms" / tiny / "disk.img", MARKER_OFFSET, 14) == b"barge-marker-1"
    err = barge("stop", tiny, code=ExitCode.NOT_RUNNING)
    assert "VM 'tiny' is not running" in err
    assert "is not running" in barge("ip", tiny, code=ExitCode.NOT_RUNNING)
    res = cli("exec", tiny, "true")
    assert res.returncode == ExitCode.NOT_RUNNING and "not running" in res.stderr


# -- the foreground run and Ctrl-C --------------------------------------------------------------


def test_foreground_run_ctrl_c_powers_off(tiny: str, home: Path) -> None:
    """In the foreground with the serial console on stdout (--serial), a --publish'd port;
    SIGINT (a terminal's Ctrl-C) asks the guest to power off through ACPI."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        published = s.getsockname()[1]
    proc = subprocess.Popen(
        [BARGE, "run", tiny, "--serial", "--publish", f"{published}:22"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ip = cli("ip", tiny, "--wait", SSH_WAIT)
        assert ip.returncode == 0, ip
        from barge.vm.access import Endpoint, ssh_banner

        assert ssh_banner(Endpoint("127.0.0.1", published))  # --publish forwards too
        assert info(tiny)["run"]["forwards"][0]["hostPort"] == published
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (out, err)
    assert "barge-tiny-guest: ready" in out  # the console on the terminal
    serial = (home / "vms" / tiny / ".run" / "serial.log").read_text(errors="replace")
    assert "barge-tiny-guest: ready" in serial  # and in the log
    assert "asking the guest to power off (ACPI)" in err and "tiny stopped (powered off)" in err
    assert "Traceback" not in err
    assert info(tiny)["state"] == "stopped"
    assert not (home / "vms" / tiny / ".run" / "state.json").exists()


# -- two runs at once ---------------------------------------------------------------------------


def test_two_concurrent_runs_start_one_qemu(tiny: str, home: Path) -> None:
    barge("clone", tiny, "race")
    procs = [
        subprocess.Popen(
            [BARGE, "run", "race", "--detach"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=60), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, ExitCode.BUSY], results
    loser = next(r[2] for r in results if r[0] == ExitCode.BUSY)
    # "running" once the winner's QEMU is up, "in use" while it is still starting it
    assert "VM 'race' is running" in loser or "VM 'race' is in use" in loser, loser
    disk = str(home / "vms" / "race" / "disk.img")
    qemus = [
        p
        for p in os.listdir("/proc")
        if p.isdigit() and disk.encode() in _cmdline(int(p)) and state.process_start_ticks(int(p))
    ]
    assert len(qemus) == 1, qemus
    out = barge("stop", "race", "--timeout", "1")
    assert out.startswith("stopped race (")
    barge("delete", "race")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# -- run -> stop -> push -> pull -> clone -> run; QEMU killed mid-run ------------------------------


def test_cycle_through_a_registry_and_a_killed_qemu(
    tiny: str, home: Path, registry: RunningRegistry
) -> None:
    assert info(tiny)["state"] == "stopped"  # it ran and was stopped above
    ref = f"{registry.host}/vm/tiny:v1"
    barge("push", tiny, ref, "--quiet")
    barge("pull", ref, "-q")
    barge("clone", ref, "tiny2", "-q")
    doc = info("tiny2")
    assert doc["boot"] == "kernel" and doc["macAddress"] != info(tiny)["macAddress"]
    barge("run", "tiny2", "--detach")
    assert cli("ip", "tiny2", "--wait", SSH_WAIT).returncode == 0
    assert read_marker("tiny2", 14) == "barge-marker-1"  # the disk made the round trip
    assert cli("exec", "tiny2", "hostname").stdout.strip() == "tiny2"

    # QEMU dies mid-run: the lock goes with it, the state is cleaned, the disk is intact
    write_marker("tiny2", "barge-marker-2")
    pid = info("tiny2")["run"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    rows = {r["name"]: r for r in json.loads(barge("list", "--format", "json"))}
    assert rows["tiny2"]["state"] == "stopped" and rows["tiny2"]["running"] is False
    assert not (home / "vms" / "tiny2" / ".run" / "state.json").exists()
    assert read_at(home / "vms" / "tiny2" / "disk.img", MARKER_OFFSET, 14) == b"barge-marker-2"
    assert "not running" in barge("stop", "tiny2", code=ExitCode.NOT_RUNNING)
    barge("delete", "tiny2")


# -- bridged networking, in a network namespace ------------------------------------------------


# `netns` (a namespace with bridge br0) is a fixture of tests/guests.py


def test_bridged_network(tiny: str, home: Path, netns: str) -> None:
    def in_ns(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", netns, BARGE, *args],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    bad = in_ns("run", tiny, "--detach", "--net-bridged", "nosuchbr0")
    assert bad.returncode == ExitCode.USAGE and "no such network interface" in bad.stderr
    res = in_ns("run", tiny, "--detach", "--net-bridged", "br0")
    assert res.returncode == 0 and "bridged on br0" in res.stdout, res
    tap = info(tiny)["run"]
    assert tap["network"] == "bridged:br0"
    links = subprocess.run(
        ["ip", "-n", netns, "link", "show", "master", "br0"], capture_output=True, text=True
    ).stdout
    assert "barge" in links  # the VM's tap, enslaved to the bridge
    ip = in_ns("ip", tiny, "--wait", SSH_WAIT)
    assert (ip.returncode, ip.stdout) == (0, "10.0.2.15\n"), ip  # found by its MAC (ARP)
    out = in_ns("exec", tiny, "cat", "/sys/class/net/eth0/address")
    assert out.stdout.strip() == info(tiny)["macAddress"]
    assert in_ns("stop", tiny).stdout.startswith("stopped tiny (powered off")


# -- a Vetu image made from the tiny guest ------------------------------------------------------


def test_vetu_image_boots_after_pull_and_clone(
    home: Path, tiny_guest: Guest, registry: RunningRegistry
) -> None:
    disk = bytearray(8 << 20)
    disk[MARKER_OFFSET : MARKER_OFFSET + 11] = b"vetu-marker"
    cmdline = f"{tiny_guest.cmdline} barge.vetu=1"
    push_vetu(
        registry,
        "vetu/tiny",
        "v1",
        {"disk.img": [bytes(disk[: 4 << 20]), bytes(disk[4 << 20 :])]},
        kernel=kernel_of(tiny_guest).read_bytes(),
        initramfs=tiny_guest.initramfs.read_bytes(),
        config={"arch": "amd64", "cmdline": cmdline, "cpuCount": 1, "memorySize": 256 << 20},
    )
    ref = f"{registry.host}/vetu/tiny:v1"
    barge("pull", ref, "-q")
    barge("clone", ref, "vtiny", "-q")
    doc = info("vtiny")
    assert doc["boot"] == "kernel" and doc["cmdline"] == cmdline and doc["memory"] == 256 << 20
    assert doc["initramfs"] == "initramfs"
    barge("run", "vtiny", "--detach")
    assert cli("ip", "vtiny", "--wait", SSH_WAIT).returncode == 0
    assert "barge.vetu=1" in cli("exec", "vtiny", "cat", "/proc/cmdline").stdout
    assert read_marker("vtiny", 11) == "vetu-marker"
    assert barge("stop", "vtiny").startswith("stopped vtiny (powered off")
    barge("delete", "vtiny")


# -- a guest that never answers SSH --------------------------------------------------------------


def test_guest_that_never_answers_ssh(home: Path, tiny_guest: Guest) -> None:
    # no initramfs, no root: the kernel panics and halts
    create_kernel_vm("mute", tiny_guest, "console=ttyS0 panic=0", initramfs=False)
    barge("run", "mute", "--detach")
    t0 = time.monotonic()
    err = barge("ip", "mute", "--wait", "10", code=ExitCode.FAILURE)
    assert 9.5 < time.monotonic() - t0 < 60
    serial = home / "vms" / "mute" / ".run" / "serial.log"
    assert "did not answer SSH on 127.0.0.1:" in err and "within 10 s" in err
    assert f"the serial log {serial} ends with:" in err
    assert len(err.splitlines()) >= 4  # the error, the hint and the log's last lines
    # ACPI goes unanswered by a halted kernel: stop quits QEMU after the timeout
    out = barge("stop", "mute", "--timeout", "2")
    assert out.startswith("stopped mute (QEMU quit,"), out

    # a foreground run whose QEMU is killed: an error naming the signal, the state cleaned
    proc = subprocess.Popen([BARGE, "run", "mute"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while (st := state.running(home / "vms" / "mute")) is None:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(st.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == ExitCode.FAILURE
    assert "QEMU of 'mute' was killed (SIGKILL)" in err and "Traceback" not in err
    assert info("mute")["state"] == "stopped"
    assert not (home / "vms" / "mute" / ".run" / "state.json").exists()
    barge("delete", "mute")


# -- firmware: UEFI (NVRAM made on first boot) and BIOS, without an OS ----------------------------


@pytest.mark.skipif(
    not Path("/usr/share/OVMF/OVMF_VARS_4M.fd").exists(), reason="ovmf is not installed"
)
def test_uefi_and_bios_boots(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    barge("create", "fw", "--disk-size", "16M", "--boot", "uefi", "--memory", "256M")
    out = barge("run", "fw", "--detach", "--vnc")
    assert "vnc 127.0.0.1:59" in out
    vnc = info("fw")["run"]["vnc"]
    host, port = vnc.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        assert s.recv(12).startswith(b"RFB ")  # a VNC server, on loopback
    nvram = home / "vms" / "fw" / "efi-vars.fd"
    assert nvram.stat().st_size == Path("/usr/share/OVMF/OVMF_VARS_4M.fd").stat().st_size
    doc = info("fw")
    assert doc["nvram"] == "efi-vars.fd" and doc["state"] == "running"
    assert barge("stop", "fw", "--timeout", "3").startswith("stopped fw (")
    assert nvram.exists() and info("fw")["state"] == "stopped"
    # BIOS; and the SSH port barge picked is taken before QEMU binds it: another is picked
    from barge.vm import net

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    taken_port = taken.getsockname()[1]
    real_free_port = net.free_port
    picks = iter([taken_port])
    monkeypatch.setattr(net, "free_port", lambda: next(picks, None) or real_free_port())
    barge("create", "pc", "--disk-size", "16M", "--boot", "bios", "--memory", "128M")
    try:
        out = barge("run", "pc", "--detach")
    finally:
        taken.close()
    run = info("pc")["run"]
    assert run["ssh"].startswith("127.0.0.1:") and run["ssh"] != f"127.0.0.1:{taken_port}"
    assert f"ssh {run['ssh']}" in out and info("pc")["state"] == "running"
    assert "Could not set up host forwarding" in (home / "vms/pc/.run/qemu.log").read_text()
    assert barge("stop", "pc", "--timeout", "2").startswith("stopped pc (")
    for name in ("fw", "pc"):
        barge("delete", name)
