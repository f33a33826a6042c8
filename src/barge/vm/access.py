"""Guest access: the store's SSH key pair, the ssh command line, waiting for a guest's SSH.

barge keeps one ed25519 key pair per store in ``$BARGE_HOME/ssh/`` (directory 0700, private
key 0600), made with the system ``ssh-keygen`` on first use: generated in a temp directory and
renamed into place, so two first runs never end up with mismatched halves. ``ssh``/``exec``
run the system OpenSSH client with that key (or ``--identity``), ``IdentitiesOnly``, and a
per-VM ``known_hosts`` in the VM's runtime directory with ``StrictHostKeyChecking=accept-new``:
a guest's host key is learned on the first connection of a run and must not change during it.
Each ``run`` starts a new ``known_hosts`` (guests like the test one make fresh host keys on
every boot), and ``HostKeyAlias`` names the VM, not the forwarded port, which changes between
runs.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from barge.errors import BargeError, UsageError

KEY_NAME = "id_ed25519"


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path

    def public_key(self) -> str:
        return self.public.read_text().strip()


@dataclass(frozen=True)
class Endpoint:
    """Where a guest's SSH answers from the host."""

    host: str
    port: int
    forwarded: bool = True  # a host port forwarded by QEMU, not the guest's own address

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" if ":" not in self.host else f"[{self.host}]:{self.port}"

    @property
    def address(self) -> str:
        """What ``barge ip`` prints: the guest's own address, or host:port when forwarded."""
        return str(self) if self.forwarded else self.host


def need_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BargeError(f"{name} is not installed (Debian package {package})")
    return path


def ensure_keypair(home: Path) -> KeyPair:
    """The store's key pair, made on first use (mode 0600, directory 0700)."""
    ssh_dir = home / "ssh"
    pair = KeyPair(ssh_dir / KEY_NAME, ssh_dir / f"{KEY_NAME}.pub")
    if pair.private.is_file() and pair.public.is_file():
        return pair
    keygen = need_tool("ssh-keygen", "openssh-client")
    tmp = home / "tmp" / f"ssh-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(mode=0o700, parents=True)
    try:
        proc = subprocess.run(
            [keygen, "-q", "-t", "ed25519", "-N", "", "-C", f"barge@{socket.gethostname()}"]
            + ["-f", str(tmp / KEY_NAME)],
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            raise BargeError(f"ssh-keygen failed: {proc.stderr.strip() or proc.returncode}")
        os.chmod(tmp / KEY_NAME, 0o600)
        try:
            os.rename(tmp, ssh_dir)  # atomic: both halves appear together
        except OSError:
            if not (pair.private.is_file() and pair.public.is_file()):
                raise  # not a lost race with another first run
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return pair


def ssh_argv(
    endpoint: Endpoint,
    *,
    user: str,
    identity: Path,
    known_hosts: Path,
    alias: str,
    command: list[str] | None = None,
    batch: bool = True,
    tty: bool = False,
    quote: bool = True,
) -> list[str]:
    """The OpenSSH command line for a guest. ``quote`` passes each word of ``command``
    through the remote shell unchanged (``exec``); otherwise they are joined as ssh does."""
    ssh = need_tool("ssh", "openssh-client")
    if not identity.is_file():
        raise UsageError(f"identity file {identity} does not exist")
    argv = [
        ssh,
        "-i",
        str(identity),
        "-p",
        str(endpoint.port),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "StrictHostKeyChecking=accept-new",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        f"HostKeyAlias={alias}",
        "-o",
        # the connect and the banner exchange: a guest's sshd under TCG on a busy host took
        # 9.5 s to send its banner (where nothing listens, QEMU resets the connection at once)
        f"ConnectTimeout={BANNER_TIMEOUT * 2:g}",
        "-o",
        "ServerAliveInterval=15",
        "-o",
        "LogLevel=ERROR",
    ]
    if batch:
        argv += ["-o", "BatchMode=yes"]
    argv.append("-t" if tty else "-T")
    argv.append(f"{user}@{endpoint.host}")
    if command:
        argv.append("--")
        argv += [shlex.join(command)] if quote else command
    return argv


def ssh_banner(endpoint: Endpoint, timeout: float = 3.0) -> bool:
    """True when an SSH server answers (its ``SSH-`` banner) at ``endpoint``. With user-mode
    networking QEMU accepts the TCP connection itself, so a connect proves nothing."""
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout) as s:
            s.settimeout(timeout)
            data = b""
            while len(data) < 4:
                piece = s.recv(256)
                if not piece:
                    return False
                data += piece
            return data.startswith(b"SSH-")
    except OSError:
        return False


#: How long one connection may wait for the banner once accepted: a guest's sshd under TCG on
#: a loaded host can take seconds to answer (it re-executes itself for every connection), and
#: where nothing listens in the guest QEMU closes the connection at once anyway.
BANNER_TIMEOUT = 15.0


def wait_for_ssh(
    endpoint: Endpoint,
    timeout: float,
    alive: Callable[[], bool],
    *,
    interval: float = 0.5,
    banner_timeout: float = BANNER_TIMEOUT,
) -> bool:
    """Poll for the banner until ``timeout`` s pass or ``alive()`` says the VM is gone. A
    connection already accepted may wait up to ``banner_timeout`` for its banner, past
    ``timeout``: a slow guest's answer is not cut off by the polling."""
    deadline = time.monotonic() + timeout
    while True:
        if ssh_banner(endpoint, timeout=max(0.5, banner_timeout)):
            return True
        if not alive() or time.monotonic() >= deadline:
            return False
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def run_ssh(argv: list[str]) -> int:
    """Run ssh on this terminal and return its exit status (the guest command's, or 255 for
    ssh's own failures). Ctrl-C goes to ssh, which ends; barge then just passes its status."""
    import signal

    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return subprocess.run(argv, check=False).returncode
    finally:
        signal.signal(signal.SIGINT, old)
