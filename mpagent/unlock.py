"""What `mpagent unlock` and `mpagent lock` do, like ssh-add: hand a running agent the
passwords of locked profiles, or make it forget them. Nothing here prints: what happens is
told to the `tell` the command line passes in.

The password is read from the terminal (hidden) or one line per password from stdin, checked
against the keystore here, in the client, and only then sent over the agent's private socket.
The agent keeps it in memory only: never on disk, in a log, in argv or in the environment.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable
from typing import Any

from mpagent.ask import ask_agent, profile_name
from mpagent.errors import ConfigError, KeystoreError, SecretUnavailable

ATTEMPTS = 3  # at a terminal, as sudo and ssh-add allow
WRONG = {
    "wrong_store_password": "the keystore password given does not open the keystore",
    "wrong_key_password": "the key has its own password, and the one given does not open it "
    "(unlock --stdin --key reads the keystore password, then the key password, a line each)",
}


def hand_over(
    args: argparse.Namespace, cfg: Any, names: list[str], tell: Callable[[str], None]
) -> None:
    """For each profile named: read its password(s), check them against its keystore, send
    them to the agent; `tell` hears each outcome (and each typo, at a terminal)."""
    for name in names:
        fields = _passwords_for(cfg.profile(name), args, tell)
        ask_agent(args, "unlock", [("profile", name), *fields])
        tell(
            f"profile {name} unlocked; the agent keeps the password in memory until it stops "
            f"or `mpagent lock {name}`"
        )


def unlock_now(config_file: str | None, name: str, tell: Callable[[str], None]) -> None:
    """`get` or `env` met a locked profile at a terminal, and the user wants it unlocked."""
    from mpagent import config

    args = argparse.Namespace(
        config=config_file, profiles=[name], all=False, stdin=False, key=False, no_start=True
    )
    hand_over(args, config.load(config_file), [name], tell)


def lock(args: argparse.Namespace) -> list[str]:
    """Make the agent forget the passwords of args.profiles (all if none); the ones it held."""
    reply = ask_agent(args, "lock", [("profile", name) for name in args.profiles], start=False)
    return [value for key, value in reply if key == "locked"]


def chosen(args: argparse.Namespace, cfg: Any) -> list[str]:
    """The profiles named, or with --all every one the agent reports locked, or else the
    profile the configuration chooses."""
    if args.profiles:
        for name in args.profiles:
            cfg.profile(name)  # an unknown name fails here, with "did you mean"
        return list(args.profiles)
    if args.all:
        status = json.loads(dict(ask_agent(args, "status"))["json"])
        return [n for n, state in status.get("passwords", {}).items() if state == "locked"]
    return [cfg.profile(profile_name(args)).name]


def _passwords_for(
    profile: Any, args: argparse.Namespace, tell: Callable[[str], None]
) -> list[tuple[str, str]]:
    """Read the profile's password(s), checked against its keystore: the agent's fields."""
    attempts = 1 if args.stdin else ATTEMPTS
    for attempt in range(1, attempts + 1):
        store = _read(args, f"keystore password for profile {profile.name}: ")
        key = _read(args, f"key password for profile {profile.name}: ") if args.key else None
        try:
            key = _check(profile, store, key, args)
        except KeystoreError as exc:
            if attempt == attempts or exc.details.get("check") not in WRONG:
                raise
            tell(f"{exc.message}; try again")
            continue
        return [("keystore", store), *([("key", key)] if key else [])]
    raise AssertionError("unreachable")


def _check(profile: Any, store: str, key: str | None, args: argparse.Namespace) -> str | None:
    """Open the keystore with the passwords; at a terminal, a JKS key whose password differs
    from the store's is asked for. Returns the key password to send, if any."""
    from mpagent.exchange import load_key

    try:
        load_key(profile, _typed(profile, store, key))
        return key
    except KeystoreError as exc:
        check = exc.details.get("check")
        if check not in WRONG:
            raise
        if check != "wrong_key_password" or key is not None or args.stdin:
            raise KeystoreError(
                f"{profile.keystore}: {WRONG[check]}; nothing was sent to the agent",
                **exc.details,
            ) from None
    key = _read(args, f"the key has its own password; key password for {profile.name}: ")
    return _check(profile, store, key, args)


def _typed(profile: Any, store: str, key: str | None) -> Any:
    """The profile's password sources with the typed passwords first, as the agent will
    have them: a key password not typed still comes from its usual sources."""
    from mpagent.passwords import ProfilePasswords

    typed = {"keystore": store, **({"key": key} if key else {})}
    return ProfilePasswords.for_profile(profile, unlocked=typed)


def _read(args: argparse.Namespace, prompt: str) -> str:
    if args.stdin:
        line = sys.stdin.readline()
        if not line:
            raise SecretUnavailable(
                f"unlock --stdin: no line for the {prompt.rstrip(': ')}; give one password per line"
            )
        password = line.rstrip("\r\n")
        if not password:
            raise ConfigError("unlock --stdin: an empty password; nothing sent to the agent")
        return password
    if not sys.stdin.isatty():
        raise SecretUnavailable(
            "unlock: no terminal to ask on; pass the passwords with --stdin, one per line"
        )
    password = getpass.getpass(f"mpagent: {prompt}")
    if not password:
        raise ConfigError("unlock: an empty password; nothing sent to the agent")
    return password
