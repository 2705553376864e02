"""The small interface every store implements, and the only thing the filesystem knows about stores.

A *source* lists folders and stats entries (metadata), and opens one *version* of a file as a block map plus a way
to fetch any block's plaintext. CTERA gives the block map from Direct IO (variable-size, encrypted blocks); plain
stores give fixed-size ranges read with HTTP ``Range``. Nothing above this module knows which store it reads.

Paths are relative, ``/``-separated, without leading or trailing slash; the root is ``""``. Names are never empty,
``.``, ``..``, and never hold ``/``, control characters or bidi overrides: sources skip such entries with a warning
(see ``valid_name``).

Errors: sources raise only ``directfs.errors.DirectFSError`` subclasses (with the errno a caller should see).
"""

from __future__ import annotations

import bisect
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

from ..errors import InvalidArgumentError
from ..http import HTTPSettings

if TYPE_CHECKING:
    import trio


@dataclass(frozen=True, slots=True)
class Entry:
    """One file or folder as the store describes it."""

    name: str
    is_dir: bool
    size: int
    mtime_ns: int
    # Opaque version token: any change of content changes it (CTERA: file id + size + mtime + ETag;
    # S3: ETag; local: size + mtime_ns + inode). Cached blocks are keyed by it, so a new version never sees old data.
    version: str
    file_id: str | None = None  # CTERA Direct IO file id (the xattr user.ctera.fileid); None elsewhere
    xattrs: tuple[tuple[str, bytes], ...] = ()  # extra read-only extended attributes, e.g. ("user.etag", b"...")
    # The store's stable identity of the item across renames and new versions (CTERA ``ctera:guid``), which its change
    # feed names (``ChangeEvent``); None where the store has none. Only entries with one can be kept long (vfs).
    guid: str | None = None


# Characters no name in the tree may hold (issue 13 L6): C0 controls (NUL, newline, ESC of terminal escapes...),
# DEL, C1 controls (U+009B is a one-character CSI on many terminals), and the bidi embeddings, overrides and isolates
# (U+202A-U+202E, U+2066-U+2069) that make ``evil\u202etxt.exe`` show as ``evilexe.txt``. A server cannot send them
# through `directfs serve` either; from any other store they would reach shells, scripts and logs through a listing.
_FORBIDDEN_IN_NAMES: Final = frozenset(
    [chr(c) for c in range(0x20)]
    + [chr(c) for c in range(0x7F, 0xA0)]
    + [chr(c) for c in range(0x202A, 0x202F)]
    + [chr(c) for c in range(0x2066, 0x206A)]
)


def valid_name(name: str) -> bool:
    """Whether a server's name may become a directory entry (the others never do: docs/ctera-direct-io.md §14):
    not empty, ``.`` or ``..``, no ``/``, valid UTF-8 of at most 255 bytes, none of ``_FORBIDDEN_IN_NAMES``."""
    try:
        encoded = name.encode()
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 (os.fsdecode)
        return False
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and len(encoded) <= 255
        and _FORBIDDEN_IN_NAMES.isdisjoint(name)
    )


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


