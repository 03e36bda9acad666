"""Where a profile's passwords come from. For each password, the first source that has
one wins (`source()` names it, `described()` says it in a message):

1. "unlock": given by `mpagent unlock`, held in the agent's memory only;
2. "env": MPAGENT_KEYSTORE_PASSWORD_<PROFILE>, then MPAGENT_KEYSTORE_PASSWORD: an explicit
   variable beats a stored secret, as everywhere else in the ecosystem;
3. "file": the profile's password_file (a mounted Kubernetes Secret or any secret file),
   without one trailing newline. After env, so that a job's variable still overrides a file
   baked into a config; beside password_command rather than after it, since config.py
   refuses a profile setting both. The file must not be writable by anyone but its owner,
   and its owner is root (a Secret mount) or the agent's own user;
4. "command": the profile's password_command (an argv list, no shell, first line of stdout);
5. "credential": the systemd credential $CREDENTIALS_DIRECTORY/<profile>.keystore;
6. "keyring": the OS keyring (`mpagent secret set`), never in server mode;
7. "prompt": a hidden prompt, only for a command in the foreground on a terminal, never in
   server mode.

The key password of a JKS key with its own comes the same way (MPAGENT_KEY_PASSWORD_<PROFILE>,
key_password_command, <profile>.key) and otherwise is the keystore password.
Passwords are never read from config.toml, never logged and never put in a message. The
keyring and the command may block, so the agent calls this only from a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shlex
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpagent.envfile import name_part
from mpagent.errors import MpagentError, SecretUnavailable
from mpagent.private import read_regular

if TYPE_CHECKING:
    from mpagent.config import Profile

SERVICE = "mpagent"
KEYSTORE_ENV = "MPAGENT_KEYSTORE_PASSWORD"
KEY_ENV = "MPAGENT_KEY_PASSWORD"
ENV = {"keystore": KEYSTORE_ENV, "key": KEY_ENV}
COMMAND_SETTINGS = {"keystore": "password_command", "key": "key_password_command"}
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
COMMAND_TIMEOUT = 10.0
SOURCES = ("unlock", "env", "file", "command", "credential", "keyring", "prompt")
# The variables that hold a keystore (config.KEYSTORE_B64_ENV) or a password, each also with
# _<PROFILE>: never passed on to a program mpagent runs (`exec`'s, a password_command).
SECRET_ENV = ("MPAGENT_KEYSTORE_B64", KEYSTORE_ENV, KEY_ENV)

NO_KEYRING_HINT = (
    f"Without a keyring, a profile's password can come from {KEYSTORE_ENV}_<PROFILE> (or "
    f"{KEYSTORE_ENV}; {KEY_ENV}_<PROFILE> for a key with its own password) in the environment "
    "of the agent or of `mpagent get --no-agent`, from password_command or password_file in "
    "the profile, from a systemd credential, or from `mpagent unlock PROFILE`"
)

log = logging.getLogger(__name__)


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without SECRET_ENV's variables: what a program mpagent starts may see. It gets
    its token (exec) or prints a password (password_command); the keystore and the other
    passwords are none of its business."""
    return {k: v for k, v in env.items() if not k.startswith(SECRET_ENV)}


def env_names(profile: str, which: str) -> tuple[str, ...]:
    """The variables that hold a profile's `which` password, the per-profile one first."""
    part = name_part(profile)
    return (f"{ENV[which]}_{part}", ENV[which]) if part else (ENV[which],)


def alternatives(profile: str) -> str:
    """The sources other than the keyring, for this profile, as a sentence for a message."""
    store, key = env_names(profile, "keystore"), env_names(profile, "key")
    return (
        f"Without a keyring, profile {profile}'s keystore password can come from {store[0]} "
        f"(or {store[-1]}) in the environment of the agent or of `mpagent get --no-agent`; "
        f'from password_command = ["pass", "show", "mpagent/{profile}"] (any program that '
        f"prints it) in [profiles.{profile}]; from the systemd credential {profile}.keystore "
        f"(`mpagent service install --dry-run` shows how); or from `mpagent unlock {profile}`, "
        "which hands it to the running agent. A JKS key with a password of its own: "
        f"{key[0]}, key_password_command, {profile}.key, `mpagent unlock {profile} --key`"
    )


