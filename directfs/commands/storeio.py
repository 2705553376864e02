"""What ``directfs ls``, ``cp`` and ``stage`` share: a store URL (or NAME) opened through the Source API, the tree
walked below it, every block of a file fetched with bounded concurrency, errors as one line (the progress line is
``directfs.commands.progress``).

A URL may name a folder or a file. The Source API has no notion of "the root is a file" (``file://`` refuses it,
``s3://bucket/key`` reads as an empty folder, WebDAV stats it as a file), so :func:`open_target` stats and lists the
root and, when it is a file (or an empty folder whose parent URL has a file of that name), opens the parent URL and
the file in it instead. Only the root's listing is kept; deeper folders are listed as the walk reaches them.

A URL ``cp`` writes to (:func:`open_write_target`) is opened at its parent folder, and the name it ends with is
stat-ed there: that tells a new name from an existing file or folder on every store (on S3 a missing prefix reads as
an empty folder, so the URL itself cannot say). A store without ``Writable`` is refused before any request.

Concurrency: :func:`fetch_blocks` reads a file through the block engine (``directfs.engine.streams.fetch_all``):
blocks start in order, each holding a slot of a shared ``trio.Semaphore`` from before its fetch until its bytes are
delivered, so at most ``slots`` blocks are in memory across every file of a command. A failing block cancels that
file's other fetches and nothing else.

This module is imported by those commands' ``run()`` only: it may import trio and the sources.
"""

from __future__ import annotations

import argparse
import errno
import os
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import trio

from ..engine.diskcache import DiskTier
from ..engine.reader import ReadEngine, ReadSettings
from ..engine.streams import fetch_all
from ..errors import (
    ConfigError,
    DirectFSError,
    EntryNotFoundError,
    InvalidArgumentError,
    NotADirectory,
    ReadOnlyError,
    raise_single,
)
from ..sources.base import Entry, OpenFile, Source, SourceOptions, Writable, join, valid_name
from ..sources.registry import create_source

# A walk deeper than this is a loop (a file:// tree with a symlink to its own parent), not data: PATH_MAX (4096)
# allows at most ~2000 levels of one-letter names, and no real namespace comes near 256.
MAX_DEPTH: Final = 256


def display_url(url: str) -> str:
    """``url`` without user info, query or fragment: safe to print (a query may hold a token or a signature)."""
    parts = urlsplit(url)
    if not parts.scheme:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def where(base: str, path: str) -> str:
    """How a path below a target is shown in messages: the displayed URL (or NAME) and the relative path."""
    shown = printable(display_url(base))
    return f"{shown.rstrip('/')}/{printable(path)}" if path else shown


def describe(exc: OSError, place: str) -> str:
    """One line for an error: ``place: <the errno's message> (<detail>)``; never a secret (sources keep them out)."""
    return f"{place}: {reason(exc)}"


def reason(exc: OSError) -> str:
    """What went wrong, without the place: ``<the errno's message> (<detail>)``."""
    code = exc.errno or errno.EIO
    text = os.strerror(code)
    detail = exc.strerror
    default = getattr(type(exc), "default_message", None)
    if detail and detail not in (text, default):
        text = f"{text} ({detail})"
    return text


def printable(name: str) -> str:
    """A name safe to print on a terminal: control characters (a server may send ESC or newlines) become ``\\xNN``
    escapes and a backslash becomes ``\\\\``, so the output is unambiguous and cannot drive the terminal."""
    out: list[str] = []
    for char in name:
        if char == "\\":
            out.append("\\\\")
        elif unicodedata.category(char) in ("Cc", "Cf") or char in "\u2028\u2029":
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


# --- the target: a folder or a file named by URL --------------------------------------------------------------


@dataclass
class Target:
    """What a URL names: ``entry`` at ``path`` in ``source`` (``path`` is ``""`` for a folder URL). For a folder,
    ``children`` is its listing (already fetched to tell a folder from a file)."""

    source: Source
    path: str
    entry: Entry
    children: list[Entry] | None


