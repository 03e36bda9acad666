"""Where things live. Pure apart from reading the environment.

The socket path is on the `mpagent get` hot path, where importing platformdirs (and the pathlib
it pulls in) would cost more than the rest of the client together. So `runtime_dir` takes
`XDG_RUNTIME_DIR` directly on Linux, which is exactly platformdirs' rule there, and asks
platformdirs only in the other cases.
"""

import os
import sys

APP = "mpagent"


def config_file() -> str:
    explicit = os.environ.get("MPAGENT_CONFIG")
    if explicit:
        return os.path.expanduser(explicit)
    import platformdirs

    return os.path.join(platformdirs.user_config_dir(APP, appauthor=False), "config.toml")


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
    import warnings

    import platformdirs

    with warnings.catch_warnings():
        # Without XDG_RUNTIME_DIR platformdirs warns and uses /tmp/runtime-<uid>; that is
        # acceptable because the agent creates and checks the directory as private.
        warnings.simplefilter("ignore")
        return platformdirs.user_runtime_dir(APP, appauthor=False)


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
