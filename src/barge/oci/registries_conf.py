"""The registry configuration file: containers-registries.conf(5) version 2, plus barge's keys.

Files read (each only when it exists), lowest precedence first:

1. the system file, ``/etc/containers/registries.conf`` (``$BARGE_SYSTEM_REGISTRIES_CONF``
   names another; set to the empty string, no system file is read);
2. its drop-ins, ``registries.conf.d/*.conf`` beside it, in lexical order;
3. barge's own file, ``$XDG_CONFIG_HOME/barge/registries.conf`` (default
   ``~/.config/barge/registries.conf``; ``$BARGE_REGISTRIES_CONF`` names another).

A later file overrides an earlier one as containers-registries.conf.d(5) says: a
``[[registry]]`` table with the same ``prefix`` replaces the earlier table whole; barge's
per-host keys are merged key by key (the later file's value wins).

Choosing a ``[[registry]]`` table (podman's rule): the reference, spelled
``host[:port]/repository[:tag|@digest]``, must start with the ``prefix`` and continue at a
separator (``/``, ``:``, ``@``) or end there; among matching tables the longest prefix wins.
A wildcard prefix ``*.example.com`` matches any subdomain of ``example.com`` (not
``example.com`` itself) and carries no ``location`` (the upstream is the reference as
named; a mirror's location replaces the matched host); a plain prefix beats a wildcard one. ``location`` replaces the prefix in the reference; the mirrors' locations do
the same, and are tried in order before it.

barge's own keys live in a separate table, which podman and skopeo do not read::

    [barge.hosts."registry.example.com"]
    connect-timeout = 5       # seconds
    stall-timeout = 30
    retry-timeout = 60
    timeout = 0               # a deadline for a whole command's work with the host
    layer-limit = 127         # layers per manifest the registry accepts
    upload-chunk = 4194304    # PATCH body size (0: monolithic uploads)
    ca-file = "/etc/ssl/site-ca.pem"
    concurrency = 8           # parallel blob transfers of a pull from this host

Their prefixes are :class:`~barge.oci.settings.HostEntry` prefixes; they become the ``hosts``
layer of :func:`~barge.oci.settings.settings_for`. ``insecure = true`` in a ``[[registry]]``
or mirror table makes that location's host insecure (a connection is per host).

A file that is not valid TOML, a key with a value of the wrong type, or a malformed location
is a :class:`~barge.errors.UsageError` naming the file, the line and the key. Keys this
module does not know are returned as warnings; keys of containers-registries.conf(5) that
barge has no use for (``unqualified-search-registries``, ``aliases``, ...) are accepted
silently.
"""

from __future__ import annotations

import os
import re
import threading
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from barge.errors import UsageError
from barge.oci.settings import HostEntry, HostSettings, HostTable
from barge.reference import Reference, ReferenceError, Registry, parse, parse_registry

__all__ = [
    "PULL_FROM_MIRROR",
    "HostSettingsFile",
    "Mirror",
    "RegistriesConf",
    "RegistryRule",
    "Source",
    "config_files",
    "load",
    "parse_text",
]

SYSTEM_FILE = "/etc/containers/registries.conf"
_DEFAULTS = HostSettings()
PULL_FROM_MIRROR = ("all", "digest-only", "tag-only")

#: containers-registries.conf(5) keys barge accepts without using them
_PODMAN_TOP = {
    "unqualified-search-registries",
    "credential-helpers",
    "short-name-mode",
    "aliases",
    "additional-layer-store-auth-helper",
    "registries",  # the deprecated version 1 tables
}
_REGISTRY_KEYS = {"prefix", "location", "insecure", "blocked", "mirror", "mirror-by-digest-only"}
_MIRROR_KEYS = {"location", "insecure", "pull-from-mirror"}
#: barge's per-host keys -> HostSettings fields
_BARGE_KEYS = {
    "connect-timeout": "connect_timeout",
    "stall-timeout": "stall_timeout",
    "retry-timeout": "retry_timeout",
    "timeout": "timeout",
    "layer-limit": "layer_limit",
    "upload-chunk": "upload_chunk",
    "ca-file": "ca_file",
    "concurrency": "concurrency",
}


@dataclass(frozen=True)
class Mirror:
    location: str
    insecure: bool = False
    pull_from_mirror: str = "all"
    source: str = ""

    def used_for(self, ref: Reference) -> bool:
        """Is this mirror tried for ``ref`` (by digest, or by tag)?"""
        if self.pull_from_mirror == "digest-only":
            return ref.digest is not None
        if self.pull_from_mirror == "tag-only":
            return ref.digest is None
        return True


@dataclass(frozen=True)
class RegistryRule:
    """One ``[[registry]]`` table. ``location`` is "" for a wildcard prefix (no rewrite)."""

    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirrors: tuple[Mirror, ...] = ()
    source: str = ""

    @property
    def wildcard(self) -> bool:
        return self.prefix.startswith("*.")

    def match_length(self, ref: Reference) -> int | None:
        """How much of ``ref`` this table's prefix covers, or None when it does not match."""
        if self.wildcard:
            host = ref.registry_host.hostname.lower()
            return len(self.prefix) if host.endswith(self.prefix[1:]) else None
        text = _spelling(ref)
        p = self.prefix
        if text == p or (text.startswith(p) and text[len(p)] in "/:@"):
            return len(p)
        return None

    def rewrite(self, ref: Reference, location: str) -> Reference:
        """``ref`` with this table's prefix replaced by ``location``."""
        if not location:
            return ref
        # a wildcard matched the host: the host is what a mirror's location replaces
        covered = len(ref.registry) if self.wildcard else len(self.prefix)
        rest = _spelling(ref)[covered:]
        try:
            return parse(location + rest)
        except ReferenceError as e:
            raise UsageError(
                f"{self.source}: {location + rest!r} is not a reference: {e}"
            ) from None


@dataclass(frozen=True)
class Source:
    """One place a reference can be read from: a mirror or the upstream location.
    ``name`` is the location as configured (the registry, for a reference without a table)."""

    role: str  # "mirror" | "upstream"
    name: str
    insecure: bool = False
    rule: RegistryRule | None = None
    mirror: Mirror | None = None

    @property
    def label(self) -> str:
        return f"{self.role} {self.name}"

    def at(self, ref: Reference) -> Reference:
        """``ref`` (a logical name) as this source spells it."""
        if self.rule is None:
            return ref
        return self.rule.rewrite(ref, self.mirror.location if self.mirror else self.rule.location)

    def used_for(self, ref: Reference) -> bool:
        return self.mirror is None or self.mirror.used_for(ref)


@dataclass(frozen=True)
class HostSettingsFile:
    """barge's per-host keys of one file, before they are merged."""

    values: Mapping[str, Mapping[str, Any]]
    sources: Mapping[str, str]


@dataclass
class RegistriesConf:
    """The merged configuration: ``[[registry]]`` tables and barge's host settings."""

    rules: tuple[RegistryRule, ...] = ()
    hosts: HostTable = field(default_factory=HostTable)
    files: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def rule_for(self, ref: Reference) -> RegistryRule | None:
        """The ``[[registry]]`` table for ``ref``: plain prefixes before wildcards, then the
        longest match."""
        best: tuple[int, int, RegistryRule] | None = None
        for rule in self.rules:
            n = rule.match_length(ref)
            if n is None:
                continue
            key = (0 if rule.wildcard else 1, n)
            if best is None or key > best[:2]:
                best = (key[0], key[1], rule)
        return best[2] if best else None

    def upstream(self, ref: Reference) -> Reference:
        """Where ``ref`` physically lives (its table's ``location``): pushes go there."""
        rule = self.rule_for(ref)
        return ref if rule is None else rule.rewrite(ref, rule.location)

    def sources(self, ref: Reference, *, mirrors: bool = True) -> list[Source]:
        """The places to read ``ref`` from, in order: the mirrors that apply (when
        ``mirrors``), then the upstream location. A blocked table raises UsageError."""
        rule = self.rule_for(ref)
        if rule is None:
            return [Source("upstream", ref.registry)]
        if rule.blocked:
            raise UsageError(
                f"{ref} is blocked by the registry configuration ({rule.source}: "
                f"prefix {rule.prefix!r})"
            )
        out: list[Source] = []
        if mirrors:
            for m in rule.mirrors:
                if m.used_for(ref):
                    out.append(Source("mirror", m.location, m.insecure, rule, m))
        upstream = rule.location or ref.registry
        out.append(Source("upstream", upstream, rule.insecure, rule))
        return out


