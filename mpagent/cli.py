"""The command line's hot half: `main`, and `mpagent get` through the agent.

`mpagent get` runs inside `$(...)`, often many times a minute, so this module and what it
imports (errors, paths, protocol, client) are stdlib-only and avoid even `typing`, `json`,
`socket` and `argparse`, which each cost more than all the rest. Every other command is
parsed and run by `commands`, imported only when needed. These two modules are the only
ones that print or choose an exit status.
"""

import os
import sys

from mpagent.errors import AgentNotRunning, MpagentError, SecretUnavailable

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
        commands.log_to_stderr(args)
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
    """`[--config F] [--profile P] get SCOPE... [--config F] [--profile P] [--min-ttl S]
    [--json] [--no-start]`, or None to let argparse handle anything else (including every
    mistake and --help). As in argparse, --config and --profile go before or after `get`."""
    args = FastGetArgs()
    rest = list(argv)
    command = False
    while rest:
        word = rest.pop(0)
        name, eq, value = word.partition("=")
        if name in ("--config", "--profile", "-p", "--min-ttl") and not eq:
            if not rest:
                return None
            value = rest.pop(0)
        if name == "--config":
            args.config = value
        elif name in ("--profile", "-p"):
            args.profile = value
        elif not command:
            if word != "get":
                return None
            command = True
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
    say(str(exc))


def say(text: str) -> None:
    """One `mpagent: ` line on stderr. Text from outside (an issuer's error_description, a
    scope as typed) may hold control characters: shown escaped, they cannot drive the
    terminal or break the one-line contract."""
    print("mpagent: " + printable(text), file=sys.stderr)


def printable(text: str) -> str:
    """C0 and C1 control characters and DEL as `\\xNN`; everything else as it is."""
    if text.isprintable():
        return text
    return "".join(
        f"\\x{ord(c):02x}" if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F else c for c in text
    )


def cmd_get(args: "Any") -> int:
    if args.no_agent:
        from mpagent import commands

        return commands.get_without_agent(args)
    reply = get_token(args)
    write_token(
        reply["token"],
        reply.get("token_type", "Bearer"),
        reply.get("scope", ""),
        float(reply["expires_at"]),
        args.json,
    )
    return 0


def get_token(args: "Any") -> dict[str, str]:
    """The agent's answer to `get`, after printing the warnings it carries to stderr. A
    locked profile, at a terminal, is offered an unlock there and then."""
    try:
        fields = ask_agent(args, "get", get_fields(args))
    except SecretUnavailable as exc:
        if not (exc.details.get("locked") and sys.stdin.isatty() and sys.stderr.isatty()):
            raise
        from mpagent import unlock

        if not unlock.offer(args, exc):
            raise
        fields = ask_agent(args, "get", get_fields(args))
    for key, value in fields:
        if key == "warning":
            say("warning: " + value)
    return dict(fields)


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