@dataclass(frozen=True)
class BlockLayout:
    """Block map of one file version: ``offsets`` are prefix sums, ``offsets[i]`` is where block ``i`` starts and
    ``offsets[-1]`` is the file size (so a file of n blocks has n + 1 offsets; an empty file has ``(0,)``)."""

    version: str
    offsets: Sequence[int]

    def __post_init__(self) -> None:
        if not self.offsets or self.offsets[0] != 0:
            raise InvalidArgumentError("block offsets must start at 0")

    @classmethod
    def fixed(cls, version: str, size: int, block_size_bytes: int) -> BlockLayout:
        """Fixed-size ranges, the layout of plain stores."""
        if block_size_bytes <= 0:
            raise InvalidArgumentError(f"block size must be positive, not {block_size_bytes}")
        offsets = list(range(0, size, block_size_bytes))
        offsets.append(size)
        if size == 0:
            offsets = [0]
        return cls(version, offsets)

    @classmethod
    def from_lengths(cls, version: str, lengths: Sequence[int]) -> BlockLayout:
        offsets = [0]
        for length in lengths:
            offsets.append(offsets[-1] + length)
        return cls(version, offsets)

    @property
    def size(self) -> int:
        return self.offsets[-1]

    @property
    def block_count(self) -> int:
        return len(self.offsets) - 1

    def block_start(self, index: int) -> int:
        return self.offsets[index]

    def block_length(self, index: int) -> int:
        return self.offsets[index + 1] - self.offsets[index]

    def block_at(self, offset: int) -> int:
        """Index of the block holding byte ``offset`` (binary search); requires ``0 <= offset < size``.
        Zero-length blocks are never returned: bisect lands on the last block starting at or before ``offset``."""
        if not 0 <= offset < self.size:
            raise InvalidArgumentError(f"offset {offset} outside file of {self.size} bytes")
        return bisect.bisect_right(self.offsets, offset) - 1


@runtime_checkable
class OpenFile(Protocol):
    """One opened version of a file. Fetches may run concurrently; the caller de-duplicates (single-flight)."""

    @property
    def layout(self) -> BlockLayout: ...

    async def fetch_block(self, index: int) -> bytes | bytearray:
        """Exactly ``layout.block_length(index)`` plaintext bytes of block ``index``, or a ``DirectFSError``.
        Retries, deadlines and URL refresh happen inside; the result is verified (length, codec checks)."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class RangeReadable(Protocol):
    """Optional capability of an ``OpenFile`` whose store serves arbitrary byte ranges of the plaintext (plain stores:
    HTTP ``Range``, ``pread``). The read engine uses it for reads that do not look sequential, so a random 4 KiB read
    fetches a small aligned range instead of a whole block (docs/design-notes.md §1, "cheap first fetch"). CTERA Direct
    IO files never have it: their blocks are encrypted and compressed as a whole. Check with ``isinstance``."""

    async def fetch_range(self, start: int, length: int) -> bytes | bytearray:
        """Exactly ``length`` (> 0) plaintext bytes from ``start``, within the layout's size, or a ``DirectFSError``;
        verified as strictly as ``fetch_block`` (same version checks, same retries and deadlines)."""
        ...


@runtime_checkable
class RawBlocks(Protocol):
    """Optional capability of an ``OpenFile`` whose stored objects are already encrypted at rest (CTERA ``ctera+``
    files with a file key): the disk cache (``directfs.engine.diskcache``, docs/disk-cache.md) keeps such an object
    exactly as fetched, so a copy of the cache folder is as protected as the store, and decodes it on each use. Check
    with ``isinstance``; files without it are cached encrypted under the cache's own key."""

    async def fetch_raw(self, index: int) -> bytes | bytearray:
        """Block ``index``'s stored object as fetched (checked against the storage digest where there is one), not
        decoded; the same retries, deadlines and URL refresh as ``fetch_block``. Raises ``DirectFSError``."""
        ...

    def decode_raw(self, index: int, raw: bytes | bytearray | memoryview) -> bytes | bytearray:
        """``raw`` (from ``fetch_raw``) as the exact plaintext ``fetch_block`` returns, or a ``BlockError``. Pure and
        synchronous, safe in any thread (callers run it in a worker); releases the GIL in its heavy parts."""
        ...


@runtime_checkable
class Preparable(Protocol):
    """Optional capability of a ``Source`` that can build what its first ``open`` needs (HTTP clients, TLS contexts)
    ahead of time: the mount calls it in the background once it serves, so the first read does not pay for it. Errors
    are the caller's to ignore: they come back at ``open``. Check with ``isinstance``."""

    async def prepare(self) -> None: ...


