"""How long barge waits for a registry: the per-host network settings.

One :class:`HostSettings` holds every timing knob for one registry host. It is resolved from
layers, each overriding the one before:

1. the defaults below;
2. ``hosts``: per-host entries (``{"host:port": {"stall_timeout": 60}}``, exact host or
   ``fnmatch`` pattern), the shape a registry configuration file maps onto;
3. environment variables (``BARGE_CONNECT_TIMEOUT``, ``BARGE_STALL_TIMEOUT``,
   ``BARGE_RETRY_TIMEOUT``, ``BARGE_TIMEOUT``);
4. command-line flags (``--connect-timeout``, ``--stall-timeout``, ``--retry-timeout``,
   ``--timeout``), recorded for the running command by :func:`set_flag`.

The rules the numbers drive (``docs/pipeline.md``, "Waiting, retrying, giving up"):

* ``connect_timeout``: TCP connect plus TLS handshake, per attempt.
* ``stall_timeout``: an attempt fails when no byte moves for this long, in either direction
  (waiting for an answer, reading a body, a registry not taking an upload's bytes).
* ``retry_timeout``: a failed step is retried with backoff until this long has passed without
  progress. Progress is the furthest byte of the blob reached so far growing, so the budget
  keeps extending while a slow transfer moves and runs out only when it is stuck.
* ``timeout``: a deadline for all of one command's work with one registry (0: none).
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from barge.errors import UsageError

__all__ = ["ENV", "FLAGS", "HostSettings", "set_flag", "settings_for"]


@dataclass(frozen=True)
class HostSettings:
    """The timing settings for one registry host (seconds)."""

    connect_timeout: float = 10.0
    stall_timeout: float = 30.0
    retry_timeout: float = 90.0
    timeout: float = 0.0  # 0: no deadline for the whole operation

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
                raise UsageError(f"{f.name.replace('_', '-')} must be a number of seconds >= 0")
            if f.name != "timeout" and v == 0:
                raise UsageError(f"{f.name.replace('_', '-')} must be more than 0 seconds")

    def with_values(self, values: Mapping[str, Any], source: str) -> HostSettings:
        """A copy with ``values`` (field name -> seconds) applied; ``source`` names where they
        came from in error messages."""
        known = {f.name for f in fields(self)}
        out: dict[str, float] = {}
        for name, value in values.items():
            if name not in known:
                raise UsageError(f"{source}: unknown setting {name!r}")
            out[name] = _seconds(value, f"{source}: {name}")
        try:
            return replace(self, **out)
        except UsageError as e:
            raise UsageError(f"{source}: {e.message}") from None


#: environment variable for each setting
ENV: dict[str, str] = {
    "connect_timeout": "BARGE_CONNECT_TIMEOUT",
    "stall_timeout": "BARGE_STALL_TIMEOUT",
    "retry_timeout": "BARGE_RETRY_TIMEOUT",
    "timeout": "BARGE_TIMEOUT",
}

#: command-line flag for each setting
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
    host: str,
    *,
    hosts: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> HostSettings:
    """The settings for registry ``host`` (``host[:port]``): defaults, then the matching
    ``hosts`` entries (patterns first, the exact host last), then the environment, then
    command-line flags."""
    s = HostSettings()
    for pattern, values in sorted((hosts or {}).items(), key=lambda kv: kv[0] == host):
        if pattern == host or fnmatch.fnmatchcase(host, pattern):
            s = s.with_values(values, f"settings for {pattern}")
    env = os.environ if environ is None else environ
    from_env = {name: env[var] for name, var in ENV.items() if env.get(var, "").strip()}
    for name, raw in from_env.items():
        s = s.with_values({name: raw}, ENV[name])
    for name, value in _flags.items():
        s = s.with_values({name: value}, FLAGS[name])
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
