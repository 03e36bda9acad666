"""Pure policy of own keys (ownkeys: the key set, its limit and expiry) and the text edits of
config.toml (configedit.set_profile_keys), with plain values and a fixed clock."""

from __future__ import annotations

import os
import re
import stat
import tomllib
from pathlib import Path

import pytest

from mpagent import config, configedit, ownkeys
from mpagent.config import Config
from mpagent.errors import AdminApiError, ConfigError

NOW = 1_800_000_000.0
DAY = 86400.0
URL = "https://api.test.samarbeid.digdir.no/clients/c/jwks"


def jwk(kid: str, **extra: object) -> dict[str, object]:
    return {
        "kty": "RSA",
        "alg": "RS256",
        "use": "sig",
        "kid": kid,
        "n": "AQAB" * 64,
        "e": "AQAB",
        **extra,
    }


def keyset(*kids: str, days: float = 365) -> ownkeys.KeySet:
    doc = {
        "last_updated": "2027-01-15T10:00:00+00:00",
        "keys": [jwk(k, exp=NOW + days * DAY) for k in kids],
    }
    return ownkeys.parse_keyset(doc, URL)


# -- ownkeys ---------------------------------------------------------------------------------


def test_parse_keeps_fields_and_takes_exp_apart() -> None:
    """A key's exp becomes `expires`; every other member is kept for posting back."""
    ks = ownkeys.parse_keyset({"keys": [jwk("a", exp=NOW + DAY, x5c=["MII"])]}, URL)
    (key,) = ks.keys
    assert key.kid == "a" and key.expires == NOW + DAY and "exp" not in key.jwk
    assert key.jwk["x5c"] == ["MII"]
    assert ownkeys.upload_body(ks.keys) == {"keys": [jwk("a", x5c=["MII"])]}


def test_parse_empty_set() -> None:
    """`{"keys": []}` and a body without keys are both a client with no keys."""
    assert ownkeys.parse_keyset({"keys": []}, URL).keys == ()
    assert ownkeys.parse_keyset({}, URL).keys == ()


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ([], "the body"),
        ({"keys": {}}, "keys"),
        ({"keys": ["x"]}, "keys[0]"),
        ({"keys": [jwk("a"), {**jwk("b"), "n": 5}]}, "keys[1].n"),
        ({"keys": [{k: v for k, v in jwk("a").items() if k != "use"}]}, "keys[0].use"),
        ({"keys": [jwk("a", exp="soon")]}, "keys[0].exp"),
        ({"keys": [jwk("a", exp=True)]}, "keys[0].exp"),
        ({"keys": [jwk("a", exp=float("nan"))]}, "keys[0].exp"),
        ({"keys": [jwk("a", exp=float("inf"))]}, "keys[0].exp"),
        ({"keys": [jwk("a", exp=NOW * 1000)]}, "keys[0].exp"),  # milliseconds
        ({"keys": [jwk("a", exp=1e300)]}, "keys[0].exp"),
        ({"keys": [jwk("a", exp=-1)]}, "keys[0].exp"),
        ({"keys": [jwk("a"), jwk("b", exp=253402300800)]}, "keys[1].exp"),
        ({"keys": [], "last_updated": 5}, "last_updated"),
    ],
)
def test_parse_malformed_names_the_field(document: object, field: str) -> None:
    """A body mpagent cannot post back unchanged is an AdminApiError naming the field and URL."""
    with pytest.raises(AdminApiError) as caught:
        ownkeys.parse_keyset(document, URL)
    assert caught.value.details["field"] == field
    assert field in str(caught.value) and URL in str(caught.value)


def test_with_key_merges() -> None:
    """A new key joins the set; the registered keys stay, in order."""
    merged = ownkeys.with_key(keyset("a", "b"), ownkeys.RegisteredKey.new(jwk("c")))
    assert [k.kid for k in merged] == ["a", "b", "c"]
    assert merged[2].expires is None


