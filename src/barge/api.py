"""barge's public Python API: one function per thing barge does (``import barge``).

Every function takes its subject first, an options dataclass (or a few keywords) next, and two
keywords every function shares: ``reporter`` (a :class:`~barge.progress.Reporter` that is told
about progress and one-line notes; default: silent) and ``store`` (the local store; default:
``Store()``, i.e. ``$BARGE_HOME`` or ``~/.local/share/barge``). Errors are raised as
subclasses of :class:`~barge.errors.BargeError` (``barge.RegistryError``,
``barge.IntegrityError``, …), each with the exit code the CLI uses. The CLI
(:mod:`barge.cli`) is a client of these functions and prints what they return. See
docs/api.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from barge import cache, local
from barge import inspect as _inspect
from barge.local import CloneResult
from barge.oci import mirrors as _mirrors
from barge.oci import registries_conf as _registries_conf
from barge.progress import Reporter
from barge.reference import parse, parse_registry_host
from barge.store import VM, Store
from barge.store.store import PruneResult
from barge.transfer import clone as _clone
from barge.transfer import copy as _copy
from barge.transfer import export as _export
from barge.transfer import pull as _pull
from barge.transfer import push as _push
from barge.transfer import registry as _registry
from barge.transfer.copy import CopyOptions, CopyResult, TagResult
from barge.transfer.export import ExportOptions, ExportResult, ImportResult
from barge.transfer.open import is_vm_name
from barge.transfer.pull import PullOptions, PullResult
from barge.transfer.push import IndexResult, PushOptions, PushResult
from barge.verify import VerifyReport
from barge.verify import verify as _verify
from barge.vm import runner

__all__ = [
    "CloneOptions",
    "Cloned",
    "CopyOptions",
    "CreateOptions",
    "ExportOptions",
    "ImportOptions",
    "PullOptions",
    "PushOptions",
    "VMInfo",
    "VerifyOptions",
    "clone",
    "copy",
    "create",
    "delete",
    "export",
    "get",
    "import_image",
    "inspect",
    "list_images",
    "list_tags",
    "list_vms",
    "login",
    "logout",
    "prune",
    "pull",
    "push",
    "push_index",
    "raw_manifest",
    "registry_config",
    "registry_config_warnings",
    "rename",
    "set_vm",
    "tag",
    "verify",
]

#: A VM's (or cached image's) description, as ``barge get --format json`` shows it: ``name``,
#: ``source`` (``local`` or ``oci``), ``os``, ``arch``, ``platform``, ``cpus``, ``memory``,
#: ``disks`` (``name``, ``size``, ``allocated``), ``sizeOnDisk``, ``state``; a cached image also
#: ``reference``, ``digest``, ``format`` and ``lastUsed``.
VMInfo = dict[str, Any]


def _store(store: Store | None) -> Store:
    return store if store is not None else Store()


def _list(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


# ---------------------------------------------------------------------------------------------
# moving images


def pull(
    reference: str,
    options: PullOptions | None = None,
    *,
    reporter: Reporter | None = None,
    store: Store | None = None,
) -> PullResult:
    """Pull an image (``host[:port]/repo[:tag][@digest]``, ``oci:DIR[:tag]``,
    ``oci-archive:FILE[:tag]``) into the local cache: verified, sparse, fetching only what
    changed since a cached version. barge, Tart and Vetu images."""
    return _pull.pull(_store(store), reference, options, reporter)


def push(
    vm: str,
    references: str | Sequence[str],
    options: PushOptions | None = None,
    *,
    reporter: Reporter | None = None,
    store: Store | None = None,
) -> PushResult:
    """Push local VM ``vm`` to one or more references (registry references, ``oci:DIR``,
    ``oci-archive:FILE``): one upload, many tags; nothing a destination has is sent."""
    return _push.push(_store(store), vm, _list(references), options, reporter)


def push_index(
    vms: Sequence[str],
    reference: str,
    options: PushOptions | None = None,
    *,
    reporter: Reporter | None = None,
    store: Store | None = None,
) -> IndexResult:
    """Push several local VMs as one multi-platform image index at ``reference`` (an entry
    per VM's platform)."""
    return _push.push_index(_store(store), list(vms), reference, options, reporter)


def copy(
    source: str,
    destination: str,
    options: CopyOptions | None = None,
    *,
    reporter: Reporter | None = None,
    store: Store | None = None,
) -> CopyResult:
    """Copy an image between registries and OCI layouts, keeping its digest (blobs stream
    source -> destination; what the destination has is skipped, within a registry mounted).
    To check the copy, :func:`verify` each ``result.images[i].destination``."""
    return _copy.copy(_store(store), source, destination, options, reporter)


def tag(
    reference: str,
    new_tags: str | Sequence[str],
    *,
    insecure: bool = False,
    reporter: Reporter | None = None,
    store: Store | None = None,
) -> TagResult:
    """Add tags to an image in a registry: a bare tag (same repository) or a full reference
    on the same registry; no blob is uploaded."""
    return _copy.tag(
        _store(store), reference, _list(new_tags), insecure=insecure, reporter=reporter
    )


@dataclass
class VerifyOptions:
    """Options of :func:`verify`."""

    deep: bool = False
    """Decode every chunk and frame (every Tart/Vetu layer) and check its digest."""
    remote: bool = False
    """Check the image where the reference points even when it is cached."""
    platform: str | None = None
    """Only this ``OS/ARCH`` of a multi-platform index."""
    concurrency: int = 4
    insecure: bool = False


def verify(
    target: str,
    options: VerifyOptions | None = None,
    *,
    reporter: Reporter | None = None,
    store: Store | None = None,
) -> VerifyReport:
    """Prove an image intact: a local VM (by name), a cached image, an image in a registry or
    an OCI layout. The report lists the faults found (``report.ok`` when none)."""
    o = options or VerifyOptions()
    return _verify(
        _store(store),
        target,
        deep=o.deep,
        insecure=o.insecure,
        concurrency=o.concurrency,
        remote=o.remote,
        platform=o.platform,
        reporter=reporter,
    )


def export(
    source: str,
    path: str,
    options: ExportOptions | None = None,
    *,
    reporter: Reporter | None = None,
    store: Store | None = None,
) -> ExportResult:
    """Write a local VM or an image as an OCI image layout (``oci:DIR[:tag]``,
    ``oci-archive:FILE[:tag]``, a ``.tar`` file or a directory) that skopeo reads."""
    return _export.export_image(_store(store), source, path, options, reporter)


@dataclass
class ImportOptions:
    """Options of :func:`import_image`."""

    platform: str | None = None
    concurrency: int = 4


def import_image(
    path: str,
    name: str,
    options: ImportOptions | None = None,
    *,
    reporter: Reporter | None = None,
    store: Store | None = None,
) -> ImportResult:
    """Make local VM ``name`` from an OCI layout (directory or archive), verified."""
    o = options or ImportOptions()
    return _export.import_image(_store(store), path, name, o.platform, o.concurrency, reporter)


@dataclass
class CloneOptions:
    """Options of :func:`clone`."""

    force: bool = False
    """A running local VM too: paused for the copy (crash-consistent)."""
    concurrency: int | None = None
    """Parallel blob transfers of the pull (None: the host's configured concurrency, else 2)."""
    insecure: bool = False
    platform: str | None = None
    mirrors: bool = True
    """Read an image reference through its configured mirrors (False: ``--no-mirrors``)."""


@dataclass(frozen=True)
class Cloned:
    """What :func:`clone` made: the new VM, how its disks were copied (``reflink`` or
    ``sparse-copy``) and, for an image, its pull."""

    clone: CloneResult
    pulled: PullResult | None = None

    @property
    def vm(self) -> VM:
        return self.clone.vm


def clone(
    source: str,
    name: str,
    options: CloneOptions | None = None,
    *,
    reporter: Reporter | None = None,
    store: Store | None = None,
) -> Cloned:
    """Make local VM ``name`` from a local VM or an image reference (pulled if needed),
    copy-on-write where the filesystem can, else a sparse copy."""
    o = options or CloneOptions()
    s = _store(store)
    if is_vm_name(source):
        return Cloned(runner.clone(s, source, name, force=o.force))
    pulled, cloned = _clone.clone_image(
        s,
        source,
        name,
        PullOptions(
            concurrency=o.concurrency, insecure=o.insecure, platform=o.platform, mirrors=o.mirrors
        ),
        reporter,
    )
    return Cloned(cloned, pulled)


# ---------------------------------------------------------------------------------------------
# local VMs and the cache


@dataclass
class CreateOptions:
    """Options of :func:`create`: give ``disk_size``, ``from_disk``, or both."""

    disk_size: int | None = None
    from_disk: Path | None = None
    """A raw or qcow2 image to import (kept sparse)."""
    cpus: int = 2
    memory: int = 4 << 30
    os: str = "linux"
    arch: str = "x86_64"
    boot: str | None = None
    """``uefi`` (the default), ``bios``, or ``kernel`` (implied by ``kernel``)."""
    kernel: Path | None = None
    initramfs: Path | None = None
    cmdline: str = ""
    ssh_user: str | None = None


def create(name: str, options: CreateOptions, *, store: Store | None = None) -> VMInfo:
    """Create a local VM with an empty sparse disk or an imported one."""
    o = options
    s = _store(store)
    vm = local.create_vm(
        s,
        name,
        disk_size=o.disk_size,
        from_disk=o.from_disk,
        cpus=o.cpus,
        memory=o.memory,
        os_name=o.os,
        arch=o.arch,
        boot=o.boot or ("kernel" if o.kernel is not None else "uefi"),
        kernel=o.kernel,
        initramfs=o.initramfs,
        cmdline=o.cmdline,
        ssh_user=o.ssh_user,
    )
    return local.vm_info(s, vm)


def get(name: str, *, store: Store | None = None) -> VMInfo:
    """A local VM's configuration, or a cached image's by reference."""
    s = _store(store)
    if is_vm_name(name):
        return local.vm_info(s, s.get_vm(name))
    return cache.cached_info(s, name)


def set_vm(
    name: str,
    *,
    cpus: int | None = None,
    memory: int | None = None,
    disk_size: int | None = None,
    store: Store | None = None,
) -> VMInfo:
    """Change a local VM's CPUs, memory or disk size (disks only grow)."""
    s = _store(store)
    return local.vm_info(s, local.set_vm(s, name, cpus=cpus, memory=memory, disk_size=disk_size))


def rename(old: str, new: str, *, store: Store | None = None) -> VMInfo:
    """Rename a local VM."""
    s = _store(store)
    return local.vm_info(s, local.rename_vm(s, old, new))


def delete(
    name: str,
    *,
    force: bool = False,
    note: Callable[[str], None] | None = None,
    store: Store | None = None,
) -> list[str]:
    """Delete a local VM (``force``: a running one is stopped first; ``note`` hears how), or
    a cached image by reference. Returns what was deleted."""
    s = _store(store)
    if is_vm_name(name):
        runner.delete(s, name, force=force, note=note or (lambda _m: None))
        return [name]
    return cache.delete_cached(s, name)


def list_vms(*, store: Store | None = None) -> list[VMInfo]:
    """The local VMs."""
    s = _store(store)
    return [local.vm_info(s, vm) for vm in s.list_vms()]


def list_images(*, store: Store | None = None) -> list[VMInfo]:
    """The cached images, one row per reference that points at one."""
    return cache.list_cached(_store(store))


def prune(
    *,
    older_than: float | None = None,
    space_budget: int | None = None,
    dry_run: bool = False,
    store: Store | None = None,
) -> PruneResult:
    """Remove abandoned work in ``tmp/`` and cached images (unreferenced ones; with
    ``older_than`` seconds or ``space_budget`` bytes, least recently used first), never one
    in use."""
    return _store(store).prune(older_than=older_than, space_budget=space_budget, dry_run=dry_run)


# ---------------------------------------------------------------------------------------------
# registries


def login(
    host: str,
    username: str,
    password: str,
    *,
    insecure: bool = False,
    store: Store | None = None,
) -> str:
    """Check the credentials against the registry, then save them (mode 0600). Returns the
    registry's canonical name."""
    registry = parse_registry_host(host)
    s = _store(store)
    _registry.check_login(s, registry, username, password, insecure=insecure)
    _registry.save_login(s, registry, username, password)
    return registry


def logout(host: str, *, store: Store | None = None) -> tuple[str, bool]:
    """Forget the credentials saved for a registry: (its canonical name, whether there were
    any)."""
    registry = parse_registry_host(host)
    return registry, _registry.forget_login(_store(store), registry)


def inspect(
    reference: str, *, insecure: bool = False, store: Store | None = None
) -> dict[str, Any]:
    """An image's manifest, config, platform, sizes and layer table."""
    return _inspect.inspect(_store(store), reference, insecure=insecure)


def raw_manifest(reference: str, *, insecure: bool = False, store: Store | None = None) -> bytes:
    """An image's manifest (or index) exactly as served."""
    return _inspect.raw_manifest(_store(store), reference, insecure=insecure)


def registry_config(
    reference: str,
    *,
    insecure: bool = False,
    mirrors: bool = True,
    store: Store | None = None,
) -> dict[str, Any]:
    """The registry configuration in effect for reading ``reference`` (``barge config
    show``): the files read (containers-registries.conf(5) and barge's own), the
    ``[[registry]]`` table chosen, each source in order (mirrors, then upstream) with its
    host's TLS mode, CA file, timeouts, layer cap, upload chunk and concurrency, and whether
    credentials are stored for that host (never the credentials). See docs/fleet.md."""
    return _mirrors.effective(
        parse(reference), home=_store(store).home, insecure=insecure, mirrors=mirrors
    )


def registry_config_warnings() -> list[str]:
    """Read the registry configuration files (a bad one raises a UsageError naming the file,
    the line and the key) and return their warnings: unknown keys, each with its file and
    line."""
    return list(_registries_conf.load().warnings)


def list_tags(
    repository: str, *, insecure: bool = False, store: Store | None = None
) -> tuple[str, list[str]]:
    """A registry repository's tags: (its full name, the tags)."""
    return _inspect.list_tags(_store(store), repository, insecure=insecure)
