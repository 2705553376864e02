"""The one exception tree of directfs.

Every class is an ``OSError`` whose ``errno`` says what a POSIX caller sees; the FUSE adapter maps any
``DirectFSError`` to ``FUSEError(exc.errno)`` in one place (``directfs.fuse_ops``), and the Python API raises
them as they are. Nothing else leaves the package on purpose: a bad argument is ``InvalidArgumentError`` and a bad
setting ``ConfigError``, never a ``ValueError``. The names of the Direct IO classes follow cterasdk's
(``cterasdk/exceptions/direct.py``) so users of both recognise them; the errnos follow
``docs/ctera-direct-io.md`` §7, with the fixes of §11 (403 from the Portal is ``AuthorizationError``, a length
mismatch is ``BlockValidationError``).

Builtins: each class also derives from the ``OSError`` subclass that ``OSError(errno, ...)`` builds for its errno,
so ``except FileNotFoundError`` catches ``EntryNotFoundError`` and ``ObjectNotFoundError``, ``except TimeoutError``
every timeout, ``except PermissionError`` both EACCES classes; the drawing names that builtin in parentheses. Errnos
Python has no subclass for (EIO, EINVAL, ENOTSUP, ENODATA, EROFS, ESTALE, ENETRESET) stay plain ``OSError``, with
one addition: the ENETRESET classes are ``ConnectionError`` as well (a connect failure, reset or broken reply).
``ConfigError`` and ``InvalidArgumentError`` are not ``ValueError``: that is no ``OSError``, and parsers that catch
``ValueError`` to reword it must not swallow ours.

Log levels: ``log_level`` is the level a failure is logged at where it is reported (one line per failed FUSE
request). DEBUG: normal operation (absent names and attributes, writes to a read-only mount). INFO: the caller's
mistake or a change on the server; nothing is wrong with the mount. WARNING: may pass if tried again (timeouts,
connection errors, server errors). ERROR: needs a person (corrupt or undecodable data, replies we cannot trust,
credentials, the secret, configuration).

::

    DirectFSError (OSError)                                EIO       WARNING
    ├── ConfigError                                        EINVAL    ERROR    bad flag, config key or value
    ├── InvalidArgumentError                               EINVAL    INFO     bad API argument (negative offset)
    ├── DirectIOError                                      EIO       WARNING
    │   ├── DirectIOAPIError                               EIO       WARNING  Portal /directio/{id} failures
    │   │   ├── ObjectNotFoundError (FileNotFoundError)    ENOENT    INFO     Portal 400 (unknown file id)
    │   │   ├── AuthorizationError (PermissionError)       EACCES    ERROR    Portal 401 and 403
    │   │   ├── UnsupportedStorageError                    ENOTSUP   ERROR    Portal 422 (storage not Direct mode)
    │   │   ├── InvalidRequest                             EIO       WARNING  Portal 500, other unexpected statuses
    │   │   ├── BlocksNotFoundError                        ENODATA   ERROR    200, no chunks for a non-empty file
    │   │   ├── MalformedMetadataError                     EIO       ERROR    200 with a body we cannot trust
    │   │   ├── BlockListConnectionError (ConnectionError) ENETRESET WARNING
    │   │   └── BlockListTimeout (TimeoutError)            ETIMEDOUT WARNING
    │   ├── DecryptKeyError                                EIO       ERROR    key does not unwrap with the secret
    │   ├── BlockError                                     EIO       WARNING  carries ``block`` (number, offset...)
    │   │   ├── DownloadError                              EIO       WARNING  storage status error, truncated body
    │   │   ├── BlockDigestError                           EIO       ERROR    object differs from the storage MD5
    │   │   ├── DownloadTimeout (TimeoutError)             ETIMEDOUT WARNING
    │   │   ├── DataNotOnlineError (TimeoutError)          ETIMEDOUT WARNING  nearline data not staged in time
    │   │   ├── DownloadConnectionError (ConnectionError)  ENETRESET WARNING
    │   │   ├── DecryptBlockError                          EIO       ERROR    bad ciphertext length or padding
    │   │   ├── DecompressBlockError                       EIO       ERROR    gzip/snappy failure, bomb
    │   │   ├── BlockValidationError                       EIO       ERROR    decoded length is not chunk ``len``
    │   │   └── RangeNotSupportedError                     ENOTSUP   WARNING  (= EOPNOTSUPP) Range ignored, too far
    │   └── StreamError                                    EIO       WARNING  carries ``offset``: resume there
    └── NamespaceError                                     EIO       WARNING  listing / stat of the namespace
        ├── EntryNotFoundError (FileNotFoundError)         ENOENT    DEBUG
        ├── NotADirectory (NotADirectoryError)             ENOTDIR   INFO
        ├── IsADirectory (IsADirectoryError)               EISDIR    INFO
        ├── PermissionDeniedError (PermissionError)        EACCES    WARNING
        ├── ReadOnlyError                                  EROFS     DEBUG
        ├── StaleFileError                                 ESTALE    INFO     the file changed under a handle
        ├── NoSuchAttributeError                           ENODATA   DEBUG    getxattr of an absent attribute
        ├── NamespaceTimeout (TimeoutError)                ETIMEDOUT WARNING
        ├── NamespaceConnectionError (ConnectionError)     ENETRESET WARNING
        ├── MalformedListingError                          EIO       ERROR    a listing reply we cannot parse
        └── WriteError                                     EIO       WARNING  a change of the store failed (--rw)
            ├── UploadError                                EIO       WARNING  5xx, a cut body, a refused PUT
            ├── NoSpaceError                               ENOSPC    ERROR    the store is full (507)
            ├── QuotaExceededError                         EDQUOT    ERROR    over the owner's quota
            ├── WriteAccessError (PermissionError)         EACCES    ERROR    credentials refused for a write
            ├── UploadTimeout (TimeoutError)               ETIMEDOUT WARNING
            ├── CrossDeviceError                           EXDEV     INFO     a rename the store cannot do
            ├── DirectoryNotEmptyError                     ENOTEMPTY INFO     rmdir of a folder with entries
            ├── EntryExistsError (FileExistsError)         EEXIST    INFO     mkdir/create of an existing name
            └── WriteNotSupportedError                     ENOTSUP   INFO     (= EOPNOTSUPP) an update above the limit

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
    """Base of every error directfs raises on purpose. ``errno`` is the class's POSIX error number, ``log_level``
    the level a failure of this class is logged at (see the module docstring)."""

    default_errno: ClassVar[int] = _errno.EIO
    default_message: ClassVar[str] = "I/O error"
    log_level: ClassVar[int] = logging.WARNING

    def __init__(self, message: str | None = None, *, filename: str | None = None) -> None:
        text = message or self.default_message
        if filename is None:
            super().__init__(self.default_errno, text)
        else:
            super().__init__(self.default_errno, text, filename)


class ConfigError(DirectFSError):
    default_errno = _errno.EINVAL
    default_message = "invalid configuration"
    log_level = logging.ERROR


class InvalidArgumentError(DirectFSError):
    default_errno = _errno.EINVAL
    default_message = "invalid argument"
    log_level = logging.INFO


# --- Direct IO -------------------------------------------------------------------------------------------------


class DirectIOError(DirectFSError):
    default_message = "Direct IO error"


class DirectIOAPIError(DirectIOError):
    default_message = "Direct IO Portal API error"


class ObjectNotFoundError(DirectIOAPIError, FileNotFoundError):
    default_errno = _errno.ENOENT
    default_message = "File not found"
    log_level = logging.INFO


class AuthorizationError(DirectIOAPIError, PermissionError):
    default_errno = _errno.EACCES
    default_message = "Not authorized: check the access key id"
    log_level = logging.ERROR


class UnsupportedStorageError(DirectIOAPIError):
    default_errno = _errno.ENOTSUP
    default_message = "Not all blocks of the requested file are stored on a storage node set to Direct Mode"
    log_level = logging.ERROR


class InvalidRequest(DirectIOAPIError):
    default_message = "Portal internal error: invalid request"


class BlocksNotFoundError(DirectIOAPIError):
    default_errno = _errno.ENODATA
    default_message = "The Portal returned no blocks for the file"
    log_level = logging.ERROR


class MalformedMetadataError(DirectIOAPIError):
    default_message = "Malformed Direct IO metadata"
    log_level = logging.ERROR


class BlockListConnectionError(DirectIOAPIError, ConnectionError):
    default_errno = _errno.ENETRESET
    default_message = "Connection error while fetching the block list"


class BlockListTimeout(DirectIOAPIError, TimeoutError):
    default_errno = _errno.ETIMEDOUT
    default_message = "Timed out fetching the block list"


class DecryptKeyError(DirectIOError):
    default_message = "Failed to decrypt the file key: wrong secret access key?"
    log_level = logging.ERROR


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
    log_level = logging.ERROR


class DownloadTimeout(BlockError, TimeoutError):
    default_errno = _errno.ETIMEDOUT
    default_message = "Timed out downloading block"


class DataNotOnlineError(BlockError, TimeoutError):
    """The store said the data is not online yet (HTTP 503 + Retry-After, S3 ``InvalidObjectState``) for longer
    than the staging deadline. ETIMEDOUT, not EAGAIN: Python's ``read()`` turns EAGAIN into ``None`` and copy loops
    would end early, silently truncating the copy."""

    default_errno = _errno.ETIMEDOUT
    default_message = "The data is not online yet (nearline staging did not finish within the staging deadline)"


class DownloadConnectionError(BlockError, ConnectionError):
    default_errno = _errno.ENETRESET
    default_message = "Connection error downloading block"


class DecryptBlockError(BlockError):
    default_message = "Failed to decrypt block"
    log_level = logging.ERROR


class DecompressBlockError(BlockError):
    default_message = "Failed to decompress block"
    log_level = logging.ERROR


class BlockValidationError(BlockError):
    default_message = "Decoded block length does not match the block list"
    log_level = logging.ERROR


class RangeNotSupportedError(BlockError):
    """EOPNOTSUPP (the same number as ENOTSUP on Linux): a plain HTTP server that ignores ``Range`` is read as one
    stream from byte 0, and this read is further from the stream than ``--no-range-max-size`` (see
    ``directfs.sources.httprange``). WARNING: the user should see why, and that reading sequentially works."""

    default_errno = _errno.EOPNOTSUPP
    default_message = "The server ignores Range and this read is too far from the stream"


class StreamError(DirectIOError):
    """A stream stopped; ``offset`` is the first byte not yet delivered. Open a new stream there to resume."""

    default_message = "Stream interrupted"

    def __init__(self, message: str | None = None, *, filename: str | None = None, offset: int) -> None:
        super().__init__(message, filename=filename)
        self.offset = offset


# --- Namespace -------------------------------------------------------------------------------------------------


class NamespaceError(DirectFSError):
    default_message = "Namespace error"


class EntryNotFoundError(NamespaceError, FileNotFoundError):
    default_errno = _errno.ENOENT
    default_message = "No such file or directory"
    log_level = logging.DEBUG


class NotADirectory(NamespaceError, NotADirectoryError):
    default_errno = _errno.ENOTDIR
    default_message = "Not a directory"
    log_level = logging.INFO


class IsADirectory(NamespaceError, IsADirectoryError):
    default_errno = _errno.EISDIR
    default_message = "Is a directory"
    log_level = logging.INFO


class PermissionDeniedError(NamespaceError, PermissionError):
    default_errno = _errno.EACCES
    default_message = "Permission denied"


class ReadOnlyError(NamespaceError):
    default_errno = _errno.EROFS
    default_message = "Read-only file system"
    log_level = logging.DEBUG


class StaleFileError(NamespaceError):
    default_errno = _errno.ESTALE
    default_message = "The file changed on the server"
    log_level = logging.INFO


class NoSuchAttributeError(NamespaceError):
    default_errno = _errno.ENODATA  # what getxattr(2) answers for a missing attribute (ENOATTR on Linux)
    default_message = "No such attribute"
    log_level = logging.DEBUG


class NamespaceTimeout(NamespaceError, TimeoutError):
    default_errno = _errno.ETIMEDOUT
    default_message = "Timed out listing the namespace"


class NamespaceConnectionError(NamespaceError, ConnectionError):
    default_errno = _errno.ENETRESET
    default_message = "Connection error listing the namespace"


class MalformedListingError(NamespaceError):
    default_message = "Malformed listing reply"
    log_level = logging.ERROR


class WriteError(NamespaceError):
    """A change of the store failed (``--rw``): an upload, a folder, a rename, a delete. Uploads that end in one of
    these keep their bytes under the spool's ``failed/`` folder (directfs.writeback)."""

    default_message = "Write to the store failed"


