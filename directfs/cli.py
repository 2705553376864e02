"""``directfs`` command line: one module per subcommand under ``directfs.commands``.

Each command module exposes ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int`` (the exit
status). Modules are imported only when their command runs, so ``directfs get`` never imports the FUSE stack and
the client never imports the reference portal.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__
from .errors import DirectFSError

# name -> module under directfs.commands (kept in the order ``--help`` lists them)
COMMANDS: dict[str, str] = {
    "mount": "mount",
    "umount": "umount",
    "serve": "serve",
    "get": "get",
    "stats": "stats",
    "ls": "ls",
    "cp": "cp",
    "stage": "stage",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="directfs",
        description="Mount a CTERA global namespace (and other stores) as a fast read-mostly local file system.",
    )
    parser.add_argument("--version", action="version", version=f"directfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"directfs.commands.{module_name}")
        command_parser = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args._module.run(args)
    except DirectFSError as exc:
        print(f"directfs {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
