"""Run and control VMs: the library API behind ``barge run/stop/ip/ssh/exec``.

``start`` takes the VM's exclusive lock and hands it to QEMU (QEMU inherits the lock's open
file, so the lock lives exactly as long as QEMU: a second ``run`` — or a ``push``, ``delete``,
``rename``, ``set``, ``clone`` — is refused while it runs, and a QEMU that dies frees it).
QEMU starts in its own session (a terminal's Ctrl-C reaches barge, not QEMU) with the VM's
runtime directory as working directory; barge waits until QMP answers, then records the
runtime state. ``supervise`` is the foreground part: Ctrl-C (or SIGTERM) asks the guest to
power down through ACPI, a second one quits QEMU, a third kills it. ``stop`` does the same from
another process: ACPI power-down, then QMP ``quit``, then SIGTERM/SIGKILL, each after the
timeout.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import subprocess
import sys
import termios
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from barge.errors import (
    BargeError,
    BusyError,
    ConflictError,
    NotFoundError,
    NotRunningError,
    UsageError,
)
from barge.local import CloneResult, clone_dir, clone_vm, delete_vm
from barge.store import VM, Store, validate_vm_name
from barge.store.store import VMLock
from barge.store.vmconfig import VMConfig
from barge.vm import access, boot, kvm, net, qemu, seed, state
from barge.vm.qmp import QMP, QMPError

Note = Callable[[str], None]

START_TIMEOUT = 30.0
_PORT_RETRIES = 3


@dataclass
class RunOptions:
    cpus: int | None = None
    memory: int | None = None  # bytes
    detach: bool = False
    serial: bool = False  # the serial console on this terminal
    vnc: bool = False
    graphics: bool = False
    net_bridged: str | None = None
    publish: list[net.Forward] = field(default_factory=list)
    disks: list[str] = field(default_factory=list)  # FILE[:ro]
    cloud_init: Path | None = None
    no_cloud_init: bool = False
    accel: str = "auto"


@dataclass
class Started:
    vm: VM
    proc: subprocess.Popen[bytes]
    lock: VMLock
    run_state: state.RunState
    accel: kvm.Accel
    serial_log: Path
    endpoint: access.Endpoint | None
    vnc: str | None
    serial: bool


@dataclass(frozen=True)
class StopResult:
    how: str  # "acpi", "quit" or "kill"
    seconds: float


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    how: str  # "poweroff", "quit", "killed"


# -- status ---------------------------------------------------------------------------------


def observe(store: Store, vm: VM) -> state.RunState | None:
    """The runtime state when the VM runs; a dead QEMU's stale state is cleaned."""
    return state.observe(vm.path, lambda: store.try_lock_vm(vm.name))


# -- start ----------------------------------------------------------------------------------


def _extra_drives(vm: VM, specs: list[str]) -> list[qemu.Drive]:
    drives = []
    own = {str((vm.path / d.name).resolve()) for d in vm.config.disks}
    for text in specs:
        path_text, ro = text, False
        for suffix, flag in ((":ro", True), (":rw", False)):
            if text.endswith(suffix):
                path_text, ro = text[: -len(suffix)], flag
        path = Path(path_text).expanduser().resolve()
        if not path.is_file():
            raise UsageError(f"--disk {text}: no such file")
        if str(path) in own:
            raise UsageError(f"--disk {text}: that is already one of the VM's own disks")
        with open(path, "rb") as f:
            fmt = "qcow2" if f.read(4) == b"QFI\xfb" else "raw"
        drives.append(qemu.Drive(path, fmt, ro))
    return drives


def _vnc_display() -> int:
    for port in range(5900, 6000):
        if net.port_available(net.LOOPBACK, port):
            return port - 5900
    raise BusyError("no free VNC port on 127.0.0.1 (5900-5999 are all taken)")


