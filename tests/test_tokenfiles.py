"""Token files (mpagent/tokenfiles.py): the scope-set → file-name mapping, the `.json`
document, and the writer on real files: modes, groups, atomic replacement under a reader in
another process, and removal on expiry."""

from __future__ import annotations

import grp
import json
import os
import re
import stat
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpagent.errors import ConfigError
from mpagent.tokenfiles import (
    MAX_PART,
    TokenFiles,
    TokenFilesWriter,
    decode_part,
    encode_part,
    file_stem,
    json_document,
)
from mpagent.tokens import Token

from .reliability.test_isolation import OtherUser, other_user  # noqa: F401 - a fixture

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="Unix file modes and groups")

# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
SCOPE_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"\\')
scope_token = st.text(st.sampled_from(SCOPE_CHARS), min_size=1, max_size=40)
scope_set = st.lists(scope_token, min_size=1, max_size=4).map(lambda s: " ".join(sorted(set(s))))
any_text = st.text(min_size=1, max_size=60).filter(lambda t: "\x00" not in t)
SAFE_NAME = r"[a-z0-9.+,_-]|%[0-9A-F]{2}"


def token(scope: str = "digdir:krr", access: str = "eyJ.a.b", at: float = 1000.0) -> Token:
    return Token(access, "Bearer", scope, requested_at=at - 120, expires_at=at)


