"""Fixtures of the reliability suite (``tests/test_soak.py``; ``make soak`` runs it in full).

* **Scale.** ``BARGE_SOAK=full`` (``make soak``): a 1 GiB image pushed and pulled 20 times
  each through the fault proxy, 10 kill points per operation, several concurrency rounds.
  Anything else (``make test``): the same tests on small images, a few of each.
* **Seed.** ``BARGE_SOAK_SEED=N`` replays a run; without it every session draws one. It is
  printed in the pytest header and in the summary, and every failure message names it. Each
  test derives its own generator from the seed and its name (:func:`rng`), so one test re-run
  alone with the same seed sees the same disks, faults and kill points. Faults are keyed by
  the request (method, path, range) and its ordinal, not by arrival order, so what threads
  interleave does not move them.
* **Tally.** Every run, fault, kill and outcome is counted in :data:`TALLY`, printed by the
  terminal summary hook in ``conftest.py``.

Everything here runs real parts: ``docker-registry`` on loopback, :class:`FaultProxy` in front
of it, and ``python -m barge`` in child processes for the operations under test (so a kill
is a real SIGKILL of a real barge process). Checks read the store independently of barge
where they can: :func:`content_digest` reads disks itself, :func:`integrity_check` opens the
catalog with sqlite3.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from barge.cli import main
from faultproxy import FaultProxy, FaultRule
from registries import RunningRegistry, start_registry

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# -- scale and seed ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    name: str
    image_size: int  # the image pushed and pulled through the fault schedule
    image_chunk: int  # its --chunk-size
    rounds: int  # pushes and pulls of it through the fault schedule (each)
    kill_image_size: int  # the image of the kill tests
    kill_chunk: int  # its chunk size (its frames: KILL_FRAME): "one chunk" of the budget
    kill_points: int  # per operation
    prune_images: int  # cached images in the store a killed prune works on
    race_image_size: int  # the images of the concurrency and GC-race tests
    concurrent_rounds: int  # rounds of many processes on one store
    concurrent_procs: int  # processes at once in each
    base_prunes: int  # incremental pulls raced by prunes
    fault_rate: float  # probability that a request meets a fault
    stall_seconds: float  # how long a stall holds (the client's stall timeout: STALL_TIMEOUT)
    retry_after: int  # the longest Retry-After a 429 asks for, in seconds
    op_timeout: float  # seconds any one barge command may take before it counts as hung


SHORT = Scale(
    name="short",
    image_size=32 * MiB,
    image_chunk=8 * MiB,
    rounds=2,
    kill_image_size=32 * MiB,
    kill_chunk=8 * MiB,
    kill_points=1,
    prune_images=3,
    race_image_size=16 * MiB,
    concurrent_rounds=1,
    concurrent_procs=6,
    base_prunes=1,
    fault_rate=0.12,
    stall_seconds=2.0,
    retry_after=1,
    op_timeout=240.0,
)
FULL = Scale(
    name="full",
    image_size=1 * GiB,
    image_chunk=64 * MiB,
    rounds=20,
    kill_image_size=256 * MiB,
    kill_chunk=16 * MiB,
    kill_points=10,
    prune_images=8,
    race_image_size=128 * MiB,
    concurrent_rounds=3,
    concurrent_procs=10,
    base_prunes=5,
    fault_rate=0.1,
    stall_seconds=4.0,
    retry_after=2,
    op_timeout=900.0,
)
#: the frame size of the image the kill tests pull and copy: a killed pull loses at most the
#: frame each worker was receiving, so a chunk of several frames is what the re-fetch budget
#: can tell apart from "started over"
KILL_FRAME = 1 * MiB
#: the stall timeout the barge under test runs with (``BARGE_STALL_TIMEOUT``), in seconds
STALL_TIMEOUT = 1.5
SCALE = FULL if os.environ.get("BARGE_SOAK", "").strip().lower() == "full" else SHORT


def _session_seed() -> int:
    raw = os.environ.get("BARGE_SOAK_SEED", "").strip()
    return int(raw, 0) if raw else secrets.randbits(32)


SEED = _session_seed()


def rng(name: str) -> random.Random:
    """The generator of one test (or one part of it): the session seed and a name."""
    return random.Random(f"{SEED}:{name}")


def replay_hint() -> str:
    return f"BARGE_SOAK_SEED={SEED} BARGE_SOAK={SCALE.name}"


# -- the tally -----------------------------------------------------------------------------------


class Tally:
    """What the suite did, for the summary: counters by section, and wall times by test."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, Counter[str]] = {}
        self.seconds: dict[str, float] = {}
        self.figures: dict[str, str] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, section: str, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts.setdefault(section, Counter())[key] += n

    def merge(self, section: str, counts: Counter[str] | dict[str, int]) -> None:
        for k, v in counts.items():
            self.add(section, k, v)

    def time(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def figure(self, name: str, text: str) -> None:
        with self._lock:
            self.figures[name] = text

    def example(self, key: str, text: str, keep: int = 3) -> None:
        """Keep up to ``keep`` distinct texts under ``key`` (what clean errors said)."""
        with self._lock:
            seen = self.examples.setdefault(key, [])
            if text not in seen and len(seen) < keep:
                seen.append(text)

    def summary(self) -> list[str]:
        if not self.counts and not self.seconds:
            return []
        lines = [f"seed {SEED}, scale {SCALE.name} (replay: {replay_hint()})"]
        for section in sorted(self.counts):
            c = self.counts[section]
            parts = ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
            lines.append(f"{section}: {parts}")
        for name, text in sorted(self.figures.items()):
            lines.append(f"{name}: {text}")
        for key, texts in sorted(self.examples.items()):
            lines += [f"{key}: {t}" for t in texts]
        total = sum(self.seconds.values())
        for name, secs in sorted(self.seconds.items()):
            lines.append(f"wall time {name}: {secs:.1f} s")
        lines.append(f"wall time, all soak tests: {total:.1f} s")
        return lines


TALLY = Tally()


@contextlib.contextmanager
def timed(name: str) -> Iterator[None]:
    t0 = time.monotonic()
    try:
        yield
    finally:
        TALLY.time(name, time.monotonic() - t0)


# -- disks ---------------------------------------------------------------------------------------


def _keystream(r: random.Random) -> Callable[[int], bytes]:
    """Fast seeded pseudo-random bytes (AES-CTR): ``random.randbytes`` makes ~50 MB/s."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.AES(r.randbytes(16)), modes.CTR(r.randbytes(16))).encryptor()
    return lambda n: enc.update(bytes(n))


_WORDS = (
    b"barge chunk frame index layer manifest registry disk sparse verify lease prune "
    b"offset digest stream upload resume kernel config tag blob cache clone copy"
).split()


#: how much of a disk :func:`make_disk` gives each kind of content, by default
MIX = {"random": 35, "text": 25, "zeros": 15, "hole": 25}


def make_disk(
    path: Path, size: int, r: random.Random, mix: dict[str, int] | None = None
) -> Counter[str]:
    """Write a seeded disk of ``size`` bytes: runs of random data, compressible text, written
    zeros (allocated: they become holes on pull) and holes, of lengths from 512 bytes to a
    few percent of the disk, at 512-byte (not frame- or block-) aligned boundaries, so frames
    mix every kind. Returns the bytes written per kind."""
    noise = _keystream(r)
    template = b" ".join(r.choice(_WORDS) for _ in range(12000))[: 64 * KiB]
    avg = max(64 * KiB, size // 40)
    kinds = Counter[str]()
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            small = r.random() < 0.2
            n = min(512 * r.randint(1, 128 if small else 2 * avg // 512), size - pos)
            weights = mix or MIX
            kind = r.choices(list(weights), weights=list(weights.values()))[0]
            kinds[kind] += n
            if kind != "hole":
                f.seek(pos)
                left = n
                while left:
                    piece = min(left, 8 * MiB)
                    if kind == "random":
                        f.write(noise(piece))
                    elif kind == "zeros":
                        f.write(bytes(piece))
                    else:  # text, stamped with its offset so no two frames are equal
                        stamp = b"@%d " % (pos + n - left)
                        reps = piece // len(template) + 1
                        f.write((stamp + template * reps)[:piece])
                    left -= piece
            pos += n
        f.seek(size - 777)  # data up to the very last byte, at an odd offset
        f.write(noise(777))
    return kinds


def content_digest(path: Path) -> str:
    """A digest of a file's bytes that reads only its data extents (its own SEEK_DATA walk,
    not barge's): equal for two files exactly when their bytes are equal, however sparse."""
    h = hashlib.sha256()
    block = 1 * MiB
    zero = hashlib.sha256(bytes(block)).digest()
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        h.update(b"%d:" % size)
        off = 0
        while off < size:
            n = min(block, size - off)
            try:
                nxt = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole follows
                nxt = size
            if nxt >= off + n:  # the block is a hole
                h.update(zero if n == block else hashlib.sha256(bytes(n)).digest())
            else:
                h.update(hashlib.sha256(os.pread(fd, n, off)).digest())
            off += n
    return h.hexdigest()


# -- the CLI in child processes ------------------------------------------------------------------

#: exit codes that are a clean refusal or failure (barge.errors.ExitCode), not a bug
CLEAN_CODES = {2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 130}


@dataclass
class Run:
    args: tuple[str, ...]
    code: int
    out: str
    err: str
    seconds: float
    killed: bool = False

    def brief(self) -> str:
        tail = self.err.strip().splitlines()[-3:]
        return f"barge {' '.join(self.args)} -> {self.code} after {self.seconds:.1f}s: {tail}"

    def problems(self) -> list[str]:
        """Why this run is neither a success nor a clean error (empty when it is one)."""
        out: list[str] = []
        text = self.out + self.err
        if "Traceback" in text:
            out.append("a traceback reached the user")
        if "internal error" in text:
            out.append("an internal error")
        if self.code == 0 or self.killed:
            return out
        if self.code not in CLEAN_CODES:
            out.append(f"exit code {self.code} is not a specific barge error")
        errors = [ln for ln in self.err.splitlines() if ln.startswith("barge: error:")]
        if len(errors) != 1:
            out.append(f"{len(errors)} error lines, not one")
        return out


class Barge:
    """``python -m barge`` with its own ``BARGE_HOME`` (and no ambient credentials)."""

    def __init__(self, home: Path, *, extra_env: dict[str, str] | None = None) -> None:
        self.home = home
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("BARGE_", "TART_")) and k != "DOCKER_CONFIG"
        }
        env.update(
            BARGE_HOME=str(home),
            DOCKER_CONFIG=str(home.parent / f"{home.name}.docker"),
            # a stall costs seconds, not the default half-minute per attempt
            BARGE_STALL_TIMEOUT=str(STALL_TIMEOUT),
            BARGE_CONNECT_TIMEOUT="5",
        )
        env.update(extra_env or {})
        self.env = env

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "barge", *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(self, *args: str, timeout: float | None = None) -> Run:
        t0 = time.monotonic()
        proc = self.start(*args)
        try:
            out, err = proc.communicate(timeout=timeout or SCALE.op_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(30)
            raise AssertionError(
                f"barge {' '.join(args)} hung for {timeout or SCALE.op_timeout:.0f}s "
                f"({replay_hint()}); stderr: {err[-2000:]}"
            ) from None
        return Run(args, proc.returncode, out, err, time.monotonic() - t0)

    def ok(self, *args: str, timeout: float | None = None) -> Run:
        res = self.run(*args, timeout=timeout)
        assert res.code == 0 and not res.problems(), f"{res.brief()} ({replay_hint()})"
        return res

    def inproc(self, *args: str) -> tuple[int, str, str]:
        """A quick read-only command (list, verify) in this process: no interpreter start."""
        runner = CliRunner(
            env={"BARGE_HOME": str(self.home), "DOCKER_CONFIG": self.env["DOCKER_CONFIG"]}
        )
        res = runner.invoke(main, list(args), catch_exceptions=False)
        return res.exit_code, res.stdout, res.stderr

    def check(self, *args: str) -> str:
        """:meth:`inproc`, which must succeed; its stdout."""
        code, out, err = self.inproc(*args)
        assert code == 0, f"barge {' '.join(args)} -> {code}: {out}{err} ({replay_hint()})"
        return out

    def listed(self) -> list[dict[str, Any]]:
        code, out, err = self.inproc("list", "--format", "json")
        assert code == 0, (code, err)
        rows: list[dict[str, Any]] = json.loads(out)
        return rows


def run_killed(
    barge: Barge,
    args: tuple[str, ...],
    *,
    delay: float | None = None,
    progress: Callable[[], int] | None = None,
    at_bytes: int | None = None,
) -> Run:
    """Run ``barge ARGS`` and SIGKILL it after ``delay`` seconds or once ``progress()`` (bytes
    the proxy has seen) reaches ``at_bytes``, whichever is set; ``killed`` says whether the
    kill landed before the command ended by itself."""
    t0 = time.monotonic()
    proc = barge.start(*args)
    killed = False
    try:
        while proc.poll() is None:
            now = time.monotonic() - t0
            due = (delay is not None and now >= delay) or (
                progress is not None and at_bytes is not None and progress() >= at_bytes
            )
            if due:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            if now > SCALE.op_timeout:
                proc.kill()
                raise AssertionError(f"barge {' '.join(args)} hung ({replay_hint()})")
            time.sleep(0.002)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    killed = killed and proc.returncode == -signal.SIGKILL
    return Run(args, proc.returncode, out, err, time.monotonic() - t0, killed=killed)


# -- checks of a store ---------------------------------------------------------------------------


def integrity_check(home: Path) -> str:
    """``PRAGMA integrity_check`` of a store's catalog, read-only, with sqlite3 itself."""
    db = home / "catalog.db"
    if not db.exists():
        return "ok"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()
    return "; ".join(str(r[0]) for r in rows)


def check_listed(barge: Barge, sources: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Everything ``barge list`` shows is whole: every cached image passes ``verify --deep``,
    every VM's config and disks are there (``verify``), and (``sources``: listed name ->
    expected :func:`content_digest` of its disk) has the bytes it should."""
    rows = barge.listed()
    for row in rows:
        name = str(row.get("reference") or row["name"])
        code, out, err = barge.inproc("verify", "--deep", "-q", name)
        assert code == 0, f"listed {name!r} fails verify --deep: {out}{err} ({replay_hint()})"
        if sources and name in sources:
            disk = listed_disk(barge, row)
            assert content_digest(disk) == sources[name], f"{name}: wrong bytes ({replay_hint()})"
    return rows


def listed_disk(barge: Barge, row: dict[str, Any]) -> Path:
    if row["source"] == "local":
        return barge.home / "vms" / str(row["name"]) / "disk.img"
    return barge.home / "cache" / str(row["digest"]).removeprefix("sha256:") / "disk.img"


def check_store(barge: Barge, sources: dict[str, str] | None = None) -> list[dict[str, Any]]:
    ic = integrity_check(barge.home)
    assert ic == "ok", f"catalog integrity_check: {ic} ({replay_hint()})"
    return check_listed(barge, sources)


# -- registries ----------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_registry(workdir: Path) -> Iterator[RunningRegistry]:
    """A registry of its own (empty storage), stopped and its storage removed afterwards."""
    reg = start_registry(workdir)
    try:
        yield reg
    finally:
        reg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def manifest_of(reg: RunningRegistry, repo: str, ref: str) -> dict[str, Any] | None:
    req = urllib.request.Request(
        f"{reg.url}/v2/{repo}/manifests/{ref}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            doc: dict[str, Any] = json.loads(r.read())
            return doc
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def blob_bytes(manifest: dict[str, Any]) -> int:
    """Bytes of every blob an image names (config and layers)."""
    return sum(int(d["size"]) for d in [manifest["config"], *manifest.get("layers", [])])


def largest_layer(manifest: dict[str, Any]) -> int:
    return max((int(d["size"]) for d in manifest.get("layers", [])), default=0)


def metadata_blobs(manifest: dict[str, Any]) -> int:
    """Bytes of the image's blobs that are not disk chunks (the OCI config, the VM config,
    the frame index, extra files): a re-run reads them again by design."""
    descs = [manifest["config"], *manifest.get("layers", [])]
    return sum(int(d["size"]) for d in descs if ".disk.chunk." not in str(d["mediaType"]))


# -- the fault schedule --------------------------------------------------------------------------

_UPLOAD_SESSION = re.compile(r"(/blobs/uploads/)[^/]+$")


@dataclass
class FaultSchedule:
    """Which requests meet which fault: a seeded function of the request (method, path with
    upload session ids blanked, Range) and of how many such requests came before it, so the
    schedule does not depend on how threads interleave.

    Kinds: ``reset`` (RST before forwarding), ``lost-answer`` (forwarded, the registry acted,
    RST instead of its answer), ``5xx`` (500/502/503 without forwarding), ``429`` (with a
    ``Retry-After`` of 0 to :attr:`Scale.retry_after` s), ``cut-request`` (RST after part of
    a request body), ``truncate`` (an answer body cut part-way), and three stalls, each longer
    than the client's stall timeout: ``stall`` (an answer body that stops part-way), ``deaf``
    (a request body nobody reads), ``silent`` (a request read, never answered). A stall goes
    to requests it can happen to (a body to stop or leave unread), ``silent`` to the rest."""

    seed: int
    rate: float
    stall_seconds: float = SCALE.stall_seconds
    kinds: tuple[str, ...] = (
        "reset",
        "lost-answer",
        "5xx",
        "429",
        "cut-request",
        "truncate",
        "stall",
    )
    injected: Counter[str] = field(default_factory=Counter)
    _seen: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def decide(self, method: str, path: str, headers: dict[str, str]) -> FaultRule | None:
        """The rule that injects this request's fault, if it meets one."""
        hdr = {k.lower(): v for k, v in headers.items()}
        where = _UPLOAD_SESSION.sub(r"\1*", path)
        key = f"{method} {where} {hdr.get('range', '')}"
        with self._lock:
            n = self._seen[key]
            self._seen[key] += 1
        r = random.Random(f"{self.seed}:{key}:{n}")
        if r.random() >= self.rate:
            return None
        length = int(hdr.get("content-length", "0") or 0)
        has_body = length > 0 or "chunked" in hdr.get("transfer-encoding", "").lower()
        answers_body = method == "GET"
        kinds = [
            k
            for k in self.kinds
            if (k != "cut-request" or has_body) and (k != "truncate" or answers_body)
        ]
        kind = r.choice(kinds)
        if kind == "stall" and not answers_body:
            kind = "deaf" if has_body else "silent"
        hold = self.stall_seconds
        if kind == "reset":
            rule = FaultRule(action="reset")
        elif kind == "lost-answer":
            rule = FaultRule(action="reset", forward=True)
        elif kind == "5xx":
            rule = FaultRule(action="status", status=r.choice([500, 502, 503]))
        elif kind == "429":
            rule = FaultRule(
                action="status",
                status=429,
                headers={"Retry-After": str(r.randint(0, SCALE.retry_after))},
            )
        elif kind == "cut-request":
            cut = r.randrange(length) if length else r.randrange(4 * MiB)
            rule = FaultRule(action="reset", after_request_bytes=cut)
        elif kind == "truncate":
            rule = FaultRule(action="truncate", keep=r.randrange(2 * MiB))
        elif kind == "stall":
            rule = FaultRule(action="stall", keep=r.randrange(2 * MiB), hold=hold)
        else:  # "deaf" or "silent"
            rule = FaultRule(action=kind, hold=hold)
        with self._lock:
            self.injected[kind] += 1
        return rule


