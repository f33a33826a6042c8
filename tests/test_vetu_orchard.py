"""``barge-vetu``: the command lines Orchard's Linux workers run (cirruslabs/orchard,
internal/worker/vmmanager/vetu and worker.go), sent verbatim through the real installed
executable, against the real test registry and the tiny guest: a Vetu image pulled, cloned
under an Orchard on-disk name, configured, run in the foreground in a background process,
found with ``ip --wait 60``, listed as Orchard parses ``list --format json``, stopped with
``stop --timeout 5``, deleted. Plus the units and bad input of ``set`` without a guest."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from barge.errors import ExitCode
from barge.vm import state
from clitest import barge
from registries import RunningRegistry
from vmimages import push_vetu

if TYPE_CHECKING:
    from guests import Guest

VETU = str(Path(sys.executable).parent / "barge-vetu")
BARGE = str(Path(sys.executable).parent / "barge")
MiB = 1 << 20


def vetu(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [VETU, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def ok(*args: str, timeout: float = 180) -> str:
    r = vetu(*args, timeout=timeout)
    assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r.stdout


def orchard_list() -> dict[str, dict[str, Any]]:
    """``vetu list --format json`` read as Orchard reads it: a JSON array decoded into
    ``VMInfo{Name, Source, State, Running}`` (Go's decoder: keys matched case-insensitively,
    other keys ignored), keyed by Name."""
    doc = json.loads(ok("list", "--format", "json"))
    assert isinstance(doc, list)
    out = {}
    for obj in doc:
        keys = {k.lower(): v for k, v in obj.items()}
        info = {
            "Name": keys["name"],
            "Source": keys["source"],
            "State": keys["state"],
            "Running": keys["running"],
        }
        assert isinstance(info["Running"], bool) and isinstance(info["Name"], str)
        out[info["Name"]] = info
    return out


def on_disk_name() -> str:
    """An Orchard on-disk VM name: orchard-NAME-UID(a UUID)-RESTARTCOUNT (ondiskname.go)."""
    return f"orchard-ci-vm-{uuid.uuid4()}-0"


def ssh_banner(address: str, timeout: float = 10) -> bytes:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        return s.recv(64)


def wait_until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


# -- without a guest ----------------------------------------------------------------------------


def test_set_takes_vetus_units_and_forms(barge_home: Path) -> None:
    name = on_disk_name()
    barge("create", name, "--disk-size", "64M", "--memory", "256M")
    ok("set", "--memory", "4096", name)  # Orchard: flag, value, then the name
    ok("set", "--cpu", "3", name)
    ok("set", "--disk-size", "2", name)
    ok("set", name, "--memory=2048")  # cobra's other forms
    doc = json.loads(barge("get", name, "--format", "json"))
    assert (doc["cpus"], doc["memory"], doc["disks"][0]["size"]) == (3, 2048 * MiB, 2 * 10**9)
    assert (barge_home / "vms" / name / "disk.img").stat().st_size == 2 * 10**9
    ok("set", name)  # Vetu: nothing to change is no error
    # barge's own commands take the same bare numbers (issue 15): GB and MiB
    barge("set", name, "--cpu", "1", "--memory", "512", "--disk-size", "3")
    doc = json.loads(barge("get", name, "--format", "json"))
    assert (doc["cpus"], doc["memory"], doc["disks"][0]["size"]) == (1, 512 * MiB, 3 * 10**9)
    barge("set", name, "--memory", "1G", "--disk-size", "4G")  # units keep their meaning
    doc = json.loads(barge("get", name, "--format", "json"))
    assert (doc["memory"], doc["disks"][0]["size"]) == (1 << 30, 4 << 30)
    barge("create", "bare", "--disk-size", "1", "--memory", "64")
    doc = json.loads(barge("get", "bare", "--format", "json"))
    assert (doc["memory"], doc["disks"][0]["size"]) == (64 * MiB, 10**9)


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["set", "--disk-size", "1", "NAME"], ExitCode.USAGE, "can only grow"),
        (["set", "--memory", "lots", "NAME"], ExitCode.USAGE, "--memory"),
        (["set", "--memory", "-5", "NAME"], ExitCode.USAGE, "--memory"),
        (["set", "--cpu", "2", "nosuch"], ExitCode.NOT_FOUND, "nosuch"),
        (["set", "--memory", "32", "NAME"], ExitCode.USAGE, "at least 64 MiB"),
        (["ip", "NAME"], ExitCode.NOT_RUNNING, "not running"),
        (["stop", "--timeout", "5", "NAME"], ExitCode.NOT_RUNNING, "not running"),
        (["run", "nosuch"], ExitCode.NOT_FOUND, "nosuch"),
        (["clone", "nosuch", "NAME"], ExitCode.NOT_FOUND, "nosuch"),
        (["delete", "nosuch"], ExitCode.NOT_FOUND, "nosuch"),
        (["fqn", "nosuch"], ExitCode.NOT_FOUND, "nosuch"),
    ],
)
def test_bad_input_is_one_line_and_an_exit_code(
    barge_home: Path, args: list[str], code: int, text: str
) -> None:
    name = on_disk_name()
    barge("create", name, "--disk-size", "2", "--memory", "256M")
    r = vetu(*[name if a == "NAME" else a for a in args])
    assert r.returncode == code, r
    # Orchard reports the first non-empty line of stderr
    first = r.stderr.strip().splitlines()[0]
    assert first.startswith(("barge: error:", "Usage:", "Error:")) and "Traceback" not in r.stderr
    assert text in r.stderr, r.stderr
    barge("delete", name)


def test_run_failure_is_the_first_line_of_stderr(barge_home: Path, tiny_guest: Guest) -> None:
    """Orchard reports a failed command by the first non-empty line of its stderr: what barge
    says before failing (the KVM warning, notes) goes to stdout, the error alone to stderr."""
    name = on_disk_name()
    kernel = getattr(tiny_guest, "kernel_pvh", None) or tiny_guest.kernel
    barge("create", name, "--kernel", str(kernel), "--disk-size", "64M", "--memory", "256")
    env = {**os.environ, "BARGE_VETU_NET_BRIDGED": "nosuchbr0", "BARGE_ACCEL": "auto"}
    r = subprocess.run(
        [VETU, "run", name], capture_output=True, text=True, timeout=120, check=False, env=env
    )
    assert r.returncode == ExitCode.USAGE, r
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("barge: error:"), r.stderr
    assert "nosuchbr0" in lines[0]
    assert "KVM" in r.stdout or not os.path.exists("/dev/kvm")  # the probe's note, on stdout


def test_barge_create_refuses_nonsense_sizes(barge_home: Path) -> None:
    err = barge("create", "t20", "--disk-size", "20K", code=ExitCode.USAGE)
    assert "no disk for a VM" in err and "a bare number is GB" in err
    err = barge("create", "t20", "--disk-size", "1", "--memory", "32M", code=ExitCode.USAGE)
    assert "too little memory" in err and "a bare number is MiB" in err
    assert "a bare number is GB" in " ".join(barge("create", "--help").split())
    assert "a bare number is MiB" in " ".join(barge("set", "--help").split())


# -- Orchard's whole life cycle of a VM, with the tiny guest ------------------------------------


def test_orchard_worker_command_lines(
    barge_home: Path, tiny_guest: Guest, registry: RunningRegistry, tmp_path: Path
) -> None:
    kernel = getattr(tiny_guest, "kernel_pvh", None) or tiny_guest.kernel
    disk = bytearray(8 * MiB)
    disk[MiB : MiB + 12] = b"orchard-mark"
    push_vetu(
        registry,
        "orchard/tiny",
        "v1",
        {"disk.img": [bytes(disk)]},
        kernel=kernel.read_bytes(),
        initramfs=tiny_guest.initramfs.read_bytes(),
        config={"arch": "amd64", "cmdline": tiny_guest.cmdline, "cpuCount": 1},
    )
    image = f"{registry.host}/orchard/tiny:v1"
    vm_id = on_disk_name()

    # cloneAndConfigure(): pull (ImagePullPolicy Always), clone, fqn, set ×3
    ok("pull", image)
    ok("clone", image, vm_id)
    fqn = ok("fqn", image).strip()
    assert fqn.startswith(f"{registry.host}/orchard/tiny@sha256:") and len(fqn.split("@")[1]) == 71
    ok("set", "--memory", "256", vm_id)
    ok("set", "--cpu", "1", vm_id)
    ok("set", "--disk-size", "1", vm_id)
    vms = orchard_list()
    assert vms[vm_id] == {"Name": vm_id, "Source": "local", "State": "stopped", "Running": False}
    assert vms[image]["Source"] == "oci" and vms[image]["Running"] is False

    # run(): `vetu run ID`, in the foreground, in its own process
    log = open(tmp_path / "run.log", "w+")  # noqa: SIM115 - closed below
    run = subprocess.Popen([VETU, "run", vm_id], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: orchard_list()[vm_id]["Running"], 60, "run never started QEMU")
        assert orchard_list()[vm_id]["State"] == "running"
        # IP(): `vetu ip --wait 60 ID` (Orchard retries a failed one); the order too
        for attempt in range(3):
            r = vetu("ip", "--wait", "60", vm_id, timeout=120)
            if r.returncode == 0:
                break
            assert attempt < 2, r
        address = r.stdout.strip()
        assert address.startswith("127.0.0.1:"), r.stdout
        assert ssh_banner(address).startswith(b"SSH-")
        assert ok("ip", vm_id, "--wait", "60").strip() == address
        # it is the guest made from the image, with Orchard's settings
        r2 = subprocess.run(
            [BARGE, "exec", vm_id, "sh", "-c", "nproc; cat /proc/cmdline"],
            input=b"",
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert r2.returncode == 0, r2
        lines = r2.stdout.decode().splitlines()
        assert lines[0] == "1" and tiny_guest.cmdline in lines[1]
        mark = subprocess.run(
            [BARGE, "exec", vm_id, "dd", "if=/dev/vda", "bs=1M", "skip=1", "count=1"],
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert mark.stdout[:12] == b"orchard-mark"
        size = subprocess.run(
            [BARGE, "exec", vm_id, "cat", "/sys/block/vda/size"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert int(size.stdout) * 512 == 10**9  # set --disk-size 1: 1 GB

        # Stop(): `vetu stop --timeout 5 ID`, then the run ends by itself
        t0 = time.monotonic()
        ok("stop", "--timeout", "5", vm_id)
        assert run.wait(timeout=60) == 0  # the guest powered off: a clean end of `vetu run`
        stop_s = time.monotonic() - t0
        vms = orchard_list()
        assert vms[vm_id]["Running"] is False and vms[vm_id]["State"] == "stopped"
        assert vetu("stop", "--timeout", "5", vm_id).returncode == ExitCode.NOT_RUNNING

        # syncOnDiskVMs(): an on-disk VM the controller does not know, running: `vetu stop
        # NAME` then `vetu delete NAME`; and a plain `vetu delete` of a running VM stops it
        run = subprocess.Popen([VETU, "run", vm_id], stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: orchard_list()[vm_id]["Running"], 60, "second run never started")
        pid = state.running(barge_home / "vms" / vm_id)
        assert pid is not None
        ok("delete", vm_id)
        assert run.wait(timeout=60) in (0, 130, ExitCode.FAILURE)
        assert state.process_start_ticks(pid.pid) is None  # its QEMU is gone
        assert vm_id not in orchard_list()
        assert not (barge_home / "vms" / vm_id).exists()
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGKILL)
            run.wait()
        log.close()
        st = state.running(barge_home / "vms" / vm_id) if (barge_home / "vms").exists() else None
        if st is not None:
            os.kill(st.pid, signal.SIGKILL)
    ok("delete", image)
    assert image not in orchard_list()
    print(f"\norchard life cycle: stop --timeout 5 took {stop_s:.1f} s")


def test_orchard_ip_is_the_guests_own_address_when_bridged(
    barge_home: Path,
    tiny_guest: Guest,
    netns: str,
) -> None:
    """With $BARGE_VETU_NET_BRIDGED, Orchard's plain `vetu run ID` attaches the VM to that
    bridge, and `vetu ip --wait 60 ID` prints an address on which port 22 answers — what
    Orchard dials for startup scripts (IP:22) and port forwarding (IP:PORT)."""
    kernel = getattr(tiny_guest, "kernel_pvh", None) or tiny_guest.kernel
    vm_id = on_disk_name()
    barge(
        "create",
        vm_id,
        "--kernel",
        str(kernel),
        "--initramfs",
        str(tiny_guest.initramfs),
        "--cmdline",
        tiny_guest.cmdline,
        "--disk-size",
        "64M",
        "--cpus",
        "1",
        "--memory",
        "256",
    )
    in_ns = ["ip", "netns", "exec", netns]
    env = {**os.environ, "BARGE_VETU_NET_BRIDGED": "br0"}
    run = subprocess.Popen(
        [*in_ns, VETU, "run", vm_id], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    try:
        for _ in range(2):  # Orchard retries; a loaded machine may need a second minute
            r = subprocess.run(
                [*in_ns, VETU, "ip", "--wait", "60", vm_id],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if r.returncode == 0:
                break
        assert (r.returncode, r.stdout) == (0, "10.0.2.15\n"), r
        banner = subprocess.run(
            [
                *in_ns,
                sys.executable,
                "-c",
                "import socket; s = socket.create_connection(('10.0.2.15', 22), timeout=10); "
                "print(s.recv(64)[:4].decode())",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert banner.stdout.strip() == "SSH-", banner
        r = subprocess.run([*in_ns, VETU, "stop", "--timeout", "5", vm_id], timeout=120)
        assert r.returncode == 0
        assert run.wait(timeout=60) == 0
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        st = state.running(barge_home / "vms" / vm_id)
        if st is not None:
            os.kill(st.pid, signal.SIGKILL)
    ok("delete", vm_id)
