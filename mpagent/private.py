"""Files and directories no other local user can reach. Stdlib only (used by the client's
autostart path as well as the agent)."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from mpagent.errors import ConfigError


def ensure_private_dir(path: Path) -> None:
    """Create `path` 0700 (at mkdir time, never chmod afterwards), or accept an existing
    one only if it is ours and closed to others. On Windows the per-user profile
    directories are already closed to other users by their ACLs."""
    # mkdir(parents=True) would create missing ancestors with the umask's mode; make each 0700.
    for ancestor in reversed([p for p in path.parents if not p.exists()]):
        ancestor.mkdir(mode=0o700, exist_ok=True)
    if sys.platform == "win32":
        path.mkdir(exist_ok=True)
        return
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} exists and is not a directory; remove it")
    if st.st_uid != os.getuid():
        raise ConfigError(
            f"{path} belongs to uid {st.st_uid}, not you; remove it or set MPAGENT_SOCKET elsewhere"
        )
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run `chmod 700 {path}` or remove it"
        )


def open_private(path: Path, flags: int = os.O_WRONLY | os.O_CREAT | os.O_APPEND) -> int:
    """Open (creating 0600) a file for the owner only; refuses a symlink planted there."""
    fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o600)
    if os.fstat(fd).st_mode & 0o077 and hasattr(os, "fchmod"):
        os.fchmod(fd, 0o600)
    return fd


def try_lock(path: Path) -> int | None:
    """An exclusive lock on `path` (created 0600), held until the fd is closed; None if
    another process holds it."""
    fd = open_private(path, os.O_RDWR | os.O_CREAT)
    try:
        if sys.platform == "win32":
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd
