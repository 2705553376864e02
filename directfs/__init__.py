"""directfs: read a remote global namespace as if it were a local disk.

The Direct IO Python API is importable from here (``from directfs import DirectIO, ByteRange``). It is loaded on
first use, so ``import directfs`` (and every ``directfs`` command) does not pay for trio/httpx/cryptography until
a command needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import Block, ByteRange, Chunk, DirectIO, DirectIOFile, DirectIOSettings, FileMetadata

# name -> module that defines it (loaded lazily by __getattr__)
_LAZY = {
    name: "directfs.api"
    for name in ("Block", "ByteRange", "Chunk", "DirectIO", "DirectIOFile", "DirectIOSettings", "FileMetadata")
}

__all__ = ["Block", "ByteRange", "Chunk", "DirectIO", "DirectIOFile", "DirectIOSettings", "FileMetadata", "__version__"]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'directfs' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
