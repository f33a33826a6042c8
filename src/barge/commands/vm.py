"""Local VM commands: create, list, get, set, clone, rename, delete."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from barge import api
from barge.api import CloneOptions, CreateOptions
from barge.commands.common import (
    collector,
    echo,
    emit_json,
    format_option,
    no_mirrors_option,
    timeout_options,
    warn,
    warn_config,
)
from barge.progress import ConsoleReporter
from barge.store import Store
from barge.units import format_size, parse_disk_size, parse_memory, parse_size
from barge.untrusted import printable

commands = collector()


def _disk_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return None if value is None else parse_disk_size(value)


def _memory(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return None if value is None else parse_memory(value)


DISK_SIZE_HELP = "a bare number is GB (20 = 20 GB, as Tart and Vetu); 20G is 20 GiB, 512M 512 MiB"
MEMORY_HELP = "a bare number is MiB (4096 = 4 GiB, as Tart and Vetu); or 4G, 512M"


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"used {int(seconds // size)}{unit} ago"
    return "used just now"


def _print_vm(info: dict[str, Any]) -> None:
    echo(f"name:     {info['name']}")
    echo(f"source:   {info['source']}")
    if info.get("reference"):
        echo(f"ref:      {info['reference']}")
    if info.get("digest"):
        echo(f"digest:   {info['digest']}")
    echo(f"platform: {info['os']}/{info['arch']}")
    echo(f"cpus:     {info['cpus']}")
    echo(f"memory:   {format_size(info['memory'])}")
    if info.get("macAddress"):
        echo(f"mac:      {info['macAddress']}")
    for d in info["disks"]:
        echo(
            f"disk:     {d['name']}  {format_size(d['size'])} "
            f"({format_size(d.get('allocated', 0))} allocated)"
        )
    echo(f"on disk:  {format_size(info['sizeOnDisk'])}")
    if info.get("boot"):
        echo(f"boot:     {info['boot']}")
    if info.get("kernel"):
        initrd = f" + {info['initramfs']}" if info.get("initramfs") else ""
        echo(f"kernel:   {info['kernel']}{initrd}")
        echo(f"cmdline:  {info.get('cmdline') or ''}")
    if info.get("nvram"):
        echo(f"nvram:    {info['nvram']}")
    if info.get("sshUser"):
        echo(f"ssh user: {info['sshUser']}")
    if info.get("state"):
        echo(f"state:    {_state_text(info)}")
    run = info.get("run") or {}
    for f in run.get("forwards", []):
        echo(f"publish:  {f['hostAddress']}:{f['hostPort']} -> {f['guestPort']}/{f['protocol']}")
    if run.get("vnc"):
        echo(f"vnc:      {run['vnc']}")
    if run.get("serialLog"):
        echo(f"serial:   {run['serialLog']}")


def _state_text(info: dict[str, Any]) -> str:
    run = info.get("run") or {}
    if not run.get("running"):
        return str(info.get("state", ""))
    where = f"ssh {run['ssh']}" if run.get("ssh") else f"{run.get('network')}, no address yet"
    return f"running ({where}, pid {run['pid']}, {run['accel']})"


@commands.command()
@click.argument("name")
@click.option(
    "--disk-size",
    callback=_disk_size,
    help=f"Disk size (grows an imported disk): {DISK_SIZE_HELP}.",
)
@click.option(
    "--from-disk",
    type=click.Path(path_type=Path),
    help="Import an existing raw or qcow2 image (kept sparse).",
)
@click.option("--cpus", "--cpu", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--memory", callback=_memory, default="4G", show_default=True, help=MEMORY_HELP)
@click.option("--os", "os_name", default="linux", show_default=True, help="linux, darwin, windows")
@click.option("--arch", default="x86_64", show_default=True, help="x86_64 or aarch64")
@click.option(
    "--boot",
    type=click.Choice(["uefi", "bios", "kernel"]),
    help="How the VM boots: UEFI firmware (the default), BIOS, or a kernel (--kernel).",
)
@click.option(
    "--kernel",
    type=click.Path(path_type=Path),
    help="Boot this Linux kernel directly (copied into the VM); implies --boot kernel.",
)
@click.option("--initramfs", type=click.Path(path_type=Path), help="The kernel's initramfs.")
@click.option("--cmdline", default="", help="The kernel command line, e.g. 'console=ttyS0'.")
@click.option("--user", "ssh_user", help="The guest user of `barge ssh/exec` (default: root).")
@format_option
def create(
    name: str,
    disk_size: int | None,
    from_disk: Path | None,
    cpus: int,
    memory: int,
    os_name: str,
    arch: str,
    boot: str | None,
    kernel: Path | None,
    initramfs: Path | None,
    cmdline: str,
    ssh_user: str | None,
    fmt: str,
) -> None:
    """Create a local VM with an empty sparse disk or an imported one."""
    info = api.create(
        name,
        CreateOptions(
            disk_size=disk_size,
            from_disk=from_disk,
            cpus=cpus,
            memory=memory,
            os=os_name,
            arch=arch,
            boot=boot,
            kernel=kernel,
            initramfs=initramfs,
            cmdline=cmdline,
            ssh_user=ssh_user,
        ),
    )
    if fmt == "json":
        emit_json(info)
    else:
        echo(f"created {info['name']} ({format_size(info['disks'][0]['size'])} disk)")


@commands.command(name="get")
@click.argument("name")
@format_option
def get_cmd(name: str, fmt: str) -> None:
    """Show one VM's configuration (a local VM, or a cached image by reference)."""
    info = api.get(name)
    if fmt == "json":
        emit_json(info)
    else:
        _print_vm(info)


