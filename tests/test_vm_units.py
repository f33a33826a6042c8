"""barge.vm's rules without booting a guest: the KVM probe, the NoCloud seed writer (read
back by genisoimage's isoinfo and util-linux's blkid), the QEMU command line, ports, runtime
state and liveness, boot checks, the key pair, QMP framing."""

from __future__ import annotations

import fcntl
import json
import os
import platform
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from barge.errors import IntegrityError, UnsupportedError, UsageError
from barge.store import VM, Disk, VMConfig
from barge.vm import access, boot, kvm, net, qemu, seed, state
from barge.vm.qmp import QMP, QMPError

# -- the KVM probe ------------------------------------------------------------------------------


def fake_host(tmp_path: Path, *, modules: list[str], flags: str) -> dict[str, Path]:
    sysmod = tmp_path / "sys-module"
    for m in modules:
        (sysmod / m / "parameters").mkdir(parents=True)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu {flags} sse2\n")
    return {"sys_module": sysmod, "cpuinfo": cpuinfo}


def test_probe_without_dev_kvm(tmp_path: Path) -> None:
    acc = kvm.probe("x86_64", dev=tmp_path / "kvm", **fake_host(tmp_path, modules=[], flags=""))
    assert acc.name == "tcg" and "does not exist" in (acc.reason or "")
    assert acc.warning and "TCG" in acc.warning


def test_probe_device_that_is_not_kvm(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    paths = fake_host(tmp_path, modules=["kvm", "kvm_intel"], flags="vmx")
    acc = kvm.probe("x86_64", dev=dev, **paths)
    assert acc.name == "tcg" and "not a KVM device" in (acc.reason or "")


def test_probe_unreadable_device(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root opens any file")
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    dev.chmod(0)
    acc = kvm.probe("x86_64", dev=dev, **fake_host(tmp_path, modules=[], flags="vmx"))
    assert acc.name == "tcg" and "permission denied" in (acc.reason or "")


REAL_KVM = Path("/dev/kvm")


def _real_kvm_opens() -> bool:
    try:
        os.close(os.open(REAL_KVM, os.O_RDWR))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _real_kvm_opens(), reason="no usable /dev/kvm device to talk to")
def test_probe_rules_on_the_real_device(tmp_path: Path) -> None:
    """With the real /dev/kvm, the verdict follows the host's modules and CPU flags."""
    pvm = fake_host(tmp_path / "a", modules=["kvm", "kvm_pvm"], flags="hypervisor")
    acc = kvm.probe("x86_64", dev=REAL_KVM, **pvm)
    assert acc.name == "tcg" and "kvm_pvm" in (acc.reason or "")
    soft = fake_host(tmp_path / "b", modules=["kvm"], flags="hypervisor")
    acc = kvm.probe("x86_64", dev=REAL_KVM, **soft)
    assert acc.name == "tcg" and "no vmx/svm" in (acc.reason or "")


@pytest.mark.skipif(not _real_kvm_opens(), reason="no usable /dev/kvm device to talk to")
def test_bounded_test_boot_runs_real_mode_code() -> None:
    fd = os.open(REAL_KVM, os.O_RDWR)
    try:
        assert kvm._bounded_test_boot(fd) is None
    finally:
        os.close(fd)


def test_real_probe_on_this_host() -> None:
    """On the development machines /dev/kvm is kvm_pvm: the probe must fall back to TCG."""
    acc = kvm.probe()
    if Path("/sys/module/kvm_pvm").exists():
        assert acc.name == "tcg" and "kvm_pvm" in (acc.reason or ""), acc
    elif not REAL_KVM.exists():
        assert acc.name == "tcg" and "does not exist" in (acc.reason or "")
    assert acc.name in ("kvm", "tcg")


def test_choose_accelerator() -> None:
    assert kvm.choose("tcg", "x86_64", arch="x86_64") == kvm.Accel("tcg")
    emulated = kvm.choose("auto", "aarch64", arch="x86_64")
    assert emulated.name == "tcg" and "aarch64" in (emulated.reason or "")
    with pytest.raises(UnsupportedError, match="--accel kvm"):
        kvm.choose("kvm", "aarch64", arch="x86_64")
    if Path("/sys/module/kvm_pvm").exists():
        with pytest.raises(UnsupportedError, match="kvm_pvm"):
            kvm.choose("kvm", "x86_64", arch="x86_64")


# -- the NoCloud seed -------------------------------------------------------------------------


def isoinfo(image: Path, *args: str) -> bytes:
    return subprocess.run(
        ["isoinfo", "-i", str(image), *args], capture_output=True, check=True
    ).stdout


_names = st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    files=st.dictionaries(
        _names, st.binary(max_size=5000) | st.just(b"x" * 2048), min_size=1, max_size=6
    )
)
def test_iso_reads_back_with_an_independent_reader(tmp_path: Path, files: dict[str, bytes]) -> None:
    image = tmp_path / "seed.iso"
    image.write_bytes(seed.build_iso(files))
    assert image.stat().st_size % 2048 == 0
    listing = isoinfo(image, "-J", "-l").decode()
    for name, data in files.items():
        assert f" {name}" in listing
        assert isoinfo(image, "-J", "-x", f"/{name}") == data
        # the primary (ISO9660) names, as Linux shows them without Joliet
        assert isoinfo(image, "-x", f"/{name.upper()}.;1") == data


