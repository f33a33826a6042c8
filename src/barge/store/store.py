"""The local store: VM directories, the image cache, locks, leases and garbage collection.

Layout under ``$BARGE_HOME`` (default ``$XDG_DATA_HOME/barge``, i.e. ``~/.local/share/barge``)::

    catalog.db          SQLite (WAL): refs -> digests, images, chunk index, leases
    vms/<name>/         a local VM: config.json + raw disks
    cache/<hex>/        a pulled image by manifest digest, immutable, same shape as a VM
    tmp/<id>/           work in progress (always under a lease); never listed
    locks/              per-VM lock files

Every directory that ``list`` shows was built elsewhere and renamed into place after an fsync,
so a crash never leaves a half VM or a half image visible.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from barge import cancel
from barge.errors import BusyError, ConflictError, NotFoundError, UsageError
from barge.store.catalog import Catalog, ImageRow
from barge.store.space import NotEnoughSpace, free_bytes
from barge.store.vmconfig import VMConfig
from barge.units import format_size
from barge.vm.state import running

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def default_home() -> Path:
    env = os.environ.get("BARGE_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "barge"


def validate_vm_name(name: str) -> str:
    """A VM name is one safe path component: letters, digits, '.', '_' and '-'."""
    if not name:
        raise UsageError("invalid VM name '': a name cannot be empty")
    if "/" in name or "\\" in name:
        raise UsageError(f"invalid VM name {name!r}: it cannot contain path separators")
    if name in (".", "..") or ".." in name:
        raise UsageError(f"invalid VM name {name!r}: it cannot contain '..'")
    if ":" in name or "@" in name:
        raise UsageError(
            f"invalid VM name {name!r}: ':' and '@' belong to image references, not VM names"
        )
    if not _NAME_RE.match(name):
        raise UsageError(
            f"invalid VM name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under ``path`` (before renaming it into place)."""
    for root, _dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def dir_allocated_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


@dataclass(frozen=True)
class VM:
    name: str
    path: Path
    config: VMConfig

    def disk_path(self, disk_name: str) -> Path:
        return self.path / disk_name


class VMLock:
    """An exclusive (or shared) advisory lock on one VM name, held by an open file."""

    def __init__(self, path: Path, name: str, *, shared: bool = False, wait: bool = False):
        self.path = path
        self.name = name
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        try:
            while True:
                try:
                    fcntl.flock(self.fd, flags)
                    break
                except BlockingIOError:
                    if not wait:
                        what = name if name.startswith("image ") else f"VM {name!r}"
                        raise BusyError(
                            f"{what} is in use by another barge process (running, or being written)"
                        ) from None
                    cancel.sleep(0.05)  # waiting, but never past a Ctrl-C
        except BaseException:
            os.close(self.fd)
            raise

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> VMLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Store:
    """The local store: ``home`` (default ``$BARGE_HOME``, else
    ``$XDG_DATA_HOME/barge``, else ``~/.local/share/barge``) holds the VMs, the image cache,
    the catalog and work in progress (see README, "The local store")."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = (home or default_home()).absolute()
        self.vms_dir = self.home / "vms"
        self.cache_dir = self.home / "cache"
        self.tmp_dir = self.home / "tmp"
        self.locks_dir = self.home / "locks"
        for d in (self.home, self.vms_dir, self.cache_dir, self.tmp_dir, self.locks_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._catalog: Catalog | None = None

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = Catalog(self.home / "catalog.db")
        return self._catalog

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.close()

    # -- locks, staging, leases ------------------------------------------------------------
    def vm_lock(
        self,
        name: str,
        *,
        shared: bool = False,
        wait: bool = False,
        running_hint: str | None = None,
    ) -> VMLock:
        """Take VM ``name``'s lock (the caller releases it). A running VM's lock is held by
        its QEMU: then the error says the VM is running, with ``running_hint`` if given."""
        try:
            return VMLock(
                self.locks_dir / f"vm.{validate_vm_name(name)}.lock",
                name,
                shared=shared,
                wait=wait,
            )
        except BusyError:
            st = running(self.vm_path(name))
            if st is None:
                raise
            hint = f"stop it first: `barge stop {name}`"
            raise BusyError(
                f"VM {name!r} is running (QEMU pid {st.pid})",
                hint=f"{hint}, {running_hint}" if running_hint else hint,
            ) from None

    @contextlib.contextmanager
    def lock_vm(
        self,
        name: str,
        *,
        shared: bool = False,
        wait: bool = False,
        running_hint: str | None = None,
    ) -> Iterator[VMLock]:
        lock = self.vm_lock(name, shared=shared, wait=wait, running_hint=running_hint)
        try:
            yield lock
        finally:
            lock.release()

    def try_lock_vm(self, name: str) -> VMLock | None:
        """The VM's exclusive lock if it is free right now, else None."""
        try:
            return self.vm_lock(name)
        except BusyError:
            return None

    def is_locked(self, name: str) -> bool:
        try:
            with self.lock_vm(name, shared=True):
                return False
        except BusyError:
            return True

    @contextlib.contextmanager
    def lease(self, purpose: str) -> Iterator[str]:
        """A GC lease for the duration of an operation (released even on error)."""
        lease_id = self.catalog.create_lease(purpose)
        try:
            yield lease_id
        finally:
            self.catalog.release_lease(lease_id)

    @contextlib.contextmanager
    def staging(self, purpose: str, *, lease_id: str | None = None) -> Iterator[Path]:
        """A fresh temp directory under ``tmp/``, protected by a lease and removed afterwards
        unless it was renamed into place."""
        with contextlib.ExitStack() as stack:
            if lease_id is None:
                lease_id = stack.enter_context(self.lease(purpose))
            path = self.tmp_dir / f"{purpose}-{uuid.uuid4().hex[:12]}"
            self.catalog.lease_add(lease_id, "path", [path.name])
            path.mkdir()
            try:
                yield path
            finally:
                if path.exists():
                    shutil.rmtree(path, ignore_errors=True)

    def publish_dir(self, staged: Path, final: Path) -> None:
        """fsync a staged directory and rename it into place; fails if ``final`` exists."""
        fsync_tree(staged)
        try:
            os.rename(staged, final)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise ConflictError(f"{final.name!r} already exists") from None
            raise
        fsync_dir(final.parent)

    # -- local VMs -------------------------------------------------------------------------
    def vm_path(self, name: str) -> Path:
        return self.vms_dir / validate_vm_name(name)

    def vm_exists(self, name: str) -> bool:
        return (self.vm_path(name) / "config.json").is_file()

    def get_vm(self, name: str) -> VM:
        path = self.vm_path(name)
        cfg = path / "config.json"
        try:
            data = cfg.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"no VM named {name!r}", hint="see `barge list`") from None
        return VM(name, path, VMConfig.from_bytes(data))

    def list_vms(self) -> list[VM]:
        vms = []
        for entry in sorted(os.listdir(self.vms_dir)):
            if not _NAME_RE.match(entry) or ".." in entry:
                continue
            try:
                vms.append(self.get_vm(entry))
            except (NotFoundError, UsageError):
                continue
            except Exception:  # a damaged config must not hide the other VMs
                continue
        return vms

    def write_config(self, vm: VM, config: VMConfig) -> None:
        """Atomically replace a VM's config.json (caller holds the VM lock)."""
        tmp = vm.path / f".config.json.{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(config.to_bytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, vm.path / "config.json")
        fsync_dir(vm.path)

    def vm_disk_usage(self, vm: VM) -> int:
        return dir_allocated_bytes(vm.path)

    # -- the image cache -------------------------------------------------------------------
    def image_path(self, digest: str) -> Path:
        algo, _, hexpart = digest.partition(":")
        if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexpart):
            raise UsageError(f"invalid manifest digest {digest!r}")
        return self.cache_dir / hexpart

    def image_lock(self, digest: str, *, shared: bool = False, wait: bool = False) -> VMLock:
        """The lock of one cached image: pulls hold it exclusively, clones shared, and GC
        removes an image only when it can take it exclusively."""
        hexd = self.image_path(digest).name
        return VMLock(
            self.locks_dir / f"image.{hexd}.lock", f"image {digest}", shared=shared, wait=wait
        )

    def cached_images(self) -> list[ImageRow]:
        return [r for r in self.catalog.images() if (self.cache_dir / r.dirname).is_dir()]

    # -- space ------------------------------------------------------------------------------
    def free_bytes(self) -> int:
        return free_bytes(self.home)

    def require_space(self, need: int, what: str) -> None:
        """Raise :class:`NotEnoughSpace` (a :class:`NoSpaceError`, exit 9) when ``need`` bytes
        are more than is free."""
        free = self.free_bytes()
        if need > free:
            raise NotEnoughSpace(
                f"not enough space to {what}: it needs about {format_size(need)}, "
                f"{format_size(free)} is free on the filesystem of {self.home}",
                hint=self.space_hint(need - free),
            )

    def space_hint(self, short: int | None) -> str:
        """What to free (at least ``short`` bytes, when known), and what ``barge prune`` would
        give back."""
        unused = sum(i.size_on_disk for i in self._unreferenced())
        debris = sum(_allocated(p) for p in self.abandoned_tmp())
        text = f"free at least {format_size(short)} there" if short else "free some space there"
        if unused or debris:
            parts = []
            if debris:
                parts.append(f"{format_size(debris)} of abandoned work in tmp/")
            if unused:
                parts.append(f"{format_size(unused)} of cached images nothing refers to")
            text += f"; `barge prune` removes {' and '.join(parts)}"
        return text + "; `barge prune --space-budget SIZE` also removes least recently used images"

    def _unreferenced(self) -> list[ImageRow]:
        referenced = {r.digest for r in self.catalog.refs()}
        return [i for i in self.catalog.images() if i.digest not in referenced]

    # -- garbage collection ----------------------------------------------------------------
    def prune(
        self,
        *,
        older_than: float | None = None,
        space_budget: int | None = None,
        dry_run: bool = False,
    ) -> PruneResult:
        """``barge prune``: abandoned work in ``tmp/`` first (that frees space before the first
        catalog write, so prune works on a full disk), then :meth:`gc`."""
        entries, freed = self.clean_tmp(dry_run=dry_run)
        images = self.gc(
            older_than=older_than, space_budget=space_budget, dry_run=dry_run, clean_tmp=False
        )
        if not dry_run:
            self.catalog.reserve.ensure()
        return PruneResult(images, entries, freed)

    def gc(
        self,
        *,
        older_than: float | None = None,
        space_budget: int | None = None,
        dry_run: bool = False,
        remove_unreferenced: bool = True,
        only: set[str] | None = None,
        clean_tmp: bool = True,
    ) -> list[ImageRow]:
        """The one GC routine. Removes (least recently used first) cached images that are
        unreferenced, older than ``older_than`` seconds, or over ``space_budget`` bytes; never
        one under a lease or whose cache directory is locked by a running operation. With
        ``clean_tmp``, also removes abandoned work in ``tmp/`` (:meth:`clean_tmp`). Returns
        what was (or would be) removed."""
        cat = self.catalog
        if clean_tmp and not dry_run:
            self.clean_tmp()
        cat.expire_dead_leases()
        leased_images = cat.leased("image")
        now = time.time()
        images = cat.images()  # least recently used first
        referenced = {r.digest for r in cat.refs()}
        total = sum(i.size_on_disk for i in images)
        doomed: list[ImageRow] = []
        for img in images:
            if only is not None and img.digest not in only:
                continue
            reason = False
            if remove_unreferenced and img.digest not in referenced:
                reason = True
            if older_than is not None and now - img.last_used > older_than:
                reason = True
            if space_budget is not None and total > space_budget:
                reason = True
            if not reason or img.digest in leased_images:
                continue
            doomed.append(img)
            total -= img.size_on_disk
        removed: list[ImageRow] = []
        for img in doomed:
            try:
                lock = self.image_lock(img.digest)
            except BusyError:  # being pulled or cloned right now
                continue
            try:
                # re-check under the lock: a lease may have been taken meanwhile
                if img.digest in cat.leased("image"):
                    continue
                removed.append(img)
                if dry_run:
                    continue
                trash = self.tmp_dir / f"gc-{uuid.uuid4().hex[:12]}"
                cat.remove_image(img.digest)
                src = self.cache_dir / img.dirname
                if src.exists():
                    os.rename(src, trash)
                    shutil.rmtree(trash, ignore_errors=True)
            finally:
                lock.release()
        return removed

    def abandoned_tmp(self) -> list[Path]:
        """Entries of ``tmp/`` that no lease of a living process holds: work a killed or
        interrupted process left (a resumable pull's staging directory among them), and GC
        trash. Reads only. Every barge process adds a path to its lease *before* creating it,
        so listing the directory before reading the leases never takes a live entry."""
        entries = sorted(os.listdir(self.tmp_dir))
        live = self.catalog.live_leased("path")
        return [self.tmp_dir / e for e in entries if e not in live]

    def clean_tmp(self, *, dry_run: bool = False) -> tuple[int, int]:
        """Remove :meth:`abandoned_tmp` entries; returns (entries, bytes freed). Only files
        are touched, not the catalog, so this works on a full disk. A pull's staging directory
        is removed under its image's lock, so a pull resuming it right now keeps it."""
        count = freed = 0
        for p in self.abandoned_tmp():
            lock = None
            m = re.fullmatch(r"pull-([0-9a-f]{64})", p.name)
            if m:
                try:
                    lock = self.image_lock(f"sha256:{m.group(1)}")
                except BusyError:
                    continue
                except OSError:  # no room for the lock file: so no process holds that lock
                    lock = None
            try:
                if lock is not None and p.name in self.catalog.live_leased("path"):
                    continue
                size = _allocated(p)
                if not dry_run:
                    with contextlib.suppress(OSError):
                        if p.is_dir() and not p.is_symlink():
                            shutil.rmtree(p)
                        else:
                            p.unlink()
                    if p.exists():
                        continue
                count += 1
                freed += size
            finally:
                if lock is not None:
                    lock.release()
        return count, freed


@dataclass(frozen=True)
class PruneResult:
    """What a prune removed (or would remove, dry): images, and abandoned ``tmp/`` work."""

    images: list[ImageRow]
    tmp_entries: int  # abandoned entries of tmp/ removed
    tmp_bytes: int  # and the bytes they held


def _allocated(p: Path) -> int:
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            return dir_allocated_bytes(p)
        return p.lstat().st_blocks * 512
    return 0
