"""A small QMP client: QEMU's JSON control protocol over a Unix socket.

QEMU serves one QMP client at a time on a socket chardev, so barge connects for each action
and disconnects at once (a foreground ``run`` holds no connection: ``stop`` from another shell
must get through). Events (``POWERDOWN``, ``SHUTDOWN``…) may arrive before a command's
``return``; they are kept, not mistaken for the answer. Every read has a deadline.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from barge.errors import BargeError

#: sun_path holds 108 bytes; longer paths are reached through the directory's /proc fd.
_SUN_PATH_MAX = 107


class QMPError(BargeError):
    """QMP unreachable, or QEMU answered a command with an error."""


def connect_unix(sock: socket.socket, path: Path) -> None:
    """``sock.connect(path)`` even when the path is longer than ``sun_path`` allows."""
    text = str(path)
    if len(text.encode()) <= _SUN_PATH_MAX:
        sock.connect(text)
        return
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sock.connect(f"/proc/self/fd/{dfd}/{path.name}")
    finally:
        os.close(dfd)


class QMP:
    def __init__(self, path: Path, *, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._buf = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            connect_unix(self._sock, path)
            greeting = self._read_message(time.monotonic() + timeout)
            if "QMP" not in greeting:
                raise QMPError(f"{path} does not speak QMP")
            self.execute("qmp_capabilities")
        except (OSError, QMPError) as e:
            self._sock.close()
            if isinstance(e, QMPError):
                raise
            raise QMPError(f"cannot reach QEMU's control socket {path}: {e}") from None

    def __enter__(self) -> QMP:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise QMPError(f"QMP {command}: {e}") from None
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                err = reply["error"]
                desc = err.get("desc", err) if isinstance(err, dict) else err
                raise QMPError(f"QMP {command}: {desc}")
            if "return" in reply:
                return reply["return"]

    def wait_event(self, name: str, timeout: float) -> dict[str, Any] | None:
        """The first event called ``name`` (already received or arriving within ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events:
                if ev.get("event") == name:
                    return ev
            try:
                self.events.append(self._read_message(deadline))
            except QMPError:
                return None

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPError(f"QEMU did not answer on {self.path} in time")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                raise QMPError(f"QMP connection to {self.path} failed: {e}") from None
            if not chunk:
                raise QMPError(f"QEMU closed its control socket {self.path}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            doc = json.loads(line)
        except ValueError:
            raise QMPError(f"QEMU sent something that is not JSON on {self.path}") from None
        if not isinstance(doc, dict):
            raise QMPError(f"QEMU sent a non-object on {self.path}")
        return doc
