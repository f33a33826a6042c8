"""Clone from an image: pull it (if it is not cached), then make a local VM of it.

The pull holds the image under the clone's lease before it looks at the cache, so no GC can
take it between the pull and the clone; the clone copies the cached directory copy-on-write
where the filesystem can (FICLONE), else as a sparse copy (:func:`barge.local.clone_dir`).
"""

from __future__ import annotations

from barge.errors import ConflictError, NotFoundError
from barge.local import CloneResult, clone_dir
from barge.progress import Reporter
from barge.store import Store, VMConfig, validate_vm_name
from barge.transfer.open import Verb
from barge.transfer.pull import PullOptions, PullResult, pull

__all__ = ["clone_image"]


def clone_image(
    store: Store,
    ref_text: str,
    name: str,
    opts: PullOptions | None = None,
    reporter: Reporter | None = None,
    *,
    verb: Verb = "clone",
) -> tuple[PullResult, CloneResult]:
    """Pull ``ref_text`` if needed, then make local VM ``name`` from it copy-on-write."""
    validate_vm_name(name)
    if store.vm_exists(name):
        raise ConflictError(f"a VM named {name!r} already exists")
    with store.lease("clone") as lease_id:
        # the image joins this lease before the pull looks at the cache, so no GC can take it
        # between the pull and the clone
        res = pull(store, ref_text, opts, reporter, hold=lease_id, then_clone=True, verb=verb)
        lock = store.image_lock(res.digest, shared=True, wait=True)
        try:
            if not res.path.is_dir():
                raise NotFoundError(f"cached image {res.digest} vanished; pull again")
            cfg = VMConfig.from_bytes((res.path / "config.json").read_bytes())
            with store.lock_vm(name):
                if store.vm_exists(name):
                    raise ConflictError(f"a VM named {name!r} already exists")
                cloned = clone_dir(store, res.path, cfg, name)
        finally:
            lock.release()
        store.catalog.touch_image(res.digest)
    return res, cloned