@pytest.fixture
def shm() -> Iterator[Path]:
    """A directory on tmpfs where there is one, as the pod's emptyDir (medium: Memory) is."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=base) as name:
        yield Path(name)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_documented_names() -> None:
    """The module docstring's examples: `:` → `_`, `/` → `+`, the sorted scopes joined by `,`,
    `_` and upper case percent-escaped."""
    assert file_stem("default", "digdir:krr") == "default/digdir_krr"
    assert (
        file_stem("default", "altinn:serviceowner/instances.read")
        == "default/altinn_serviceowner+instances.read"
    )
    assert (
        file_stem("default", "nav:aareg/v1/arbeidsforhold") == "default/nav_aareg+v1+arbeidsforhold"
    )
    assert (
        file_stem("default", "skatteetaten:mva digdir:krr") == "default/digdir_krr,skatteetaten_mva"
    )
    assert file_stem("Prod", "nav:im_unntak") == "%50rod/nav_im%5Funntak"


def test_scope_set_is_canonical() -> None:
    """The same scope set in any order, with repeats or extra spaces, has one file name."""
    assert file_stem("p", "b:x a:y  b:x") == file_stem("p", "a:y b:x") == "p/a_y,b_x"


def test_unsafe_edges_and_device_names_are_escaped() -> None:
    """A leading `-`, a leading or trailing `.`, `..` and Windows device names (with or
    without an extension) never appear as they are; non-ASCII is UTF-8 escaped."""
    assert encode_part("-rf") == "%2Drf"
    assert encode_part(".hidden.") == "%2Ehidden%2E"
    assert encode_part("..") == "%2E%2E"
    assert encode_part("con") == "%63on"
    assert encode_part("nul.tar") == "%6Eul.tar"
    assert encode_part("com1") == "%63om1"
    assert encode_part("console") == "console"
    assert encode_part("æ") == "%C3%A6"
    with pytest.raises(ConfigError, match="empty profile name"):
        encode_part("")


@given(any_text)
def test_any_profile_name_round_trips_to_a_safe_name(text: str) -> None:
    """Every profile name becomes a printable-ASCII name of escapes and [a-z0-9.+,_-] that is no
    device name, does not start with `-` or `.` nor end with `.`, and decodes back."""
    name = encode_part(text)
    assert re.fullmatch(f"(?:{SAFE_NAME})+(?:%%[0-9a-f]{{32}})?", name), name
    assert not name.startswith(("-", ".")) and not name.endswith(".")
    assert name.split(".")[0] not in {"con", "prn", "aux", "nul", "com1", "lpt1"}
    assert len(name) <= MAX_PART
    assert decode_part(name) == (None if "%%" in name else text)


@given(scope_set, scope_set)
def test_different_scope_sets_never_share_a_file(a: str, b: str) -> None:
    """Different scope sets get names that differ even ignoring case (macOS and Windows file
    systems), and each name decodes back to its set."""
    name_a, name_b = file_stem("p", a).split("/")[1], file_stem("p", b).split("/")[1]
    if a != b:
        assert name_a.casefold() != name_b.casefold()
    assert decode_part(name_a) == (None if "%%" in name_a else a)


def test_upper_case_never_folds_onto_lower_case() -> None:
    """`A:b` and `a:b` are different scopes, and their names differ ignoring case."""
    assert encode_part("A:b").casefold() != encode_part("a:b").casefold()


def test_long_scope_sets_get_a_hashed_name() -> None:
    """A set whose name would pass 200 characters is cut and ends in `%%` and a hash: short
    enough for any file system, different for different sets, and never decoded."""
    many = " ".join(f"nav:api{i}/read" for i in range(30))
    other = many + " nav:one/more"
    a, b = encode_part(many), encode_part(other)
    assert len(a) <= MAX_PART and "%%" in a and a != b
    assert a.startswith("nav_api0+read,nav_api1+read")
    assert decode_part(a) is None
    assert decode_part("not%%canonical") is None and decode_part("%61") is None


def test_json_document() -> None:
    """The `.json` is Maskinporten's response (expires_in as issued) plus whole-second
    expires_at, rounded down."""
    tok = Token("eyJ.a.b", "Bearer", "digdir:krr", requested_at=880.4, expires_at=1000.4)
    assert json_document(tok) == {
        "access_token": "eyJ.a.b",
        "token_type": "Bearer",
        "expires_in": 120,
        "scope": "digdir:krr",
        "expires_at": 1000,
    }


def test_write_private_by_default(shm: Path) -> None:
    """By default the files are 0600 in a 0700 profile directory (made 0700 all the way down
    when `dir` is missing), even under a permissive umask; the .jwt is the token, no newline."""
    files = TokenFiles(shm / "run" / "mpagent")
    old = os.umask(0)
    try:
        jwt, doc = files.write("default", "digdir:krr", token("digdir:krr"))
    finally:
        os.umask(old)
    assert jwt == shm / "run/mpagent/default/digdir_krr.jwt"
    assert jwt.read_bytes() == b"eyJ.a.b"
    assert json.loads(doc.read_text()) == json_document(token("digdir:krr"))
    assert mode(jwt) == mode(doc) == 0o600
    assert mode(jwt.parent) == mode(shm / "run" / "mpagent") == mode(shm / "run") == 0o700


def test_write_shared_with_a_group(shm: Path) -> None:
    """file_mode 0640 with a group: files 0640 of that group, in a 0750 set-group-ID profile
    directory of that group, even under umask 077."""
    gid = os.getegid()
    files = TokenFiles(shm / "mpagent", file_mode=0o640, group=grp.getgrgid(gid).gr_name)
    old = os.umask(0o077)
    try:
        jwt, doc = files.write("default", "digdir:krr", token())
    finally:
        os.umask(old)
    assert mode(jwt) == mode(doc) == 0o640
    assert jwt.stat().st_gid == doc.stat().st_gid == jwt.parent.stat().st_gid == gid
    assert mode(jwt.parent) == 0o2750 and mode(shm / "mpagent") == 0o2750


def test_shared_without_group_keeps_the_inherited_group(shm: Path) -> None:
    """file_mode 0640 without a group: the profile directory is 0750 and keeps a set-group-ID
    bit it inherited from `dir` (Kubernetes' fsGroup), so the files get dir's group."""
    base = shm / "volume"
    base.mkdir()
    os.chmod(base, 0o2777)  # noqa: S103 -- what an emptyDir with fsGroup looks like
    files = TokenFiles(base, file_mode=0o640, server_mode=True)  # others write: server mode
    jwt, _ = files.write("default", "digdir:krr", token())
    assert mode(jwt.parent) == 0o2750 and mode(jwt) == 0o640
    assert mode(base) == 0o2777  # a volume that is not ours is left as it is


def test_shared_without_group_or_set_group_id_is_refused(shm: Path) -> None:
    """file_mode 0640 without a group, in a dir that is not set-group-ID: the group would be
    the creator's primary one (often shared by every user), so nothing is written."""
    base = shm / "plain"
    base.mkdir(mode=0o755)
    with pytest.raises(ConfigError, match=r"without group.*set \[files\] group"):
        TokenFiles(base, file_mode=0o640).write("default", "digdir:krr", token())
    assert not (base / "default").exists()  # not left half-made


def test_files_are_named_by_the_scope_set_asked_for(shm: Path) -> None:
    """The issuer's answered scope (empty, or narrowed) never names the files: the scope set
    asked for does, so the reader finds them and remove() clears them."""
    files = TokenFiles(shm)
    jwt, _ = files.write("p", "a:x b:y", token(""))
    assert jwt == files.paths("p", "b:y a:x")[0] and jwt.read_text() == "eyJ.a.b"
    files.remove("p", "a:x b:y")
    assert not jwt.exists()


@pytest.mark.parametrize("bad", [0o644, 0o660, 0o604, 0o700, 0o200, 0o1600])
def test_file_modes_that_open_tokens_are_refused(shm: Path, bad: int) -> None:
    """A file_mode giving others any access, the group more than read, or the owner no read
    is refused naming [files] file_mode."""
    with pytest.raises(ConfigError, match=r"\[files\] file_mode = 0"):
        TokenFiles(shm, file_mode=bad)


def test_group_needs_group_read_and_an_existing_group(shm: Path) -> None:
    """A group with file_mode 0600, or a group name the system does not know, is refused
    naming [files] group."""
    with pytest.raises(ConfigError, match=r"group = 'users' needs file_mode = 0o640"):
        TokenFiles(shm, group="users")
    with pytest.raises(ConfigError, match="no group on this system"):
        TokenFiles(shm, file_mode=0o640, group="mpagent-no-such-group")


def test_group_the_agent_is_not_in_is_refused(shm: Path) -> None:
    """Sharing with a group the agent's user is not in fails with a ConfigError that says so
    (as root, which may give files to any group, the writer runs as nobody in a child)."""
    if os.geteuid() != 0:
        other = next(g.gr_gid for g in grp.getgrall() if g.gr_gid not in os.getgroups())
        with pytest.raises(ConfigError, match="you are not a member"):
            TokenFiles(shm / "files", file_mode=0o640, group=other).write(
                "p", "digdir:krr", token()
            )
        return
    nobody = 65534
    other = next(g.gr_gid for g in grp.getgrall() if g.gr_gid != nobody)
    os.chown(shm, nobody, nobody)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
        pid = os.fork()
    if pid == 0:  # the child: only os._exit leaves it
        code = 1
        try:
            os.setgroups([])
            os.setgid(nobody)
            os.setuid(nobody)
            TokenFiles(shm / "files", file_mode=0o640, group=other).write(
                "p", "digdir:krr", token()
            )
        except ConfigError as exc:
            code = 0 if "you are not a member" in str(exc) else 2
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_existing_profile_directory_must_be_closed(shm: Path) -> None:
    """A profile directory open to others, or a symlink in its place, is refused, not used."""
    (shm / "default").mkdir(mode=0o700)
    os.chmod(shm / "default", 0o777)  # noqa: S103 -- the mistake refused
    with pytest.raises(ConfigError, match="chmod 700"):
        TokenFiles(shm).write("default", "digdir:krr", token())
    with pytest.raises(ConfigError, match="chmod 750"):
        TokenFiles(shm, file_mode=0o640).write("default", "digdir:krr", token())
    (shm / "elsewhere").mkdir()
    (shm / "linked").symlink_to(shm / "elsewhere")
    for file_mode in (0o600, 0o640):
        with pytest.raises(ConfigError, match="not a directory"):
            TokenFiles(shm, file_mode=file_mode).write("linked", "digdir:krr", token())
    assert not list((shm / "elsewhere").iterdir())


def test_rewrite_replaces_and_clears_leftovers(shm: Path) -> None:
    """A refresh replaces both files (new inode, new content) and removes the temporary files
    a writer killed mid-write left for them."""
    files = TokenFiles(shm)
    jwt, doc = files.write("p", "digdir:krr", token(access="first"))
    leftover = jwt.parent / f".{jwt.name}.abc123.tmp"
    leftover.write_text("half a tok")
    inode = jwt.stat().st_ino
    files.write("p", "digdir:krr", token(access="second", at=2000))
    assert jwt.read_text() == "second" and json.loads(doc.read_text())["expires_at"] == 2000
    assert jwt.stat().st_ino != inode and not leftover.exists()


# Reads argv[1] (.jwt) and argv[2] (.json) until argv[3] exists; prints "ready" once it has
# read both, then a JSON summary: reads, distinct versions seen, and every bad read.
READER = r"""
import json, os, sys
jwt, doc, stop = sys.argv[1:4]
def check(text, version):
    head, _, rest = text.partition(".")
    body, _, tail = rest.rpartition(".")
    ok = head == tail and head.isdigit() and body == "x" * (1000 + int(head) * 7919 % 60000)
    return ok and (version is None or int(head) == version)
reads, seen, bad = 0, set(), []
while not os.path.exists(stop):
    if len(seen) >= 10 and reads > 200 and not os.path.exists(stop + ".enough"):
        open(stop + ".enough", "w").close()
    try:
        with open(jwt) as f:
            raw = f.read()
        with open(doc) as f:
            d = json.load(f)
        ok = check(raw, None) and check(d["access_token"], d["expires_at"] - 10**9)
    except Exception as exc:
        ok, raw = False, repr(exc)
    reads += 1
    if not ok:
        bad.append(raw[:80])
    else:
        seen.add(raw.partition(".")[0])
    if reads == 1:
        print("ready", flush=True)
print(json.dumps({"reads": reads, "versions": len(seen), "bad": bad[:5]}), flush=True)
"""


def numbered(i: int) -> Token:
    """Version `i`: a token of a length of its own that says its version at both ends."""
    access = f"{i}.{'x' * (1000 + i * 7919 % 60000)}.{i}"
    return Token(access, "Bearer", "digdir:krr", requested_at=10**9 + i - 120, expires_at=10**9 + i)


def test_reader_never_sees_a_partial_file(shm: Path) -> None:
    """A reader in another process, reading both files in a loop through rewrites (at least
    200, and on until it has seen 10 versions: a loaded machine may starve it), always finds
    whole, matching files (never missing, empty or cut)."""
    files = TokenFiles(shm / "files")
    jwt, doc = files.write("default", "digdir:krr", numbered(0))
    stop = shm / "stop"
    args = [sys.executable, "-c", READER, str(jwt), str(doc), str(stop)]
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True) as reader:
        assert reader.stdout is not None
        try:
            assert reader.stdout.readline() == "ready\n"
            enough = stop.with_name("stop.enough")
            for i in range(1, 20_001):
                files.write("default", "digdir:krr", numbered(i))
                if i >= 200 and enough.exists():
                    break
        finally:
            stop.touch()
        summary = json.loads(reader.stdout.readline())
    assert summary["bad"] == [], summary
    assert summary["versions"] >= 10 and summary["reads"] > 200, summary


