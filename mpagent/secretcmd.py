"""`mpagent secret set|delete|status`: a profile's passwords in the OS keyring.

`set` opens the profile's keystore with the password before storing it, so a wrong one is
refused at once instead of showing up later in the agent. The keyring itself is reached only
through mpagent.passwords. Nothing here ever prints, logs or puts a password in a message;
`status` says only whether one is stored.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, TextIO

from mpagent import passwords
from mpagent.errors import ConfigError, KeystoreError, MpagentError, SecretUnavailable

if TYPE_CHECKING:
    from mpagent.config import Profile

WHICH = {False: "keystore", True: "key"}
WRONG = {"keystore": "wrong_store_password", "key": "wrong_key_password"}
STDIN_HINT = "pipe it as one line: printf '%s\\n' \"$PW\" | mpagent secret set PROFILE --stdin"


def main(args: Any, out: TextIO) -> int:
    action = {"set": _set, "delete": _delete, "status": _status}[args.action]
    return action(args, out)


def _set(args: Any, out: TextIO) -> int:
    which = WHICH[bool(args.key)]
    name = _chosen_profile(args)
    profile = _configured(args, name)
    try:
        # Reading first finds an unusable keyring before anyone types a password for it.
        replacing = passwords.keyring_read(name, which) is not None
    except SecretUnavailable as exc:
        raise _without_keyring(exc, name) from exc
    password = _read_stdin() if args.stdin else _prompt(name, which)
    checked = _check(profile, which, password) if profile else ""
    passwords.keyring_set(name, which, password)
    done = "replaced" if replacing else "stored"
    out.write(f"{done} the {which} password of profile {name} in the OS keyring{checked}\n")
    return 0


def _without_keyring(exc: SecretUnavailable, profile: str) -> SecretUnavailable:
    """The keyring failure, with the ways this profile's password can come instead."""
    action, reason = exc.details.get("action", "use"), exc.details.get("reason", exc.message)
    return SecretUnavailable(
        f"cannot {action} passwords in the OS keyring: {reason}. {passwords.alternatives(profile)}",
        check="no_keyring",
    )


def _check(profile: Profile, which: str, password: str) -> str:
    """Open the keystore with `password` as its `which` password (the other password from
    the profile's usual sources). A wrong one raises: nothing is stored. Anything else that
    keeps the key from loading only warns, as the password may well be right. Returns what
    to add to the "stored" line."""
    from mpagent.exchange import load_key

    trial = passwords.ProfilePasswords.for_profile(profile, unlocked={which: password})
    problem: MpagentError | None = None
    try:
        load_key(profile, trial, strict=False)
    except MpagentError as exc:
        problem = exc
    used = trial.source(which) == "unlock"  # the password was asked for, so it was tried
    if problem is not None and used and problem.details.get("check") == WRONG[which]:
        raise _refusal(profile, which, problem) from None
    if not used:
        _warn(_unchecked(profile, which, problem))
        return ""
    if problem is not None:
        _warn(_but(profile, problem))
    return f" (checked: it opens {profile.keystore})"


def _unchecked(profile: Profile, which: str, problem: MpagentError | None) -> str:
    if problem is not None:
        return f"could not check the password: {problem.message}; storing it anyway"
    what = "the keystore password opens its key" if which == "key" else "it is not encrypted"
    return f"{profile.keystore} needs no {which} password ({what}); storing it anyway"


def _but(profile: Profile, problem: MpagentError) -> str:
    """The password is right; what still keeps the key from being used."""
    if problem.details.get("check") == WRONG["key"]:  # found while checking the keystore's
        return (
            f"the key of entry {problem.details.get('alias')!r} has a password of its own; "
            f"store it too: mpagent secret set {profile.name} --key"
        )
    return f"the password is right, but the key cannot be used yet: {problem.message}"


def _refusal(profile: Profile, which: str, exc: MpagentError) -> KeystoreError:
    flag = " --key" if which == "key" else ""
    what = (
        f"the key of entry {exc.details.get('alias')!r} in {profile.keystore}"
        if which == "key"
        else f"the keystore {profile.keystore}"
    )
    return KeystoreError(
        f"that {which} password does not open {what} (profile {profile.name}); nothing "
        f"stored. Run `mpagent secret set {profile.name}{flag}` again with the right one",
        check=WRONG[which],
        source=str(profile.keystore),
    )


def _delete(args: Any, out: TextIO) -> int:
    which = WHICH[bool(args.key)]
    profile = _chosen_profile(args)
    try:
        deleted = passwords.keyring_delete(profile, which)
    except SecretUnavailable as exc:
        raise _without_keyring(exc, profile) from exc
    if not deleted:
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
        f"`mpagent unlock`, {passwords.KEYSTORE_ENV}_<PROFILE> / {passwords.KEYSTORE_ENV} "
        f"(and {passwords.KEY_ENV}...), password_command and a systemd credential come before "
        "the keyring, a prompt after it; the key password defaults to the keystore password.\n"
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


def _configured(args: Any, name: str) -> Profile | None:
    """The profile to check the password against. Storing a password before writing the
    profile is fine, so a profile that is missing or wrong only warns."""
    try:
        cfg = _load(args)
    except ConfigError as exc:
        _warn(f"cannot check profile {name} against the configuration: {exc}")
        return None
    if name not in cfg.names:
        known = ", ".join(cfg.names) or "none"
        _warn(
            f"{cfg.path} has no profile {name} (profiles: {known}); storing the password "
            f"anyway, unchecked: add a [profiles.{name}] table to use it"
        )
        return None
    if name in cfg.broken:
        _warn(f"cannot check the password, the profile is wrong: {cfg.broken[name]}")
        return None
    profile: Profile = cfg.profiles[name]
    return profile


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
