"""``--xattrs on|off`` (issue 15): every spelling of the option reaches ``VfsSettings.xattrs``, and the FUSE adapter
answers getxattr/listxattr from the entry when on (the default) and ENOSYS when off, the one answer the kernel
remembers for the whole mount (fs/fuse/xattr.c: ``fc->no_getxattr``), so ``ls -l`` stops probing every entry.
The kernel side is checked through a real mount in tests/mount/test_xattr_mode.py."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from directfs import cli, config
from directfs.commands.mount import mount_config
from directfs.errors import ConfigError, EntryNotFoundError
from directfs.fuse_ops import Operations
from directfs.metrics import OpStats
from directfs.sources.base import Entry, OpenFile
from directfs.vfs import FILEID_XATTR, ROOT_INODE, FileSystem, VfsSettings

FILE = Entry("f.bin", False, 3, 1_700_000_000_000_000_000, "v1", file_id="12345", xattrs=(("user.etag", b'"e1"'),))
ROOT = Entry("", True, 0, 1_700_000_000_000_000_000, "root")


class OneFileSource:
    """A store holding one file with a CTERA file id and an ETag."""

    display_url = "fake://"

    async def stat(self, path: str) -> Entry:
        await trio.lowlevel.checkpoint()
        if path == "":
            return ROOT
        if path == FILE.name:
            return FILE
        raise EntryNotFoundError(filename=path)

    async def list_dir(self, path: str) -> AsyncIterator[Entry]:
        await trio.lowlevel.checkpoint()
        yield FILE

    async def open(self, path: str, entry: Entry) -> OpenFile:
        raise AssertionError("no reads in these tests")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class NoEngine:
    def open(self, file: OpenFile, identity: object) -> Any:
        raise AssertionError("no reads in these tests")


async def operations(settings: VfsSettings) -> tuple[Operations, int, OpStats]:
    fs = FileSystem(OneFileSource(), NoEngine(), settings)  # type: ignore[arg-type]
    await fs.start()
    stats = OpStats()
    ops = Operations(fs, negative_ttl_seconds=1.0, op_stats=stats)
    inode = (await fs.lookup(ROOT_INODE, FILE.name)).inode
    return ops, inode, stats


CTX: Any = None  # the handlers never read the request context


# --- the adapter ------------------------------------------------------------------------------------------------


async def test_on_by_default_answers_the_entrys_attributes() -> None:
    assert VfsSettings().xattrs is True
    ops, inode, stats = await operations(VfsSettings())
    assert await ops.getxattr(inode, FILEID_XATTR.encode(), CTX) == b"12345"
    assert await ops.getxattr(inode, b"user.etag", CTX) == b'"e1"'
    assert list(await ops.listxattr(inode, CTX)) == [FILEID_XATTR.encode(), b"user.etag"]
    with pytest.raises(pyfuse3.FUSEError) as absent:  # what ls -l's security.selinux probe gets: asked again
        await ops.getxattr(inode, b"security.selinux", CTX)
    assert absent.value.errno == errno.ENODATA
    assert stats.counts()[("getxattr", "ENODATA")] == 1


async def test_off_answers_enosys_for_every_name_and_inode() -> None:
    ops, inode, stats = await operations(VfsSettings(xattrs=False))
    for target, name in [(inode, FILEID_XATTR.encode()), (inode, b"security.selinux"), (ROOT_INODE, b"user.etag")]:
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.getxattr(target, name, CTX)
        assert info.value.errno == errno.ENOSYS  # not EOPNOTSUPP/ENODATA: only ENOSYS makes the kernel stop asking
    with pytest.raises(pyfuse3.FUSEError) as listed:
        await ops.listxattr(inode, CTX)
    assert listed.value.errno == errno.ENOSYS
    assert stats.counts()[("getxattr", "ENOSYS")] == 3
    assert stats.counts()[("listxattr", "ENOSYS")] == 1


async def test_off_still_refuses_setxattr_as_before() -> None:
    ops, inode, _ = await operations(VfsSettings(xattrs=False))
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.setxattr(inode, b"user.x", b"1", CTX)
    assert info.value.errno == errno.EROFS


# --- every spelling of the option --------------------------------------------------------------------------------


def vfs_settings(argv: list[str], env: dict[str, str] | None = None) -> VfsSettings:
    args = cli.build_parser().parse_args(["mount", "file:///srv", "/mnt/x", *argv])
    return mount_config(config.mount_settings(args, env or {})).vfs_settings


def test_default_is_on() -> None:
    assert vfs_settings([]).xattrs is True


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["--xattrs", "off"], {}, False),
        (["--xattrs", "on"], {"DIRECTFS_XATTRS": "off"}, True),  # the flag beats the environment
        (["-o", "xattrs=off"], {}, False),
        ([], {"DIRECTFS_XATTRS": "off"}, False),
        ([], {"DIRECTFS_XATTRS": "false"}, False),
    ],
)
def test_flag_o_and_environment(argv: list[str], env: dict[str, str], expected: bool) -> None:
    assert vfs_settings(argv, env).xattrs is expected


def test_config_file(tmp_path: Path) -> None:
    path = tmp_path / "directfs.toml"
    path.write_text("[mount]\nxattrs = false\n")
    path.chmod(0o600)
    assert vfs_settings([], {"DIRECTFS_CONFIG": str(path)}).xattrs is False


def test_bad_values_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["mount", "file:///srv", "/mnt/x", "--xattrs", "maybe"])
    assert "invalid choice: 'maybe'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="-o xattrs 'maybe': expected true or false"):
        vfs_settings(["-o", "xattrs=maybe"])
    with pytest.raises(ConfigError, match="DIRECTFS_XATTRS"):
        vfs_settings([], {"DIRECTFS_XATTRS": "maybe"})