def test_expired_files_are_removed(shm: Path) -> None:
    """remove_expired removes a token's files once `now` reaches its expiry and keeps the
    others, and returns what it removed."""
    files = TokenFiles(shm)
    early, _ = files.write("a", "x:early", token("x:early", at=1000))
    late, _ = files.write("b", "x:late", token("x:late", at=2000))
    assert files.remove_expired(999.9) == []
    assert files.remove_expired(1000) == [early, early.with_suffix(".json")]
    assert not early.exists() and not early.with_suffix(".json").exists()
    assert late.exists() and late.with_suffix(".json").exists()


def test_files_of_an_earlier_run_are_removed(shm: Path) -> None:
    """A new writer (the agent restarted) removes the expired files the last one left, and a
    .jwt no .json vouches for, but nothing it did not name."""
    TokenFiles(shm).write("default", "x:old", token("x:old", at=1000))
    profile = shm / "default"
    orphan = profile / "x_orphan.jwt"
    orphan.write_text("tok")
    (shm / "Other").mkdir()
    foreign = [profile / "notes.txt", profile / "README.JSON", profile / "x_bad.json"]
    foreign += [shm / "n.jwt", shm / "Other" / "x_y.jwt"]
    for path in foreign:
        path.write_text("{not json")
    removed = TokenFiles(shm).remove_expired(1500)
    assert sorted(removed) == sorted([profile / "x_old.jwt", profile / "x_old.json", orphan])
    assert all(path.exists() for path in foreign)