def without_keyring(exc: SecretUnavailable, profile: str) -> SecretUnavailable:
    """A keyring failure again, with the ways this profile's password can come instead."""
    action, reason = exc.details.get("action", "use"), exc.details.get("reason", exc.message)
    return SecretUnavailable(
        f"cannot {action} passwords in the OS keyring: {reason}. {alternatives(profile)}",
        check="no_keyring",
    )


def keyring_username(profile: str, which: str) -> str:
    """`which` is "keystore" or "key"."""
    return f"{profile}/{which}"


def keyring_get(profile: str, which: str) -> str | None:
    """The stored password, or None when there is none or no usable keyring backend."""
    try:
        return keyring_read(profile, which)
    except SecretUnavailable as exc:
        log.debug("profile %s: no %s password from the keyring: %s", profile, which, exc)
        return None


def keyring_read(profile: str, which: str) -> str | None:
    """The stored password or None; raises SecretUnavailable when the keyring is unusable."""
    return stored(keyring_username(profile, which))


def keyring_set(profile: str, which: str, password: str) -> None:
    """Store (or replace) the password; raises SecretUnavailable when the keyring is unusable."""
    store(keyring_username(profile, which), password)


def keyring_delete(profile: str, which: str) -> bool:
    """Remove the password; False when none was stored. Raises SecretUnavailable."""
    return forget(keyring_username(profile, which))


def stored(username: str) -> str | None:
    """The secret kept under service "mpagent" and `username`, or None."""
    with _keyring_boundary("read"):
        value = _backend().get_password(SERVICE, username)
        return None if value is None else str(value)


def store(username: str, secret: str) -> None:
    with _keyring_boundary("store"):
        _backend().set_password(SERVICE, username, secret)


def forget(username: str) -> bool:
    """Remove the secret; False when none was stored."""
    with _keyring_boundary("delete"):
        backend = _backend()
        # Backends report "not found" and real failures with the same PasswordDeleteError,
        # so look first: a failure to delete an existing entry must not read as "none".
        if backend.get_password(SERVICE, username) is None:
            return False
        backend.delete_password(SERVICE, username)
        return True


def keyring_backend_name() -> str:
    """The backend keyring chose, for people to read ("SecretService Keyring")."""
    with _keyring_boundary("open"):
        return str(_backend().name)


def _backend() -> Any:
    import keyring
    import keyring.backend
    import keyring.backends.fail
    import keyring.core

    backend = keyring.get_keyring()
    if isinstance(backend, keyring.backends.fail.Keyring):
        # keyring picks a backend once per process and remembers which were viable. An agent
        # started before the user's Secret Service (a login over SSH, an early service) would
        # otherwise never see it, not even after a reload; detecting again is cheap and only
        # happens while there is no backend at all.
        forget = getattr(keyring.backend.get_all_keyring, "reset", None)
        if forget is not None:
            with contextlib.suppress(KeyError):  # raised when it never ran
                forget()
        keyring.core.init_backend()
        backend = keyring.get_keyring()
    return backend


@contextlib.contextmanager
def _keyring_boundary(action: str) -> Iterator[None]:
    """Every way a keyring call fails becomes SecretUnavailable naming the env variables.
    keyring signals "no usable backend" with RuntimeError (a backend that is not viable,
    also when PYTHON_KEYRING_BACKEND names one) and lets D-Bus failures through untranslated."""
    try:
        yield
    except _failures() as exc:  # evaluated only once something was raised
        reason = _reason(exc)
        raise SecretUnavailable(
            f"cannot {action} passwords in the OS keyring: {reason}. {NO_KEYRING_HINT}",
            check="no_keyring",
            action=action,
            reason=reason,
        ) from exc


def _failures() -> tuple[type[BaseException], ...]:
    failures: list[type[BaseException]] = [ImportError, RuntimeError, OSError]
    try:
        import keyring.errors

        failures.append(keyring.errors.KeyringError)
    except ImportError:
        pass
    try:
        import jeepney
        import secretstorage.exceptions

        failures += [secretstorage.exceptions.SecretStorageException, jeepney.DBusErrorResponse]
    except ImportError:  # not Linux
        pass
    return tuple(failures)


def _reason(exc: BaseException) -> str:
    """keyring's own messages are long and point at PyPI; say what it means for a user."""
    if isinstance(exc, ImportError):
        return f"the keyring library cannot be loaded ({exc})"
    import keyring.errors

    if isinstance(exc, keyring.errors.NoKeyringError):
        return (
            "no keyring backend is available (on Linux a Secret Service such as "
            "gnome-keyring or KeePassXC must run in the D-Bus session)"
        )
    if isinstance(exc, keyring.errors.KeyringLocked):
        return "the keyring is locked and was not unlocked"
    return f"{exc}".strip() or type(exc).__name__


class ProfilePasswords:
    """Implements keys.Passwords for one profile. Each password is looked up once, in the
    order of the module docstring, and then remembered with where it came from."""

    def __init__(
        self,
        profile: str,
        *,
        env: Mapping[str, str] | None = None,
        lookup: Callable[[str, str], str | None] = keyring_get,
        interactive: bool | None = None,
        unlocked: Mapping[str, str] | None = None,
        commands: Mapping[str, Sequence[str] | None] | None = None,
        password_file: Path | None = None,
    ) -> None:
        self.profile = profile
        self._env = os.environ if env is None else env
        self._lookup = lookup
        self._interactive = sys.stdin.isatty() if interactive is None else interactive
        self._unlocked = unlocked or {}
        self._commands = commands or {}
        self._password_file = password_file
        self._found: dict[str, tuple[str | None, str, str]] = {}  # which: (value, source, named)
        self._failed: dict[str, MpagentError] = {}

    @classmethod
    def for_profile(
        cls,
        profile: Profile,
        *,
        unlocked: Mapping[str, str] | None = None,
        interactive: bool = False,
        server: bool = False,
    ) -> ProfilePasswords:
        """`unlocked`: "keystore"/"key" passwords that `mpagent unlock` gave the agent.
        `server` (server mode): no keyring and no prompt, whatever `interactive` says."""
        commands = {"keystore": profile.password_command, "key": profile.key_password_command}
        return cls(
            profile.name,
            unlocked=unlocked,
            interactive=interactive and not server,
            commands=commands,
            password_file=profile.password_file,
            lookup=_no_keyring if server else keyring_get,
        )

    def keystore(self) -> str | None:
        return self._get("keystore")

    def key(self) -> str | None:
        """Asked only once the keystore password failed to open the key (a JKS key with a
        password of its own), so at a terminal it prompts; else the keystore password."""
        own = self._get("key")
        return own if own is not None else self.keystore()

    def source(self, which: str) -> str | None:
        """Where the `which` password came from, one of SOURCES; None before it was looked
        up, when no source had it, and for a key password that is the keystore password."""
        found = self._found.get(which)
        return found[1] if found and found[0] is not None else None

    def described(self, which: str) -> str:
        """The source for a message: "MPAGENT_KEYSTORE_PASSWORD_<PROFILE>", "the OS keyring"."""
        found = self._found.get(which)
        if found and found[0] is not None:
            return found[2]
        if which == "key" and self.source("keystore"):
            return f"the keystore password (from {self.described('keystore')})"
        return "no source"

    def _get(self, which: str) -> str | None:
        if which in self._failed:
            raise self._failed[which].again()
        if which not in self._found:
            try:
                self._found[which] = self._find(which)
            except MpagentError as exc:
                self._failed[which] = exc
                raise
        return self._found[which][0]

    def _find(self, which: str) -> tuple[str | None, str, str]:
        if value := self._unlocked.get(which):
            return value, "unlock", "`mpagent unlock`"
        for name in env_names(self.profile, which):
            if value := self._env.get(name):
                return value, "env", name
        if which == "keystore" and self._password_file is not None:
            path = self._password_file
            return secret_file(path, self.profile), "file", f"password_file {path}"
        argv = self._commands.get(which)
        if argv:
            setting = COMMAND_SETTINGS[which]
            value = run_command(self.profile, setting, argv, self._command_env())
            return value, "command", f"{setting} `{shlex.join(argv)}`"
        if (value := self._credential(which)) is not None:
            return value, "credential", f"the systemd credential {self.profile}.{which}"
        if value := self._lookup(self.profile, which):
            return value, "keyring", "the OS keyring"
        if self._interactive:
            return self._prompt(which), "prompt", "the prompt"
        return None, "", "no source"

    def _command_env(self) -> Mapping[str, str]:
        return child_env(self._env)

    def _credential(self, which: str) -> str | None:
        """$CREDENTIALS_DIRECTORY/<profile>.<which>, without one trailing newline (an
        encrypted credential made from `echo`ed or typed input has one)."""
        directory = self._env.get(CREDENTIALS_ENV)
        if not directory:
            return None
        path = Path(directory, f"{self.profile}.{which}")
        named = f"profile {self.profile}: the systemd credential {path}"
        try:
            data = read_regular(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SecretUnavailable(f"{named} cannot be read: {exc.strerror or exc}") from None
        return _secret_text(data, named, "encrypt the password into it again")

    def _prompt(self, which: str) -> str | None:
        import getpass

        why = " (its key has a password of its own)" if which == "key" else ""
        try:
            answer = getpass.getpass(f"mpagent: {which} password for profile {self.profile}{why}: ")
        except EOFError:
            return None
        return answer or None

    # -- messages about a wrong or missing password ------------------------------------

    def explain(self, exc: MpagentError) -> MpagentError | None:
        """mpagent.keys's password errors again, naming the source used and the profile's ways
        to fix it; None for any other error."""
        check, path = exc.details.get("check"), exc.details.get("source", "the keystore")
        if check == "no_password":
            return type(exc)(f"{path}: {self.locked_message()}", **{**exc.details, "locked": True})
        if check == "wrong_store_password":
            which = "keystore"
            problem = (
                f"the keystore password from {self.described(which)} is wrong; {self._fix(which)}"
            )
        elif check == "wrong_key_password":
            which, problem = "key", self._key_problem(exc.details.get("alias"))
        else:
            return None
        details = {**exc.details, "password_source": self.source(which)}
        return type(exc)(f"{path}: {problem}", **details)

    def _key_problem(self, alias: str | None) -> str:
        p = self.profile
        if self.source("key") is not None:
            return (
                f"the key password of entry {alias!r} from {self.described('key')} is wrong; "
                f"{self._fix('key')}"
            )
        return (
            f"the key of entry {alias!r} has a password of its own (keytool keystores often do "
            f"that): the keystore password, from {self.described('keystore')}, does not open "
            f"it, and no source has the key password: set {' or '.join(env_names(p, 'key'))}, "
            f"set key_password_command in [profiles.{p}], store it with `mpagent secret set "
            f"{p} --key`, or run: mpagent unlock {p} --key"
        )

    def locked_message(self) -> str:
        """No source has the keystore password; ends with exactly `run: mpagent unlock P`."""
        p = self.profile
        return (
            f"profile {p} is locked: no keystore password from "
            f"{', '.join(env_names(p, 'keystore'))}, password_command, password_file, a systemd "
            "credential or "
            f"the OS keyring (`mpagent secret set {p}`); run: mpagent unlock {p}"
        )

    def _fix(self, which: str) -> str:
        """How to put the right `which` password where it came from."""
        p, flag = self.profile, " --key" if which == "key" else ""
        source = self.source(which)
        found = self._found.get(which)
        named = found[2] if found else ""
        if source == "unlock":
            return f"the keystore changed since: run `mpagent lock {p}`, then: mpagent unlock {p}"
        if source == "env":
            return (
                f"put the right one in {named}, or unset it to use the next source "
                f"({COMMAND_SETTINGS[which]}{', password_file' if which == 'keystore' else ''}, "
                f"a systemd credential, `mpagent secret set {p}{flag}`)"
            )
        if source == "command":
            return f"make {named} print the right one"
        if source == "file":
            return f"put the right one in {named.removeprefix('password_file ')}"
        if source == "credential":
            return (
                f"encrypt the right one into the credential {p}.{which} "
                "(`mpagent service install --dry-run` shows how)"
            )
        if source == "keyring":
            return f"store the right one: mpagent secret set {p}{flag}"
        return "type it again"


def _no_keyring(profile: str, which: str) -> None:
    """Server mode's keyring: there is none (no user session, no D-Bus to wait on)."""
    return None


def secret_file(path: Path, profile: str) -> str:
    """The password in `path` (password_file) without one trailing newline. What a mounted
    Kubernetes Secret looks like passes: a symlink (through ..data/) to a file owned by root,
    mode 0440 or 0644, in a root-owned 0755 directory. Refused: a file someone other than its
    owner may write, or owned by another user than root or us, or in a directory another
    user may write (who could swap the file): whoever may change it decides whether the
    profile works. The file is opened once and what is checked is what is read (fstat)."""
    named = f"profile {profile}: password_file {path}"
    fix = f"fix password_file in [profiles.{profile}]"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO cannot wedge
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            _check_secret_file(st, path, named)
            data = f.read(MAX_SECRET + 1)
    except FileNotFoundError:
        raise SecretUnavailable(f"{named} does not exist; {fix}", check="password_file") from None
    except OSError as exc:
        raise SecretUnavailable(
            f"{named} cannot be read: {exc.strerror or exc}; {fix}", check="password_file"
        ) from None
    if len(data) > MAX_SECRET:
        raise SecretUnavailable(
            f"{named} is larger than {MAX_SECRET // 1024} KiB, which no password is; {fix}",
            check="password_file",
        )
    return _secret_text(data, named, "write the password into it, as one line")


MAX_SECRET = 64 * 1024


def _check_secret_file(st: os.stat_result, path: Path, named: str) -> None:
    """password_file's owner and mode (from the open file) and its final directory's."""
    directory = Path(os.path.realpath(path)).parent
    if sys.platform != "win32":
        mode = st.st_mode & 0o7777
        if mode & 0o022:
            raise SecretUnavailable(
                f"{named} is writable by {'others' if mode & 0o002 else 'its group'} (mode "
                f"{mode:04o}), so anyone who can write it chooses the password; make it "
                f"writable by its owner only: chmod go-w {shlex.quote(str(path))}",
                check="password_file",
            )
        if st.st_uid not in (0, os.getuid()):
            raise SecretUnavailable(
                f"{named} belongs to uid {st.st_uid}, neither root nor this agent's user "
                f"(uid {os.getuid()}); chown it to one of them",
                check="password_file",
            )
        dst = os.stat(directory)
        writable = dst.st_mode & 0o022 and not dst.st_mode & stat.S_ISVTX
        if writable or dst.st_uid not in (0, os.getuid()):
            raise SecretUnavailable(
                f"{named} is in {directory}, which "
                + (
                    f"others may write (mode {dst.st_mode & 0o7777:04o})"
                    if writable
                    else f"belongs to uid {dst.st_uid}"
                )
                + ", so another user could put their own file there; keep it in a directory "
                "owned by root or this agent's user that only its owner may write",
                check="password_file",
            )


def _secret_text(data: bytes, named: str, fix: str) -> str:
    """A secret file's text without one trailing newline (`echo` and editors add one)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretUnavailable(f"{named} is not UTF-8 text; {fix}") from None
    value = text.removesuffix("\r\n") if text.endswith("\r\n") else text.removesuffix("\n")
    if not value:
        raise SecretUnavailable(f"{named} is empty; {fix}")
    return value


def run_command(
    profile: str, setting: str, argv: Sequence[str], env: Mapping[str, str] | None = None
) -> str:
    """The first line of what `argv` prints: no shell, stdin closed, at most COMMAND_TIMEOUT.
    Its output and stderr never reach a message: either may hold the password."""
    shown = f"profile {profile}: {setting} `{shlex.join(argv)}`"
    fix = f"fix {setting} in [profiles.{profile}], or run: mpagent unlock {profile}"
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
            env=env,
            check=False,
        )
    except FileNotFoundError:
        raise SecretUnavailable(
            f"{shown} cannot run: there is no program {argv[0]!r} (not installed, or not on "
            f"PATH); {fix}",
            check="password_command",
        ) from None
    except OSError as exc:
        raise SecretUnavailable(
            f"{shown} cannot run: {exc.strerror or exc}; {fix}", check="password_command"
        ) from None
    except subprocess.TimeoutExpired:
        raise SecretUnavailable(
            f"{shown} did not finish within {COMMAND_TIMEOUT:g} s and was stopped (does it "
            f"wait for input?); {fix}",
            check="password_command",
        ) from None
    if done.returncode:
        status = (
            f"was killed by signal {-done.returncode}"
            if done.returncode < 0
            else f"failed with exit status {done.returncode}"
        )
        raise SecretUnavailable(
            f"{shown} {status} (its output is not shown: it may hold the password; run it "
            f"yourself to see why); {fix}",
            check="password_command",
        )
    first = done.stdout.split(b"\n", 1)[0].removesuffix(b"\r")
    try:
        value = first.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretUnavailable(
            f"{shown} printed a first line that is not UTF-8 text; {fix}",
            check="password_command",
        ) from None
    if not value:
        raise SecretUnavailable(
            f"{shown} printed nothing on its first line; {fix}", check="password_command"
        )
    return value
