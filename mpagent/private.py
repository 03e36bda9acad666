"""Files and directories no other local user can reach. Stdlib only (used by the client's
autostart path as well as the agent)."""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

from mpagent.errors import ConfigError


def ensure_private_dir(path: Path) -> None:
    """Create `path` 0700 (at mkdir time, never chmod afterwards), or accept an existing
    one only if it is ours and closed to others. On Windows the per-user profile
    directories are already closed to other users by their ACLs."""
    if sys.platform == "win32":
        path.mkdir(parents=True, exist_ok=True)
        return
    # mkdir(parents=True) would create missing ancestors with the umask's mode; make each 0700.
    # One that appears meanwhile may be another mpagent's, or another user's: check it too.
    for ancestor in [*reversed([p for p in path.parents if not p.exists()]), path]:
        try:
            ancestor.mkdir(mode=0o700)
        except FileExistsError:
            _check_private(ancestor, closed=0o077 if ancestor == path else 0o022)


def _check_private(path: Path, closed: int) -> None:
    """`path` must be a directory of ours (not a symlink) with none of the `closed` bits."""
    st = path.lstat()
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} exists and is not a directory; remove it")
    if st.st_uid != os.getuid():
        raise ConfigError(
            f"{path} belongs to uid {st.st_uid} (mode {mode:04o}), not to you; remove it, or "
            "set XDG_RUNTIME_DIR (or MPAGENT_SOCKET) to a directory of yours"
        )
    if mode & closed:
        raise ConfigError(
            f"{path} is open to other users (mode {mode:04o}); run `chmod 700 {path}` or remove it"
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


MAX_FILE = 1024 * 1024  # a config or keystore is a few KiB; 1 MiB is far beyond any real one


def read_regular(path: Path, limit: int = MAX_FILE) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. Opened non-blocking, so a FIFO
    cannot wedge the reader, and checked once open (symlinks are followed: dotfile managers
    link configs), so a link to /dev/zero or a device is refused instead of read until memory
    runs out. Raises FileNotFoundError, or OSError whose strerror says what is wrong."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"not a regular file but {_kind(st.st_mode)}")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit // 1024} KiB, which no real one is")
    return data


def _kind(mode: int) -> str:
    kinds = [(stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device")]
    kinds += [(stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")]
    kinds += [(stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a file")
