"""The portal's index (sqlite in the state dir), the ingest that fills it, and the in-memory namespace served from it.

Model
-----
* Every path in DIR (folders too) is a *node* with a decimal id, a GUID that stays with the path across versions,
  and for files the encoding: wrapped file key, compression, native flag, chunking label and the block list.
* A file whose stat (size, mtime, ctime, inode) or encoding rules change is re-encoded and gets a **new id**
  (clients treat the id as a version id, ``docs/ctera-direct-io.md`` §8.2); the old id answers 400 from then on.
* Every create, change and delete appends an *event* (``docs/ctera-direct-io.md`` §8.3); its sequence number is the
  Notification Service cursor (below, and ``docs/serve-feed.md``).

The change feed
---------------
Cursors are ``<feed id>-<seq>``: the feed id is random per state dir (and new after :meth:`Index.reset_feed`), so a
cursor from another portal, another state dir or a reset feed is recognised and refused, never misread as a position
in this one. Events become visible to the feed only once the snapshot that shows them is published
(:attr:`FeedState.published_seq`): a client that reads an event and then lists the entry finds it as the event says,
never the state before (a scan commits its events in batches long before it publishes). At most
``feed_retention_events`` events are kept (older ones are deleted as new ones are published); a cursor older than
what is kept is refused as expired, so the client lists afresh instead of missing changes.

Dedup (what the hash covers)
----------------------------
An object's key is SHA-256 over (format version, key tag, compression, SHA-256 of the plaintext). The key tag is a
hash of the file key for encrypted files and ``native`` for native ones. So identical plaintext is stored once *per
file key and format*: repeated blocks inside a file, and the unchanged blocks of a changed file (a changed file keeps
its path's file key, wrapped anew, exactly so that a new version re-uses the old version's objects). Identical
files at different paths have different random keys and therefore different objects: with per-file random keys,
sharing ciphertext across files would need convergent keys, which the Portal's wrapping scheme does not need and
which leak equality of content. Native objects are plaintext and dedup across all native files.

Concurrency
-----------
:meth:`Index.scan` runs in one worker thread at a time (the server serialises scans with a lock) and encodes files
in a ``ThreadPoolExecutor`` (codec work releases the GIL). It owns the write connection. The event loop reads
events through a second connection (WAL mode lets it read while a scan writes) and reads everything else from the
immutable :class:`Snapshot` that each scan publishes by replacing one attribute (an atomic store in CPython).

Reading DIR (issue 13: H2, M7)
------------------------------
Everything in DIR is opened relative to one ``O_DIRECTORY`` descriptor of DIR taken at start, one path component at a
time with ``O_NOFOLLOW`` (:func:`open_beneath`): a symlink anywhere on the path fails the open (``ELOOP`` or
``ENOTDIR``) instead of leading out of DIR, whenever it was planted. (Python has no ``openat2``; the walk gives what
``RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS`` would.) Files are opened ``O_NONBLOCK`` (a FIFO swapped in does not wait for a
writer), then ``fstat``-ed: only a regular file with the expected device and inode is read
(:meth:`Index.open_file`), so neither the ingest nor a WebDAV GET ever reads another file's bytes.

Writes (``directfs serve --writable``, issue 14)
-----------------------------------------------
:mod:`.writes` changes DIR for the WebDAV write methods and then tells the index, which updates the rows of just the
paths involved and publishes a new snapshot (:meth:`Index._reload`: the touched subtrees, never a rescan). These
``record_*``/``commit_upload`` methods run like :meth:`Index.scan`: in a worker thread, one at a time with the scans
(the server's ``scan_lock``). An upload is encoded from its temp file *before* it is renamed into place, so the
rename and the new id go together; every row is written with the stat of what is on disk afterwards, so the next scan
finds it unchanged and does not re-encode it. A rename (MOVE) or a new mtime (PROPPATCH) keeps the id: the bytes, and
so the blocks, are the same. Objects a write leaves unreferenced are collected by the next scan, not at once, so a
client that is still reading the previous version has until then. Upload temp files (``UPLOAD_TEMP_PREFIX``) are
never published.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import sqlite3
import stat as stat_mod
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..errors import ConfigError, EntryNotFoundError, StaleFileError
from ..sources.ctera import codec
from ..sources.ctera.codec import Compression
from .chunking import file_blocks
from .config import EncodingRules
from .store import BlockStore, object_key

log = logging.getLogger("directfs.server.index")

SCHEMA_VERSION: Final = "1"
OBJECT_FORMAT: Final = b"directfs-object-v1"
# The first id handed out. Ids are decimal integers as on a real Portal; starting above small counts keeps a client
# bug that confuses an id with an index or a block number from passing by accident.
FIRST_NODE_ID: Final = 1000
# Commit the scan in batches: a crash mid-ingest of a huge tree keeps what was done, and one transaction does not
# hold thousands of rows of undo.
COMMIT_EVERY_FILES: Final = 500
# A SDDL string giving Everyone read access: events carry an ``acl``; nothing in directfs interprets it.
DEFAULT_ACL_SDDL: Final = "O:BAG:BAD:(A;;FR;;;WD)"
VIRTUAL_PORTAL_ID: Final = "1"
# Uploads are written to ``<prefix><random>.part`` in the target folder and renamed into place (server/writes.py).
# Names with this prefix are never published, and a client may not create one.
UPLOAD_TEMP_PREFIX: Final = ".directfs-upload-"
# 8 random bytes name a feed (64 bits: two state dirs never share one by chance).
FEED_ID_BYTES: Final = 8
_CURSOR_RE: Final = re.compile(r"([0-9a-f]{16})-([0-9]{1,18})")
_LEGACY_CURSOR_RE: Final = re.compile(r"[0-9]{1,18}")  # the bare sequence numbers of earlier versions
# The columns of a node row, in the order the scan and the writes read them (indices used below: 1 id, 2 guid,
# 3 is_dir, 4 size, 5 mtime_ns, 6 ctime_ns, 7 ino, 8 wrapped_key, 9 compression, 10 native, 11 non_direct,
# 12 chunking, 13 dev).
_NODE_COLUMNS: Final = (
    "path, id, guid, is_dir, size, mtime_ns, ctime_ns, ino, wrapped_key, compression, native, non_direct, chunking, dev"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    path TEXT PRIMARY KEY,          -- relative, '/'-separated, '' is the root
    id INTEGER NOT NULL UNIQUE,
    guid TEXT NOT NULL,
    is_dir INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    wrapped_key TEXT,               -- NULL for folders and native files
    compression TEXT NOT NULL,
    native INTEGER NOT NULL,
    non_direct INTEGER NOT NULL,
    chunking TEXT NOT NULL,
    dev INTEGER                     -- st_dev; NULL in an index written before it was recorded (filled by the next scan)
);
CREATE TABLE IF NOT EXISTS blocks (
    file_id INTEGER NOT NULL, seq INTEGER NOT NULL, length INTEGER NOT NULL, object TEXT NOT NULL,
    PRIMARY KEY (file_id, seq)
);
CREATE INDEX IF NOT EXISTS blocks_object ON blocks(object);
CREATE TABLE IF NOT EXISTS objects (key TEXT PRIMARY KEY, stored_bytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, folder_id INTEGER NOT NULL, body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_folder ON events(folder_id, seq);
"""


# --- the in-memory namespace -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    length: int
    object_key: str