@commands.command(name="set")
@click.argument("name")
@click.option("--cpus", "--cpu", type=click.IntRange(min=1), help="CPUs (--cpu as in Vetu).")
@click.option("--memory", callback=_memory, help=f"Memory: {MEMORY_HELP}.")
@click.option(
    "--disk-size", callback=_disk_size, help=f"New disk size, disks only grow: {DISK_SIZE_HELP}."
)
def set_cmd(name: str, cpus: int | None, memory: int | None, disk_size: int | None) -> None:
    """Change a VM's CPUs, memory or disk size (the forms Tart and Vetu take work too:
    `barge set --cpu 4 --memory 4096 --disk-size 20 NAME`)."""
    if cpus is None and memory is None and disk_size is None:
        raise click.UsageError("nothing to change: give --cpus, --memory or --disk-size")
    api.set_vm(name, cpus=cpus, memory=memory, disk_size=disk_size)
    echo(f"updated {name}")


@commands.command()
@click.argument("old")
@click.argument("new")
def rename(old: str, new: str) -> None:
    """Rename a local VM."""
    api.rename(old, new)
    echo(f"renamed {old} to {new}")


def list_rows(store: Store, source: str | None) -> list[dict[str, Any]]:
    """What ``list`` shows: local VMs, cached images, or (``source`` None) both."""
    rows: list[dict[str, Any]] = []
    if source in (None, "local"):
        rows += api.list_vms(store=store)
    if source in (None, "oci"):
        rows += api.list_images(store=store)
    return rows


