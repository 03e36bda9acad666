"""Files and directories no other local user can reach: private directories, atomic 0600
writes, private reads and locks. The one place mpagent's file safety lives. Stdlib only (used
by the client's autostart path as well as the agent)."""

from __future__ import annotations

import errno
import glob
import os
import stat
import sys
import tempfile
import time
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


TEMP_SUFFIX = ".tmp"


def write_atomic(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    """Readers see the old file or the new one, never a partial one; `mode` (0600 unless
    asked otherwise) whatever the umask or the old file's mode, and never more open than
    0600 before the content is complete. A symlink at `path` is replaced, not followed."""
    content = data.encode("utf-8") if isinstance(data, str) else data
    # mkstemp: a random name (a killed writer's leftover cannot block us, even with our
    # pid), O_EXCL, O_NOFOLLOW, created 0600 (less only under a umask that strips the owner).
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(content)
            f.flush()
            if hasattr(os, "fchmod"):  # the umask cannot take the owner's rights away either
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd != -1:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_new(path: Path, data: bytes) -> None:
    """A file that did not exist, 0600 from the start: FileExistsError if anything is at
    `path` (a symlink included, which is not followed); removed again if the write fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if fd != -1:
            os.close(fd)
        path.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_leftovers(path: Path) -> None:
    """Temp files of a `write_atomic` to `path` that was killed mid-write: they may hold
    tokens, so remove them. Only for a single writer (the agent, under its lock)."""
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*{TEMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable; where directories cannot be opened (Windows),
    the rename is all there is."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def lock(path: Path, deadline: float) -> int | None:
    """The lock `try_lock` takes, waiting for its holder to let go until `time.monotonic()`
    passes `deadline`; None then."""
    while True:
        fd = try_lock(path)
        if fd is not None or time.monotonic() > deadline:
            return fd
        time.sleep(0.02)


MAX_FILE = 1024 * 1024  # a config or keystore is a few KiB; 1 MiB is far beyond any real one


def read_regular(path: Path, limit: int = MAX_FILE, *, private: bool = False) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. Opened non-blocking, so a FIFO
    cannot wedge the reader, and checked once open (symlinks are followed: dotfile managers
    link configs), so a link to /dev/zero or a device is refused instead of read until memory
    runs out. Raises FileNotFoundError, or OSError whose strerror says what is wrong.
    `private` (a secret of ours): a symlink is refused (ELOOP), and a file that is not a
    regular one of ours closed to others raises ConfigError (Windows: the profile's ACLs)."""
    nofollow = getattr(os, "O_NOFOLLOW", 0) if private else 0
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | nofollow)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if private and sys.platform != "win32":
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                mode = stat.S_IMODE(st.st_mode)
                raise ConfigError(f"{path} is not a private file of yours (mode {mode:o})")
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