def test_remove(shm: Path) -> None:
    """remove deletes a scope set's two files, named by the set in any order; twice is fine."""
    files = TokenFiles(shm)
    jwt, doc = files.write("p", "a:x b:y", token("a:x b:y"))
    files.remove("p", "b:y a:x")
    files.remove("p", "b:y a:x")
    assert not jwt.exists() and not doc.exists()


def test_writer_keeps_files_in_step_with_the_tokens(shm: Path) -> None:
    """The agent's writer: a new or replaced token is written, an unchanged one not again,
    one no longer held (expired, or its scope gone from the config) removed; a new dir
    gets the files and the old loses them; close() removes everything it wrote."""
    writer, a, b = TokenFilesWriter(), ("p", "a:x"), ("p", "b:y")
    first = token("a:x", access="first", at=2000)
    assert writer.sync(shm / "one", 0o600, None, {a: first, b: token("b:y")}, now=900)
    jwt_a, jwt_b = TokenFiles(shm / "one").paths(*a)[0], TokenFiles(shm / "one").paths(*b)[0]
    inode = jwt_a.stat().st_ino
    assert writer.sync(shm / "one", 0o600, None, {a: first}, now=901)
    assert jwt_a.stat().st_ino == inode and not jwt_b.exists()
    assert writer.sync(shm / "one", 0o600, None, {a: token("a:x", access="second")}, 902)
    assert jwt_a.read_text() == "second"
    assert writer.sync(shm / "two", 0o600, None, {a: first}, now=903)
    assert not jwt_a.exists() and (shm / "two" / "p" / "a_x.jwt").read_text() == "first"
    assert writer.status() == {"dir": str(shm / "two"), "count": 1, "error": None}
    writer.close()
    assert not list((shm / "two" / "p").iterdir()) and writer.status() == {
        "dir": str(shm / "two"), "count": 0, "error": None
    }  # fmt: skip


