"""``mount.directfs``: the mount(8) helper, so ``/etc/fstab`` lines and ``mount -t directfs`` work.

mount(8) runs ``/sbin/mount.directfs SOURCE MOUNTPOINT [-sfnv] [-N NS] [-o OPTIONS]`` (mount(8), "External
helpers"). SOURCE is a ``[source.NAME]`` of the config file or a URL. An fstab line::

    projects  /mnt/projects  directfs  _netdev,nofail,config=/etc/directfs/directfs.toml,allow_other  0 0

Options are parsed by ``directfs.options.parse_o``, the same parser as ``directfs mount -o`` (README "fstab" lists
what follows from the option table):

- ignored (they are for mount(8), systemd or the admin): ``_netdev``, ``nofail``, ``noauto``, ``auto``, ``user``,
  ``users``, ``nouser``, ``owner``, ``group``, ``defaults``, ``ro``, ``rw`` (the mount is always read-only),
  ``x-*`` (``x-systemd.*``, ``x-mount.*``), ``comment=*``, and the kernel flags mount(8) may pass along
  (``nosuid``, ``nodev``, ``noexec``, ``exec``, ``suid``, ``dev``, ``noatime``, ``relatime``, ``async``).
- mapped to flags of ``directfs mount`` (the options the table marks ``o_as_flag``): ``config=``, ``log_file=``,
  ``log_level=``, ``metrics_address=``, ``metrics_allow_remote``, credentials other than secret values
  (``access_key_id_file=``, ``username=``, ``secret_access_key_file=``, ...), TLS and timeouts (``ca_file=``,
  ``no_verify_tls``, ``connect_timeout=``, ...).
- passed on with ``-o``: the mount options proper (``allow_other``, ``uid=``, ``cache_size=``, ...) and the store
  options (``endpoint_url=``, ``block_size=``, ``staging_deadline=``).
- refused: secret *values* (``access_key_id=``, ``password=``, ``secret_access_key=``, ``token=``): fstab is
  world-readable and the value would sit in every ``ps`` listing. Any other option is an error naming it, unless
  ``-s`` (sloppy) is given.

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

from ..errors import ConfigError
from ..options import parse_o

EXIT_USAGE: Final = 1  # mount(8): incorrect invocation or permissions
EXIT_FAILURE: Final = 32  # mount(8): mount failure


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
    try:
        items = parse_o(inv.options, fstab=True, sloppy=inv.sloppy)
    except ConfigError as exc:
        raise UsageError(exc.strerror) from None
    flags: list[str] = []
    passed: list[str] = []
    for item in items:
        if item.option.o_as_flag:
            flags += item.option.argv(item.value)
        else:
            passed.append(item.text)
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
