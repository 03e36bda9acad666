"""The console-script entry, `mpagent.cli:main`: a cached `get` and `env` take the fast path
(`fastcli`, stdlib only); every other command is parsed and run by `fullcli`, imported only
then. Only cli, fastcli, console and fullcli print or choose an exit status."""

import sys

from mpagent import fastcli

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = fastcli.parse(argv)
    if args is not None:
        return fastcli.run(args, in_process=_in_process)
    from mpagent import fullcli

    return fullcli.run(argv)


def _in_process(args: "Any") -> "int | None":
    """Server mode with no agent: get/env here, as with --no-agent (fullcli.in_process)."""
    from mpagent import fullcli

    return fullcli.in_process(args)
