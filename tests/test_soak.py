"""The reliability suite: faults, kills, concurrency and GC races, seeded and bounded.

``make test`` runs it on small images (a few runs of each kind); ``make soak`` runs it in full
(``BARGE_SOAK=full``: a 1 GiB image, 20 pushes and 20 pulls through the fault schedule, 10
kills per operation). The seed is printed in the pytest header and the summary; replay a run
with ``BARGE_SOAK_SEED=N`` (see tests/soakfixtures.py for what is seeded and how).

What every test holds barge to:

* a command ends in success with the right bytes, or in a clean error: a specific exit code,
  one ``barge: error:`` line, no traceback, no internal error;
* nothing partial is ever listed: everything ``barge list`` shows passes ``verify --deep``
  (and, for what the test knows the source of, has the source's bytes), and the catalog
  passes ``PRAGMA integrity_check``;
* the run after a failure or a SIGKILL completes, and re-transfers at most one chunk's worth
  of what the killed run had already moved (bytes counted at the proxy).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from registries import RunningRegistry, start_registry
from soakfixtures import (
    KILL_FRAME,
    SCALE,
    TALLY,
    Barge,
    FaultSchedule,
    MiB,
    Run,
    ScheduledProxy,
    SourceVM,
    all_at_once,
    blob_bytes,
    check_store,
    content_digest,
    fresh_registry,
    integrity_check,
    largest_layer,
    make_vm,
    manifest_of,
    metadata_blobs,
    outcome,
    push_inproc,
    replay_hint,
    rng,
    run_killed,
    run_under_prunes,
    timed,
    until_done,
)

pytestmark = pytest.mark.timeout(7200 if SCALE.name == "full" else 600)

#: bytes per second the kill tests' proxy sends answers at, all connections together
PACE = 30e6


# -- 1. pushes and pulls through the fault schedule ------------------------------------------------


def test_pushes_and_pulls_through_the_fault_schedule(tmp_path: Path) -> None:
    """Each round: a registry of its own behind the fault schedule; push the image through it
    (re-run after a clean error), pull it into an empty store (the same), compare bytes."""
    r = rng("faults")
    started = time.monotonic()
    with timed("pushes and pulls through faults"):
        src = Barge(tmp_path / "src")
        vm = make_vm(src, "vm", SCALE.image_size, r)
        TALLY.figure(
            "fault-schedule image",
            f"{SCALE.image_size // MiB} MiB: "
            + ", ".join(f"{k} {v // MiB} MiB" for k, v in sorted(vm.kinds.items())),
        )
        schedule = FaultSchedule(seed=r.randrange(1 << 32), rate=SCALE.fault_rate)
        digests: set[str] = set()
        done = 0
        try:
            for i in range(SCALE.rounds):
                with fresh_registry(tmp_path / f"reg{i}") as reg:
                    proxy = ScheduledProxy(reg, schedule)
                    try:
                        digests.add(_push_round(src, reg, proxy, i))
                        # the same VM always makes the same manifest, faults or not
                        assert len(digests) == 1, (digests, replay_hint())
                        _pull_round(tmp_path / f"dst{i}", reg, proxy, i, vm)
                        # what was pushed, pulled into an empty store, is the source's bytes
                        TALLY.add("outcomes", "push identical")
                        done += 1
                    finally:
                        proxy.stop()
        finally:
            TALLY.merge("faults injected", schedule.injected)
            TALLY.figure(
                "fault schedule",
                f"{done} of {SCALE.rounds} rounds (a push, then a pull into an empty store) of "
                f"{SCALE.image_size // MiB} MiB in {time.monotonic() - started:.1f} s, "
                f"{sum(schedule.injected.values())} faults injected",
            )


def _push_round(src: Barge, reg: RunningRegistry, proxy: ScheduledProxy, i: int) -> str:
    ref = f"{proxy.host}/soak/vm:r{i}"

    def after_error() -> None:  # the tag, if the registry has it, names a whole image
        if manifest_of(reg, "soak/vm", f"r{i}") is not None:
            src.check("verify", "--remote", f"{reg.host}/soak/vm:r{i}")

    res = until_done(
        "push",
        lambda: src.run(
            "push", "vm", ref, "--chunk-size", str(SCALE.image_chunk), "-q", "--format", "json"
        ),
        after_error,
    )
    return str(json.loads(res.out)["digest"])


def _pull_round(
    home: Path, reg: RunningRegistry, proxy: ScheduledProxy, i: int, vm: SourceVM
) -> None:
    dst = Barge(home)
    ref = f"{proxy.host}/soak/vm:r{i}"

    def after_error() -> None:
        assert check_store(dst) == [], f"a failed pull left an image listed ({replay_hint()})"

    until_done("pull", lambda: dst.run("pull", ref, "-q"), after_error)
    rows = check_store(dst)
    assert len(rows) == 1, rows
    got = content_digest(
        home / "cache" / str(rows[0]["digest"]).removeprefix("sha256:") / "disk.img"
    )
    assert got == vm.digest, f"pull {i}: the disk differs from the source ({replay_hint()})"
    TALLY.add("outcomes", "pull identical")
    shutil.rmtree(home, ignore_errors=True)


# -- 2. SIGKILL at seeded points, then the re-run --------------------------------------------------


@dataclass
class KillWorld:
    """What the kill tests share: a source VM, a registry holding it, and its manifest."""

    root: Path
    src: Barge
    vm: SourceVM
    registry: RunningRegistry
    ref: str  # registry.host/kill/vm:v1
    digest: str
    manifest: dict[str, Any]


@pytest.fixture(scope="module")
def kill_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KillWorld]:
    root = tmp_path_factory.mktemp("kill")
    src = Barge(root / "src")
    # mostly data that does not compress: a chunk's worth at the proxy is then well above
    # what a kill can lose besides (the frame each worker was receiving, socket buffers)
    mix = {"random": 70, "text": 10, "zeros": 10, "hole": 10}
    vm = make_vm(src, "vm", SCALE.kill_image_size, rng("kill-image"), mix)
    reg = start_registry(root / "registry")
    try:
        ref = f"{reg.host}/kill/vm:v1"
        digest = push_inproc(src, "vm", ref, chunk=SCALE.kill_chunk, frame=KILL_FRAME)
        manifest = manifest_of(reg, "kill/vm", "v1")
        assert manifest is not None
        yield KillWorld(root, src, vm, reg, ref, digest, manifest)
    finally:
        reg.stop()


class KillCase:
    """One operation under SIGKILL. ``prepare(i)`` sets up kill point ``i`` and returns the
    command; ``progress()`` counts the bytes it moved at the proxy (unless ``by_bytes`` is
    False: then it is killed by time only);
    ``after_kill()`` checks what the kill left; ``rerun()`` completes the work; ``final()``
    checks the result."""

    op = ""
    by_bytes = True
    workers = 2  # transfers the command runs at once (its default --concurrency)

    def known_overrun(self) -> str | None:
        """Why this kill point cannot meet the one-chunk budget today, if it is known: it is
        then held to one chunk per worker, and the test ends as an expected failure."""
        return None

    def __init__(self, world: KillWorld, workdir: Path) -> None:
        self.w = world
        self.dir = workdir
        self.proxy: ScheduledProxy | None = None
        self.dest_registry: RunningRegistry | None = None
        self.expected: str | None = None  # the digest the command's result must have
        self.template: Path | None = None  # a store prepared once, copied for each point
        self.chunk_bytes = largest_layer(world.manifest)  # one chunk's worth, at the proxy
        self.rereads = metadata_blobs(world.manifest)  # what a re-run moves again by design
        self.total = blob_bytes(world.manifest)

    def total_bytes(self) -> int:
        """What a whole run moves at the proxy: every blob of the image once."""
        return self.total

    def progress(self) -> int:
        raise NotImplementedError

    def prepare(self, i: int) -> tuple[Barge, tuple[str, ...]]:
        raise NotImplementedError

    def after_kill(self, barge: Barge) -> None:
        check_store(barge, self.sources())

    def sources(self) -> dict[str, str]:
        return {}

    def rerun(self, barge: Barge, args: tuple[str, ...]) -> Run:
        return barge.run(*args)

    def final(self, barge: Barge, res: Run) -> None:
        check_store(barge, self.sources())

    def cleanup(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        if self.dest_registry is not None:
            self.dest_registry.stop()
            self.dest_registry = None

    def _proxy(self, reg: RunningRegistry) -> ScheduledProxy:
        self.proxy = ScheduledProxy(reg, None, pace=PACE)
        return self.proxy


class PushKill(KillCase):
    op = "push"

    def known_overrun(self) -> str | None:
        return (
            "a chunk is streamed in one PATCH, and one the kill cut short leaves a session no "
            "later run can continue (docker-registry voids it: the offset signed into its "
            "Location no longer matches), so a killed push sends every chunk it had in flight "
            "again"
        )

    def prepare(self, i: int) -> tuple[Barge, tuple[str, ...]]:
        self.dest_registry = start_registry(self.dir / f"reg{i}")
        proxy = self._proxy(self.dest_registry)
        self.tag = f"p{i}"
        ref = f"{proxy.host}/kill/vm:{self.tag}"
        return self.w.src, (
            "push",
            "vm",
            ref,
            "--chunk-size",
            str(SCALE.kill_chunk),
            "-q",
            "--format",
            "json",
        )

    def progress(self) -> int:
        assert self.proxy is not None
        return self.proxy.request_bytes("*", r"/blobs/uploads/")

    def after_kill(self, barge: Barge) -> None:
        super().after_kill(barge)
        assert self.dest_registry is not None
        if manifest_of(self.dest_registry, "kill/vm", self.tag) is not None:
            barge.check(
                "verify", "--remote", "--deep", f"{self.dest_registry.host}/kill/vm:{self.tag}"
            )

    def final(self, barge: Barge, res: Run) -> None:
        super().final(barge, res)
        assert self.dest_registry is not None
        digest = json.loads(res.out)["digest"]
        if self.expected is None:  # the first push: every other one makes this digest
            self.expected = digest
            manifest = manifest_of(self.dest_registry, "kill/vm", self.tag)
            assert manifest is not None
            self.chunk_bytes, self.rereads = largest_layer(manifest), metadata_blobs(manifest)
            self.total = blob_bytes(manifest)
        assert digest == self.expected, replay_hint()
        barge.check("verify", "--remote", "--deep", f"{self.dest_registry.host}/kill/vm:{self.tag}")


class PullKill(KillCase):
    op = "pull"

    def prepare(self, i: int) -> tuple[Barge, tuple[str, ...]]:
        proxy = self._proxy(self.w.registry)
        self.home = Barge(self.dir / f"home{i}")
        return self.home, ("pull", f"{proxy.host}/kill/vm:v1", "-q")

    def progress(self) -> int:
        assert self.proxy is not None
        return self.proxy.response_bytes("GET", r"/blobs/sha256:")

    def sources(self) -> dict[str, str]:
        assert self.proxy is not None
        return {f"{self.proxy.host}/kill/vm:v1": self.w.vm.digest}

    def final(self, barge: Barge, res: Run) -> None:
        rows = check_store(barge, self.sources())
        assert len(rows) == 1, rows


class CloneKill(PullKill):
    op = "clone"

    def prepare(self, i: int) -> tuple[Barge, tuple[str, ...]]:
        barge, _args = super().prepare(i)
        assert self.proxy is not None
        return barge, ("clone", f"{self.proxy.host}/kill/vm:v1", "copy", "-q")

    def sources(self) -> dict[str, str]:
        return {**super().sources(), "copy": self.w.vm.digest}

    def rerun(self, barge: Barge, args: tuple[str, ...]) -> Run:
        if any(r["name"] == "copy" for r in barge.listed()):
            return Run(args, 0, "", "", 0.0)  # the kill came after the clone was in place
        return barge.run(*args)

    def final(self, barge: Barge, res: Run) -> None:
        rows = check_store(barge, self.sources())
        assert any(r["name"] == "copy" and r["source"] == "local" for r in rows), rows


class CopyKill(KillCase):
    """registry -> registry or registry -> OCI layout (seeded), the source behind the proxy."""

    op = "copy"
    workers = 4

    def known_overrun(self) -> str | None:
        if self.dest_registry is None:
            return None
        return (
            "copy uploads a blob to a registry in one PUT, which no later run can continue: "
            "a killed copy sends every blob it had in flight again"
        )

    def prepare(self, i: int) -> tuple[Barge, tuple[str, ...]]:
        proxy = self._proxy(self.w.registry)
        self.home = Barge(self.dir / f"home{i}")
        if (i + rng("copy-dest").randrange(2)) % 2:  # both kinds, whatever the seed
            self.dest_registry = start_registry(self.dir / f"reg{i}")
            self.dest = f"{self.dest_registry.host}/copied/vm:v1"
        else:
            self.dest = f"oci:{self.dir / f'layout{i}'}:v1"
        return self.home, ("copy", f"{proxy.host}/kill/vm:v1", self.dest, "-q")

    def progress(self) -> int:
        assert self.proxy is not None
        return self.proxy.response_bytes("GET", r"/blobs/sha256:")

    def _dest_lists_it(self) -> bool:
        if self.dest_registry is not None:
            return manifest_of(self.dest_registry, "copied/vm", "v1") is not None
        index = Path(self.dest.removeprefix("oci:").rsplit(":", 1)[0]) / "index.json"
        if not index.exists():
            return False
        return any(
            (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == "v1"
            for m in json.loads(index.read_bytes()).get("manifests", [])
        )

    def after_kill(self, barge: Barge) -> None:
        super().after_kill(barge)
        if self._dest_lists_it():  # a tag the destination shows names a whole image
            barge.check("verify", "--remote", "--deep", self.dest)

    def final(self, barge: Barge, res: Run) -> None:
        super().final(barge, res)
        out = barge.check("verify", "--remote", "--deep", "--format", "json", self.dest)
        assert self.w.digest in out, (out, replay_hint())


class PruneKill(KillCase):
    """A store with cached images and a prune down to a seeded space budget, killed by time."""

    op = "prune"
    by_bytes = False

    def _template(self) -> Path:
        if self.template is None:
            t = self.dir / "template"
            b = Barge(t)
            for k in range(SCALE.prune_images):
                name = f"p{k}"
                make_vm(b, name, 4 * MiB, rng(f"prune-image:{k}"))
                ref = f"{self.w.registry.host}/prune/{name}:v1"
                push_inproc(b, name, ref, chunk=1 * MiB, frame=1 * MiB)
                b.check("pull", ref, "-q")
                b.check("delete", name)
            self.template = t
        return self.template

    def prepare(self, i: int) -> tuple[Barge, tuple[str, ...]]:
        home = self.dir / f"home{i}"
        subprocess.run(
            ["cp", "-a", "--sparse=always", str(self._template()), str(home)], check=True
        )
        budget = rng(f"prune-budget:{i}").randint(1, SCALE.prune_images * 2) * MiB
        self.budget = budget
        return Barge(home), ("prune", "--space-budget", str(budget))

    def final(self, barge: Barge, res: Run) -> None:
        rows = check_store(barge)
        images = {str(r["digest"]) for r in rows if r["source"] == "oci"}
        cache = {p.name for p in (barge.home / "cache").iterdir()}
        assert cache == {d.removeprefix("sha256:") for d in images}, (cache, images)
        assert not [p for p in (barge.home / "tmp").iterdir() if p.name.startswith("gc-")]
        on_disk = sum(int(r["sizeOnDisk"]) for r in rows if r["source"] == "oci")
        assert on_disk <= self.budget, (on_disk, self.budget)


KILL_CASES: dict[str, type[KillCase]] = {
    c.op: c for c in (PushKill, PullKill, CloneKill, CopyKill, PruneKill)
}


@pytest.mark.parametrize("op", list(KILL_CASES))
def test_sigkill_at_seeded_points_then_rerun(
    op: str, kill_world: KillWorld, tmp_path: Path
) -> None:
    """SIGKILL ``barge OP`` at seeded points (by bytes the proxy saw, or by time); after each
    kill the catalog is intact and nothing partial is listed; the re-run completes with the
    right result and moves at most one chunk more than what the killed run had left."""
    case = KILL_CASES[op](kill_world, tmp_path)
    with timed(f"kills ({op})"):
        whole: float | None = None  # seconds a whole run takes
        if not case.by_bytes:  # killed by time only: time a whole run first
            barge, args = case.prepare(-1)
            t0 = time.monotonic()
            case.final(barge, barge.ok(*args))
            whole = time.monotonic() - t0
            case.cleanup()
        worst = 0
        overruns: list[str] = []
        for i in range(SCALE.kill_points):
            r = rng(f"kill:{op}:{i}")
            barge, args = case.prepare(i)
            try:
                if whole is None or (case.by_bytes and i % 2 == 0):
                    at = int(case.total_bytes() * r.uniform(0.05, 0.95))
                    killed = run_killed(barge, args, progress=case.progress, at_bytes=at)
                else:
                    killed = run_killed(barge, args, delay=whole * r.uniform(0.3, 1.0))
                TALLY.add("kills", f"{op} {'landed' if killed.killed else 'after the end'}")
                if not killed.killed:
                    assert not killed.problems() and killed.code == 0, killed.brief()
                moved = case.progress() if case.by_bytes else 0
                ic = integrity_check(barge.home)
                assert ic == "ok", f"{op} kill {i}: integrity_check {ic} ({replay_hint()})"
                case.after_kill(barge)
                res = case.rerun(barge, args)
                assert outcome(f"{op} rerun", res), res.brief()
                case.final(barge, res)
                if whole is None:  # a killed run and its re-run: about one whole run
                    whole = killed.seconds + res.seconds
                if case.by_bytes:
                    again = case.progress() - moved
                    left = max(0, case.total_bytes() - moved)
                    worst = max(worst, again - left)
                    said = (
                        f"{op} kill {i}: the re-run moved {again} bytes; {left} were left of "
                        f"{case.total_bytes()} and one chunk is {case.chunk_bytes}"
                    )
                    if again > left + case.chunk_bytes + case.rereads:
                        why = case.known_overrun()
                        assert why is not None, f"{said} ({replay_hint()})"
                        loose = left + case.workers * case.chunk_bytes + case.rereads
                        assert again <= loose, f"{said}: more than a chunk per worker"
                        overruns.append(f"{said}: {why}")
                        TALLY.add("kills", f"{op} re-run over one chunk (known)")
            finally:
                case.cleanup()
        if case.by_bytes:
            TALLY.figure(
                f"moved again after a kill ({op})",
                f"at most {max(0, worst) / MiB:.1f} MiB (one chunk: "
                f"{case.chunk_bytes / MiB:.1f} MiB)",
            )
    if overruns:
        pytest.xfail(f"{len(overruns)} re-run(s) over the one-chunk budget; {overruns[0]}")


# -- 3. many processes on one store ----------------------------------------------------------------


def test_concurrent_operations_on_one_store(tmp_path: Path, registry: RunningRegistry) -> None:
    """Pulls (one image twice at once, an incremental one), pushes, clones (from images and
    from a VM) and prunes to a one-byte budget, all at once on one store; then the catalog is
    intact and everything listed is whole and has its source's bytes."""
    r = rng("concurrent")
    with timed("concurrent operations"):
        store = Barge(tmp_path / "store")
        size = SCALE.race_image_size
        a = make_vm(store, "a", size, r)
        b = make_vm(store, "b", size, r)
        store.check(
            "push", "a", f"{registry.host}/c/a:v1", "--chunk-size", str(SCALE.kill_chunk), "-q"
        )
        store.check(
            "push", "b", f"{registry.host}/c/b:v1", "--chunk-size", str(SCALE.kill_chunk), "-q"
        )
        v1 = a.digest
        with open(a.disk, "r+b") as f:  # v2: a region rewritten, for an incremental pull
            f.seek(size // 3)
            f.write(r.randbytes(2 * MiB))
        a2 = content_digest(a.disk)
        store.check(
            "push", "a", f"{registry.host}/c/a:v2", "--chunk-size", str(SCALE.kill_chunk), "-q"
        )
        schedule = FaultSchedule(seed=r.randrange(1 << 32), rate=SCALE.fault_rate / 4)
        proxy = ScheduledProxy(registry, schedule)
        try:
            host = proxy.host
            base = f"{registry.host}/c/a:v1"  # the base of the incremental pulls
            store.check("pull", base, "-q")
            sources = {
                base: v1,
                f"{host}/c/a:v1": v1,
                f"{host}/c/a:v2": a2,
                f"{host}/c/b:v1": b.digest,
            }
            for n in range(SCALE.concurrent_rounds):
                chunk = str(SCALE.kill_chunk)
                cmds = [  # every kind of command comes first: the short form takes fewer
                    ("pull", f"{host}/c/a:v2", "-q"),
                    ("pull", f"{host}/c/a:v2", "-q"),
                    ("clone", f"{host}/c/b:v1", f"cb{n}", "-q"),
                    ("clone", "a", f"la{n}"),
                    ("push", "b", f"{host}/p/b:r{n}", "--chunk-size", chunk, "-q"),
                    ("prune", "--space-budget", "1"),
                    ("pull", f"{host}/c/b:v1", "-q"),
                    ("clone", f"{host}/c/a:v1", f"ca{n}", "-q"),
                    ("push", "a", f"{host}/p/a:r{n}", "--chunk-size", chunk, "-q"),
                    ("prune", "--space-budget", "1"),
                ][: SCALE.concurrent_procs]
                r.shuffle(cmds)
                results = all_at_once(store, cmds, r)
                for cmd, res in zip(cmds, results, strict=True):
                    outcome(f"concurrent {cmd[0]}", res)
                sources.update({f"ca{n}": v1, f"cb{n}": b.digest, f"la{n}": a2})  # if made
                rows = check_store(store, sources)
                TALLY.add("outcomes", "concurrent items verified", len(rows))
                vms = {r["name"] for r in rows if r["source"] == "local"}
                for cmd, res in zip(cmds, results, strict=True):
                    if cmd[0] == "clone" and res.code == 0:  # a clone made is a VM kept
                        assert cmd[2] in vms, (cmd, vms, replay_hint())
                for cmd, res in zip(cmds, results, strict=True):
                    if cmd[0] == "push" and res.code == 0:
                        store.check(
                            "verify", "--remote", "--deep", cmd[2].replace(host, registry.host)
                        )
        finally:
            proxy.stop()
            TALLY.merge("faults injected", schedule.injected)


# -- 4. a base image pruned while an incremental pull uses it ---------------------------------------


def test_base_pruned_while_an_incremental_pull_uses_it(
    tmp_path: Path, registry: RunningRegistry
) -> None:
    """v1 cached, then v2 (v1 with its last quarter rewritten and a frame moved, which the pull
    copies from the base) pulled or cloned slowly while, from the moment it names its base,
    prunes to a one-byte budget run back to back: the pull holds its base, completes with
    v2's bytes, and the base goes once the pull is over."""
    r = rng("base-prune")
    with timed("base pruned during an incremental pull"):
        src = Barge(tmp_path / "src")
        size = SCALE.race_image_size
        vm = make_vm(src, "vm", size, r)
        frame = 4 * MiB  # the CLI's frames: whole ones are moved
        with open(vm.disk, "r+b") as f:  # v1: random data mid-disk, text in its 2nd frame
            f.seek(size // 2)
            f.write(r.randbytes(frame))
            f.seek(frame)
            f.write((b"the second frame of v1 " * (frame // 16))[:frame])
        v1_ref = f"{registry.host}/base/vm:v1"
        src.check("push", "vm", v1_ref, "--chunk-size", str(2 * frame), "-q")
        with open(vm.disk, "r+b") as f:
            f.seek(size // 2)
            moved = f.read(frame)
            f.seek(0)  # the first chunk: v1's middle frame, copied from the base, and the
            f.write(moved)  # text kept in place (so the chunk is not fetched whole)
            f.seek(3 * size // 4)  # the last quarter rewritten: fetched first, slowly
            f.write(r.randbytes(size // 4))
        v2 = content_digest(vm.disk)
        src.check("push", "vm", f"{registry.host}/base/vm:v2", "--chunk-size", str(2 * frame), "-q")
        for i in range(SCALE.base_prunes):
            home = Barge(tmp_path / f"home{i}")
            home.check("pull", v1_ref, "-q")
            # a slow pull, one chunk at a time: the new chunks come first (the larger ones),
            # the frame copied from the base last, while the prunes run
            proxy = ScheduledProxy(registry, None, pace=10e6)
            proxy.pause("GET", r"/blobs/sha256:", 0.1)
            try:
                clone = i % 2 == 0
                ref = f"{proxy.host}/base/vm:v2"
                # not quiet: its note "using cached image ... as a base" starts the prunes
                one = ("--concurrency", "1")
                args = ("clone", ref, "v2", *one) if clone else ("pull", ref, *one)
                res, prunes = run_under_prunes(home, args)
                assert outcome(f"incremental {args[0]} under prunes", res), res.brief()
                assert "as a base" in res.err, f"the pull used no base: {res.err[-500:]}"
                TALLY.add("runs", "prunes during an incremental pull", prunes)
                check_store(home, {"v2": v2, ref: v2})
                if clone:
                    disk = home.home / "vms" / "v2" / "disk.img"
                    assert content_digest(disk) == v2, replay_hint()
                # the base is no longer held: a prune now removes every cached image
                home.check("prune", "--space-budget", "1")
                assert [x for x in home.listed() if x["source"] == "oci"] == []
            finally:
                proxy.stop()
