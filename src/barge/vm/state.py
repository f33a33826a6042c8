"""The runtime state of a running VM, and whether its QEMU is still alive.

A running VM has ``<vm dir>/.run/`` (hidden: never pushed, never cloned) holding
``state.json`` (written once QEMU is up), the QMP socket ``qmp.sock``, the NoCloud seed, the
serial log ``serial.log``, QEMU's own messages ``qemu.log`` and the run's ``known_hosts``.

Liveness never trusts a PID alone: ``state.json`` records QEMU's PID *and* its start time
(field 22 of ``/proc/PID/stat``), so a reused PID or a zombie reads as dead. The VM's lock is
held by QEMU itself (it inherits the lock's open file), so a QEMU that dies, however it dies,
releases the lock at once; what stays behind is a stale ``state.json``, which whoever next
looks (``list``, ``get``, ``stop``, ``run``) removes under the lock.

This module never imports the store (only the leaves ``net`` and ``access``): the store uses
it to name a running VM in its lock errors, and ``barge.local`` to show a VM's run.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from barge.vm.access import Endpoint
from barge.vm.net import neighbour_address

RUN_DIR = ".run"
STATE_FILE = "state.json"
QMP_SOCKET = "qmp.sock"
SERIAL_LOG = "serial.log"
QEMU_LOG = "qemu.log"
SEED_FILE = "seed.iso"
KNOWN_HOSTS = "known_hosts"
#: removed when a run ends; the logs stay for a post-mortem until the next run
_TRANSIENT = (STATE_FILE, QMP_SOCKET, SEED_FILE)


@dataclass
class RunState:
    pid: int
    start_ticks: int
    started: float
    accel: str
    network: str  # "user" or "bridged:<bridge>"
    mac: str | None = None
    ssh_host: str | None = None
    ssh_port: int | None = None
    forwards: list[dict[str, Any]] = field(default_factory=list)
    vnc: str | None = None
    tap: str | None = None
    supervisor_pid: int | None = None  # the foreground `barge run`, if any
    accel_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> RunState | None:
        if not isinstance(doc, dict):
            return None
        try:
            st = cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})
        except TypeError:
            return None
        if not isinstance(st.pid, int) or not isinstance(st.start_ticks, int) or st.pid <= 0:
            return None
        return st


def run_dir(vm_path: Path) -> Path:
    return vm_path / RUN_DIR


def read(vm_path: Path) -> RunState | None:
    try:
        doc = json.loads((run_dir(vm_path) / STATE_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    return RunState.from_json(doc)


def write(vm_path: Path, st: RunState) -> None:
    d = run_dir(vm_path)
    tmp = d / f".{STATE_FILE}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(st.to_json(), indent=2) + "\n")
    os.replace(tmp, d / STATE_FILE)


def clear(vm_path: Path) -> None:
    """Remove what a run leaves that must not outlive it (the logs stay)."""
    d = run_dir(vm_path)
    for name in _TRANSIENT:
        with contextlib.suppress(FileNotFoundError):
            (d / name).unlink()


def _stat_fields(path: Path) -> list[str] | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return fields if len(fields) >= 20 else None


def process_start_ticks(pid: int, proc: Path = Path("/proc")) -> int | None:
    """The start time of a live process, or None if there is none. A zombie is dead — once
    all its threads are: a multi-threaded process's leader shows as a zombie while its other
    threads still exit, and until they have, its files (the VM's lock) are still open."""
    fields = _stat_fields(proc / str(pid) / "stat")
    if fields is None:
        return None
    if fields[0] in ("Z", "X"):
        try:
            tasks = os.listdir(proc / str(pid) / "task")
        except OSError:
            return None
        exiting = False
        for tid in tasks:
            t = _stat_fields(proc / str(pid) / "task" / tid / "stat")
            if t is not None and t[0] not in ("Z", "X"):
                exiting = True
                break
        if not exiting:
            return None
    try:
        return int(fields[19])
    except ValueError:
        return None


def alive(st: RunState) -> bool:
    return process_start_ticks(st.pid) == st.start_ticks


def running(vm_path: Path) -> RunState | None:
    """The VM's state if its QEMU is alive."""
    st = read(vm_path)
    return st if st is not None and alive(st) else None


def observe(
    vm_path: Path, try_lock: Callable[[], AbstractContextManager[object] | None]
) -> RunState | None:
    """Like :func:`running`, and a stale state (QEMU gone) is cleaned when the VM's lock can
    be taken at once (``try_lock`` returns a held lock, or None when it is busy)."""
    st = read(vm_path)
    if st is None:
        return None
    if alive(st):
        return st
    lock = try_lock()
    if lock is not None:
        with lock:
            again = read(vm_path)
            if again is not None and not alive(again):
                clear(vm_path)
    return None


def wait_exit(st: RunState, timeout: float) -> bool:
    """Wait up to ``timeout`` s for QEMU to exit; True when it is gone."""
    if not alive(st):
        return True
    deadline = time.monotonic() + timeout
    pidfd = -1
    with contextlib.suppress(OSError, AttributeError):
        pidfd = os.pidfd_open(st.pid)
    try:
        # the pidfd was opened after the start-time check: make sure it is the same process
        if not alive(st):
            return True
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return not alive(st)
            if pidfd >= 0:
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                poller.poll(min(left, 1.0) * 1000)
            else:
                time.sleep(min(left, 0.2))
            if not alive(st):
                return True
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def endpoint_of(st: RunState) -> Endpoint | None:
    """Where the guest's SSH answers: the forwarded loopback port, or port 22 at the address
    the host's ARP table has for the VM's MAC on its bridge (None until it has one)."""
    if st.ssh_host and st.ssh_port:
        return Endpoint(st.ssh_host, st.ssh_port)
    if st.network.startswith("bridged:") and st.mac:
        addr = neighbour_address(st.mac)
        return Endpoint(addr, 22, forwarded=False) if addr else None
    return None


def status(
    vm_path: Path, try_lock: Callable[[], AbstractContextManager[object] | None]
) -> dict[str, Any]:
    """What ``list``/``get`` show about a VM's run (a dead QEMU's state is cleaned)."""
    st = observe(vm_path, try_lock)
    if st is None:
        return {"running": False}
    ep = endpoint_of(st)
    return {
        "running": True,
        "pid": st.pid,
        "accel": st.accel,
        "network": st.network,
        "ssh": str(ep) if ep else None,
        "forwards": st.forwards,
        "vnc": st.vnc,
        "serialLog": str(run_dir(vm_path) / SERIAL_LOG),
        "started": st.started,
    }
