"""The env file editors and tools read: pure rendering plus an atomic, private write.

`KEY=value` lines without quotes or `export`, which `set -a; . FILE`, docker --env-file,
systemd EnvironmentFile=, python-dotenv and httpyac all read the same way. Tokens are
RFC 6750 b64token characters (checked by the agent before they get here), so no quoting.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

PREFIX = "MASKINPORTEN_TOKEN_"
TEMP_SUFFIX = ".tmp"
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
        if name.endswith("_EXPIRES_AT") and (not value.isdigit() or int(value) <= now)
    }
    kept = [
        line for line in lines if line.split("=", 1)[0].removesuffix("_EXPIRES_AT") not in expired
    ]
    return "".join(line + "\n" for line in kept)


def write_atomic(path: Path, content: str) -> None:
    """Readers see the old file or the new one, never a partial one; mode 0600 from the
    moment the temp file exists, whatever the umask or the old file's mode."""
    # mkstemp: a random name (a killed writer's leftover cannot block us, even with our
    # pid), O_EXCL, O_NOFOLLOW, created 0600 (less only under a umask that strips the owner).
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    tmp = Path(name)
    try:
        if hasattr(os, "fchmod"):  # the umask cannot take the owner's rights away either
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            fd = -1
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd != -1:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_leftovers(path: Path) -> None:
    """Temp files of a writer that was killed mid-write: they hold tokens, so remove them.
    Only for a single writer (the agent, under its lock)."""
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*{TEMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