def test_with_key_refused_at_limit_with_the_list() -> None:
    """At 5 keys a sixth is refused, with the kids and how to delete one."""
    with pytest.raises(AdminApiError, match=r"a, b, c, d, e; delete one: mpagent keys delete KID"):
        ownkeys.with_key(keyset(*"abcde"), ownkeys.RegisteredKey.new(jwk("f")))
    assert len(ownkeys.with_key(keyset(*"abcd"), ownkeys.RegisteredKey.new(jwk("f")))) == 5


def test_with_key_refuses_a_kid_in_the_set() -> None:
    """The same kid twice is refused before anything is sent."""
    with pytest.raises(AdminApiError, match="'a' is already registered"):
        ownkeys.with_key(keyset("a"), ownkeys.RegisteredKey.new(jwk("a")))


def test_without_key() -> None:
    """Removing a kid keeps the others; an unknown kid is refused with the registered ones."""
    assert [k.kid for k in ownkeys.without_key(keyset("a", "b"), "a")] == ["b"]
    assert ownkeys.without_key(keyset("a"), "a") == ()
    with pytest.raises(AdminApiError, match=r"registered: a, b"):
        ownkeys.without_key(keyset("a", "b"), "z")


def test_expiring_under_30_days() -> None:
    """Keys with under RENEW_DAYS left are expiring, expired ones included; unknown are not."""
    ks = ownkeys.KeySet(
        (
            ownkeys.RegisteredKey("soon", {}, NOW + 29.9 * DAY),
            ownkeys.RegisteredKey("later", {}, NOW + 30 * DAY),
            ownkeys.RegisteredKey("gone", {}, NOW - DAY),
            ownkeys.RegisteredKey("unknown", {}, None),
        )
    )
    assert [k.kid for k in ownkeys.expiring(ks, NOW)] == ["soon", "gone"]
    assert [k.kid for k in ownkeys.expiring(ks, NOW, days=400)] == ["soon", "later", "gone"]


def test_the_last_second_of_9999_is_an_exp() -> None:
    """exp up to the end of year 9999 is taken, and shows as a date."""
    (key,) = ownkeys.parse_keyset({"keys": [jwk("a", exp=253402300799.0)]}, URL).keys
    assert ownkeys.expiry_text(key, NOW).startswith("9999-12-31 (")


def test_expiry_text() -> None:
    """An expiry reads as date and whole days left, `expired`, or `unknown`."""
    assert ownkeys.expiry_text(ownkeys.RegisteredKey("a", {}, NOW + 10.5 * DAY), NOW) == (
        "2027-01-25 (10 days)"
    )
    assert ownkeys.expiry_text(ownkeys.RegisteredKey("a", {}, NOW - 1), NOW).endswith("(expired)")
    assert ownkeys.expiry_text(ownkeys.RegisteredKey("a", {}), NOW) == "unknown"


def test_table_and_warnings() -> None:
    """The table marks the signing kid with * and held keys with `here`; warnings name
    `mpagent keys renew` under 30 days and a signing kid that is not registered."""
    ks = ownkeys.KeySet(
        (
            ownkeys.RegisteredKey("old", {}, NOW + 5 * DAY),
            ownkeys.RegisteredKey("new", {}, NOW + 300 * DAY),
        ),
        "2027-01-15T10:00:00+00:00",
    )
    lines = ownkeys.table(ks, NOW, "new", {"new"})
    assert lines[0].split() == ["kid", "set", "updated", "expires", "private", "key"]
    assert lines[2].startswith("*") and "here" in lines[2] and "(300 days)" in lines[2]
    assert not lines[1].startswith("*") and "here" not in lines[1]
    assert ownkeys.warnings(ks, NOW, "new") == [
        'old expire(s) within 30 days (MP-121 "Expired key" after that); renew: mpagent keys renew'
    ]
    assert "not registered" in ownkeys.warnings(keyset("a"), NOW, "zz")[0]


# -- configedit ------------------------------------------------------------------------------

CONFIG = """\
# my mpagent config
default_profile = "app"

[profiles.admin]
environment = "test"  # the certificate client
client_id = "adm"
keystore = "virksomhet.p12"

[profiles.app]
# the app's client
environment = "test"
client_id = "app"
scopes = [
  "altinn:serviceowner",  # the one we use
  "idporten:dcr.read",
]
alias = "auth"   # old
admin_profile = "admin"

# comment about the next table
[profiles.app.env_names]
"altinn:serviceowner" = "ALTINN_TOKEN"
"""


def test_set_replaces_in_place_and_keeps_everything_else() -> None:
    """A key already there is replaced where it stands; comments, blank lines, order and the
    other tables are kept byte for byte."""
    new = configedit.set_profile_keys(CONFIG, "app", {"admin_profile": "other"})
    assert new == CONFIG.replace('admin_profile = "admin"', 'admin_profile = "other"')


def test_set_adds_after_last_key_and_removes() -> None:
    """New keys go after the table's last key (before the comment of the next table); None
    removes a key with its line."""
    values = {"keystore": "/k/new.pem", "kid": "k1", "alias": None}
    new = configedit.set_profile_keys(CONFIG, "app", values)
    assert 'alias = "auth"' not in new
    assert 'admin_profile = "admin"\nkeystore = "/k/new.pem"\nkid = "k1"\n\n# comment about' in new
    parsed = tomllib.loads(new)
    assert parsed["profiles"]["app"]["kid"] == "k1"
    assert parsed["profiles"]["app"]["env_names"] == {"altinn:serviceowner": "ALTINN_TOKEN"}
    assert parsed["profiles"]["admin"] == tomllib.loads(CONFIG)["profiles"]["admin"]


def test_set_keeps_the_comment_at_the_end_of_a_replaced_line() -> None:
    """A comment after a replaced one-line value stays on its line; a `#` inside the old
    string value is not taken for one."""
    text = '[profiles.app]\nkid = "a#b"   # the key in use\nalias = "x" # gone\n'
    new = configedit.set_profile_keys(text, "app", {"kid": "k2", "alias": None})
    assert new == '[profiles.app]\nkid = "k2"   # the key in use\n'


def test_set_replaces_a_multiline_value_whole() -> None:
    """A value spanning lines (an array with comments) is replaced whole."""
    new = configedit.set_profile_keys(CONFIG, "app", {"scopes": None})
    assert 'serviceowner",  # the one' not in new and "idporten:dcr.read" not in new
    assert "scopes" not in tomllib.loads(new)["profiles"]["app"]


def test_set_quotes_values() -> None:
    """Quotes, backslashes (Windows paths), control characters and non-ASCII survive as TOML."""
    value = 'C:\\keys\\"mine"\x7f\tÆ.pem'
    new = configedit.set_profile_keys(CONFIG, "admin", {"keystore": value})
    assert tomllib.loads(new)["profiles"]["admin"]["keystore"] == value


def test_set_quoted_header_and_key() -> None:
    """A quoted table name and a quoted key are recognised."""
    text = '[profiles."my app"]\n"kid" = "old"\nclient_id = "x"\n'
    new = configedit.set_profile_keys(text, "my app", {"kid": "new"})
    assert new == '[profiles."my app"]\nkid = "new"\nclient_id = "x"\n'


def test_set_keeps_crlf_and_a_missing_last_newline() -> None:
    """Windows line endings stay; a file without a final newline gets the new line right."""
    text = '[profiles.a]\r\nclient_id = "x"\r\n'
    assert configedit.set_profile_keys(text, "a", {"kid": "k"}) == (
        '[profiles.a]\r\nclient_id = "x"\r\nkid = "k"\r\n'
    )
    assert configedit.set_profile_keys('[profiles.a]\nclient_id = "x"', "a", {"kid": "k"}) == (
        '[profiles.a]\nclient_id = "x"\nkid = "k"\n'
    )


