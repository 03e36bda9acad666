"""Own keys end to end: `mpagent keys rotate` (under load, killed after each step, dry run),
the agent's key watch and auto_renew, `status` and `doctor` showing the registered keys, and
MP-121's hint. The emulator's admin API over real HTTP, a real agent, the real CLI as
subprocesses, keys generated at run time."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mpagent import client, paths, rotation
from mpagent import config as config_module
from mpagent.emulator import Emulator, pki
from mpagent.errors import ConfigError, MpagentError
from mpagent.exchange import open_exchange
from mpagent.keys.generate import create_key, public_jwk
from mpagent.private import ensure_private_dir, read_regular, try_lock

from .agentproc import AgentProcess, status, wait_for
from .conftest import PASSWORD, run_cli

ADMIN_ID = "0b5e2d1c-admin-4c5d-9e8f-000000000001"
APP_ID = "7c1f3a2b-app-4c5d-9e8f-000000000002"
CERT_ID = "5d3e1f0a-cert-4c5d-9e8f-000000000003"  # a certificate client that is no admin
ADMIN_SCOPES = ("idporten:dcr.read", "idporten:dcr.write")
APP_SCOPE = "altinn:serviceowner"
OLD_KID = "app-old-key"
TOKEN_LIFETIME = 4
ENV = {"MPAGENT_KEYSTORE_PASSWORD": PASSWORD, "MPAGENT_NO_AUTOSTART": "1"}
GRACE_1 = ("--grace", "1")
STEP_WORDS = ("generated", "registered", "verified", "switched", "grace", "removed")

CONFIG = """\
# mpagent configuration, written by hand: its comments must survive a rotation
default_profile = "app"

[agent]
log_level = "debug"

# the client with the business certificate, which may manage the app's keys
[profiles.admin]
environment = "{issuer}"
client_id = "{admin_id}"
scopes = ["idporten:dcr.read"]
keystore = "{p12}"
admin_api = "{admin_api}"

[profiles.app]
environment = "{issuer}"  # the emulator
client_id = "{app_id}"
scopes = ["{scope}"]
# the app's own key, registered earlier
keystore = "{old}"
kid = "{old_kid}"
admin_profile = "admin"
admin_api = "{admin_api}"
{extra}
# the end
"""


@pytest.fixture(scope="session")
def signing_key() -> rsa.RSAPrivateKey:
    """The emulator's token-signing key, made once (RSA key generation is slow)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def emulator_options() -> dict[str, Any]:
    """Overridden by a test's parametrize: the emulator's admin API timing."""
    return {"propagation": 3.0}


@pytest.fixture
def emu(
    ca: pki.Issued, signing_key: rsa.RSAPrivateKey, emulator_options: dict[str, Any]
) -> Iterator[Emulator]:
    clients = {ADMIN_ID: ADMIN_SCOPES, APP_ID: [APP_SCOPE], CERT_ID: [APP_SCOPE]}
    with Emulator(
        clients=clients,
        trust=[ca.cert],
        lifetimes={APP_ID: TOKEN_LIFETIME},
        signing_key=signing_key,
        hang_seconds=3,
        **emulator_options,
    ) as emulator:
        yield emulator


@pytest.fixture
def old_key(tmp_path: Path, home: Path, emu: Emulator) -> Path:
    """The app's current key: a PEM made here, registered (effective at once)."""
    path, jwk = create_key(tmp_path / "old.pem", OLD_KID)
    emu.register_keys(APP_ID, [jwk])
    return path


@pytest.fixture
def extra() -> str:
    """Overridden by a test's parametrize: more lines for [profiles.app]."""
    return ""