def _seed_files(
    store: Store, vm: VM, cfg: VMConfig, opts: RunOptions, note: Note
) -> dict[str, bytes]:
    pub = access.ensure_keypair(store.home).public_key()
    user_data = None
    if opts.cloud_init is not None:
        try:
            user_data = opts.cloud_init.read_bytes()
        except OSError as e:
            raise UsageError(f"--cloud-init {opts.cloud_init}: {e.strerror}") from None
        if pub.split()[1] not in user_data.decode(errors="replace"):
            note(
                f"--cloud-init {opts.cloud_init} does not hold barge's public key "
                f"({store.home / 'ssh' / 'id_ed25519.pub'}): ssh/exec need your own --identity"
            )
    vm_id = str(cfg.get("instanceUuid"))
    return seed.nocloud_files(vm.name, vm_id, [pub], user_data)


def _log_tail(path: Path, offset: int = 0, lines: int = 12) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()[-64 * 1024 :]
    except OSError:
        return []
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", data.decode(errors="replace"))
    out = [re.sub(r"[^\t\x20-\x7e]", "", ln).rstrip() for ln in text.splitlines()]
    return [ln for ln in out if ln.strip()][-lines:]


def serial_hint(vm: VM, lines: int = 10) -> str:
    log = state.run_dir(vm.path) / state.SERIAL_LOG
    tail = _log_tail(log, lines=lines)
    if not tail:
        return f"the serial log {log} is empty"
    return f"the serial log {log} ends with:\n" + "\n".join(f"  {ln}" for ln in tail)


def _qemu_failure(log_lines: list[str]) -> str:
    for line in reversed(log_lines):
        text = re.sub(r"^qemu-system-\w+: ", "", line).strip()
        if text and not text.startswith("warning:"):
            return text
    return "it exited without a message"


