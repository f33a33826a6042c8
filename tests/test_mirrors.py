"""Mirrors on pull, clone and copy, against real registries: Debian's docker-registry as the
upstream, a second one in proxy mode (a pull-through cache) or plain (a site registry filled
by `barge copy`) as the mirror, FaultProxy in front of either to count and to break."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from barge.errors import ExitCode
from barge.oci.auth import CredentialStore
from barge.store import Store
from barge.transfer.pull import PullOptions, pull
from barge.transfer.push import PushOptions, push
from clitest import barge, sha256_file
from faultproxy import FaultProxy
from localvms import make_vm
from registries import RunningRegistry, free_port, start_registry

MiB = 1 << 20
SMALL = PushOptions(chunk_size=8 * MiB, frame_size=1 * MiB)
BLOBS = r"/v2/.*/blobs/sha256:"

MakeProxy = Callable[..., FaultProxy]


@pytest.fixture
def image(barge_home: Path, tmp_path: Path, registry: RunningRegistry) -> tuple[str, Path]:
    """A VM pushed to the upstream ``registry``: (reference, the VM's disk)."""
    store = Store()
    disk = make_vm(store, tmp_path)
    ref = f"{registry.host}/team/vm:v1"
    push(store, "vm", [ref], SMALL)
    return ref, disk


@pytest.fixture
def use_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Path]:
    def write(text: str) -> Path:
        path = tmp_path / "registries.conf"
        path.write_text(text)
        monkeypatch.setenv("BARGE_REGISTRIES_CONF", str(path))
        return path

    return write


@pytest.fixture
def site_mirror(tmp_path: Path) -> Iterator[RunningRegistry]:
    reg = start_registry(tmp_path / "site-mirror")
    yield reg
    reg.stop()


@pytest.fixture
def filled(
    image: tuple[str, Path], site_mirror: RunningRegistry, make_proxy: MakeProxy
) -> tuple[str, Path, FaultProxy]:
    """The image copied into the site mirror, and a FaultProxy in front of the mirror."""
    ref, disk = image
    fill(ref, site_mirror)
    return ref, disk, make_proxy(site_mirror)


def mirror_conf(upstream: str, mirror: str, *, retry: float = 2, extra: str = "") -> str:
    return (
        f'[[registry]]\nprefix = "{upstream}"\n{extra}'
        f'[[registry.mirror]]\nlocation = "{mirror}"\n'
        f'[barge.hosts."{mirror}"]\nretry-timeout = {retry}\nconnect-timeout = 2\n'
    )


def fresh(tmp_path: Path, name: str) -> Store:
    return Store(tmp_path / name)


def fill(ref: str, mirror: RunningRegistry) -> str:
    """A plain site mirror filled by `barge copy` (keeping the repository path)."""
    dst = f"{mirror.host}/{ref.split('/', 1)[1]}"
    barge("copy", "--no-mirrors", ref, dst)
    return dst


def layer_digests(store: Store, digest: str) -> list[str]:
    doc = json.loads((store.image_path(digest) / "manifest.json").read_bytes())
    return [d["digest"] for d in doc["layers"]]


# -- a pull-through cache in front of the upstream ---------------------------------------------


def test_pull_through_cache_is_bit_identical_and_the_upstream_serves_each_blob_once(
    image: tuple[str, Path],
    registry: RunningRegistry,
    tmp_path: Path,
    make_proxy: MakeProxy,
    use_conf: Callable[[str], Path],
) -> None:
    ref, disk = image
    front = make_proxy(registry)  # counts what the upstream serves the mirror
    cache = start_registry(tmp_path / "cache", extra={"proxy": {"remoteurl": front.url}})
    try:
        use_conf(mirror_conf(registry.host, cache.host))
        direct = pull(fresh(tmp_path, "direct"), ref, PullOptions(mirrors=False))
        assert direct.source == f"upstream {registry.host}"
        assert front.count("*", "/manifests/|/blobs/") == 0  # --no-mirrors: no mirror asked

        first = pull(fresh(tmp_path, "host-a"), ref)
        assert first.source == f"mirror {cache.host}"
        assert first.digest == direct.digest
        assert sha256_file(first.path / "disk.img") == sha256_file(disk)
        assert sha256_file(first.path / "disk.img") == sha256_file(direct.path / "disk.img")
        served = front.count("GET", BLOBS)
        assert served >= 2  # the cache fetched the layers and the config from upstream
        disk_blobs = layer_digests(Store(tmp_path / "host-a"), first.digest)
        log_before = registry.log_text()
        gets_before = {d: log_before.count(f"GET /v2/team/vm/blobs/{d}") for d in disk_blobs}
        assert all(gets_before.values())  # the upstream's access log shows what it served

        # a second host: the cache answers every blob from its own storage
        second = pull(fresh(tmp_path, "host-b"), ref)
        assert second.source == f"mirror {cache.host}"
        assert sha256_file(second.path / "disk.img") == sha256_file(disk)
        assert front.count("GET", BLOBS) == served
        log_after = registry.log_text()
        assert {d: log_after.count(f"GET /v2/team/vm/blobs/{d}") for d in disk_blobs} == gets_before
    finally:
        cache.stop()


