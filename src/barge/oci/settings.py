"""Per-registry settings: everything barge knows or is told about one registry host.

One :class:`HostSettings` holds, for one registry (regclient's ``config.Host`` is the model):

* timings — ``connect_timeout``, ``stall_timeout``, ``retry_timeout``, ``timeout`` (seconds);
* limits — ``layer_limit`` (layers per manifest it accepts; None: unknown) and
  ``upload_chunk`` (the PATCH body size its chunked uploads take; 0: one monolithic
  ``PUT``, fastest where accepted);
* TLS — ``insecure`` (HTTPS without verification, falling back to plain HTTP) and
  ``ca_file`` (a PEM bundle trusted for this host, besides ``certs.d/<host:port>/*.crt``).

It is resolved from layers, each overriding the one before, field by field:

1. the defaults below;
2. :data:`KNOWN_REGISTRIES`: what barge knows of public registries (ECR's layer cap,
   GHCR's PATCH limit, Google's monolithic uploads);
3. ``hosts``: a :class:`HostTable` of entries keyed by prefix — the shape a
   ``registries.conf``-style configuration file maps onto (a later issue adds the file);
4. environment variables (``BARGE_CONNECT_TIMEOUT``, ``BARGE_STALL_TIMEOUT``,
   ``BARGE_RETRY_TIMEOUT``, ``BARGE_TIMEOUT``);
5. command-line flags (``--connect-timeout``, ``--stall-timeout``, ``--retry-timeout``,
   ``--timeout``), recorded for the running command by :func:`set_flag`; ``--insecure`` is
   passed by the caller (:func:`settings_for`'s ``insecure``).

Prefixes (containers-registries.conf's rule, with fnmatch for the wildcards): an entry
``host[:port][/namespace...]`` applies to a registry or reference it is a prefix of, at a
boundary (``example.com`` covers ``example.com:5000`` and ``example.com/team/vm``, not
``example.community``); an entry with ``*``/``?``/``[`` is a pattern over the host name
(``*.dkr.ecr.*.amazonaws.com``), or over ``host:port`` when it has a port. Among matching
entries the more specific wins: patterns before plain prefixes, shorter before longer.
A RegistryClient looks its settings up by registry, so only entries without a path apply to
the client; the push sizing looks up by reference.

The timing rules (``docs/pipeline.md``, "Waiting, retrying, giving up"):

* ``connect_timeout``: TCP connect plus TLS handshake, per attempt.
* ``stall_timeout``: an attempt fails when no byte moves for this long, in either direction
  (waiting for an answer, reading a body, a registry not taking an upload's bytes).
* ``retry_timeout``: a failed step is retried with backoff until this long has passed without
  progress. Progress is the furthest byte of the blob reached so far growing, so the budget
  keeps extending while a slow transfer moves and runs out only when it is stuck.
* ``timeout``: a deadline for all of one command's work with one registry (0: none).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from barge.errors import UsageError
from barge.reference import Reference, Registry, parse_registry

__all__ = [
    "ENV",
    "FLAGS",
    "KNOWN_REGISTRIES",
    "HostEntry",
    "HostSettings",
    "HostTable",
    "set_flag",
    "settings_for",
]

MiB = 1 << 20
TIMINGS = ("connect_timeout", "stall_timeout", "retry_timeout", "timeout")


@dataclass(frozen=True)
class HostSettings:
    """The settings for one registry host (timings in seconds, sizes in bytes)."""

    connect_timeout: float = 10.0
    stall_timeout: float = 30.0
    retry_timeout: float = 90.0
    timeout: float = 0.0  # 0: no deadline for the whole operation
    layer_limit: int | None = None  # layers per manifest the registry accepts; None: unknown
    upload_chunk: int = 0  # PATCH body size for uploads; 0: monolithic POST + PUT
    insecure: bool = False  # HTTPS without verification, falling back to plain HTTP
    ca_file: str | None = None  # a PEM bundle trusted for this host (besides certs.d)
    concurrency: int = 0  # parallel blob transfers of a pull from this host; 0: the command's

    def __post_init__(self) -> None:
        for name in TIMINGS:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
                raise UsageError(f"{name.replace('_', '-')} must be a number of seconds >= 0")
            if name != "timeout" and v == 0:
                raise UsageError(f"{name.replace('_', '-')} must be more than 0 seconds")
        if self.layer_limit is not None and self.layer_limit < 1:
            raise UsageError("layer-limit must be at least 1")
        if self.upload_chunk < 0:
            raise UsageError("upload-chunk must be a number of bytes >= 0")
        if not 0 <= self.concurrency <= 64:
            raise UsageError("concurrency must be a whole number from 0 to 64")

    @property
    def upload_chunk_size(self) -> int | None:
        """The PATCH body size, or None for a monolithic upload."""
        return self.upload_chunk or None

    def with_values(self, values: Mapping[str, Any], source: str) -> HostSettings:
        """A copy with ``values`` (field name -> value) applied; ``source`` names where they
        came from in error messages."""
        out: dict[str, Any] = {}
        for name, value in values.items():
            convert = _CONVERT.get(name)
            if convert is None:
                raise UsageError(f"{source}: unknown setting {name!r}")
            out[name] = convert(value, f"{source}: {name}")
        try:
            return replace(self, **out)
        except UsageError as e:
            raise UsageError(f"{source}: {e.message}") from None


@dataclass(frozen=True)
class HostEntry:
    """Settings for the registries (or repositories) ``prefix`` names; ``source`` says where
    the entry came from, for error messages ("built-in", "registries.conf line 3")."""

    prefix: str
    values: Mapping[str, Any]
    source: str = "settings"

    def __post_init__(self) -> None:
        p = self.prefix.strip().lower()
        if not p:
            raise UsageError(f"{self.source}: an empty registry prefix")
        if self.pattern and "/" in p:
            raise UsageError(f"{self.source}: a wildcard prefix names hosts only: {p!r}")
        object.__setattr__(self, "prefix", p)

    @property
    def pattern(self) -> bool:
        return any(c in self.prefix for c in "*?[")

    def specificity(self) -> tuple[int, int]:
        return (0 if self.pattern else 1, len(self.prefix))

    def matches(self, target: Registry | Reference) -> bool:
        """Does this entry apply to ``target`` (a registry, or a reference's repository)?"""
        registry = target if isinstance(target, Registry) else target.registry_host
        if self.pattern:
            return registry.matches(self.prefix)
        key = registry.name.lower()
        if isinstance(target, Reference):
            key += "/" + target.repository
        if key == self.prefix:
            return True
        return key.startswith(self.prefix) and key[len(self.prefix)] in "/:@"


class HostTable:
    """Entries looked up by prefix (module doc). ``HostTable.from_mapping({"ghcr.io":
    {"upload_chunk": 4194304}})`` builds one from a ``{prefix: {setting: value}}`` mapping."""

    def __init__(self, entries: Iterable[HostEntry] = ()) -> None:
        self.entries = tuple(entries)

    @classmethod
    def from_mapping(
        cls, hosts: Mapping[str, Mapping[str, Any]], source: str = "settings"
    ) -> HostTable:
        return cls(HostEntry(p, v, f"{source} for {p}") for p, v in hosts.items())

    def matching(self, target: Registry | Reference) -> list[HostEntry]:
        """The entries that apply to ``target``, least specific first (so applying them in
        order lets the most specific win)."""
        found = [e for e in self.entries if e.matches(target)]
        return sorted(found, key=HostEntry.specificity)  # stable: a later entry wins a tie

    def apply(self, settings: HostSettings, target: Registry | Reference) -> HostSettings:
        for entry in self.matching(target):
            settings = settings.with_values(entry.values, entry.source)
        return settings


#: What barge knows of public registries (below a user's own configuration).
#: Layer caps — ECR: its 2016 "Service Limits" page stated "Maximum number of layers per
#: image: 127 (this is the current Docker limit)"; today's quotas page lists no per-image
#: layer quota. barge keeps the conservative documented 127 until a larger cap is confirmed
#: on a real ECR push.
#: PATCH sizes — ghcr.io rejects chunked-upload PATCH bodies over 4 MiB; ECR's parts are
#: 5..10 MiB (all but the last), so 10 MiB; Google Artifact Registry and gcr.io take
#: monolithic uploads only (the default, 0).
KNOWN_REGISTRIES = HostTable(
    HostEntry(prefix, values, f"barge's knowledge of {prefix}")
    for prefix, values in (
        ("ghcr.io", {"upload_chunk": 4 * MiB}),
        ("*.dkr.ecr.*.amazonaws.com", {"layer_limit": 127, "upload_chunk": 10 * MiB}),
        ("*.dkr.ecr.*.amazonaws.com.cn", {"layer_limit": 127, "upload_chunk": 10 * MiB}),
        ("*.dkr-ecr.*.on.aws", {"layer_limit": 127, "upload_chunk": 10 * MiB}),
        ("*-docker.pkg.dev", {"upload_chunk": 0}),
        ("gcr.io", {"upload_chunk": 0}),
        ("*.gcr.io", {"upload_chunk": 0}),
    )
)

#: environment variable for each timing setting
ENV: dict[str, str] = {
    "connect_timeout": "BARGE_CONNECT_TIMEOUT",
    "stall_timeout": "BARGE_STALL_TIMEOUT",
    "retry_timeout": "BARGE_RETRY_TIMEOUT",
    "timeout": "BARGE_TIMEOUT",
}

#: command-line flag for each timing setting
FLAGS: dict[str, str] = {name: "--" + name.replace("_", "-") for name in ENV}

_flags: dict[str, float] = {}


def set_flag(name: str, value: float | None) -> None:
    """Record (or, with None, forget) a command-line value for ``name`` for this process."""
    if name not in ENV:
        raise KeyError(name)
    if value is None:
        _flags.pop(name, None)
    else:
        _flags[name] = _seconds(value, FLAGS[name])


def settings_for(
    target: Registry | Reference | str,
    *,
    hosts: HostTable | Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
    insecure: bool = False,
) -> HostSettings:
    """The settings for ``target`` (a registry, ``host[:port]``, or a reference, whose
    repository path then counts for prefixes): defaults, barge's knowledge of the registry,
    the matching ``hosts`` entries, the environment, command-line flags; ``insecure`` (the
    ``--insecure`` flag) turns verification off whatever the layers say."""
    if isinstance(target, str):
        target = parse_registry(target)
    s = KNOWN_REGISTRIES.apply(HostSettings(), target)
    if hosts is not None:
        table = hosts if isinstance(hosts, HostTable) else HostTable.from_mapping(hosts)
        s = table.apply(s, target)
    env = os.environ if environ is None else environ
    from_env = {name: env[var] for name, var in ENV.items() if env.get(var, "").strip()}
    for name, raw in from_env.items():
        s = s.with_values({name: raw}, ENV[name])
    for name, value in _flags.items():
        s = s.with_values({name: value}, FLAGS[name])
    if insecure and not s.insecure:
        s = replace(s, insecure=True)
    return s


def _seconds(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise UsageError(f"{what}: expected a number of seconds, got {value!r}")
    if isinstance(value, (int, float)):
        out = float(value)
    else:
        text = str(value).strip().lower().removesuffix("s").strip()
        try:
            out = float(text)
        except ValueError:
            raise UsageError(f"{what}: expected a number of seconds, got {value!r}") from None
    if math.isnan(out) or math.isinf(out) or out < 0:
        raise UsageError(f"{what}: expected a number of seconds >= 0, got {value!r}")
    return out


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UsageError(f"{what}: expected a whole number, got {value!r}")
    text = str(value).strip()
    if not text.isdigit():
        raise UsageError(f"{what}: expected a whole number >= 0, got {value!r}")
    return int(text)


def _limit(value: Any, what: str) -> int | None:
    return None if value is None else _count(value, what)


def _flag(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"{what}: expected true or false, got {value!r}")


def _path(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise UsageError(f"{what}: expected a file name, got {value!r}")
    return os.fspath(value)


_CONVERT: dict[str, Callable[[Any, str], Any]] = {
    **{name: _seconds for name in TIMINGS},
    "layer_limit": _limit,
    "upload_chunk": _count,
    "insecure": _flag,
    "ca_file": _path,
    "concurrency": _count,
}
assert set(_CONVERT) == {f.name for f in fields(HostSettings)}
