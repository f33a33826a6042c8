"""Distribution commands beyond push/pull: copy, tag, verify, export, import."""

from __future__ import annotations

import click

from barge import api
from barge.api import CopyOptions, ExportOptions, ImportOptions, VerifyOptions
from barge.commands.common import (
    collector,
    echo,
    emit_json,
    format_option,
    no_mirrors_option,
    timeout_options,
    warn_config,
)
from barge.errors import ExitCode
from barge.progress import ConsoleReporter
from barge.units import format_size, parse_size

commands = collector()

_concurrency = click.option(
    "--concurrency", type=click.IntRange(1, 64), default=4, show_default=True
)
_insecure = click.option("--insecure", is_flag=True, help="Allow plain HTTP and unverified TLS.")
_quiet = click.option("-q", "--quiet", is_flag=True, help="No progress output.")


@commands.command()
@click.argument("source")
@click.argument("destination")
@click.option(
    "--platform", help="OS/ARCH to copy from a multi-platform index (default: the whole index)."
)
@click.option("--all-tags", is_flag=True, help="Copy every tag of the source repository.")
@click.option("--verify", "do_verify", is_flag=True, help="Verify the destination afterwards.")
@click.option("--deep", is_flag=True, help="With --verify: decode and check every chunk.")
@_concurrency
@_insecure
@no_mirrors_option
@_quiet
@format_option
@timeout_options
def copy(
    source: str,
    destination: str,
    platform: str | None,
    all_tags: bool,
    do_verify: bool,
    deep: bool,
    concurrency: int,
    insecure: bool,
    no_mirrors: bool,
    quiet: bool,
    fmt: str,
) -> None:
    """Copy an image between registries and OCI layouts, keeping its digest.

    SOURCE and DESTINATION are registry references (host[:port]/repo[:tag][@digest]),
    oci:DIR[:tag] or oci-archive:FILE[:tag]. Blobs stream from source to destination; blobs
    the destination has are skipped (a re-run resumes), and within one registry they are
    mounted, not uploaded.
    """
    opts = CopyOptions(
        concurrency=concurrency,
        insecure=insecure,
        platform=platform,
        all_tags=all_tags,
        mirrors=not no_mirrors,
    )
    check = VerifyOptions(deep=deep, remote=True, concurrency=concurrency, insecure=insecure)
    warn_config(quiet=quiet or fmt == "json")
    reporter = ConsoleReporter(quiet=quiet or fmt == "json")
    try:
        res = api.copy(source, destination, opts, reporter=reporter)
        # copy --verify: the copy, then a verification of every image where it is now
        verified = [
            api.verify(img.destination, check, reporter=reporter)
            for img in res.images
            if do_verify or deep
        ]
    finally:
        reporter.close()
    bad = [v for v in verified if not v.ok]
    if fmt == "json":
        doc = res.to_json()
        notes = doc.pop("notes")
        emit_json({**doc, "verified": [v.to_json() for v in verified], "notes": notes})
    else:
        s = res.stats
        if not quiet:
            echo(
                f"copied {s.manifests} manifests: {s.copied_blobs} blobs / "
                f"{format_size(s.copied_bytes)} sent, {s.existing_blobs} already there, "
                f"{s.mounted_blobs} mounted",
                err=True,
            )
        for img in res.images:
            echo(img.destination)
        for v in verified:
            echo(v.verdict())
    if bad:
        click.get_current_context().exit(ExitCode.INTEGRITY)


@commands.command()
@click.argument("reference")
@click.argument("new_tags", nargs=-1, required=True)
@_insecure
@format_option
@timeout_options
def tag(reference: str, new_tags: tuple[str, ...], insecure: bool, fmt: str) -> None:
    """Add tags to an image in a registry (no blob moves).

    Each NEW_TAG is a bare tag (same repository) or a full reference in the same registry
    (the blobs are mounted there first).
    """
    res = api.tag(reference, list(new_tags), insecure=insecure)
    if fmt == "json":
        emit_json(res.to_json())
        return
    for ref in res.references:
        echo(f"{ref}@{res.digest}")