def test_mirror_going_down_mid_pull_falls_back_to_upstream(
    filled: tuple[str, Path, FaultProxy],
    registry: RunningRegistry,
    tmp_path: Path,
    use_conf: Callable[[str], Path],
) -> None:
    ref, disk, front = filled
    # the first blob is cut part-way, and from then on the mirror is gone
    front.add(method="GET", path=BLOBS, action="truncate", keep=300_000, times=1)
    front.add(method="*", path=".*", action="reset", skip=1, times=None)
    use_conf(mirror_conf(registry.host, front.host))
    store = fresh(tmp_path, "host")
    res = pull(store, ref)
    assert sha256_file(res.path / "disk.img") == sha256_file(disk)
    assert any(f"mirror {front.host} skipped" in n for n in res.notes), res.notes
    assert front.count("GET", BLOBS) >= 1


def test_corrupt_blob_on_a_copy_filled_mirror_is_skipped_and_nothing_corrupt_is_cached(
    image: tuple[str, Path],
    registry: RunningRegistry,
    site_mirror: RunningRegistry,
    tmp_path: Path,
    use_conf: Callable[[str], Path],
) -> None:
    ref, disk = image
    fill(ref, site_mirror)
    use_conf(mirror_conf(registry.host, site_mirror.host))
    probe = pull(fresh(tmp_path, "probe"), ref)  # every byte from the intact mirror
    assert probe.source == f"mirror {site_mirror.host}"
    layers = layer_digests(Store(tmp_path / "probe"), probe.digest)
    for d in layers[:2]:  # two disk layers damaged in the mirror's storage, sizes kept
        path = site_mirror.blob_path(d)
        data = bytearray(path.read_bytes())
        for at in range(len(data) // 3, len(data), max(1, len(data) // 5)):
            data[at] ^= 0xFF
        path.write_bytes(bytes(data))
    out = json.loads(barge("pull", "--format", "json", ref))
    assert out["source"] == f"mirror {site_mirror.host}"  # the manifest still came from it
    skipped = [n for n in out["notes"] if "skipped for blob" in n]
    assert {d for d in layers[:2] if any(d in n for n in skipped)} == set(layers[:2]), out
    store = Store()
    assert sha256_file(store.image_path(out["digest"]) / "disk.img") == sha256_file(disk)
    assert "ok" in barge("verify", ref).lower()


def test_credentials_are_sent_only_to_the_host_they_are_for(
    barge_home: Path,
    tmp_path: Path,
    registry_basic: RunningRegistry,
    site_mirror: RunningRegistry,
    make_proxy: MakeProxy,
    use_conf: Callable[[str], Path],
) -> None:
    assert registry_basic.username and registry_basic.password
    CredentialStore(barge_home).save(
        registry_basic.host, registry_basic.username, registry_basic.password
    )
    store = Store()
    disk = make_vm(store, tmp_path)
    ref = f"{registry_basic.host}/team/vm:v1"
    push(store, "vm", [ref], SMALL)
    fill(ref, site_mirror)
    front = make_proxy(site_mirror)
    use_conf(mirror_conf(registry_basic.host, front.host))
    res = pull(fresh(tmp_path, "host"), ref)
    assert res.source == f"mirror {front.host}"
    assert sha256_file(res.path / "disk.img") == sha256_file(disk)
    assert front.count() > 0
    sent = [e for e in front.log if any(k.lower() == "authorization" for k in e.headers)]
    assert sent == []
    # a mirror that wants credentials of its own gets none of the upstream's: it is skipped
    front.add(
        method="*",
        path="/v2/",
        action="status",
        status=401,
        times=None,
        headers={"WWW-Authenticate": 'Basic realm="mirror"'},
    )
    other = fresh(tmp_path, "host2")
    CredentialStore(other.home).save(
        registry_basic.host, registry_basic.username, registry_basic.password
    )
    res2 = pull(other, ref)
    assert res2.source == f"upstream {registry_basic.host}"
    assert [e for e in front.log if any(k.lower() == "authorization" for k in e.headers)] == []


def test_all_sources_down_is_one_error_naming_each(
    barge_home: Path, use_conf: Callable[[str], Path]
) -> None:
    up, mirror = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    use_conf(
        mirror_conf(up, mirror, retry=1)
        + f'[barge.hosts."{up}"]\nretry-timeout = 1\nconnect-timeout = 1\n'
    )
    out = barge("pull", f"{up}/team/vm:v1", code=ExitCode.REGISTRY)
    assert "every source failed" in out
    assert f"mirror {mirror}:" in out and f"upstream {up}:" in out
    assert out.count("\n") <= 2, out  # one error line (and at most a hint)


def test_tags_per_pull_from_mirror_no_mirrors_blocked_and_pushes_upstream(
    filled: tuple[str, Path, FaultProxy],
    registry: RunningRegistry,
    tmp_path: Path,
    use_conf: Callable[[str], Path],
) -> None:
    ref, disk, front = filled
    use_conf(
        f'[[registry]]\nprefix = "{registry.host}"\n'
        f'[[registry.mirror]]\nlocation = "{front.host}"\npull-from-mirror = "digest-only"\n'
        f'[[registry]]\nprefix = "{registry.host}/blocked"\nblocked = true\n'
    )
    by_tag = pull(fresh(tmp_path, "a"), ref)
    assert by_tag.source == f"upstream {registry.host}" and front.count() == 0
    by_digest = pull(fresh(tmp_path, "b"), f"{registry.host}/team/vm@{by_tag.digest}")
    assert by_digest.source == f"mirror {front.host}"
    assert sha256_file(by_digest.path / "disk.img") == sha256_file(disk)
    asked = front.count()
    out = json.loads(
        barge(
            "pull", "--no-mirrors", "--format", "json", f"{registry.host}/team/vm@{by_tag.digest}"
        )
    )
    assert out["source"] == f"upstream {registry.host}" and front.count() == asked
    assert "blocked" in barge("pull", f"{registry.host}/blocked/vm:1", code=ExitCode.USAGE)
    # a push goes to the reference's own registry, never to a mirror
    push(Store(), "vm", [f"{registry.host}/team/vm:v2"], SMALL)
    assert front.count() == asked
    # clone and copy read through the mirror too
    barge("clone", f"{registry.host}/team/vm@{by_tag.digest}", "cloned")
    assert front.count("GET", "/manifests/") > 0  # by digest: the mirror answers it
    assert sha256_file(Store().vm_path("cloned") / "disk.img") == sha256_file(disk)
    barge("copy", f"{registry.host}/team/vm@{by_tag.digest}", f"oci:{tmp_path / 'layout'}")
    assert front.count("GET", BLOBS) > 0


# -- generated faults on the mirror: the result is always a fresh pull's ----------------------

FAULTS = st.lists(
    st.tuples(
        st.sampled_from(["reset", "truncate", "status503", "status404", "wrong-blob"]),
        st.integers(0, 4),  # which blob request it hits
    ),
    max_size=3,
)


@settings(
    max_examples=6,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(faults=FAULTS)
def test_generated_mirror_faults_give_a_fresh_pulls_bytes(
    faults: list[tuple[str, int]],
    image: tuple[str, Path],
    registry: RunningRegistry,
    site_mirror: RunningRegistry,
    tmp_path: Path,
    make_proxy: MakeProxy,
    use_conf: Callable[[str], Path],
) -> None:
    ref, disk = image
    if not getattr(site_mirror, "_filled", False):
        fill(ref, site_mirror)
        site_mirror._filled = True  # type: ignore[attr-defined]
    front = make_proxy(site_mirror)
    use_conf(mirror_conf(registry.host, front.host, retry=1))
    config_digest = json.loads(
        (
            Store().image_path(pull(Store(), ref, PullOptions(mirrors=False)).digest)
            / "manifest.json"
        ).read_bytes()
    )["config"]["digest"]
    for kind, n in faults:
        rule = {"method": "GET", "path": BLOBS, "skip": n, "times": 1}
        if kind == "reset":
            front.add(action="reset", **rule)
        elif kind == "truncate":
            front.add(action="truncate", keep=100_000, **rule)
        elif kind.startswith("status"):
            front.add(action="status", status=int(kind[-3:]), **rule)
        else:  # another blob's bytes: a digest that does not match
            front.add(
                action="redirect",
                location=f"{site_mirror.url}/v2/team/vm/blobs/{config_digest}",
                **rule,
            )
    home = tmp_path / f"gen-{len(list(tmp_path.glob('gen-*')))}"
    res = pull(Store(home), ref)
    assert sha256_file(res.path / "disk.img") == sha256_file(disk)
    front.stop()


def test_a_mirror_whose_tag_lags_answers_with_its_own_image_and_says_so(
    filled: tuple[str, Path, FaultProxy],
    registry: RunningRegistry,
    tmp_path: Path,
    use_conf: Callable[[str], Path],
) -> None:
    ref, disk, front = filled  # the mirror holds v1 as it was
    store = Store()
    newer = make_vm(store, tmp_path, name="newer", seed=7)
    push(store, "newer", [ref], SMALL)  # the upstream's v1 moves on
    use_conf(mirror_conf(registry.host, front.host))
    via_mirror = json.loads(barge("pull", "--format", "json", ref))
    assert via_mirror["source"] == f"mirror {front.host}"
    assert sha256_file(Store().image_path(via_mirror["digest"]) / "disk.img") == sha256_file(disk)
    upstream = json.loads(barge("pull", "--no-mirrors", "--format", "json", ref))
    assert upstream["source"] == f"upstream {registry.host}"
    assert upstream["digest"] != via_mirror["digest"]
    assert sha256_file(Store().image_path(upstream["digest"]) / "disk.img") == sha256_file(newer)
    text = barge("pull", ref)
    assert f"(manifest from mirror {front.host})" in text
