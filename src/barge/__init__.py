"""barge: manage VM images on Linux and ship them through OCI registries.

The Python API (docs/api.md)::

    import barge

    result = barge.pull("registry.example.com/team/vm:v1")
    barge.clone("registry.example.com/team/vm:v1", "dev")
    barge.push("dev", ["registry.example.com/team/vm:v2"], barge.PushOptions(codec="zstd:3"))
    report = barge.verify("registry.example.com/team/vm:v2", barge.VerifyOptions(deep=True))

Every function raises a subclass of :class:`BargeError` (``barge.RegistryError``,
``barge.IntegrityError``, ``barge.NotFoundError``, …) on failure; progress goes to an optional
:class:`Reporter`; ``store=`` picks another local store than ``$BARGE_HOME``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from barge.api import (
    Cloned,
    CloneOptions,
    CreateOptions,
    ImportOptions,
    VerifyOptions,
    VMInfo,
    clone,
    copy,
    create,
    delete,
    export,
    get,
    import_image,
    inspect,
    list_images,
    list_tags,
    list_vms,
    login,
    logout,
    prune,
    pull,
    push,
    push_index,
    raw_manifest,
    registry_config,
    registry_config_warnings,
    rename,
    set_vm,
    tag,
    verify,
)
from barge.errors import (
    AuthError,
    BargeError,
    BusyError,
    ConflictError,
    ExitCode,
    IntegrityError,
    Interrupted,
    LimitError,
    NoSpaceError,
    NotFoundError,
    NotRunningError,
    RegistryError,
    UnsupportedError,
    UsageError,
)
from barge.local import CloneResult
from barge.progress import NullReporter, Reporter, Task
from barge.reference import Reference, ReferenceError, parse_location
from barge.store import Store
from barge.store.store import PruneResult
from barge.transfer.copy import CopiedImage, CopyOptions, CopyResult, CopyStats, TagResult
from barge.transfer.export import ExportOptions, ExportResult, ImportResult
from barge.transfer.pull import PullOptions, PullResult, PullStats
from barge.transfer.push import IndexResult, PushOptions, PushResult, PushStats
from barge.verify import Fault, VerifyReport

__all__ = [
    "AuthError",
    "BargeError",
    "BusyError",
    "CloneOptions",
    "CloneResult",
    "Cloned",
    "ConflictError",
    "CopiedImage",
    "CopyOptions",
    "CopyResult",
    "CopyStats",
    "CreateOptions",
    "ExitCode",
    "ExportOptions",
    "ExportResult",
    "Fault",
    "ImportOptions",
    "ImportResult",
    "IndexResult",
    "IntegrityError",
    "Interrupted",
    "LimitError",
    "NoSpaceError",
    "NotFoundError",
    "NotRunningError",
    "NullReporter",
    "PruneResult",
    "PullOptions",
    "PullResult",
    "PullStats",
    "PushOptions",
    "PushResult",
    "PushStats",
    "Reference",
    "ReferenceError",
    "RegistryError",
    "Reporter",
    "Store",
    "TagResult",
    "Task",
    "UnsupportedError",
    "UsageError",
    "VMInfo",
    "VerifyOptions",
    "VerifyReport",
    "__version__",
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
    "parse_location",
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