def _parent_url(url: str) -> tuple[str, str] | None:
    """``(parent URL, name)`` of a URL whose last path segment names an entry, or None at a root."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if not path.strip("/"):
        return None
    parent, _, last = path.rpartition("/")
    name = unquote(last)
    if not valid_name(name):
        return None
    return urlunsplit((parts.scheme, parts.netloc, parent + "/", parts.query, "")), name


async def _file_in_parent(url: str, options: SourceOptions) -> Target | None:
    """The file the URL names, reached through its parent folder; None if the parent has a folder of that name."""
    parent = _parent_url(url)
    if parent is None:
        return None
    parent_url, name = parent
    source = create_source(parent_url, options)
    try:
        entry = await source.stat(name)
    except BaseException:
        with trio.CancelScope(shield=True):
            await source.aclose()
        raise
    if entry.is_dir:
        await source.aclose()
        return None
    return Target(source, name, entry, None)


def _local_kind(path: str) -> str | None:
    return None if not os.path.exists(path) else "dir" if os.path.isdir(path) else "file"


def _single_file(url: str, children: list[Entry]) -> Entry | None:
    """The http(s):// source mounts a file URL (no trailing ``/``) as a folder holding just that file: that file."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or parts.path.endswith("/") or len(children) != 1:
        return None
    (only,) = children
    name = unquote(parts.path.rpartition("/")[2])
    return only if not only.is_dir and only.name == name else None


async def open_target(url: str, options: SourceOptions) -> Target:
    """Open what ``url`` names (see the module docstring); the caller closes ``target.source``."""
    if urlsplit(url).scheme.lower() == "file":
        local = unquote(urlsplit(url).path)
        kind = await trio.to_thread.run_sync(_local_kind, local)
        if kind is None:
            raise EntryNotFoundError(filename=display_url(url))
        if kind == "file":
            found = await _file_in_parent(url, options)
            if found is None:  # pragma: no cover - a race: it became a folder between the checks
                raise NotADirectory(filename=display_url(url))
            return found
    source = create_source(url, options)
    try:
        root = await source.stat("")
        if root.is_dir:
            try:
                children = [entry async for entry in source.list_dir("")]
            except NotADirectory:
                children = None
            if children is not None:
                single = _single_file(url, children)
                if single is not None:
                    return Target(source, single.name, single, None)
                if not children:
                    # s3://bucket/key (and a missing s3 prefix) reads as an empty folder: the parent knows better.
                    # An empty folder stays one; a parent that cannot be read leaves the answer as it is.
                    try:
                        found = await _file_in_parent(url, options)
                    except EntryNotFoundError:
                        raise EntryNotFoundError(filename=display_url(url)) from None
                    except DirectFSError:
                        found = None
                    if found is not None:
                        await source.aclose()
                        return found
                return Target(source, "", root, children)
        found = await _file_in_parent(url, options)
        if found is None:
            raise NotADirectory(f"{display_url(url)} is not a folder and its parent does not list it as a file")
        await source.aclose()
        return found
    except BaseException:
        with trio.CancelScope(shield=True):
            await source.aclose()
        raise


# --- the target of a write: a store URL that names a file or folder, or a name not taken yet ------------------


@dataclass
class WriteTarget:
    """Where ``cp`` writes: ``path`` in ``store`` (a ``Writable`` source of the URL's parent folder, or of the URL
    itself when it names the store's root: ``path`` is then ``""``). ``entry`` is what is at ``path`` now (None: the
    name is free); ``folder`` says the URL ended with ``/`` (it names a folder, to be made if missing)."""

    store: Source
    path: str
    entry: Entry | None
    folder: bool

    @property
    def writer(self) -> Writable:
        assert isinstance(self.store, Writable)  # open_write_target checked it
        return self.store


def read_only_error(url: str) -> ReadOnlyError:
    scheme = urlsplit(url).scheme.lower()
    return ReadOnlyError(f"{scheme}:// stores are read-only: cannot write to {display_url(url)}")


