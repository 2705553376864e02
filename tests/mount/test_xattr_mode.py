"""``--xattrs off`` through a real mount of the reference portal (issue 15): the kernel stops sending getxattr and
listxattr after the first ENOSYS, so ``ls -l`` of a folder no longer costs two requests per entry, while the file
ids stay readable with ``directfs ls -l`` (no mount). By default the xattrs are readable as before, and ``ls -l``
pays its per-entry probes. Requests are counted by the daemon itself (``directfs_fuse_requests_total``)."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from directfs.vfs import FILEID_XATTR
from tests.support.fsdrivers import portal_env
from tests.support.mountd import directfs_command, fuse_available, mounted
from tests.support.portal import Portal, start_portal

pytestmark = [pytest.mark.mount, pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse, fusermount3, root")]

ENTRIES = 200  # enough that a per-entry cost cannot hide in the noise of a handful of requests
PROBE = "many/f0007.txt"


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    tree = tmp_path_factory.mktemp("tree")
    (tree / "many").mkdir()
    for i in range(ENTRIES):
        (tree / "many" / f"f{i:04d}.txt").write_bytes(b"x" * (i % 7))
    with start_portal(tree) as served:
        yield served


def fuse_requests(mountpoint: Path, op: str) -> float:
    """Requests of ``op`` the daemon has answered so far, every errno summed."""
    text = subprocess.run(
        directfs_command("stats", "--raw", str(mountpoint)), check=True, capture_output=True, text=True, timeout=30
    ).stdout
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "directfs_fuse_requests_total" and sample.labels.get("op") == op
    )


def ls_l(folder: Path) -> list[str]:
    out = subprocess.run(["ls", "-l", str(folder)], check=True, capture_output=True, text=True, timeout=120)
    return out.stdout.splitlines()[1:]  # without "total N"


def test_off_stops_the_probes_and_ids_stay_in_directfs_ls(portal: Portal) -> None:
    with mounted("ctera+" + portal.url, extra_args=["--xattrs", "off"], env=portal_env(portal)) as mount:
        folder = mount.mountpoint / "many"
        assert len(ls_l(folder)) == ENTRIES  # cold: the one getxattr that learns ENOSYS is in here
        getxattr, listxattr = fuse_requests(mount.mountpoint, "getxattr"), fuse_requests(mount.mountpoint, "listxattr")
        for _ in range(2):
            assert len(ls_l(folder)) == ENTRIES
        for call in (lambda: os.getxattr(mount.mountpoint / PROBE, FILEID_XATTR), lambda: os.listxattr(folder)):
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno == errno.EOPNOTSUPP  # the kernel's own answer once it knows: ENOSYS is not shown
        assert fuse_requests(mount.mountpoint, "getxattr") == getxattr  # nothing asked after the first ENOSYS
        assert getxattr <= 1
        assert fuse_requests(mount.mountpoint, "listxattr") - listxattr <= 1  # the first listxattr learns it too
    listing = subprocess.run(
        directfs_command("ls", "-l", f"ctera+{portal.url}/many"),
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **portal_env(portal)},
    ).stdout.splitlines()
    (line,) = [line for line in listing if line.endswith(" f0007.txt")]
    assert line.split()[3] == portal.file_id(PROBE)  # TYPE SIZE MTIME FILEID NAME


def test_on_by_default_xattrs_readable_and_ls_l_probes_every_entry(portal: Portal) -> None:
    with mounted("ctera+" + portal.url, env=portal_env(portal)) as mount:
        folder = mount.mountpoint / "many"
        assert os.getxattr(mount.mountpoint / PROBE, FILEID_XATTR).decode() == portal.file_id(PROBE)
        assert FILEID_XATTR in os.listxattr(mount.mountpoint / PROBE)
        before = fuse_requests(mount.mountpoint, "getxattr")
        assert len(ls_l(folder)) == ENTRIES
        # security.selinux and system.posix_acl_access for every entry (coreutils 9 ls -l): the cost --xattrs off saves
        assert fuse_requests(mount.mountpoint, "getxattr") - before >= 2 * ENTRIES
