"""Registry commands: login, logout, inspect, tags."""

from __future__ import annotations

import sys

import click

from barge import api
from barge.commands.common import collector, echo, emit_json, format_option, timeout_options
from barge.errors import UsageError
from barge.reference import parse_registry_host
from barge.units import format_size

commands = collector()


def _human(n: int | None) -> str:
    """A size in the table, ``-`` where the image does not say."""
    return "-" if n is None else format_size(n)


@commands.command()
@click.argument("host")
@click.option("-u", "--username", help="User name (prompted for when missing).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.option("--insecure", is_flag=True, help="Allow plain HTTP / unverified TLS.")
@timeout_options
def login(host: str, username: str | None, password_stdin: bool, insecure: bool) -> None:
    """Log in to a registry; credentials go to $BARGE_HOME/auth.json (mode 0600)."""
    registry = parse_registry_host(host)  # a bad HOST is refused before any prompt
    if username is None:
        username = click.prompt("Username", err=True)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, err=True)
    if not username or not password:
        raise UsageError("username and password must not be empty")
    api.login(registry, username, password, insecure=insecure)
    echo(f"Login succeeded for {registry} as {username}")


@commands.command()
@click.argument("host")
def logout(host: str) -> None:
    """Forget the credentials stored for a registry."""
    registry, removed = api.logout(host)
    if removed:
        echo(f"Removed credentials for {registry}")
    else:
        echo(f"barge: not logged in to {registry}", err=True)


@commands.command()
@click.argument("ref")
@click.option("--raw", is_flag=True, help="Print the manifest exactly as served.")
@click.option("--insecure", is_flag=True, help="Allow plain HTTP / unverified TLS.")
@format_option
@timeout_options
def inspect(ref: str, raw: bool, insecure: bool, fmt: str) -> None:
    """Show an image's manifest, config, platform, sizes and layers."""
    if raw:
        data = api.raw_manifest(ref, insecure=insecure)
        click.echo(data.decode("utf-8", "replace"), nl=not data.endswith(b"\n"))
        return
    info = api.inspect(ref, insecure=insecure)
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


@commands.command()
@click.argument("repo")
@click.option("--insecure", is_flag=True, help="Allow plain HTTP / unverified TLS.")
@format_option
@timeout_options
def tags(repo: str, insecure: bool, fmt: str) -> None:
    """List a repository's tags."""
    name, found = api.list_tags(repo, insecure=insecure)
    if fmt == "json":
        emit_json({"repository": name, "tags": found})
        return
    for t in found:
        echo(t)
