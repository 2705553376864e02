"""URL scheme -> source module. A plain table: adding a store is one line here plus its module.

Every module named here exposes ``create(url: str, options: SourceOptions) -> Source``. Modules are imported only
when a URL of their scheme is opened, so ``file://`` never imports the HTTP stack.
"""

from __future__ import annotations

import importlib
from typing import Final
from urllib.parse import urlsplit

from ..errors import ConfigError
from .base import Source, SourceOptions

SCHEMES: Final[dict[str, str]] = {
    "ctera+https": "directfs.sources.ctera",
    "ctera+http": "directfs.sources.ctera",  # loopback / testing only; the module enforces it
    "file": "directfs.sources.local",
    "s3": "directfs.sources.s3",
    "webdav": "directfs.sources.webdav",  # plain HTTP: credentials only to loopback; the module enforces it
    "webdavs": "directfs.sources.webdav",
    "http": "directfs.sources.web",  # plain HTTP: credentials only to loopback; the module enforces it
    "https": "directfs.sources.web",
}


def create_source(url: str, options: SourceOptions) -> Source:
    """Build the source for ``url``; ``ConfigError`` (EINVAL) for an unknown scheme or a bad URL."""
    scheme = urlsplit(url).scheme.lower()
    module_name = SCHEMES.get(scheme)
    if module_name is None:
        known = ", ".join(f"{name}://" for name in SCHEMES)
        raise ConfigError(f"unsupported source {scheme + '://' if scheme else repr(url)} (supported: {known})")
    module = importlib.import_module(module_name)
    source: Source = module.create(url, options)
    return source
