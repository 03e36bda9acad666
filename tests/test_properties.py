"""`mpagent import-properties`: Java properties syntax, the jwt-grant-generator keys mapped to a
profile, the config file written atomically without disturbing it, passwords to the keyring (or
their variable names when there is none), and the imported profile getting a real token."""

from __future__ import annotations

import argparse
import base64
import io
import stat
import tomllib
from pathlib import Path
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpagent import config as config_module
from mpagent import pki
from mpagent.emulator import Emulator
from mpagent.errors import ConfigError
from mpagent.properties import (
    environment_for,
    main,
    parse_properties,
    profile_name,
    to_profile,
)

from .conftest import CLIENT_ID, PASSWORD, SCOPES, run_cli
from .keystores import write_jks

try:  # a real Secret Service on a private D-Bus, when tests/secret_service.py exists
    from .secret_service import secret_service  # noqa: F401  (the fixture)

    HAVE_SECRET_SERVICE = True
except ImportError:
    HAVE_SECRET_SERVICE = False

KEY_PASSWORD = "key-pw-Øst-7"
FAIL_BACKEND = {"PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}
BASE = {
    "issuer": CLIENT_ID,
    "audience": "https://test.maskinporten.no/",
    "scope": "idporten:dcr.read idporten:dcr.write",
    "keystore.file": "virksomhet.p12",
}


def properties_text(props: dict[str, str]) -> str:
    return "".join(f"{key}={value}\n" for key, value in props.items())


def profile_of(props: dict[str, str], name: str = "dev") -> config_module.Profile:
    """The profile `to_profile` makes, read back through config.parse."""
    toml, _, _ = to_profile(props, name, base_dir=Path("/props"))
    return config_module.parse(tomllib.loads(toml), Path("/cfg/config.toml")).profiles[name]


def run_main(source: Path, config: Path, profile: str | None = None) -> str:
    """`main` in this process; only for files without passwords, so no keyring is touched."""
    out = io.StringIO()
    args = argparse.Namespace(file=str(source), profile=profile, config=str(config))
    assert main(args, out) == 0
    return out.getvalue()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def p12_bytes(p12: Path) -> bytes:
    return p12.read_bytes()


# -- Java properties syntax ---------------------------------------------------------------


def test_separators() -> None:
    """'=', ':' and whitespace separate key and value; only the first separator counts."""
    text = "a=1\nb: 2\nc 3\nd\t=\t4\ne\nf = = x\ng:h=i\n"
    expected = {"a": "1", "b": "2", "c": "3", "d": "4", "e": "", "f": "= x", "g": "h=i"}
    assert parse_properties(text) == expected


def test_comments_and_blank_lines() -> None:
    """# and ! comment lines and blank lines are skipped; a # inside a value is kept."""
    text = "# comment\n   ! also\n\n \t \nk = v # not a comment\n"
    assert parse_properties(text) == {"k": "v # not a comment"}


def test_continuation_lines() -> None:
    """Odd trailing backslashes continue a line (minus the indent); even ones and comments don't."""
    text = "scope=a \\\n     b \\\n\tc\nx=ends\\\\\ny=1\n# no \\\nz=2\nw=p\\\n  #q\n"
    props = parse_properties(text)
    assert props == {"scope": "a b c", "x": "ends\\", "y": "1", "z": "2", "w": "p#q"}


def test_escapes() -> None:
    """\\t \\n \\r \\f, \\uXXXX, escaped separators and spaces in keys, any other escaped char."""
    text = "k\\ ey\\=1 = v\\tal\\nue \\u00e6\\u00D8\\:\\=\\\\\\q\n"
    assert parse_properties(text) == {"k ey=1": "v\tal\nue æØ:=\\q"}


def test_unicode_escape_is_taken_literally() -> None:
    """A \\u escape gives its character as it is: \\u0074 is "t", not a tab."""
    assert parse_properties("k=\\u0074\\u005cn\n") == {"k": "t\\n"}


def test_surrogate_pair_escape() -> None:
    """Two \\u escapes forming a UTF-16 surrogate pair are one character."""
    assert parse_properties("k=\\uD83D\\uDE00!\n") == {"k": "😀!"}


@pytest.mark.parametrize("bad", ["b=\\u12G4", "b=\\u12", "b=\\uD83D"])
def test_malformed_unicode_escape(bad: str) -> None:
    """A malformed or unpaired \\u escape is an error naming its line."""
    with pytest.raises(ValueError, match="line 2"):
        parse_properties(f"a=1\n{bad}\n")


def test_line_endings_and_trailing_backslash() -> None:
    """CRLF and CR end lines too; a backslash at the very end of the file is dropped."""
    assert parse_properties("a=1\r\nb=2\rc=3\\") == {"a": "1", "b": "2", "c": "3"}


def test_last_duplicate_wins() -> None:
    """A key given twice keeps its last value, as java.util.Properties does."""
    assert parse_properties("k=1\nk=2\n") == {"k": "2"}


def java_escape(text: str, *, key: bool, limit: int) -> str:
    """What java.util.Properties.store writes: characters above `limit` as \\u escapes (0x7E
    for store(OutputStream), 0xFF for a file written ISO-8859-1 by hand)."""
    out = []
    for i, char in enumerate(text):
        if char in "\\=:#!" or (char == " " and (key or i == 0)):
            out.append("\\" + char)
        elif char in "\t\n\r\f":
            out.append({"\t": "\\t", "\n": "\\n", "\r": "\\r", "\f": "\\f"}[char])
        elif ord(char) > limit or ord(char) < 0x20:
            units = char.encode("utf-16-be")
            out += [f"\\u{units[j]:02X}{units[j + 1]:02X}" for j in range(0, len(units), 2)]
        else:
            out.append(char)
    return "".join(out)


@given(st.dictionaries(st.text(min_size=1), st.text(), max_size=5), st.sampled_from([0x7E, 0xFF]))
@settings(max_examples=300, deadline=None)
def test_round_trip_of_java_escaped_files(props: dict[str, str], limit: int) -> None:
    """Whatever Java writes, parse_properties reads back unchanged."""
    text = "".join(
        f"{java_escape(k, key=True, limit=limit)}={java_escape(v, key=False, limit=limit)}\n"
        for k, v in props.items()
    )
    assert parse_properties(text) == props


# -- mapping to a profile -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("audience", "token_endpoint", "environment", "note"),
    [
        (
            "https://test.maskinporten.no/",
            "https://test.maskinporten.no/token",
            "test",
            "not needed",
        ),
        ("https://maskinporten.no/", None, "prod", 'environment = "prod"'),
        ("https://test.maskinporten.no", None, "test", "lacks the issuer's trailing slash"),
        ("https://maskinporten.no", None, "prod", "lacks the issuer's trailing slash"),
        ("https://ver2.maskinporten.no/", None, "test", "retired test environment"),
        ("https://oidc-ver2.difi.no/idporten-oidc-provider/", None, "test", "retired"),
        ("https://test.maskinporten.no/token", None, "test", "token endpoint, not the issuer"),
        (None, "https://maskinporten.no/token", "prod", "taken from token.endpoint"),
        ("https://test.sky.maskinporten.no", None, "https://test.sky.maskinporten.no", "→"),
        ("http://127.0.0.1:5000/", None, "http://127.0.0.1:5000/", "→"),
    ],
)
def test_environment_mapping(
    audience: str | None, token_endpoint: str | None, environment: str, note: str
) -> None:
    """audience (else token.endpoint) becomes test, prod or the issuer URL, with a note."""
    env, notes = environment_for(audience, token_endpoint)
    assert env == environment
    assert any(note in line for line in notes), notes