def test_seed_label_and_contents(tmp_path: Path) -> None:
    files = seed.nocloud_files("My_VM.1", "uuid-1", ["ssh-ed25519 AAAAkey barge@host"])
    image = tmp_path / "seed.iso"
    seed.write_seed(image, files)
    out = subprocess.run(
        ["blkid", "-o", "export", str(image)], capture_output=True, text=True, check=True
    ).stdout
    assert "LABEL=cidata" in out and "TYPE=iso9660" in out
    assert image.stat().st_size >= 128 * 1024  # busybox's findfs misses smaller volumes
    meta = isoinfo(image, "-J", "-x", "/meta-data").decode()
    assert "local-hostname: my-vm-1\n" in meta and "instance-id: barge-" in meta
    user = isoinfo(image, "-J", "-x", "/user-data").decode()
    assert user.startswith("#cloud-config\n")
    assert "ssh_authorized_keys:\n  - ssh-ed25519 AAAAkey barge@host\n" in user
    assert "  - name: root\n    ssh_authorized_keys:\n      - ssh-ed25519 AAAAkey" in user
    assert "disable_root: false" in user


def test_instance_id_follows_identity_and_user_data() -> None:
    a = seed.instance_id("vm-a", b"#cloud-config\n")
    assert a == seed.instance_id("vm-a", b"#cloud-config\n")
    assert a != seed.instance_id("vm-b", b"#cloud-config\n")
    assert a != seed.instance_id("vm-a", b"#cloud-config\nx: 1\n")
    own = seed.nocloud_files("x", "id", ["ssh-ed25519 K"], user_data=b"#cloud-config\nmine\n")
    assert own["user-data"] == b"#cloud-config\nmine\n"


# -- the QEMU command line --------------------------------------------------------------------