async def open_write_target(url: str, options: SourceOptions) -> WriteTarget:
    """Open the store ``url`` writes into and stat what it names (see ``WriteTarget``); the caller closes
    ``target.store``. ``ReadOnlyError`` (EROFS) for a store that cannot be written (http(s)://), before any request."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    folder = parts.path.endswith("/") or not path.strip("/")
    store_url, name = url, ""
    if path.strip("/"):
        parent, _, last = path.rpartition("/")
        name = unquote(last)
        if not valid_name(name):
            raise InvalidArgumentError(f"{display_url(url)} does not end in a name a store can hold")
        store_url = urlunsplit((parts.scheme, parts.netloc, parent + "/", parts.query, ""))
        if parts.scheme.lower() == "file" and not await trio.to_thread.run_sync(os.path.isdir, unquote(parent) or "/"):
            raise EntryNotFoundError(f"no folder {display_url(store_url)}")
    store = create_source(store_url, options)
    try:
        if not isinstance(store, Writable):
            raise read_only_error(url)
        try:
            entry: Entry | None = await store.stat(name)
        except EntryNotFoundError:
            entry = None
        return WriteTarget(store, name, entry, folder)
    except BaseException:
        with trio.CancelScope(shield=True):
            await store.aclose()
        raise


async def walk(
    source: Source,
    path: str,
    children: list[Entry] | None,
    on_error: Callable[[str, DirectFSError], None],
    _depth: int = 0,
) -> AsyncIterator[tuple[str, Entry]]:
    """Every entry below folder ``path`` as ``(relative path, entry)``, depth first, names sorted. Each folder is
    listed completely before anything of it is yielded (no listing is left half-run when the caller stops). A
    folder that cannot be listed goes to ``on_error`` and the walk goes on with its siblings."""
    if _depth > MAX_DEPTH:
        on_error(path, DirectFSError(f"more than {MAX_DEPTH} folder levels (a loop?); not descending"))
        return
    if children is None:
        try:
            children = [entry async for entry in source.list_dir(path)]
        except DirectFSError as exc:
            on_error(path, exc)
            return
    for entry in sorted(children, key=lambda e: e.name):
        if not valid_name(entry.name):  # sources skip such names; a local path is built from it, so check again
            on_error(join(path, entry.name), DirectFSError("invalid name from the store; skipped"))
            continue
        rel = join(path, entry.name)
        yield rel, entry
        if entry.is_dir:
            async for item in walk(source, rel, None, on_error, _depth + 1):
                yield item


# --- blocks -----------------------------------------------------------------------------------------------------


# The command's engine: no cache (a copy or a stage reads each block once, so cached blocks would only hold memory:
# 0 makes every block "uncacheable", handed to its reader and dropped), and no memory of failed blocks (that exists
# for the kernel's immediate retry of a failed READ; a command reports a failure once and moves on).
COMMAND_READ_SETTINGS: Final = ReadSettings(cache_size_bytes=0, failed_block_memory_seconds=0.0)


async def fetch_blocks(
    handle: OpenFile,
    slots: trio.Semaphore,
    deliver: Callable[[int, memoryview], Awaitable[None]],
    *,
    disk: DiskTier | None = None,
    path: str = "",
) -> None:
    """Fetch every block of ``handle`` through the block engine (length-checked, single-flight), calling
    ``deliver(offset, data)`` for each, in any order. At most ``slots`` blocks (shared with the caller's other files)
    are fetched or held at once. Raises one ``DirectFSError`` (the first of a failed file's blocks), never a group.
    ``disk``: read and fill that disk cache (``--disk-cache``); ``path`` (the file's path in its source) and the
    version then name its blocks as a mount of the same source names them, so a stage warms that mount."""
    try:
        async with trio.open_nursery() as nursery:
            engine = ReadEngine(COMMAND_READ_SETTINGS, nursery, disk=disk)
            reader = engine.open(handle, (path, handle.layout.version) if disk is not None else "file")
            try:
                await fetch_all(reader, slots, deliver)
                await engine.flush_disk_writes()  # --disk-cache: what was fetched is on disk before the engine closes
            finally:
                with trio.CancelScope(shield=True):
                    await reader.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise_single(group)


def check_max_workers(value: int) -> int:
    # 64: far beyond the 8 in flight that hide object-store latency (docs/testbed.md §5); more only hold memory.
    if not 1 <= value <= 64:
        raise ConfigError(f"--max-workers must be between 1 and 64, not {value}")
    return value


# --- arguments --------------------------------------------------------------------------------------------------


def resolve_source_arg(args: argparse.Namespace, given: str | None = None) -> tuple[str, SourceOptions]:
    """``given`` (default ``args.source``: a URL, a ``NAME`` or ``NAME/sub/path`` of the config file) -> its URL and
    the SourceOptions of the flags, ``DIRECTFS_*`` and the config file folded together (``config.source_settings``)."""
    from ..config import source_settings
    from . import common

    source = args.source if given is None else given
    sub = ""
    if "://" not in source:
        source, _, sub = source.partition("/")
    settings = source_settings(args, source=source)
    url = settings.source or source
    if sub.strip("/"):
        parts = urlsplit(url)
        path = parts.path.rstrip("/") + "/" + quote(sub.strip("/"))
        url = urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
    credentials = common.resolve_credentials(settings)
    return url, common.build_source_options(settings, credentials)
