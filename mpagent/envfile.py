"""The env file editors and tools read: its names and content, pure. The agent writes it
with `private.write_atomic` (0600, never half-written).

`KEY=value` lines without quotes or `export`, which `set -a; . FILE`, docker --env-file,
systemd EnvironmentFile=, python-dotenv and httpyac all read the same way. Tokens are
RFC 6750 b64token characters (checked by the agent before they get here), so no quoting.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

PREFIX = "MASKINPORTEN_TOKEN_"
# Never an empty file: readers that treat empty as broken see this line at least.
HEADER = "# Maskinporten access tokens kept fresh by mpagent; rewritten on every refresh"


def name_part(text: str) -> str:
    """`my-test` → MY_TEST: upper-cased, each run of other characters turned into `_`."""
    return re.sub(r"[^A-Z0-9]+", "_", text.upper()).strip("_")


def variable_names(
    profile: str, scope: str, overrides: Mapping[str, str], *, short: bool
) -> tuple[str, ...]:
    """The env-file names of one token: env_names' name if it has one, else
    MASKINPORTEN_TOKEN_<PROFILE>_<SCOPES>, and for the default profile (`short`) also
    MASKINPORTEN_TOKEN_<SCOPES>, so a single-profile setup keeps its short names."""
    if scope in overrides:
        return (overrides[scope],)
    full = f"{PREFIX}{name_part(profile)}_{name_part(scope)}"
    return (full, PREFIX + name_part(scope)) if short else (full,)


def variables(
    profile: str,
    overrides: Mapping[str, str],
    tokens: Iterable[tuple[str, str, float]],
    *,
    short: bool,
) -> dict[str, str]:
    """(scope set, token, expires_at) of a profile's tokens → NAME and NAME_EXPIRES_AT
    (integer epoch seconds) under the env file's names: the answer of `mpagent env`/`exec`.
    A name two scope sets share holds the later one's, as in a shell."""
    out: dict[str, str] = {}
    for scope, token, expires_at in tokens:
        for name in variable_names(profile, scope, overrides, short=short):
            out[name] = token
            out[name + "_EXPIRES_AT"] = str(int(expires_at))
    return out


def render(tokens: Iterable[tuple[str, str, float]]) -> str:
    """(name, token, expires_at) → file content, sorted by name so rewrites are stable."""
    lines = [HEADER]
    for name, token, expires_at in sorted(tokens):
        lines.append(f"{name}={token}")
        lines.append(f"{name}_EXPIRES_AT={int(expires_at)}")
    return "".join(line + "\n" for line in lines)


def unexpired(content: str, now: float) -> str:
    """An env file without the tokens that have expired by `now` (each NAME goes with its
    NAME_EXPIRES_AT); lines it does not know are kept."""
    lines = content.splitlines()
    values = dict(line.split("=", 1) for line in lines if "=" in line and line[:1] != "#")
    expired = {
        name.removesuffix("_EXPIRES_AT")
        for name, value in values.items()
        if name.endswith("_EXPIRES_AT")
        and (not (value.isascii() and value.isdigit()) or int(value) <= now)
    }
    kept = [
        line for line in lines if line.split("=", 1)[0].removesuffix("_EXPIRES_AT") not in expired
    ]
    return "".join(line + "\n" for line in kept)
