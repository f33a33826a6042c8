"""OCI image layouts: a directory (``oci:PATH[:tag]``) and a tar archive (``oci-archive:FILE``).

Modules: :mod:`.common` (constants, digest paths, the verifying reader, index.json checks,
the read API both readers share), :mod:`.directory` (:class:`OCILayout`: read and write),
:mod:`.archive_reader` (:class:`OCIArchiveReader`), :mod:`.archive_writer`
(:class:`OCIArchiveWriter`, :func:`write_archive`). Location strings are
:func:`barge.reference.parse_layout` (a :class:`~barge.reference.Reference` with a layout
scheme).

Implements https://github.com/opencontainers/image-spec/blob/main/image-layout.md so that
skopeo, podman and friends read what barge writes and barge reads what they write:

* ``oci-layout``: ``{"imageLayoutVersion":"1.0.0"}``;
* ``index.json``: an OCI image index whose descriptors name the manifests; a descriptor's
  ``org.opencontainers.image.ref.name`` annotation is its tag;
* ``blobs/<alg>/<hex>``: content-addressed blobs.

Safety: a path is only ever made from a digest that matched ``sha256:<64 hex>`` or
``sha512:<128 hex>``; names from index.json or a tar archive never become paths. Blobs are
written to a partial file in the same directory (``.partial-<hex>``, one per blob, locked while
written), verified (size and digest) while copied, fsynced and renamed, so a reader never sees
a partial or wrong blob; a write killed part-way leaves the partial file for the next writer of
that blob, which re-verifies it and fetches only the rest. Every blob read through
:meth:`open_blob` is verified against its digest at EOF.

The readers (:class:`OCILayout`, :class:`OCIArchiveReader`) share one API: ``has_blob``,
``open_blob``, ``get_manifest``, ``tags``, ``manifests``. Neither is safe for concurrent use
from several threads; :meth:`OCILayout.put_manifest` is safe across processes (it locks the
layout directory while it updates index.json).
"""

from __future__ import annotations

from barge.oci.layout.archive_reader import OCIArchiveReader
from barge.oci.layout.archive_writer import OCIArchiveWriter, write_archive
from barge.oci.layout.common import (
    CHUNK_SIZE,
    IMAGE_LAYOUT_VERSION,
    MAX_INDEX_SIZE,
    MAX_MANIFEST_SIZE,
    REF_NAME_ANNOTATION,
    ReadableStream,
)
from barge.oci.layout.directory import OCILayout

__all__ = [
    "CHUNK_SIZE",
    "IMAGE_LAYOUT_VERSION",
    "MAX_INDEX_SIZE",
    "MAX_MANIFEST_SIZE",
    "REF_NAME_ANNOTATION",
    "OCIArchiveReader",
    "OCIArchiveWriter",
    "OCILayout",
    "ReadableStream",
    "write_archive",
]
