"""The CTERA store: the namespace over the Portal's WebDAV (:mod:`.source`), file data over Direct IO
(:mod:`.client`: block lists and block GETs; :mod:`.codec`: key unwrap, AES-CBC, snappy/gzip). Protocol:
``docs/ctera-direct-io.md``."""

from __future__ import annotations

from .source import CteraSource, create

__all__ = ["CteraSource", "create"]