@runtime_checkable
class Source(Protocol):
    """A store, named by a URL. ``display_url`` is safe to log (no credentials, no query)."""

    @property
    def display_url(self) -> str: ...

    async def stat(self, path: str) -> Entry:
        """The entry at ``path`` (root: ``""``); ``EntryNotFoundError`` when absent."""
        ...

    def list_dir(self, path: str) -> AsyncIterator[Entry]:
        """The children of folder ``path``, page by page as the store delivers them; invalid names are skipped."""
        ...

    async def open(self, path: str, entry: Entry) -> OpenFile:
        """Open the version ``entry`` describes. Raises ``StaleFileError`` if the store no longer has that version."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One change a store's change feed reports (CTERA's Notification Service, docs/ctera-direct-io.md §8.3): the
    item ``guid`` now is ``name`` in the folder ``parent_guid`` (or is gone, ``deleted``). A rename or a move is an
    event of the same guid with a new name or parent. The other fields describe the new state when the store says;
    nothing may be assumed from them beyond "this changed"."""

    guid: str
    parent_guid: str | None
    name: str
    deleted: bool
    is_dir: bool
    file_id: str | None = None
    size: int | None = None
    mtime_ns: int | None = None  # the item's own time (CTERA ``file_timestamp``)
    changed_at_ns: int | None = None  # when the store recorded the change (``portal_modified_date``): feed lag


class ChangeSink(Protocol):
    """What a change feed tells the filesystem (``directfs.vfs.FileSystem`` implements it). Called from the feed's
    task on the trio thread; no method awaits, so each one is atomic with respect to the FUSE handlers."""

    def feed_up(self, *, new_cursor: bool) -> None:
        """The feed is caught up: every change from now on will be reported. ``new_cursor``: a new cursor chain began
        (the first start, or after ``feed_reset``), so answers that started before this call are not covered by it;
        False: the feed resumed its old cursor after ``feed_down`` and missed nothing."""
        ...

    def feed_down(self) -> None:
        """The feed stopped answering (its state unknown): fall back to the short TTL now."""
        ...

    def feed_reset(self) -> None:
        """The store refused the cursor (expired): changes may have been missed, so nothing cached is trusted."""
        ...

    def apply_changes(self, events: Sequence[ChangeEvent]) -> int:
        """Invalidate what ``events`` changed; returns how many cached items were dropped."""
        ...


@runtime_checkable
class ChangeFollower(Protocol):
    """One mount's follower of a change feed (built by ``ChangeFeed.change_follower``)."""

    async def run(self, sink: ChangeSink, *, required: bool, task_status: trio.TaskStatus[None] = ...) -> None:
        """Follow the feed until cancelled, telling ``sink``. ``task_status.started()`` once the feed is first up, or
        once it is known to be missing or failing (``required`` False: the mount goes on with the short TTL). With
        ``required``, a feed that is missing or fails before it is first up raises ``ConfigError``."""
        ...

    def statistics(self) -> Mapping[str, float]:
        """Counters and state for metrics (never blocks)."""
        ...


@runtime_checkable
class ChangeFeed(Protocol):
    """Optional capability of a ``Source`` that publishes a change feed (CTERA Portals); check with ``isinstance``.
    Entries of such a source carry ``guid``s, which the feed's events name."""

    def change_follower(self) -> ChangeFollower: ...


@dataclass(frozen=True, slots=True)
class WriteFeatures:
    """What a writable store keeps, so the filesystem answers honestly (``--rw``; README "Writing")."""

    # A real move of folders (WebDAV MOVE, the Portal, file://). False: renaming a folder is EXDEV and ``mv`` copies.
    folder_rename: bool
    # ``set_mtime`` is stored by the store itself (file://, WebDAV PROPPATCH where accepted). False: a file's mtime
    # is the upload time.
    keeps_mtime: bool
    # Folders exist without entries (S3 only has them as a ``name/`` marker object, which this store writes).
    empty_folders: bool = True