def test_writer_sweeps_an_earlier_runs_expired_files_first(shm: Path) -> None:
    """Before its first write the writer removes the expired files an earlier run left
    (and later ones as they expire), but never a file of a token it holds."""
    TokenFiles(shm).write("p", "old:x", token("old:x", at=1000))
    TokenFiles(shm).write("p", "late:x", token("late:x", at=1500))
    writer, held = TokenFilesWriter(), {("p", "a:x"): token("a:x", at=1200.5)}
    assert writer.sync(shm, 0o600, None, held, now=1100)
    assert sorted(p.name for p in (shm / "p").iterdir()) == [
        "a_x.json", "a_x.jwt", "late_x.json", "late_x.jwt"
    ]  # fmt: skip
    assert writer.sync(shm, 0o600, None, held, now=1200.4)
    assert (shm / "p" / "a_x.jwt").exists()  # its .json says 1200, but it holds until 1200.5
    assert writer.sync(shm, 0o600, None, {}, now=1600)
    assert not list((shm / "p").iterdir())


def test_writer_failure_is_logged_once_per_kind_and_shown(
    shm: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A write that fails (a file where the profile directory goes) returns False, is in
    status, is logged once however often it is retried, and clears once the files are
    written; a group that does not exist is a setup error the same way."""
    (shm / "p").write_text("in the way")
    writer, wanted = TokenFilesWriter(), {("p", "a:x"): token("a:x")}
    for _ in range(3):
        assert not writer.sync(shm, 0o600, None, wanted, now=900)
    error = (writer.status() or {})["error"]
    assert str(shm / "p") in error and "not a directory" in error
    assert [r.getMessage() for r in caplog.records].count(error) == 1
    (shm / "p").unlink()
    assert writer.sync(shm, 0o600, None, wanted, now=900)
    assert writer.status() == {"dir": str(shm), "count": 1, "error": None}
    assert not writer.sync(shm, 0o640, "mpagent-no-such-group", wanted, now=900)
    assert "no group on this system" in (writer.status() or {})["error"]


# -- the `dir` itself (A2): nobody else may swap what readers read -------------------------


def test_dir_of_another_user_is_refused_even_in_server_mode(
    shm: Path,
    other_user: OtherUser,  # noqa: F811
) -> None:
    """A `dir` owned by a real second user (not root) is refused in both modes, naming the
    uid and [files] dir, and nothing is written in it."""
    theirs = shm / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, other_user.uid, other_user.gid)
    for server_mode in (False, True):
        files = TokenFiles(theirs, server_mode=server_mode)
        with pytest.raises(ConfigError, match=rf"\[files\] dir .* belongs to uid {other_user.uid}"):
            files.write("default", "digdir:krr", token())
        with pytest.raises(ConfigError, match="belongs to uid"):
            files.remove_expired(2000)
    assert not list(theirs.iterdir())


def test_profile_dir_planted_by_another_user_is_refused(
    shm: Path,
    other_user: OtherUser,  # noqa: F811
) -> None:
    """In a sticky `dir` (accepted, like /tmp) a profile directory a real second user made
    first is refused with a hint naming [files] dir (not the socket's XDG_RUNTIME_DIR)."""
    shm.chmod(0o711)  # the other user may pass through to the sticky dir
    shared = shm / "sticky"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # noqa: S103 -- sticky: others cannot rename what is ours
    planted = other_user.run(
        "os.mkdir(sys.argv[1], 0o755); print(json.dumps(os.stat(sys.argv[1]).st_uid))",
        str(shared / "default"),
    )
    assert planted == other_user.uid
    for file_mode in (0o600, 0o640):
        with pytest.raises(ConfigError, match=r"uid \d+, not to you; .*\[files\] dir") as info:
            TokenFiles(shared, file_mode=file_mode).write("default", "digdir:krr", token())
        assert "XDG_RUNTIME_DIR" not in str(info.value)
    jwt, _ = TokenFiles(shared).write("mine", "digdir:krr", token())
    assert jwt.read_text() == "eyJ.a.b"  # a sticky dir of root's or ours is fine


@pytest.mark.parametrize("dir_mode", [0o777, 0o2777, 0o770, 0o757])
def test_dir_others_can_write_is_refused_unless_server_mode(
    shm: Path, dir_mode: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A `dir` writable by group or others without the sticky bit is refused outside server
    mode (saying chmod go-w); in server mode (a pod's emptyDir) it is used, with one warning
    however often the files are written."""
    base = shm / "volume"
    base.mkdir()
    os.chmod(base, dir_mode)
    with pytest.raises(
        ConfigError, match=rf"can be written by other users \(mode {dir_mode:04o}\).*chmod go-w"
    ):
        TokenFiles(base).write("default", "digdir:krr", token())
    assert not list(base.iterdir())
    files = TokenFiles(base, server_mode=True)
    for _ in range(3):
        jwt, _ = files.write("default", "digdir:krr", token())
    assert jwt.read_text() == "eyJ.a.b" and mode(jwt.parent) & 0o777 == 0o700
    warnings_ = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings_) == 1 and "accepted in server mode" in warnings_[0].getMessage()


def test_symlinked_dir_is_refused(shm: Path) -> None:
    """A `dir` that is a symlink is refused in both modes (whoever can change the link
    chooses what readers read), by the writer and the expiry sweep; the target is untouched."""
    real = shm / "real"
    real.mkdir(mode=0o700)
    (shm / "link").symlink_to(real)
    for server_mode in (False, True):
        files = TokenFiles(shm / "link", server_mode=server_mode)
        with pytest.raises(ConfigError, match=r"\[files\] dir .*link is a symlink"):
            files.write("default", "digdir:krr", token())
        with pytest.raises(ConfigError, match="is a symlink"):
            files.remove_expired(2000)
    assert not list(real.iterdir())
    writer = TokenFilesWriter(server_mode=True)
    assert not writer.sync(shm / "link", 0o600, None, {("p", "a:x"): token("a:x")}, now=900)
    assert "is a symlink" in (writer.problem([("p", "a:x")]) or "")


# -- settings that fail on a reload (B3), /healthz's question, close (A3) -----------------


def test_writer_keeps_the_previous_files_while_new_settings_fail(shm: Path) -> None:
    """New settings that cannot work (0640 without group in a dir that is not set-group-ID)
    fail, say the previous files are kept, and the previous dir's files stay and stay
    current; once the new settings work, the files move there and the old ones go."""
    old, new = shm / "old", shm / "new"
    new.mkdir(mode=0o750)
    writer, a = TokenFilesWriter(), ("p", "a:x")
    assert writer.sync(old, 0o600, None, {a: token("a:x", access="first")}, now=900)
    assert not writer.sync(new, 0o640, None, {a: token("a:x", access="second")}, now=901)
    error = (writer.status() or {})["error"]
    assert "without group" in error and f"the files in {old} are kept until this is fixed" in error
    assert (old / "p" / "a_x.jwt").read_text() == "second"
    assert writer.problem([a]) == f"token files: {error}"
    os.chmod(new, 0o2750)  # noqa: S103 -- the group reads, nobody else writes
    assert writer.sync(new, 0o640, None, {a: token("a:x", access="third")}, now=902)
    assert (new / "p" / "a_x.jwt").read_text() == "third" and not (old / "p" / "a_x.jwt").exists()
    assert writer.problem([a]) is None
    assert writer.status() == {"dir": str(new), "count": 1, "error": None}


def test_problem_names_held_sets_without_files(shm: Path) -> None:
    """problem(): None once every held set has files; a held set not written yet is named;
    a failure is the failure."""
    writer, a, b = TokenFilesWriter(), ("p", "a:x"), ("p", "b:y")
    assert writer.sync(shm, 0o600, None, {a: token("a:x")}, now=900)
    assert writer.problem([a]) is None
    assert writer.problem([a, b]) == "token files not written yet for p 'b:y'"
    (shm / "q").write_text("in the way")
    assert not writer.sync(shm, 0o600, None, {("q", "c:z"): token("c:z")}, now=900)
    assert "not a directory" in (writer.problem([("q", "c:z")]) or "")


def test_close_removes_the_files_and_a_later_sync_writes_nothing(shm: Path) -> None:
    """close() from another thread than sync's removes what was written, and a sync that
    was still queued (a slow reload ahead of it) then writes nothing."""
    import threading

    writer, a = TokenFilesWriter(), ("p", "a:x")
    assert writer.sync(shm, 0o600, None, {a: token("a:x")}, now=900)
    closer = threading.Thread(target=writer.close)
    closer.start()
    closer.join(5)
    assert not closer.is_alive() and not list((shm / "p").iterdir())
    assert writer.sync(shm, 0o600, None, {a: token("a:x"), ("p", "b:y"): token("b:y")}, 901)
    assert not list((shm / "p").iterdir())