class _Bucket:
    """A rate shared by every connection of a proxy: ``take(n)`` waits until ``n`` more bytes
    fit in ``rate`` bytes per second."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.due = time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        with self.lock:
            self.due = max(self.due, time.monotonic()) + n / self.rate
            wait = self.due - time.monotonic()
        if wait > 0:
            time.sleep(wait)


class _PacedWriter:
    """A handler's ``wfile`` whose writes go out in small pieces, each paid for in a bucket."""

    PIECE = 64 * KiB

    def __init__(self, raw: Any, bucket: _Bucket) -> None:
        self.raw = raw
        self.bucket = bucket

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        for i in range(0, len(view), self.PIECE):
            piece = view[i : i + self.PIECE]
            self.bucket.take(len(piece))
            self.raw.write(piece)
        return len(view)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


class ScheduledProxy(FaultProxy):
    """A :class:`FaultProxy` whose faults come from a :class:`FaultSchedule` (and, as for any
    FaultProxy, from rules added by hand, which win). ``pause`` delays every matching request
    (method, path regex, seconds) so a kill by time lands mid-transfer.

    ``pace``: answers are sent at most that many bytes per second (all connections together),
    slower than barge takes them in, so that what the proxy counts as sent is what barge has
    received, not megabytes waiting in socket buffers (the kill tests measure re-fetching in
    what the proxy counted).
    """

    def __init__(
        self,
        upstream: RunningRegistry,
        schedule: FaultSchedule | None,
        *,
        pace: float | None = None,
    ) -> None:
        super().__init__(upstream)
        # a client killed or giving up mid-request is the point here, not news
        self._server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        self.schedule = schedule
        self.bucket = _Bucket(pace) if pace else None
        self.pauses: list[tuple[str, re.Pattern[str], float]] = []

    def _handle(self, h: Any) -> None:
        if self.bucket is not None and not isinstance(h.wfile, _PacedWriter):
            # and little waits in this end's send buffer either
            with contextlib.suppress(OSError):
                h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 128 * KiB)
            h.wfile = _PacedWriter(h.wfile, self.bucket)
        super()._handle(h)

    def pause(self, method: str, path: str, seconds: float) -> None:
        self.pauses.append((method, re.compile(path), seconds))

    def _pick(self, method: str, path: str, headers: dict[str, str]) -> FaultRule | None:
        for m, rx, secs in self.pauses:
            if m in ("*", method) and rx.search(path):
                time.sleep(secs)
        rule = super()._pick(method, path, headers)
        if rule is not None or self.schedule is None:
            return rule
        return self.schedule.decide(method, path, headers)


