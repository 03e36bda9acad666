"""Changing a few keys of one profile in config.toml as a person would: in place, keeping
every comment, blank line and the order of everything else. Only a plain `[profiles.NAME]`
table is edited; anything cleverer (an inline table, dotted keys) gets a ConfigError that
says which lines to write by hand. The file is re-read after the edit and must differ in
exactly those keys before it is written (atomically, keeping its mode)."""

from __future__ import annotations

import json
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mpagent.errors import ConfigError
from mpagent.private import read_regular, write_atomic

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_BOM = "\ufeff"


def toml_string(value: str) -> str:
    """A TOML basic string. JSON's escapes are TOML's, but for DEL, which TOML wants escaped."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def lines_for(values: Mapping[str, str | None]) -> str:
    """The lines a person would write (or remove) to make the same change."""
    shown = [f"{k} = {toml_string(v)}" for k, v in values.items() if v is not None]
    gone = [k for k, v in values.items() if v is None]
    return "; ".join(shown) + (f"; and remove {', '.join(gone)}" if gone else "")


def set_profile_keys(text: str, profile: str, values: Mapping[str, str | None]) -> str:
    """`text` with each key of `values` set in [profiles.`profile`] (a string value replaces
    the key's value where it stands, or is added after the table's last key; None removes the
    key). Everything else is kept as it is, byte for byte."""
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if "\r\n" in text else "\n"
    start = _header(lines, ["profiles", profile])
    if start is None:
        raise ConfigError(
            f"[profiles.{profile}] is not a plain table of its own in the configuration (an "
            f"inline table, dotted keys, or missing), so mpagent does not edit it; write these "
            f"lines in the profile by hand: {lines_for(values)}"
        )
    end = next((i for i in range(start + 1, len(lines)) if _is_header(lines[i])), len(lines))
    todo = dict(values)
    out = lines[: start + 1]
    i = start + 1
    while i < end:
        key, stop = _key_value(lines, i, end)
        if key in todo:
            value = todo.pop(key)
            if value is not None:
                indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
                comment = _comment(lines[i]) if stop == i + 1 else ""
                out.append(
                    f"{indent}{key} = {toml_string(value)}{comment}{_ending(lines[stop - 1])}"
                )
        else:
            out += lines[i:stop]
        i = stop
    added = [f"{k} = {toml_string(v)}{newline}" for k, v in todo.items() if v is not None]
    if added:
        last = max(
            (j for j in range(len(out)) if j > start and not _blank_or_comment(out[j])),
            default=start,
        )
        if not out[last].endswith("\n"):
            out[last] += newline
        out[last + 1 : last + 1] = added
    return "".join(out + lines[end:])


def update_profile(path: Path, profile: str, values: Mapping[str, str | None]) -> None:
    """Edit config.toml at `path` (a symlink's target, so a dotfile manager's link stays) and
    write it atomically with the mode it had."""
    target = path.resolve()
    try:
        raw = read_regular(target).decode("utf-8")
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{target}: cannot read the configuration to edit it: {exc}") from exc
    bom = _BOM if raw.startswith(_BOM) else ""
    old = raw.removeprefix(_BOM)
    try:
        new = set_profile_keys(old, profile, values)
    except ConfigError as exc:
        raise ConfigError(f"{target}: {exc}") from None
    _check_only(old, new, profile, values, target)
    try:
        write_atomic(target, bom + new, mode)
    except OSError as exc:
        raise ConfigError(
            f"{target}: cannot write the configuration ({exc.strerror or exc}); write these "
            f"lines in [profiles.{profile}] by hand: {lines_for(values)}"
        ) from exc


def _check_only(
    old: str, new: str, profile: str, values: Mapping[str, str | None], target: Path
) -> None:
    """The edited file must parse, and differ from the old one in those keys alone."""
    try:
        before, after = tomllib.loads(old), tomllib.loads(new)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{target}: not valid TOML, so not edited: {exc}") from exc
    expected = dict(before)
    table = dict(expected.get("profiles", {}).get(profile, {}))
    for key, value in values.items():
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    expected["profiles"] = {**expected.get("profiles", {}), profile: table}
    if after != expected:
        raise ConfigError(
            f"{target}: mpagent could not edit [profiles.{profile}] safely, so the file is "
            f"unchanged; write these lines in it by hand: {lines_for(values)}"
        )


# -- reading just enough TOML --------------------------------------------------------------


def _is_header(line: str) -> bool:
    return line.lstrip().startswith("[")


def _blank_or_comment(line: str) -> bool:
    stripped = line.strip()
    return not stripped or stripped.startswith("#")


def _comment(line: str) -> str:
    """The comment at the end of a one-line `key = value` (with the spaces before it), or "":
    the first `#` before which the line is valid TOML on its own (a `#` may sit in a string)."""
    body = line.rstrip("\r\n")
    for at in (i for i, c in enumerate(body) if c == "#"):
        try:
            tomllib.loads(body[:at])
        except tomllib.TOMLDecodeError:
            continue
        head = body[:at].rstrip()
        return body[len(head) :]
    return ""


def _ending(line: str) -> str:
    return line[len(line.rstrip("\r\n")) :] or ""


def _header(lines: list[str], want: list[str]) -> int | None:
    """The index of the `[a.b]` header line naming the table `want` (not `[[...]]`)."""
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped.startswith("[") or stripped.startswith("[["):
            continue
        parts, rest = _dotted_key(stripped[1:])
        if parts == want and rest.lstrip().startswith("]"):
            after = rest.lstrip()[1:].strip()
            if not after or after.startswith("#"):
                return i
    return None


def _key_value(lines: list[str], i: int, end: int) -> tuple[str | None, int]:
    """(the key of the key/value pair starting at line i, or None for a blank line, a comment,
    a dotted key; the index after its last line). A value may span lines (an array, a
    multi-line string): it ends where the lines so far parse as TOML."""
    if _blank_or_comment(lines[i]):
        return None, i + 1
    parts, rest = _dotted_key(lines[i].lstrip())
    for stop in range(i + 1, end + 1):
        try:
            tomllib.loads("".join(lines[i:stop]))
        except tomllib.TOMLDecodeError:
            continue
        return (parts[0] if len(parts) == 1 and rest.lstrip().startswith("=") else None), stop
    return None, i + 1  # not valid TOML here: leave the line alone (the re-check refuses)


def _dotted_key(text: str) -> tuple[list[str], str]:
    """The parts of a TOML (dotted) key at the start of `text`, and the text after it."""
    parts: list[str] = []
    rest = text
    while True:
        rest = rest.lstrip(" \t")
        part, rest = _simple_key(rest)
        if part is None:
            return [], text
        parts.append(part)
        rest = rest.lstrip(" \t")
        if not rest.startswith("."):
            return parts, rest
        rest = rest[1:]


def _simple_key(text: str) -> tuple[str | None, str]:
    if text[:1] in ('"', "'"):
        quote = text[0]
        j = 1
        while j < len(text) and text[j] != quote:
            j += 2 if quote == '"' and text[j] == "\\" else 1
        try:
            value: Any = tomllib.loads(f"k = {text[: j + 1]}")["k"]
        except tomllib.TOMLDecodeError:
            return None, text
        return str(value), text[j + 1 :]
    match = _BARE.match(text)
    return (match.group(), text[match.end() :]) if match else (None, text)
