"""``mount.directfs``: the mount(8) helper, so ``/etc/fstab`` lines and ``mount -t directfs`` work.

mount(8) runs ``/sbin/mount.directfs SOURCE MOUNTPOINT [-sfnv] [-N NS] [-o OPTIONS]`` (mount(8), "External
helpers"). SOURCE is a ``[source.NAME]`` of the config file or a URL. An fstab line::

    projects  /mnt/projects  directfs  _netdev,nofail,config=/etc/directfs/directfs.toml,allow_other  0 0

Options:

- ignored (they are for mount(8), systemd or the admin): ``_netdev``, ``nofail``, ``noauto``, ``auto``, ``user``,
  ``users``, ``nouser``, ``owner``, ``group``, ``defaults``, ``ro``, ``rw`` (the mount is always read-only),
  ``x-*`` (``x-systemd.*``, ``x-mount.*``), ``comment=*``, and the kernel flags mount(8) may pass along
  (``nosuid``, ``nodev``, ``noexec``, ``exec``, ``suid``, ``dev``, ``noatime``, ``relatime``, ``async``).
- mapped to flags of ``directfs mount``: ``config=``, ``log_file=``, ``log_level=``, ``metrics_address=``,
  ``metrics_allow_remote``, ``access_key_id=``, ``username=``, the secret *file* options (``secret_access_key_file=``,
  ``password_file=``, ``token_file=``), ``ca_file=``, ``client_cert=``, ``client_key=``, ``connect_timeout=``,
  ``read_timeout=``, ``no_verify_tls``.
- passed on with ``-o``: ``allow_other``, ``uid=``, ``gid=``, ``umask=``, ``cache_size=``, ``read_ahead=``,
  ``metadata_ttl=``.
- refused: secret *values* (``password=``, ``secret_access_key=``, ``token=``): fstab is world-readable and the
  value would sit in every ``ps`` listing. Any other option is an error naming it, unless ``-s`` (sloppy) is given.

``-f`` (fake) prints the command and exits; ``-v`` logs at debug; ``-n`` is accepted (there is no mtab to skip).
The helper runs ``directfs mount`` in daemon mode, which returns only once the mount answers (or with the reason it
failed), so ``mount -a`` and ``x-systemd`` ordering see a live mount. Exit codes follow mount(8): 0 mounted,
1 bad invocation, 32 mount failure.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

EXIT_USAGE: Final = 1  # mount(8): incorrect invocation or permissions
EXIT_FAILURE: Final = 32  # mount(8): mount failure

IGNORED: Final = frozenset(
    {
        "_netdev",
        "nofail",
        "noauto",
        "auto",
        "user",
        "users",
        "nouser",
        "owner",
        "group",
        "defaults",
        "ro",
        "rw",
        "nosuid",
        "suid",
        "nodev",
        "dev",
        "noexec",
        "exec",
        "noatime",
        "atime",
        "relatime",
        "norelatime",
        "async",
        "sync",
    }
)
IGNORED_PREFIXES: Final = ("x-", "comment=")

# option -> flag of `directfs mount` (value options take "=VALUE"; the others are switches)
FLAG_VALUES: Final = {
    "config": "--config",
    "log_file": "--log-file",
    "log_level": "--log-level",
    "metrics_address": "--metrics-address",
    "access_key_id": "--access-key-id",
    "username": "--username",
    "secret_access_key_file": "--secret-access-key-file",
    "password_file": "--password-file",
    "token_file": "--token-file",
    "ca_file": "--ca-file",
    "client_cert": "--client-cert",
    "client_key": "--client-key",
    "connect_timeout": "--connect-timeout",
    "read_timeout": "--read-timeout",
}
FLAG_SWITCHES: Final = {
    "metrics_allow_remote": "--metrics-allow-remote",
    "no_verify_tls": "--no-verify-tls",
}
PASSED_WITH_O: Final = frozenset({"allow_other", "uid", "gid", "umask", "cache_size", "read_ahead", "metadata_ttl"})
SECRET_VALUES: Final = frozenset({"password", "secret_access_key", "token"})


class UsageError(Exception):
    """Bad invocation: the message is for the admin (never holds a secret value)."""


@dataclass
class Invocation:
    source: str
    mountpoint: str
    fake: bool = False
    verbose: bool = False
    sloppy: bool = False
    options: list[str] = field(default_factory=list)


def parse_argv(argv: Sequence[str]) -> Invocation:
    """mount(8)'s helper argv (without the program name). Short flags may be combined (``-sv``), ``-o`` may repeat
    and may be glued (``-oro``); ``-N NS`` and ``-t TYPE`` are accepted and ignored."""
    positional: list[str] = []
    inv = Invocation(source="", mountpoint="")
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            positional.extend(argv[i:])
            break
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
            continue
        letters = arg[1:]
        while letters:
            letter, letters = letters[0], letters[1:]
            if letter in "oNt":
                value = letters
                if not value:
                    if i >= len(argv):
                        raise UsageError(f"-{letter} needs a value")
                    value = argv[i]
                    i += 1
                if letter == "o":
                    inv.options.append(value)
                letters = ""
            elif letter == "f":
                inv.fake = True
            elif letter == "v":
                inv.verbose = True
            elif letter == "s":
                inv.sloppy = True
            elif letter == "n":
                pass  # no mtab to leave alone
            else:
                raise UsageError(f"unknown flag -{letter}")
    if len(positional) != 2:
        raise UsageError("usage: mount.directfs SOURCE MOUNTPOINT [-sfnv] [-o OPTION[,OPTION...]]")
    inv.source, inv.mountpoint = positional
    return inv


def mount_command(inv: Invocation) -> list[str]:
    """The ``directfs mount`` argv (after ``python -m directfs.cli``) for an invocation."""
    flags: list[str] = []
    passed: list[str] = []
    for group in inv.options:
        for item in group.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.replace("-", "_")
            if key in IGNORED or item.startswith(IGNORED_PREFIXES):
                continue
            if key in SECRET_VALUES:
                raise UsageError(
                    f"option {key}= would put a secret in fstab and in ps; use {key}_file=PATH or the config file"
                )
            if key in FLAG_VALUES:
                if not sep or not value:
                    raise UsageError(f"option {key} needs a value ({key}=...)")
                flags += [FLAG_VALUES[key], value]
            elif key in FLAG_SWITCHES:
                if sep:
                    raise UsageError(f"option {key} takes no value")
                flags.append(FLAG_SWITCHES[key])
            elif key in PASSED_WITH_O:
                passed.append(item)
            elif not inv.sloppy:
                raise UsageError(f"unknown option {key!r} (use -s to ignore unknown options)")
    if inv.verbose:
        flags += ["--log-level", "debug"]
    command = ["mount", inv.source, inv.mountpoint, *flags]
    if passed:
        command += ["-o", ",".join(passed)]
    return command


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        inv = parse_argv(args)
        command = mount_command(inv)
    except UsageError as exc:
        print(f"mount.directfs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    full = [sys.executable, "-m", "directfs.cli", *command]
    if inv.fake or inv.verbose:
        print(f"mount.directfs: {shlex.join(full)}", file=sys.stderr)
    if inv.fake:
        return 0
    # `directfs mount` (daemon mode) returns once the mount answers, or prints why it failed.
    done = subprocess.run(full, check=False)
    return 0 if done.returncode == 0 else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