@pytest.mark.parametrize(
    "text",
    [
        '[profiles]\napp = { client_id = "x", kid = "old" }\n',
        'profiles.app.client_id = "x"\n',
        '[profiles.other]\nclient_id = "x"\n',
        '[[profiles.app]]\nclient_id = "x"\n',
    ],
)
def test_set_refuses_what_is_not_a_plain_table(text: str) -> None:
    """An inline table, dotted keys or a missing table is not edited: the error gives the
    lines to write by hand."""
    with pytest.raises(ConfigError, match=r'by hand: kid = "k1"; and remove alias'):
        configedit.set_profile_keys(text, "app", {"kid": "k1", "alias": None})


def test_update_profile_writes_atomically_keeping_mode_and_link(tmp_path: Path) -> None:
    """update_profile edits the file a symlink points at (the link stays) and keeps its mode."""
    real = tmp_path / "real.toml"
    real.write_text(CONFIG)
    os.chmod(real, 0o640)
    link = tmp_path / "config.toml"
    link.symlink_to(real)
    configedit.update_profile(link, "app", {"kid": "k1"})
    assert link.is_symlink()
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert tomllib.loads(real.read_text())["profiles"]["app"]["kid"] == "k1"
    assert "# the app's client" in real.read_text()


def test_update_profile_refuses_and_keeps_file(tmp_path: Path) -> None:
    """A profile that cannot be edited leaves the file as it was."""
    path = tmp_path / "config.toml"
    path.write_text('[profiles]\napp = { client_id = "x" }\n')
    with pytest.raises(ConfigError, match=str(path)):
        configedit.update_profile(path, "app", {"kid": "k1"})
    assert path.read_text() == '[profiles]\napp = { client_id = "x" }\n'


# -- config: the own-keys settings -----------------------------------------------------------


def parse_profiles(**profiles: dict[str, object]) -> Config:
    return config.parse({"profiles": profiles}, Path("/c/config.toml"))


ADMIN: dict[str, object] = {"environment": "test", "client_id": "adm", "keystore": "/k/v.p12"}


def test_config_keystore_optional_with_admin_profile() -> None:
    """A profile with admin_profile needs no keystore yet; the settings are read."""
    cfg = parse_profiles(
        admin=ADMIN,
        app={
            "environment": "test",
            "client_id": "app",
            "admin_profile": "admin",
            "admin_api": "http://127.0.0.1:8080/clients",
            "auto_renew": True,
        },
    )
    app = cfg.profile("app")
    assert app.keystore is None and app.admin_profile == "admin" and app.auto_renew
    assert app.admin_api == "http://127.0.0.1:8080/clients/"
    assert cfg.profile("admin").auto_renew is False


def test_a_profile_with_exchange_is_never_its_own_admin() -> None:
    """A certificate profile that exchanges its tokens for Altinn's cannot be the default
    admin profile: the admin API takes Maskinporten tokens."""
    from mpagent import adminapi

    cfg = parse_profiles(altinn={**ADMIN, "exchange": "altinn-tt02"})
    with pytest.raises(ConfigError, match=r"has exchange = 'altinn-tt02'.*admin_profile"):
        adminapi.admin_profile(cfg, cfg.profile("altinn"))
    plain = parse_profiles(admin=ADMIN)
    assert adminapi.admin_profile(plain, plain.profile("admin")).name == "admin"


def test_an_admin_profile_that_signs_with_a_kid_is_refused() -> None:
    """admin_profile naming a profile that signs with a kid: the admin API takes only
    certificate-signed tokens, so it is a ConfigError saying so."""
    from mpagent import adminapi

    cfg = parse_profiles(
        admin={**ADMIN, "kid": "k1", "keystore_type": "pem", "keystore": "/k/a.pem"},
        app={"environment": "test", "client_id": "app", "admin_profile": "admin"},
    )
    with pytest.raises(ConfigError, match="takes only tokens signed with the business certificate"):
        adminapi.admin_profile(cfg, cfg.profile("app"))