# -- images --------------------------------------------------------------------------------------


@dataclass
class SourceVM:
    """A local VM in ``barge.home`` whose disk :func:`make_disk` wrote."""

    barge: Barge
    name: str
    disk: Path
    digest: str  # content_digest of the disk
    kinds: Counter[str]


def make_vm(
    barge: Barge, name: str, size: int, r: random.Random, mix: dict[str, int] | None = None
) -> SourceVM:
    barge.check("create", name, "--disk-size", f"{size}B")  # bytes: a bare number is GB
    disk = barge.home / "vms" / name / "disk.img"
    kinds = make_disk(disk, size, r, mix)
    return SourceVM(barge, name, disk, content_digest(disk), kinds)


def push_inproc(barge: Barge, vm: str, ref: str, *, chunk: int, frame: int) -> str:
    """Push a VM with the library (set-up, not under test: any frame size); its digest."""
    from barge.store import Store
    from barge.transfer.push import PushOptions, push

    store = Store(barge.home)
    try:
        res = push(store, vm, [ref], PushOptions(chunk_size=chunk, frame_size=frame))
    finally:
        store.close()
    return res.digest


# -- running commands the way the tests do ------------------------------------------------

#: runs of one command after a clean error before the suite calls it stuck
ATTEMPTS = 4