@runtime_checkable
class Upload(Protocol):
    """One upload of a new version of a file, begun by ``Writable.begin_upload`` and owned by the write-back layer
    (directfs.writeback): any number of ``part_ready`` calls while a sequential writer passes part boundaries, then
    exactly one of ``commit`` or ``abort``. The spool is a local file the caller keeps open and unchanged below every
    ``end`` it has announced; ``spool_fd`` is read with ``os.pread`` (in worker threads), never moved or closed."""

    async def part_ready(self, spool_fd: int, end: int) -> None:
        """Bytes ``[0, end)`` of the spool are final. A store with multipart uploads may send the complete parts in
        that range now (S3); the others do nothing. Errors are raised here or at ``commit``."""
        ...

    async def commit(self, spool_fd: int, size: int, *, mtime_ns: int | None = None) -> Entry:
        """Send what is not sent yet and make the ``size`` bytes the file's content, replacing any file of that name;
        a reader sees the old or the new content, never a mix, and no partial object is left behind on failure.
        Retries within the store's budget happen inside. Returns the new entry (a new ``version``). ``mtime_ns`` is
        stored where the store keeps times (``WriteFeatures.keeps_mtime``). Raises a ``WriteError`` subclass (or
        ``EntryNotFoundError`` when the parent folder is gone)."""
        ...

    async def abort(self) -> None:
        """Drop what was sent (S3: AbortMultipartUpload). Never raises; failures are logged. Idempotent."""
        ...


@runtime_checkable
class Writable(Protocol):
    """Optional capability of a ``Source`` that can change the store (``--rw``); check with ``isinstance``. Paths are
    as everywhere (relative, no leading slash). Every call has the store's deadlines and retries inside and raises
    only ``DirectFSError`` subclasses: ``EntryNotFoundError`` for a missing entry or parent, ``EntryExistsError``,
    ``DirectoryNotEmptyError``, ``CrossDeviceError``, ``NotADirectory``/``IsADirectory``, and the ``WriteError``
    classes of ``http.write_status_error`` for what the store refused."""

    @property
    def write_features(self) -> WriteFeatures: ...

    def begin_upload(self, path: str) -> Upload:
        """A new upload to ``path``; nothing is sent yet (cheap, synchronous)."""
        ...

    async def make_dir(self, path: str) -> Entry:
        """Create folder ``path``; ``EntryExistsError`` if the name exists."""
        ...

    async def remove_file(self, path: str) -> None:
        """Delete file ``path``; ``EntryNotFoundError`` if absent, ``IsADirectory`` for a folder."""
        ...

    async def remove_dir(self, path: str) -> None:
        """Delete the empty folder ``path``; ``DirectoryNotEmptyError`` if it has entries."""
        ...

    async def rename(self, old: str, new: str, *, is_dir: bool) -> None:
        """Move ``old`` to ``new``, replacing a file at ``new`` (POSIX ``rename``); a folder at ``new`` must be empty
        (``DirectoryNotEmptyError``). ``CrossDeviceError`` for a folder when ``folder_rename`` is False. The store's
        move is atomic where it has one (file://, WebDAV MOVE); S3 copies then deletes."""
        ...

    async def set_mtime(self, path: str, mtime_ns: int) -> bool:
        """Store the modification time of ``path`` where the store can; False when it does not keep times (or
        refused this one). Never raises for a refusal, only for a missing entry or a failed request."""
        ...


@dataclass(frozen=True)
class Credentials:
    """Everything a store may need to authenticate. Secrets are never shown by ``repr`` (logs, tracebacks)."""

    # CTERA Direct IO access key id, sent as Bearer to /directio: alone it unlocks native files, so a secret too
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)  # unwraps file keys; never sent anywhere
    username: str | None = None  # HTTP Basic (Portal WebDAV, webdav://)
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)  # Bearer token (WebDAV)
    token_file: str | None = None  # Bearer token re-read when the file changes (rotating OIDC tokens)
    client_cert: str | None = None  # X.509 client / proxy certificate (PEM path)
    client_key: str | None = None