def test_minimal_file() -> None:
    """The four required keys make a valid profile; each scope becomes its own entry."""
    prof = profile_of(BASE)
    assert (prof.environment, prof.client_id) == ("test", CLIENT_ID)
    assert prof.scopes == ("idporten:dcr.read", "idporten:dcr.write")
    assert prof.keystore == Path("/props/virksomhet.p12") and prof.keystore_type is None


def test_inline_keystore(p12_bytes: bytes) -> None:
    """base64: keystores go to keystores/NAME.p12; no base64 text is in the TOML or the notes."""
    encoded = base64.b64encode(p12_bytes).decode()
    props = {**BASE, "keystore.file": "base64:" + encoded}
    toml, _, notes = to_profile(props, "dev", base_dir=Path("/props"))
    assert profile_of(props).keystore == Path("/cfg/keystores/dev.p12")
    assert encoded[:40] not in toml + "".join(notes)


def test_keystore_type_jks(tmp_path: Path, leaf: pki.Issued) -> None:
    """keystore.type JKS becomes keystore_type = "jks"; an inline JKS is written as .jks."""
    assert profile_of({**BASE, "keystore.type": "JKS"}).keystore_type == "jks"
    jks_file = write_jks(tmp_path / "k.jks", {"auth": leaf}, PASSWORD, PASSWORD)
    inline = "base64:" + base64.b64encode(jks_file.read_bytes()).decode()
    prof = profile_of({**BASE, "keystore.file": inline, "keystore.type": "JKS"})
    assert prof.keystore == Path("/cfg/keystores/dev.jks") and prof.keystore_type == "jks"