@commands.command(name="list")
@click.option("-q", "--quiet", is_flag=True, help="Only names.")
@click.option(
    "--source", type=click.Choice(["local", "oci"]), help="Only local VMs or only cached images."
)
@format_option
def list_cmd(quiet: bool, source: str | None, fmt: str) -> None:
    """List local VMs and cached images."""
    rows = list_rows(Store(), source)
    if fmt == "json":
        emit_json(rows)
        return
    if quiet:
        for r in rows:
            echo(r.get("reference") or r["name"])
        return
    if not rows:
        return
    header = ("SOURCE", "NAME", "PLATFORM", "DISK", "ON DISK", "DIGEST", "STATE / LAST USED")
    table: list[tuple[str, ...]] = [header]
    now = time.time()
    for r in rows:
        digest = str(r.get("digest") or "")
        table.append(
            tuple(  # escaped before the widths are measured
                printable(str(c))
                for c in (
                    r["source"],
                    r.get("reference") or r["name"],
                    f"{r['os']}/{r['arch']}",
                    format_size(sum(d["size"] for d in r["disks"])),
                    format_size(r["sizeOnDisk"]),
                    digest.removeprefix("sha256:")[:12],
                    _ago(now - r["lastUsed"]) if r.get("lastUsed") else _state_text(r),
                )
            )
        )
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@commands.command()
@click.argument("source")
@click.argument("name")
@click.option("--concurrency", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--platform", help="OS/ARCH to pick from a multi-platform index.")
@click.option("--insecure", is_flag=True, help="Allow plain HTTP and unverified TLS.")
@no_mirrors_option
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option(
    "--force",
    is_flag=True,
    help="Clone a running VM too: paused for the copy, a crash-consistent copy.",
)
@timeout_options
def clone(
    source: str,
    name: str,
    concurrency: int,
    platform: str | None,
    insecure: bool,
    no_mirrors: bool,
    quiet: bool,
    force: bool,
) -> None:
    """Clone a local VM, or an image REFERENCE (pulled if needed), into a new local VM."""
    opts = CloneOptions(
        force=force,
        concurrency=concurrency,
        insecure=insecure,
        platform=platform,
        mirrors=not no_mirrors,
    )
    warn_config(quiet=quiet)
    reporter = ConsoleReporter(quiet=quiet)
    try:
        res = api.clone(source, name, opts, reporter=reporter)
    finally:
        reporter.close()
    if res.pulled is None:
        how = (
            "copy-on-write"
            if res.clone.method == "reflink"
            else f"sparse copy, {format_size(res.clone.bytes_written)} written"
        )
        echo(f"cloned {source} to {name} ({how})")
        return
    how = "copy-on-write" if res.clone.method == "reflink" else "sparse copy"
    echo(f"cloned {source}@{res.pulled.digest} to {name} ({how})")


@commands.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Stop a running VM first (QEMU quit), then delete.")
def delete(names: tuple[str, ...], force: bool) -> None:
    """Delete local VMs, or cached images by reference."""
    for n in names:
        for gone in api.delete(n, force=force, note=warn):
            echo(f"deleted {gone}")


@commands.command()
@click.option("--older-than", type=click.FloatRange(min=0), help="Remove images unused for DAYS.")
@click.option("--space-budget", help="Keep the cache under SIZE (least recently used go first).")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@format_option
def prune(older_than: float | None, space_budget: str | None, dry_run: bool, fmt: str) -> None:
    """Remove cached images: unreferenced ones, and by age or space budget. Never one in use."""
    budget = parse_size(space_budget, what="--space-budget") if space_budget else None
    res = api.prune(
        older_than=older_than * 86400 if older_than is not None else None,
        space_budget=budget,
        dry_run=dry_run,
    )
    removed = res.images
    if fmt == "json":
        emit_json(
            [{"digest": r.digest, "sizeOnDisk": r.size_on_disk, "dryRun": dry_run} for r in removed]
        )
        return
    verb = "would remove" if dry_run else "removed"
    for r in removed:
        echo(f"{verb} {r.digest} ({format_size(r.size_on_disk)})")
    freed = sum(r.size_on_disk for r in removed)
    echo(f"{verb} {len(removed)} images, {format_size(freed)}")
    if res.tmp_entries:
        n = res.tmp_entries
        echo(
            f"{verb} {n} abandoned {'entry' if n == 1 else 'entries'} of tmp/ (interrupted or "
            f"killed work), {format_size(res.tmp_bytes)}"
        )
