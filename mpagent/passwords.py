"""Password lookup for one profile: the OS keyring, then the environment, then a prompt.

Passwords are never read from config.toml, never logged and never put in a message.
The keyring may block (a locked collection, a slow D-Bus), so the agent calls this only
from a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from mpagent.errors import SecretUnavailable

SERVICE = "mpagent"
KEYSTORE_ENV = "MPAGENT_KEYSTORE_PASSWORD"
KEY_ENV = "MPAGENT_KEY_PASSWORD"

NO_KEYRING_HINT = (
    f"Without a keyring, set {KEYSTORE_ENV} (and {KEY_ENV} if the key has its own password) "
    "in the environment of the agent or of `mpagent get --no-agent`"
)

_UNSET = object()

log = logging.getLogger(__name__)


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
        raise SecretUnavailable(
            f"cannot {action} passwords in the OS keyring: {_reason(exc)}. {NO_KEYRING_HINT}",
            check="no_keyring",
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
    """Implements keys.Passwords. Each password is looked up once and then remembered."""

    def __init__(
        self,
        profile: str,
        *,
        env: Mapping[str, str] | None = None,
        lookup: Callable[[str, str], str | None] = keyring_get,
        interactive: bool | None = None,
    ) -> None:
        self.profile = profile
        self._env = os.environ if env is None else env
        self._lookup = lookup
        self._interactive = sys.stdin.isatty() if interactive is None else interactive
        self._cache: dict[str, object] = {}

    def keystore(self) -> str | None:
        return self._get("keystore", KEYSTORE_ENV, prompt=True)

    def key(self) -> str | None:
        """The key password defaults to the keystore password."""
        return self._get("key", KEY_ENV, prompt=False) or self.keystore()

    def _get(self, which: str, env_name: str, *, prompt: bool) -> str | None:
        cached = self._cache.get(which, _UNSET)
        if cached is _UNSET:
            cached = self._lookup(self.profile, which) or self._env.get(env_name) or None
            if cached is None and prompt and self._interactive:
                import getpass

                cached = getpass.getpass(f"mpagent: {which} password for profile {self.profile}: ")
            self._cache[which] = cached
        return cached if isinstance(cached, str) else None
