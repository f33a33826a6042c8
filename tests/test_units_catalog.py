from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from barge.errors import UsageError
from barge.store import Store
from barge.units import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("20G", 20 << 30),
        ("512M", 512 << 20),
        ("1.5T", int(1.5 * (1 << 40))),
        ("4GiB", 4 << 30),
        ("1048576", 1 << 20),
        ("8k", 8192),
        ("3 GB", 3 << 30),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "-1G", "1X", "1.2.3G", "0"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(20 << 30) == "20 GiB"
    assert format_size(10) == "10 B"
    assert format_size(0) == "0 B"
    assert format_size(1023) == "1023 B"
    assert format_size(2970) == "2.9 KiB"
    assert format_size(3 * (1 << 30) // 2) == "1.5 GiB"
    assert format_size(5 << 40) == "5 TiB"
    assert format_size(5000 << 40) == "5000 TiB"


def test_catalog_refs_keep_ports_and_ipv6(barge_home: Path) -> None:
    cat = Store().catalog
    d = "sha256:" + "a" * 64
    for reg in ("registry.example.com:8221", "[::1]:5000", "localhost:5000"):
        cat.set_ref(reg, "team/macos", "sonoma", d)
    assert sorted(r.registry for r in cat.refs(d)) == [
        "[::1]:5000",
        "localhost:5000",
        "registry.example.com:8221",
    ]
    assert cat.lookup_ref("[::1]:5000", "team/macos", "sonoma") == d
    d2 = "sha256:" + "b" * 64
    cat.set_ref("[::1]:5000", "team/macos", "sonoma", d2)  # a tag moves
    assert cat.lookup_ref("[::1]:5000", "team/macos", "sonoma") == d2
    assert os.path.basename(str(cat.path)) == "catalog.db"
    mode = cat.query("PRAGMA journal_mode")[0][0]
    assert mode == "wal"


def test_leases_expire_with_their_process(barge_home: Path) -> None:
    cat = Store().catalog
    lid = cat.create_lease("test")
    cat.lease_add(lid, "image", ["sha256:" + "c" * 64])
    assert cat.leased("image") == {"sha256:" + "c" * 64}
    assert cat.expire_dead_leases() == 0  # we are alive
    with cat.tx() as db:  # a lease of a process that is gone
        db.execute("UPDATE leases SET pid = ? WHERE id = ?", (2**22 + 12345, lid))
    assert cat.expire_dead_leases() == 1
    assert cat.leased("image") == set()


def test_catalog_concurrent_writers(barge_home: Path) -> None:
    store = Store()
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(50):
                store.catalog.add_blob_location(f"sha256:{n:02d}{i:062d}", "h:1", "r")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert store.catalog.query("SELECT count(*) FROM blob_locations")[0][0] == 200
