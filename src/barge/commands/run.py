"""Running VMs: run, stop, ip, ssh, exec (``barge.vm.runner`` does the work)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from barge.commands.common import collector, echo, emit_json, format_option, warn
from barge.store import Store
from barge.units import parse_memory
from barge.vm import access, net, runner

commands = collector()

F = TypeVar("F", bound=Callable[..., Any])


def _memory(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return None if value is None else parse_memory(value)


@commands.command()
@click.argument("name")
@click.option("-d", "--detach", is_flag=True, help="Return once QEMU is up; the VM keeps running.")
@click.option(
    "--cpus", "--cpu", type=click.IntRange(min=1), help="CPUs for this run (default: the VM's)."
)
@click.option(
    "--memory",
    callback=_memory,
    help="Memory for this run, e.g. 2G; a bare number is MiB (as Tart and Vetu).",
)
@click.option(
    "--serial", is_flag=True, help="The serial console on this terminal (keys go to the guest)."
)
@click.option("--vnc", is_flag=True, help="A VNC display on 127.0.0.1 (the port is printed).")
@click.option("--graphics", is_flag=True, help="A window on this host's display.")
@click.option(
    "--net-bridged", metavar="IF", help="A tap on bridge IF instead of user-mode networking (root)."
)
@click.option(
    "-p",
    "--publish",
    multiple=True,
    metavar="[ADDR:]HOST:GUEST[/udp]",
    help="Forward a host port (127.0.0.1 unless ADDR) to a guest port; repeatable.",
)
@click.option(
    "--disk", "disks", multiple=True, metavar="FILE[:ro]", help="An extra disk; repeatable."
)
@click.option(
    "--cloud-init",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Your own cloud-init user-data instead of barge's (which installs barge's SSH key).",
)
@click.option("--no-cloud-init", is_flag=True, help="Attach no NoCloud seed.")
@click.option(
    "--accel",
    type=click.Choice(["auto", "kvm", "tcg"]),
    default=lambda: os.environ.get("BARGE_ACCEL", "auto"),
    show_default="auto, or $BARGE_ACCEL",
    help="KVM when usable (auto), or insist on one.",
)
def run(
    name: str,
    detach: bool,
    cpus: int | None,
    memory: int | None,
    serial: bool,
    vnc: bool,
    graphics: bool,
    net_bridged: str | None,
    publish: tuple[str, ...],
    disks: tuple[str, ...],
    cloud_init: Path | None,
    no_cloud_init: bool,
    accel: str,
) -> None:
    """Boot a local VM on QEMU: in the foreground until it powers off (Ctrl-C asks it to power
    off through ACPI, a second Ctrl-C stops QEMU), or --detach."""
    if cloud_init is not None and no_cloud_init:
        raise click.UsageError("--cloud-init and --no-cloud-init exclude each other")
    opts = runner.RunOptions(
        cpus=cpus,
        memory=memory,
        detach=detach,
        serial=serial,
        vnc=vnc,
        graphics=graphics,
        net_bridged=net_bridged,
        publish=[net.parse_publish(p) for p in publish],
        disks=list(disks),
        cloud_init=cloud_init,
        no_cloud_init=no_cloud_init,
        accel=accel,
    )
    store = Store()
    started = runner.start(store, name, opts, warn)
    where = [f"ssh {started.endpoint}" if started.endpoint else f"bridged on {net_bridged}"]
    if started.vnc:
        where.append(f"vnc {started.vnc}")
    summary = f"{name} is running ({', '.join(where)}; serial log {started.serial_log})"
    if detach:
        echo(summary)
        return
    if not serial:
        warn(summary)
    res = runner.supervise(started, warn)
    warn(f"{name} stopped ({'powered off' if res.how == 'poweroff' else 'QEMU ' + res.how})")
    sys.exit(res.exit_code)


@commands.command()
@click.argument("name")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds for each step: ACPI power-down, then QMP quit, then kill.",
)
def stop(name: str, timeout: float) -> None:
    """Stop a running VM: ACPI power-down, then QEMU quit, then its process, each after TIMEOUT."""
    res = runner.stop(Store(), name, timeout, warn)
    how = {"acpi": "powered off", "quit": "QEMU quit", "kill": "QEMU killed"}[res.how]
    echo(f"stopped {name} ({how}, {res.seconds:.1f} s)")


@commands.command()
@click.argument("name")
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    help="Wait up to this many seconds for the guest's SSH to answer.",
)
@format_option
def ip(name: str, wait: float | None, fmt: str) -> None:
    """Where a running guest's SSH answers: ADDRESS:PORT (user-mode) or ADDRESS (bridged, port 22)."""
    ep = runner.endpoint(Store(), name, wait)
    if fmt == "json":
        emit_json({"address": ep.host, "port": ep.port})
    else:
        echo(ep.address)


_access_options = [
    click.option("--user", "-u", help="Guest user (default: the VM's, else root)."),
    click.option(
        "--identity",
        "-i",
        type=click.Path(path_type=Path, dir_okay=False),
        help="Private key (default: the store's key, $BARGE_HOME/ssh/id_ed25519).",
    ),
    click.option(
        "--wait",
        type=click.FloatRange(min=0),
        help="Wait up to this many seconds for the guest's SSH first.",
    ),
]


def _with_access(f: F) -> F:
    for opt in reversed(_access_options):
        f = opt(f)
    return f


@commands.command(
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.argument("name")
@_with_access
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def ssh(
    name: str, user: str | None, identity: Path | None, wait: float | None, command: tuple[str, ...]
) -> None:
    """Open a shell in a running guest, or run `-- CMD…` there (the words as ssh passes them)."""
    words = list(command[1:] if command[:1] == ("--",) else command)
    interactive = not words and sys.stdin.isatty()
    argv = runner.ssh_argv(
        Store(),
        name,
        words or None,
        user=user,
        identity=identity,
        wait=wait,
        interactive=interactive,
        quote=False,
    )
    sys.exit(access.run_ssh(argv))


@commands.command(
    name="exec",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.argument("name")
@_with_access
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_cmd(
    name: str, user: str | None, identity: Path | None, wait: float | None, command: tuple[str, ...]
) -> None:
    """Run CMD… in a running guest (each word passed as is): its stdout, stderr and exit code."""
    words = list(command[1:] if command[:1] == ("--",) else command)
    if not words:
        raise click.UsageError("give a command to run")
    argv = runner.ssh_argv(Store(), name, words, user=user, identity=identity, wait=wait)
    sys.exit(access.run_ssh(argv))
