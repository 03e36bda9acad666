"""Where things live. Pure apart from reading the environment, and a few lstat calls on the
one directory mpagent picks in a place other users share (`temp_runtime_dir`).

The socket path is on the `mpagent get` hot path, where importing platformdirs (and the pathlib
it pulls in) would cost more than the rest of the client together. So `runtime_dir` takes
`XDG_RUNTIME_DIR` directly on Linux, which is exactly platformdirs' rule there, and asks
platformdirs only in the other cases.
"""

import os
import stat
import sys

from mpagent.errors import ConfigError

APP = "mpagent"
SET_RUNTIME_DIR = (
    "set XDG_RUNTIME_DIR to a directory of yours with mode 0700, e.g. "
    "`mkdir -m 700 -p ~/.run && export XDG_RUNTIME_DIR=~/.run`"
)


def config_file() -> str:
    explicit = os.environ.get("MPAGENT_CONFIG")
    if explicit:
        return os.path.expanduser(explicit)
    import platformdirs

    return os.path.join(platformdirs.user_config_dir(APP, appauthor=False), "config.toml")


def data_dir() -> str:
    """Where mpagent keeps what it made for the user: the private keys of `mpagent keys`."""
    import platformdirs

    return platformdirs.user_data_dir(APP, appauthor=False)


def state_dir() -> str:
    """Where a command that takes several steps (`mpagent keys rotate`) records how far it got."""
    import platformdirs

    return platformdirs.user_state_dir(APP, appauthor=False)


def runtime_dir() -> str:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if sys.platform.startswith("linux"):
        if xdg:
            return os.path.join(xdg, APP)
        # ssh without pam_systemd, su: no XDG_RUNTIME_DIR, but systemd's socket unit still
        # lives in /run/user/<uid>; agree with it when that directory is ours.
        run_user = f"/run/user/{os.getuid()}"
        if os.path.isdir(run_user) and os.stat(run_user).st_uid == os.getuid():
            return os.path.join(run_user, APP)
        return os.path.join(temp_runtime_dir(), APP)
    import warnings

    import platformdirs

    with warnings.catch_warnings():
        # Elsewhere platformdirs may warn about a missing XDG_RUNTIME_DIR and fall back to a
        # directory it checks (recent versions raise PermissionError when it is wrong).
        warnings.simplefilter("ignore")
        try:
            return platformdirs.user_runtime_dir(APP, appauthor=False)
        except PermissionError as exc:
            raise ConfigError(f"{exc}; {SET_RUNTIME_DIR}") from None


def temp_runtime_dir() -> str:
    """Without XDG_RUNTIME_DIR and /run/user/<uid> (ssh without pam_systemd, su, cron):
    runtime-<uid> in the temporary directory, where platformdirs puts it. Its name is
    predictable, so another user may have made it first, or be able to replace it: it must
    be ours and writable by us alone, in a directory that lets no one else replace it (root's
    or ours, and sticky where others may write, as /tmp is). Else one ConfigError line."""
    tmp = os.environ.get("TMPDIR", "")
    tmp = tmp if os.path.isabs(tmp) else "/tmp"  # noqa: S108 - checked just below
    path = os.path.join(tmp, f"runtime-{os.getuid()}")
    problem = _shared_dir_problem(os.path.realpath(tmp)) or _own_dir_problem(path)
    if problem:
        raise ConfigError(f"{problem}; {SET_RUNTIME_DIR}")
    return path


def _shared_dir_problem(path: str) -> str | None:
    """Why another user could replace what we keep below `path` (no symlinks in it), or None.
    A directory of ours that its group may write to is accepted: with user private groups
    (umask 002) that group is ours alone."""
    uid, parts = os.getuid(), path.strip("/").split("/")
    for depth in range(len(parts) + 1):
        current = "/" + "/".join(parts[:depth])
        try:
            st = os.lstat(current)
        except OSError as exc:
            return f"{current} cannot be checked: {exc.strerror}"
        mode, writers = stat.S_IMODE(st.st_mode), stat.S_IWOTH
        if st.st_uid != uid:
            writers |= stat.S_IWGRP
        if st.st_uid not in (0, uid):
            return f"{current} belongs to uid {st.st_uid} (mode {mode:04o}), not to you or root"
        if st.st_mode & writers and not st.st_mode & stat.S_ISVTX:
            return (
                f"{current} (uid {st.st_uid}, mode {mode:04o}) lets other users write to it "
                "without the sticky bit, so anyone could replace what mpagent keeps in it"
            )
    return None


def _own_dir_problem(path: str) -> str | None:
    """None if `path` is missing (the agent creates it 0700) or is our own directory that no
    one else may write to; else why not."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory (uid {st.st_uid}, mode {mode:04o})"
    if st.st_uid != os.getuid():
        return (
            f"{path} belongs to uid {st.st_uid} (mode {mode:04o}), not to you: another user made it"
        )
    if mode & 0o022:
        return f"{path} is yours but others may write to it (mode {mode:04o}); `chmod 700 {path}`"
    return None


def socket_path() -> str:
    """The agent's address: a Unix socket, or on Windows a named pipe."""
    explicit = os.environ.get("MPAGENT_SOCKET")
    if explicit:
        # Quoted in a shell, or set by an IDE, an .env file or systemd's Environment=, `~`
        # arrives unexpanded; MPAGENT_CONFIG is expanded the same way.
        return os.path.expanduser(explicit)
    if sys.platform == "win32":
        return r"\\.\pipe\mpagent-" + os.environ.get("USERNAME", "user").lower()
    return os.path.join(runtime_dir(), "agent.sock")


def default_env_file() -> str:
    return os.path.join(runtime_dir(), "tokens.env")


def lock_file() -> str:
    """The single-instance lock: beside the socket it guards (pipes live in no directory)."""
    return _beside_socket(".lock")


def start_lock_file() -> str:
    """Held by a client while it starts an agent, so that only one starts it."""
    return _beside_socket(".start")


def _beside_socket(suffix: str) -> str:
    address = socket_path()
    if sys.platform == "win32":
        return os.path.join(runtime_dir(), address.rsplit("\\", 1)[-1] + suffix)
    return address + suffix
