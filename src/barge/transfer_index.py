"""Multi-platform images: push several local VMs as one OCI image index.

Each VM is pushed with the ordinary push pipeline, its manifest put by digest (no tag); then an
index naming every manifest with the VM's platform (``os`` + OCI architecture, from its config)
is put under the tag. Pull, clone and copy pick the host's platform or ``--platform``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from barge.endpoints import RegistryEnd, parse_location
from barge.errors import UnsupportedError, UsageError
from barge.oci.client import RegistryClient
from barge.oci.types import OCI_INDEX, OCI_MANIFEST, Descriptor, Index, Platform
from barge.progress import Reporter
from barge.push import Pusher, PushOptions, PushResult
from barge.store import Store
from barge.store.vmconfig import OCI_ARCH


@dataclass
class IndexResult:
    reference: str
    digest: str
    size: int
    entries: list[tuple[str, str, PushResult]] = field(default_factory=list)  # vm, platform

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "digest": self.digest,
            "size": self.size,
            "manifests": [
                {
                    "vm": vm,
                    "platform": plat,
                    "digest": r.digest,
                    "size": r.size,
                    "uploadedBlobs": r.stats.uploaded_blobs,
                    "uploadedBytes": r.stats.uploaded_bytes,
                }
                for vm, plat, r in self.entries
            ],
        }


def vm_platform(store: Store, name: str) -> Platform:
    cfg = store.get_vm(name).config
    return Platform(architecture=OCI_ARCH.get(cfg.arch, cfg.arch), os=cfg.os)


def push_index(
    store: Store,
    vm_names: list[str],
    reference: str,
    opts: PushOptions | None = None,
    reporter: Reporter | None = None,
) -> IndexResult:
    """Push every VM in ``vm_names`` and publish one image index naming them at
    ``reference`` (a registry reference; ``:latest`` when no tag is given)."""
    if opts is not None and opts.format == "tart":
        # Tart's Registry.pullManifest asks only for an OCI image manifest and decodes the
        # answer as one: a tag holding an index is one that `tart pull` cannot pull.
        raise UnsupportedError(
            "--index cannot be combined with --format tart: Tart's pull accepts only an OCI "
            "image manifest, so `tart pull` of an image index fails",
            hint="push each VM in Tart's format to its own tag (barge push NAME REF --format "
            "tart), or the index in barge's format",
        )
    if not vm_names:
        raise UsageError("give at least one VM for --index")
    if len(set(vm_names)) != len(vm_names):
        raise UsageError("a VM is named twice")
    loc = parse_location(reference, allow_vm=False)
    if loc.kind != "registry" or loc.ref is None:
        raise UsageError(f"--index needs a registry reference, not {reference!r}")
    if loc.ref.digest:
        raise UsageError(f"cannot push to {reference!r}: give a tag, not a digest")
    ref = loc.ref if loc.ref.tag else loc.ref.with_tag("latest")
    platforms: dict[str, str] = {}
    for name in vm_names:
        p = str(vm_platform(store, name))
        if p in platforms:
            raise UsageError(
                f"{name!r} and {platforms[p]!r} are both {p}: an index holds one image per platform"
            )
        platforms[p] = name
    opts = opts or PushOptions()
    result = IndexResult(str(ref), "", 0)
    pusher = Pusher(store, opts, reporter)
    descs: list[Descriptor] = []
    try:
        for name in vm_names:
            plat = vm_platform(store, name)
            res = pusher.push_untagged(name, str(ref))
            result.entries.append((name, str(plat), res))
            descs.append(Descriptor(OCI_MANIFEST, res.digest, res.size, platform=plat))
            pusher.stats = type(pusher.stats)()  # per-VM statistics
    finally:
        pusher.close()
    data = Index(descs, media_type=OCI_INDEX).to_bytes()
    with RegistryClient(ref.registry, insecure=opts.insecure, home=store.home) as client:
        end = RegistryEnd(store, client, ref)
        result.digest = end.put_manifest(data, OCI_INDEX, ref.tag)
    result.size = len(data)
    return result