def test_argv_kernel_boot_disks_seed_network(tmp_path: Path) -> None:
    plan = boot.BootPlan("kernel", tmp_path / "kernel", tmp_path / "initramfs", "console=ttyS0")
    spec = qemu.LaunchSpec(
        name="vm1",
        arch="x86_64",
        accel="tcg",
        cpus=2,
        memory_mib=512,
        boot=plan,
        drives=[
            qemu.Drive(tmp_path / "disk.img"),
            qemu.Drive(Path("/data/odd,name.qcow2"), "qcow2"),
            qemu.Drive(tmp_path / "seed.iso", readonly=True),
        ],
        mac="52:54:00:12:34:56",
        netdev=net.user_netdev(net.Forward("127.0.0.1", 4022, 22), [net.parse_publish("8080:80")]),
    )
    argv = qemu.build_argv(spec, "/usr/bin/qemu-system-x86_64")
    text = " ".join(argv)
    assert argv[argv.index("-accel") + 1] == "tcg" and argv[argv.index("-cpu") + 1] == "max"
    assert argv[argv.index("-kernel") + 1] == str(tmp_path / "kernel")
    assert argv[argv.index("-append") + 1] == "console=ttyS0"
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives[0].endswith("format=raw,discard=unmap,detect-zeroes=unmap")
    assert "file=/data/odd,,name.qcow2," in drives[1] and "format=qcow2" in drives[1]
    assert drives[2].endswith("readonly=on") and "discard" not in drives[2]  # the seed, last
    assert "hostfwd=tcp:127.0.0.1:4022-:22,hostfwd=tcp:127.0.0.1:8080-:80" in text
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56" in text
    assert "-serial chardev:console0" in text and "file,id=console0,path=serial.log" in text
    assert "unix:qmp.sock,server=on,wait=off" in text
    assert "-display none" in text and "-vnc" not in text and "-S" not in argv


def test_argv_uefi_vnc_hvc_tap(tmp_path: Path) -> None:
    uefi = boot.BootPlan("uefi", firmware=Path("/fw/CODE.fd"), nvram=tmp_path / "efi-vars.fd")
    spec = qemu.LaunchSpec(
        "vm", "x86_64", "kvm", 1, 256, uefi, [], tap="barge0", vnc_display=3, paused=True
    )
    text = " ".join(qemu.build_argv(spec, "qemu"))
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE.fd" in text
    assert f"if=pflash,format=raw,unit=1,file={tmp_path / 'efi-vars.fd'}" in text
    assert "-cpu host" in text and "-vnc 127.0.0.1:3" in text and "-device VGA" in text
    assert "tap,id=net0,ifname=barge0,script=no,downscript=no" in text and text.endswith("-S")
    hvc = boot.BootPlan("kernel", Path("/k"), None, "root=/dev/vda1 console=hvc0")
    argv = qemu.build_argv(qemu.LaunchSpec("v", "x86_64", "tcg", 1, 64, hvc, []), "q")
    assert "virtconsole,chardev=console0" in argv and "-serial" not in argv
    serial = qemu.LaunchSpec("v", "x86_64", "tcg", 1, 64, hvc, [], serial_stdio=True)
    assert "stdio,id=console0,signal=off,logfile=serial.log" in " ".join(
        qemu.build_argv(serial, "q")
    )


def test_missing_qemu_names_the_packages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(Exception, match=r"qemu-system-x86_64 not found \(Debian packages "):
        qemu.find_qemu("x86_64")


# -- networking ------------------------------------------------------------------------------


def test_parse_publish() -> None:
    assert net.parse_publish("8080:80") == net.Forward("127.0.0.1", 8080, 80, "tcp")
    assert net.parse_publish("0.0.0.0:53:53/udp") == net.Forward("0.0.0.0", 53, 53, "udp")
    assert net.parse_publish("[::1]:2222:22").host_addr == "::1"
    for bad in ("80", "a:b", "70000:80", "80:0", "1:2:3:4", "8080:80/sctp"):
        with pytest.raises(UsageError, match="--publish"):
            net.parse_publish(bad)


def test_taken_publish_port_is_an_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UsageError, match="already in use"):
            net.check_published([net.parse_publish(f"{port}:80")])
    with pytest.raises(UsageError, match="given twice"):
        net.check_published([net.parse_publish("9999:80"), net.parse_publish("9999:81")])


