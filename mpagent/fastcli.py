"""The command line's fast path: a cached `mpagent get` and `mpagent env`, answered by the
agent and parsed without argparse.

Both run inside `$(...)`, `get` often many times a minute, so this module and what it imports
(ask, console, errors, paths, protocol, client) are stdlib-only and avoid even `typing`,
`json`, `socket` and `argparse`, which each cost more than all the rest. Anything else, every
mistake and `--help` included, goes to `fullcli`.
"""

import sys

from mpagent.ask import ask_agent, get_fields
from mpagent.console import fail, printable, say
from mpagent.errors import AgentNotRunning, MpagentError, ProtocolError, SecretUnavailable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# What a value may hold and still be exported unquoted: RFC 6750's b64token characters (all
# a bearer token may hold, and all the agent accepts from an issuer) and digits.
SHELL_SAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~+/=-"


class FastArgs:
    """The attributes the fast commands read, filled without argparse."""

    config: "str | None" = None
    profile: "str | None" = None
    min_ttl: "float | None" = None
    systemuser_org: "str | None" = None
    consumer_org: "str | None" = None
    json = no_start = False

    def __init__(self, func: "Callable[[Any], int]") -> None:
        self.scopes: list[str] = []
        self.func = func


def parse(argv: list[str]) -> FastArgs | None:
    """`[--config F] [--profile P] get SCOPE... [--min-ttl S] [--json] [--no-start]
    [--systemuser-org ORGNO | --consumer-org ORGNO]` or `[--config F] [--profile P] env`, or
    None to let argparse handle anything else (including every mistake and --help). As in
    argparse, --config and --profile (-p) go before or after the command, as `--config F` or
    `--config=F`."""
    command = config = profile = min_ttl = None
    orgs: dict[str, str] = {}
    flags: list[str] = []
    scopes: list[str] = []
    rest = list(argv)
    while rest:
        word = rest.pop(0)
        name, eq, value = word.partition("=") if word[:2] == "--" else (word, "", "")
        if name in ("--config", "--profile", "-p", *VALUE_OPTIONS) and not eq:
            if not rest or rest[0][:1] == "-":
                return None  # argparse says what is missing
            value = rest.pop(0)
        if name == "--config":
            config = value
        elif name in ("--profile", "-p"):
            profile = value
        elif command is None:
            if word not in COMMANDS:
                return None
            command = word
        elif command != "get":
            return None
        elif name == "--min-ttl":
            min_ttl = value
        elif name in ORG_OPTIONS:
            orgs[ORG_OPTIONS[name]] = value
        elif word in ("--json", "--no-start"):
            flags.append(word)
        elif word[:1] == "-":
            return None
        else:
            scopes.append(word)
    if command is None or (command == "get" and not scopes) or len(orgs) > 1:
        return None  # argparse says what is missing, or that the two options exclude each other
    args = FastArgs(COMMANDS[command])
    args.config, args.profile, args.scopes = config, profile, scopes
    args.json, args.no_start = "--json" in flags, "--no-start" in flags
    args.systemuser_org = orgs.get("systemuser_org")
    args.consumer_org = orgs.get("consumer_org")
    if min_ttl is not None:
        try:
            args.min_ttl = float(min_ttl)
        except ValueError:
            return None
    return args


# Per customer organisation (Altinn 3): the wire fields of these names.
ORG_OPTIONS = {"--systemuser-org": "systemuser_org", "--consumer-org": "consumer_org"}
VALUE_OPTIONS = ("--min-ttl", *ORG_OPTIONS)


def run(args: "Any", in_process: "Callable[[Any], int | None] | None" = None) -> int:
    """The command's exit status; an MpagentError is its one line on stderr. `in_process`
    (fullcli.in_process): what runs the command when autostart says no agent may be started
    for it (server mode) and it can do without one; None: it cannot."""
    try:
        try:
            return int(args.func(args))
        except AgentNotRunning as exc:
            if not exc.details.get("in_process"):
                raise
            # Server mode and no agent answered (autostart.py): not the hot path any more.
            status = None if in_process is None else in_process(args)
            if status is None:
                raise
            return status
    except MpagentError as exc:
        return fail(exc)
    except KeyboardInterrupt:
        return 130


