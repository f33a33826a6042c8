"""``barge-vetu``: the command line of Vetu (cirruslabs/vetu), mapped onto barge.

Orchard's Linux workers drive VMs by running a ``vetu`` binary; installed as ``vetu`` (a
symlink to ``barge-vetu``), barge takes its place unchanged. Each command here parses Vetu's
forms (flags before or after the name, ``--flag=value``, bare numbers in Vetu's units) and
hands the work to barge's own command of the same meaning, so behaviour, messages and exit
codes are barge's; ``list --format json`` and ``fqn``, which Orchard parses, print Vetu's and
Tart's shapes from ``barge.api``. docs/orchard.md is the contract.

Networking: Orchard's ``vetu run ID`` names no network. ``$BARGE_VETU_NET_BRIDGED`` (a bridge)
makes it ``--net-bridged`` so that ``vetu ip`` prints the guest's own address, which Orchard
dials on port 22 and on forwarded ports; without it the VM gets barge's user-mode networking
and ``vetu ip`` prints ``127.0.0.1:PORT`` (SSH only).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import click

from barge import api
from barge.commands.common import collector, echo, emit_json
from barge.reference import looks_like_reference, parse
from barge.store import Store

#: Vetu's commands; ``barge.cli`` adds them to its ``barge-vetu`` group (``vetu_main``), whose
#: context object is barge's own group: the commands here hand their work to barge's commands.
commands = collector()

NET_BRIDGED_ENV = "BARGE_VETU_NET_BRIDGED"


def _barge(ctx: click.Context, *argv: str) -> Any:
    """Run barge's own command ``argv[0]`` with arguments ``argv[1:]`` in this process (the
    ``barge-vetu`` group's error handling and signal handling stay in force).

    What the command says on the way (``barge: …`` notes such as the KVM warning, a run's
    summary) goes to stdout: Orchard takes the first non-empty line of stderr as the error
    message of a failed command, so stderr holds only the error itself, printed by this group
    once the command has failed."""
    barge_group = ctx.find_root().obj
    assert isinstance(barge_group, click.Group), "barge-vetu runs under barge.cli.vetu_main"
    name, *args = argv
    cmd = barge_group.get_command(ctx, name)
    assert cmd is not None, name
    with (
        contextlib.redirect_stderr(sys.stdout),
        cmd.make_context(name, list(args), parent=ctx) as sub,
    ):
        return cmd.invoke(sub)


_concurrency = click.option(
    "--concurrency", type=click.IntRange(1, 64), default=4, show_default=True
)
_insecure = click.option("--insecure", is_flag=True, help="Plain HTTP to the registry.")


@commands.command()
@click.argument("remote_name")
@_concurrency
@_insecure
@click.pass_context
def pull(ctx: click.Context, remote_name: str, concurrency: int, insecure: bool) -> None:
    """Pull a VM image from a registry (`barge pull`)."""
    if not looks_like_reference(remote_name):  # as Vetu: a local name has nothing to pull
        echo(f"{remote_name!r} is a local image, nothing to pull here!")
        return
    extra = ["--insecure"] if insecure else []
    _barge(ctx, "pull", remote_name, "-q", "--concurrency", str(concurrency), *extra)


@commands.command()
@click.argument("name")
@click.argument("local_name")
@_concurrency
@_insecure
@click.pass_context
def clone(ctx: click.Context, name: str, local_name: str, concurrency: int, insecure: bool) -> None:
    """Clone a local VM or an image (pulled if needed) into LOCAL_NAME (`barge clone`)."""
    extra = ["--insecure"] if insecure else []
    _barge(ctx, "clone", name, local_name, "-q", "--concurrency", str(concurrency), *extra)


@commands.command(name="set")
@click.argument("name")
@click.option("--cpu", type=click.IntRange(min=0), default=0, help="CPUs (0: unchanged).")
@click.option(
    "--memory", type=click.IntRange(min=0), default=0, help="Memory in MiB (0: unchanged)."
)
@click.option(
    "--disk-size",
    type=click.IntRange(min=0),
    default=0,
    help="Grow the first disk to this many GB (10^9 bytes; 0: unchanged).",
)
@click.pass_context
def set_cmd(ctx: click.Context, name: str, cpu: int, memory: int, disk_size: int) -> None:
    """Change a VM's CPUs, memory (MiB) or disk size (GB) (`barge set`)."""
    args: list[str] = []
    for flag, value in (("--cpus", cpu), ("--memory", memory), ("--disk-size", disk_size)):
        if value:
            args += [flag, str(value)]  # bare numbers: barge takes them in Vetu's units
    if args:  # Vetu's `set NAME` without flags changes nothing and succeeds
        _barge(ctx, "set", name, *args)


