"""barge: manage VM images on Linux and ship them through OCI registries."""

from __future__ import annotations

__version__ = "0.1.0"
