"""The env file (names, content) and private.py, the file-safety module it is written with:
atomic 0600 writes, private reads, private directories, locks."""

from __future__ import annotations

import errno
import os
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mpagent import envfile, private
from mpagent.errors import ConfigError

# Takes the lock on argv[1], prints a line once it holds it, and holds it until stdin closes.
HOLD_LOCK = (
    "import sys; from pathlib import Path; from mpagent.private import try_lock\n"
    "assert try_lock(Path(sys.argv[1])) is not None\nprint(flush=True)\nsys.stdin.read()"
)


def test_variable_names() -> None:
    """A token is MASKINPORTEN_TOKEN_<PROFILE>_<SCOPES> (upper-case, runs of other characters
    as _); the default profile's also has the short MASKINPORTEN_TOKEN_<SCOPES>; env_names
    replaces both."""
    names = envfile.variable_names
    assert names("test", "idporten:dcr.read", {}, short=False) == (
        "MASKINPORTEN_TOKEN_TEST_IDPORTEN_DCR_READ",
    )
    assert names("my-prod", "a:b c/d", {}, short=True) == (
        "MASKINPORTEN_TOKEN_MY_PROD_A_B_C_D",
        "MASKINPORTEN_TOKEN_A_B_C_D",
    )
    assert names("test", "idporten:dcr.read", {"idporten:dcr.read": "DCR"}, short=True) == ("DCR",)


def test_render_is_sorted_and_plain() -> None:
    """KEY=value lines, no quotes or export, sorted, each token with its _EXPIRES_AT."""
    text = envfile.render([("B", "tok.b", 20.9), ("A", "tok.a==", 10.0)])
    assert text.splitlines()[1:] == ["A=tok.a==", "A_EXPIRES_AT=10", "B=tok.b", "B_EXPIRES_AT=20"]
    assert text.startswith("#") and text.endswith("\n")


def test_shell_reads_it(tmp_path: Path) -> None:
    """`set -a; . FILE` gives the exact token, '=' padding included."""
    path = tmp_path / "t.env"
    private.write_atomic(path, envfile.render([("TOK", "ab.cd-_==", 5)]))
    out = subprocess.run(
        ["sh", "-c", f'set -a; . "{path}"; printf %s "$TOK"'], capture_output=True, text=True
    )
    assert out.stdout == "ab.cd-_=="


def test_write_is_0600_under_umask_000_and_replaces_open_file(tmp_path: Path) -> None:
    """Whatever the umask or the old file's mode, the new file is 0600 and complete."""
    path = tmp_path / "t.env"
    path.write_text("old\n")
    os.chmod(path, 0o644)
    old = os.umask(0)
    try:
        private.write_atomic(path, "new\n")
    finally:
        os.umask(old)
    assert path.read_text() == "new\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["t.env"]  # no temp file left


def test_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    """A write that fails half-way leaves the old file untouched and no temp file behind."""
    path = tmp_path / "t.env"
    path.write_text("old\n")
    with pytest.raises(TypeError):
        private.write_atomic(path, 12345)  # type: ignore[arg-type]  # not bytes or str
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["t.env"]


def test_reader_never_sees_partial_file(tmp_path: Path) -> None:
    """A reader looping while the file is rewritten sees only whole versions."""
    path = tmp_path / "t.env"
    versions = [envfile.render([("T", f"v{i}" * 2000, i)]) for i in range(3)]
    private.write_atomic(path, versions[0])
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nok=set(sys.argv[2:])\nfor _ in range(3000):\n"
            "    t=open(sys.argv[1]).read()\n    assert t in ok, len(t)\n",
            str(path),
            *versions,
        ]
    )
    while reader.poll() is None:
        for v in versions:
            private.write_atomic(path, v)
    assert reader.returncode == 0


def test_leftover_temp_file_does_not_block_writes(tmp_path: Path) -> None:
    """A killed writer's temp file (even one named with our pid) neither blocks the next
    write nor survives remove_leftovers, since it holds tokens."""
    path = tmp_path / "t.env"
    leftover = tmp_path / f".t.env.{os.getpid()}.tmp"
    leftover.write_text("T=half-written")
    private.write_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    private.remove_leftovers(path)
    assert [p.name for p in tmp_path.iterdir()] == ["t.env"]


