"""The one exception tree of directfs.

Every class is an ``OSError`` whose ``errno`` says what a POSIX caller sees; the FUSE adapter maps any
``DirectFSError`` to ``FUSEError(exc.errno)`` in one place (``directfs.fuse_ops``), and the Python API raises
them as they are. The names of the Direct IO classes follow cterasdk's (``cterasdk/exceptions/direct.py``)
so users of both recognise them; the errnos follow ``docs/ctera-direct-io.md`` §7, with the fixes of §11
(403 from the Portal is ``AuthorizationError``, a length mismatch is ``BlockValidationError``).

::

    DirectFSError (OSError)                      EIO
    ├── ConfigError                              EINVAL   bad flag, config key or value
    ├── InvalidArgumentError                     EINVAL   bad argument of an API call (negative read offset)
    ├── DirectIOError                            EIO
    │   ├── DirectIOAPIError                     EIO      Portal /directio/{id} failures
    │   │   ├── ObjectNotFoundError              ENOENT   Portal 400 (unknown file id)
    │   │   ├── AuthorizationError               EACCES   Portal 401 and 403
    │   │   ├── UnsupportedStorageError          ENOTSUP  Portal 422 (storage node not in Direct mode)
    │   │   ├── InvalidRequest                   EIO      Portal 500 and other unexpected statuses
    │   │   ├── BlocksNotFoundError              ENODATA  200 with no chunks for a non-empty file
    │   │   ├── MalformedMetadataError           EIO      200 with a body we cannot trust (types, sizes)
    │   │   ├── BlockListConnectionError         ENETRESET
    │   │   └── BlockListTimeout                 ETIMEDOUT
    │   ├── DecryptKeyError                      EIO      wrapped key does not unwrap with the secret
    │   ├── BlockError                           EIO      carries ``block`` (number, offset, length)
    │   │   ├── DownloadError                    EIO      storage status error, truncated body
    │   │   ├── BlockDigestError                 EIO      object differs from the storage's MD5 (ETag/Content-MD5)
    │   │   ├── DownloadTimeout                  ETIMEDOUT
    │   │   ├── DataNotOnlineError               ETIMEDOUT nearline data not staged within the staging deadline
    │   │   ├── DownloadConnectionError          ENETRESET
    │   │   ├── DecryptBlockError                EIO      bad ciphertext length, bad PKCS#7 padding
    │   │   ├── DecompressBlockError             EIO      gzip/snappy failure, bomb
    │   │   └── BlockValidationError             EIO      decoded length differs from the chunk ``len``
    │   └── StreamError                          EIO      carries ``offset``: resume a stream from there
    └── NamespaceError                           EIO      listing / stat of the namespace
        ├── EntryNotFoundError                   ENOENT
        ├── NotADirectory                  ENOTDIR
        ├── IsADirectory                   EISDIR
        ├── PermissionDeniedError                EACCES
        ├── ReadOnlyError                        EROFS
        ├── StaleFileError                       ESTALE   the file changed under an open handle
        ├── NoSuchAttributeError                 ENODATA  getxattr of an attribute the entry does not have
        ├── NamespaceTimeout                     ETIMEDOUT
        ├── NamespaceConnectionError             ENETRESET
        └── MalformedListingError                EIO      a listing reply we cannot parse

Secrets never enter these messages: callers pass file ids, paths and redacted URLs only.
"""

from __future__ import annotations

import errno as _errno
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

logger = logging.getLogger(__name__)


class DirectFSError(OSError):
    """Base of every error directfs raises on purpose. ``errno`` is the class's POSIX error number."""

    default_errno: ClassVar[int] = _errno.EIO
    default_message: ClassVar[str] = "I/O error"

    def __init__(self, message: str | None = None, *, filename: str | None = None) -> None:
        text = message or self.default_message
        if filename is None:
            super().__init__(self.default_errno, text)
        else:
            super().__init__(self.default_errno, text, filename)


class ConfigError(DirectFSError):
    default_errno = _errno.EINVAL
    default_message = "invalid configuration"


