"""Token files: every kept token as `<dir>/<profile>/<name>.jwt` (the raw token, no newline:
AWS SDK `web_identity_token_file`, OpenTelemetry `bearertokenauth` `filename`, Prometheus
`credentials_file`) and `<name>.json` (Maskinporten's response with `expires_at`: gcloud's
`credential_source.file` with `subject_token_field_name = "access_token"`), each written
atomically through `private.write_atomic`, so a reader sees the old token or the new one,
never part of one.

The agent (`TokenFilesWriter`, on its io thread) keeps the files in step with the tokens of
every profile's `scopes`, as the env file: written when a token is issued or refreshed,
removed when it expires unreplaced (the issuer down), when a reload drops its scope or
profile, and at stop; the expired files an earlier run left (an agent killed) are removed
before the first write, and as they expire. A write that fails (disk full, permissions) is
in `mpagent status` and tried again; the tokens are still served.

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
`dir` itself may be a volume the agent does not own, but only root's (an emptyDir) or the
agent's user's; if missing it is created like the profile directories. It must be a real
directory (not a symlink) that no other user can write (unless sticky, like /tmp): whoever
can rename entries in it could put a profile directory with their own token in place of
ours. Server mode alone accepts a `dir` others can write, with one warning: Kubernetes'
emptyDir is 0777, the manifests mount it read-only in the app, and the pod is the boundary.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
import sys
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from mpagent.errors import ConfigError
from mpagent.private import read_regular, remove_leftovers, write_atomic
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

log = logging.getLogger(__name__)


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


def check_mode(file_mode: int, group: str | int | None, where: str = "[files]") -> None:
    """The one rule for `file_mode` and `group` (the config checks it at load, `where` naming
    its file; the writer again): the owner reads, the group at most reads and only with
    0640, others nothing; group and 0640 only on Unix."""
    if file_mode & ~0o640 or not file_mode & 0o400:
        raise ConfigError(
            f"{where} file_mode = 0o{file_mode:o} would let others read the tokens, or not "
            "even you; write file_mode = 0o600, or 0o640 with a group to share them"
        )
    if group is not None and not file_mode & 0o040:
        raise ConfigError(
            f"{where} group = {group!r} needs file_mode = 0o640 to let the group read the files"
        )
    if sys.platform == "win32" and (group is not None or file_mode & 0o040):
        raise ConfigError(f"{where} group and file_mode = 0o640 are for Unix; remove them")


class TokenFiles:
    """Writes and removes the token files under `directory`. Thread-safe; one per directory."""

    def __init__(
        self,
        directory: Path,
        file_mode: int = 0o600,
        group: str | int | None = None,
        *,
        server_mode: bool = False,
    ) -> None:
        check_mode(file_mode, group)
        self.directory = directory
        self.file_mode = file_mode
        self.gid = None if group is None else _gid(group)
        self.group = group
        self.server_mode = server_mode  # `check_dir`: a dir others can write is accepted
        self._warned = False
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
            self.check_dir()
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
        """`dir` (made if missing, then checked: `check_dir`) and the profile directory `path`
        in it, as the file mode wants it: 0700, or 0750 for the group (each made 0700 and
        only then opened); an existing one must be ours and no more open."""
        shared = bool(self.file_mode & 0o040)
        for directory in [*reversed([p for p in path.parents if not p.exists()]), path]:
            if directory == path:
                self.check_dir()
            made = True
            try:
                directory.mkdir(mode=0o700)
            except FileExistsError:
                if directory != path:
                    continue
                _check_profile_dir(path, SHARED_DIR_MODE if shared else 0o700)
                made = False
            if shared:
                try:
                    self._share(directory)
                except ConfigError:
                    if made:  # not left behind half-made (without the group it needs)
                        directory.rmdir()
                    raise

    def check_dir(self) -> None:
        """`dir` itself, before anything is written or removed in it: a real directory (not a
        symlink), owned by the agent's user or root, and not writable by group or others
        unless sticky (/tmp-like: others cannot rename or remove what is ours). Otherwise
        another user could swap in a profile directory of their own and readers would read
        their token. In server mode a directory others can write is accepted with one
        warning: Kubernetes' emptyDir is 0777, the manifests mount it read-only in the app,
        and the pod is the boundary."""
        if sys.platform == "win32":  # ACLs, not modes: the user's directories are closed
            return
        directory = self.directory
        st = directory.lstat()
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            raise ConfigError(
                f"[files] dir {directory} is a symlink (to {os.readlink(directory)}); whoever "
                "can change it chooses what readers read: write the real directory as [files] dir"
            )
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(
                f"[files] dir {directory} exists and is not a directory; remove it, or change "
                "[files] dir"
            )
        if st.st_uid not in (os.getuid(), 0):
            raise ConfigError(
                f"[files] dir {directory} belongs to uid {st.st_uid}, not to you or root, who "
                "could replace the token files readers read; change [files] dir to a directory "
                "of yours"
            )
        if mode & 0o022 and not mode & stat.S_ISVTX:
            if not self.server_mode:
                raise ConfigError(
                    f"[files] dir {directory} can be written by other users (mode {mode:04o}), "
                    f"who could replace the token files readers read; run `chmod go-w "
                    f"{directory}`, or change [files] dir (only server mode, in a pod whose "
                    "emptyDir is 0777, accepts it)"
                )
            if not self._warned:
                self._warned = True
                log.warning(
                    "[files] dir %s can be written by others (mode %04o): accepted in server "
                    "mode (a pod's emptyDir; the app should mount it read-only)",
                    directory,
                    mode,
                )

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


def _check_profile_dir(path: Path, most: int) -> None:
    """An existing profile directory: a directory (not a symlink) of ours, no more open
    than `most`."""
    st = path.lstat()
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} exists and is not a directory; remove it, or change [files] dir")
    if sys.platform != "win32" and st.st_uid != os.getuid():
        raise ConfigError(
            f"{path} belongs to uid {st.st_uid}, not to you; remove it, or change [files] dir"
        )
    if sys.platform != "win32" and mode & 0o777 & ~most:
        raise ConfigError(
            f"{path} is open to others (mode {mode:04o}); run `chmod {most:o} {path}` or remove it"
        )


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


class TokenFilesWriter:
    """The agent's token files, kept in step with the tokens it holds: `sync` writes the
    new and replaced ones and removes those no longer held (expired, or their profile or
    scope gone from the configuration), `close` removes every file it wrote. `sync` runs on
    one thread (the agent's io thread); `status`, `problem` and `close` may be called from
    another (the event loop). A failure is logged once per kind until the files are written
    again, and shown by `status` and `problem`; it never raises: the tokens are still served.

    When new settings (a reload) fail, the files of the previous working settings are kept,
    and kept up to date, until the new ones work: readers keep reading."""

    def __init__(self, *, server_mode: bool = False) -> None:
        self.server_mode = server_mode  # TokenFiles.check_dir: an emptyDir others can write
        self.files: TokenFiles | None = None
        self.closed = False  # `close` was called: no more writes
        self._settings: tuple[Path, int, str | int | None] | None = None
        self._setup_error: str | None = None
        self._working: TokenFiles | None = None  # the last settings that wrote every file
        # (writer, profile, scope set) -> the token its files hold
        self._written: dict[tuple[TokenFiles, str, str], Token] = {}
        self._lock = threading.Lock()  # one file pair at a time; `close` waits for it
        self.error: str | None = None
        self._logged: set[str] = set()

    def sync(
        self,
        directory: Path | None,
        file_mode: int,
        group: str | int | None,
        wanted: dict[tuple[str, str], Token],
        now: float,
    ) -> bool:
        """Make the files say `wanted` ((profile, scope set) -> token) under `directory`
        (None: no files), first removing the expired files an earlier run left there (each
        time: those still valid at start expire later). While the settings fail, the
        previous working ones keep their files. False when something failed (worth trying
        again)."""
        if self.closed:
            return True
        failures: list[tuple[str, str]] = []
        settings = None if directory is None else (directory, file_mode, group)
        if settings != self._settings:
            self._settings, self.files, self._setup_error = settings, None, None
            self._logged.clear()  # new settings: their failure is said, even of a known kind
            if directory is not None:
                try:
                    self.files = TokenFiles(
                        directory, file_mode, group, server_mode=self.server_mode
                    )
                except ConfigError as exc:
                    self._setup_error = exc.message
        if self._setup_error is not None:
            failures.append(("setup", self._setup_error))
        # Files no longer wanted go first (the expiry sweep below would remove some anyway).
        self._remove(lambda owner, key: key in wanted, failures)
        files = self.files
        if files is not None:
            try:  # `now - 1`: expires_at is rounded down, so none of ours (unexpired) goes
                if removed := files.remove_expired(now - 1):
                    log.info("removed %d expired token files an earlier run left", len(removed))
            except (OSError, ConfigError) as exc:
                failures.append(_failure("cannot clear expired token files in", directory, exc))
            self._write(files, wanted, failures)
        if not failures:
            self._working = files
        if self._working is not files and self._working is not None:
            kept_note = f"; the files in {self._working.directory} are kept until this is fixed"
            failures = [(kind, message + kept_note) for kind, message in failures]
            self._write(self._working, wanted, [])
        kept = {files, self._working}
        self._remove(lambda owner, key: owner in kept, failures)  # earlier settings' files
        self._report(failures)
        return not failures

    def _remove(
        self,
        keep: Callable[[TokenFiles, tuple[str, str]], bool],
        failures: list[tuple[str, str]],
    ) -> None:
        for entry in list(self._written):
            owner, profile, scope_set = entry
            if keep(owner, (profile, scope_set)):
                continue
            try:
                with self._lock:
                    if self.closed:  # close() removed them all meanwhile
                        return
                    owner.remove(profile, scope_set)
                    self._written.pop(entry, None)
            except OSError as exc:
                failures.append(_failure("cannot remove token files in", owner.directory, exc))

    def _write(
        self,
        files: TokenFiles,
        wanted: dict[tuple[str, str], Token],
        failures: list[tuple[str, str]],
    ) -> None:
        for key, token in wanted.items():
            if self._written.get((files, *key)) is token:
                continue
            try:
                with self._lock:
                    if self.closed:
                        return
                    files.write(*key, token)
                    self._written[(files, *key)] = token
            except (OSError, ConfigError) as exc:
                failures.append(_failure("cannot write token files in", files.directory, exc))

    def close(self) -> None:
        """At stop: no more writes, then remove every file this writer wrote (as the env
        file is removed). Unlinks only, so quick, and callable from any thread (the event
        loop's included): it waits at most for the one file pair a `sync` is writing, and a
        `sync` still queued does nothing."""
        with self._lock:
            self.closed = True
            for owner, profile, scope_set in list(self._written):
                try:
                    owner.remove(profile, scope_set)
                    del self._written[(owner, profile, scope_set)]
                except OSError as exc:
                    message = _failure("cannot remove token files in", owner.directory, exc)[1]
                    log.error("%s", message)

    def status(self) -> dict[str, Any] | None:
        """`status()["files"]`: the directory, how many scope sets have files there, the
        last failure; None without [files]."""
        if self._settings is None and not self._written:
            return None
        files = self.files
        return {
            "dir": str(self._settings[0]) if self._settings else None,
            "count": sum(1 for owner, *_ in list(self._written) if owner is files),
            "error": self.error,
        }

    def problem(self, wanted: Collection[tuple[str, str]]) -> str | None:
        """For /healthz with [files] dir set: why the files of `wanted` (the (profile, scope
        set) of each token held) are not all there under the current settings (the last
        failure, or the sets not written yet), or None when they are."""
        if self.error is not None:
            return f"token files: {self.error}"
        files = self.files
        written = {(p, s) for owner, p, s in list(self._written) if owner is files}
        missing = sorted(set(wanted) - written) if self._settings is not None else []
        if missing:
            sets = ", ".join(f"{p} {s!r}" for p, s in missing)
            return f"token files not written yet for {sets}"
        return None

    def _report(self, failures: list[tuple[str, str]]) -> None:
        if not failures:
            if self.error is not None:
                log.info("token files written again")
            self.error = None
            self._logged.clear()
            return
        for kind, message in failures:
            if kind not in self._logged:
                self._logged.add(kind)
                log.error("%s", message)
        self.error = failures[-1][1]


def _failure(what: str, directory: Path | None, exc: OSError | ConfigError) -> tuple[str, str]:
    """(kind, message) of a failure: kinds are logged once each (disk full, permission...)."""
    if isinstance(exc, ConfigError):
        return "config", exc.message
    kind = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    where = f" ({exc.filename})" if exc.filename else ""
    return kind, f"{what} {directory}: {exc.strerror or type(exc).__name__}{where}"