def cmd_get(args: "Any") -> int:
    reply = get_token(args)
    write_token(
        reply["token"],
        reply.get("token_type", "Bearer"),
        reply.get("scope", ""),
        float(reply["expires_at"]),
        args.json,
    )
    return 0


def cmd_env(args: "Any") -> int:
    """`export NAME=VALUE` lines for `eval "$(mpagent env)"`: every value that holds more than
    a token's characters is quoted, so a hostile issuer's token stays a value."""
    lines = [f"export {name}={shell_quote(value)}\n" for name, value in ask_env(args)]
    sys.stdout.write("".join(lines))
    return 0


def get_token(args: "Any") -> dict[str, str]:
    """The agent's answer to `get`, after saying the warnings it carries on stderr."""
    return dict(ask_told(args, "get", get_fields(args)))


def ask_env(args: "Any") -> list[tuple[str, str]]:
    """(NAME, VALUE) for each token of `args.scopes`, or of every scope the profile lists,
    and each NAME_EXPIRES_AT, in the agent's order: its answer to `env`. The client reads no
    configuration: the agent knows the profiles and their variable names."""
    variables: list[tuple[str, str]] = []
    name: str | None = None
    for key, value in ask_told(args, "env", get_fields(args)):
        if key == "name" and name is None:
            if not (value.isascii() and value.isidentifier()):
                raise _other_version(f"names the variable {value!r}")
            name = value
        elif key == "value" and name is not None:
            variables.append((name, value))
            name = None
        elif key in ("name", "value"):
            raise _other_version("does not pair each name with a value")
    if name is not None:
        raise _other_version("does not pair each name with a value")
    return variables


def _other_version(problem: str) -> ProtocolError:
    return ProtocolError(
        f"the agent's answer to env {problem}; is it another mpagent version? Restart it "
        "with `mpagent stop`"
    )


def ask_told(args: "Any", verb: str, fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The agent's answer, after saying the warnings it carries on stderr. A locked profile,
    at a terminal, is offered an unlock there and then."""
    try:
        reply = ask_agent(args, verb, fields)
    except SecretUnavailable as exc:
        if not offer_unlock(args, exc):
            raise
        reply = ask_agent(args, verb, fields)
    for key, value in reply:
        if key == "warning":
            say("warning: " + value)
    return reply


def offer_unlock(args: "Any", exc: SecretUnavailable) -> bool:
    """A locked profile at a terminal: unlock it now if the user says yes (the default)."""
    if not (exc.details.get("locked") and sys.stdin.isatty() and sys.stderr.isatty()):
        return False
    name = str(exc.details.get("profile") or "")
    sys.stderr.write(f"mpagent: profile {printable(name)} is locked. Unlock it now? [Y/n] ")
    sys.stderr.flush()
    answer = sys.stdin.readline()  # "" is end of input (Ctrl-D): no; "\n" is the default
    if not answer or answer.strip().lower() not in ("", "y", "yes"):
        return False
    from mpagent import unlock

    unlock.unlock_now(args.config, name, say)
    return True


def shell_quote(value: str) -> str:
    """`value` as one word of POSIX shell: as it is when it holds only SHELL_SAFE characters
    and starts with neither `~` (tilde expansion) nor `=` (zsh's equals expansion); else in
    single quotes, each `'` as `'\\''`."""
    if not value.strip(SHELL_SAFE) and value[:1] not in ("~", "="):
        return value
    return "'" + value.replace("'", "'\\''") + "'"


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


COMMANDS = {"get": cmd_get, "env": cmd_env}
