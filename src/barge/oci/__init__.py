"""barge.oci: the registry client (auth, retries, blobs, uploads, manifests, tags, mounts)
and the OCI data model. Nothing outside this package speaks HTTP."""

from __future__ import annotations

from barge.oci.auth import Credentials, CredentialStore
from barge.oci.client import BlobReader, RegistryClient
from barge.oci.errors import (
    BlobUnknown,
    BlobUploadUnknown,
    Denied,
    DigestInvalid,
    DigestMismatch,
    LayerLimitExceeded,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    RegistryResponseError,
    RegistryTimeout,
    RegistryUnreachable,
    SizeInvalid,
    TooManyRequests,
    Unauthorized,
    Unsupported,
)
from barge.oci.retry import RetryPolicy
from barge.oci.settings import HostSettings
from barge.oci.types import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ImageManifest,
    Index,
    Manifest,
    Platform,
)

__all__ = [
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "BlobReader",
    "BlobUnknown",
    "BlobUploadUnknown",
    "CredentialStore",
    "Credentials",
    "Denied",
    "Descriptor",
    "DigestInvalid",
    "DigestMismatch",
    "HostSettings",
    "ImageManifest",
    "Index",
    "LayerLimitExceeded",
    "Manifest",
    "ManifestInvalid",
    "ManifestUnknown",
    "NameInvalid",
    "NameUnknown",
    "Platform",
    "RegistryClient",
    "RegistryResponseError",
    "RegistryTimeout",
    "RegistryUnreachable",
    "RetryPolicy",
    "SizeInvalid",
    "TooManyRequests",
    "Unauthorized",
    "Unsupported",
]