@dataclass(frozen=True)
class Node:
    path: str  # relative, '' for the root
    name: str
    id: int
    guid: str
    is_dir: bool
    size: int
    mtime_ns: int
    # Which file the scan read: a GET serves only a regular file with this device and inode (module docstring).
    # dev is None for an index written before devices were recorded, until the next scan fills it in.
    dev: int | None = None
    ino: int = 0
    # files only
    wrapped_key: str | None = None
    compression: Compression = Compression.NONE
    native: bool = False
    non_direct: bool = False
    blocks: tuple[Block, ...] = ()

    @property
    def etag(self) -> str:
        # The exact form aiohttp's FileResponse computes for the live file and checks If-Match against: a client
        # that sends the listed ETag with a ranged WebDAV GET gets 412 once the file changed, not newer bytes.
        return f'"{self.mtime_ns:x}-{self.size:x}"'


@dataclass(frozen=True)
class Snapshot:
    """What the server answers from. Built whole by each scan and never mutated afterwards."""

    nodes: dict[str, Node] = field(default_factory=dict)
    children: dict[str, tuple[Node, ...]] = field(default_factory=dict)  # folder path -> sorted children
    by_id: dict[int, Node] = field(default_factory=dict)


@dataclass
class ScanStats:
    added: int = 0
    changed: int = 0
    deleted: int = 0
    encoded_bytes: int = 0
    objects_written: int = 0
    objects_deleted: int = 0
    skipped: int = 0
    folders_touched: int = 0  # folders whose mtime changed (an event each; not counted as changed)


@dataclass(frozen=True)
class FeedState:
    """Where the change feed stands. Replaced whole (one attribute store) by the thread that writes the index and
    read by the event loop, which so always sees the three values together."""

    feed_id: str
    pruned_through: int  # every event with seq <= this is gone (0: none was ever deleted)
    published_seq: int  # events up to this one are served; later ones wait for the snapshot that shows them


@dataclass(frozen=True)
class FeedPage:
    """One ``/metadata/list`` answer: the events as their stored JSON texts, the next cursor, and whether more
    events are already waiting."""

    bodies: list[str]
    cursor: str
    has_more: bool


@dataclass(frozen=True)
class CursorProblem:
    """Why a cursor is refused: ``status`` 400 (not a cursor at all) or 410 (expired, or of another feed); ``code``
    names the case for programs (docs/serve-feed.md)."""

    status: int
    code: str
    message: str


def format_cursor(feed_id: str, seq: int) -> str:
    return f"{feed_id}-{seq}"