def test_neighbour_address(tmp_path: Path) -> None:
    arp = tmp_path / "arp"
    arp.write_text(
        "IP address       HW type     Flags       HW address            Mask     Device\n"
        "192.168.1.7      0x1         0x0         52:54:00:aa:bb:cc     *        br0\n"
        "192.168.1.9      0x1         0x2         52:54:00:AA:BB:CD     *        br0\n"
    )
    assert net.neighbour_address("52:54:00:aa:bb:cc", arp) is None  # incomplete entry
    assert net.neighbour_address("52:54:00:aa:bb:cd", arp) == "192.168.1.9"
    assert len(net.tap_name(tmp_path)) <= 15


# -- runtime state and liveness -------------------------------------------------------------


def test_liveness_uses_pid_and_start_time(tmp_path: Path) -> None:
    me = state.process_start_ticks(os.getpid())
    assert me is not None
    (tmp_path / state.RUN_DIR).mkdir()
    st = state.RunState(pid=os.getpid(), start_ticks=me, started=0, accel="tcg", network="user")
    state.write(tmp_path, st)
    assert state.running(tmp_path) == st
    reused = state.RunState(os.getpid(), me + 1, 0, "tcg", "user")  # same PID, other process
    assert not state.alive(reused)
    child = subprocess.Popen(["true"])
    while state.process_start_ticks(child.pid) is not None:  # until it is a zombie
        pass
    assert not state.alive(state.RunState(child.pid, 1, 0, "tcg", "user"))
    assert state.wait_exit(state.RunState(child.pid, 1, 0, "tcg", "user"), 1.0)
    child.wait()