class InvalidArgumentError(DirectFSError):
    default_errno = _errno.EINVAL
    default_message = "invalid argument"


# --- Direct IO -------------------------------------------------------------------------------------------------


class DirectIOError(DirectFSError):
    default_message = "Direct IO error"


class DirectIOAPIError(DirectIOError):
    default_message = "Direct IO Portal API error"


class ObjectNotFoundError(DirectIOAPIError):
    default_errno = _errno.ENOENT
    default_message = "File not found"


class AuthorizationError(DirectIOAPIError):
    default_errno = _errno.EACCES
    default_message = "Not authorized: check the access key id"


class UnsupportedStorageError(DirectIOAPIError):
    default_errno = _errno.ENOTSUP
    default_message = "Not all blocks of the requested file are stored on a storage node set to Direct Mode"


class InvalidRequest(DirectIOAPIError):
    default_message = "Portal internal error: invalid request"


class BlocksNotFoundError(DirectIOAPIError):
    default_errno = _errno.ENODATA
    default_message = "The Portal returned no blocks for the file"


class MalformedMetadataError(DirectIOAPIError):
    default_message = "Malformed Direct IO metadata"


class BlockListConnectionError(DirectIOAPIError):
    default_errno = _errno.ENETRESET
    default_message = "Connection error while fetching the block list"


class BlockListTimeout(DirectIOAPIError):
    default_errno = _errno.ETIMEDOUT
    default_message = "Timed out fetching the block list"


class DecryptKeyError(DirectIOError):
    default_message = "Failed to decrypt the file key: wrong secret access key?"


@dataclass(frozen=True)
class BlockInfo:
    """The block an error is about: 1-based ``number`` (as cterasdk counts), file ``offset``, plaintext ``length``."""

    file_id: str
    number: int
    offset: int
    length: int


class BlockError(DirectIOError):
    """A failure of one block. ``block`` is attached by the fetch layer (the codec does not know it)."""

    default_message = "Block error"

    def __init__(
        self, message: str | None = None, *, filename: str | None = None, block: BlockInfo | None = None
    ) -> None:
        super().__init__(message, filename=filename if filename is not None else (block.file_id if block else None))
        self.block = block

    def with_block(self, block: BlockInfo) -> BlockError:
        """Return a copy of this error that names ``block`` (keeps the class, message and cause)."""
        clone = type(self)(self.strerror, block=block)
        clone.__cause__ = self.__cause__ or self
        return clone

    def __str__(self) -> str:
        base = super().__str__()
        if self.block is None:
            return base
        b = self.block
        return f"{base} (block {b.number}, offset {b.offset}, length {b.length})"


class DownloadError(BlockError):
    default_message = "Failed to download block"


class BlockDigestError(BlockError):
    """The downloaded object does not match the MD5 the storage sent with it (Content-MD5, x-goog-hash, or an S3
    single-part ETag): damaged on the wire or at rest. Never decoded, never cached."""

    default_message = "Downloaded block does not match the storage digest"


class DownloadTimeout(BlockError):
    default_errno = _errno.ETIMEDOUT
    default_message = "Timed out downloading block"


class DataNotOnlineError(BlockError):
    """The store said the data is not online yet (HTTP 503 + Retry-After, S3 ``InvalidObjectState``) for longer
    than the staging deadline. ETIMEDOUT, not EAGAIN: Python's ``read()`` turns EAGAIN into ``None`` and copy loops
    would end early, silently truncating the copy."""

    default_errno = _errno.ETIMEDOUT
    default_message = "The data is not online yet (nearline staging did not finish within the staging deadline)"


class DownloadConnectionError(BlockError):
    default_errno = _errno.ENETRESET
    default_message = "Connection error downloading block"


class DecryptBlockError(BlockError):
    default_message = "Failed to decrypt block"


class DecompressBlockError(BlockError):
    default_message = "Failed to decompress block"


class BlockValidationError(BlockError):
    default_message = "Decoded block length does not match the block list"