@dataclass(frozen=True)
class SourceOptions:
    """Store-independent options every source honours. Built once by the command layer (file < env < flags)."""

    credentials: Credentials = field(default_factory=Credentials)
    verify_tls: bool = True  # on by default: an untrusted certificate is refused unless the user says otherwise
    ca_file: str | None = None  # trusted on top of the system roots (Portal and stores; storage too unless below)
    storage_verify_tls: bool | None = None  # object storage (presigned URLs) TLS; None = same as verify_tls
    # Object storage behind presigned block URLs trusts the system roots plus this file instead of ca_file: a private
    # CA of the Portal need not be trusted for storage. None = ca_file.
    storage_ca_file: str | None = None
    # Block URLs over plain http:// or to this machine from a Portal that is not on it: off, because CTERA blocks
    # carry no MAC (a network attacker could change them) and a Portal should not aim us at local services.
    allow_insecure_storage: bool = False
    connect_timeout_seconds: float = 5.0  # loopback/LAN connects take ms; 5 s tolerates a congested WAN
    read_timeout_seconds: float = 10.0  # per socket read: a 4 MiB block at >= 0.4 MB/s still makes progress
    # Plain stores only (CTERA blocks come from the Portal). Measured with s3:// against SeaweedFS on loopback (2 cores,
    # 256 MiB object, median of 3, two runs): sequential MB/s one block at a time / 4 in flight / one-block latency:
    #   1 MiB: 121-126 / 139-177 / 7.5 ms    4 MiB: 331-333 / 266-301 / 11 ms
    #   8 MiB: 415-434 / 268-290 / 20 ms    16 MiB: 375-512 / 330-360 / 28-30 ms
    # 8 MiB: per-request cost amortised (3.5x of 1 MiB), steadier than 16 MiB, and a random read waits 20 ms not 30.
    block_size_bytes: int = 8 * 1024 * 1024
    endpoint_url: str | None = None  # s3:// against S3-compatible servers
    # Nearline stores (tape): how long one block read waits for data to come online before ETIMEDOUT. 5 minutes covers
    # a disk-cache recall on tape systems while a stuck read still ends; bigger recalls: `directfs stage` ahead.
    staging_deadline_seconds: float = 300.0
    # http(s):// servers that ignore Range (200 to a ranged GET): a read is served by reading the one stream from byte
    # 0 up to it only when that is at most this much further (never below a block). 64 MiB covers the 32 MiB read-ahead
    # window plus a block, so a sequential reader's prefetches are never refused, and bounds a random read's wait to
    # under a second at 1 Gb/s; further reads fail with EOPNOTSUPP instead of silently streaming gigabytes.
    no_range_max_size_bytes: int = 64 * 1024 * 1024
    allow_plain_http: bool = False  # ctera+http:// only for loopback unless this is set
    # file:// only: symlinks leading out of the source folder are refused unless set (issue 13 M8): whoever can write
    # into the tree could otherwise link to any file the daemon may read.
    follow_symlinks: bool = False

    def http_settings(self, *, storage: bool = False) -> HTTPSettings:
        """The one translation of these options into an ``HTTPSettings``: the Portal's or a store's (TLS, CA, client
        certificate, timeouts), or with ``storage`` object storage behind presigned URLs (its own TLS switch and CA
        file, no client certificate: presigned URLs carry their own authorisation)."""
        if storage:
            verify = self.verify_tls if self.storage_verify_tls is None else self.storage_verify_tls
            ca_file = self.ca_file if self.storage_ca_file is None else self.storage_ca_file
            client_cert = client_key = None
        else:
            verify, ca_file = self.verify_tls, self.ca_file
            client_cert, client_key = self.credentials.client_cert, self.credentials.client_key
        return HTTPSettings(
            connect_timeout_seconds=self.connect_timeout_seconds,
            read_timeout_seconds=self.read_timeout_seconds,
            verify_tls=verify,
            ca_file=ca_file,
            client_cert=client_cert,
            client_key=client_key,
        )