def test_private_dir_ancestors_are_private_under_umask_000(tmp_path: Path) -> None:
    """Missing ancestors of a private directory are created 0700 too, whatever the umask."""
    target = tmp_path / "a" / "b" / "run"
    old = os.umask(0)
    try:
        private.ensure_private_dir(target)
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_write_takes_bytes_and_a_mode(tmp_path: Path) -> None:
    """Bytes are written as they are; `mode` sets the new file's mode whatever the umask."""
    path = tmp_path / "unit"
    old = os.umask(0o077)
    try:
        private.write_atomic(path, b"\x00\xffdata", mode=0o644)
    finally:
        os.umask(old)
    assert path.read_bytes() == b"\x00\xffdata"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_failed_rename_leaves_no_temp_file(tmp_path: Path) -> None:
    """When the final rename fails (a directory is in the way), the error is raised and the
    temp file, which held the content, is gone."""
    (tmp_path / "t.env").mkdir()
    with pytest.raises(IsADirectoryError):
        private.write_atomic(tmp_path / "t.env", "T=secret\n")
    assert [p.name for p in tmp_path.iterdir()] == ["t.env"]


def test_write_replaces_a_symlink_instead_of_following_it(tmp_path: Path) -> None:
    """A symlink planted at the target is replaced by the new file; the file it points to
    keeps its content."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("not yours to overwrite\n")
    path = tmp_path / "t.env"
    path.symlink_to(elsewhere)
    private.write_atomic(path, "T=secret\n")
    assert not path.is_symlink() and path.read_text() == "T=secret\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert elsewhere.read_text() == "not yours to overwrite\n"


def test_write_new_never_replaces_anything(tmp_path: Path) -> None:
    """write_new creates a 0600 file, and refuses an existing file or a symlink (even a
    dangling one) without touching what it points to."""
    path = tmp_path / "k.p12"
    private.write_new(path, b"key")
    assert path.read_bytes() == b"key" and stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        private.write_new(path, b"other")
    link = tmp_path / "link.p12"
    link.symlink_to(tmp_path / "target")
    with pytest.raises(FileExistsError):
        private.write_new(link, b"other")
    assert path.read_bytes() == b"key" and not (tmp_path / "target").exists()


def test_private_read_refuses_what_others_could_read_or_replace(tmp_path: Path) -> None:
    """read_regular(private=True) reads a 0600 file of ours; refuses a symlink (ELOOP), and
    a file open to others or not regular with a message naming it and its mode."""
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    assert private.read_regular(secret, private=True) == b"s3cret\n"
    link = tmp_path / "link"
    link.symlink_to(secret)
    assert private.read_regular(link) == b"s3cret\n"  # not private: links are followed
    with pytest.raises(OSError) as raised:
        private.read_regular(link, private=True)
    assert raised.value.errno == errno.ELOOP
    secret.chmod(0o640)
    with pytest.raises(
        ConfigError, match=re.escape(f"{secret} is not a private file of yours (mode 640)")
    ):
        private.read_regular(secret, private=True)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError, match=re.escape("not a private file of yours (mode 600)")):
        private.read_regular(fifo, private=True)


@pytest.mark.skipif(os.getuid() != 0, reason="only root can give a file to another user")
def test_private_read_refuses_another_users_file(tmp_path: Path) -> None:
    """A 0600 file that belongs to another uid is not ours: refused with its path."""
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    os.chown(secret, 4242, 4242)
    with pytest.raises(ConfigError, match=re.escape(f"{secret} is not a private file of yours")):
        private.read_regular(secret, private=True)


def test_lock_waits_for_its_holder_and_gives_up_at_the_deadline(tmp_path: Path) -> None:
    """lock() returns None once the deadline passes while another process holds the lock,
    and the lock itself as soon as that process exits."""
    path = tmp_path / "agent.lock"
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as holder:
        assert holder.stdout is not None and holder.stdin is not None
        holder.stdout.readline()  # it holds the lock now
        started = time.monotonic()
        assert private.lock(path, started + 0.3) is None
        assert 0.3 <= time.monotonic() - started < 2
        threading.Timer(0.2, holder.stdin.close).start()  # it exits, letting go
        fd = private.lock(path, time.monotonic() + 10)
        assert fd is not None
        os.close(fd)


def test_unexpired_drops_a_token_whose_expiry_is_not_ascii_digits() -> None:
    """'²' passes str.isdigit() but not int(): the token is treated as expired, no ValueError."""
    content = "A=tok\nA_EXPIRES_AT=²\nB=kept\nB_EXPIRES_AT=2000\n# note\n"
    assert envfile.unexpired(content, now=1000) == "B=kept\nB_EXPIRES_AT=2000\n# note\n"
