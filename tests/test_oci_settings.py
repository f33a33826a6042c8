"""Per-registry settings (barge.oci.settings): what barge knows of registries, prefix
lookup, layering (known < configured < environment < flags)."""

from __future__ import annotations

import pytest

from barge.errors import UsageError
from barge.oci.settings import (
    KNOWN_REGISTRIES,
    HostEntry,
    HostSettings,
    HostTable,
    settings_for,
)
from barge.reference import parse, parse_registry

MiB = 1 << 20


@pytest.mark.parametrize(
    ("host", "limit"),
    [
        ("123456789012.dkr.ecr.us-east-1.amazonaws.com", 127),
        ("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn", 127),
        ("123456789012.DKR.ECR.eu-west-1.amazonaws.com:443", 127),
        ("ghcr.io", None),
        ("localhost:5000", None),
        ("[::1]:5000", None),
    ],
)
def test_known_layer_limit(host: str, limit: int | None) -> None:
    assert settings_for(host, environ={}).layer_limit == limit


@pytest.mark.parametrize(
    ("host", "size"),
    [
        ("ghcr.io", 4 * MiB),
        ("1.dkr.ecr.us-west-2.amazonaws.com", 10 * MiB),
        ("europe-west1-docker.pkg.dev", None),
        ("gcr.io", None),
        ("eu.gcr.io", None),
        ("registry-1.docker.io", None),
    ],
)
def test_default_upload_chunk_size(host: str, size: int | None) -> None:
    assert settings_for(host, environ={}).upload_chunk_size == size


def test_settings_layers() -> None:
    hosts = {"*.example.com": {"stall_timeout": 60}, "r.example.com": {"retry_timeout": 5}}
    s = settings_for("r.example.com", hosts=hosts, environ={})
    assert (s.stall_timeout, s.retry_timeout, s.connect_timeout) == (60, 5, 10)
    s = settings_for("r.example.com", hosts=hosts, environ={"BARGE_STALL_TIMEOUT": "7s"})
    assert s.stall_timeout == 7
    assert settings_for("other.example.org", hosts=hosts, environ={}).stall_timeout == 30


@pytest.mark.parametrize(
    ("prefix", "target", "applies"),
    [
        ("example.com", "example.com", True),
        ("example.com", "example.com:5000", True),  # a host prefix covers every port
        ("example.com:5000", "example.com", False),
        ("example.com", "example.community", False),  # only at a boundary
        ("example.com", "example.com/team/vm", True),
        ("example.com/team", "example.com/team/vm", True),
        ("example.com/team", "example.com/teamwork/vm", False),
        ("example.com/team", "example.com", False),  # a registry has no repository path
        ("*.example.com", "r.example.com:443", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com:5000", "r.example.com:5000", True),
        ("*.example.com:5000", "r.example.com:5001", False),
        ("EXAMPLE.com", "example.COM", True),
    ],
)
def test_prefix_rule(prefix: str, target: str, applies: bool) -> None:
    entry = HostEntry(prefix, {})
    where = parse(target) if "/" in target else parse_registry(target)
    assert entry.matches(where) is applies


def test_more_specific_entry_wins() -> None:
    table = HostTable(
        [
            HostEntry("example.com/team/vm", {"retry_timeout": 3}),
            HostEntry("*.com", {"retry_timeout": 1, "stall_timeout": 11}),
            HostEntry("example.com", {"retry_timeout": 2}),
        ]
    )
    ref = parse("example.com/team/vm:v1")
    assert [e.prefix for e in table.matching(ref)] == [
        "*.com",
        "example.com",
        "example.com/team/vm",
    ]
    s = settings_for(ref, hosts=table, environ={})
    assert (s.retry_timeout, s.stall_timeout) == (3, 11)
    # the client looks up by registry: path prefixes do not apply to it
    assert settings_for(ref.registry_host, hosts=table, environ={}).retry_timeout == 2


def test_configuration_overrides_known_registries() -> None:
    host = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
    assert KNOWN_REGISTRIES.matching(parse_registry(host))
    known = settings_for(host, environ={})
    assert (known.layer_limit, known.upload_chunk_size) == (127, 10 * MiB)
    mine = {host: {"layer_limit": 500, "upload_chunk": 0}}
    s = settings_for(host, hosts=mine, environ={})
    assert (s.layer_limit, s.upload_chunk_size) == (500, None)


def test_values_are_checked() -> None:
    s = HostSettings().with_values(
        {"upload_chunk": "8388608", "insecure": "yes", "layer_limit": 64, "ca_file": "/ca.pem"},
        "test",
    )
    assert (s.upload_chunk_size, s.insecure, s.layer_limit, s.ca_file) == (
        8 * MiB,
        True,
        64,
        "/ca.pem",
    )
    for values, reason in [
        ({"colour": 1}, "unknown setting 'colour'"),
        ({"layer_limit": 0}, "layer-limit must be at least 1"),
        ({"upload_chunk": "4MiB"}, "expected a whole number"),
        ({"insecure": "maybe"}, "expected true or false"),
        ({"stall_timeout": "soon"}, "expected a number of seconds"),
    ]:
        with pytest.raises(UsageError, match=reason):
            HostSettings().with_values(values, "test")
    with pytest.raises(UsageError, match="a wildcard prefix names hosts only"):
        HostEntry("*.example.com/team", {})


def test_insecure_flag_wins() -> None:
    assert not settings_for("r.example.com", environ={}).insecure
    assert settings_for("r.example.com", environ={}, insecure=True).insecure
    table = {"r.example.com": {"insecure": True}}
    assert settings_for("r.example.com", hosts=table, environ={}).insecure