# -- loading ---------------------------------------------------------------------------------


def config_files(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The files read, lowest precedence first (those that exist)."""
    env = os.environ if environ is None else environ
    out: list[Path] = []
    system = env.get("BARGE_SYSTEM_REGISTRIES_CONF", SYSTEM_FILE)
    if system:
        sp = Path(system)
        if sp.is_file():
            out.append(sp)
        dropins = sp.parent / (sp.stem + ".conf.d") if sp.suffix == ".conf" else None
        if dropins is not None and dropins.is_dir():
            out.extend(sorted(p for p in dropins.glob("*.conf") if p.is_file()))
    user = env.get("BARGE_REGISTRIES_CONF")
    if user is None:
        base = env.get("XDG_CONFIG_HOME") or str(
            Path(env.get("HOME", "~")).expanduser() / ".config"
        )
        user = str(Path(base) / "barge" / "registries.conf")
    if user and Path(user).is_file():
        out.append(Path(user))
    return out


_cache_lock = threading.Lock()
_cache: dict[tuple[Any, ...], RegistriesConf] = {}


def load(environ: Mapping[str, str] | None = None) -> RegistriesConf:
    """The merged configuration of :func:`config_files` (cached while the files are
    unchanged)."""
    files = config_files(environ)
    key = tuple((str(p), _mtime(p)) for p in files)
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    rules: dict[str, RegistryRule] = {}
    hosts: dict[str, dict[str, Any]] = {}
    where: dict[str, str] = {}
    warnings: list[str] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read the registry configuration {path}: {e}") from None
        file_rules, file_hosts, file_warnings = parse_text(text, str(path))
        for rule in file_rules:
            rules.pop(rule.prefix, None)  # a later file's table replaces it (and its place)
            rules[rule.prefix] = rule
        for prefix, values in file_hosts.values.items():
            hosts.setdefault(prefix, {}).update(values)
            where[prefix] = file_hosts.sources[prefix]
        warnings.extend(file_warnings)
    entries = [HostEntry(p, v, where[p]) for p, v in hosts.items()]
    for rule in rules.values():  # insecure: per host, where the connection is made
        for location, insecure, src in [(rule.location, rule.insecure, rule.source)] + [
            (m.location, m.insecure, m.source) for m in rule.mirrors
        ]:
            if insecure and location:
                entries.insert(0, HostEntry(_host_of(location), {"insecure": True}, src))
    conf = RegistriesConf(
        tuple(rules.values()), HostTable(entries), tuple(map(str, files)), tuple(warnings)
    )
    with _cache_lock:
        _cache[key] = conf
    return conf


def _mtime(p: Path) -> int:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return 0


def parse_text(text: str, name: str) -> tuple[list[RegistryRule], HostSettingsFile, list[str]]:
    """One file's ``[[registry]]`` tables, barge host settings and warnings."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{name}: not valid TOML: {e}") from None
    lines = _Lines(text)
    warnings: list[str] = []
    for key in doc:
        if key not in _PODMAN_TOP and key not in ("registry", "barge"):
            warnings.append(f"{name}:{lines.key(key)}: unknown key {key!r} ignored")
    tables = doc.get("registry", [])
    if not isinstance(tables, list):
        raise UsageError(f"{name}:{lines.key('registry')}: 'registry' must be [[registry]] tables")
    rules: list[RegistryRule] = []
    seen: dict[str, str] = {}
    for i, table in enumerate(tables):
        line = lines.table("registry", i)
        rule = _rule(table, name, line, lines, i, warnings)
        if rule.prefix in seen:
            raise UsageError(
                f"{name}:{line}: prefix {rule.prefix!r} is given twice (first at {seen[rule.prefix]})"
            )
        seen[rule.prefix] = f"line {line}"
        rules.append(rule)
    return rules, _barge_table(doc.get("barge", {}), name, lines, warnings), warnings


def _table(
    table: Any,
    header: str,
    known: set[str],
    name: str,
    line: int,
    lines: _Lines,
    warnings: list[str],
) -> Callable[[str], str]:
    """Check that ``table`` (the ``[[header]]`` at ``line``) is a table and warn about its
    unknown keys; returns ``at(key)``: "file:line" of a key in it."""
    if not isinstance(table, dict):
        raise UsageError(f"{name}:{line}: a [[{header}]] entry must be a table")

    def at(key: str) -> str:
        return f"{name}:{lines.key(key, after=line)}"

    for key in table:
        if key not in known:
            warnings.append(f"{at(key)}: unknown key {key!r} in [[{header}]] ignored")
    return at


def _rule(
    table: Any, name: str, line: int, lines: _Lines, index: int, warnings: list[str]
) -> RegistryRule:
    at = _table(table, "registry", _REGISTRY_KEYS, name, line, lines, warnings)
    location = _text(table, "location", at)
    if location:
        location = _check_location(location, at("location"), "location")
    prefix = _text(table, "prefix", at) or location
    if not prefix:
        raise UsageError(f"{name}:{line}: a [[registry]] table needs a prefix or a location")
    prefix = prefix.lower() if prefix.startswith("*.") else _lower_host(prefix)
    wildcard = prefix.startswith("*.")
    if wildcard:
        if "/" in prefix or "*" in prefix[1:]:
            raise UsageError(f"{at('prefix')}: prefix {prefix!r}: a wildcard is '*.domain' only")
        if location:
            raise UsageError(f"{at('location')}: a wildcard prefix ({prefix}) takes no location")
    else:
        _check_location(prefix, at("prefix"), "prefix")
        location = _check_location(location or prefix, at("location"), "location")
    insecure = _bool(table, "insecure", at)
    blocked = _bool(table, "blocked", at)
    by_digest = _bool(table, "mirror-by-digest-only", at)
    raw = table.get("mirror", [])
    if not isinstance(raw, list):
        raise UsageError(f"{at('mirror')}: 'mirror' must be [[registry.mirror]] tables")
    mirrors: list[Mirror] = []
    for j, m in enumerate(raw):
        mline = lines.table("registry.mirror", j, within=lines.table_span("registry", index))
        mirrors.append(_mirror(m, name, mline, lines, by_digest, warnings))
    src = f"{name}:{line}"
    for m in mirrors:
        if m.location == location:
            raise UsageError(f"{m.source}: mirror {m.location!r} is the registry's own location")
    if len({m.location for m in mirrors}) != len(mirrors):
        raise UsageError(f"{name}:{line}: a mirror location is listed twice")
    return RegistryRule(prefix, location, insecure, blocked, tuple(mirrors), src)


def _mirror(
    m: Any, name: str, line: int, lines: _Lines, by_digest: bool, warnings: list[str]
) -> Mirror:
    at = _table(m, "registry.mirror", _MIRROR_KEYS, name, line, lines, warnings)
    location = _text(m, "location", at)
    if not location:
        raise UsageError(f"{name}:{line}: a [[registry.mirror]] table needs a location")
    location = _check_location(location, at("location"), "location")
    how = _text(m, "pull-from-mirror", at) or "all"
    if how not in PULL_FROM_MIRROR:
        raise UsageError(
            f"{at('pull-from-mirror')}: pull-from-mirror must be one of "
            f"{', '.join(PULL_FROM_MIRROR)}, not {how!r}"
        )
    if by_digest:  # the registry's mirror-by-digest-only = true covers its mirrors
        how = "digest-only"
    return Mirror(location, _bool(m, "insecure", at), how, f"{name}:{line}")


def _barge_table(raw: Any, name: str, lines: _Lines, warnings: list[str]) -> HostSettingsFile:
    if not isinstance(raw, dict):
        raise UsageError(f"{name}:{lines.key('barge')}: 'barge' must be a table")
    values: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    for key, sub in raw.items():
        if key != "hosts":
            line = lines.key(key, after=lines.header_containing("barge"))
            if isinstance(sub, dict):
                line = lines.header_containing(f"barge.{key}")
            warnings.append(f"{name}:{line}: unknown key {key!r} in [barge] ignored")
            continue
        if not isinstance(sub, dict):
            raise UsageError(f"{name}:{lines.key('hosts')}: [barge.hosts] must be a table")
        for prefix, table in sub.items():
            line = lines.header_containing(prefix)
            if not isinstance(table, dict):
                raise UsageError(f"{name}:{line}: [barge.hosts.{prefix!r}] must be a table")
            out: dict[str, Any] = {}
            for k, v in table.items():
                kline = lines.key(k, after=line)
                field_name = _BARGE_KEYS.get(k)
                if field_name is None:
                    warnings.append(
                        f"{name}:{kline}: unknown key {k!r} in [barge.hosts.{prefix!r}] ignored"
                    )
                    continue
                out[field_name] = v
            try:  # checked here so the error names the line
                entry = HostEntry(prefix, out, f"{name}:{line}")
                HostTable([entry]).apply(_DEFAULTS, _probe(entry))
            except UsageError as e:
                raise UsageError(f"{name}:{line}: [barge.hosts.{prefix!r}]: {e.message}") from None
            values[entry.prefix] = out
            sources[entry.prefix] = f"{name}:{line}"
    return HostSettingsFile(values, sources)


def _probe(entry: HostEntry) -> Registry:
    """A registry ``entry`` applies to (to check its values)."""
    if entry.pattern:
        return parse_registry("probe.invalid")
    return parse_registry(entry.prefix.split("/", 1)[0])


def _text(table: Mapping[str, Any], key: str, at: Any) -> str:
    v = table.get(key, "")
    if not isinstance(v, str):
        raise UsageError(f"{at(key)}: {key} must be a string, not {v!r}")
    return v.strip()


def _bool(table: Mapping[str, Any], key: str, at: Any) -> bool:
    v = table.get(key, False)
    if not isinstance(v, bool):
        raise UsageError(f"{at(key)}: {key} must be true or false, not {v!r}")
    return v


def _lower_host(text: str) -> str:
    host, sep, rest = text.partition("/")
    return host.lower() + sep + rest


def _check_location(text: str, where: str, key: str) -> str:
    """``host[:port][/namespace...]`` (a tag or digest allowed at the end, as podman does)."""
    if "://" in text or text.endswith("/") or "//" in text or any(c.isspace() for c in text):
        raise UsageError(f"{where}: {key} {text!r} is not host[:port][/namespace...]")
    try:
        parse_registry(text.split("/", 1)[0])
        if "/" in text:
            parse(text)
    except ReferenceError as e:
        raise UsageError(
            f"{where}: {key} {text!r} is not host[:port][/namespace...]: {e}"
        ) from None
    return _lower_host(text)


def _host_of(location: str) -> str:
    return parse_registry(location.split("/", 1)[0]).name


def _spelling(ref: Reference) -> str:
    text = f"{ref.registry}/{ref.repository}"
    if ref.tag:
        text += ":" + ref.tag
    if ref.digest:
        text += "@" + ref.digest
    return text


class _Lines:
    """Line numbers for error messages (tomllib gives none for values)."""

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers: list[tuple[int, str]] = []  # (line number, header name)
        for n, line in enumerate(self.lines, 1):
            m = self._HEADER.match(line)
            if m:
                self.headers.append((n, re.sub(r"\s*\.\s*", ".", m.group(2))))

    def table(self, header: str, index: int, within: tuple[int, int] | None = None) -> int:
        """The line of the ``index``-th ``[[header]]`` (within a line span)."""
        lo, hi = within or (1, len(self.lines) + 1)
        found = [n for n, h in self.headers if h == header and lo <= n < hi]
        return found[index] if index < len(found) else lo

    def table_span(self, header: str, index: int) -> tuple[int, int]:
        start = self.table(header, index)
        after = [n for n, h in self.headers if h == header and n > start]
        return start, after[0] if after else len(self.lines) + 1

    def header_containing(self, name: str) -> int:
        for n, h in self.headers:
            if name in h:
                return n
        return 1

    def key(self, key: str, after: int = 0) -> int:
        """The first line at or after ``after`` that sets ``key`` (the table's line if none)."""
        pattern = re.compile(rf"^\s*([\"']?){re.escape(key)}\1\s*=")
        heads = {h for h, _ in self.headers}
        for n in range(after + 1 if after else 1, len(self.lines) + 1):
            if n in heads:
                break
            if pattern.match(self.lines[n - 1]):
                return n
        return after or 1