def _wait_up(proc: subprocess.Popen[bytes], qmp_path: Path, timeout: float) -> bool:
    """True once QMP answers; False when QEMU exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if qmp_path.exists():
            try:
                with QMP(qmp_path, timeout=2.0) as q:
                    q.execute("query-status")
                return True
            except QMPError:
                pass
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise BargeError(f"QEMU did not come up within {timeout:g} s")


def start(store: Store, name: str, opts: RunOptions, note: Note) -> Started:
    """Boot VM ``name``; returns once QEMU is up (its QMP answers)."""
    vm = store.get_vm(name)
    host = kvm.host_arch()
    boot.check_host(name, vm.config, host)
    qemu_bin = qemu.find_qemu(vm.config.arch)
    if opts.serial and opts.detach:
        raise UsageError("--serial attaches the console to this terminal: it cannot --detach")
    if opts.graphics and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise UsageError("--graphics needs a display (DISPLAY is not set); use --vnc instead")
    lock = store.vm_lock(name)
    proc: subprocess.Popen[bytes] | None = None
    try:
        vm = store.get_vm(name)  # as it is now that it is ours
        cfg = VMConfig(vm.config.to_dict())
        rd = state.run_dir(vm.path)
        rd.mkdir(mode=0o700, exist_ok=True)
        os.chmod(rd, 0o700)  # the QMP socket controls the VM; the logs are the guest's
        state.clear(vm.path)  # we hold the lock: whatever is there is stale
        for stale in (state.KNOWN_HOSTS, state.SERIAL_LOG, state.QEMU_LOG):  # one run's
            with contextlib.suppress(FileNotFoundError):
                (rd / stale).unlink()
        changed = False
        if not cfg.get("instanceUuid"):
            cfg.set("instanceUuid", str(uuid.uuid4()))
            changed = True
        plan, new_cfg = boot.plan(vm, note)
        if new_cfg is not None:
            cfg.set("nvram", new_cfg.nvram)
            changed = True
        if changed:
            store.write_config(vm, cfg)
        accel = kvm.choose(opts.accel, cfg.arch, arch=host)
        if accel.warning:
            note(accel.warning)

        drives = [qemu.Drive(vm.path / d.name, d.format) for d in cfg.disks]
        drives += _extra_drives(vm, opts.disks)
        if not opts.no_cloud_init:
            seed.write_seed(rd / state.SEED_FILE, _seed_files(store, vm, cfg, opts, note))
            drives.append(qemu.Drive(rd / state.SEED_FILE, "raw", readonly=True))

        tap = None
        if opts.net_bridged:
            if opts.publish:
                raise UsageError("--publish forwards ports of user-mode networking, not bridged")
            net.check_bridge(opts.net_bridged)
            tap = net.tap_name(vm.path)
        else:
            net.check_published(opts.publish)
        vnc = _vnc_display() if opts.vnc else None
        memory = opts.memory or cfg.memory
        cpus = opts.cpus or cfg.cpus

        log_path = rd / state.QEMU_LOG
        for attempt in range(_PORT_RETRIES):
            ssh = None if tap else net.Forward(net.LOOPBACK, net.free_port(), 22)
            spec = qemu.LaunchSpec(
                name=vm.name,
                arch=cfg.arch,
                accel=accel.name,
                cpus=cpus,
                memory_mib=-(-memory // (1 << 20)),
                boot=plan,
                drives=drives,
                mac=cfg.mac_address,
                netdev=None if tap else net.user_netdev(ssh, opts.publish),
                tap=tap,
                serial_log=state.SERIAL_LOG,
                serial_stdio=opts.serial,
                qmp=state.QMP_SOCKET,
                vnc_display=vnc,
                graphics=opts.graphics,
                paused=tap is not None,
            )
            offset = log_path.stat().st_size if log_path.exists() else 0
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    qemu.build_argv(spec, qemu_bin),
                    cwd=rd,
                    stdin=None if opts.serial else subprocess.DEVNULL,
                    stdout=None if opts.serial else log,
                    stderr=log,
                    start_new_session=True,
                    pass_fds=(lock.fd,),
                )
            if _wait_up(proc, rd / state.QMP_SOCKET, START_TIMEOUT):
                break
            lines = _log_tail(log_path, offset)
            proc = None
            failure = _qemu_failure(lines)
            taken = ssh is not None and f"{ssh.host_addr}:{ssh.host_port}-" in failure
            if taken and attempt + 1 < _PORT_RETRIES:
                continue  # someone took the port we picked before QEMU bound it: pick another
            for f in opts.publish:
                if f"{f.host_addr}:{f.host_port}-" in failure:
                    raise UsageError(f"--publish {f}: {f.host_addr}:{f.host_port} is in use")
            if 'write" lock' in failure:
                raise BusyError(f"QEMU cannot lock a disk of {name!r}: {failure}")
            raise BargeError(f"QEMU failed to start {name!r}: {failure}", hint=f"see {log_path}")
        assert proc is not None
        ticks = state.process_start_ticks(proc.pid)
        if ticks is None:
            raise BargeError(f"QEMU exited right after starting {name!r}", hint=f"see {log_path}")
        if tap is not None and opts.net_bridged:
            net.attach_tap(tap, opts.net_bridged)
            with QMP(rd / state.QMP_SOCKET) as q:
                q.execute("cont")
        st = state.RunState(
            pid=proc.pid,
            start_ticks=ticks,
            started=time.time(),
            accel=accel.name,
            accel_reason=accel.reason,
            network=f"bridged:{opts.net_bridged}" if tap else "user",
            mac=cfg.mac_address,
            ssh_host=ssh.host_addr if ssh else None,
            ssh_port=ssh.host_port if ssh else None,
            forwards=[f.to_json() for f in opts.publish],
            vnc=f"127.0.0.1:{5900 + vnc}" if vnc is not None else None,
            tap=tap,
            supervisor_pid=None if opts.detach else os.getpid(),
        )
        state.write(vm.path, st)
        started = Started(
            vm=vm,
            proc=proc,
            lock=lock,
            run_state=st,
            accel=accel,
            serial_log=rd / state.SERIAL_LOG,
            endpoint=state.endpoint_of(st),
            vnc=st.vnc,
            serial=opts.serial,
        )
        if opts.detach:
            lock.release()  # QEMU holds it now
        return started
    except BaseException:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        state.clear(vm.path)
        lock.release()
        raise


# -- foreground supervision -------------------------------------------------------------------


def supervise(started: Started, note: Note) -> RunResult:
    """Wait for a foreground run to end. The first Ctrl-C/SIGTERM asks the guest to power down
    through ACPI, the second quits QEMU, the third kills it."""
    proc = started.proc
    qmp_path = state.run_dir(started.vm.path) / state.QMP_SOCKET
    pending: list[int] = []
    presses = 0
    installed: dict[int, Any] = {}
    saved_tty = None
    if started.serial and sys.stdin.isatty():
        with contextlib.suppress(termios.error):
            saved_tty = termios.tcgetattr(sys.stdin.fileno())

    def on_signal(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            installed[sig] = signal.signal(sig, on_signal)
    try:
        while True:
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            while pending:
                pending.pop()
                presses += 1
                if presses == 1:
                    note("asking the guest to power off (ACPI); Ctrl-C again stops QEMU")
                    _qmp_command(qmp_path, "system_powerdown", note)
                elif presses == 2:
                    note("stopping QEMU")
                    if not _qmp_command(qmp_path, "quit", note):
                        proc.terminate()
                else:
                    proc.kill()
    finally:
        for signum, old in installed.items():
            signal.signal(signum, old)
        if saved_tty is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, saved_tty)
        if proc.poll() is not None:
            state.clear(started.vm.path)
            started.lock.release()
    rc = proc.returncode
    if rc == 0:
        return RunResult(130 if presses >= 2 else 0, "quit" if presses >= 2 else "poweroff")
    if rc < 0 and presses >= 3:
        return RunResult(130, "killed")
    log = state.run_dir(started.vm.path) / state.QEMU_LOG
    if rc < 0:
        try:
            sig_name = signal.Signals(-rc).name
        except ValueError:
            sig_name = f"signal {-rc}"
        raise BargeError(
            f"QEMU of {started.vm.name!r} was killed ({sig_name}): the guest stopped without "
            "powering off",
            hint=f"QEMU's messages: {log}",
        )
    raise BargeError(
        f"QEMU of {started.vm.name!r} exited with status {rc}: {_qemu_failure(_log_tail(log))}",
        hint=f"QEMU's messages: {log}",
    )


# -- stop -----------------------------------------------------------------------------------


def _not_running(store: Store, vm: VM, *, hint: bool = True) -> NotRunningError:
    observe(store, vm)  # cleans a stale state
    return NotRunningError(
        f"VM {vm.name!r} is not running",
        hint=f"start it: `barge run {vm.name} --detach`" if hint else None,
    )


def _wait_lock_free(store: Store, name: str, timeout: float) -> VMLock | None:
    deadline = time.monotonic() + timeout
    while True:
        lock = store.try_lock_vm(name)
        if lock is not None or time.monotonic() >= deadline:
            return lock
        time.sleep(0.1)


def _qmp_command(qmp_path: Path, command: str, note: Note) -> bool:
    """One QMP command, a failure said as a note (the caller escalates)."""
    try:
        with QMP(qmp_path) as q:
            q.execute(command)
    except QMPError as e:
        note(f"QMP {command} failed: {e}")
        return False
    return True


def stop(store: Store, name: str, timeout: float, note: Note) -> StopResult:
    """ACPI power-down, then QMP quit, then SIGTERM and SIGKILL, each after ``timeout``."""
    vm = store.get_vm(name)
    st = state.running(vm.path)
    if st is None:
        raise _not_running(store, vm, hint=False)
    qmp_path = state.run_dir(vm.path) / state.QMP_SOCKET
    t0 = time.monotonic()
    how = "acpi"
    _qmp_command(qmp_path, "system_powerdown", note)
    if not state.wait_exit(st, timeout):
        how = "quit"
        note(f"{name!r} did not power off within {timeout:g} s: stopping QEMU (QMP quit)")
        _qmp_command(qmp_path, "quit", note)
        if not state.wait_exit(st, timeout):
            how = "kill"
            note(f"QEMU of {name!r} did not quit within {timeout:g} s: killing it (pid {st.pid})")
            for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
                if state.alive(st):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(st.pid, sig)
                if state.wait_exit(st, grace):
                    break
            else:
                raise BargeError(f"QEMU of {name!r} (pid {st.pid}) does not die")
    # a foreground `barge run` cleans up itself; wait for it, then clean what is left
    lock = _wait_lock_free(store, name, 10.0)
    if lock is not None:
        with lock:
            again = state.read(vm.path)
            if again is not None and not state.alive(again):
                state.clear(vm.path)
    return StopResult(how, time.monotonic() - t0)


# -- guest access ---------------------------------------------------------------------------


def endpoint(store: Store, name: str, wait: float | None = None) -> access.Endpoint:
    """Where the guest's SSH answers. With ``wait``, wait up to that many seconds for the VM
    to be running (a ``run`` may be starting it) and its SSH server to answer (its banner),
    else fail with the serial log's last lines."""
    vm = store.get_vm(name)
    st = observe(store, vm)
    if wait is None:
        if st is None:
            raise _not_running(store, vm)
        ep = state.endpoint_of(st)
        if ep is None:
            raise NotFoundError(
                f"the address of {name!r} on its bridge is not known yet (no ARP entry for "
                f"{st.mac})",
                hint=f"wait for it: `barge ip {name} --wait 60`",
            )
        return ep
    deadline = time.monotonic() + wait
    seen: state.RunState | None = None
    next_prod = 0.0
    while True:
        st = observe(store, vm)
        if st is None and seen is not None:
            raise NotRunningError(
                f"VM {name!r} stopped while waiting for its SSH", hint=serial_hint(vm)
            )
        if st is not None:
            seen = st
            ep = state.endpoint_of(st)
            bridged = st.network.removeprefix("bridged:")
            if ep is None and bridged != st.network and time.monotonic() >= next_prod:
                net.prod_neighbours(bridged)
                next_prod = time.monotonic() + 5.0
            left = deadline - time.monotonic()
            if ep is not None and access.wait_for_ssh(
                ep,
                max(0.0, min(left, 2.0)),
                functools.partial(state.alive, st),
                banner_timeout=min(access.BANNER_TIMEOUT, left),
            ):
                return ep
        if time.monotonic() >= deadline:
            if seen is None:
                raise NotRunningError(f"VM {name!r} is not running (waited {wait:g} s)")
            where = f"on {state.endpoint_of(seen) or '(no address yet)'}"
            raise BargeError(
                f"VM {name!r} did not answer SSH {where} within {wait:g} s", hint=serial_hint(vm)
            )
        time.sleep(0.2)


