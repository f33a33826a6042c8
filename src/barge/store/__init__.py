"""The local store: VM directories, the image cache, the SQLite catalog, locks and leases."""

from barge.store.catalog import Catalog
from barge.store.store import VM, Store, default_home, validate_vm_name
from barge.store.vmconfig import Disk, VMConfig

__all__ = ["VM", "Catalog", "Disk", "Store", "VMConfig", "default_home", "validate_vm_name"]