def outcome(op: str, res: Run) -> bool:
    """Count one run; fail the test unless it is a success or a clean error."""
    TALLY.add("runs", op)
    problems = res.problems()
    assert not problems, f"{res.brief()}: {'; '.join(problems)} ({replay_hint()})"
    if res.code == 0:
        return True
    TALLY.add("clean errors", f"{op} exit {res.code}")
    said = next((ln for ln in res.err.splitlines() if ln.startswith("barge: error:")), "")
    TALLY.example(f"clean error ({op})", said[:300])
    return False


def until_done(op: str, run: Callable[[], Run], after_error: Callable[[], None]) -> Run:
    """Run ``op`` until it succeeds; after each clean error check the store (``after_error``)."""
    for _ in range(ATTEMPTS):
        res = run()
        if outcome(op, res):
            return res
        after_error()
    raise AssertionError(f"{op} failed {ATTEMPTS} times in a row: {res.brief()} ({replay_hint()})")


def all_at_once(store: Barge, cmds: list[tuple[str, ...]], r: random.Random) -> list[Run]:
    """Run every command of ``cmds`` in its own process on ``store``, each started after a
    seeded delay of up to a second; their runs, in order."""
    delays = [r.uniform(0, 1.0) for _ in cmds]
    results: list[Run | None] = [None] * len(cmds)

    def one(k: int) -> None:
        time.sleep(delays[k])
        results[k] = store.run(*cmds[k])

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(cmds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SCALE.op_timeout + 60)
    assert all(res is not None for res in results), "a command never returned"
    return [res for res in results if res is not None]


