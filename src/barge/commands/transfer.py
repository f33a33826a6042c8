"""Transfer commands: push and pull."""

from __future__ import annotations

import click

from barge import api
from barge.api import PullOptions, PushOptions
from barge.commands.common import (
    collector,
    echo,
    emit_json,
    format_option,
    no_mirrors_option,
    timeout_options,
    warn_config,
)
from barge.disk.codec import DEFAULT_CODEC
from barge.errors import UsageError
from barge.progress import ConsoleReporter
from barge.units import format_size, parse_size

commands = collector()


def _parse_labels(labels: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"invalid --label {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _split_formats(formats: tuple[str, ...]) -> tuple[str, str]:
    """``push --format``: (output format, image format) from up to one value of each kind."""
    output = [f for f in formats if f in ("text", "json")]
    image = [f for f in formats if f in ("barge", "tart")]
    if len(set(output)) > 1 or len(set(image)) > 1:
        raise UsageError(
            f"--format given conflicting values {', '.join(formats)}: at most one of text/json "
            "and one of barge/tart"
        )
    return (output[0] if output else "text"), (image[0] if image else "barge")


def _opt_size(value: str | None, what: str) -> int | None:
    return None if value is None else parse_size(value, what=what)


@commands.command()
@click.argument("name")
@click.argument("references", nargs=-1)
@click.option(
    "--index",
    "index_ref",
    metavar="REF",
    help="Push NAME and every further argument (all VM names) as one multi-platform image "
    "index at REF.",
)
@click.option(
    "--compression",
    default=None,
    help="zstd[:LEVEL] (default zstd:1), lz4 or none.",
)
@click.option(
    "--chunk-size", help="Disk bytes per layer (default 512M; raised to fit a layer cap)."
)
@click.option("--max-layers", type=click.IntRange(min=1), help="The registry's layer cap.")
@click.option(
    "--upload-chunk-size",
    help="PATCH body size for chunked uploads (default per registry; monolithic where allowed).",
)
@click.option("--concurrency", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--label", "labels", multiple=True, help="KEY=VALUE label in the OCI config.")
@click.option("--insecure", is_flag=True, help="Allow plain HTTP and unverified TLS.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option(
    "--format",
    "formats",
    multiple=True,
    type=click.Choice(["barge", "tart", "text", "json"]),
    help="Image format: barge (default) or tart (what Tart pulls); and/or output format: text "
    "(default) or json. Give it twice for both, e.g. --format tart --format json.",
)
@click.option(
    "--placeholder-nvram",
    is_flag=True,
    help="With --format tart, for a VM without nvram.bin: push a zero-filled 128 KiB NVRAM "
    "layer. Tart pulls it, but it is not a valid EFI variable store, so the VM will not boot "
    "until nvram.bin is replaced on the Mac. Without this flag such a push is refused.",
)
@timeout_options
def push(
    name: str,
    references: tuple[str, ...],
    compression: str | None,
    chunk_size: str | None,
    max_layers: int | None,
    upload_chunk_size: str | None,
    concurrency: int,
    labels: tuple[str, ...],
    insecure: bool,
    quiet: bool,
    formats: tuple[str, ...],
    index_ref: str | None = None,
    placeholder_nvram: bool = False,
) -> None:
    """Push local VM NAME to one or more REFERENCES (one upload, many tags).

    With --index REF, NAME and REFERENCES are all VM names, pushed as one OCI image index whose
    entries carry each VM's platform."""
    fmt, image_format = _split_formats(formats)
    if placeholder_nvram and image_format != "tart":
        raise UsageError("--placeholder-nvram is for --format tart (barge's format needs no NVRAM)")
    opts = PushOptions(
        codec=compression or DEFAULT_CODEC,
        chunk_size=_opt_size(chunk_size, "--chunk-size"),
        max_layers=max_layers,
        upload_chunk_size=_opt_size(upload_chunk_size, "--upload-chunk-size"),
        concurrency=concurrency,
        labels=_parse_labels(labels),
        insecure=insecure,
        format=image_format,
        placeholder_nvram=placeholder_nvram,
    )
    reporter = ConsoleReporter(quiet=quiet or fmt == "json")
    if index_ref is not None:
        try:
            ires = api.push_index([name, *references], index_ref, opts, reporter=reporter)
        finally:
            reporter.close()
        if fmt == "json":
            emit_json(ires.to_json())
            return
        for vm_name, plat, r in ires.entries:
            echo(f"pushed {vm_name} ({plat}) as {r.digest}", err=True)
        echo(f"{ires.reference}@{ires.digest}")
        return
    if not references:
        raise UsageError("give at least one destination reference (or --index REF)")
    try:
        res = api.push(name, list(references), opts, reporter=reporter)
    finally:
        reporter.close()
    if fmt == "json":
        emit_json(res.to_json())
        return
    if not quiet:
        s = res.stats
        echo(
            f"pushed {name}: {res.layers} layers ({format_size(res.chunk_size)} chunks), "
            f"uploaded {s.uploaded_blobs} blobs / {format_size(s.uploaded_bytes)}, "
            f"{s.existing_blobs} already there, {s.mounted_blobs} mounted",
            err=True,
        )
    for ref in res.references:
        echo(f"{ref}@{res.digest}" if not quiet else res.digest)


@commands.command()
@click.argument("reference")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=None,
    help="Parallel blob transfers [default: the host's concurrency setting, else 2].",
)
@click.option(
    "--platform", help="OS/ARCH to pick from a multi-platform index (default: this host)."
)
@click.option("--insecure", is_flag=True, help="Allow plain HTTP and unverified TLS.")
@no_mirrors_option
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@format_option
@timeout_options
def pull(
    reference: str,
    concurrency: int | None,
    platform: str | None,
    insecure: bool,
    no_mirrors: bool,
    quiet: bool,
    fmt: str,
) -> None:
    """Pull an image into the local cache (verified, sparse, fetching only what changed)."""
    warn_config(quiet=quiet or fmt == "json")
    reporter = ConsoleReporter(quiet=quiet or fmt == "json")
    try:
        res = api.pull(
            reference,
            PullOptions(
                concurrency=concurrency,
                insecure=insecure,
                platform=platform,
                mirrors=not no_mirrors,
            ),
            reporter=reporter,
        )
    finally:
        reporter.close()
    if fmt == "json":
        emit_json(res.to_json())
        return
    via = f" (manifest from {res.source})" if res.source else ""
    if res.up_to_date:
        echo(f"{reference} is up to date ({res.digest}){via}")
        return
    s = res.stats
    if not quiet:
        echo(
            f"fetched {format_size(s.fetched_bytes)}, reused {format_size(s.reused_bytes)} from local data",
            err=True,
        )
    echo(f"pulled {reference}@{res.digest}{via}")