def test_keystore_type_pkcs12_and_alias() -> None:
    """keystore.type PKCS12 and keystore.alias carry over."""
    prof = profile_of({**BASE, "keystore.type": "PKCS12", "keystore.alias": "auth"})
    assert (prof.keystore_type, prof.alias) == ("pkcs12", "auth")


def test_kid() -> None:
    """keystore.kid becomes kid, so grants carry kid instead of x5c."""
    assert profile_of({**BASE, "keystore.kid": "key-2026"}).kid == "key-2026"


def test_optional_claims() -> None:
    """resource, consumer_org and pid become the profile's claims; the pid is not shown."""
    props = {**BASE, "resource": "https://api.example/", "consumer_org": "123456789"}
    props["pid"] = "01017012345"
    prof = profile_of(props)
    assert prof.claims == {
        "resource": "https://api.example/",
        "consumer_org": "123456789",
        "pid": "01017012345",
    }
    _, _, notes = to_profile(props, "dev", base_dir=Path("/props"))
    assert "01017012345" not in "".join(notes)


def test_absolute_keystore_path_is_kept() -> None:
    """An absolute keystore.file is used as it is."""
    assert profile_of({**BASE, "keystore.file": "/certs/a.p12"}).keystore == Path("/certs/a.p12")


@pytest.mark.parametrize("key", ["issuer", "scope", "keystore.file", "audience"])
def test_missing_required_key(key: str) -> None:
    """A file without a required key is refused with an error naming that key."""
    props = {k: v for k, v in BASE.items() if k != key}
    with pytest.raises(ValueError, match=f"lacks {key.replace('.', '[.]')} "):
        to_profile(props, "dev", base_dir=Path("/props"))


def test_token_endpoint_alone_is_enough() -> None:
    """Without audience, the issuer is taken from token.endpoint."""
    props = {k: v for k, v in BASE.items() if k != "audience"}
    props["token.endpoint"] = "https://maskinporten.no/token"
    assert profile_of(props).environment == "prod"


def test_passwords_are_returned_never_in_toml() -> None:
    """Both passwords are returned for the keyring, and are in neither the TOML nor the notes."""
    props = {**BASE, "keystore.password": PASSWORD, "keystore.alias.password": KEY_PASSWORD}
    toml, passwords, notes = to_profile(props, "dev", base_dir=Path("/props"))
    assert passwords == {"keystore": PASSWORD, "key": KEY_PASSWORD}
    for secret in (PASSWORD, KEY_PASSWORD):
        assert secret not in toml + "".join(notes)


def test_equal_key_password_is_stored_once() -> None:
    """A key password equal to the store password is not stored separately."""
    props = {**BASE, "keystore.password": PASSWORD, "keystore.alias.password": PASSWORD}
    _, passwords, notes = to_profile(props, "dev", base_dir=Path("/props"))
    assert passwords == {"keystore": PASSWORD} and any("stored once" in n for n in notes)


def test_unknown_keys_are_named_as_ignored() -> None:
    """Keys mpagent does not use are listed as ignored, by name only."""
    _, _, notes = to_profile({**BASE, "proxy.host": "secret-ish"}, "dev", base_dir=Path("/p"))
    assert "proxy.host: not used by mpagent, ignored" in notes
    assert "secret-ish" not in "".join(notes)


def test_bad_inline_keystore() -> None:
    """base64: text that is not base64, or not a keystore, is refused clearly."""
    with pytest.raises(ValueError, match="not valid base64"):
        to_profile({**BASE, "keystore.file": "base64:%%%"}, "dev", base_dir=Path("/p"))
    with pytest.raises(ValueError, match="not a JKS or PKCS#12"):
        to_profile({**BASE, "keystore.file": "base64:aGVsbG8="}, "dev", base_dir=Path("/p"))


def test_profile_name() -> None:
    """The default name comes from the file name; --profile must be a plain name."""
    assert profile_name(None, Path("/x/My Client.properties")) == "My-Client"
    assert profile_name("prod_2", Path("x")) == "prod_2"
    with pytest.raises(ConfigError, match="letters, digits"):
        profile_name("a/b", Path("x"))


# -- the command: files ---------------------------------------------------------------------


def test_creates_the_config(tmp_path: Path, home: Path) -> None:
    """Without a config file, one is created 0600, holding just the profile, and says so."""
    source = tmp_path / "client.properties"
    source.write_text(properties_text(BASE), encoding="iso-8859-1")
    config = tmp_path / "new" / "config.toml"
    output = run_main(source, config)
    assert mode(config) == 0o600
    assert set(config_module.load(config).profiles) == {"client"}
    assert f"imported {source} as profile 'client' into {config}" in output
    assert "issuer → client_id" in output and "next: mpagent doctor --profile client" in output
    assert not list(config.parent.glob(".config.toml.*"))  # no temp file left behind


