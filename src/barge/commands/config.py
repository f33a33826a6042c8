"""``barge config show REF``: the registry configuration in effect for a reference."""

from __future__ import annotations

import click

from barge import api
from barge.commands.common import collector, echo, emit_json, format_option, warn_config

commands = collector()


@commands.group()
def config() -> None:
    """The registry configuration (registries.conf, barge's per-host settings)."""


@config.command()
@click.argument("reference")
@click.option("--insecure", is_flag=True, help="As a command given --insecure would.")
@click.option("--no-mirrors", is_flag=True, help="As a command given --no-mirrors would.")
@format_option
def show(reference: str, insecure: bool, no_mirrors: bool, fmt: str) -> None:
    """Print where REFERENCE is read from (mirrors in order, then upstream) and each host's
    settings: TLS, CA file, timeouts, layer cap, upload chunk, concurrency. Never secrets."""
    warn_config(quiet=fmt == "json")
    info = api.registry_config(reference, insecure=insecure, mirrors=not no_mirrors)
    if fmt == "json":
        emit_json(info)
        return
    echo(f"reference: {info['reference']}")
    echo("files: " + (", ".join(info["files"]) or "none"))
    table = info["table"]
    if table is None:
        echo("registry table: none (the reference is read as it is named)")
    else:
        echo(f"registry table: prefix {table['prefix']!r} ({table['source']})")
    if info["blocked"]:
        echo("blocked: pulls of this reference are refused")
        return
    for n, src in enumerate(info["sources"], 1):
        how = f", pull-from-mirror {src['pullFromMirror']}" if src["pullFromMirror"] else ""
        echo(f"{n}. {src['role']} {src['reference']}{how}")
        s = src["settings"]
        echo(
            f"   tls: {'insecure (unverified, plain HTTP allowed)' if s['insecure'] else 'verified'}"
            f"; ca-file: {s['caFile'] or 'system + certs.d'}; credentials: {src['credentials']}"
        )
        echo(
            f"   timeouts: connect {s['connectTimeout']:g}s, stall {s['stallTimeout']:g}s, "
            f"retry {s['retryTimeout']:g}s, deadline {s['timeout'] or 'none'}"
        )
        echo(
            f"   layer-limit: {s['layerLimit'] or 'unknown'}; upload-chunk: "
            f"{s['uploadChunk'] or 'monolithic'}; concurrency: {s['concurrency'] or 'default'}"
        )
    echo(f"push: {info['push']}")
