"""The registry client: the OCI distribution-spec endpoints of one registry.

:class:`RegistryClient` is put together from one mixin per concern over the request loop of
:class:`~barge.oci.api.RegistryAPI` (regclient's ``scheme/reg/*.go`` are the model):

==========================  ==================================================================
:mod:`barge.oci.api`        construction, credentials, the auth/retry request loop, ``ping``
:mod:`barge.oci.blobs`      ``blob_exists``, ``open_blob`` (:class:`BlobReader`), ``read_blob``,
                            ``mount_blob``
:mod:`barge.oci.uploads`    ``upload_blob``, ``upload_stream`` (the upload session loop)
:mod:`barge.oci.manifests`  ``get_manifest``, ``head_manifest``, ``put_manifest``,
                            ``delete_manifest``
:mod:`barge.oci.listings`   ``list_tags``, ``referrers``
==========================  ==================================================================

Every method takes the :class:`~barge.reference.Reference` whole: its repository is the
context (the token scope, the URL path), its digest or tag names the manifest. One client
talks to one registry (a reference on another is a ValueError) and may be shared by worker
threads. Steps that carry data are never blindly repeated: uploads resume from the offset
the server confirms (GET on the upload URL, also across runs: :mod:`barge.oci.sessions`)
and a lost answer to the closing PUT is checked with HEAD before anything is sent again;
downloads resume with ``Range``. Every downloaded byte of a whole blob or manifest is
checked against its digest.
"""

from __future__ import annotations

from barge.oci.api import labelled
from barge.oci.blobs import BlobReader, Blobs
from barge.oci.listings import Listings
from barge.oci.manifests import Manifests
from barge.oci.uploads import Uploads

__all__ = ["BlobReader", "RegistryClient", "labelled"]


class RegistryClient(Blobs, Uploads, Manifests, Listings):
    """Client for one OCI registry (``host[:port]``). Thread-safe; pooled connections.

    ``RegistryClient(registry, *, insecure=False, home=None, credentials=None, debug=False,
    settings=None)``: see :class:`~barge.oci.api.RegistryAPI`."""
