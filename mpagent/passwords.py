"""Password lookup for one profile: the OS keyring, then the environment, then a prompt.

Passwords are never read from config.toml, never logged and never put in a message.
The keyring may block (a locked collection, a slow D-Bus), so the agent calls this only
from a worker thread.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping

SERVICE = "mpagent"
KEYSTORE_ENV = "MPAGENT_KEYSTORE_PASSWORD"
KEY_ENV = "MPAGENT_KEY_PASSWORD"

_UNSET = object()


def keyring_username(profile: str, which: str) -> str:
    """`which` is "keystore" or "key"."""
    return f"{profile}/{which}"


def keyring_get(profile: str, which: str) -> str | None:
    """The stored password, or None when there is none or no usable keyring backend."""
    import keyring
    import keyring.errors

    try:
        return keyring.get_password(SERVICE, keyring_username(profile, which))
    except keyring.errors.KeyringError:
        return None


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
