"""Files and directories no other local user can reach. Stdlib only (used by the client's
autostart path as well as the agent)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mpagent.errors import ConfigError


def ensure_private_dir(path: Path) -> None:
    """Create `path` 0700 (at mkdir time, never chmod afterwards), or accept an existing
    one only if it is ours and closed to others."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
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
    if os.fstat(fd).st_mode & 0o077:
        os.fchmod(fd, 0o600)
    return fd
