"""`mpagent secret set|delete|status`: a profile's passwords in the OS keyring.

The keyring itself is reached only through mpagent.passwords. Nothing here ever prints,
logs or puts a password in a message; `status` says only whether one is stored.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from mpagent import passwords
from mpagent.errors import ConfigError, SecretUnavailable

WHICH = {False: "keystore", True: "key"}
STDIN_HINT = "pipe it as one line: printf '%s\\n' \"$PW\" | mpagent secret set PROFILE --stdin"


def main(args: Any, out: TextIO) -> int:
    action = {"set": _set, "delete": _delete, "status": _status}[args.action]
    return action(args, out)


def _set(args: Any, out: TextIO) -> int:
    which = WHICH[bool(args.key)]
    profile = _chosen_profile(args)
    _warn_if_unknown(args, profile)
    # Reading first finds an unusable keyring before anyone types a password for it.
    replacing = passwords.keyring_read(profile, which) is not None
    password = _read_stdin() if args.stdin else _prompt(profile, which)
    passwords.keyring_set(profile, which, password)
    done = "replaced" if replacing else "stored"
    out.write(f"{done} the {which} password of profile {profile} in the OS keyring\n")
    return 0


def _delete(args: Any, out: TextIO) -> int:
    which = WHICH[bool(args.key)]
    profile = _chosen_profile(args)
    if not passwords.keyring_delete(profile, which):
        print(
            f"mpagent: the OS keyring holds no {which} password for profile {profile}; "
            "nothing deleted (see `mpagent secret status`)",
            file=sys.stderr,
        )
        return 1
    out.write(f"deleted the {which} password of profile {profile} from the OS keyring\n")
    return 0


def _status(args: Any, out: TextIO) -> int:
    names = [args.profile] if args.profile else _load(args).names
    backend = passwords.keyring_backend_name()
    rows = [(name, _stored(name, "keystore"), _stored(name, "key")) for name in names]
    width = max(len("profile"), *(len(name) for name in names))
    out.write(f"OS keyring: {backend} (service {passwords.SERVICE!r})\n")
    out.write(f"{'profile':<{width}}  {'keystore password':<17}  key password\n")
    for name, store, key in rows:
        out.write(f"{name:<{width}}  {store:<17}  {key}\n")
    out.write(
        f"A password not stored here comes from {passwords.KEYSTORE_ENV} / "
        f"{passwords.KEY_ENV} or a prompt; the key password defaults to the keystore password.\n"
    )
    return 0


def _stored(profile: str, which: str) -> str:
    return "stored" if passwords.keyring_read(profile, which) is not None else "not stored"


# -- profiles ---------------------------------------------------------------------------


def _load(args: Any) -> Any:
    from mpagent import config

    return config.load(args.config)


def _chosen_profile(args: Any) -> str:
    """PROFILE as given (the config may not exist yet), else the config's chosen profile."""
    from mpagent.config import choose_profile

    requested = args.profile or os.environ.get("MPAGENT_PROFILE")
    if requested:
        return str(requested)
    cfg = _load(args)
    return choose_profile(None, cfg.default_profile, cfg.names, cfg.path)


def _warn_if_unknown(args: Any, profile: str) -> None:
    """Storing a password before writing the profile is fine, so this only warns."""
    try:
        cfg = _load(args)
    except ConfigError as exc:
        _warn(f"cannot check profile {profile} against the configuration: {exc}")
        return
    if profile not in cfg.names:
        known = ", ".join(cfg.names) or "none"
        _warn(
            f"{cfg.path} has no profile {profile} (profiles: {known}); storing the password "
            f"anyway: add a [profiles.{profile}] table to use it"
        )


def _warn(message: str) -> None:
    print(f"mpagent: warning: {message}", file=sys.stderr)


# -- reading the password ---------------------------------------------------------------


def _read_stdin() -> str:
    """Exactly one line; its line ending is not part of the password."""
    raw = sys.stdin.buffer.readline()
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretUnavailable("the password on stdin is not UTF-8; nothing stored") from None
    password = line.removesuffix("\n").removesuffix("\r")
    if not password:
        raise SecretUnavailable(f"stdin held no password (an empty line); {STDIN_HINT}")
    return password


def _prompt(profile: str, which: str) -> str:
    """Hidden, twice: a typo stored here would only show up later as a wrong password."""
    if not sys.stdin.isatty():
        raise SecretUnavailable(
            f"stdin is not a terminal, so there is no hidden prompt; {STDIN_HINT}"
        )
    import getpass

    try:
        first = getpass.getpass(f"mpagent: {which} password for profile {profile}: ")
        again = getpass.getpass(f"mpagent: the same {which} password again: ")
    except EOFError:
        raise SecretUnavailable("no password entered; nothing stored") from None
    if not first:
        raise SecretUnavailable("the password is empty; nothing stored")
    if first != again:
        raise SecretUnavailable("the two passwords differ; nothing stored, try again")
    return first