@commands.command()
@click.argument("name")
@click.option(
    "--net-bridged",
    metavar="IF",
    default=lambda: os.environ.get(NET_BRIDGED_ENV) or None,
    help=f"Attach the VM to bridge IF [default: ${NET_BRIDGED_ENV}, else user-mode networking].",
)
@click.pass_context
def run(ctx: click.Context, name: str, net_bridged: str | None) -> None:
    """Run a VM in the foreground until it stops (`barge run`)."""
    extra = ["--net-bridged", net_bridged] if net_bridged else []
    _barge(ctx, "run", name, *extra)


@commands.command()
@click.argument("name")
@click.option(
    "--wait",
    type=click.IntRange(min=0),
    default=0,
    help="Seconds to wait for the VM to boot and its SSH to answer.",
)
@click.pass_context
def ip(ctx: click.Context, name: str, wait: int) -> None:
    """Print the VM's address: its own (bridged), or 127.0.0.1:PORT (user-mode) (`barge ip`)."""
    _barge(ctx, "ip", name, *(["--wait", str(wait)] if wait else []))


@commands.command()
@click.argument("name")
@click.option(
    "--timeout",
    type=click.IntRange(min=0),
    default=30,
    show_default=True,
    help="Seconds for each step: ACPI power-down, QEMU quit, kill.",
)
@click.pass_context
def stop(ctx: click.Context, name: str, timeout: int) -> None:
    """Stop a running VM (`barge stop`)."""
    _barge(ctx, "stop", name, "--timeout", str(timeout))


@commands.command()
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def delete(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Delete VMs, or cached images by reference; a running VM is stopped first."""
    _barge(ctx, "delete", "--force", *names)


def vetu_rows(source: str | None) -> list[dict[str, Any]]:
    """``list --format json`` as Tart prints it and Orchard reads it (``Name``, ``Source``,
    ``State``, ``Running``; sizes in whole GB as Tart's ``Disk``/``Size``)."""
    store = Store()
    rows = api.list_vms(store=store) if source in (None, "local") else []
    rows += api.list_images(store=store) if source in (None, "oci") else []
    out = []
    for r in rows:
        running = bool(r.get("running"))
        out.append(
            {
                "Source": r["source"],
                "Name": r.get("reference") or r["name"],
                "Disk": sum(d["size"] for d in r["disks"]) // 1000**3,
                "Size": r["sizeOnDisk"] // 1000**3,
                "SizeOnDisk": r["sizeOnDisk"],
                "State": "running" if running else "stopped",
                "Running": running,
            }
        )
    return out


@commands.command(name="list")
@click.option(
    "--source", type=click.Choice(["local", "oci"]), help="Only local VMs or only cached images."
)
@click.option("-q", "--quiet", is_flag=True, help="Only names.")
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
def list_cmd(source: str | None, quiet: bool, fmt: str) -> None:
    """List VMs (Vetu's table, or Tart's JSON objects with --format json)."""
    rows = vetu_rows(source)
    if fmt == "json":
        emit_json(rows)
        return
    if quiet:
        for r in rows:
            echo(r["Name"])
        return
    table = [("Source", "Name", "Size", "State")]
    table += [(r["Source"], r["Name"], f"{r['Size']} GB", r["State"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@commands.command()
@click.argument("name")
def fqn(name: str) -> None:
    """The fully qualified name: a cached image as REPOSITORY@DIGEST, a local VM as is."""
    if not looks_like_reference(name):
        Store().get_vm(name)
        echo(name)
        return
    digest = api.get(name)["digest"]
    echo(f"{parse(name).name}@{digest}")