def test_a_certificate_admin_may_not_get_a_registered_key() -> None:
    """A certificate profile that is its own admin, or another's admin_profile, would lose
    the admin API with a registered key: refused; a certificate profile whose keys another
    profile manages is not."""
    from mpagent import adminapi

    cfg = parse_profiles(
        admin=ADMIN,
        solo={**ADMIN, "client_id": "solo"},
        cert={**ADMIN, "client_id": "cert", "admin_profile": "admin"},
    )
    with pytest.raises(ConfigError, match="is admin_profile of cert: once its client"):
        adminapi.refuse_admin_lockout(cfg, cfg.profile("admin"))
    with pytest.raises(ConfigError, match=r"is its own admin profile.*refuses its certificate"):
        adminapi.refuse_admin_lockout(cfg, cfg.profile("solo"))
    adminapi.refuse_admin_lockout(cfg, cfg.profile("cert"))


def test_config_keystore_missing_without_admin_profile_says_both_ways() -> None:
    """Without keystore and admin_profile the error names both fixes."""
    cfg = parse_profiles(app={"environment": "test", "client_id": "app"})
    with pytest.raises(ConfigError, match=r"keystore is missing.*admin_profile.*keys create"):
        cfg.profile("app")


def test_config_admin_profile_naming_no_profile() -> None:
    """admin_profile naming no profile makes that profile unusable, with a did-you-mean."""
    cfg = parse_profiles(
        admin=ADMIN, app={"environment": "test", "client_id": "app", "admin_profile": "admni"}
    )
    with pytest.raises(
        ConfigError, match=r"admin_profile = 'admni' names no profile; did you mean 'admin'"
    ):
        cfg.profile("app")
    assert cfg.profile("admin").client_id == "adm"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("admin_api", "http://api.example.no/clients/", "plain http:// to api.example.no"),
        ("admin_api", "api.example.no", "write the admin API's URL"),
        ("auto_renew", "yes", "auto_renew = true or auto_renew = false"),
    ],
)
def test_config_own_key_settings_checked(key: str, value: object, message: str) -> None:
    """admin_api must be https (http only to loopback); auto_renew a boolean."""
    cfg = parse_profiles(admin={**ADMIN, key: value})
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg.profile("admin")


# -- keys.generate: kids -------------------------------------------------------------------


def test_new_kid_names_profile_and_date_and_differs() -> None:
    """A generated kid carries the profile and the date, with random bits that differ."""
    from mpagent.keys.generate import new_kid

    first, second = new_kid("my app", NOW), new_kid("my app", NOW)
    assert first.startswith("mpagent-my-app-20270115-") and first != second


@pytest.mark.parametrize("kid", ["../x", "a/b", "", "-lead", "a b", "k\x1b", "x" * 101])
def test_check_kid_refuses_what_is_no_file_name(kid: str) -> None:
    """A user's kid must be a plain file name: letters, digits, '.', '_', '-'."""
    from mpagent.keys.generate import check_kid

    with pytest.raises(ConfigError, match="cannot be used"):
        check_kid(kid)
    assert check_kid("min_egen_nokkel.2") == "min_egen_nokkel.2"


def test_keys_dir_is_absolute_with_a_relative_xdg_data_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative data dir (XDG_DATA_HOME=rel-data, which platformdirs before 4.14 returns
    as it stands) still gives an absolute keys directory and key path, as they are written
    into config.toml (where a relative path is taken from the file's folder)."""
    from mpagent import paths
    from mpagent.keys.generate import create_key, keys_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths, "data_dir", lambda: "rel-data/mpagent")  # the OS edge
    assert keys_dir() == tmp_path / "rel-data" / "mpagent" / "keys"
    path, _ = create_key(None, "k-rel")
    assert path.is_absolute() and path == keys_dir() / "k-rel.pem" and path.is_file()