def test_a_zombie_leader_with_live_threads_is_alive(tmp_path: Path) -> None:
    """QEMU killed: its leader thread turns zombie while its vCPU threads still exit, and its
    files — the VM's lock — stay open until the last one has. Liveness follows the lock."""
    sys_exit = {"x86_64": 60, "aarch64": 93}.get(platform.machine())
    if sys_exit is None:
        pytest.skip(f"SYS_exit unknown on {platform.machine()}")
    lock = tmp_path / "lock"
    code = (
        "import ctypes, fcntl, os, sys, threading, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "threading.Thread(target=time.sleep, args=(2.0,)).start()\n"
        "print('locked', flush=True)\n"
        f"ctypes.CDLL(None).syscall({sys_exit}, 0)\n"  # SYS_exit: this thread, not the group
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "locked\n"
    deadline = time.monotonic() + 1.5
    saw_zombie_leader = False
    while time.monotonic() < deadline:
        leader = Path(f"/proc/{child.pid}/stat").read_text()
        if leader[leader.rfind(")") + 2] == "Z":
            saw_zombie_leader = True
            break
    assert saw_zombie_leader
    assert state.process_start_ticks(child.pid) is not None  # a thread still runs
    fd = os.open(lock, os.O_RDWR)
    with pytest.raises(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # and the lock is still held
    child.wait(timeout=10)
    assert state.process_start_ticks(child.pid) is None
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


def test_stale_state_is_cleaned_under_the_lock(tmp_path: Path) -> None:
    rd = tmp_path / state.RUN_DIR
    rd.mkdir()
    dead = state.RunState(pid=2**22 + 7, start_ticks=1, started=0, accel="tcg", network="user")
    state.write(tmp_path, dead)
    (rd / state.QMP_SOCKET).write_bytes(b"")
    (rd / state.SERIAL_LOG).write_text("last words\n")
    taken: list[bool] = []

    class Lock:
        def __enter__(self) -> None:
            taken.append(True)

        def __exit__(self, *a: object) -> None:
            pass

    assert state.observe(tmp_path, lambda: None) is None  # busy: left alone
    assert (rd / state.STATE_FILE).exists()
    assert state.observe(tmp_path, Lock) is None
    assert taken == [True]
    assert not (rd / state.STATE_FILE).exists() and not (rd / state.QMP_SOCKET).exists()
    assert (rd / state.SERIAL_LOG).read_text() == "last words\n"  # kept for a post-mortem
    assert state.RunState.from_json({"pid": "x"}) is None
    assert state.RunState.from_json(json.loads('{"pid": 5}')) is None


# -- boot checks ----------------------------------------------------------------------------


def _vm(tmp_path: Path, **fields: object) -> VM:
    cfg = VMConfig.new(
        os_name="linux", arch="x86_64", cpus=1, memory=1 << 28, disks=[Disk("disk.img", 1 << 20)]
    )
    for k, v in fields.items():
        cfg.set(k, v)
    return VM("vm", tmp_path, VMConfig(cfg.to_dict()))


def test_kernel_checks(tmp_path: Path) -> None:
    bz = bytearray(4096)
    bz[0x202:0x206] = b"HdrS"
    assert boot.looks_like_kernel(bytes(bz), "x86_64")
    assert boot.looks_like_kernel(b"\x7fELF" + bytes(100), "x86_64")
    assert not boot.looks_like_kernel(os.urandom(1024).replace(b"HdrS", b"xxxx"), "x86_64")
    arm = bytearray(4096)
    arm[0x38:0x3C] = b"ARM\x64"
    assert boot.looks_like_kernel(bytes(arm), "aarch64")
    vm = _vm(tmp_path, boot="kernel", kernel="kernel")
    with pytest.raises(Exception, match="kernel file .* is missing") as e:
        boot.plan(vm, print)
    assert getattr(e.value, "exit_code", None) == 3
    (tmp_path / "kernel").write_bytes(b"garbage" * 100)
    with pytest.raises(IntegrityError, match="not a Linux kernel"):
        boot.plan(vm, print)
    (tmp_path / "kernel").write_bytes(bytes(bz))
    plan, changed = boot.plan(vm, print)
    assert plan.kernel == tmp_path / "kernel" and plan.initramfs is None and changed is None


def test_host_checks(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="macOS"):
        boot.check_host("m", _vm(tmp_path, os="darwin", arch="aarch64").config, "x86_64")
    tart = _vm(tmp_path, arch="aarch64", source={"format": "tart"})
    with pytest.raises(UnsupportedError, match="Tart image for Apple Silicon"):
        boot.check_host("t", tart.config, "x86_64")
    with pytest.raises(UnsupportedError, match="BIOS"):
        boot.check_host("b", _vm(tmp_path, arch="aarch64", boot="bios").config, "x86_64")
    boot.check_host("ok", _vm(tmp_path).config, "x86_64")


OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


@pytest.mark.skipif(not OVMF_VARS.exists(), reason="ovmf is not installed")
def test_nvram_made_on_first_boot_then_checked(tmp_path: Path) -> None:
    notes: list[str] = []
    vm = _vm(tmp_path, boot="uefi")
    plan, changed = boot.plan(vm, notes.append)
    nvram = tmp_path / boot.NVRAM_FILE
    assert plan.nvram == nvram and nvram.read_bytes() == OVMF_VARS.read_bytes()
    assert changed is not None and changed.nvram == boot.NVRAM_FILE and not notes
    vm = _vm(tmp_path, boot="uefi", nvram=boot.NVRAM_FILE)
    with open(nvram, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(IntegrityError, match="NVRAM .* is corrupt") as e:
        boot.plan(vm, notes.append)
    assert "remove it" in (e.value.hint or "")
    nvram.write_bytes(bytes(OVMF_VARS.stat().st_size))  # right size, no firmware volume
    with pytest.raises(IntegrityError, match="no firmware volume header"):
        boot.plan(vm, notes.append)
    nvram.unlink()
    plan, changed = boot.plan(vm, notes.append)  # recorded but gone: a fresh copy, said so
    assert nvram.exists() and changed is None and "missing" in notes[0]


def test_missing_firmware_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(boot.FIRMWARE, "x86_64", [(str(tmp_path / "C"), str(tmp_path / "V"))])
    with pytest.raises(UnsupportedError, match=r"Debian package ovmf"):
        boot.plan(_vm(tmp_path, boot="uefi"), print)


# -- the key pair and ssh -------------------------------------------------------------------


def test_keypair_is_private_and_made_once(tmp_path: Path) -> None:
    pairs: list[access.KeyPair] = []
    threads = [
        threading.Thread(target=lambda: pairs.append(access.ensure_keypair(tmp_path)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({p.public_key() for p in pairs}) == 1  # every racer got the same key
    pair = pairs[0]
    assert stat.S_IMODE(pair.private.stat().st_mode) == 0o600
    assert stat.S_IMODE(pair.private.parent.stat().st_mode) == 0o700
    assert pair.public_key().startswith("ssh-ed25519 ")
    assert os.listdir(tmp_path / "tmp") == []
    argv = access.ssh_argv(
        access.Endpoint("127.0.0.1", 4022),
        user="root",
        identity=pair.private,
        known_hosts=tmp_path / "kh",
        alias="barge-vm",
        command=["sh", "-c", "echo $HOME; exit 3"],
    )
    assert argv[-3:] == ["root@127.0.0.1", "--", "sh -c 'echo $HOME; exit 3'"]
    assert "BatchMode=yes" in argv and "StrictHostKeyChecking=accept-new" in argv
    assert f"UserKnownHostsFile={tmp_path / 'kh'}" in argv and "HostKeyAlias=barge-vm" in argv


def test_banner_check_needs_an_ssh_server() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        ep = access.Endpoint("127.0.0.1", srv.getsockname()[1])

        def answer(banner: bytes) -> None:
            conn, _ = srv.accept()
            conn.sendall(banner)
            conn.close()

        for banner, want in ((b"", False), (b"HTTP/1.1 400\r\n", False), (b"SSH-2.0-x\r\n", True)):
            t = threading.Thread(target=answer, args=(banner,))
            t.start()
            assert access.ssh_banner(ep, timeout=2) is want
            t.join()


def test_a_slow_banner_is_waited_for() -> None:
    """A guest's sshd under TCG may take seconds to send its banner on a connection QEMU has
    accepted: the polling of `ip --wait` (slices of 2 s) must not cut it off each time."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        ep = access.Endpoint("127.0.0.1", srv.getsockname()[1])

        def slow() -> None:
            conn, _ = srv.accept()
            time.sleep(4)
            conn.sendall(b"SSH-2.0-slow\r\n")
            time.sleep(0.5)
            conn.close()

        t = threading.Thread(target=slow)
        t.start()
        assert access.wait_for_ssh(ep, 2.0, lambda: True)
        t.join()


# -- QMP ------------------------------------------------------------------------------------


def test_qmp_events_before_the_answer_and_long_socket_paths(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "qmp.sock"
    assert len(str(path)) > 108
    srv = socket.socket(socket.AF_UNIX)
    old = os.getcwd()
    os.chdir(deep)  # bind by a relative name, as QEMU does in its runtime directory
    try:
        srv.bind("qmp.sock")
    finally:
        os.chdir(old)
    srv.listen()

    def serve() -> None:
        conn, _ = srv.accept()
        f = conn.makefile("rwb")
        f.write(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
        f.flush()
        for line in f:
            cmd = json.loads(line)["execute"]
            if cmd == "system_powerdown":
                f.write(b'{"event": "POWERDOWN", "timestamp": {}}\r\n')
            if cmd == "bad":
                f.write(b'{"error": {"class": "GenericError", "desc": "no such thing"}}\r\n')
            else:
                f.write(b'{"return": {}}\r\n')
            f.flush()
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with QMP(path, timeout=5) as q:
        assert q.execute("system_powerdown") == {}
        assert q.wait_event("POWERDOWN", 0) is not None
        with pytest.raises(QMPError, match="no such thing"):
            q.execute("bad")
    srv.close()
    with pytest.raises(QMPError, match="cannot reach"):
        QMP(tmp_path / "none.sock", timeout=1)
