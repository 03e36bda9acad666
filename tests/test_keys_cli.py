"""`mpagent keys list|create|renew|delete` end to end: the real CLI as a subprocess against the
emulator's admin API over loopback. An admin client (business certificate, scopes
idporten:dcr.read and idporten:dcr.write) manages the keys of an app client that starts with
none."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from mpagent import adminapi, rotation
from mpagent import config as config_module
from mpagent.emulator import Emulator, pki
from mpagent.errors import AdminApiError
from mpagent.exchange import open_exchange
from mpagent.keys.generate import create_key, public_jwk

from .conftest import PASSWORD, issuer_key, run_cli, write_config

ADMIN_ID = "a1d2m3i4-0000-4000-8000-000000000001"
APP_ID = "a1b2c3d4-0000-4000-8000-000000000002"
OTHER_ID = "a1b2c3d4-0000-4000-8000-000000000003"
ADMIN_SCOPES = ("idporten:dcr.read", "idporten:dcr.write")
APP_SCOPE = "altinn:serviceowner"


@pytest.fixture(scope="module")
def public_key() -> rsa.RSAPublicKey:
    """A public key to register under other kids (made once: RSA key generation is slow)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()


@pytest.fixture
def emu(ca: pki.Issued) -> Iterator[Emulator]:
    clients = {ADMIN_ID: ADMIN_SCOPES, APP_ID: (APP_SCOPE,), OTHER_ID: (APP_SCOPE,)}
    with Emulator(clients=clients, trust=[ca.cert], signing_key=issuer_key()) as emulator:
        yield emulator


@pytest.fixture
def config(home: Path, emu: Emulator, p12: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    monkeypatch.setenv("MPAGENT_NO_AUTOSTART", "1")
    path = home / "config.toml"
    common = {"environment": emu.issuer, "admin_api": emu.admin_api}
    admin = {**common, "client_id": ADMIN_ID, "keystore": p12}
    app = {**common, "client_id": APP_ID, "scopes": [APP_SCOPE], "admin_profile": "admin"}
    write_config(path, {"admin": admin, "app": app}, default_profile="app")
    text = path.read_text()
    # A comment of the user's, which --switch must keep.
    path.write_text(text.replace("[profiles.app]\n", "[profiles.app]\n# the app's own client\n"))
    return path


def two_profiles(home: Path, emu: Emulator, p12: Path) -> Path:
    """A config with the admin profile and the app profile (no key yet), no default."""
    common = {"environment": emu.issuer, "admin_api": emu.admin_api}
    admin = {**common, "client_id": ADMIN_ID, "keystore": p12}
    app = {**common, "client_id": APP_ID, "scopes": [APP_SCOPE], "admin_profile": "admin"}
    return write_config(home / "c.toml", {"admin": admin, "app": app})


def keys(*args: str, config: Path) -> tuple[int, str, str]:
    done = run_cli("--config", str(config), "keys", *args)
    return done.returncode, done.stdout, done.stderr


def other_keys(emu: Emulator, public: rsa.RSAPublicKey, kids: list[str]) -> None:
    emu.register_keys(APP_ID, [public_jwk(public, kid) for kid in kids])


def test_profile_without_key_says_to_create_one(config: Path) -> None:
    """A profile with admin_profile and no keystore cannot get a token, and says how to get a key."""
    done = run_cli("--config", str(config), "get", "--no-agent", APP_SCOPE)
    assert done.returncode == 78, done.stderr
    assert "profile app has no key yet; create one: mpagent keys create --profile app --switch" in (
        done.stderr
    )


@pytest.mark.slow
def test_create_switch_then_token_signed_with_new_kid(config: Path, emu: Emulator) -> None:
    """create --switch registers a new key, writes keystore/kid into config.toml with comments
    kept, and `get --no-agent` then gets a token with a grant signed by that kid."""
    code, out, err = keys("create", "--switch", config=config)
    assert code == 0, err
    kid = next(line.split('"')[1] for line in out.splitlines() if line.startswith("kid = "))
    assert [k["kid"] for k in emu.client_keys(APP_ID)["keys"]] == [kid]
    text = config.read_text()
    assert "# the app's own client" in text and f'kid = "{kid}"' in text
    assert 'keystore_type = "pem"' in text
    pem = Path(next(line.split('"')[1] for line in out.splitlines() if line.startswith("keystore")))
    assert pem.name == f"{kid}.pem" and stat.S_IMODE(pem.stat().st_mode) == 0o600
    done = run_cli("--config", str(config), "grant", APP_SCOPE)
    assert jwt.get_unverified_header(done.stdout.strip())["kid"] == kid
    done = run_cli("--config", str(config), "get", "--no-agent", "--json", APP_SCOPE)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["access_token"]


def test_create_without_switch_prints_lines_and_merges(
    config: Path, emu: Emulator, public_key: rsa.RSAPublicKey, home: Path
) -> None:
    """create merges the new key with the set already registered, prints the profile lines,
    and leaves config.toml alone; --out puts the private key where asked."""
    other_keys(emu, public_key, ["old-1"])
    before = config.read_text()
    out_path = home / "mine.pem"
    code, out, err = keys("create", "--out", str(out_path), config=config)
    assert code == 0, err
    assert config.read_text() == before
    assert f'keystore = "{out_path}"' in out and out_path.exists()
    kids = [k["kid"] for k in emu.client_keys(APP_ID)["keys"]]
    assert len(kids) == 2 and kids[0] == "old-1"


def test_list_marks_signing_kid_and_held_keys(
    config: Path, emu: Emulator, public_key: rsa.RSAPublicKey
) -> None:
    """list shows each registered kid with its expiry in days, `*` on the kid the profile
    signs with, and `here` for the private keys this machine holds."""
    other_keys(emu, public_key, ["remote"])
    code, _, err = keys("create", "--switch", config=config)
    assert code == 0, err
    code, out, err = keys("list", config=config)
    assert code == 0, err
    rows = {
        line.split()[0] if not line.startswith("*") else line.split()[1]: line
        for line in out.splitlines()[2:]
    }
    kid = next(k for k in rows if k != "remote")
    assert (
        rows[kid].startswith("*")
        and "here" in rows[kid]
        and re.search(r"\((364|365) days\)", rows[kid])
    )
    assert "here" not in rows["remote"] and not rows["remote"].startswith("*")
    assert "warning" not in err


def test_list_warns_under_30_days(
    ca: pki.Issued,
    home: Path,
    p12: Path,
    public_key: rsa.RSAPublicKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key with under 30 days left gives a warning naming `mpagent keys renew`."""
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    clients = {ADMIN_ID: ADMIN_SCOPES, APP_ID: (APP_SCOPE,)}
    with Emulator(
        clients=clients, trust=[ca.cert], signing_key=issuer_key(), key_lifetime=10 * 86400
    ) as emu:
        path = two_profiles(home, emu, p12)
        other_keys(emu, public_key, ["short"])
        code, out, err = keys("list", "--profile", "app", config=path)
    assert code == 0, err
    assert "short" in out and re.search(r"\((9|10) days\)", out)
    assert "warning: short expire(s) within 30 days" in err and "mpagent keys renew" in err


def test_renew_moves_every_exp(
    ca: pki.Issued,
    home: Path,
    p12: Path,
    public_key: rsa.RSAPublicKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """renew re-posts the set unchanged: every key's exp moves later, the kids stay."""
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    clients = {ADMIN_ID: ADMIN_SCOPES, APP_ID: (APP_SCOPE,)}
    with Emulator(
        clients=clients, trust=[ca.cert], signing_key=issuer_key(), key_lifetime=1000
    ) as emu:
        path = two_profiles(home, emu, p12)
        other_keys(emu, public_key, ["k1", "k2"])
        before = {k["kid"]: k["exp"] for k in emu.client_keys(APP_ID)["keys"]}
        time.sleep(1.1)
        code, out, err = keys("renew", "--profile", "app", config=path)
        after = {k["kid"]: k["exp"] for k in emu.client_keys(APP_ID)["keys"]}
    assert code == 0, err
    assert after.keys() == before.keys() == {"k1", "k2"}
    assert all(after[kid] > before[kid] for kid in before)
    assert "k1  expires" in out and "k2  expires" in out


def test_renew_dry_run_sends_nothing(
    config: Path, emu: Emulator, public_key: rsa.RSAPublicKey
) -> None:
    """renew --dry-run prints the POST with its body and changes nothing."""
    other_keys(emu, public_key, ["k1"])
    before = emu.client_keys(APP_ID)
    code, out, err = keys("renew", "--dry-run", config=config)
    assert code == 0, err
    assert f"POST {emu.admin_api}{APP_ID}/jwks" in out and '"kid": "k1"' in out
    assert emu.client_keys(APP_ID) == before


def test_create_refused_at_five_keys(
    config: Path, emu: Emulator, public_key: rsa.RSAPublicKey
) -> None:
    """With 5 keys registered, create refuses with the list and how to delete one, and leaves
    no private key behind."""
    kids = [f"k{i}" for i in range(5)]
    other_keys(emu, public_key, kids)
    code, _, err = keys("create", config=config)
    assert code == 77, err
    assert "k0, k1, k2, k3, k4" in err and "delete one: mpagent keys delete KID" in err
    keys_dir = Path(os.environ["XDG_DATA_HOME"]) / "mpagent" / "keys"
    assert not keys_dir.exists() or not list(keys_dir.glob("*.pem"))


def test_kid_collision_is_refused_and_key_removed(
    config: Path, emu: Emulator, public_key: rsa.RSAPublicKey
) -> None:
    """A kid another client already uses is refused by the admin API with its reason shown,
    and the private key generated for it is removed again."""
    emu.register_keys(OTHER_ID, [public_jwk(public_key, "taken")])
    code, _, err = keys("create", "--kid", "taken", config=config)
    assert code == 77, err
    assert "already registered on another client" in err and "HTTP 400" in err
    keys_dir = Path(os.environ["XDG_DATA_HOME"]) / "mpagent" / "keys"
    assert not (keys_dir / "taken.pem").exists()
    assert emu.client_keys(APP_ID)["keys"] == []


@pytest.mark.slow
def test_delete_refusals_and_last_key(
    config: Path, emu: Emulator, public_key: rsa.RSAPublicKey
) -> None:
    """delete refuses the kid the profile signs with, refuses without a terminal and --yes,
    and removes the others (the last one with DELETE)."""
    other_keys(emu, public_key, ["spare"])
    code, _, err = keys("create", "--switch", config=config)
    assert code == 0, err
    signing = next(k["kid"] for k in emu.client_keys(APP_ID)["keys"] if k["kid"] != "spare")
    code, _, err = keys("delete", signing, "--yes", config=config)
    assert code == 78 and "signs with kid" in err and "mpagent keys rotate" in err
    code, _, err = keys("delete", "spare", config=config)
    assert code == 1 and "--yes" in err
    assert len(emu.client_keys(APP_ID)["keys"]) == 2
    code, _, err = keys("delete", "nosuch", "--yes", config=config)
    assert code == 77 and "no registered key has kid 'nosuch'" in err
    code, _, err = keys("delete", "spare", "--yes", config=config)
    assert code == 0, err
    assert [k["kid"] for k in emu.client_keys(APP_ID)["keys"]] == [signing]


def test_delete_last_key(config: Path, emu: Emulator, public_key: rsa.RSAPublicKey) -> None:
    """Deleting the only key empties the set."""
    other_keys(emu, public_key, ["only"])
    code, _, err = keys("delete", "only", "--yes", config=config)
    assert code == 0, err
    assert emu.client_keys(APP_ID)["keys"] == []


def test_delete_names_the_private_key_left_here(config: Path, emu: Emulator) -> None:
    """Deleting a kid whose private key mpagent made says that file is of no use now."""
    code, _, err = keys("create", "--kid", "spare-1", config=config)
    assert code == 0, err
    code, _, err = keys("delete", "spare-1", "--yes", config=config)
    assert code == 0, err
    assert "spare-1.pem is of no use now" in err
    assert emu.client_keys(APP_ID)["keys"] == []


def test_self_administered_certificate_profile_cannot_create(config: Path, emu: Emulator) -> None:
    """create for the admin profile itself (certificate) is refused: a registered key would
    lock its client out of certificate grants."""
    code, _, err = keys("create", "--profile", "admin", config=config)
    assert code == 78 and "refuses its certificate grants" in err
    assert emu.client_keys(ADMIN_ID)["keys"] == []


@pytest.mark.slow
def test_admin_without_write_scope_says_which_scope(
    ca: pki.Issued,
    home: Path,
    p12: Path,
    public_key: rsa.RSAPublicKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An admin client without idporten:dcr.write gets a refusal naming the scope and client."""
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    clients = {ADMIN_ID: ("idporten:dcr.read",), APP_ID: (APP_SCOPE,)}
    with Emulator(clients=clients, trust=[ca.cert], signing_key=issuer_key()) as emu:
        path = two_profiles(home, emu, p12)
        code, _, err = keys("renew", "--profile", "app", config=path)
        assert code == 0, err  # nothing to renew: reading needs dcr.read only
        other_keys(emu, public_key, ["x"])
        code, _, err = keys("renew", "--profile", "app", config=path)
    assert code == 77, err
    assert "idporten:dcr.write" in err and ADMIN_ID in err


@pytest.mark.slow
def test_expired_key_is_mp121_and_renew_revives_it(
    ca: pki.Issued, home: Path, p12: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grant signed with an expired registered key is refused with MP-121 and a hint naming
    `mpagent keys renew`; after renew, the same key gets tokens again."""
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    clients = {ADMIN_ID: ADMIN_SCOPES, APP_ID: (APP_SCOPE,)}
    with Emulator(
        clients=clients, trust=[ca.cert], signing_key=issuer_key(), key_lifetime=4
    ) as emu:
        path = two_profiles(home, emu, p12)
        code, _, err = keys("create", "--switch", "--profile", "app", config=path)
        assert code == 0, err
        deadline = emu.client_keys(APP_ID)["keys"][0]["exp"]
        time.sleep(max(0.0, deadline - time.time()) + 0.5)
        done = run_cli("--config", str(path), "get", "--no-agent", "--profile", "app", APP_SCOPE)
        assert done.returncode == 77, done.stderr
        assert "MP-121" in done.stderr and "Expired key" in done.stderr
        assert "mpagent keys renew" in done.stderr
        code, _, err = keys("renew", "--profile", "app", config=path)
        assert code == 0, err
        done = run_cli("--config", str(path), "get", "--no-agent", "--profile", "app", APP_SCOPE)
    assert done.returncode == 0, done.stderr


def test_create_dry_run_sends_and_writes_nothing(config: Path, emu: Emulator) -> None:
    """create --dry-run shows the POST with the merged set and registers and writes nothing."""
    before = config.read_text()
    code, out, err = keys("create", "--dry-run", "--switch", "--kid", "trial-1", config=config)
    assert code == 0, err
    assert f"POST {emu.admin_api}{APP_ID}/jwks" in out and '"kid": "trial-1"' in out
    assert emu.client_keys(APP_ID)["keys"] == [] and config.read_text() == before
    keys_dir = Path(os.environ["XDG_DATA_HOME"]) / "mpagent" / "keys"
    assert not keys_dir.exists() or not list(keys_dir.iterdir())


def test_create_refuses_a_kid_that_is_no_file_name(config: Path, emu: Emulator) -> None:
    """A --kid that could climb out of the keys directory is refused before anything is sent."""
    code, _, err = keys("create", "--kid", "../evil", config=config)
    assert code == 78 and "kid '../evil' cannot be used" in err
    assert emu.client_keys(APP_ID)["keys"] == []


# -- an admin API that answers what the emulator never would --------------------------------


class OddAdminApi:
    """A loopback HTTP server standing in for the admin API: every GET answers `get`, every
    POST `post` (status 200), so that mpagent meets bodies Digdir should never send."""

    def __init__(self, get: bytes, post: bytes = b"") -> None:
        answers = {"GET": get, "POST": post}
        self.requests: list[str] = []
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                requests.append(self.command)
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = answers.get(self.command, b"")
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/clients/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> OddAdminApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def app_with_admin_api(home: Path, emu: Emulator, p12: Path, admin_api: str) -> Path:
    """The admin profile of the emulator (for the token), the app's keys at `admin_api`."""
    admin = {"environment": emu.issuer, "client_id": ADMIN_ID, "keystore": p12}
    app = {"environment": emu.issuer, "client_id": APP_ID, "scopes": [APP_SCOPE],
           "admin_profile": "admin", "admin_api": admin_api}  # fmt: skip
    return write_config(home / "odd.toml", {"admin": admin, "app": app}, default_profile="app")


def odd_key(exp: str) -> bytes:
    """A key set of one key whose exp is `exp`, written into the JSON as it stands."""
    jwk = {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "odd", "n": "AQAB" * 64, "e": "AQAB"}
    return json.dumps({"keys": [{**jwk, "exp": "EXP"}]}).replace('"EXP"', exp).encode()


@pytest.mark.parametrize(
    ("exp", "said"),
    [
        ("NaN", "NaN in its JSON"),
        ("Infinity", "Infinity in its JSON"),
        ("1800000000000", "keys[0].exp is not a number of seconds"),
        ("1e300", "keys[0].exp is not a number of seconds"),
    ],
)
def test_a_malformed_exp_is_a_clear_error_in_list_and_doctor(
    config: Path, emu: Emulator, p12: Path, home: Path, exp: str, said: str
) -> None:
    """An exp of NaN, Infinity, milliseconds or 1e300 from the admin API: `keys list` and
    doctor say what is wrong with the answer (the field), and neither crashes."""
    with OddAdminApi(odd_key(exp)) as odd:
        path = app_with_admin_api(home, emu, p12, odd.url)
        code, _, err = keys("list", config=path)
        doctor = run_cli("--config", str(path), "doctor", "--profile", "app")
    assert code == 77 and said in err and "Traceback" not in err, err
    assert "Traceback" not in doctor.stderr, doctor.stderr
    row = next(line for line in doctor.stdout.splitlines() if "registered keys" in line)
    assert row.startswith("✗") and said in row


def test_create_answered_with_an_unusable_body_says_to_check_the_kid(
    config: Path, emu: Emulator, p12: Path, home: Path
) -> None:
    """A POST answered 200 with a body that is no key set may have registered the key:
    create removes the private key and says to check `keys list` and delete the kid."""
    with OddAdminApi(b'{"keys": []}', b"<html>welcome</html>") as odd:
        path = app_with_admin_api(home, emu, p12, odd.url)
        code, _, err = keys("create", "--kid", "maybe-1", config=path)
        assert odd.requests == ["GET", "POST"]
    assert code == 77 and "not JSON" in err, err
    assert "mpagent keys delete maybe-1" in err
    keys_dir = Path(os.environ["XDG_DATA_HOME"]) / "mpagent" / "keys"
    assert not (keys_dir / "maybe-1.pem").exists()


def test_a_4xx_refusal_of_create_gives_no_delete_hint(
    config: Path, emu: Emulator, public_key: rsa.RSAPublicKey
) -> None:
    """A kid the admin API refused (HTTP 400) was not registered: no hint to delete it."""
    emu.register_keys(OTHER_ID, [public_jwk(public_key, "taken-2")])
    code, _, err = keys("create", "--kid", "taken-2", config=config)
    assert code == 77 and "HTTP 400" in err
    assert "keys delete" not in err


@pytest.mark.parametrize("grace", ["-1", "nan", "inf", "soon"])
def test_rotate_grace_must_be_finite_seconds(config: Path, grace: str) -> None:
    """--grace takes a finite number of seconds, 0 or more; anything else is a usage error."""
    code, _, err = keys("rotate", "--grace", grace, config=config)
    assert code == 2 and "is not a number of seconds (0 or more)" in err, err


@pytest.mark.parametrize("action", [("create",), ("renew",), ("delete", "spare", "--yes")])
def test_keys_commands_wait_for_a_rotation(
    config: Path, emu: Emulator, public_key: rsa.RSAPublicKey, action: tuple[str, ...]
) -> None:
    """While a rotation of the profile holds its lock, create, renew and delete refuse and
    change nothing: one writer of the set at a time."""
    other_keys(emu, public_key, ["spare"])
    before = emu.client_keys(APP_ID)
    with rotation.exclusive("app"):
        code, _, err = keys(*action, config=config)
    assert code == 78 and "keys of profile app are being changed by another mpagent" in err, err
    assert emu.client_keys(APP_ID) == before


def test_admin_api_refusals_say_what_each_means(config: Path, emu: Emulator, home: Path) -> None:
    """The admin API's 401 (a token it cannot use), 403 access_denied (an admin that signs
    with a kid) and 403 insufficient_scope each name their own next step."""
    cfg = config_module.load(config)
    read_token = open_exchange(cfg, cfg.profile("admin")).fetch(["idporten:dcr.read"])

    def api(token: str) -> adminapi.AdminApi:
        return adminapi.AdminApi(emu.admin_api, lambda scope: token, connect_timeout=5,
                                 read_timeout=5, admin="admin", admin_client=ADMIN_ID)  # fmt: skip

    with pytest.raises(AdminApiError, match=r"HTTP 401.*refused the token of profile admin"):
        api("not-a-token").keys(APP_ID)
    with pytest.raises(AdminApiError, match=r"HTTP 403.*lacks idporten:dcr.write; ask Digdir"):
        api(read_token.access_token).replace(APP_ID, ())
    # A client of admin scopes that signs with a registered key (the emulator allows the
    # token; only the admin API refuses it).
    pem, jwk = create_key(home / "admin-kid.pem", "admin-kid")
    emu.register_keys(ADMIN_ID, [jwk])
    kid_admin = dataclasses.replace(cfg.profile("admin"), keystore=pem, keystore_type="pem",
                                    kid="admin-kid", alias=None, certificate=None)  # fmt: skip
    kid_token = open_exchange(cfg, kid_admin).fetch(["idporten:dcr.read"]).access_token
    with pytest.raises(AdminApiError, match=r"HTTP 403.*must sign with its business certificate"):
        api(kid_token).keys(APP_ID)
