"""The env file: names, content, and the atomic private write."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mpagent import envfile


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
    envfile.write_atomic(path, envfile.render([("TOK", "ab.cd-_==", 5)]))
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
        envfile.write_atomic(path, "new\n")
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
        envfile.write_atomic(path, 12345)  # type: ignore[arg-type]  # not a str: write fails
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["t.env"]


def test_reader_never_sees_partial_file(tmp_path: Path) -> None:
    """A reader looping while the file is rewritten sees only whole versions."""
    path = tmp_path / "t.env"
    versions = [envfile.render([("T", f"v{i}" * 2000, i)]) for i in range(3)]
    envfile.write_atomic(path, versions[0])
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
            envfile.write_atomic(path, v)
    assert reader.returncode == 0


def test_leftover_temp_file_does_not_block_writes(tmp_path: Path) -> None:
    """A killed writer's temp file (even one named with our pid) neither blocks the next
    write nor survives remove_leftovers, since it holds tokens."""
    path = tmp_path / "t.env"
    leftover = tmp_path / f".t.env.{os.getpid()}.tmp"
    leftover.write_text("T=half-written")
    envfile.write_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    envfile.remove_leftovers(path)
    assert [p.name for p in tmp_path.iterdir()] == ["t.env"]


def test_private_dir_ancestors_are_private_under_umask_000(tmp_path: Path) -> None:
    """Missing ancestors of a private directory are created 0700 too, whatever the umask."""
    from mpagent.private import ensure_private_dir

    target = tmp_path / "a" / "b" / "run"
    old = os.umask(0)
    try:
        ensure_private_dir(target)
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