class StreamError(DirectIOError):
    """A stream stopped; ``offset`` is the first byte not yet delivered. Open a new stream there to resume."""

    default_message = "Stream interrupted"

    def __init__(self, message: str | None = None, *, filename: str | None = None, offset: int) -> None:
        super().__init__(message, filename=filename)
        self.offset = offset


# --- Namespace -------------------------------------------------------------------------------------------------


class NamespaceError(DirectFSError):
    default_message = "Namespace error"


class EntryNotFoundError(NamespaceError):
    default_errno = _errno.ENOENT
    default_message = "No such file or directory"


class NotADirectory(NamespaceError):
    default_errno = _errno.ENOTDIR
    default_message = "Not a directory"


class IsADirectory(NamespaceError):
    default_errno = _errno.EISDIR
    default_message = "Is a directory"


class PermissionDeniedError(NamespaceError):
    default_errno = _errno.EACCES
    default_message = "Permission denied"


class ReadOnlyError(NamespaceError):
    default_errno = _errno.EROFS
    default_message = "Read-only file system"


class StaleFileError(NamespaceError):
    default_errno = _errno.ESTALE
    default_message = "The file changed on the server"


class NoSuchAttributeError(NamespaceError):
    default_errno = _errno.ENODATA  # what getxattr(2) answers for a missing attribute (ENOATTR on Linux)
    default_message = "No such attribute"


class NamespaceTimeout(NamespaceError):
    default_errno = _errno.ETIMEDOUT
    default_message = "Timed out listing the namespace"


class NamespaceConnectionError(NamespaceError):
    default_errno = _errno.ENETRESET
    default_message = "Connection error listing the namespace"


class MalformedListingError(NamespaceError):
    default_message = "Malformed listing reply"


def errno_of(exc: BaseException) -> int:
    """The errno a POSIX caller should see for ``exc``: the class's for ours, EIO for anything unexpected."""
    if isinstance(exc, DirectFSError):
        return exc.errno if exc.errno is not None else _errno.EIO
    return _errno.EIO


# --- exception groups and shared errors ---------------------------------------------------------------------


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def unwrap_error(exc: Exception, *, context: str) -> DirectFSError:
    """The ``DirectFSError`` to report for ``exc``: itself, the first one inside an ``ExceptionGroup`` made only of
    ours, or (for anything else, i.e. a bug) a plain ``DirectFSError`` chained to it, logged once with traceback."""
    if isinstance(exc, DirectFSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        leaves = list(_leaves(exc))
        ours = [leaf for leaf in leaves if isinstance(leaf, DirectFSError)]
        if ours and len(ours) == len(leaves):
            return ours[0]
    logger.error("unexpected %s while %s", type(exc).__name__, context, exc_info=exc)
    error = DirectFSError(f"unexpected {type(exc).__name__} while {context}")
    error.__cause__ = exc
    return error


def replay_error(error: DirectFSError) -> DirectFSError:
    """A fresh exception of the same class and message, chained to ``error``, for one more waiter. Raising one shared
    object from many tasks would splice all their tracebacks onto it (and keep their frames alive)."""
    kwargs: dict[str, object] = {"filename": error.filename}
    if isinstance(error, BlockError):
        kwargs["block"] = error.block
    if isinstance(error, StreamError):
        kwargs["offset"] = error.offset
    try:
        clone = type(error)(error.strerror, **kwargs)  # type: ignore[arg-type]
    except TypeError:  # a subclass with another constructor: the shared object is still the right error
        return error
    clone.__cause__ = error
    return clone


def raise_single(group: BaseExceptionGroup[BaseException]) -> None:
    """Re-raise the one real exception of a nursery's group (``strict_exception_groups``), else the group as it is.
    ``trio.Cancelled`` leaves do not count: they are the siblings the real failure cancelled."""
    import trio  # here, not at the top: importing the error tree must not load trio (the CLI's start-up)

    real = [leaf for leaf in _leaves(group) if not isinstance(leaf, trio.Cancelled)]
    if len(real) == 1:
        raise real[0] from real[0].__cause__
    raise group