def test_reads_iso_8859_1(tmp_path: Path, home: Path) -> None:
    """The file is read as ISO-8859-1, as Java reads properties."""
    source = tmp_path / "c.properties"
    source.write_bytes(
        properties_text({**BASE, "resource": "https://api.example/blå"}).encode("latin-1")
    )
    run_main(source, tmp_path / "config.toml", "dev")
    prof = config_module.load(tmp_path / "config.toml").profiles["dev"]
    assert prof.claims["resource"] == "https://api.example/blå"


def test_relative_keystore_is_relative_to_the_properties_file(tmp_path: Path, home: Path) -> None:
    """A relative keystore.file is resolved against the properties file's directory."""
    (tmp_path / "props").mkdir()
    source = tmp_path / "props" / "c.properties"
    source.write_text(properties_text(BASE))
    run_main(source, tmp_path / "config.toml", "dev")
    prof = config_module.load(tmp_path / "config.toml").profiles["dev"]
    assert prof.keystore == tmp_path / "props" / "virksomhet.p12"


def test_inline_keystore_written_0600(tmp_path: Path, home: Path, p12_bytes: bytes) -> None:
    """The inline keystore's bytes land in <config dir>/keystores/NAME.p12, 0600 in a 0700 dir."""
    encoded = base64.b64encode(p12_bytes).decode()
    source = tmp_path / "c.properties"
    source.write_text(properties_text({**BASE, "keystore.file": "base64:" + encoded}))
    config = tmp_path / "cfg" / "config.toml"
    output = run_main(source, config, "dev")
    written = config.parent / "keystores" / "dev.p12"
    assert written.read_bytes() == p12_bytes
    assert (mode(written), mode(written.parent)) == (0o600, 0o700)
    assert config_module.load(config).profiles["dev"].keystore == written
    assert encoded[:40] not in output + config.read_text()


def test_existing_config_is_preserved(tmp_path: Path, home: Path) -> None:
    """An existing config keeps every byte (comments included); the profile is appended."""
    config = tmp_path / "config.toml"
    existing = (
        '# my settings\ndefault_profile = "old"\n\n[agent]\nlog_level = "debug"\n\n'
        '[profiles.old]  # the first one\nenvironment = "prod"\nclient_id = "x"\n'
        'scopes = ["a"]\nkeystore = "old.p12"'  # no final newline
    )
    config.write_text(existing)
    source = tmp_path / "new.properties"
    source.write_text(properties_text(BASE))
    run_main(source, config)
    text = config.read_text()
    assert text.startswith(existing + "\n")
    loaded = config_module.load(config)
    assert set(loaded.profiles) == {"old", "new"} and loaded.default_profile == "old"
    assert loaded.agent.log_level == "debug"


def test_existing_profile_is_refused(tmp_path: Path, home: Path, p12_bytes: bytes) -> None:
    """Importing over an existing profile changes nothing and says how to pick another name."""
    config = tmp_path / "config.toml"
    existing = '[profiles.dev]\nenvironment = "test"\nclient_id = "x"\nscopes = ["a"]\nkeystore = "k.p12"\n'
    config.write_text(existing)
    source = tmp_path / "c.properties"
    inline = "base64:" + base64.b64encode(p12_bytes).decode()
    source.write_text(properties_text({**BASE, "keystore.file": inline}))
    with pytest.raises(ConfigError, match=r"'dev' exists already.*--profile dev-2"):
        run_main(source, config, "dev")
    assert config.read_text() == existing
    assert not (tmp_path / "keystores").exists()


def test_result_is_validated_before_writing(tmp_path: Path, home: Path, p12_bytes: bytes) -> None:
    """A profile config.parse would refuse (a bad consumer_org) writes nothing at all."""
    source = tmp_path / "c.properties"
    inline = "base64:" + base64.b64encode(p12_bytes).decode()
    source.write_text(properties_text({**BASE, "keystore.file": inline, "consumer_org": "12"}))
    config = tmp_path / "cfg" / "config.toml"
    with pytest.raises(ConfigError, match=r"not imported.*consumer_org"):
        run_main(source, config, "dev")
    assert not (tmp_path / "cfg").exists()