@dataclass(frozen=True)
class _Stat:
    is_dir: bool
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Stat:
        is_dir = stat_mod.S_ISDIR(st.st_mode)
        return cls(is_dir, 0 if is_dir else st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


# Folders on the way to a file: never through a symlink (O_NOFOLLOW applies to the one component opened each time).
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# The file itself: O_NOFOLLOW refuses a symlink; O_NONBLOCK makes the open of a FIFO return at once (a blocking open
# waits for a writer, forever: issue 13 M7) and is a no-op for reading regular files; O_NOCTTY keeps a terminal
# device from becoming our controlling terminal. Non-regular files are refused right after, by fstat.
_FILE_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _components(relpath: str) -> list[str]:
    parts = relpath.split("/") if relpath else []
    if any(p in ("", ".", "..") for p in parts):
        # Paths come from our own walk, which never yields these; refuse rather than resolve them.
        raise EntryNotFoundError("not a path inside DIR", filename=relpath)
    return parts


def open_beneath(root_fd: int, relpath: str) -> int:
    """An ``O_DIRECTORY`` descriptor of the folder ``relpath`` ('' = DIR itself), walked from ``root_fd`` one component
    at a time without following symlinks. OSError (ELOOP/ENOTDIR for a symlink on the way, ENOENT) as ``os.open``."""
    fd = os.open(".", _DIR_FLAGS, dir_fd=root_fd)  # a descriptor of our own, so every step below can close its parent
    try:
        for part in _components(relpath):
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class _Encoded:
    blocks: list[tuple[int, str]]  # (length, object key)
    new_objects: dict[str, int]  # key -> stored bytes, written by this encode
    wrapped_key: str | None


@dataclass(frozen=True)
class PreparedUpload:
    """An upload encoded from its temp file (:meth:`Index.encode_upload`), not yet renamed into place."""

    path: str
    st: _Stat
    encoded: _Encoded


def _iso(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, tz=dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


_KINDS: Final = {
    stat_mod.S_IFLNK: "a symlink",
    stat_mod.S_IFDIR: "a folder",
    stat_mod.S_IFIFO: "a FIFO",
    stat_mod.S_IFSOCK: "a socket",
    stat_mod.S_IFCHR: "a character device",
    stat_mod.S_IFBLK: "a block device",
}


def _not_the_file(path: str, st: os.stat_result) -> EntryNotFoundError:
    """Log why the file at ``path`` is refused (a warning: this is what a swap attack looks like) and say so."""
    kind = _KINDS.get(stat_mod.S_IFMT(st.st_mode))
    what = f"now {kind}, not a regular file" if kind else f"another file (inode {st.st_ino}) than the one indexed"
    log.warning("%r is %s: not the indexed file, refusing it", path, what)
    return EntryNotFoundError("not the indexed file", filename=path)


def _valid_name(name: str) -> bool:
    """Names a WebDAV client can receive: valid UTF-8, no control characters (XML 1.0 cannot carry most of them)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes come back from os.fsdecode as lone surrogates
        return False
    return not any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)


class Index:
    """The sqlite index of one DIR. Construct, then :meth:`scan`; read :attr:`snapshot` and :meth:`events_after`."""

    def __init__(
        self,
        *,
        root: Path,
        state_dir: Path,
        store: BlockStore,
        rules: EncodingRules,
        secret_access_key: str,
        workers: int,
        sweep_upload_leftovers: bool = False,
        feed_retention_events: int = 0,
    ) -> None:
        self.root = root.resolve()
        self.state_dir = state_dir.resolve()
        # Everything in DIR is opened relative to this descriptor (module docstring): if DIR itself is later renamed
        # or replaced by a symlink, we go on reading the folder we were started on.
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        state_st = os.stat(self.state_dir)
        self._state_dir_id = (state_st.st_dev, state_st.st_ino)  # our own state dir inside DIR is never published
        # Where the state dir is inside DIR ('' for DIR itself), or None: writes never touch it nor its ancestors.
        self.state_dir_relpath: str | None = None
        with contextlib.suppress(ValueError):
            rel = self.state_dir.relative_to(self.root).as_posix()
            self.state_dir_relpath = "" if rel == "." else rel
        # A writable portal removes the temp files of uploads a crash interrupted, once, in its first walk: no upload
        # is in flight before the server listens.
        self._sweep_upload_leftovers = sweep_upload_leftovers
        self.store = store
        self.rules = rules
        self._secret = secret_access_key
        self._workers = workers
        self._feed_retention = feed_retention_events  # 0: every event is kept
        self.snapshot = Snapshot()
        self.feed = FeedState(feed_id="", pruned_through=0, published_seq=0)  # read from the index below
        db_path = self.state_dir / "index.sqlite3"
        # check_same_thread=False: the write connection is used by whichever worker thread runs the (serialised) scan.
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable except for the last commits on power loss
        self._db.executescript(_SCHEMA)
        if "dev" not in {str(r[1]) for r in self._db.execute("PRAGMA table_info(nodes)")}:
            # An index from before devices were recorded: the column is added (NULL), and the next scan fills it
            # in without re-encoding anything (Index.scan).
            self._db.execute("ALTER TABLE nodes ADD COLUMN dev INTEGER")
        self._reader = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._reader_lock = threading.Lock()
        self._check_meta()
        self._load_snapshot()  # publishes the feed too (and applies a retention smaller than last time)

    def close(self) -> None:
        self._db.close()
        self._reader.close()
        os.close(self._root_fd)

    @property
    def root_fd(self) -> int:
        """The ``O_DIRECTORY`` descriptor of DIR everything is opened from (server/writes.py walks from it too)."""
        return self._root_fd

    def is_state_dir(self, st: os.stat_result) -> bool:
        return (st.st_dev, st.st_ino) == self._state_dir_id

    # --- meta ------------------------------------------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def _check_meta(self) -> None:
        version = self._meta("schema")
        if version is not None and version != SCHEMA_VERSION:
            raise ConfigError(f"index {self.state_dir} has schema {version}; this directfs needs {SCHEMA_VERSION}")
        fingerprint = hmac.new(self._secret.encode(), b"directfs-portal-secret-check", hashlib.sha256).hexdigest()
        old = self._meta("secret_fingerprint")
        with self._transaction():
            if old is not None and old != fingerprint:
                # Wrapped keys cannot be unwrapped with the new secret: forget every file; the next scan re-encodes
                # everything with new ids, and the old objects are collected as unreferenced.
                log.warning("the secret access key changed since the last run: every file will be re-encoded")
                self._db.execute("DELETE FROM blocks")
                self._db.execute("DELETE FROM nodes")
                # The nodes went without deleted events, and come back under new ids: no cursor of the old feed can
                # be followed through that, so it ends here (its cursors answer 410).
                self._new_feed()
            self._set_meta("schema", SCHEMA_VERSION)
            self._set_meta("secret_fingerprint", fingerprint)
            if self._meta("next_id") is None:
                self._set_meta("next_id", str(FIRST_NODE_ID))
            if self._meta("feed_id") is None:  # a new index, or one from before feeds had ids: a feed of its own
                self._new_feed()
        self.feed = FeedState(
            feed_id=str(self._meta("feed_id")),
            pruned_through=int(self._meta("feed_pruned_through") or 0),
            published_seq=self._max_seq_ever(),
        )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _new_id(self) -> int:
        value = int(self._meta("next_id") or FIRST_NODE_ID)
        self._set_meta("next_id", str(value + 1))
        return value

    # --- events ----------------------------------------------------------------------------------------------

    def _folder_id_of(self, path: str, ids: dict[str, int]) -> int:
        """The "cloud folder" of a path: its top-level folder under DIR (the root's own id for top-level files)."""
        top = path.split("/", 1)[0] if "/" in path else ""
        return ids.get(top, ids.get("", FIRST_NODE_ID))

    def _row_event(
        self,
        path: str,
        row: Any,
        ids: dict[str, int],
        guids: dict[str, str],
        *,
        deleted: bool,
        mtime_ns: int | None = None,
    ) -> None:
        """The feed event of the node ``row`` (a ``nodes`` row: path, id, guid, is_dir, size, mtime_ns...) at
        ``path``, with its mtime unless ``mtime_ns`` says another."""
        self._event(
            path=path,
            node_id=int(row[1]),
            guid=str(row[2]),
            parent_guid=guids.get(_parent(path)) if path else None,
            is_dir=bool(row[3]),
            size=int(row[4]),
            mtime_ns=int(row[5]) if mtime_ns is None else mtime_ns,
            deleted=deleted,
            folder_id=self._folder_id_of(path, ids),
        )

    def _event(
        self,
        *,
        path: str,
        node_id: int,
        guid: str,
        parent_guid: str | None,
        is_dir: bool,
        size: int,
        mtime_ns: int,
        deleted: bool,
        folder_id: int,
    ) -> None:
        now_iso = _iso(time.time_ns())
        body = {
            "type": "folder" if is_dir else "file",
            "guid": guid,
            "deleted": deleted,
            "name": path.rsplit("/", 1)[-1],
            "folder_id": folder_id,
            "modified": now_iso,
            "portal_modified_date": now_iso,
            "file_timestamp": _iso(mtime_ns),
            "virtual_portal_id": VIRTUAL_PORTAL_ID,
            "size": size,
            "id": node_id,
            "acl": DEFAULT_ACL_SDDL,
            "gvsn": str(node_id),  # a new id per version, so the id doubles as the version sequence number
            "parent_guid": parent_guid,
            "path": path,  # not in docs/ctera-direct-io.md §8.3: spares clients /metadata/ancestors, which we lack
        }
        self._db.execute("INSERT INTO events(folder_id, body) VALUES (?, ?)", (folder_id, json.dumps(body)))

    def _new_feed(self, feed_id: str | None = None) -> None:
        """Start a new feed (inside a transaction): a new id, and no event of the old one kept."""
        self._db.execute("DELETE FROM events")
        self._set_meta("feed_id", feed_id or secrets.token_hex(FEED_ID_BYTES))
        self._set_meta("feed_pruned_through", str(self._max_seq_ever()))

    def _max_seq_ever(self) -> int:
        """The last sequence number handed out, deleted events included (AUTOINCREMENT never reuses one)."""
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='events'").fetchone()
        return 0 if row is None else int(row[0])

    def _publish_feed(self) -> None:
        """Serve every event committed so far (the caller just published the snapshot that shows them), then delete
        what falls out of the retention window. Runs in the thread that writes the index."""
        state = self.feed
        last = self._max_seq_ever()  # never inside a transaction here: every event handed out is committed
        pruned = state.pruned_through
        if self._feed_retention and last - pruned > self._feed_retention:
            pruned = last - self._feed_retention
        # Published before the delete commits: a reader that raced with the delete sees the new pruned_through when
        # it checks again after its query (read_feed), and so never serves a page with a hole in it.
        self.feed = FeedState(state.feed_id, pruned, max(last, state.published_seq))
        if pruned != state.pruned_through:
            with self._transaction():
                self._db.execute("DELETE FROM events WHERE seq <= ?", (pruned,))
                self._set_meta("feed_pruned_through", str(pruned))

    def reset_feed(self) -> str:
        """End the feed: every cursor handed out so far answers 410 and a new feed starts empty (SIGUSR2; tests use
        it to make a client reset). Runs like a write (one at a time with the scans). Returns the new feed id."""
        feed_id = secrets.token_hex(FEED_ID_BYTES)
        last = self._max_seq_ever()  # no scan runs meanwhile: everything handed out is published
        # The new state first, as for a prune (_publish_feed): a reader racing the delete then sees the new id.
        self.feed = FeedState(feed_id, last, last)
        with self._transaction():
            self._new_feed(feed_id)
        return feed_id

    def _position(self, cursor: object, state: FeedState) -> int | CursorProblem:
        """The sequence number a cursor stands at, or why it is refused."""
        if cursor is None:
            return state.pruned_through  # from the oldest event kept
        if isinstance(cursor, str) and (match := _CURSOR_RE.fullmatch(cursor)):
            feed_id, seq = match.group(1), int(match.group(2))
            if feed_id != state.feed_id or seq > state.published_seq:
                return CursorProblem(
                    410,
                    "unknown_cursor",
                    "the cursor is not of this feed (another portal or state dir, or the feed was reset): "
                    "list again with a null cursor",
                )
            if seq < state.pruned_through:
                return CursorProblem(
                    410,
                    "cursor_expired",
                    "the events after this cursor are no longer kept (it is more events behind than the portal keeps, "
                    "--feed-retention): list again with a null cursor",
                )
            return seq
        if isinstance(cursor, str) and _LEGACY_CURSOR_RE.fullmatch(cursor):
            return CursorProblem(
                410,
                "unknown_cursor",
                "the cursor is from an earlier version of this portal: list again with a null cursor",
            )
        return CursorProblem(400, "invalid_cursor", "the cursor must be null or a string this portal handed out")

    def read_feed(self, cursor: object, *, limit: int, folder_ids: frozenset[int] | None) -> FeedPage | CursorProblem:
        """Up to ``limit`` events after ``cursor`` (None: from the oldest kept), of the cloud folders ``folder_ids``
        (None: all). Runs on the event loop's thread (a few ms for a page of 2000)."""
        for _ in range(3):  # a null cursor whose start was pruned meanwhile starts again from the new oldest
            state = self.feed
            start = self._position(cursor, state)
            if isinstance(start, CursorProblem):
                return start
            rows = self._query_events(start, state.published_seq, folder_ids, limit + 1)
            after = self.feed
            if after.feed_id == state.feed_id and after.pruned_through <= start:
                has_more = len(rows) > limit
                rows = rows[:limit]
                end = int(rows[-1][0]) if has_more else state.published_seq
                return FeedPage([str(body) for _, body in rows], format_cursor(state.feed_id, end), has_more)
            if cursor is not None:
                problem = self._position(cursor, after)
                if isinstance(problem, CursorProblem):
                    return problem
        return CursorProblem(503, "feed_busy", "the feed is being pruned faster than it can be read: try again")

    def _query_events(self, after: int, through: int, folder_ids: frozenset[int] | None, limit: int) -> list[Any]:
        with self._reader_lock:
            if folder_ids:
                marks = ",".join("?" * len(folder_ids))
                sql = (
                    "SELECT seq, body FROM events WHERE seq > ? AND seq <= ? "  # noqa: S608 - only '?' marks
                    f"AND folder_id IN ({marks}) ORDER BY seq LIMIT ?"
                )
                return self._reader.execute(sql, (after, through, *sorted(folder_ids), limit)).fetchall()
            return self._reader.execute(
                "SELECT seq, body FROM events WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?", (after, through, limit)
            ).fetchall()

    def check_cursor(self, cursor: object) -> tuple[str, int] | CursorProblem:
        """(feed id, position) of a long-poll's cursor, or why it is refused."""
        state = self.feed
        start = self._position(cursor, state)
        return start if isinstance(start, CursorProblem) else (state.feed_id, start)

    def changes_after(self, feed_id: str, seq: int, folder_ids: frozenset[int] | None) -> bool:
        """Whether a long-poll at (``feed_id``, ``seq``) has something to list: an event of its folders, or the news
        that its cursor has expired or its feed was reset (the list then says so). Runs on the event loop: without
        folders it is a comparison, with them one indexed query."""
        state = self.feed
        if state.feed_id != feed_id or state.pruned_through > seq:
            return True
        if state.published_seq <= seq:
            return False
        if not folder_ids:
            return True
        return bool(self._query_events(seq, state.published_seq, folder_ids, 1))

    # --- scanning --------------------------------------------------------------------------------------------

    def _walk(self) -> tuple[dict[str, _Stat], int]:
        found: dict[str, _Stat] = {}
        skipped = 0
        found[""] = _Stat.of(os.fstat(self._root_fd))
        stack = [""]
        while stack:
            rel = stack.pop()
            # Each folder is opened from DIR's descriptor again (open_beneath), not kept open on the stack: a wide
            # tree would otherwise hold a descriptor per pending folder. A folder swapped for a symlink since its
            # parent was listed fails here (ELOOP/ENOTDIR) instead of being listed from outside DIR.
            try:
                fd = open_beneath(self._root_fd, rel)
            except OSError as exc:
                log.warning("cannot list %r: %s", rel or ".", exc.strerror)
                skipped += 1
                continue
            try:
                try:
                    with os.scandir(fd) as listing:
                        entries = list(listing)
                except OSError as exc:
                    log.warning("cannot list %r: %s", rel or ".", exc.strerror)
                    skipped += 1
                    continue
                for entry in entries:
                    child_rel = f"{rel}/{entry.name}" if rel else entry.name
                    if entry.name.startswith(UPLOAD_TEMP_PREFIX):
                        if self._sweep_upload_leftovers and entry.is_file(follow_symlinks=False):
                            with contextlib.suppress(OSError):
                                os.unlink(entry.name, dir_fd=fd)
                                log.info("removed %r, left over from an interrupted upload", child_rel)
                        continue  # an upload in flight (or its leftover): never published
                    if not _valid_name(entry.name):
                        log.warning("skipping %r: not a name WebDAV clients can receive", child_rel)
                        skipped += 1
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)  # fstatat on fd: must run before fd is closed
                    except OSError:
                        continue  # vanished between listing and stat: the next scan sees the truth
                    if stat_mod.S_ISDIR(st.st_mode):
                        if (st.st_dev, st.st_ino) == self._state_dir_id:
                            continue  # our own state dir inside DIR is never published
                        found[child_rel] = _Stat.of(st)
                        stack.append(child_rel)
                    elif stat_mod.S_ISREG(st.st_mode):
                        found[child_rel] = _Stat.of(st)
                    else:
                        # Symlinks are not followed (they could leave DIR or loop); devices, fifos, sockets have no
                        # bytes.
                        log.info("skipping %r: not a regular file or folder", child_rel)
                        skipped += 1
            finally:
                os.close(fd)
        self._sweep_upload_leftovers = False
        return found, skipped

    def open_file(self, path: str, *, dev: int | None, ino: int, size: int, mtime_ns: int) -> int:
        """A read-only descriptor of the regular file at ``path`` in DIR, which must be the file the scan saw.

        Opened beneath DIR without following any symlink, ``O_NONBLOCK`` (module docstring), then checked with
        ``fstat``. Raises :class:`EntryNotFoundError` when the path no longer leads to that file (gone; a symlink, FIFO,
        device or socket now; another inode: a rename over it, a planted hard link) and :class:`StaleFileError` when
        it is that file but its size or mtime changed since. Suspicious cases are logged as warnings. ``dev`` None:
        not recorded yet (an index from an older version), the inode is checked alone. Thread-safe."""
        parts = _components(path)
        if not parts:
            raise EntryNotFoundError("DIR itself is not a file", filename=path)
        try:
            parent = open_beneath(self._root_fd, "/".join(parts[:-1]))
        except FileNotFoundError:
            raise EntryNotFoundError("gone from DIR since the last scan", filename=path) from None
        except OSError as exc:
            log.warning("%r: a folder on its path is not a folder any more (%s); not following it", path, exc.strerror)
            raise EntryNotFoundError("not the indexed file", filename=path) from None
        try:
            # A look before opening, so a device or FIFO planted earlier is never opened at all (opening some devices
            # has effects); the fstat below closes the race with a swap in between.
            try:
                pre = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                raise EntryNotFoundError("gone from DIR since the last scan", filename=path) from None
            if not stat_mod.S_ISREG(pre.st_mode):
                raise _not_the_file(path, pre)
            try:
                fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                raise EntryNotFoundError("gone from DIR since the last scan", filename=path) from None
            except PermissionError:
                raise
            except OSError as exc:  # ELOOP: a symlink swapped in after the look; ENXIO: a socket
                log.warning("%r is not the indexed file (%s); refusing it", path, exc.strerror)
                raise EntryNotFoundError("not the indexed file", filename=path) from None
        finally:
            os.close(parent)
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISREG(st.st_mode) or st.st_ino != ino or (dev is not None and st.st_dev != dev):
                raise _not_the_file(path, st)
            if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                log.info("%r changed since it was scanned; the next scan picks it up (with a new id)", path)
                raise StaleFileError("changed since the last scan", filename=path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_node(self, node: Node) -> io.FileIO:
        """:meth:`open_file` for the indexed file ``node`` (a WebDAV GET), as an unbuffered binary file object."""
        return io.FileIO(self.open_file(node.path, dev=node.dev, ino=node.ino, size=node.size, mtime_ns=node.mtime_ns))

    def _wanted(self, path: str) -> tuple[str, bool, bool]:
        """(compression, native, non_direct) the encoding rules give the file at ``path``."""
        native = self.rules.is_native(path)
        compression = Compression.NONE if native else self.rules.compression_for(path)
        return compression.value, native, self.rules.is_non_direct(path)

    def _known_objects(self) -> set[str]:
        return {str(r[0]) for r in self._db.execute("SELECT key FROM objects")}

    def scan(self) -> ScanStats:
        """Bring the index in line with DIR: encode new and changed files, forget deleted ones, publish a snapshot."""
        try:
            return self._scan()
        except BaseException:
            # Batches committed before the failure are in the index with their events: publish them together now,
            # so a later write's partial reload never publishes their events without their nodes.
            with contextlib.suppress(Exception):
                self._load_snapshot()
            raise

    def _scan(self) -> ScanStats:
        stats = ScanStats()
        found, stats.skipped = self._walk()
        rows = {str(r[0]): r for r in self._db.execute(f"SELECT {_NODE_COLUMNS} FROM nodes")}  # noqa: S608 - constant
        ids = {p: int(r[1]) for p, r in rows.items()}
        guids = {p: str(r[2]) for p, r in rows.items()}
        chunking = self.rules.chunking_label()

        wanted = self._wanted

        def unchanged(path: str, st: _Stat) -> bool:
            row = rows.get(path)
            if row is None or bool(row[3]) != st.is_dir:
                return False
            if st.is_dir:
                return True
            want = (*wanted(path), chunking)
            same_stat = (int(row[4]), int(row[5]), int(row[6]), int(row[7])) == (
                st.size,
                st.mtime_ns,
                st.ctime_ns,
                st.ino,
            )
            same_dev = row[13] is None or int(row[13]) == st.dev  # None: recorded by the scan below, no re-encode
            same_rules = (str(row[9]), bool(row[10]), bool(row[11]), str(row[12])) == want
            return same_stat and same_dev and same_rules

        deleted = [p for p in rows if p not in found or bool(rows[p][3]) != found[p].is_dir]
        todo = sorted(p for p, st in found.items() if not unchanged(p, st))
        todo_set = set(todo)
        # Folders still there whose mtime changed: something in them came, went or was renamed (or they were
        # touched). Same id; their rows take the new stat, so PROPFIND shows it, and the feed says so.
        touched = sorted(
            p
            for p, st in found.items()
            if st.is_dir and p in rows and bool(rows[p][3]) and int(rows[p][5]) != st.mtime_ns
        )
        known_objects = self._known_objects()
        claimed: set[str] = set()
        claim_lock = threading.Lock()

        with self._transaction():
            # An index from before devices were recorded: record them for what is unchanged.
            self._db.executemany(
                "UPDATE nodes SET dev=? WHERE path=? AND dev IS NULL",
                [(found[p].dev, p) for p, r in rows.items() if r[13] is None and p in found and p not in todo_set],
            )
            # Deletions first (children before parents, so parent ids still resolve for folder_id).
            for path in sorted(deleted, key=lambda p: p.count("/"), reverse=True):
                # (a file that became a folder, or back, is a delete here and a create below)
                self._delete_row(path, rows.pop(path), ids, guids)
                stats.deleted += 1

            for path in touched:
                self._touch_folder(path, rows[path], found[path], ids, guids)
                stats.folders_touched += 1

            # Folders: no encoding, parents before children so every parent guid exists.
            for path in [p for p in todo if found[p].is_dir]:
                self._insert_folder(path, found[path], ids, guids)
                stats.added += 1

        files = [p for p in todo if not found[p].is_dir]
        with ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="directfs-ingest") as pool:
            futures: list[tuple[str, Future[_Encoded | None]]] = []
            for path in files:
                compression, native, _ = wanted(path)
                old = rows.get(path)
                old_wrapped = str(old[8]) if old is not None and old[8] is not None and not bool(old[3]) else None
                futures.append(
                    (
                        path,
                        pool.submit(
                            self._encode_file,
                            path,
                            found[path],
                            Compression(compression),
                            native,
                            old_wrapped,
                            known_objects,
                            claimed,
                            claim_lock,
                        ),
                    )
                )
            pending = 0
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for path, future in futures:
                    encoded = future.result()
                    if encoded is None:
                        stats.skipped += 1
                        continue
                    self._record_file(path, found[path], encoded, wanted(path), chunking, rows, ids, guids, stats)
                    pending += 1
                    if pending >= COMMIT_EVERY_FILES:
                        self._db.execute("COMMIT")
                        self._db.execute("BEGIN IMMEDIATE")
                        pending = 0
            except BaseException:
                self._db.execute("ROLLBACK")
                for _, future in futures:
                    future.cancel()
                raise
            self._db.execute("COMMIT")

        stats.objects_deleted = self._collect_garbage()
        self._load_snapshot()
        return stats

    def _delete_row(self, path: str, row: Any, ids: dict[str, int], guids: dict[str, str]) -> None:
        """Forget the node ``row`` at ``path`` (its children first: parent ids must still resolve for folder_id)."""
        self._db.execute("DELETE FROM blocks WHERE file_id=?", (int(row[1]),))
        self._db.execute("DELETE FROM nodes WHERE path=?", (path,))
        self._row_event(path, row, ids, guids, deleted=True)

    def _touch_folder(self, path: str, row: Any, st: _Stat, ids: dict[str, int], guids: dict[str, str]) -> None:
        """The folder ``row`` at ``path`` has a new mtime: record its stat, with an event under its unchanged id."""
        self._db.execute(
            "UPDATE nodes SET mtime_ns=?, ctime_ns=?, ino=?, dev=? WHERE path=?",
            (st.mtime_ns, st.ctime_ns, st.ino, st.dev, path),
        )
        if path:  # the root is not an item of the feed
            self._event(
                path=path,
                node_id=int(row[1]),
                guid=str(row[2]),
                parent_guid=guids.get(_parent(path)),
                is_dir=True,
                size=0,
                mtime_ns=st.mtime_ns,
                deleted=False,
                folder_id=self._folder_id_of(path, ids),
            )

    def _insert_folder(self, path: str, st: _Stat, ids: dict[str, int], guids: dict[str, str]) -> None:
        """A new folder row with a new id (its parent's row first, so the parent guid exists)."""
        new_id = self._new_id()
        guid = guids.get(path) or str(uuid.uuid4())
        guids[path], ids[path] = guid, new_id
        self._db.execute(
            "INSERT OR REPLACE INTO nodes VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (path, new_id, guid, 1, 0, st.mtime_ns, st.ctime_ns, st.ino, None, "NONE", 0, 0, "", st.dev),
        )
        if path:  # the root is not an item of the feed
            self._event(
                path=path,
                node_id=new_id,
                guid=guid,
                parent_guid=guids.get(_parent(path)),
                is_dir=True,
                size=0,
                mtime_ns=st.mtime_ns,
                deleted=False,
                folder_id=self._folder_id_of(path, ids),
            )

    def _record_file(
        self,
        path: str,
        st: _Stat,
        encoded: _Encoded,
        want: tuple[str, bool, bool],
        chunking: str,
        rows: dict[str, Any],
        ids: dict[str, int],
        guids: dict[str, str],
        stats: ScanStats,
    ) -> None:
        compression, native, non_direct = want
        old = rows.get(path)
        new_id = self._new_id()
        guid = guids.get(path) or str(uuid.uuid4())
        if old is not None:
            self._db.execute("DELETE FROM blocks WHERE file_id=?", (int(old[1]),))
            stats.changed += 1
        else:
            stats.added += 1
        guids[path], ids[path] = guid, new_id
        self._db.execute(
            "INSERT OR REPLACE INTO nodes VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                path,
                new_id,
                guid,
                0,
                st.size,
                st.mtime_ns,
                st.ctime_ns,
                st.ino,
                encoded.wrapped_key,
                compression,
                int(native),
                int(non_direct),
                chunking,
                st.dev,
            ),
        )
        self._db.executemany(
            "INSERT OR IGNORE INTO objects(key, stored_bytes) VALUES (?, ?)", list(encoded.new_objects.items())
        )
        self._db.executemany(
            "INSERT INTO blocks(file_id, seq, length, object) VALUES (?, ?, ?, ?)",
            [(new_id, seq, length, key) for seq, (length, key) in enumerate(encoded.blocks)],
        )
        stats.encoded_bytes += st.size
        stats.objects_written += len(encoded.new_objects)
        self._event(
            path=path,
            node_id=new_id,
            guid=guid,
            parent_guid=guids.get(_parent(path)),
            is_dir=False,
            size=st.size,
            mtime_ns=st.mtime_ns,
            deleted=False,
            folder_id=self._folder_id_of(path, ids),
        )

    def _encode_file(
        self,
        path: str,
        st: _Stat,
        compression: Compression,
        native: bool,
        old_wrapped: str | None,
        known_objects: set[str],
        claimed: set[str],
        claim_lock: threading.Lock,
    ) -> _Encoded | None:
        """Runs in an ingest thread. None when the file changed or vanished while being read (next scan retries)."""
        try:
            fd = self.open_file(path, dev=st.dev, ino=st.ino, size=st.size, mtime_ns=st.mtime_ns)
        except (EntryNotFoundError, StaleFileError):
            return None  # logged by open_file; the next scan sees the truth
        except OSError as exc:  # EACCES and the like: this file is skipped, the scan goes on
            log.warning("skipping %r: %s", path, exc.strerror or exc)
            return None
        try:
            return self._encode_fd(
                path, fd, st, compression, native, old_wrapped, known_objects, claimed, claim_lock, new_objects={}
            )
        finally:
            os.close(fd)

    def _encode_fd(
        self,
        path: str,
        fd: int,
        st: _Stat,
        compression: Compression,
        native: bool,
        old_wrapped: str | None,
        known_objects: set[str],
        claimed: set[str],
        claim_lock: threading.Lock,
        *,
        new_objects: dict[str, int],
    ) -> _Encoded | None:
        """Encode the first ``st.size`` bytes of ``fd`` (the file at ``path``, or an upload for it) into objects of the
        store. None when the file shrank or changed while being read. ``new_objects`` receives every object written,
        as it is written, so a caller whose encode fails half-way can still hand them to the garbage collector."""
        file_key: bytes | None = None
        if not native:
            if old_wrapped is not None:
                with contextlib.suppress(OSError):  # DecryptKeyError is an OSError: then a fresh key
                    file_key = codec.unwrap_file_key(old_wrapped, self._secret)
            if file_key is None:
                file_key = codec.new_file_key()
        key_tag = b"native" if file_key is None else hashlib.sha256(b"directfs-key-tag" + file_key).digest()
        blocks: list[tuple[int, str]] = []

        def store(plain: bytes) -> None:
            digest = hashlib.sha256(
                OBJECT_FORMAT
                + b"\0"
                + key_tag
                + b"\0"
                + compression.value.encode()
                + b"\0"
                + hashlib.sha256(plain).digest()
            ).hexdigest()
            key = object_key(digest)
            blocks.append((len(plain), key))
            with claim_lock:
                if key in known_objects or key in claimed:
                    return
                claimed.add(key)
            obj = codec.encode_block(plain, key=file_key, compression=compression)
            self.store.put(key, obj)
            new_objects[key] = len(obj)

        try:
            # Read, never mapped (chunking module docstring: a truncation under a mapping is SIGBUS).
            block_size = None if self.rules.chunking == "cdc" else self.rules.block_size_bytes
            for _, plain in file_blocks(fd, st.size, block_size_bytes=block_size):
                store(plain)
            if not blocks:
                # A 0-byte file still gets one (empty) object, so the server can answer either "chunks": [] or one
                # 0-length chunk (--empty-files) without re-encoding.
                store(b"")
            if os.fstat(fd).st_mtime_ns != st.mtime_ns:
                log.info("%r changed while encoding; it is picked up by the next scan", path)
                return None
        except StaleFileError:
            log.info("%r shrank while encoding; it is picked up by the next scan", path)
            return None
        wrapped = None if file_key is None else codec.wrap_file_key(file_key, self._secret)
        return _Encoded(blocks=blocks, new_objects=new_objects, wrapped_key=wrapped)

    def _collect_garbage(self) -> int:
        orphans = [
            str(r[0])
            for r in self._db.execute(
                "SELECT key FROM objects WHERE NOT EXISTS (SELECT 1 FROM blocks WHERE blocks.object = objects.key)"
            )
        ]
        for key in orphans:
            try:
                self.store.delete(key)
            except Exception as exc:  # a store hiccup must not fail the scan; the row stays and is retried next time
                log.warning("could not delete unreferenced object %s: %s", key, exc)
                continue
            self._db.execute("DELETE FROM objects WHERE key=?", (key,))
        return len(orphans)

    def forget_missing_objects(self, exists: Any) -> int:
        """Start-up check: files whose objects are gone from the store are re-encoded by the next scan."""
        missing = [str(r[0]) for r in self._db.execute("SELECT key FROM objects") if not exists(str(r[0]))]
        if missing:
            log.warning("%d block objects are missing from the store; their files will be re-encoded", len(missing))
            with self._transaction():
                for key in missing:
                    self._db.execute("DELETE FROM objects WHERE key=?", (key,))
                    # A stat no file can have forces the re-encode (and a new id, which is right: the bytes moved).
                    self._db.execute(
                        "UPDATE nodes SET mtime_ns=-1 WHERE id IN (SELECT file_id FROM blocks WHERE object=?)", (key,)
                    )
        return len(missing)

    # --- writes (server/writes.py; each runs like a scan: in a worker thread, one at a time with the scans) ---------

    def _row(self, path: str) -> Any:
        return self._db.execute(f"SELECT {_NODE_COLUMNS} FROM nodes WHERE path=?", (path,)).fetchone()  # noqa: S608

    def _subtree_rows(self, path: str) -> list[Any]:
        """The rows of ``path`` and of everything beneath it, parents before children."""
        where, args = _subtree_condition("path", path)
        rows = self._db.execute(f"SELECT {_NODE_COLUMNS} FROM nodes WHERE {where}", args).fetchall()  # noqa: S608
        return sorted(rows, key=lambda r: (str(r[0]).count("/"), str(r[0])))

    def _context(self, paths: list[str]) -> tuple[dict[str, int], dict[str, str]]:
        """Ids and guids that events about ``paths`` name: each path's, its parent's, its top folder's, the root's."""
        wanted = {""}
        for path in paths:
            wanted |= {path, _parent(path), path.split("/", 1)[0]}
        ids: dict[str, int] = {}
        guids: dict[str, str] = {}
        for path in wanted:
            row = self._db.execute("SELECT id, guid FROM nodes WHERE path=?", (path,)).fetchone()
            if row is not None:
                ids[path], guids[path] = int(row[0]), str(row[1])
        return ids, guids

    def _lstat(self, path: str) -> os.stat_result:
        """The entry at ``path`` in DIR, reached without following symlinks, not followed itself (OSError if none)."""
        if not path:
            return os.fstat(self._root_fd)
        parent = open_beneath(self._root_fd, _parent(path))
        try:
            return os.stat(path.rsplit("/", 1)[-1], dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)

    def _forget_subtree(self, path: str, ids: dict[str, int], guids: dict[str, str]) -> None:
        """Delete the rows of ``path`` and beneath it, children first, each with its deleted event."""
        rows = self._subtree_rows(path)
        for row in rows:
            ids[str(row[0])], guids[str(row[0])] = int(row[1]), str(row[2])
        for row in reversed(rows):
            self._delete_row(str(row[0]), row, ids, guids)

    def _ensure_folders(self, path: str, ids: dict[str, int], guids: dict[str, str]) -> None:
        """Index ``path`` and its ancestors as the folders they are on disk, where the index does not know them yet
        (made in DIR since the last scan, or by MKCOL). The caller checked they are folders; OSError if not."""
        parts = _components(path)
        for depth in range(len(parts) + 1):
            here = "/".join(parts[:depth])
            row = self._row(here)
            if row is not None and bool(row[3]):
                ids[here], guids[here] = int(row[1]), str(row[2])
                continue
            st = self._lstat(here)
            if not stat_mod.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a folder", here)
            if row is not None:  # a file in the index, a folder on disk now: as a scan would, delete and create
                self._forget_subtree(here, ids, guids)
            self._insert_folder(here, _Stat.of(st), ids, guids)

    def _hand_to_collector(self, objects: dict[str, int]) -> None:
        """Objects written for an upload that is not recorded after all: known to the index, unreferenced, so the
        next scan's garbage collection deletes them."""
        if objects:
            with self._transaction():
                self._db.executemany("INSERT OR IGNORE INTO objects(key, stored_bytes) VALUES (?, ?)", objects.items())

    def encode_upload(self, path: str, fd: int) -> PreparedUpload:
        """Encode the complete upload in ``fd`` (its temp file) as the file ``path`` will be stored: the encoding
        rules of ``path``, and the file key its current version has (so unchanged blocks are the same objects).
        Raises the store's OSError (ENOSPC...), or StaleFileError when the temp file changed while being read."""
        st = _Stat.of(os.fstat(fd))
        compression, native, _ = self._wanted(path)
        row = self._row(path)
        old_wrapped = str(row[8]) if row is not None and row[8] is not None and not bool(row[3]) else None
        written: dict[str, int] = {}
        try:
            encoded = self._encode_fd(
                path,
                fd,
                st,
                Compression(compression),
                native,
                old_wrapped,
                self._known_objects(),
                set(),
                threading.Lock(),
                new_objects=written,
            )
        except BaseException:
            self._hand_to_collector(written)
            raise
        if encoded is None:
            self._hand_to_collector(written)
            raise StaleFileError("the upload changed while it was encoded", filename=path)
        return PreparedUpload(path=path, st=st, encoded=encoded)

    def discard_upload(self, prepared: PreparedUpload) -> None:
        """The upload was encoded but not renamed into place: its new objects go to the collector."""
        self._hand_to_collector(prepared.encoded.new_objects)

    def commit_upload(self, prepared: PreparedUpload, after: os.stat_result) -> Node:
        """Record the upload, now renamed into place (``after`` is its fstat since), under a new id, with its event."""
        path = prepared.path
        done = _Stat.of(after)
        # The size and mtime that were encoded, with the inode's ctime after the rename: if anything changed the file
        # in between, the next scan sees the difference and encodes it again.
        st = _Stat(False, prepared.st.size, prepared.st.mtime_ns, done.ctime_ns, done.ino, done.dev)
        with self._transaction():
            ids, guids = self._context([path])
            self._ensure_folders(_parent(path), ids, guids)
            row = self._row(path)
            rows: dict[str, Any] = {}
            if row is not None and bool(row[3]):  # indexed as a folder, replaced on disk since: as a scan would
                self._forget_subtree(path, ids, guids)
            elif row is not None:
                rows[path] = row
            want = self._wanted(path)
            self._record_file(
                path, st, prepared.encoded, want, self.rules.chunking_label(), rows, ids, guids, ScanStats()
            )
        self._reload([path])
        return self.snapshot.nodes[path]

    def record_folder(self, path: str) -> Node:
        """MKCOL made the folder ``path``: index it (and unindexed folders above it) with a new id and an event."""
        with self._transaction():
            ids, guids = self._context([path])
            self._ensure_folders(path, ids, guids)
        self._reload([path])
        return self.snapshot.nodes[path]

    def record_removed(self, path: str) -> None:
        """``path`` (and all beneath it) is gone from DIR: forget it, with a deleted event for every node."""
        with self._transaction():
            ids, guids = self._context([path])
            self._forget_subtree(path, ids, guids)
        self._reload([path])

    def record_gone_beneath(self, path: str) -> None:
        """A removal of the folder ``path`` failed part-way: forget what of it is gone from DIR (deepest first)."""
        with self._transaction():
            ids, guids = self._context([path])
            rows = self._subtree_rows(path)
            for row in rows:
                ids[str(row[0])], guids[str(row[0])] = int(row[1]), str(row[2])
            for row in reversed(rows):
                try:
                    self._lstat(str(row[0]))
                except FileNotFoundError:
                    self._delete_row(str(row[0]), row, ids, guids)
                except OSError:
                    continue  # not reachable now (a folder on the way is gone or not a folder): the next scan decides
        self._reload([path])

    def record_moved(self, src: str, dst: str, before: os.stat_result, after: os.stat_result) -> None:
        """``src`` was renamed to ``dst`` (whatever was at ``dst`` was removed and recorded first). Every node keeps
        its id and guid; the feed gets a deleted event at each old path (deepest first), then an event at each new
        path (parents first). ``before``/``after``: the moved entry's lstat around the rename, whose ctime it
        changed."""
        with self._transaction():
            ids, guids = self._context([src, dst])
            rows = self._subtree_rows(src)
            for row in rows:
                ids[str(row[0])], guids[str(row[0])] = int(row[1]), str(row[2])
            for row in reversed(rows):
                self._row_event(str(row[0]), row, ids, guids, deleted=True)
            self._ensure_folders(_parent(dst), ids, guids)
            for row in rows:
                old = str(row[0])
                new = dst + old[len(src) :]
                self._db.execute("UPDATE nodes SET path=? WHERE path=?", (new, old))
                ids[new], guids[new] = int(row[1]), str(row[2])
            if rows and str(rows[0][0]) == src and _row_matches(rows[0], before):
                # The rename changed the entry's ctime, nothing else: so the next scan finds it unchanged. (A row that
                # did not describe the file on disk keeps its old stat, and the next scan encodes the file again.)
                self._db.execute("UPDATE nodes SET ctime_ns=? WHERE path=?", (after.st_ctime_ns, dst))
            for row in rows:
                self._row_event(dst + str(row[0])[len(src) :], row, ids, guids, deleted=False)
        self._reload([src, dst])

    def record_times(self, path: str, before: os.stat_result, after: os.stat_result) -> None:
        """PROPPATCH set the mtime of ``path`` (``before``/``after``: its lstat around ``utime``). Same id: the bytes
        did not change; an event says the new time. A row that did not describe what is on disk is left to the next
        scan (which then encodes the file again), so the index never claims a stat its blocks were not read at."""
        with self._transaction():
            row = self._row(path)
            if row is None or not _row_matches(row, before):
                return
            self._db.execute(
                "UPDATE nodes SET mtime_ns=?, ctime_ns=? WHERE path=?", (after.st_mtime_ns, after.st_ctime_ns, path)
            )
            if path:  # the root is not an item of the feed
                ids, guids = self._context([path])
                self._row_event(path, row, ids, guids, deleted=False, mtime_ns=after.st_mtime_ns)
        self._reload([path])

    # --- snapshot --------------------------------------------------------------------------------------------

    def _read_nodes(self, path: str | None) -> list[Node]:
        """Nodes of ``path`` and everything beneath it from the index (every node for None)."""
        where, args = _subtree_condition("n.path", path) if path is not None else ("1=1", ())
        blocks: dict[int, list[Block]] = {}
        # Only '?' marks are interpolated (the condition is ours): the values go as parameters.
        joined = "blocks b JOIN nodes n ON n.id = b.file_id"
        block_sql = f"SELECT b.file_id, b.length, b.object FROM {joined} WHERE {where}"  # noqa: S608
        rows = self._db.execute(block_sql + " ORDER BY b.file_id, b.seq", args)
        for file_id, length, key in rows:
            blocks.setdefault(int(file_id), []).append(Block(int(length), str(key)))
        columns = "n.path, n.id, n.guid, n.is_dir, n.size, n.mtime_ns, n.wrapped_key, n.compression, n.native"
        node_sql = f"SELECT {columns}, n.non_direct, n.ino, n.dev FROM nodes n WHERE {where}"  # noqa: S608
        return [
            Node(
                path=str(r[0]),
                name=str(r[0]).rsplit("/", 1)[-1],
                id=int(r[1]),
                guid=str(r[2]),
                is_dir=bool(r[3]),
                size=int(r[4]),
                mtime_ns=int(r[5]),
                dev=None if r[11] is None else int(r[11]),
                ino=int(r[10]),
                wrapped_key=None if r[6] is None else str(r[6]),
                compression=Compression(str(r[7])),
                native=bool(r[8]),
                non_direct=bool(r[9]),
                blocks=tuple(blocks.get(int(r[1]), ())),
            )
            for r in self._db.execute(node_sql, args)
        ]

    def _load_snapshot(self) -> None:
        nodes = {n.path: n for n in self._read_nodes(None)}
        children: dict[str, list[Node]] = {p: [] for p, n in nodes.items() if n.is_dir}
        for path, node in nodes.items():
            if path:
                children.setdefault(_parent(path), []).append(node)
        self.snapshot = Snapshot(
            nodes=nodes,
            children={p: tuple(sorted(c, key=lambda n: n.name)) for p, c in children.items()},
            by_id={n.id: n for n in nodes.values()},
        )
        self._publish_feed()

    def _reload(self, paths: list[str]) -> None:
        """Publish a snapshot in which ``paths`` and everything beneath them are read again from the index (each may
        have appeared, changed, moved or gone); everything else is shared with the current snapshot, so a write
        costs a copy of three dicts, not a reload of the whole index."""
        old = self.snapshot
        roots: set[str] = set()
        for path in paths:
            while path and _parent(path) not in old.nodes:  # a folder the write indexed on the way
                path = _parent(path)
            roots.add(path)
        if "" in roots:
            self._load_snapshot()
            return
        # Disjoint subtrees only: a root beneath another is read with it.
        roots = {r for r in roots if not any(r.startswith(other + "/") for other in roots)}
        nodes, children, by_id = dict(old.nodes), dict(old.children), dict(old.by_id)
        for root in sorted(roots):
            stack = [root] if root in nodes else []
            while stack:
                node = nodes.pop(stack.pop())
                if by_id.get(node.id) is node:  # a moved node's id may already name its new place
                    del by_id[node.id]
                stack.extend(child.path for child in children.pop(node.path, ()))
            fresh = self._read_nodes(root)
            kids: dict[str, list[Node]] = {n.path: [] for n in fresh if n.is_dir}
            for node in fresh:
                nodes[node.path], by_id[node.id] = node, node
                if node.path != root:
                    kids.setdefault(_parent(node.path), []).append(node)
            for folder, found in kids.items():
                children[folder] = tuple(sorted(found, key=lambda n: n.name))
            parent = _parent(root)
            siblings = [c for c in children.get(parent, ()) if c.path != root]
            if root in nodes:
                siblings.append(nodes[root])
            children[parent] = tuple(sorted(siblings, key=lambda n: n.name))
        self.snapshot = Snapshot(nodes=nodes, children=children, by_id=by_id)
        self._publish_feed()


def _subtree_condition(column: str, path: str) -> tuple[str, tuple[str, ...]]:
    """SQL matching ``path`` and every path beneath it: ``path/`` <= p < ``path0`` is exactly "starts with
    ``path/``" ('0' follows '/' in code point order, which SQLite's BINARY collation of UTF-8 keeps)."""
    if not path:
        return "1=1", ()
    return f"({column} = ? OR ({column} >= ? AND {column} < ?))", (path, path + "/", path + "0")


def _row_matches(row: Any, st: os.stat_result) -> bool:
    """Whether the index row describes the entry ``st`` (a file: the stat its blocks were read at)."""
    if bool(row[3]):
        return stat_mod.S_ISDIR(st.st_mode)
    return (
        stat_mod.S_ISREG(st.st_mode)
        and (int(row[4]), int(row[5]), int(row[6]), int(row[7]))
        == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        and (row[13] is None or int(row[13]) == st.st_dev)
    )