class UploadError(WriteError):
    default_message = "Upload failed"


class NoSpaceError(WriteError):
    default_errno = _errno.ENOSPC
    default_message = "No space left on the store"
    log_level = logging.ERROR


class QuotaExceededError(WriteError):
    default_errno = _errno.EDQUOT
    default_message = "Quota exceeded on the store"
    log_level = logging.ERROR


class WriteAccessError(WriteError, PermissionError):
    default_errno = _errno.EACCES
    default_message = "The store refused the credentials for this write"
    log_level = logging.ERROR


class UploadTimeout(WriteError, TimeoutError):
    default_errno = _errno.ETIMEDOUT
    default_message = "Timed out uploading"


class CrossDeviceError(WriteError):
    """A rename the store has no move for (a folder on S3): ``mv`` falls back to copying on EXDEV."""

    default_errno = _errno.EXDEV
    default_message = "The store cannot rename this entry"
    log_level = logging.INFO


class DirectoryNotEmptyError(WriteError):
    default_errno = _errno.ENOTEMPTY
    default_message = "Directory not empty"
    log_level = logging.INFO


class EntryExistsError(WriteError, FileExistsError):
    default_errno = _errno.EEXIST
    default_message = "File exists"
    log_level = logging.INFO


class WriteNotSupportedError(WriteError):
    """EOPNOTSUPP (the same number as ENOTSUP on Linux): an in-place update of a file above ``--write-max-size``."""

    default_errno = _errno.EOPNOTSUPP
    default_message = "Operation not supported on this store"
    log_level = logging.INFO


def errno_of(exc: BaseException) -> int:
    """The errno a POSIX caller should see for ``exc``: the class's for ours, EIO for anything unexpected."""
    if isinstance(exc, DirectFSError):
        return exc.errno if exc.errno is not None else _errno.EIO
    return _errno.EIO


def log_level_of(exc: BaseException) -> int:
    """The level to log a failure ``exc`` at: the class's for ours, ERROR for anything unexpected (a bug)."""
    if isinstance(exc, DirectFSError):
        return exc.log_level
    return logging.ERROR


# --- exception groups and shared errors ---------------------------------------------------------------------
#
# The one policy for exception groups (trio nurseries raise them): a group whose leaves are all ours stands for its
# first leaf (several failures at once are one failure to report: the first); a group with any other leaf is not
# ours (a bug, or a Cancelled that belongs to the caller) and is handled by the caller as such. Only
# ``raise_single`` drops ``Cancelled`` leaves, because it re-raises for a caller whose own nursery cancelled them.


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def ours_only(exc: BaseException) -> DirectFSError | None:
    """``exc`` if it is ours, the first leaf of a group made only of ours, else None (the policy above)."""
    if isinstance(exc, DirectFSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        leaves = list(_leaves(exc))
        if leaves and all(isinstance(leaf, DirectFSError) for leaf in leaves):
            first = leaves[0]
            assert isinstance(first, DirectFSError)
            return first
    return None


def unwrap_error(exc: Exception, *, context: str) -> DirectFSError:
    """The ``DirectFSError`` to report for ``exc``: itself, the first one inside an ``ExceptionGroup`` made only of
    ours, or (for anything else, i.e. a bug) a plain ``DirectFSError`` chained to it, logged once with traceback."""
    ours = ours_only(exc)
    if ours is not None:
        return ours
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
