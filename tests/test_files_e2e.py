"""Token files end to end ([files], issue 15): a real agent process against the emulator writes
every configured token as `<dir>/<profile>/<scope set>.jwt` and `.json`, replaces them
atomically on refresh, removes them on expiry, on a reload that drops the scope and at stop,
and reports a write failure in `status` while it keeps serving. Plus [files] config parsing."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mpagent import config
from mpagent.emulator import Emulator, pki
from mpagent.errors import ConfigError

from .agentproc import AgentProcess, status, wait_for
from .conftest import CLIENT_ID, PASSWORD, SCOPES, issuer_key, profile_for, run_cli, write_config

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="Unix file modes")

READ, WRITE, OWNER = SCOPES  # idporten:dcr.read, idporten:dcr.write, altinn:serviceowner
PAIR = f"{WRITE} {OWNER}"  # one scope set of two scopes
NAMES = {READ: "idporten_dcr.read", PAIR: "altinn_serviceowner,idporten_dcr.write"}
JSON_KEYS = {"access_token", "token_type", "expires_in", "scope", "expires_at"}


@pytest.fixture
def lifetime() -> int:
    """The emulator's token lifetime: long, so that no refresh lands in a test that does
    not ask for one (a test overrides it with parametrize)."""
    return 3600


@pytest.fixture
def emulator(ca: pki.Issued, lifetime: int) -> Iterator[Emulator]:
    with Emulator(
        clients={CLIENT_ID: SCOPES},
        trust=[ca.cert],
        token_lifetime=lifetime,
        signing_key=issuer_key(),
    ) as emu:
        yield emu


@pytest.fixture
def files_dir(tmp_path: Path) -> Path:
    return tmp_path / "run" / "mpagent"


def make_config(
    tmp_path: Path,
    emulator: Emulator,
    p12: Path,
    files: dict[str, Any],
    scopes: list[str],
    **top: Any,
) -> Path:
    return write_config(
        tmp_path / "config.toml",
        {"dev": profile_for(emulator, p12, scopes=scopes)},
        files=files,
        **top,
    )


@pytest.fixture
def start(
    tmp_path: Path, home: Path, p12: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """start(files={...}, scopes=[...], agent={...}): a running agent with that [files]
    table (and other top-level tables)."""
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    monkeypatch.setenv("MPAGENT_NO_AUTOSTART", "1")
    started: list[AgentProcess] = []

    def start(files: dict[str, Any], scopes: list[str] | None = None, **top: Any) -> AgentProcess:
        cfg = make_config(tmp_path, emulator, p12, files, scopes or [READ, PAIR], **top)
        proc = AgentProcess(cfg, tmp_path / f"agent{len(started)}.log").wait_ready()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def paths(base: Path, scope: str) -> tuple[Path, Path]:
    stem = base / "dev" / NAMES[scope]
    return stem.with_name(stem.name + ".jwt"), stem.with_name(stem.name + ".json")


def all_present(base: Path, scopes: list[str]) -> bool:
    return all(p.exists() for s in scopes for p in paths(base, s))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def get(scope: str) -> str:
    result = run_cli("get", *scope.split(), "--no-start")
    assert result.returncode == 0, result.stderr
    return result.stdout.removesuffix("\n")


# -- config ---------------------------------------------------------------------------------


def parse(tmp_path: Path, files: str) -> config.Config:
    path = tmp_path / "config.toml"
    body = '[profiles.dev]\nenvironment = "test"\nclient_id = "c"\nkeystore = "k.p12"\n'
    path.write_text(f"[files]\n{files}\n{body}", encoding="utf-8")
    return config.load(path)


def test_files_config_parses(tmp_path: Path) -> None:
    """[files]: dir relative to the config file, file_mode as TOML octal or a "0640" string,
    group by name or gid; without the table there are no files."""
    cfg = parse(tmp_path, 'dir = "tokens"')
    assert cfg.files == config.FilesSettings(dir=tmp_path / "tokens", file_mode=0o600)
    cfg = parse(tmp_path, 'dir = "/var/run/mpagent"\nfile_mode = 0o640\ngroup = "app"')
    assert cfg.files == config.FilesSettings(Path("/var/run/mpagent"), 0o640, "app")
    assert parse(tmp_path, 'dir = "/x"\nfile_mode = "0640"\ngroup = 1000').files.file_mode == 0o640
    assert parse(tmp_path, 'file_mode = "0600"').files == config.FilesSettings(file_mode=0o600)
    body = '[profiles.dev]\nenvironment = "test"\nclient_id = "c"\nkeystore = "k"\n'
    (tmp_path / "plain.toml").write_text(body, encoding="utf-8")
    assert config.load(tmp_path / "plain.toml").files == config.FilesSettings()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("file_mode = 0o644", r"\[files\] file_mode = 0o644 would let others read"),
        ("file_mode = 640", r"\[files\] file_mode is 640 \(decimal\); write TOML's octal"),
        ('file_mode = "rw-r-----"', r"\[files\] file_mode is 'rw-r-----'"),
        ('group = "app"', r"\[files\] group = 'app' needs file_mode = 0o640"),
        ("group = true", r"\[files\] group is True"),
        (
            'dir = "/x"\nfilemode = 1',
            r"\[files\] has unknown key 'filemode'; did you mean 'file_mode'",
        ),
    ],
)
def test_files_config_mistakes_name_file_and_key(tmp_path: Path, line: str, message: str) -> None:
    """A wrong file_mode (open to others, decimal, not a mode) or a group without 0640 is
    refused at load, the error naming the file and the [files] key."""
    with pytest.raises(ConfigError, match=message) as caught:
        parse(tmp_path, line)
    assert str(tmp_path / "config.toml") in str(caught.value)


# -- the agent ------------------------------------------------------------------------------


def test_files_appear_for_each_pinned_scope_set(start: Any, files_dir: Path) -> None:
    """Each configured scope set gets `<dir>/dev/<name>.jwt` (the token `mpagent get` gives,
    no newline) and `.json` (access_token, expires_in, expires_at, scope, token_type), 0600
    in 0700 directories; status and `mpagent status` say where and how many."""
    start({"dir": str(files_dir)})
    wait_for(lambda: all_present(files_dir, [READ, PAIR]))
    for scope in (READ, PAIR):
        jwt, doc = paths(files_dir, scope)
        raw = jwt.read_bytes()
        assert raw.count(b".") == 2 and not raw.endswith(b"\n")
        assert raw.decode() == get(scope)
        document = json.loads(doc.read_text())
        assert set(document) == JSON_KEYS and document["access_token"] == raw.decode()
        assert document["token_type"] == "Bearer" and document["expires_in"] == 3600
        assert abs(document["expires_at"] - time.time() - 3600) < 30
        assert set(document["scope"].split()) == set(scope.split())
        assert mode(jwt) == mode(doc) == 0o600
    assert mode(files_dir / "dev") == mode(files_dir) == 0o700
    assert sorted(p.name for p in (files_dir / "dev").iterdir()) == sorted(
        f"{NAMES[s]}{ext}" for s in (READ, PAIR) for ext in (".jwt", ".json")
    )
    files = status()["files"]
    assert files == {"dir": str(files_dir), "count": 2, "error": None}
    assert f"files     {files_dir}, 2 scope sets" in run_cli("status").stdout


def test_files_shared_with_the_group_of_a_set_group_id_dir(start: Any, tmp_path: Path) -> None:
    """file_mode 0o640 without a group in a set-group-ID dir (an emptyDir with fsGroup): files
    0640 of the dir's group, in a 0750 set-group-ID profile directory."""
    volume = tmp_path / "volume"
    volume.mkdir()
    gid = 4242 if os.geteuid() == 0 else os.getegid()
    os.chown(volume, -1, gid)
    os.chmod(volume, 0o2750)  # noqa: S103 -- set-group-ID; only server mode lets others write
    start({"dir": str(volume), "file_mode": 0o640})
    wait_for(lambda: all_present(volume, [READ, PAIR]))
    for path in paths(volume, READ) + paths(volume, PAIR):
        assert mode(path) == 0o640 and path.stat().st_gid == gid
    assert mode(volume / "dev") == 0o2750 and (volume / "dev").stat().st_gid == gid


