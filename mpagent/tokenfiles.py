"""Token files: every kept token as `<dir>/<profile>/<name>.jwt` (the raw token, no newline:
AWS SDK `web_identity_token_file`, OpenTelemetry `bearertokenauth` `filename`, Prometheus
`credentials_file`) and `<name>.json` (Maskinporten's response with `expires_at`: gcloud's
`credential_source.file` with `subject_token_field_name = "access_token"`), each written
atomically through `private.write_atomic`, so a reader sees the old token or the new one,
never part of one. A token's files are removed once it has expired.

File names. The profile name and the scope set are each turned into one file-name part,
URL percent-encoding with three readable shorthands:

    `:` -> `_`    `/` -> `+`    ` ` (between the sorted scopes of a set) -> `,`

    digdir:krr                            default/digdir_krr.jwt
    altinn:serviceowner/instances.read    default/altinn_serviceowner+instances.read.jwt
    nav:aareg/v1/arbeidsforhold           default/nav_aareg+v1+arbeidsforhold.jwt
    skatteetaten:mva digdir:krr           default/digdir_krr,skatteetaten_mva.jwt
    nav:im_unntak (profile `Prod`)        %50rod/nav_im%5Funntak.jwt

The scope set is canonical first (`tokens.scope_string`: split, de-duplicated, sorted), so the
same set in any order has one name. Lower-case letters, digits, `-` and `.` stay as they are;
every other byte of the UTF-8 text is `%XX` (upper-case hex): upper-case letters (names must
not collide on the case-insensitive file systems of macOS and Windows), `_`, `+`, `,`, `%`, a
leading `-` (it would read as an option) and a leading or trailing `.` (hidden files, `..`,
Windows dropping trailing dots), and the first letter of a Windows device name (`con`, `nul`,
`com1`, ...). So a name is printable ASCII and safe on every OS, and `decode_part` gives the text
back: different profiles or scope sets never share a file. A part longer than 200 characters
(a file name has at most 255 bytes, and the temporary file's name is longer) is cut at 160 and
ends in `%%` and 32 hex digits of the text's SHA-256; `%%` never occurs otherwise, and the
`.json`'s `scope` says which set it is.

Who can read them: file_mode 0600 (the default) keeps them to the agent's user, in profile
directories 0700. 0640 shares them with a group (a sidecar's app reading a shared volume):
profile directories 0750, owned by `group` (set-group-ID, so new files inherit it) or, without
`group`, by whatever group the directory inherits (Kubernetes' fsGroup on an emptyDir). Nothing
is ever readable by others. The profile directories are the agent's: one agent per `dir`. The
`dir` itself may be a volume the agent does not own (an emptyDir); if missing it is created
like the profile directories.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
import threading
from pathlib import Path
from typing import Any

from mpagent.errors import ConfigError
from mpagent.private import ensure_private_dir, read_regular, remove_leftovers, write_atomic
from mpagent.tokens import Token, scope_string

JWT = ".jwt"
JSON = ".json"
SHORTHANDS = {":": "_", "/": "+", " ": ","}
LITERAL = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")
MAX_PART = 200
CUT_AT = 160
LONG_MARK = "%%"
# CON, PRN, AUX, NUL, COM0-9, LPT0-9: Windows opens the device, whatever the extension.
WINDOWS_DEVICE = re.compile(r"(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?")
LONG_PART = re.compile(r"[^%]*(?:%[0-9A-F]{2}[^%]*)*%%[0-9a-f]{32}")
SHARED_DIR_MODE = 0o750


def encode_part(text: str) -> str:
    """One file-name part for a profile name or a canonical scope string (the module
    docstring's mapping)."""
    if not text:
        raise ConfigError("an empty profile name or scope set cannot name a token file")
    out = []
    for i, char in enumerate(text):
        edge = i == 0 or i == len(text) - 1
        if char in SHORTHANDS:
            out.append(SHORTHANDS[char])
        elif char in LITERAL and not (char == "." and edge) and not (char == "-" and i == 0):
            out.append(char)
        else:
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8"))
    if WINDOWS_DEVICE.fullmatch("".join(out)):
        out[0] = f"%{ord(out[0]):02X}"
    name = "".join(out)
    if len(name) <= MAX_PART:
        return name
    cut = name[:CUT_AT]
    cut = cut[: cut.rfind("%")] if "%" in cut[-2:] else cut  # never half an escape
    return f"{cut}{LONG_MARK}{hashlib.sha256(text.encode('utf-8')).hexdigest()[:32]}"


def decode_part(name: str) -> str | None:
    """The text `encode_part` made `name` from; None for a name it never makes (a cut long
    part included: its `.json` says the scope set)."""
    reverse = {v: k for k, v in SHORTHANDS.items()}
    data = bytearray()
    i = 0
    while i < len(name):
        char = name[i]
        if char == "%" and re.fullmatch(r"[0-9A-F]{2}", name[i + 1 : i + 3]):
            data.append(int(name[i + 1 : i + 3], 16))
            i += 3
            continue
        if char in reverse:
            data.extend(reverse[char].encode())
        elif char in LITERAL:
            data.append(ord(char))
        else:
            return None
        i += 1
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text and encode_part(text) == name else None


def file_stem(profile: str, scope_set: str) -> str:
    """`<profile>/<scope set>`, the token's files' path under `dir` without the extension:
    both parts as `encode_part` makes them, the scope set canonical first."""
    return f"{encode_part(profile)}/{encode_part(scope_string([scope_set]))}"


def json_document(token: Token) -> dict[str, Any]:
    """The `.json` file: Maskinporten's token response (`expires_in` as it was issued) and
    `expires_at`, whole seconds since the epoch (rounded down: never later than the truth)."""
    return {
        "access_token": token.access_token,
        "token_type": token.token_type,
        "expires_in": round(token.lifetime),
        "scope": token.scope,
        "expires_at": int(token.expires_at),
    }


class TokenFiles:
    """Writes and removes the token files under `directory`. Thread-safe; one per directory."""

    def __init__(
        self, directory: Path, file_mode: int = 0o600, group: str | int | None = None
    ) -> None:
        if file_mode & ~0o640 or not file_mode & 0o400:
            raise ConfigError(
                f"[files] file_mode = 0{file_mode:o} would let others read the tokens, or not "
                "even you; write file_mode = 0600, or 0640 with a group to share them"
            )
        if group is not None and not file_mode & 0o040:
            raise ConfigError(
                f"[files] group = {group!r} needs file_mode = 0640 to let the group read the files"
            )
        if sys.platform == "win32" and (group is not None or file_mode & 0o040):
            raise ConfigError("[files] group and file_mode = 0640 are for Unix; remove them")
        self.directory = directory
        self.file_mode = file_mode
        self.gid = None if group is None else _gid(group)
        self.group = group
        self._lock = threading.Lock()

    def paths(self, profile: str, scope_set: str) -> tuple[Path, Path]:
        """The `.jwt` and `.json` file of a profile's scope set."""
        stem = self.directory / file_stem(profile, scope_set)
        return stem.with_name(stem.name + JWT), stem.with_name(stem.name + JSON)

    def write(self, profile: str, scope_set: str, token: Token) -> tuple[Path, Path]:
        """Write (or replace) the files of the scope set asked for (not the token's `scope`,
        which the issuer may answer reordered, narrowed or empty); the `.jwt` first, so a
        writer killed between the two leaves a `.json` saying the old, earlier expiry and the
        pair goes too soon rather than too late."""
        jwt, doc = self.paths(profile, scope_set)
        with self._lock:
            self._ensure_dir(jwt.parent)
            for path, data in [
                (jwt, token.access_token),
                (doc, json.dumps(json_document(token), indent=2) + "\n"),
            ]:
                remove_leftovers(path)
                write_atomic(path, data, self.file_mode)
        return jwt, doc

    def remove(self, profile: str, scope_set: str) -> None:
        """Remove a scope set's files (gone already is fine)."""
        with self._lock:
            for path in self.paths(profile, scope_set):
                path.unlink(missing_ok=True)

    def remove_expired(self, now: float) -> list[Path]:
        """Remove the files of every token that has expired by `now`, found on disk, so the
        files of an earlier run go too; returns what it removed. A `.jwt` whose `.json` is
        missing or not one of ours goes as well: nothing vouches for it. Files and directories
        whose names `encode_part` never makes are left alone."""
        removed: list[Path] = []
        with self._lock:
            for profile_dir in self._profile_dirs():
                stems = {
                    p.name.removesuffix(p.suffix)
                    for p in profile_dir.iterdir()
                    if p.suffix in (JWT, JSON) and _ours(p.name.removesuffix(p.suffix))
                }
                for stem in sorted(stems):
                    removed += _remove_if_expired(profile_dir / stem, now)
        return removed

    def _profile_dirs(self) -> list[Path]:
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return []
        dirs = []
        for entry in entries:
            try:
                st = entry.lstat()
            except FileNotFoundError:  # removed meanwhile
                continue
            mine = sys.platform == "win32" or st.st_uid == os.getuid()
            if stat.S_ISDIR(st.st_mode) and mine and _ours(entry.name):
                dirs.append(entry)
        return dirs

    def _ensure_dir(self, path: Path) -> None:
        """A profile directory as the file mode wants it, and `dir` if it is missing."""
        if not self.file_mode & 0o040:
            ensure_private_dir(path)
            return
        # As ensure_private_dir, for 0750: each missing directory made 0700 and only then
        # opened to the group, and an existing profile directory must be ours and no more open.
        for directory in [*reversed([p for p in path.parents if not p.exists()]), path]:
            try:
                directory.mkdir(mode=0o700)
            except FileExistsError:
                if directory != path:
                    continue
                st = directory.lstat()
                mode = stat.S_IMODE(st.st_mode)
                if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                    raise ConfigError(
                        f"{directory} is not a directory of yours; remove it, or change [files] dir"
                    ) from None
                if mode & 0o777 & ~SHARED_DIR_MODE:
                    raise ConfigError(
                        f"{directory} is open to others (mode {mode:04o}); run "
                        f"`chmod 750 {directory}` or remove it"
                    ) from None
            self._share(directory)

    def _share(self, directory: Path) -> None:
        """Open a directory of ours to `group` (set-group-ID: files made in it get the group),
        or, without one, to the group it has, keeping a set-group-ID bit it inherited."""
        st, gid = directory.stat(), self.gid
        chown = gid is not None and st.st_gid != gid
        if gid is not None and chown:
            try:
                os.chown(directory, -1, gid)
            except PermissionError:
                raise ConfigError(
                    f"[files] group = {self.group!r}: you are not a member, so {directory} "
                    "cannot be given to it; add the agent's user to the group or change group"
                ) from None
        if gid is None and not st.st_mode & stat.S_ISGID:
            # Without set-group-ID the group is the creator's primary one (`users` on some
            # distributions, `staff` on macOS): opening it would open the tokens to other users.
            raise ConfigError(
                f"[files] file_mode 0640 without group: {directory} has no set-group-ID group "
                "to share with (an emptyDir with fsGroup has one); set [files] group, or use "
                "file_mode = 0o600"
            )
        wanted = SHARED_DIR_MODE | (stat.S_ISGID if gid is not None else st.st_mode & stat.S_ISGID)
        if chown or stat.S_IMODE(st.st_mode) != wanted:  # chown may drop set-group-ID
            os.chmod(directory, wanted)


def _gid(group: str | int) -> int:
    if isinstance(group, int):
        return group
    import grp  # Unix only; Windows was refused above

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(
            f"[files] group = {group!r} is no group on this system; write an existing group "
            "name or a numeric gid"
        ) from None


def _ours(stem: str) -> bool:
    return decode_part(stem) is not None or LONG_PART.fullmatch(stem) is not None


def _remove_if_expired(stem: Path, now: float) -> list[Path]:
    """The `.jwt` goes first: a remover killed halfway leaves the `.json` that says to
    remove the rest next time."""
    jwt, doc = stem.with_name(stem.name + JWT), stem.with_name(stem.name + JSON)
    try:
        expires_at = json.loads(read_regular(doc))["expires_at"]
        ours = isinstance(expires_at, int | float) and not isinstance(expires_at, bool)
    except (OSError, ValueError, TypeError, KeyError):
        ours = False
    if ours and expires_at > now:
        return []
    removed = []
    for path in [jwt, doc] if ours else [jwt]:
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed
