"""The exception tree of ``directfs.errors``: every class has an errno, a log level and the matching builtin, and the
drawing in the module docstring is the tree the code defines (names, parents, builtins, errnos, levels)."""

from __future__ import annotations

import builtins
import errno
import inspect
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

import directfs.errors as errors_module
from directfs.errors import (
    BlockDigestError,
    BlockError,
    BlockInfo,
    ConfigError,
    DirectFSError,
    DownloadTimeout,
    EntryNotFoundError,
    InvalidArgumentError,
    NoSuchAttributeError,
    ReadOnlyError,
    StreamError,
    log_level_of,
)

LEVELS = {logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR}

# Builtins a class may derive from beyond the one ``OSError(errno, ...)`` maps its errno to (documented in the
# module docstring): Python has no subclass for ENETRESET, and our connection errors are ConnectionErrors.
EXTRA_BUILTINS: dict[int, type[OSError]] = {errno.ENETRESET: ConnectionError}


def tree_classes() -> dict[str, type[DirectFSError]]:
    return {
        name: cls
        for name, cls in inspect.getmembers(errors_module, inspect.isclass)
        if issubclass(cls, DirectFSError) and cls.__module__ == errors_module.__name__
    }


def builtin_for(code: int) -> type[OSError]:
    return type(OSError(code, "x"))


def example(cls: type[DirectFSError]) -> DirectFSError:
    if issubclass(cls, StreamError):
        return cls("m", filename="f", offset=7)
    return cls("m", filename="f")


@dataclass(frozen=True)
class Drawn:
    name: str
    depth: int
    last: bool  # drawn with └── (the last child of its parent)
    builtin: str | None
    errno_name: str
    level: str
    parent: str | None = None


_LINE = re.compile(
    r"^    (?P<prefix>(?:[│ ]   )*)(?:(?P<branch>[├└])── )?(?P<name>\w+)(?: \((?P<builtin>\w+)\))?"
    r" +(?P<errno>E[A-Z]+) +(?P<level>DEBUG|INFO|WARNING|ERROR)(?: {2,}\S.*)?$"
)


def drawing() -> list[Drawn]:
    doc = errors_module.__doc__ or ""
    lines: list[str] = []
    for line in doc.split("\n::\n", 1)[1].splitlines():
        if line.startswith("    "):
            lines.append(line)
        elif lines:  # the first unindented line after the drawing ends it
            break
    drawn: list[Drawn] = []
    stack: list[str] = []
    for line in lines:
        match = _LINE.match(line)
        assert match, f"a drawing line does not parse: {line!r}"
        depth = len(match["prefix"]) // 4 + (1 if match["branch"] else 0)
        del stack[depth:]
        assert len(stack) == depth, f"{match['name']} is drawn deeper than a parent: {line!r}"
        drawn.append(
            Drawn(
                name=match["name"],
                depth=depth,
                last=match["branch"] == "└",
                builtin=match["builtin"],
                errno_name=match["errno"],
                level=match["level"],
                parent=stack[-1] if stack else None,
            )
        )
        stack.append(match["name"])
    return drawn


def test_done_when() -> None:
    assert issubclass(errors_module.EntryNotFoundError, FileNotFoundError)


@pytest.mark.parametrize("name", sorted(tree_classes()))
def test_every_class_has_an_errno_a_level_and_its_builtin(name: str) -> None:
    cls = tree_classes()[name]
    code = cls.__dict__.get("default_errno", cls.default_errno)
    assert isinstance(code, int) and code in errno.errorcode, f"{name} has no errno"
    assert cls.log_level in LEVELS, f"{name} has no log level"
    assert issubclass(cls, builtin_for(code)), f"{name} ({errno.errorcode[code]}) is not a {builtin_for(code)}"
    builtins = {base for base in inspect.getmro(cls) if base.__module__ == "builtins"}
    allowed = set(inspect.getmro(builtin_for(code))) | set(inspect.getmro(EXTRA_BUILTINS.get(code, OSError)))
    assert builtins <= allowed, f"{name} derives from builtins it should not: {builtins - allowed}"
    assert not issubclass(cls, ValueError)  # ValueError is no OSError; see the module docstring

    exc = example(cls)
    assert exc.errno == code and exc.strerror == "m" and exc.filename == "f"
    assert str(exc) == f"[Errno {code}] m: 'f'"
    assert exc.args == (code, "m")
    bare = cls(offset=0) if issubclass(cls, StreamError) else cls()
    assert str(bare) == f"[Errno {code}] {cls.default_message}" and bare.filename is None
    assert log_level_of(exc) == cls.log_level
    with pytest.raises(builtin_for(code)):
        raise exc


def test_the_drawing_is_the_tree() -> None:
    classes = tree_classes()
    drawn = drawing()
    names = [d.name for d in drawn]
    assert len(names) == len(set(names)), "a class is drawn twice"
    assert set(names) == set(classes), (
        f"drawn but not defined: {set(names) - set(classes)}; defined but not drawn: {set(classes) - set(names)}"
    )
    for d in drawn:
        cls = classes[d.name]
        parent = classes[d.parent] if d.parent else OSError
        builtin = [getattr(builtins, d.builtin)] if d.builtin else []
        if d.parent is None:  # the root names its only base: "DirectFSError (OSError)"
            assert cls.__bases__ == tuple(builtin) == (OSError,), d
        else:
            assert cls.__bases__ == (parent, *builtin), f"{d.name}: drawn {d}, defined with bases {cls.__bases__}"
        assert errno.errorcode[cls.default_errno] == d.errno_name, f"{d.name}: drawn {d.errno_name}"
        assert logging.getLevelName(cls.log_level) == d.level, f"{d.name}: drawn {d.level}"


