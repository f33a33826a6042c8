"""Registry commands: login, logout, inspect, tags."""

from __future__ import annotations

import sys
from typing import Any

import click

from barge.cli import echo, emit_json, format_option, main, timeout_options
from barge.errors import IntegrityError, UsageError
from barge.oci import CredentialStore, RegistryClient
from barge.oci.types import Descriptor, Manifest
from barge.reference import Reference, parse, parse_registry_host, parse_repository
from barge.untrusted import load_json

SIZE_ANNOTATIONS = (
    "dev.barge.disk.length",
    "org.cirruslabs.tart.uncompressed-size",
    "org.cirruslabs.vetu.uncompressed-size",
)
MAX_CONFIG = 4 << 20


@main.command()
@click.argument("host")
@click.option("-u", "--username", help="User name (prompted for when missing).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.option("--insecure", is_flag=True, help="Allow plain HTTP / unverified TLS.")
@timeout_options
def login(host: str, username: str | None, password_stdin: bool, insecure: bool) -> None:
    """Log in to a registry; credentials go to $BARGE_HOME/auth.json (mode 0600)."""
    registry = parse_registry_host(host)
    if username is None:
        username = click.prompt("Username", err=True)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, err=True)
    if not username or not password:
        raise UsageError("username and password must not be empty")
    with RegistryClient(
        registry, insecure=insecure, credentials=CredentialStore.fixed(username, password)
    ) as client:
        client.ping()
    CredentialStore().save(registry, username, password)
    echo(f"Login succeeded for {registry} as {username}")


@main.command()
@click.argument("host")
def logout(host: str) -> None:
    """Forget the credentials stored for a registry."""
    registry = parse_registry_host(host)
    if CredentialStore().remove(registry):
        echo(f"Removed credentials for {registry}")
    else:
        echo(f"barge: not logged in to {registry}", err=True)


def _uncompressed(desc: Descriptor) -> int | None:
    for key in SIZE_ANNOTATIONS:
        v = (desc.annotations or {}).get(key)
        if v and v.isdigit():
            return int(v)
    return None


def _platform_of(config: Any) -> str | None:
    if not isinstance(config, dict):
        return None
    os_ = config.get("os")
    arch = config.get("architecture") or config.get("arch")
    variant = config.get("variant")
    parts = [str(p) for p in (os_, arch, variant) if p]
    return "/".join(parts) or None


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)  # pragma: no cover


def _describe(client: RegistryClient, ref: Reference, m: Manifest) -> dict[str, Any]:
    out: dict[str, Any] = {"digest": m.digest, "mediaType": m.media_type, "size": m.size}
    if m.is_index:
        idx = m.index()
        out["manifests"] = [
            {
                "digest": d.digest,
                "mediaType": d.media_type,
                "size": d.size,
                "platform": str(d.platform) if d.platform else None,
            }
            for d in idx.manifests
        ]
        out["annotations"] = idx.annotations or {}
        return out
    img = m.image()
    config_doc: Any = None
    if img.config.size <= MAX_CONFIG:  # a huge config is not shown; the manifest still is
        try:
            config_doc = load_json(
                client.read_blob(ref, img.config.digest, max_size=MAX_CONFIG),
                f"config {img.config.digest}",
                max_size=MAX_CONFIG,
            )
        except ValueError:
            config_doc = None
    layers = []
    unc_total: int | None = 0
    for d in img.layers:
        u = _uncompressed(d)
        if u is None:
            unc_total = None
        elif unc_total is not None:
            unc_total += u
        layers.append(
            {"digest": d.digest, "mediaType": d.media_type, "size": d.size, "uncompressedSize": u}
        )
    manifest_level = _uncompressed(Descriptor("", img.config.digest, 0, img.annotations))
    if manifest_level is not None:
        unc_total = manifest_level
    if not img.layers and manifest_level is None:
        unc_total = None
    out.update(
        {
            "artifactType": img.artifact_type,
            "config": {
                "digest": img.config.digest,
                "mediaType": img.config.media_type,
                "size": img.config.size,
                "content": config_doc,
            },
            "platform": _platform_of(config_doc),
            "compressedSize": sum(d.size for d in img.layers),
            "uncompressedSize": unc_total,
            "annotations": img.annotations or {},
            "layers": layers,
        }
    )
    return out


@main.command()
@click.argument("ref")
@click.option("--raw", is_flag=True, help="Print the manifest exactly as served.")
@click.option("--insecure", is_flag=True, help="Allow plain HTTP / unverified TLS.")
@format_option
@timeout_options
def inspect(ref: str, raw: bool, insecure: bool, fmt: str) -> None:
    """Show an image's manifest, config, platform, sizes and layers."""
    r = parse(ref)
    with RegistryClient(r.registry, insecure=insecure) as client:
        m = client.get_manifest(r)
        if raw:
            click.echo(m.data.decode("utf-8", "replace"), nl=not m.data.endswith(b"\n"))
            return
        try:
            described = _describe(client, r, m)
        except ValueError as e:  # a malformed manifest (or index) from the registry
            raise IntegrityError(f"{r}: invalid manifest {m.digest}: {e}") from None
        info = {"reference": str(r), **described}
    if fmt == "json":
        emit_json(info)
        return
    echo(f"Reference:  {info['reference']}")
    echo(f"Digest:     {info['digest']}")
    echo(f"Media type: {info['mediaType']}")
    if "manifests" in info:
        echo("Manifests:")
        for d in info["manifests"]:
            echo(f"  {d['platform'] or '-':<20} {d['digest']}  {_human(d['size'])}")
        return
    echo(f"Config:     {info['config']['mediaType']} {info['config']['digest']}")
    echo(f"Platform:   {info['platform'] or '-'}")
    echo(
        f"Size:       {_human(info['compressedSize'])} compressed, "
        f"{_human(info['uncompressedSize'])} uncompressed"
    )
    if info["annotations"]:
        echo("Annotations:")
        for k, v in sorted(info["annotations"].items()):
            echo(f"  {k}={v}")
    echo(f"Layers ({len(info['layers'])}):")
    echo(f"  {'#':>3}  {'SIZE':>10}  {'UNCOMPRESSED':>12}  {'DIGEST':<19}  MEDIA TYPE")
    for i, layer in enumerate(info["layers"]):
        echo(
            f"  {i:>3}  {_human(layer['size']):>10}  {_human(layer['uncompressedSize']):>12}  "
            f"{layer['digest'][:19]:<19}  {layer['mediaType']}"
        )


@main.command()
@click.argument("repo")
@click.option("--insecure", is_flag=True, help="Allow plain HTTP / unverified TLS.")
@format_option
@timeout_options
def tags(repo: str, insecure: bool, fmt: str) -> None:
    """List a repository's tags."""
    r = parse_repository(repo)
    with RegistryClient(r.registry, insecure=insecure) as client:
        found = client.list_tags(r)
    if fmt == "json":
        emit_json({"repository": r.name, "tags": found})
        return
    for t in found:
        echo(t)
