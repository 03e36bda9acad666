"""The command line's hot half: `main`, and `mpagent get` through the agent.

`mpagent get` runs inside `$(...)`, often many times a minute, so this module and what it
imports (errors, paths, protocol, client) are stdlib-only and avoid even `typing`, `json`,
`socket` and `argparse`, which each cost more than all the rest. Every other command is
parsed and run by `commands`, imported only when needed. These two modules are the only
ones that print or choose an exit status.
"""

import os
import sys

from mpagent.errors import AgentNotRunning, MpagentError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args: Any = parse_fast_get(argv)
    if args is None:
        from mpagent import commands

        args = commands.build_parser().parse_args(argv)
        if not hasattr(args, "func"):
            commands.build_parser().print_help(sys.stderr)
            return 2
    try:
        return int(args.func(args))
    except MpagentError as exc:
        fail(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


class FastGetArgs:
    """The attributes cmd_get reads, filled without argparse."""

    config: "str | None" = None
    profile: "str | None" = None
    min_ttl: "float | None" = None
    json = no_start = no_agent = False

    def __init__(self) -> None:
        self.scopes: list[str] = []
        self.func = cmd_get


def parse_fast_get(argv: list[str]) -> FastGetArgs | None:
    """`get SCOPE... [--profile P] [--min-ttl S] [--json] [--no-start]`, or None to let
    argparse handle anything else (including every mistake and --help)."""
    if argv[:1] != ["get"]:
        return None
    args = FastGetArgs()
    rest = argv[1:]
    while rest:
        word = rest.pop(0)
        name, eq, value = word.partition("=")
        if name in ("--profile", "-p", "--min-ttl") and not eq:
            if not rest:
                return None
            value = rest.pop(0)
        if name in ("--profile", "-p"):
            args.profile = value
        elif name == "--min-ttl":
            try:
                args.min_ttl = float(value)
            except ValueError:
                return None
        elif word in ("--json", "--no-start"):
            setattr(args, word[2:].replace("-", "_"), True)
        elif word.startswith("-"):
            return None
        else:
            args.scopes.append(word)
    return args if args.scopes else None


def fail(exc: MpagentError) -> None:
    print(f"mpagent: {exc}", file=sys.stderr)


def cmd_get(args: "Any") -> int:
    if args.no_agent:
        from mpagent import commands

        return commands.get_without_agent(args)
    reply = dict(ask_agent(args, "get", get_fields(args)))
    write_token(
        reply["token"],
        reply.get("token_type", "Bearer"),
        reply.get("scope", ""),
        float(reply["expires_at"]),
        args.json,
    )
    return 0


def get_fields(args: "Any") -> list[tuple[str, str]]:
    fields = [("scope", scope) for scope in args.scopes]
    profile = profile_name(args)
    if profile:
        fields.append(("profile", profile))
    if args.min_ttl is not None:
        fields.append(("min_ttl", repr(args.min_ttl)))
    return fields


def profile_name(args: "Any") -> str | None:
    return args.profile or os.environ.get("MPAGENT_PROFILE") or None


def ask_agent(
    args: "Any", verb: str, fields: list[tuple[str, str]] | None = None, *, start: bool = True
) -> list[tuple[str, str]]:
    """One request to the agent, starting one first if none answers (unless told not to)."""
    from mpagent import client, paths

    path = paths.socket_path()
    try:
        return client.call(path, verb, fields)
    except AgentNotRunning as exc:
        if exc.details.get("connected"):
            raise  # an agent is there but did not answer: starting another cannot help
        no_start = getattr(args, "no_start", False) or os.environ.get("MPAGENT_NO_AUTOSTART") == "1"
        if not start or no_start:
            raise
    from mpagent import autostart

    autostart.ensure_agent(path, args.config)
    return client.call(path, verb, fields)


def write_token(
    access_token: str, token_type: str, scope: str, expires_at: float, as_json: bool
) -> None:
    """stdout is exactly the token and a newline (or the JSON document), nothing else."""
    if not as_json:
        sys.stdout.write(access_token + "\n")
        return
    import json
    import time

    document = {
        "access_token": access_token,
        "token_type": token_type,
        "expires_in": max(0, int(expires_at - time.time())),
        "expires_at": int(expires_at),
        "scope": scope,
    }
    # ensure_ascii=False and no escaping of '=': the token is printed exactly as issued.
    sys.stdout.write(json.dumps(document, ensure_ascii=False) + "\n")
