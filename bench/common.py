"""Shared helpers of the barge benchmark: paths, loopback registries, timed subprocesses.

Every process started here is stopped by its PID; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
sys.path.insert(0, str(REPO / "tests"))  # the registry launcher the tests and the demo use
VENV_BIN = REPO / ".venv" / "bin"
BARGE = str(VENV_BIN / "barge")
SKOPEO = "skopeo"
TIME_BIN = "/usr/bin/time"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def rate(nbytes: float, seconds: float) -> float:
    """MB/s (10^6 bytes per second), 0 when nothing was timed."""
    return nbytes / seconds / 1e6 if seconds > 0 else 0.0


# -- timed subprocesses ----------------------------------------------------------------------


@dataclass
class Timed:
    argv: list[str]
    seconds: float
    returncode: int
    stdout: str
    stderr: str
    max_rss_kib: int  # peak RSS of the child (and the descendants it waited for)
    cpu_seconds: float  # user + system CPU of the child

    def json(self) -> Any:
        return json.loads(self.stdout)

    def check(self) -> Timed:
        if self.returncode != 0:
            raise RuntimeError(
                f"{' '.join(self.argv)} exited {self.returncode}:\n{self.stderr[-3000:]}"
                f"\n{self.stdout[-1000:]}"
            )
        return self


def run_timed(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 900.0,
    cwd: Path | None = None,
) -> Timed:
    """Run ``argv``: wall time here; peak RSS and CPU from ``/usr/bin/time`` (a tiny parent,
    because a child's ru_maxrss starts at the RSS of the process that forked it)."""
    OUT.mkdir(parents=True, exist_ok=True)
    argv = [str(a) for a in argv]
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    usage = OUT / ".usage"
    usage.unlink(missing_ok=True)
    wrapped = [TIME_BIN, "-f", "%M %U %S", "-o", str(usage), *argv]
    with (
        open(OUT / ".stdout", "w+b") as out,
        open(OUT / ".stderr", "w+b") as err,
    ):
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            wrapped, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=full_env, cwd=cwd
        )
        try:
            proc.wait(timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait(timeout=30)
            raise
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        rss = 0
        cpu = 0.0
        try:
            fields = usage.read_text().strip().splitlines()[-1].split()
            rss = int(fields[0])
            cpu = float(fields[1]) + float(fields[2])
        except (OSError, IndexError, ValueError):
            pass
        return Timed(
            argv,
            seconds,
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            rss,
            cpu,
        )


def barge_env(home: Path) -> dict[str, str]:
    return {"BARGE_HOME": str(home)}


def barge_commands() -> set[str]:
    """The subcommands the installed barge CLI has (pull and copy are landing while we run)."""
    r = subprocess.run([BARGE, "--help"], capture_output=True, text=True, timeout=60)
    cmds: set[str] = set()
    section = False
    for line in r.stdout.splitlines():
        if line.strip() == "Commands:":
            section = True
            continue
        if section and line.startswith("  ") and line.strip():
            cmds.add(line.split()[0])
    return cmds


def skopeo(*args: str) -> list[str]:
    return [SKOPEO, "--insecure-policy", *args]


# -- registries --------------------------------------------------------------------------------


@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    workdir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def blob_get_bytes(self, since: int = 0) -> tuple[int, int]:
        """(bytes sent, requests) for blob GETs in the access log after byte offset ``since``."""
        total = n = 0
        with open(self.log_path, "rb") as f:
            f.seek(since)
            for raw in f:
                line = raw.decode(errors="replace")
                if '"GET /v2/' not in line or "/blobs/sha256:" not in line:
                    continue
                # combined log format: "... HTTP/1.1" STATUS BYTES "referer" "agent"
                try:
                    tail = line.split('HTTP/1.1" ', 1)[1].split()
                    status, size = int(tail[0]), int(tail[1])
                except (IndexError, ValueError):
                    continue
                if status in (200, 206):
                    total += size
                    n += 1
        return total, n

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


@contextmanager
def registry(name: str, *, keep: bool = False) -> Iterator[Registry]:
    """A fresh ``docker-registry`` (filesystem storage under bench/out/work/NAME) on loopback,
    started by the tests' launcher; logging at "warn" (plus the access log the pull figures
    read), so that the registry's own logging weighs on neither barge nor skopeo."""
    from registries import start_registry

    workdir = OUT / "work" / f"registry-{name}"
    shutil.rmtree(workdir, ignore_errors=True)
    running = start_registry(
        workdir, extra={"log": {"level": "warn", "accesslog": {"disabled": False}}}
    )
    reg = Registry(running.host, workdir, running.log_path, running.process)
    try:
        yield reg
    finally:
        reg.stop()
        running.process = None
        if not keep:
            shutil.rmtree(workdir / "storage", ignore_errors=True)


def get_json(url: str, accept: str | None = None) -> Any:
    req = urllib.request.Request(url)
    if accept:
        req.add_header("Accept", accept)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def manifest(reg: Registry, repo: str, ref: str) -> Any:
    return get_json(
        f"{reg.url}/v2/{repo}/manifests/{ref}",
        "application/vnd.oci.image.manifest.v1+json",
    )


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