def ssh_argv(
    store: Store,
    name: str,
    command: list[str] | None,
    *,
    user: str | None = None,
    identity: Path | None = None,
    wait: float | None = None,
    interactive: bool = False,
    quote: bool = True,
) -> list[str]:
    ep = endpoint(store, name, wait)
    vm = store.get_vm(name)
    key = identity or access.ensure_keypair(store.home).private
    return access.ssh_argv(
        ep,
        user=user or vm.config.ssh_user,
        identity=key,
        known_hosts=state.run_dir(vm.path) / state.KNOWN_HOSTS,
        alias=f"barge-{name}",
        command=command,
        batch=not interactive,
        tty=interactive,
        quote=quote,
    )


# -- operations on a running VM ---------------------------------------------------------------


@contextlib.contextmanager
def _paused(vm: VM, st: state.RunState) -> Iterator[None]:
    """The guest paused (QEMU flushes its disks when it pauses), resumed afterwards."""
    qmp_path = state.run_dir(vm.path) / state.QMP_SOCKET
    with QMP(qmp_path) as q:
        was_running = q.execute("query-status").get("running", False)
        if was_running:
            q.execute("stop")
    try:
        yield
    finally:
        if was_running and state.alive(st):
            with QMP(qmp_path) as q:
                q.execute("cont")


def clone(store: Store, src: str, dst: str, *, force: bool = False) -> CloneResult:
    """Clone a local VM; with ``force`` a running one too, paused for the copy (a
    crash-consistent copy, as if its power had been cut)."""
    vm = store.get_vm(src)
    st = state.running(vm.path) if force else None
    if st is None:
        return clone_vm(store, src, dst)
    validate_vm_name(dst)
    with store.lock_vm(dst):
        if store.vm_exists(dst):
            raise ConflictError(f"a VM named {dst!r} already exists")
        with _paused(vm, st):
            # the source's lock is QEMU's: nothing else can write it meanwhile
            return clone_dir(store, vm.path, store.get_vm(src).config, dst)


def delete(store: Store, name: str, *, force: bool = False, note: Note) -> None:
    """Delete a local VM; with ``force`` a running one is stopped first (QEMU quit)."""
    vm = store.get_vm(name)
    if force and state.running(vm.path) is not None:
        stop(store, name, 2.0, note)  # its disks are about to go: no need to wait long
    delete_vm(store, name)