@pytest.fixture
def config(
    tmp_path: Path,
    emu: Emulator,
    p12: Path,
    old_key: Path,
    extra: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    """The config (app signs with its own kid, admin with the certificate), and ENV set
    for this process too (after `home` cleared MPAGENT_*)."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "config.toml"
    path.write_text(
        CONFIG.format(
            issuer=emu.issuer,
            admin_id=ADMIN_ID,
            app_id=APP_ID,
            scope=APP_SCOPE,
            p12=p12,
            old=old_key,
            old_kid=OLD_KID,
            admin_api=emu.admin_api,
            extra=extra,
        ),
        encoding="utf-8",
    )
    return path


def kids(emu: Emulator) -> list[str]:
    return [k["kid"] for k in emu.client_keys(APP_ID)["keys"]]


def profile_settings(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text(encoding="utf-8"))["profiles"]["app"]


def usable(path: Path) -> str:
    """A token for the app, signed in this process with whatever key config.toml names now."""
    cfg = config_module.load(path)
    token = open_exchange(cfg, cfg.profile("app")).fetch([APP_SCOPE])
    return token.access_token


def rotate_cli(path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_cli("--config", str(path), "keys", "rotate", *args, env=ENV, timeout=timeout)


def state_files() -> list[Path]:
    return list((Path(paths.state_dir()) / "rotate").glob("*.json"))


def assert_comments_kept(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    for comment in (
        "# mpagent configuration, written by hand",
        "# the client with the business certificate",
        'environment = "{}"  # the emulator'.format(profile_settings(path)["environment"]),
        "# the app's own key, registered earlier",
        "# the end",
    ):
        assert comment in text


class GetLoop:
    """Clients calling `get` on the agent's socket in a loop, as scripts do, recording every
    failure; one of them runs the real `mpagent get` as a subprocess each time."""

    def __init__(self, socket_threads: int = 3) -> None:
        self.failures: list[str] = []
        self.count = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._socket) for _ in range(socket_threads)]
        self._threads.append(threading.Thread(target=self._cli))

    def __enter__(self) -> GetLoop:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _record(self, failure: str | None) -> None:
        with self._lock:
            self.count += 1
            if failure:
                self.failures.append(failure)

    def _socket(self) -> None:
        fields = [("scope", APP_SCOPE), ("profile", "app")]
        while not self._stop.is_set():
            try:
                client.call(paths.socket_path(), "get", fields, timeout=30)
                self._record(None)
            except MpagentError as exc:
                self._record(f"{type(exc).__name__}: {exc}")
            time.sleep(0.05)

    def _cli(self) -> None:
        while not self._stop.is_set():
            result = run_cli("get", APP_SCOPE, "--profile", "app", env=ENV)
            self._record(None if result.returncode == 0 else f"cli {result.stderr.strip()}")


# -- rotate ------------------------------------------------------------------------------


@pytest.mark.slow
def test_rotate_under_load_loses_no_get(agent: AgentProcess, emu: Emulator, config: Path) -> None:
    """Rotating with 3 s propagation and 4 s tokens while clients call `get` throughout: no
    get fails, the agent moves to the new kid, the old kid is gone after the grace, and
    config.toml is rewritten with its comments kept."""
    with GetLoop() as loop:
        time.sleep(1)
        result = rotate_cli(config, "--grace", "3")
        time.sleep(TOKEN_LIFETIME + 1)  # a refresh or two with the new key under load
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [w for w in STEP_WORDS if any(line.startswith(w) for line in lines)] == list(
        STEP_WORDS
    ), result.stdout
    assert lines[-1].startswith("done: profile app signs with kid mpagent-app-")
    assert any(line.startswith("switched") and "the agent reloaded" in line for line in lines)
    assert loop.count > 20 and loop.failures == []
    new = profile_settings(config)
    assert new["kid"].startswith("mpagent-app-") and new["keystore_type"] == "pem"
    assert kids(emu) == [new["kid"]]
    assert_comments_kept(config)
    keys_used = {t["key"] for t in status()["tokens"] if t["profile"] == "app" and t["valid"]}
    assert keys_used == {new["kid"]}
    assert state_files() == []
    assert f"the old private key {config.parent / 'old.pem'}" not in result.stdout  # not ours


@pytest.mark.slow
@pytest.mark.parametrize("emulator_options", [{"propagation": 1.0}])
def test_rotate_killed_after_each_step_finishes_on_rerun(emu: Emulator, config: Path) -> None:
    """SIGKILL right after each step's line, then a rerun: every time the profile still has
    a usable key, and the chain of reruns completes the rotation."""
    for step in STEP_WORDS:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mpagent", "--config", str(config), "keys", "rotate", *GRACE_1],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **ENV},
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
        assert line.startswith(step), (step, line, err)
        assert usable(config)
        # After the last step's line only the state's removal is left; it may have happened.
        assert state_files() or step == STEP_WORDS[-1], f"killed after {step}: state lost"
    if state_files():
        final = rotate_cli(config, "--grace", "1")
        assert final.returncode == 0, final.stderr
        assert final.stdout.splitlines() == [final.stdout.splitlines()[0]]
        assert final.stdout.startswith("done: profile app signs with kid")
    new = profile_settings(config)["kid"]
    assert kids(emu) == [new] and state_files() == []
    assert usable(config)
    assert_comments_kept(config)


def test_dry_run_changes_nothing(emu: Emulator, config: Path) -> None:
    """--dry-run prints each admin request (the GET and the POST bodies) and what it would
    do, and writes no key file, no config change and no state."""
    before = config.read_bytes()
    result = rotate_cli(config, "--dry-run", "--grace", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"GET {emu.admin_api}{APP_ID}/jwks" in out
    assert f"POST {emu.admin_api}{APP_ID}/jwks" in out and '"kty": "RSA"' in out
    assert "would rewrite" in out and "would remove the old kid app-old-key" in out
    assert config.read_bytes() == before
    assert kids(emu) == [OLD_KID]
    assert state_files() == []
    assert not (Path(paths.data_dir()) / "keys").exists()
    assert "access_token" not in out and "Bearer" not in out


class Stop(Exception):
    pass


def stop_after(step: str) -> Any:
    """An `out` that ends the rotation in this process right after `step`'s line."""

    def out(line: str) -> None:
        if line.startswith(step):
            raise Stop(line)

    return out


def test_config_changed_by_hand_stops_the_rerun(emu: Emulator, config: Path) -> None:
    """A rotation interrupted after registering, then the kid edited by hand: the rerun
    refuses, naming the profile and saying how to finish or give up."""
    with pytest.raises(Stop):
        rotation.rotate(config, "app", grace=0, dry_run=False, say=print, out=stop_after("reg"))
    text = config.read_text(encoding="utf-8").replace(f'kid = "{OLD_KID}"', 'kid = "other"')
    config.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        rotation.rotate(config, "app", grace=0, dry_run=False, say=print, out=print)
    message = str(caught.value)
    assert "[profiles.app] was changed while its key was being rotated" in message
    assert "says kid other" in message and str(state_files()[0]) in message


def test_a_state_of_another_config_is_refused(emu: Emulator, config: Path, tmp_path: Path) -> None:
    """The state of a rotation begun with another config file is not continued here."""
    with pytest.raises(Stop):
        rotation.rotate(config, "app", grace=0, dry_run=False, say=print, out=stop_after("gen"))
    other = tmp_path / "other.toml"
    other.write_bytes(config.read_bytes())
    with pytest.raises(ConfigError) as caught:
        rotation.rotate(other, "app", grace=0, dry_run=False, say=print, out=print)
    assert f"in {config}, not of profile app in {other}" in str(caught.value)


def test_dry_run_of_an_interrupted_rotation_shows_what_is_left(emu: Emulator, config: Path) -> None:
    """After a rotation stopped once registered, --dry-run says one is under way, shows the
    steps left (from verifying on), and changes neither the state nor config.toml."""
    with pytest.raises(Stop):
        rotation.rotate(config, "app", grace=0, dry_run=False, say=print, out=stop_after("reg"))
    (state,) = state_files()
    before = (state.read_bytes(), config.read_bytes(), kids(emu))
    said: list[str] = []
    lines: list[str] = []
    rotation.rotate(config, "app", grace=0, dry_run=True, say=said.append, out=lines.append)
    assert any("is under way; a rerun would continue it" in s for s in said)
    assert lines[0].startswith("would wait until Maskinporten gives a token")
    assert any(line.startswith("would remove the old kid app-old-key") for line in lines)
    assert (state.read_bytes(), config.read_bytes(), kids(emu)) == before


def test_a_rerun_waits_only_what_is_left_of_the_grace(config: Path) -> None:
    """Switched 200 s ago with a 300 s grace: the grace step sleeps the 100 s left, in
    slices checked against the (fake) clock; switched long ago, it does not sleep."""
    now = [1000.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    cfg = config_module.load(config)
    state = {"new_kid": "k", "old": {"kid": OLD_KID}, "switched_at": 800.0}
    step = rotation.Rotation(cfg, cfg.profile("app"), state, config.parent / "s.json",
                             dry_run=False, grace=300, say=print, out=print,
                             clock=lambda: now[0], sleep=sleep)  # fmt: skip
    assert step.wait_grace() == "grace: 300 s have passed since the switch"
    assert sum(slept) == pytest.approx(100.0) and max(slept) <= rotation.GRACE_SLICE
    slept.clear()
    state["switched_at"] = 0.0
    step.wait_grace()
    assert slept == []


def test_a_second_rotate_of_the_profile_is_refused(emu: Emulator, config: Path) -> None:
    """While one rotate of the profile runs (holds its lock), another refuses and says so."""
    lock_path = rotation.state_path("app").with_suffix(".lock")
    ensure_private_dir(lock_path.parent)
    held = try_lock(lock_path)
    assert held is not None
    try:
        with pytest.raises(ConfigError, match="keys of profile app are being changed by another"):
            rotation.rotate(config, "app", grace=0, dry_run=False, say=print, out=print)
    finally:
        os.close(held)
    assert kids(emu) == [OLD_KID]


def test_rotating_the_admin_certificate_profile_is_refused(emu: Emulator, config: Path) -> None:
    """The admin profile signs with its certificate: a registered key would lock its client
    out of certificate grants and so of the admin API; rotate refuses before any change."""
    before = config.read_bytes()
    with pytest.raises(ConfigError, match="refuses its certificate grants") as caught:
        rotation.rotate(config, "admin", grace=0, dry_run=False, say=print, out=print)
    assert "admin_profile of app" in str(caught.value)
    assert emu.client_keys(ADMIN_ID)["keys"] == [] and config.read_bytes() == before
    assert state_files() == []


CERT_PROFILE = """
# a client that signs with the certificate, its keys managed by the admin profile
[profiles.cert]
environment = "{issuer}"
client_id = "{cert_id}"
scopes = ["{scope}"]
keystore = "{p12}"
admin_profile = "admin"
admin_api = "{admin_api}"
"""


@pytest.mark.parametrize("emulator_options", [{"propagation": 0.0}])
def test_rotate_a_certificate_profile_makes_its_first_kid(
    emu: Emulator, config: Path, p12: Path
) -> None:
    """A certificate profile that is no admin may rotate: the new key becomes its first kid,
    the warning says certificate grants stop, and tokens come with the new kid."""
    with config.open("a", encoding="utf-8") as f:
        f.write(CERT_PROFILE.format(issuer=emu.issuer, cert_id=CERT_ID, scope=APP_SCOPE,
                                    p12=p12, admin_api=emu.admin_api))  # fmt: skip
    said: list[str] = []
    lines: list[str] = []
    rotation.rotate(config, "cert", grace=0, dry_run=False, say=said.append, out=lines.append)
    cert = tomllib.loads(config.read_text(encoding="utf-8"))["profiles"]["cert"]
    assert cert["kid"].startswith("mpagent-cert-") and cert["admin_profile"] == "admin"
    assert [k["kid"] for k in emu.client_keys(CERT_ID)["keys"]] == [cert["kid"]]
    assert any("refuses certificate grants" in s for s in said)
    assert any("no old kid to remove" in line for line in lines)
    cfg = config_module.load(config)
    assert open_exchange(cfg, cfg.profile("cert")).fetch([APP_SCOPE]).access_token


# -- other writers, and a rotation stopped between a step and its record -----------------


def drop_new_kid(emu: Emulator, old_key: Path) -> str:
    """Another writer posts the set without the rotation's new kid: only the old key left."""
    (state,) = state_files()
    new_kid = json.loads(state.read_text(encoding="utf-8"))["new_kid"]
    assert new_kid in kids(emu)
    key = serialization.load_pem_private_key(read_regular(old_key, private=True), None)
    emu.register_keys(APP_ID, [public_jwk(key, OLD_KID)])  # type: ignore[arg-type]
    return str(new_kid)


@pytest.mark.parametrize("emulator_options", [{"propagation": 0.0}])
@pytest.mark.parametrize("stopped_after", ["registered", "verified"])
def test_a_rerun_registers_the_new_kid_again_when_it_was_dropped(
    emu: Emulator, config: Path, old_key: Path, stopped_after: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rotation stopped after registering (or verifying), then the set posted without its
    new kid by another writer: the rerun registers it again, says so, and completes."""
    monkeypatch.setattr(rotation, "GIVE_UP_AFTER", 10.0)  # a kid never taken: fail in seconds
    with pytest.raises(Stop):
        rotation.rotate(config, "app", grace=0, dry_run=False, say=print,
                        out=stop_after(stopped_after))  # fmt: skip
    new_kid = drop_new_kid(emu, old_key)
    said: list[str] = []
    rotation.rotate(config, "app", grace=0, dry_run=False, say=said.append, out=print)
    assert any(f"kid {new_kid} was no longer in client" in line for line in said)
    assert kids(emu) == [new_kid] and profile_settings(config)["kid"] == new_kid
    assert usable(config)


def test_keys_delete_refuses_the_kid_of_a_rotation_under_way(emu: Emulator, config: Path) -> None:
    """`keys delete` of the new kid of an interrupted rotation is refused, naming its state."""
    with pytest.raises(Stop):
        rotation.rotate(config, "app", grace=0, dry_run=False, say=print, out=stop_after("reg"))
    (state,) = state_files()
    new_kid = json.loads(state.read_text(encoding="utf-8"))["new_kid"]
    result = run_cli("--config", str(config), "keys", "delete", new_kid, "--yes", env=ENV)
    assert result.returncode == 78, result.stderr
    assert "new key of a rotation under way" in result.stderr and str(state) in result.stderr
    assert new_kid in kids(emu)


@pytest.mark.parametrize("emulator_options", [{"key_lifetime": 10 * 86400.0}])
@pytest.mark.parametrize("extra", ["auto_renew = true"])
def test_auto_renew_waits_while_a_rotation_holds_the_lock(
    emu: Emulator, config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent's check does not renew while a rotation (or keys command) holds the
    profile's lock, and says so once; after the lock is let go, the next check renews."""
    from mpagent import keywatch

    cfg = config_module.load(config)
    admin = open_exchange(cfg, cfg.profile("admin"))
    watch = keywatch.KeyWatch(refresher=None)  # type: ignore[arg-type]
    watch.update(cfg)
    w = watch.watched["app"]

    def token(name: str, scope: str) -> str:
        return admin.fetch([scope]).access_token

    before = emu.client_keys(APP_ID)["keys"][0]["exp"]
    with rotation.exclusive("app"), caplog.at_level("INFO", "mpagent.keywatch"):
        watch._check(cfg, w, token)
        watch._check(cfg, w, token)
    assert w.error is None and w.keys is not None
    assert emu.client_keys(APP_ID)["keys"][0]["exp"] == before
    assert caplog.text.count("a rotation or keys command is changing") == 1
    time.sleep(1.1)  # exp has one-second resolution
    watch._check(cfg, w, token)
    assert emu.client_keys(APP_ID)["keys"][0]["exp"] > before


def fail_save(monkeypatch: pytest.MonkeyPatch, number: int) -> None:
    """The rotation's `number`th state write (rotation.write_atomic) fails once: the step
    before it has had its effect, but is not recorded."""
    real = rotation.write_atomic
    calls = [0]

    def write(path: Path, text: Any) -> None:
        calls[0] += 1
        if calls[0] == number:
            raise OSError("disk full (test)")
        real(path, text)

    monkeypatch.setattr(rotation, "write_atomic", write)


# The state is written at the start (1), after each step (2 generated, 3 registered,
# 4 verified), and in the switch once config.toml is rewritten (5).
@pytest.mark.parametrize("emulator_options", [{"propagation": 0.0}])
@pytest.mark.parametrize(
    ("save", "done"), [(2, "key file written"), (3, "registered"), (5, "config.toml rewritten")]
)
def test_a_rotation_failing_before_its_record_finishes_on_rerun(
    emu: Emulator, config: Path, monkeypatch: pytest.MonkeyPatch, save: int, done: str
) -> None:
    """A step's effect happens (the key file, the POST, the config write), then its record
    fails: the profile still has a usable key, and a rerun completes with the new key."""
    with monkeypatch.context() as m:
        fail_save(m, save)
        with pytest.raises(OSError, match="disk full"):
            rotation.rotate(config, "app", grace=0, dry_run=False, say=print, out=print)
    assert usable(config)
    rotation.rotate(config, "app", grace=0, dry_run=False, say=print, out=print)
    new = profile_settings(config)["kid"]
    assert new.startswith("mpagent-app-") and kids(emu) == [new] and state_files() == []
    assert usable(config)


@pytest.mark.parametrize("emulator_options", [{"propagation": 0.0}])
def test_a_truncated_new_key_file_is_made_again(
    emu: Emulator, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed while writing the new key (a truncated .pem, nothing registered yet): the
    rerun makes the key again instead of asking to delete files, and completes."""
    with monkeypatch.context() as m:
        fail_save(m, 2)
        with pytest.raises(OSError, match="disk full"):
            rotation.rotate(config, "app", grace=0, dry_run=False, say=print, out=print)
    (state,) = state_files()
    pem = Path(json.loads(state.read_text(encoding="utf-8"))["new_keystore"])
    pem.write_bytes(pem.read_bytes()[:100])
    rotation.rotate(config, "app", grace=0, dry_run=False, say=print, out=print)
    new = profile_settings(config)["kid"]
    assert kids(emu) == [new] and usable(config)


class Hang:
    """A loopback TCP server that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/clients/"
        self.accepted: list[Any] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.accepted.append(self.sock.accept()[0])

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def test_the_agent_stops_at_once_while_an_admin_check_hangs(
    emu: Emulator, config: Path, tmp_path: Path
) -> None:
    """An admin API that accepts and never answers: the agent's key check is under way, and
    `stop` (SIGTERM) still ends the agent within ~2 s, not after the request's deadline."""
    hang = Hang()
    try:
        text = config.read_text(encoding="utf-8").replace(emu.admin_api, hang.url)
        config.write_text(text, encoding="utf-8")
        agent = AgentProcess(config, tmp_path / "agent.log").wait_ready()
        try:
            wait_for(lambda: hang.accepted, timeout=10)
            started = time.monotonic()
            agent.signal(signal.SIGTERM)
            agent.proc.wait(15)
            took = time.monotonic() - started
        finally:
            agent.stop()
    finally:
        hang.close()
    assert took < 2.5, f"the agent took {took:.1f} s to stop"


# -- the agent's key watch, status, doctor ----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("emulator_options", [{"key_lifetime": 10 * 86400.0}])
@pytest.mark.parametrize("extra", ["auto_renew = true"])
def test_auto_renew_renews_a_key_under_30_days(emu: Emulator, config: Path, tmp_path: Path) -> None:
    """With auto_renew and keys living 10 days, the agent renews at start (exp moves), logs
    it without a token, says once that the renewed key is still short, and `status` shows
    the key's expiry with `!` and the signing mark."""
    before = emu.client_keys(APP_ID)["keys"][0]["exp"]
    time.sleep(1.1)  # exp has one-second resolution
    agent = AgentProcess(config, tmp_path / "agent.log").wait_ready()
    try:
        wait_for(lambda: emu.client_keys(APP_ID)["keys"][0]["exp"] > before, timeout=20)
        watched = wait_for(lambda: status()["registered_keys"]["app"]["checked_at"], timeout=10)
        assert watched
        doc = status()
        (key,) = doc["registered_keys"]["app"]["keys"]
        assert key["kid"] == OLD_KID and key["signing"] is True
        assert 9.9 < key["expires_in_days"] <= 10.0
        assert "auto_renew is on" in doc["key_warnings"]["app"]
        shown = run_cli("status", env=ENV)
        assert shown.returncode == 0, shown.stderr
        row = next(line for line in shown.stdout.splitlines() if OLD_KID in line)
        assert row.startswith("app") and "!in 10 days" in row and row.rstrip().endswith("*")
        log = agent.log()
        assert f"profile app: renewed the registered keys (auto_renew; {OLD_KID}" in log
        assert log.count("still expire within 30 days") == 1
        assert "eyJ" not in log  # no token (a JWT) in the log
    finally:
        agent.stop()


@pytest.mark.parametrize("emulator_options", [{"key_lifetime": 20 * 86400.0}])
def test_doctor_shows_each_registered_key(emu: Emulator, config: Path) -> None:
    """`mpagent doctor` has a row per registered key with its expiry, `!` under 30 days, and
    which one the profile signs with; no renewal happens without auto_renew."""
    before = emu.client_keys(APP_ID)["keys"][0]["exp"]
    result = run_cli("--config", str(config), "doctor", "--profile", "app", env=ENV)
    row = next(line for line in result.stdout.splitlines() if "registered key" in line)
    assert re.fullmatch(
        rf"! registered key {OLD_KID}: expires \d{{4}}-\d\d-\d\d \((19|20) days\); "
        "the profile signs with it: under 30 days",
        row,
    ), row
    assert "fix: mpagent keys renew --profile app" in result.stdout
    assert emu.client_keys(APP_ID)["keys"][0]["exp"] == before


def test_doctor_admin_api_failure_is_a_row(emu: Emulator, config: Path) -> None:
    """An admin API that cannot be reached is a failed `registered keys` row with its reason,
    not a crash."""
    text = config.read_text(encoding="utf-8").replace(emu.admin_api, "http://127.0.0.1:9/clients/")
    config.write_text(text, encoding="utf-8")
    result = run_cli("--config", str(config), "doctor", "--profile", "app", env=ENV)
    assert "Traceback" not in result.stderr
    assert "✗ registered keys: cannot reach http://127.0.0.1:9/clients/" in result.stdout
    assert result.returncode == 75


@pytest.mark.slow
@pytest.mark.parametrize("emulator_options", [{"key_lifetime": 1.0}])
def test_an_expired_key_names_keys_renew(emu: Emulator, config: Path) -> None:
    """A grant signed with an expired registered key: MP-121, and the hint names `mpagent
    keys renew --profile`; doctor fills in the profile."""
    time.sleep(max(0.0, emu.client_keys(APP_ID)["keys"][0]["exp"] - time.time()) + 0.2)
    got = run_cli("--config", str(config), "get", APP_SCOPE, "--no-agent", env=ENV)
    assert got.returncode == 77
    assert "MP-121" in got.stderr and "mpagent keys renew --profile" in got.stderr
    doctor = run_cli("--config", str(config), "doctor", "--profile", "app", env=ENV)
    assert "fix: the registered key expired" in doctor.stdout
    assert "mpagent keys renew --profile app" in doctor.stdout
    assert f"✗ registered key {OLD_KID}: expires " in doctor.stdout
    assert json.dumps(emu.client_keys(APP_ID))  # the set itself is still there