def run_under_prunes(home: Barge, args: tuple[str, ...]) -> tuple[Run, int]:
    """Run ``barge ARGS`` (an incremental pull or clone); once it says which base it uses,
    prune to a one-byte budget over and over (``barge prune`` processes, and GC from this
    process in a loop between them) until it ends. Returns its run and the prunes made."""
    t0 = time.monotonic()
    proc = home.start(*args)
    assert proc.stderr is not None
    lines: list[str] = []
    based = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "as a base" in line:
                based.set()
        based.set()  # the command ended without one: nothing to race

    reader = threading.Thread(target=read)
    reader.start()
    based.wait(SCALE.op_timeout)
    prunes = 0
    stop = threading.Event()

    def gc_loop() -> None:
        from barge.store import Store

        while not stop.is_set():
            store = Store(home.home)
            try:
                store.gc(space_budget=1)
            finally:
                store.close()
            time.sleep(0.01)

    looping = threading.Thread(target=gc_loop)
    looping.start()
    try:
        while proc.poll() is None:
            p = home.run("prune", "--space-budget", "1")
            assert not p.problems() and p.code == 0, p.brief()
            prunes += 1
    finally:
        stop.set()
        looping.join(60)
    out = proc.stdout.read() if proc.stdout is not None else ""
    proc.wait(60)
    reader.join(60)
    return Run(args, proc.returncode, out, "".join(lines), time.monotonic() - t0), prunes
