"""The stdlib-only client call of the command line: one request to the agent, starting one
first when none answers. On the hot path: imports nothing beyond errors, paths, protocol and
client until an agent has to be started."""

import os

from mpagent import client, paths
from mpagent.errors import AgentNotRunning

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def ask_agent(
    args: "Any", verb: str, fields: list[tuple[str, str]] | None = None, *, start: bool = True
) -> list[tuple[str, str]]:
    """One request to the agent, starting one first if none answers (unless told not to:
    `start`, --no-start or MPAGENT_NO_AUTOSTART=1)."""
    path = paths.socket_path()
    try:
        return client.call(path, verb, fields)
    except AgentNotRunning as exc:
        if exc.details.get("connected"):
            raise  # an agent is there but did not answer: starting another cannot help
        no_start = getattr(args, "no_start", False) or os.environ.get("MPAGENT_NO_AUTOSTART") == "1"
        if not start or no_start:
            raise
        first = exc
    from mpagent import autostart

    try:
        autostart.ensure_agent(path, args.config)
    except AgentNotRunning as refused:
        # Server mode's in-process fallback only when no agent listens at all: one that
        # closed the connection (draining, or a socket we may not use) is no reason to sign here.
        if refused.details.get("in_process") and not first.details.get("absent"):
            raise first from None
        raise
    return client.call(path, verb, fields)


def profile_name(args: "Any") -> str | None:
    """--profile, else MPAGENT_PROFILE; None leaves the choice to the configuration."""
    return args.profile or os.environ.get("MPAGENT_PROFILE") or None


def get_fields(args: "Any") -> list[tuple[str, str]]:
    """The fields of a `get` or `env` request: each scope, the profile, min_ttl, and the
    customer organisation (`--systemuser-org` / `--consumer-org`), checked here before any
    request: a mistyped digit never costs a token request."""
    fields = [("scope", scope) for scope in args.scopes]
    profile = profile_name(args)
    if profile:
        fields.append(("profile", profile))
    min_ttl = getattr(args, "min_ttl", None)
    if min_ttl is not None:
        fields.append(("min_ttl", repr(min_ttl)))
    for name in ("systemuser_org", "consumer_org"):
        value = getattr(args, name, None)
        if value is not None:
            from mpagent.altinn import check_org_number  # not on the hot path: only when used

            option = "--" + name.replace("_", "-")
            fields.append((name, check_org_number(value, option)))
    return fields