# Reads argv[1] (.jwt) and argv[2] (.json) until argv[3] exists; prints "ready" after its
# first good read, then a JSON summary: reads, distinct tokens seen, and the bad reads.
READER = r"""
import json, os, re, sys
jwt, doc, stop = sys.argv[1:4]
shape = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
reads, seen, bad = 0, set(), []
while not os.path.exists(stop):
    try:
        with open(jwt) as f:
            raw = f.read()
        with open(doc) as f:
            d = json.load(f)
        ok = bool(shape.fullmatch(raw)) and bool(shape.fullmatch(d["access_token"]))
        ok = ok and isinstance(d["expires_at"], int) and d["token_type"] == "Bearer"
    except Exception as exc:
        ok, raw = False, repr(exc)
    reads += 1
    if ok:
        seen.add(raw)
        if len(seen) == 1 and reads == 1:
            print("ready", flush=True)
    else:
        bad.append(raw[:80])
print(json.dumps({"reads": reads, "tokens": len(seen), "bad": bad[:5]}), flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("lifetime", [3])
def test_reader_sees_whole_files_through_refreshes(
    start: Any, files_dir: Path, tmp_path: Path
) -> None:
    """Another process reading the .jwt and .json in a loop through several refreshes of
    3-second tokens never finds either missing, empty or cut, and sees the token change."""
    agent = start({"dir": str(files_dir)}, scopes=[READ])
    wait_for(lambda: all_present(files_dir, [READ]))
    jwt, doc = paths(files_dir, READ)
    stop = tmp_path / "stop"
    args = [sys.executable, "-c", READER, str(jwt), str(doc), str(stop)]
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True) as reader:
        assert reader.stdout is not None
        try:
            assert reader.stdout.readline() == "ready\n"
            before = status()["tokens"][0]["refreshes"]
            wait_for(lambda: status()["tokens"][0]["refreshes"] >= before + 4, timeout=20)
        finally:
            stop.touch()
        summary = json.loads(reader.stdout.readline())
    assert summary["bad"] == [], summary
    assert summary["tokens"] >= 4 and summary["reads"] > 100, summary
    wait_for(lambda: jwt.read_text() == get(READ))  # a refresh may land between the two
    assert "token files" not in agent.log()  # no failure was logged


@pytest.mark.slow
@pytest.mark.parametrize("lifetime", [3])
def test_files_vanish_when_the_token_expires_unreplaced(
    start: Any, files_dir: Path, emulator: Emulator
) -> None:
    """The issuer down: once the token expires without a new one, its files are removed,
    at its expiry and not before, while the agent keeps running."""
    start({"dir": str(files_dir)}, scopes=[READ])
    wait_for(lambda: all_present(files_dir, [READ]))
    emulator.inject("503", 10_000)
    expires_at = json.loads(paths(files_dir, READ)[1].read_text())["expires_at"]
    wait_for(lambda: not any(p.exists() for p in paths(files_dir, READ)), timeout=10)
    assert time.time() >= expires_at - 1  # removed at expiry, not before
    assert status()["files"]["count"] == 0 and status()["tokens"][0]["failures"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("lifetime", [2])
def test_restart_removes_the_expired_files_of_a_killed_agent(
    start: Any, files_dir: Path, emulator: Emulator
) -> None:
    """An agent killed with SIGKILL leaves its files; a new one, with the issuer down,
    removes them once expired before it writes anything, and leaves foreign files alone."""
    first = start({"dir": str(files_dir)}, scopes=[READ])
    wait_for(lambda: all_present(files_dir, [READ]))
    first.signal(signal.SIGKILL)
    first.stop()
    foreign = files_dir / "dev" / "notes.txt"
    foreign.write_text("mine")
    emulator.inject("503", 10_000)
    time.sleep(2.5)  # the dead agent's token has expired
    assert all_present(files_dir, [READ])
    second = start({"dir": str(files_dir)}, scopes=[READ])
    wait_for(lambda: not any(p.exists() for p in paths(files_dir, READ)))
    assert foreign.exists()
    # The line is logged once the sweep has returned: just after the files are gone.
    wait_for(lambda: "removed 2 expired token files an earlier run left" in second.log())


def test_reload_dropping_a_scope_removes_its_files(
    start: Any, files_dir: Path, tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """A reload whose config no longer lists a scope set removes that set's files and
    keeps the others."""
    start({"dir": str(files_dir)})
    wait_for(lambda: all_present(files_dir, [READ, PAIR]))
    kept = paths(files_dir, READ)[0].read_text()
    make_config(tmp_path, emulator, p12, {"dir": str(files_dir)}, [READ])
    assert run_cli("reload").returncode == 0
    wait_for(lambda: not any(p.exists() for p in paths(files_dir, PAIR)))
    assert paths(files_dir, READ)[0].read_text() == kept
    assert status()["files"]["count"] == 1


def test_reload_to_another_dir_moves_the_files(
    start: Any, files_dir: Path, tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """A reload that changes [files] dir writes the files in the new directory and removes
    them from the old one; one without [files] removes them all."""
    start({"dir": str(files_dir)})
    wait_for(lambda: all_present(files_dir, [READ, PAIR]))
    other = tmp_path / "other"
    make_config(tmp_path, emulator, p12, {"dir": str(other)}, [READ, PAIR])
    assert run_cli("reload").returncode == 0
    wait_for(lambda: all_present(other, [READ, PAIR]))  # the new ones first, then the old go
    wait_for(lambda: not list((files_dir / "dev").iterdir()))
    make_config(tmp_path, emulator, p12, {}, [READ, PAIR])
    assert run_cli("reload").returncode == 0
    wait_for(lambda: not list((other / "dev").iterdir()))
    assert status()["files"] is None


def test_stop_removes_the_agents_files(start: Any, files_dir: Path) -> None:
    """At stop the agent removes the files it wrote (as it removes the env file), and
    nothing else in the directory."""
    agent = start({"dir": str(files_dir)})
    wait_for(lambda: all_present(files_dir, [READ, PAIR]))
    foreign = files_dir / "dev" / "notes.txt"
    foreign.write_text("mine")
    assert agent.stop() == 0
    assert sorted(p.name for p in (files_dir / "dev").iterdir()) == ["notes.txt"]


def files_error() -> str | None:
    """status()["files"]["error"]; None also before the agent's first write applies the
    [files] settings (status has "files": None until then)."""
    return (status()["files"] or {}).get("error")


@pytest.mark.slow
def test_write_failure_is_reported_and_tokens_still_served(
    start: Any, files_dir: Path, tmp_path: Path
) -> None:
    """A file where the profile directory should be: status (JSON and human) names the
    failure, the agent keeps serving `get`, and once the obstacle is gone the files are
    written by the retry and the error clears."""
    files_dir.mkdir(parents=True, mode=0o700)
    obstacle = files_dir / "dev"
    obstacle.write_text("not a directory")
    agent = start({"dir": str(files_dir)})
    error = wait_for(files_error)
    assert str(obstacle) in error and "not a directory" in error
    assert "NOT WRITTEN" in run_cli("status").stdout
    assert get(READ).count(".") == 2
    assert status()["files"]["count"] == 0
    obstacle.unlink()
    wait_for(lambda: all_present(files_dir, [READ, PAIR]), timeout=15)
    assert status()["files"]["error"] is None
    assert agent.log().count("exists and is not a directory") == 1  # logged once


def test_a_dir_others_can_write_is_used_only_in_server_mode(start: Any, tmp_path: Path) -> None:
    """A 2777 `dir` (Kubernetes' emptyDir with fsGroup): a user-mode agent writes nothing and
    says why in status; an agent in server mode ([agent] mode) writes the 0640 files there
    and logs one warning."""
    volume = tmp_path / "volume"
    volume.mkdir()
    os.chmod(volume, 0o2777)  # noqa: S103 -- what kubelet makes
    agent = start({"dir": str(volume), "file_mode": 0o640})
    error = wait_for(files_error)
    assert "can be written by other users (mode 2777)" in error and "chmod go-w" in error
    assert not list(volume.iterdir())
    assert agent.stop() == 0
    server = start({"dir": str(volume), "file_mode": 0o640}, agent={"mode": "server"})
    wait_for(lambda: all_present(volume, [READ, PAIR]))
    assert status()["files"]["error"] is None
    assert mode(paths(volume, READ)[0]) == 0o640
    assert server.log().count("accepted in server mode") == 1


def test_reload_to_files_settings_that_fail_keeps_the_old_files(
    start: Any, files_dir: Path, tmp_path: Path, emulator: Emulator, p12: Path
) -> None:
    """A reload to a [files] setting that cannot work (0640 without group in a dir that is
    not set-group-ID) is in status and the log, and the files of the previous settings stay
    until it is fixed; then they move."""
    agent = start({"dir": str(files_dir)})
    wait_for(lambda: all_present(files_dir, [READ, PAIR]))
    plain = tmp_path / "plain"
    plain.mkdir(mode=0o750)
    make_config(tmp_path, emulator, p12, {"dir": str(plain), "file_mode": 0o640}, [READ, PAIR])
    reloaded = run_cli("reload")
    assert reloaded.returncode == 0
    assert "token files:" in reloaded.stderr and "without group" in reloaded.stderr
    error = wait_for(lambda: status()["files"]["error"])
    assert "without group" in error and f"files in {files_dir} are kept" in error
    wait_for(lambda: error in agent.log())  # logged as it is set: moments apart
    assert all_present(files_dir, [READ, PAIR]) and not list(plain.iterdir())
    plain.chmod(0o2750)
    wait_for(lambda: all_present(plain, [READ, PAIR]), timeout=15)
    wait_for(lambda: not list((files_dir / "dev").iterdir()))  # the old go once the new are in
