"""Every pull path gives the bytes of a fresh pull (issue 10): generated and named cases.

* ``test_generated_cases_match_a_fresh_pull``: hypothesis generates pairs of image versions
  (tests/pullcases.py: random data, text, written zeros, holes, moved data, grown and shrunk
  disks, a second disk dropped or added, barge/Tart/Vetu, chunk and frame sizes and codecs per
  version) and what happens between them (a base barge picks or one forced on it, a pull killed
  part-way and its staging directory tampered with, ``clone REF``, a ``barge copy`` into another
  layout), published to an OCI layout directory (the same pull code as a registry, without the
  HTTP); 30 in ``make test``. ``make fuzz`` runs thousands (``BARGE_FUZZ_EXAMPLES``, default 3000).
* ``test_named_case``: a fixed table of the cases the issue names, against the real registry.
* ``test_issue_10_reproduction``: the issue's CLI reproduction, exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from barge.store import Store
from clitest import barge, sha256_file
from pullcases import Case, DiskSpec, Edit, Tamper, Target, Version, run_case
from registries import RunningRegistry

KiB = 1024
MiB = 1 << 20

FUZZ = bool(os.environ.get("BARGE_FUZZ"))
EXAMPLES = int(os.environ.get("BARGE_FUZZ_EXAMPLES", "3000")) if FUZZ else 30


@pytest.fixture(autouse=True)
def _home(barge_home: Path) -> Path:
    return barge_home


@pytest.fixture
def store(barge_home: Path) -> Store:
    return Store()


# -- generated cases --------------------------------------------------------------------------

FRAME_SIZES = st.sampled_from([64 * KiB, 128 * KiB, 256 * KiB])
CODECS = st.sampled_from(["zstd", "lz4", "none"])
FORMATS = st.sampled_from(["barge", "barge", "barge", "barge", "tart", "vetu"])
SIZES = st.builds(
    lambda k, tail: k * 64 * KiB + tail,
    st.integers(1, 48),
    st.sampled_from([0, 0, 512, 4096, 60 * KiB + 512]),
)


KINDS = ["random", "random", "text", "zeros", "hole", "copy"]
#: v2 frees space more often than it writes: trimmed and zeroed regions are where a pull onto
#: a base can go wrong
KINDS_V2 = ["random", "text", "zeros", "zeros", "hole", "hole", "hole", "copy"]


_NUDGE = st.sampled_from([0, 0, 0, 1, 512, 4096, -4096, 9000])


def _grid(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Numbers in ``lo..hi``, often whole multiples of 64 KiB (the frame grid: whole frames and
    chunks freed or written are what a pull onto a base must get right), sometimes nudged."""
    return st.builds(
        lambda k, d: max(lo, min(hi, k * 64 * KiB + d)),
        st.integers(0, max(1, hi // (64 * KiB))),
        _NUDGE,
    )


@st.composite
def edits(draw: st.DrawFn, size: int, longest: int, kinds: list[str]) -> Edit:
    return Edit(
        kind=draw(st.sampled_from(kinds)),
        offset=draw(_grid(0, size - 1)),
        length=draw(st.one_of(st.integers(1, 16 * KiB), _grid(1, longest))),
        source=draw(_grid(0, size - 1)),
        seed=draw(st.integers(0, 1 << 16)),
    )


@st.composite
def versions(draw: st.DrawFn, prev: Version | None = None) -> Version:
    """A version; v2 (``prev`` given) mostly keeps v1's format, frame size and chunk size, so
    that most pairs share frames and the base paths are exercised."""
    same = prev is not None and draw(st.integers(0, 2)) > 0
    fmt = prev.fmt if prev is not None and same else draw(FORMATS)
    if fmt == "tart":
        names = ["disk.img"]
    elif prev is not None and prev.fmt != "tart" and draw(st.booleans()):
        names = [d.name for d in prev.disks]
    else:
        names = draw(
            st.lists(st.sampled_from(["disk.img", "data.img"]), min_size=1, max_size=2, unique=True)
        )
    old = {d.name: d.size for d in prev.disks} if prev is not None else {}
    disks = []
    for name in names:
        size = old[name] if name in old and draw(st.booleans()) else draw(SIZES)
        # v1 is written anywhere, often all over; v2 mostly changes parts of it (so that it
        # shares frames)
        if prev is None:
            fill = [Edit("random", 0, size, seed=draw(st.integers(0, 9)))]
            n = (fill if draw(st.integers(0, 2)) > 0 else []) + draw(
                st.lists(edits(size, size, KINDS), min_size=1, max_size=6)
            )
        else:
            n = draw(st.lists(edits(size, max(1, size // 2), KINDS_V2), max_size=6))
        disks.append(DiskSpec(name, size, tuple(n)))
    keep = prev is not None and draw(st.integers(0, 2)) > 0
    frame = prev.frame_size if prev is not None and keep else draw(FRAME_SIZES)
    chunk = (
        prev.chunk_size
        if prev is not None and keep and draw(st.booleans())
        else frame * draw(st.integers(1, 6))
    )
    return Version(
        tuple(disks),
        fmt=fmt,
        chunk_size=chunk,
        frame_size=frame,
        codec=draw(CODECS),
        tart_offsets=draw(st.booleans()),
    )


TAMPERS = st.builds(
    Tamper,
    kind=st.sampled_from(["bytes", "bytes", "bytes", "grow", "shrink", "junk", "symlink"]),
    disk=st.integers(0, 1),
    offset=st.integers(0, 4 * MiB),
    length=st.integers(1, 128 * KiB),
    seed=st.integers(0, 1 << 16),
)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    v1 = draw(versions())
    v2 = draw(versions(v1))
    killed = draw(st.integers(0, 2)) == 0
    return Case(
        v1,
        v2,
        base=draw(st.sampled_from(["auto", "forced"])),
        kill_after=draw(st.integers(0, 2 * MiB)) if killed else None,
        tamper=tuple(draw(st.lists(TAMPERS, max_size=4))) if killed else (),
        clone=draw(st.booleans()),
        copy=draw(st.booleans()),
    )


def _scratch() -> tempfile.TemporaryDirectory[str]:
    """A directory for one example: tmpfs where there is one (no fsync cost; the named cases
    below run on the ordinary filesystem, with O_DIRECT)."""
    shm = "/dev/shm"
    where = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    return tempfile.TemporaryDirectory(prefix="barge-diff-", dir=where)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not FUZZ,
    database=None if not FUZZ else settings.default.database,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # no slow "explain"
    print_blob=True,
)
@given(case=cases())
def test_generated_cases_match_a_fresh_pull(case: Case) -> None:
    with _scratch() as d:
        work = Path(d)
        for label in run_case(case, work, Target(layout_dir=work / "layout")):
            event(label)


# -- the named cases, against the real registry -----------------------------------------------


def one(size: int, *e: Edit, **kw: object) -> Version:
    """A one-disk version."""
    return Version((DiskSpec("disk.img", size, e),), **kw)  # type: ignore[arg-type]


R, T, Z, H, C = "random", "text", "zeros", "hole", "copy"
F64, F256 = 64 * KiB, 256 * KiB
DATA = (Edit(R, 0, 3 * MiB, seed=1), Edit(T, 5 * MiB, 2 * MiB, seed=2))
SMALL = {"chunk_size": 512 * KiB, "frame_size": 128 * KiB}

NAMED: dict[str, Case] = {
    # the issue's bug, small: a hole punched where the base has data, whole chunks of it
    "zeros-where-the-base-has-data": Case(
        one(8 * MiB, *DATA, **SMALL),
        one(8 * MiB, Edit(H, 1 * MiB, 1 * MiB), **SMALL),
        expect_base=True,
    ),
    "base-has-less-data": Case(
        one(8 * MiB, Edit(T, 0, 1 * MiB, seed=3), **SMALL),
        one(8 * MiB, Edit(R, 2 * MiB, 5 * MiB, seed=4), Edit(Z, 512 * KiB, 512 * KiB), **SMALL),
        expect_base=True,
    ),
    "written-zeros-whole-and-partial-frames": Case(
        one(8 * MiB, *DATA, **SMALL),
        one(
            8 * MiB,
            Edit(Z, 128 * KiB, 128 * KiB),  # a zero frame in a listed chunk
            Edit(Z, 600 * KiB, 5000),  # zeros inside a data frame
            Edit(Z, 1 * MiB, 512 * KiB),  # a whole chunk of written zeros: not listed
            **SMALL,
        ),
        expect_base=True,
    ),
    "grown": Case(
        one(6 * MiB, *DATA[:1], **SMALL),
        one(9 * MiB + 512, Edit(R, 8 * MiB, 1 * MiB + 512, seed=5), Edit(H, 0, 1 * MiB), **SMALL),
        expect_base=True,
    ),
    "shrunk-inside-a-frame": Case(
        one(8 * MiB, *DATA, **SMALL),
        one(5 * MiB + 4096 + 512, Edit(H, 2 * MiB, 1 * MiB), **SMALL),
        expect_base=True,
    ),
    "other-zero-regions": Case(
        one(8 * MiB, Edit(R, 0, 8 * MiB, seed=6), Edit(H, 2 * MiB, 2 * MiB), **SMALL),
        one(8 * MiB, Edit(R, 2 * MiB, 2 * MiB, seed=7), Edit(H, 5 * MiB, 1 * MiB), **SMALL),
        expect_base=True,
    ),
    "other-chunk-size": Case(
        one(8 * MiB, *DATA, chunk_size=1 * MiB, frame_size=F256),
        one(8 * MiB, Edit(H, 1 * MiB, 1 * MiB), chunk_size=256 * KiB, frame_size=F256),
        expect_base=True,
    ),
    "other-frame-size-as-forced-base": Case(
        one(8 * MiB, *DATA, chunk_size=1 * MiB, frame_size=F256),
        one(8 * MiB, Edit(H, 1 * MiB, 1 * MiB), chunk_size=192 * KiB, frame_size=F64),
        base="forced",
        expect_base=True,
    ),
    "other-codecs": Case(
        one(8 * MiB, *DATA, codec="lz4", **SMALL),
        one(
            8 * MiB,
            Edit(H, 1 * MiB, 1 * MiB),
            Edit(R, 6 * MiB, 9000, seed=8),
            codec="none",
            **SMALL,
        ),
        expect_base=True,
    ),
    "moved-data": Case(
        one(8 * MiB, *DATA, **SMALL),
        one(8 * MiB, Edit(C, 6 * MiB, 1 * MiB, source=0), Edit(H, 0, 1 * MiB), **SMALL),
        expect_base=True,
    ),
    "second-disk-dropped-and-another-added": Case(
        Version(
            (DiskSpec("disk.img", 4 * MiB, DATA[:1]), DiskSpec("data.img", 2 * MiB, DATA[:1])),
            **SMALL,  # type: ignore[arg-type]
        ),
        Version(
            (
                DiskSpec("disk.img", 4 * MiB, (Edit(H, 0, 1 * MiB),)),
                DiskSpec("new.img", 3 * MiB, (Edit(C, 0, 1 * MiB, source=0),)),
            ),
            **SMALL,  # type: ignore[arg-type]
        ),
        expect_base=True,
    ),
    "killed-then-tampered-inside-outside-and-past-the-end": Case(
        one(8 * MiB, *DATA, **SMALL),
        one(8 * MiB, Edit(H, 1 * MiB, 1 * MiB), Edit(R, 2 * MiB, 1 * MiB, seed=9), **SMALL),
        kill_after=200 * KiB,
        expect_kill=True,
        tamper=(
            Tamper("bytes", offset=1 * MiB + 100, length=50000, seed=1),  # a zero region
            Tamper("bytes", offset=2 * MiB + 7, length=9000, seed=2),  # a fetched frame
            Tamper("bytes", offset=5 * MiB + 3, length=9000, seed=3),  # a kept frame
            Tamper("bytes", offset=7 * MiB + 5, length=40000, seed=4),  # past the data
            Tamper("grow", length=1 * MiB, seed=5),
            Tamper("junk"),
        ),
    ),
    "staging-of-garbage": Case(
        one(4 * MiB, *DATA[:1], **SMALL),
        one(4 * MiB, Edit(H, 1 * MiB, 1 * MiB), Edit(R, 3 * MiB, 1 * MiB, seed=5), **SMALL),
        kill_after=0,
        expect_kill=True,
        tamper=tuple(
            Tamper("bytes", offset=o * 256 * KiB, length=200 * KiB, seed=o) for o in range(16)
        ),
    ),
    "staging-disk-is-a-symlink": Case(
        one(4 * MiB, *DATA[:1], **SMALL),
        one(4 * MiB, Edit(H, 1 * MiB, 1 * MiB), Edit(R, 3 * MiB, 1 * MiB, seed=6), **SMALL),
        kill_after=50 * KiB,
        expect_kill=True,
        tamper=(Tamper("symlink"),),
    ),
    "clone-ref": Case(
        one(8 * MiB, *DATA, **SMALL),
        one(8 * MiB, Edit(H, 1 * MiB, 1 * MiB), **SMALL),
        clone=True,
        expect_base=True,
    ),
    "copy-into-a-layout-then-pull": Case(
        one(8 * MiB, *DATA, **SMALL),
        one(8 * MiB, Edit(H, 1 * MiB, 1 * MiB), **SMALL),
        copy=True,
        expect_base=True,
    ),
    "tart-onto-a-barge-entry": Case(
        one(4 * MiB, *DATA[:1], **SMALL),
        one(4 * MiB, Edit(H, 1 * MiB, 1 * MiB), fmt="tart", chunk_size=1 * MiB),
        clone=True,
        kill_after=1 * MiB + 100 * KiB,
        expect_kill=True,
        tamper=(Tamper("bytes", offset=3 * MiB, length=9000), Tamper("junk")),
    ),
    "barge-onto-a-tart-entry": Case(
        one(4 * MiB, *DATA[:1], fmt="tart", chunk_size=1 * MiB, tart_offsets=False),
        one(4 * MiB, Edit(H, 1 * MiB, 1 * MiB), **SMALL),
        kill_after=300 * KiB,
        expect_kill=True,
        tamper=(Tamper("bytes", offset=1 * MiB + 5, length=9000),),  # where v2 has zeros
    ),
    "vetu-onto-a-barge-entry-killed-and-tampered": Case(
        one(4 * MiB, *DATA[:1], **SMALL),
        Version(
            (
                DiskSpec("disk.img", 4 * MiB, (Edit(H, 1 * MiB, 1 * MiB),)),
                DiskSpec("data.img", 1 * MiB, (Edit(T, 0, 1 * MiB, seed=3),)),
            ),
            fmt="vetu",
            chunk_size=1 * MiB,
        ),
        kill_after=1 * MiB + 300 * KiB,
        expect_kill=True,
        tamper=(Tamper("bytes", offset=1 * MiB, length=9000), Tamper("junk")),
    ),
    "barge-onto-a-vetu-entry": Case(
        one(4 * MiB, *DATA[:1], fmt="vetu", chunk_size=1 * MiB),
        one(4 * MiB, Edit(H, 1 * MiB, 1 * MiB), **SMALL),
        clone=True,
        kill_after=300 * KiB,
        expect_kill=True,
        tamper=(Tamper("bytes", offset=3 * MiB + 5, length=9000), Tamper("grow")),
    ),
}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_case(name: str, tmp_path: Path, registry: RunningRegistry) -> None:
    run_case(NAMED[name], tmp_path, Target(registry=registry, repo=f"named/{name}"))


def test_issue_10_reproduction(
    tmp_path: Path, registry: RunningRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI reproduction of issue 10, as written there: b2's disk must be b.raw, not a.raw."""
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    with open(a, "wb") as f:
        f.truncate(256 * MiB)
        f.write(os.urandom(128 * MiB))
    subprocess.run(["cp", "--sparse=always", str(a), str(b)], check=True)
    subprocess.run(["fallocate", "-p", "-o", "64M", "-l", "32M", str(b)], check=True)
    r = f"{registry.host}/repro/vm"
    barge("create", "a", "--from-disk", str(a))
    barge("create", "b", "--from-disk", str(b))
    barge("push", "a", f"{r}:a", "--chunk-size", "16M")
    barge("push", "b", f"{r}:b", "--chunk-size", "16M")
    fresh = tmp_path / "fresh"
    monkeypatch.setenv("BARGE_HOME", str(fresh))
    barge("pull", f"{r}:a")
    res = json.loads(barge("pull", f"{r}:b", "--format", "json"))
    assert res["base"] is not None and res["fetchedBytes"] == 0  # b is a's frames and a hole
    barge("clone", f"{r}:b", "b2")
    assert sha256_file(fresh / "vms" / "b2" / "disk.img") == sha256_file(b)
    rows = json.loads(barge("list", "--format", "json", "--source", "oci"))
    assert sorted(x["reference"] for x in rows) == [f"{r}:a", f"{r}:b"]
    barge("verify", f"{r}:b", "--deep")
