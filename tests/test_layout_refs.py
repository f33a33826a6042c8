"""Images pulled from OCI layouts have one spelling that works everywhere (issue 10, point 7).

``pull oci:/d:latest`` used to be listed as ``oci//d:latest``, and get, verify, clone and
delete then refused both spellings. Everything here goes through the CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from barge.errors import ExitCode
from clitest import barge

MiB = 1 << 20


@pytest.fixture
def work(barge_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two small VMs, with the working directory in tmp_path (relative paths are typed)."""
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "a.raw"
    with open(src, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"layout refs " * 1000)
    barge("create", "one", "--from-disk", str(src))
    barge("create", "two", "--disk-size", "2M")
    return tmp_path


def listed() -> list[str]:
    return barge("list", "-q", "--source", "oci").split()


@pytest.mark.parametrize("kind", ["oci", "oci-archive"])
def test_one_spelling_for_list_get_verify_clone_delete_prune(work: Path, kind: str) -> None:
    name = "lay" if kind == "oci" else "lay.tar"
    barge("export", "one", f"{kind}:{name}:v1", "-q")
    typed = f"{kind}:./{name}:v1"  # relative, with a './': not what is stored
    barge("pull", typed, "-q")
    shown = f"{kind}:{work / name}:v1"
    assert listed() == [shown]
    digest = json.loads(barge("list", "--format", "json", "--source", "oci"))[0]["digest"]
    # the listed spelling and other spellings of the same path all name it
    for spelling in (shown, typed, f"{kind}:{name}:v1", f"{kind}:{work}/x/../{name}:v1"):
        info = json.loads(barge("get", spelling, "--format", "json"))
        assert (info["reference"], info["digest"]) == (shown, digest)
        assert "OK" in barge("verify", spelling)
    barge("get", shown)  # and the text form
    barge("clone", shown, "copy", "-q")
    assert "copy" in barge("list", "-q", "--source", "local").split()
    assert barge("pull", shown).startswith(f"{shown} is up to date")
    # a different tag of another path is not it
    assert barge("get", f"{kind}:{name}:v2", code=ExitCode.NOT_FOUND)
    assert barge("delete", shown).split() == ["deleted", shown]
    assert listed() == []
    # pulled again, prune (by age) takes it like any cached image
    barge("pull", shown, "-q")
    assert listed() == [shown]
    assert "removed 1 images" in barge("prune", "--older-than", "0")
    assert listed() == []


def test_verify_uses_the_cached_copy_unless_remote(work: Path) -> None:
    barge("export", "one", "oci:gone:latest", "-q")
    barge("pull", "oci:gone:latest", "-q")
    shutil.rmtree(work / "gone")
    shown = f"oci:{work / 'gone'}:latest"
    assert barge("verify", shown).startswith("OK")  # the cache entry, as for a registry ref
    barge("verify", shown, "--remote", code=ExitCode.NOT_FOUND)


def test_untagged_layout_moves_like_a_tag(work: Path) -> None:
    barge("export", "one", "oci:plain", "-q")
    barge("pull", "oci:plain", "-q")
    shown = f"oci:{work / 'plain'}"
    first = json.loads(barge("get", shown, "--format", "json"))["digest"]
    assert listed() == [shown]
    shutil.rmtree(work / "plain")
    barge("export", "two", "oci:plain", "-q")
    barge("pull", "oci:plain", "-q")
    # one name, now the second image (the first stays cached, unreferenced, until a prune)
    assert sorted(listed()) == sorted([shown, first])
    second = json.loads(barge("get", shown, "--format", "json"))["digest"]
    assert second != first


def test_a_path_that_reads_as_path_and_tag_is_listed_with_an_empty_tag(work: Path) -> None:
    (work / "dir").mkdir()
    barge("export", "one", "oci:dir/v:1:", "-q")  # the directory "v:1", no tag
    barge("pull", "oci:dir/v:1:", "-q")
    shown = f"oci:{work / 'dir' / 'v:1'}:"
    assert listed() == [shown]
    assert json.loads(barge("get", shown, "--format", "json"))["reference"] == shown
    barge("get", f"oci:{work / 'dir' / 'v'}:1", code=ExitCode.NOT_FOUND)  # another location
    assert barge("delete", shown).split() == ["deleted", shown]