@commands.command()
@click.argument("target")
@click.option("--deep", is_flag=True, help="Decode every chunk and frame and check its digest.")
@click.option(
    "--remote",
    is_flag=True,
    help="Check the image in the registry (or OCI layout) even when the reference is cached.",
)
@click.option("--platform", help="Verify only this OS/ARCH of a multi-platform index.")
@_concurrency
@_insecure
@_quiet
@format_option
@timeout_options
def verify(
    target: str,
    deep: bool,
    remote: bool,
    platform: str | None,
    concurrency: int,
    insecure: bool,
    quiet: bool,
    fmt: str,
) -> None:
    """Verify an image: a registry reference, a cached image, a local VM or an OCI layout.

    Every blob's size and digest is checked; with --deep every barge chunk and frame (and
    every Tart/Vetu chunk) is decompressed and checked against its uncompressed digest.
    Exits 6 naming the first bad blob when anything is wrong.
    """
    reporter = ConsoleReporter(quiet=quiet or fmt == "json")
    try:
        rep = api.verify(
            target,
            VerifyOptions(
                deep=deep,
                remote=remote,
                platform=platform,
                concurrency=concurrency,
                insecure=insecure,
            ),
            reporter=reporter,
        )
    finally:
        reporter.close()
    if fmt == "json":
        emit_json(rep.to_json())
    else:
        echo(rep.verdict())
        if not rep.ok:
            for f in rep.faults[1:]:
                echo(f"  also: {f}", err=True)
    if not rep.ok:
        click.get_current_context().exit(ExitCode.INTEGRITY)


@commands.command()
@click.argument("source")
@click.argument("path")
@click.option("--platform", help="OS/ARCH to export from a multi-platform index.")
@click.option("--compression", default=None, help="For a local VM: zstd[:LEVEL], lz4 or none.")
@click.option("--chunk-size", help="For a local VM: disk bytes per layer.")
@_concurrency
@_insecure
@_quiet
@format_option
@timeout_options
def export(
    source: str,
    path: str,
    platform: str | None,
    compression: str | None,
    chunk_size: str | None,
    concurrency: int,
    insecure: bool,
    quiet: bool,
    fmt: str,
) -> None:
    """Write a local VM or a registry image as an OCI image layout.

    PATH is oci:DIR[:tag], oci-archive:FILE[:tag], a FILE ending in .tar (an archive) or a
    directory. skopeo and other OCI tools read the result as it is.
    """
    opts = ExportOptions(
        platform=platform,
        codec=compression,
        chunk_size=parse_size(chunk_size, what="--chunk-size") if chunk_size else None,
        concurrency=concurrency,
        insecure=insecure,
    )
    reporter = ConsoleReporter(quiet=quiet or fmt == "json")
    try:
        res = api.export(source, path, opts, reporter=reporter)
    finally:
        reporter.close()
    if fmt == "json":
        emit_json(res.to_json())
        return
    echo(f"{res.destination}@{res.digest}")


@commands.command("import")
@click.argument("path")
@click.argument("name")
@click.option("--platform", help="OS/ARCH to import from a multi-platform index.")
@_concurrency
@_quiet
@format_option
def import_(
    path: str, name: str, platform: str | None, concurrency: int, quiet: bool, fmt: str
) -> None:
    """Make local VM NAME from an OCI image layout (directory or archive).

    PATH is oci:DIR[:tag], oci-archive:FILE[:tag], a .tar file or a directory; barge, Tart
    and Vetu images are read (also as skopeo wrote them).
    """
    reporter = ConsoleReporter(quiet=quiet or fmt == "json")
    try:
        res = api.import_image(
            path, name, ImportOptions(platform=platform, concurrency=concurrency), reporter=reporter
        )
    finally:
        reporter.close()
    if fmt == "json":
        emit_json(res.to_json())
        return
    echo(f"imported {res.source}@{res.digest} as {name}")