def test_the_drawing_marks_last_children() -> None:
    drawn = drawing()
    for i, d in enumerate(drawn):
        if d.parent is None:
            continue
        later_siblings = [e for e in drawn[i + 1 :] if e.parent == d.parent and e.depth == d.depth]
        assert d.last == (not later_siblings), f"{d.name} should be drawn with {'├' if later_siblings else '└'}──"


def test_builtin_except_clauses_catch_ours() -> None:
    with pytest.raises(FileNotFoundError):
        raise EntryNotFoundError(filename="a/b")
    with pytest.raises(TimeoutError):
        raise DownloadTimeout(block=BlockInfo("id", 1, 0, 10))
    with pytest.raises(PermissionError):
        raise errors_module.AuthorizationError()
    with pytest.raises(ConnectionError):
        raise errors_module.NamespaceConnectionError()


def test_block_errors_keep_their_message_and_class_through_copies() -> None:
    info = BlockInfo("id", 2, 1024, 512)
    error = BlockDigestError("bad md5").with_block(info)
    assert type(error) is BlockDigestError and isinstance(error, BlockError)
    assert str(error) == "[Errno 5] bad md5: 'id' (block 2, offset 1024, length 512)"
    replayed = errors_module.replay_error(error)
    assert type(replayed) is BlockDigestError and str(replayed) == str(error) and replayed.__cause__ is error


# --- log levels where failures are reported -----------------------------------------------------------------


def test_levels_follow_the_kind_of_failure() -> None:
    assert BlockDigestError.log_level == logging.ERROR  # a corrupt block is not a timeout
    assert DownloadTimeout.log_level == logging.WARNING
    assert errors_module.DownloadConnectionError.log_level == logging.WARNING
    assert EntryNotFoundError.log_level == logging.DEBUG
    assert NoSuchAttributeError.log_level == logging.DEBUG and ReadOnlyError.log_level == logging.DEBUG
    assert errors_module.BlocksNotFoundError.log_level == logging.ERROR  # ENODATA, unlike an absent xattr
    assert log_level_of(KeyError("bug")) == logging.ERROR


async def test_fuse_boundary_logs_at_the_class_level(caplog: pytest.LogCaptureFixture) -> None:
    pyfuse3 = pytest.importorskip("pyfuse3")
    from directfs.fuse_ops import _boundary, failure_level

    def failing(exc: Exception) -> Callable[[object, int], Awaitable[None]]:
        @_boundary
        async def read(ops: object, fh: int) -> None:
            await trio.lowlevel.checkpoint()
            raise exc

        return read

    cases = [
        (BlockDigestError("md5", block=BlockInfo("id", 1, 0, 10)), logging.ERROR, errno.EIO),
        (DownloadTimeout(), logging.WARNING, errno.ETIMEDOUT),
        (EntryNotFoundError(), logging.DEBUG, errno.ENOENT),
        (ExceptionGroup("nursery", [BlockDigestError(), DownloadTimeout()]), logging.ERROR, errno.EIO),
    ]
    for exc, level, code in cases:
        assert failure_level(exc) == level
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="directfs.fuse_ops"), pytest.raises(pyfuse3.FUSEError) as info:
            await failing(exc)(object(), 3)
        assert info.value.errno == code
        lines = [r for r in caplog.records if "read 3 failed" in r.getMessage()]
        assert [r.levelno for r in lines] == [level], (exc, lines)
    assert failure_level(KeyError("bug")) == logging.WARNING  # its traceback is logged at ERROR by fuse_errno


# --- no ValueError leaves the package -----------------------------------------------------------------------


def test_constructors_raise_tree_errors_not_value_errors() -> None:
    from directfs.engine.cache import BlockCache
    from directfs.engine.prefetch import PrefetchGate
    from directfs.http import HTTPSettings, RetryPolicy
    from directfs.sources.base import BlockLayout
    from directfs.sources.nearline import StagingPolicy

    invalid_arguments: list[Callable[[], object]] = [
        lambda: BlockLayout("v", (1, 2)),
        lambda: BlockLayout("v", ()),
        lambda: BlockLayout.fixed("v", 10, 0),
        lambda: BlockLayout.fixed("v", 10, 4).block_at(10),
        lambda: BlockCache(-1),
        lambda: BlockCache(10, failed_block_memory_seconds=-1),
        lambda: PrefetchGate(0, 10),
        lambda: PrefetchGate(1, -1),
    ]
    for make in invalid_arguments:
        with pytest.raises(InvalidArgumentError) as info:
            make()
        assert not isinstance(info.value, ValueError) and info.value.errno == errno.EINVAL
    config_errors: list[Callable[[], object]] = [
        lambda: HTTPSettings(connect_timeout_seconds=0),
        lambda: HTTPSettings(max_connections=0),
        lambda: RetryPolicy(max_attempts=0),
        lambda: RetryPolicy(total_budget_seconds=0),
        lambda: StagingPolicy(deadline_seconds=-1),
        lambda: StagingPolicy(poll_min_seconds=2, poll_max_seconds=1),
    ]
    for make in config_errors:
        with pytest.raises(ConfigError) as config_info:
            make()
        assert config_info.value.errno == errno.EINVAL


async def test_local_fetch_block_out_of_range_is_invalid_argument(tmp_path: Path) -> None:
    from directfs.sources.local import LocalSource

    (tmp_path / "f").write_bytes(b"x" * 10)
    source = LocalSource(str(tmp_path), block_size_bytes=4)
    entry = await source.stat("f")
    handle = await source.open("f", entry)
    try:
        with pytest.raises(InvalidArgumentError, match="block 3 outside a file of 3 blocks"):
            await handle.fetch_block(3)
    finally:
        await handle.aclose()
        await source.aclose()
