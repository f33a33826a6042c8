"""Tart's and Vetu's own rules, through the CLI and a real registry (issue 10, point 8).

Each rule is taken from Tart's or Vetu's source (cited in ``docs/tart-vetu.md``): what their
pull accepts, what it ignores, and what barge must refuse because Tart would mis-read it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import lz4.frame
import pytest

from barge.errors import ExitCode
from barge.local import create_vm
from barge.store import Store
from clitest import barge, sha
from registries import RunningRegistry
from vmimages import push_tart, push_vetu, tart_vm_config, vector_chunks, vetu_disks

MiB = 1 << 20


def tags(reg: RunningRegistry, repo: str) -> list[str]:
    try:
        with urllib.request.urlopen(f"{reg.url}/v2/{repo}/tags/list", timeout=30) as r:
            return list(json.loads(r.read()).get("tags") or [])
    except urllib.error.HTTPError as e:
        assert e.code == 404
        return []


@pytest.fixture
def store(barge_home: Path) -> Store:
    return Store()


# -- push --format tart ------------------------------------------------------------------------


def test_push_tart_index_is_refused_before_anything_is_pushed(
    store: Store, registry: RunningRegistry
) -> None:
    # Registry.swift pullManifest asks only for an OCI image manifest and decodes the answer
    # as one: Tart cannot pull a tag that holds an image index.
    create_vm(store, "amd", disk_size=MiB, arch="x86_64")
    create_vm(store, "arm", disk_size=MiB, arch="aarch64")
    ref = f"{registry.host}/t/multi:v1"
    err = barge(
        "push", "amd", "arm", "--index", ref, "--format", "tart",
        code=ExitCode.UNSUPPORTED,
    )  # fmt: skip
    assert "--index cannot be combined with --format tart" in err
    assert "OCI image manifest" in err and err.count("barge: error:") == 1
    assert tags(registry, "t/multi") == []
    # the same VMs as a barge-format index are fine
    barge("push", "amd", "arm", "--index", ref, "-q")
    assert tags(registry, "t/multi") == ["v1"]


def test_push_tart_without_nvram_is_refused_unless_opted_in(
    store: Store, registry: RunningRegistry
) -> None:
    create_vm(store, "vm", disk_size=2 * MiB, arch="aarch64")
    ref = f"{registry.host}/t/nvram:v1"
    err = barge("push", "vm", ref, "--format", "tart", code=ExitCode.UNSUPPORTED)
    assert "has no nvram.bin" in err and "--placeholder-nvram" in err
    assert tags(registry, "t/nvram") == []  # refused before any upload
    res = json.loads(
        barge(
            "push",
            "vm",
            ref,
            "--format",
            "tart",
            "--format",
            "json",
            "--placeholder-nvram",
        )  # fmt: skip
    )
    assert any("not a valid EFI variable store" in n for n in res["notes"])
    assert tags(registry, "t/nvram") == ["v1"]
    err = barge("push", "vm", ref, "--placeholder-nvram", code=ExitCode.USAGE)
    assert "is for --format tart" in err


def test_push_tart_checks_a_macos_identity_is_base64(
    store: Store, registry: RunningRegistry
) -> None:
    # Platform/Darwin.swift decodes ecid and hardwareModel with Data(base64Encoded:)
    push_tart(registry, "tart/mac", "v1", vector_chunks())
    barge("clone", f"{registry.host}/tart/mac:v1", "mac", "-q")
    cfg_path = store.vm_path("mac") / "tart-config.json"
    good = cfg_path.read_bytes()
    barge("push", "mac", f"{registry.host}/tart/mac:again", "--format", "tart", "-q")
    for key, bad in (("ecid", "not base64!"), ("hardwareModel", ""), ("ecid", None)):
        doc = json.loads(good)
        if bad is None:
            del doc[key]
        else:
            doc[key] = bad
        cfg_path.write_text(json.dumps(doc))
        err = barge(
            "push", "mac", f"{registry.host}/tart/mac:bad", "--format", "tart",
            code=ExitCode.INTEGRITY,
        )  # fmt: skip
        assert key in err and ("base64" in err or "missing" in err)
    assert "bad" not in tags(registry, "tart/mac")


# -- Tart images whose offsets disagree with their layer order --------------------------------


def test_reordered_offsets_warn_on_pull_and_fail_verify(
    store: Store, registry: RunningRegistry
) -> None:
    chunks = vector_chunks()
    disk, _ = push_tart(registry, "tart/re", "mixed", chunks, order=[2, 0, 1], offsets=True)
    ref = f"{registry.host}/tart/re:mixed"
    # barge places by offset (its disk is right), Tart by order (its disk would not be)
    res = json.loads(barge("pull", ref, "--format", "json"))
    assert any(n.startswith("warning:") and "scrambled" in n for n in res["notes"])
    assert (store.image_path(res["digest"]) / "disk.img").read_bytes() == disk
    for args in ((ref,), (ref, "--remote"), (ref, "--remote", "--deep")):
        err = barge("verify", *args, code=ExitCode.INTEGRITY)
        assert "FAILED" in err and "scrambled" in err
    # in order, with offsets (what barge's writer produces): both readers agree, verify passes
    push_tart(registry, "tart/re", "ordered", chunks, offsets=True)
    for args in (("--remote",), ("--remote", "--deep"), ()):
        assert barge("verify", f"{registry.host}/tart/re:ordered", *args).startswith("OK")


# -- what Tart ignores or defaults --------------------------------------------------------------


def test_tart_unknown_layers_ignored_and_unknown_disk_format_read_as_raw(
    store: Store, registry: RunningRegistry
) -> None:
    cfg = json.loads(tart_vm_config())
    cfg["diskFormat"] = "future-format"  # VMConfig.swift: DiskImageFormat(rawValue:) ?? .raw
    disk, _ = push_tart(
        registry, "tart/odd", "v1", vector_chunks(),
        vm_config=json.dumps(cfg).encode(), extra_layers=[b"a signature", b"an sbom"],
    )  # fmt: skip
    res = json.loads(barge("pull", f"{registry.host}/tart/odd:v1", "--format", "json"))
    assert any("ignored layers of unknown types" in n for n in res["notes"])
    assert any("'future-format' read as raw" in n for n in res["notes"])
    got = store.image_path(res["digest"]) / "disk.img"
    assert sha(got.read_bytes()) == sha(disk)
    info = json.loads((store.image_path(res["digest"]) / "config.json").read_bytes())
    assert info["disks"][0]["format"] == "raw"
    assert barge("verify", f"{registry.host}/tart/odd:v1", "--remote", "--deep").startswith("OK")


# -- Vetu ---------------------------------------------------------------------------------------


def test_vetu_names_empty_disk_and_unknown_layers_as_vetu_reads_them(
    store: Store, registry: RunningRegistry
) -> None:
    parts = vetu_disks()
    disks = {"-disk": parts["disk.img"], "_data": parts["data.img"], "empty.img": [b""]}
    push_vetu(registry, "vetu/odd", "v1", disks, extra_layers=[b"firmware blob"])
    ref = f"{registry.host}/vetu/odd:v1"
    res = json.loads(barge("pull", ref, "--format", "json"))
    assert any("ignored layers of unknown types" in n for n in res["notes"])
    path = store.image_path(res["digest"])
    for name, chunks in disks.items():
        assert (path / name).read_bytes() == b"".join(chunks)
    assert (path / "empty.img").stat().st_size == 0
    barge("clone", ref, "odd", "-q")
    assert (store.vm_path("odd") / "-disk").read_bytes() == b"".join(disks["-disk"])
    assert barge("verify", ref).startswith("OK")
    assert barge("verify", ref, "--remote", "--deep").startswith("OK")
    # the empty disk's one chunk really is a zero-length LZ4 frame
    assert lz4.frame.decompress(lz4.frame.compress(b"")) == b""


@pytest.mark.parametrize(
    ("config", "code", "match"),
    [
        ({"disks": None}, ExitCode.INTEGRITY, "has no 'disks' list"),
        ({"arch": None}, ExitCode.INTEGRITY, "has no arch"),
        ({"arch": ""}, ExitCode.INTEGRITY, "has no arch"),
        ({"version": 2}, ExitCode.UNSUPPORTED, "version 2"),
        ({"disks": [{"name": "disk."}]}, ExitCode.INTEGRITY, "unsafe disk name"),
        ({"cmdline": ["console=ttyS0"]}, ExitCode.INTEGRITY, "'cmdline' must be a string"),
    ],
)
def test_vetu_configs_vetu_refuses_are_refused(
    store: Store, registry: RunningRegistry, config: dict[str, object], code: int, match: str
) -> None:
    push_vetu(registry, "vetu/bad", "v1", {"disk.img": [b"x" * 4096]}, config=config)
    err = barge("pull", f"{registry.host}/vetu/bad:v1", "-q", code=code)
    assert match in err and err.count("barge: error:") == 1
    assert store.cached_images() == []
