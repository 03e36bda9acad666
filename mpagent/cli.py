"""The console-script entry, `mpagent.cli:main`: a cached `get` and `env` take the fast path
(`fastcli`, stdlib only); every other command is parsed and run by `fullcli`, imported only
then. Only cli, fastcli, console and fullcli print or choose an exit status."""

import sys

from mpagent import fastcli


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = fastcli.parse(argv)
    if args is not None:
        return fastcli.run(args)
    from mpagent import fullcli

    return fullcli.run(argv)