def test_invalid_existing_config_is_refused(tmp_path: Path, home: Path) -> None:
    """A config file that is not valid TOML is left alone, with a request to fix it first."""
    config = tmp_path / "config.toml"
    config.write_text("[profiles\n")
    source = tmp_path / "c.properties"
    source.write_text(properties_text(BASE))
    with pytest.raises(ConfigError, match=r"not valid TOML.*fix it first"):
        run_main(source, config)
    assert config.read_text() == "[profiles\n"


def test_missing_key_through_the_cli(tmp_path: Path, home: Path) -> None:
    """The CLI names the file and the missing key, exits 78 and writes nothing."""
    source = tmp_path / "c.properties"
    source.write_text(properties_text({k: v for k, v in BASE.items() if k != "issuer"}))
    config = tmp_path / "config.toml"
    result = run_cli("--config", str(config), "import-properties", str(source))
    assert result.returncode == 78 and result.stdout == ""
    assert f"mpagent: {source}: lacks issuer (the client_id)" in result.stderr
    assert not config.exists()


# -- the command: passwords -------------------------------------------------------------------


def test_no_keyring_prints_the_variable_names(tmp_path: Path, home: Path) -> None:
    """Without a usable keyring: exit 0, the variables to set by name, no password anywhere."""
    props = {**BASE, "keystore.password": PASSWORD, "keystore.alias.password": KEY_PASSWORD}
    source = tmp_path / "c.properties"
    source.write_text(properties_text(props), encoding="iso-8859-1")
    config = tmp_path / "config.toml"
    result = run_cli("--config", str(config), "import-properties", str(source), env=FAIL_BACKEND)
    assert result.returncode == 0, result.stderr
    assert (
        "export MPAGENT_KEYSTORE_PASSWORD=<the keystore.password from c.properties>"
        in result.stdout
    )
    assert (
        "export MPAGENT_KEY_PASSWORD=<the keystore.alias.password from c.properties>"
        in result.stdout
    )
    for secret in (PASSWORD, KEY_PASSWORD):
        assert secret not in result.stdout + result.stderr + config.read_text()


@pytest.mark.keyring
def test_passwords_go_to_the_keyring(
    tmp_path: Path, home: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a real Secret Service, both passwords are stored under mpagent/<profile>/..."""
    if not HAVE_SECRET_SERVICE:
        pytest.skip("secret service fixture not available yet")
    service: Any = request.getfixturevalue("secret_service")
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", service.address)
    monkeypatch.delenv("PYTHON_KEYRING_BACKEND", raising=False)
    service.clear()
    props = {**BASE, "keystore.password": PASSWORD, "keystore.alias.password": KEY_PASSWORD}
    source = tmp_path / "c.properties"
    source.write_text(properties_text(props), encoding="iso-8859-1")
    result = run_cli(
        "--config", str(tmp_path / "config.toml"), "import-properties", str(source), "-p", "dev"
    )
    assert result.returncode == 0, result.stderr
    assert service.stored("dev/keystore") == PASSWORD
    assert service.stored("dev/key") == KEY_PASSWORD
    assert "keystore.password → OS keyring (mpagent, dev/keystore)" in result.stdout
    for secret in (PASSWORD, KEY_PASSWORD):
        assert secret not in result.stdout + result.stderr


# -- end to end -------------------------------------------------------------------------------


def test_imported_profile_gets_a_token(
    tmp_path: Path, home: Path, emulator: Emulator, p12_bytes: bytes
) -> None:
    """An emulator properties file with an inline keystore imports, then `get --no-agent` works."""
    props = {
        "issuer": CLIENT_ID,
        "audience": emulator.issuer,
        "token.endpoint": emulator.token_endpoint,
        "scope": SCOPES[0],
        "keystore.file": "base64:" + base64.b64encode(p12_bytes).decode(),
        "keystore.type": "PKCS12",
        "keystore.alias": "auth",
        "keystore.password": PASSWORD,  # non-ASCII: the file is ISO-8859-1
        "keystore.alias.password": PASSWORD,
    }
    source = tmp_path / "emulator.properties"
    source.write_text(properties_text(props), encoding="iso-8859-1")
    config = tmp_path / "config.toml"
    imported = run_cli("--config", str(config), "import-properties", str(source), env=FAIL_BACKEND)
    assert imported.returncode == 0, imported.stderr
    env = {**FAIL_BACKEND, "MPAGENT_KEYSTORE_PASSWORD": PASSWORD}
    got = run_cli(
        "--config", str(config), "get", SCOPES[0], "--no-agent", "-p", "emulator", env=env
    )
    assert got.returncode == 0, got.stderr
    claims = jwt.decode(got.stdout.strip(), options={"verify_signature": False})
    assert claims["scope"] == SCOPES[0] and claims["client_id"] == CLIENT_ID
