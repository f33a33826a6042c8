"""The fleet figure: N hosts (N separate ``BARGE_HOME``s, started at once) pulling the
reference image through one pull-through mirror (``docker-registry`` in proxy mode in front of
the upstream), and the same N pulling straight from the upstream (``--no-mirrors``).

For each: the wall time until the last pull ends, the bytes of blobs the upstream served and
the bytes the mirror served (both from the registries' access logs). The target is that the
upstream serves one copy of the image through the mirror (at most 1.05x its compressed size).
A third run warms the cold mirror with one host before the others start: distribution's proxy
mode does not share one upstream fetch between concurrent requests for the same blob.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import BARGE, OUT, Registry

HOSTS = 8


@dataclass
class FleetRun:
    seconds: float
    upstream_bytes: int
    upstream_requests: int
    mirror_bytes: int
    failures: list[str]


def _pull_all(ref: str, homes: list[Path], env: dict[str, str], extra: list[str]) -> list[str]:
    """Start one `barge pull` per home at once; wait for all; the failures' last lines."""
    procs = []
    for home in homes:
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        procs.append(
            subprocess.Popen(
                [BARGE, "pull", "--quiet", "--format", "json", *extra, ref],
                env={**os.environ, **env, "BARGE_HOME": str(home)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    failures = []
    for p in procs:
        _out, err = p.communicate(timeout=3600)
        if p.returncode != 0:
            failures.append(err.strip().splitlines()[-1] if err.strip() else f"exit {p.returncode}")
    return failures


def _mirror(upstream: Registry) -> tuple[Registry, Any]:
    """A fresh (cold) pull-through mirror of ``upstream``."""
    from registries import start_registry

    mirror_dir = OUT / "work" / "registry-fleet-mirror"
    shutil.rmtree(mirror_dir, ignore_errors=True)
    running = start_registry(
        mirror_dir,
        extra={
            "log": {"level": "warn", "accesslog": {"disabled": False}},
            "proxy": {"remoteurl": upstream.url},
        },
    )
    return Registry(running.host, mirror_dir, running.log_path, running.process), running


def measure(ref: str, upstream: Registry, work: Path, hosts: int = HOSTS) -> dict[str, Any]:
    """Three runs, each with fresh homes: ``mirror`` (N at once through a cold mirror),
    ``warmed`` (one host first through a cold mirror, then the other N-1 at once; the figures
    cover all N) and ``direct`` (N at once with ``--no-mirrors``). Each mirror is started and
    stopped (by PID) here."""
    homes = [work / f"fleet-home-{i}" for i in range(hosts)]
    out: dict[str, Any] = {"hosts": hosts}
    for name in ("mirror", "warmed", "direct"):
        mirror, running = _mirror(upstream)
        conf = work / "fleet-registries.conf"
        conf.write_text(
            f'[[registry]]\nprefix = "{upstream.host}"\n'
            f'[[registry.mirror]]\nlocation = "{mirror.host}"\n'
        )
        env = {"BARGE_REGISTRIES_CONF": str(conf), "BARGE_SYSTEM_REGISTRIES_CONF": ""}
        extra = ["--no-mirrors"] if name == "direct" else []
        try:
            up0, m0 = upstream.log_size(), mirror.log_size()
            t0 = time.perf_counter()
            if name == "warmed":
                failures = _pull_all(ref, homes[:1], env, extra)
                failures += _pull_all(ref, homes[1:], env, extra)
            else:
                failures = _pull_all(ref, homes, env, extra)
            seconds = time.perf_counter() - t0
            up_bytes, up_n = upstream.blob_get_bytes(up0)
            m_bytes = mirror.blob_get_bytes(m0)[0]
            out[name] = FleetRun(seconds, up_bytes, up_n, m_bytes, failures).__dict__
        finally:
            mirror.stop()
            running.process = None
            shutil.rmtree(mirror.workdir, ignore_errors=True)
            for h in homes:
                shutil.rmtree(h, ignore_errors=True)
    return out
