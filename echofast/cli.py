"""The ``echofast`` command. Subcommands are thin: they parse arguments and call the library."""

from __future__ import annotations

import sys
from collections.abc import Callable

Command = Callable[[list[str]], int]


def _info(argv: list[str]) -> int:
    from .info import main

    return main(argv)


COMMANDS: dict[str, tuple[Command, str]] = {
    "info": (_info, "versions, the compiled extension, and which backend each op uses"),
}


def _usage() -> str:
    rows = "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
    return f"usage: echofast <command> [options]\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"echofast: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return COMMANDS[name][0](rest)


if __name__ == "__main__":
    raise SystemExit(main())
