"""`mpagent import-properties`: Java properties syntax, the jwt-grant-generator keys mapped to a
profile (unknown keys with "did you mean", a relative keystore from the working directory, the
keystore's real type, one token for the scope set), the config file written atomically without
disturbing it, several files into one config, passwords to the keyring (or their variable
names when there is none), and imported profiles getting real tokens from the emulator."""

from __future__ import annotations

import argparse
import base64
import io
import stat
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpagent import config as config_module
from mpagent import envfile, paths
from mpagent.emulator import Emulator, pki
from mpagent.errors import ConfigError
from mpagent.properties import (
    environment_for,
    key_lines,
    key_problems,
    main,
    parse_properties,
    profile_name,
    to_profile,
)

from .agentproc import AgentProcess, wait_for
from .conftest import CLIENT_ID, PASSWORD, SCOPES, issuer_key, run_cli
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
    assert main(args, out, io.StringIO()) == 0
    return out.getvalue()


def import_cli(
    config: Path, source: Path, *extra: str, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """The real `mpagent import-properties`; no OS keyring unless the caller says otherwise."""
    args = ("--config", str(config), "import-properties", str(source), *extra)
    return run_cli(*args, env={**FAIL_BACKEND, **env}, cwd=cwd)


def write_props(path: Path, props: dict[str, str]) -> Path:
    path.write_text(properties_text(props), encoding="iso-8859-1")
    return path


def inline(data: bytes) -> str:
    return "base64:" + base64.b64encode(data).decode()


def emulator_props(emu: Emulator, scope: str, keystore: str, **more: str) -> dict[str, str]:
    """A properties file for the emulator, with the keystore password in it."""
    props = {"issuer": CLIENT_ID, "audience": emu.issuer, "scope": scope}
    return {**props, "keystore.file": keystore, "keystore.password": PASSWORD, **more}


def get_no_agent(config: Path, profile: str, scope: str) -> subprocess.CompletedProcess[str]:
    env = {**FAIL_BACKEND, "MPAGENT_KEYSTORE_PASSWORD": PASSWORD}
    return run_cli("--config", str(config), "get", "--no-agent", "-p", profile, scope, env=env)


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token.strip(), options={"verify_signature": False})


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def base(p12: Path) -> dict[str, str]:
    """BASE with the keystore as an absolute path to a real PKCS#12 file."""
    return {**BASE, "keystore.file": str(p12)}


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
        ("https://test.sky.maskinporten.no", None, "sky-test", 'environment = "sky-test"'),
        ("https://sky.maskinporten.no/", None, "sky", "has a trailing slash the issuer lacks"),
        (
            "https://sky.maskinporten.no/token",
            None,
            "sky",
            "not the issuer https://sky.maskinporten.no",
        ),
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
    """The four required keys make a valid profile."""
    prof = profile_of(BASE)
    assert (prof.environment, prof.client_id) == ("test", CLIENT_ID)
    assert prof.keystore == Path("/props/virksomhet.p12") and prof.keystore_type is None


def test_scope_set_is_one_entry() -> None:
    """`scope=a b` becomes one scopes entry, the canonical set, so one token for the set."""
    props = {**BASE, "scope": "idporten:dcr.write   idporten:dcr.read"}
    toml, _, notes = to_profile(props, "dev", base_dir=Path("/props"))
    assert 'scopes = ["idporten:dcr.read idporten:dcr.write"]' in toml
    assert profile_of(props).scopes == ("idporten:dcr.read idporten:dcr.write",)
    assert any("(one token for the set" in note for note in notes), notes


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
    inline_jks = inline(jks_file.read_bytes())
    prof = profile_of({**BASE, "keystore.file": inline_jks, "keystore.type": "JKS"})
    assert prof.keystore == Path("/cfg/keystores/dev.jks") and prof.keystore_type == "jks"


def test_declared_type_follows_the_content(
    tmp_path: Path, leaf: pki.Issued, p12_bytes: bytes
) -> None:
    """JKS declared on PKCS#12 bytes is imported as pkcs12, and PKCS12 on JKS as jks, each said."""
    toml, _, notes = to_profile(
        {**BASE, "keystore.type": "JKS"}, "dev", base_dir=Path("/p"), data=p12_bytes
    )
    assert 'keystore_type = "pkcs12"' in toml
    assert (
        "keystore.type=JKS, but the file is PKCS#12 (keytool's default since Java 9);"
        " imported as pkcs12"
    ) in notes
    jks_bytes = write_jks(tmp_path / "k.jks", {"auth": leaf}, PASSWORD, PASSWORD).read_bytes()
    toml, _, notes = to_profile(
        {**BASE, "keystore.type": "PKCS12"}, "dev", base_dir=Path("/p"), data=jks_bytes
    )
    assert 'keystore_type = "jks"' in toml
    assert "keystore.type=PKCS12, but the file is JKS; imported as jks" in notes


def test_keystore_type_pkcs12_and_alias() -> None:
    """keystore.type PKCS12 and keystore.alias carry over."""
    prof = profile_of({**BASE, "keystore.type": "PKCS12", "keystore.alias": "auth"})
    assert (prof.keystore_type, prof.alias) == ("pkcs12", "auth")


def test_kid() -> None:
    """keystore.kid becomes kid, so grants carry kid instead of x5c."""
    assert profile_of({**BASE, "keystore.kid": "key-2026"}).kid == "key-2026"


def test_optional_claims() -> None:
    """resource, consumer_org and pid become the profile's claims; the pid is not shown."""
    props = {**BASE, "resource": "https://api.example/", "consumer_org": "123456785"}
    props["pid"] = "01017012345"
    prof = profile_of(props)
    assert prof.claims == {
        "resource": "https://api.example/",
        "consumer_org": "123456785",
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


def test_bad_inline_keystore() -> None:
    """base64: text that is not base64, or not a keystore, is refused clearly."""
    with pytest.raises(ValueError, match="not valid base64"):
        to_profile({**BASE, "keystore.file": "base64:%%%"}, "dev", base_dir=Path("/p"))
    with pytest.raises(ValueError, match=r"keystore.file base64:… is not a JKS, PKCS#12"):
        to_profile({**BASE, "keystore.file": "base64:aGVsbG8="}, "dev", base_dir=Path("/p"))


def test_profile_name() -> None:
    """The default name comes from the file name; --profile must be a plain name."""
    assert profile_name(None, Path("/x/My Client.properties")) == "My-Client"
    assert profile_name("prod_2", Path("x")) == "prod_2"
    with pytest.raises(ConfigError, match="letters, digits"):
        profile_name("a/b", Path("x"))


# -- unknown keys ---------------------------------------------------------------------------


def problems(text: str) -> tuple[list[str], list[str]]:
    return key_problems(parse_properties(text), key_lines(text), "c.properties")


def test_near_miss_of_an_unset_key_is_an_error() -> None:
    """A typo of a known key the file does not set is an error with "did you mean" and its line."""
    errors, _ = problems("issuer=x\n# c\nkeystore.pasword=secret-value\n")
    assert errors == ["line 3: unknown key 'keystore.pasword', did you mean 'keystore.password'?"]


def test_near_miss_of_a_set_key_is_a_warning() -> None:
    """A typo of a key the file also sets is ignored with a warning naming the key that counts."""
    errors, warnings = problems("keystore.password=a\nkeystore.pasword=b\n")
    assert errors == []
    assert warnings == [
        "c.properties: line 2: unknown key 'keystore.pasword' ignored;"
        " 'keystore.password' (line 1) is used"
    ]


def test_unrelated_key_is_a_warning() -> None:
    """A key like no known one is ignored with a warning; its value is never shown."""
    errors, warnings = problems("proxy.host=secret-ish\n")
    assert errors == []
    assert warnings == [
        "c.properties: line 1: unknown key 'proxy.host' ignored: jwt-grant-generator has no such key"
    ]


def test_a_key_without_a_value_is_not_shown() -> None:
    """A lone word (perhaps a pasted password) is ignored with a warning that does not show it."""
    errors, warnings = problems("issuer=x\nkeystore.passwordd\n")
    assert errors == []
    assert warnings == ["c.properties: line 2: a key without a value (not shown), ignored"]


def test_every_java_key_is_known() -> None:
    """Every key of jwt-grant-generator (MASKINPORTEN.md §6) passes without a word."""
    keys = "issuer audience scope resource consumer_org pid token.endpoint keystore.file"
    keys += " keystore.password keystore.alias keystore.alias.password keystore.type keystore.kid"
    assert problems("".join(f"{key}=v\n" for key in keys.split())) == ([], [])


def test_typo_through_the_cli(tmp_path: Path, home: Path, base: dict[str, str]) -> None:
    """A mistyped password key: exit 78, the file, line and "did you mean" on stderr, nothing
    written, and the password nowhere."""
    source = write_props(tmp_path / "c.properties", {**base, "keystore.pasword": PASSWORD})
    config = tmp_path / "config.toml"
    result = import_cli(config, source)
    assert result.returncode == 78 and result.stdout == ""
    assert result.stderr == (
        f"mpagent: {source}: line 5: unknown key 'keystore.pasword', did you mean"
        " 'keystore.password'?; correct it and import again\n"
    )
    assert not config.exists() and PASSWORD not in result.stderr


def test_unknown_key_warns_through_the_cli(
    tmp_path: Path, home: Path, base: dict[str, str]
) -> None:
    """An unrelated key: exit 0, one `mpagent: warning:` line on stderr naming file and line."""
    source = write_props(tmp_path / "c.properties", {**base, "proxy.port": "3128"})
    result = import_cli(tmp_path / "config.toml", source)
    assert result.returncode == 0, result.stderr
    assert (
        f"mpagent: warning: {source}: line 5: unknown key 'proxy.port' ignored:"
        " jwt-grant-generator has no such key\n"
    ) in result.stderr


# -- the command: files ---------------------------------------------------------------------


def test_creates_the_config(tmp_path: Path, home: Path, base: dict[str, str]) -> None:
    """Without a config file, one is created 0600, holding just the profile, and says so."""
    source = write_props(tmp_path / "client.properties", base)
    config = tmp_path / "new" / "config.toml"
    output = run_main(source, config)
    assert mode(config) == 0o600
    assert set(config_module.load(config).profiles) == {"client"}
    assert f"imported {source} as profile 'client' into {config}" in output
    assert "issuer → client_id" in output and "next: mpagent doctor --profile client" in output
    assert not list(config.parent.glob(".config.toml.*"))  # no temp file left behind


def test_reads_iso_8859_1(tmp_path: Path, home: Path, base: dict[str, str]) -> None:
    """The file is read as ISO-8859-1, as Java reads properties."""
    source = tmp_path / "c.properties"
    source.write_bytes(
        properties_text({**base, "resource": "https://api.example/blå"}).encode("latin-1")
    )
    run_main(source, tmp_path / "config.toml", "dev")
    prof = config_module.load(tmp_path / "config.toml").profiles["dev"]
    assert prof.claims["resource"] == "https://api.example/blå"


def test_relative_keystore_is_taken_from_the_working_directory(
    tmp_path: Path, home: Path, p12: Path
) -> None:
    """A relative keystore.file is resolved against the working directory at import, as Java
    does, not the properties file's directory; the profile gets the absolute path, and says so."""
    (tmp_path / "props").mkdir()
    source = write_props(tmp_path / "props" / "c.properties", BASE)  # virksomhet.p12
    config = tmp_path / "config.toml"
    result = import_cli(config, source, "-p", "dev", cwd=p12.parent)
    assert result.returncode == 0, result.stderr
    assert config_module.load(config).profiles["dev"].keystore == p12
    assert f'keystore = "{p12}"' in config.read_text()
    assert (
        f"keystore.file virksomhet.p12 (from the working directory, as Java reads it)"
        f' → keystore = "{p12}"'
    ) in result.stdout


def test_missing_keystore_is_an_error_at_import(tmp_path: Path, home: Path) -> None:
    """A keystore.file that does not exist: exit 78 naming the properties file, the key and the
    resolved path; nothing written."""
    source = write_props(tmp_path / "c.properties", BASE)  # virksomhet.p12, which is not here
    work = tmp_path / "elsewhere"
    work.mkdir()
    config = tmp_path / "config.toml"
    result = import_cli(config, source, cwd=work)
    assert result.returncode == 78 and result.stdout == ""
    assert result.stderr == (
        f"mpagent: {source}: keystore.file virksomhet.p12: no file {work / 'virksomhet.p12'}"
        " (a relative path is taken from the working directory, as Java does); run the import"
        " where you ran the Java tool, or make keystore.file absolute\n"
    )
    assert not config.exists()


def test_missing_keystore_found_beside_the_properties(
    tmp_path: Path, home: Path, p12: Path
) -> None:
    """When the keystore is beside the properties file but not in the working directory, the
    error (exit 78) says so and how to import it."""
    source = write_props(p12.parent / "c.properties", BASE)
    work = tmp_path / "elsewhere"
    work.mkdir()
    result = import_cli(tmp_path / "config.toml", source, cwd=work)
    assert result.returncode == 78
    assert f"keystore.file virksomhet.p12: no file {work / 'virksomhet.p12'}" in result.stderr
    assert f"; {p12} exists: run the import in {p12.parent}, or make" in result.stderr


def test_missing_absolute_keystore(tmp_path: Path, home: Path) -> None:
    """A missing absolute keystore.file: exit 78, the file, the key and the path."""
    source = write_props(tmp_path / "c.properties", {**BASE, "keystore.file": "/nonexistent/a.p12"})
    result = import_cli(tmp_path / "config.toml", source)
    assert result.returncode == 78
    assert result.stderr == (
        f"mpagent: {source}: keystore.file /nonexistent/a.p12: no file /nonexistent/a.p12;"
        " correct the path and import again\n"
    )


def test_not_a_keystore_file(tmp_path: Path, home: Path) -> None:
    """A keystore.file that is no keystore at all: exit 78 naming the properties file and path."""
    (tmp_path / "notes.txt").write_text("hello")
    source = write_props(tmp_path / "c.properties", {**BASE, "keystore.file": "notes.txt"})
    result = import_cli(tmp_path / "config.toml", source, cwd=tmp_path)
    assert result.returncode == 78
    assert result.stderr == (
        f"mpagent: {source}: keystore.file notes.txt is not a JKS, PKCS#12, PEM or JWK keystore\n"
    )


def test_jks_declared_on_a_pkcs12_file(tmp_path: Path, home: Path, base: dict[str, str]) -> None:
    """keystore.type=JKS on a PKCS#12 file (keytool's default since Java 9): exit 0, imported
    as pkcs12, and the output says so."""
    source = write_props(tmp_path / "c.properties", {**base, "keystore.type": "JKS"})
    config = tmp_path / "config.toml"
    result = import_cli(config, source, "-p", "dev")
    assert result.returncode == 0, result.stderr
    assert (
        "  keystore.type=JKS, but the file is PKCS#12 (keytool's default since Java 9);"
        " imported as pkcs12\n"
    ) in result.stdout
    assert config_module.load(config).profiles["dev"].keystore_type == "pkcs12"


def test_inline_keystore_written_0600(tmp_path: Path, home: Path, p12_bytes: bytes) -> None:
    """The inline keystore's bytes land in <config dir>/keystores/NAME.p12, 0600 in a 0700 dir."""
    encoded = base64.b64encode(p12_bytes).decode()
    source = write_props(tmp_path / "c.properties", {**BASE, "keystore.file": "base64:" + encoded})
    config = tmp_path / "cfg" / "config.toml"
    output = run_main(source, config, "dev")
    written = config.parent / "keystores" / "dev.p12"
    assert written.read_bytes() == p12_bytes
    assert (mode(written), mode(written.parent)) == (0o600, 0o700)
    assert config_module.load(config).profiles["dev"].keystore == written
    assert encoded[:40] not in output + config.read_text()


def test_inline_keystore_never_replaces_a_file_or_a_symlink(
    tmp_path: Path, home: Path, p12_bytes: bytes
) -> None:
    """Where keystores/NAME.p12 exists already, even as a symlink planted there, the import
    exits 78 naming it, writes nothing through the link and creates no config."""
    source = write_props(tmp_path / "c.properties", {**BASE, "keystore.file": inline(p12_bytes)})
    config = tmp_path / "cfg" / "config.toml"
    (config.parent / "keystores").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("not yours\n")
    link = config.parent / "keystores" / "dev.p12"
    link.symlink_to(elsewhere)
    result = import_cli(config, source, "--profile", "dev")
    assert result.returncode == 78 and result.stdout == ""
    assert f"mpagent: {link} exists already; remove it, or import under another name" in (
        result.stderr
    )
    assert elsewhere.read_text() == "not yours\n" and not config.exists()


def test_existing_config_is_preserved(tmp_path: Path, home: Path, base: dict[str, str]) -> None:
    """An existing config keeps every byte (comments included); the profile is appended."""
    config = tmp_path / "config.toml"
    existing = (
        '# my settings\ndefault_profile = "old"\n\n[agent]\nlog_level = "debug"\n\n'
        '[profiles.old]  # the first one\nenvironment = "prod"\nclient_id = "x"\n'
        'scopes = ["a"]\nkeystore = "old.p12"'  # no final newline
    )
    config.write_text(existing)
    source = write_props(tmp_path / "new.properties", base)
    run_main(source, config)
    text = config.read_text()
    assert text.startswith(existing + "\n")
    loaded = config_module.load(config)
    assert set(loaded.profiles) == {"old", "new"} and loaded.default_profile == "old"
    assert loaded.agent.log_level == "debug"


def test_two_files_into_one_config(tmp_path: Path, home: Path, p12: Path) -> None:
    """test.properties then prod.properties: exit 0 each, [profiles.test] and [profiles.prod],
    the first kept byte for byte, and a note that commands now need --profile."""
    config = tmp_path / "config.toml"
    test = write_props(tmp_path / "test.properties", {**BASE, "keystore.file": str(p12)})
    prod = {**BASE, "keystore.file": str(p12), "audience": "https://maskinporten.no/"}
    prod_file = write_props(tmp_path / "prod.properties", prod)
    first = import_cli(config, test)
    assert first.returncode == 0, first.stderr
    after_first = config.read_text()
    second = import_cli(config, prod_file)
    assert second.returncode == 0, second.stderr
    assert config.read_text().startswith(after_first)
    assert f"mpagent: imported {prod_file} as profile 'prod' into {config}\n" in second.stdout
    assert (
        f"  {config} now has profiles test, prod and no default_profile: pass --profile"
        ' (mpagent get --profile prod SCOPE), or add default_profile = "test" at the top'
        " of the file\n"
    ) in second.stdout
    raw = tomllib.loads(config.read_text())
    assert list(raw["profiles"]) == ["test", "prod"]
    assert raw["profiles"]["test"]["environment"] == "test"
    assert raw["profiles"]["prod"]["environment"] == "prod"


def test_existing_profile_is_refused(tmp_path: Path, home: Path, p12_bytes: bytes) -> None:
    """Importing over an existing profile: exit 78, nothing changed (no keystore written either),
    and the message says how to pick another name."""
    config = tmp_path / "config.toml"
    existing = '[profiles.dev]\nenvironment = "test"\nclient_id = "x"\nscopes = ["a"]\nkeystore = "k.p12"\n'
    config.write_text(existing)
    source = write_props(tmp_path / "c.properties", {**BASE, "keystore.file": inline(p12_bytes)})
    result = import_cli(config, source, "-p", "dev")
    assert result.returncode == 78 and result.stdout == ""
    assert result.stderr == (
        f"mpagent: {config}: a profile 'dev' exists already; nothing imported. Choose another"
        f" name: mpagent import-properties {source} --profile dev-2\n"
    )
    assert config.read_text() == existing
    assert not (tmp_path / "keystores").exists()


def test_result_is_validated_before_writing(tmp_path: Path, home: Path, p12_bytes: bytes) -> None:
    """A profile config.parse would refuse (a bad consumer_org): exit 78, nothing written."""
    props = {**BASE, "keystore.file": inline(p12_bytes), "consumer_org": "12"}
    source = write_props(tmp_path / "c.properties", props)
    config = tmp_path / "cfg" / "config.toml"
    result = import_cli(config, source, "-p", "dev")
    assert result.returncode == 78
    assert f"mpagent: {source}: not imported, the result would be invalid:" in result.stderr
    assert "consumer_org" in result.stderr
    assert not (tmp_path / "cfg").exists()


def test_invalid_existing_config_is_refused(
    tmp_path: Path, home: Path, base: dict[str, str]
) -> None:
    """A config file that is not valid TOML is left alone, with a request to fix it first."""
    config = tmp_path / "config.toml"
    config.write_text("[profiles\n")
    source = write_props(tmp_path / "c.properties", base)
    with pytest.raises(ConfigError, match=r"not valid TOML.*fix it first"):
        run_main(source, config)
    assert config.read_text() == "[profiles\n"


def test_missing_key_through_the_cli(tmp_path: Path, home: Path) -> None:
    """The CLI names the file and the missing key, exits 78 and writes nothing."""
    source = write_props(
        tmp_path / "c.properties", {k: v for k, v in BASE.items() if k != "issuer"}
    )
    config = tmp_path / "config.toml"
    result = import_cli(config, source)
    assert result.returncode == 78 and result.stdout == ""
    assert f"mpagent: {source}: lacks issuer (the client_id)" in result.stderr
    assert not config.exists()


# -- the command: passwords -------------------------------------------------------------------


def test_no_password_says_none_stored(tmp_path: Path, home: Path, base: dict[str, str]) -> None:
    """A file without keystore.password: exit 0, "no keystore password stored" and how to give
    one, and no advice to delete the file."""
    source = write_props(tmp_path / "c.properties", base)
    result = import_cli(tmp_path / "config.toml", source, "-p", "dev")
    assert result.returncode == 0, result.stderr
    assert (
        "  no keystore password stored: c.properties has no keystore.password; if the keystore"
        " has one, run `mpagent secret set dev` (or set MPAGENT_KEYSTORE_PASSWORD)\n"
    ) in result.stdout
    assert "delete" not in result.stderr


def test_no_keyring_prints_the_variable_names(
    tmp_path: Path, home: Path, base: dict[str, str]
) -> None:
    """Without a usable keyring: exit 0, NOT stored with the variables to set by name, a warning
    naming the file to delete, and no password anywhere."""
    props = {**base, "keystore.password": PASSWORD, "keystore.alias.password": KEY_PASSWORD}
    source = write_props(tmp_path / "c.properties", props)
    config = tmp_path / "config.toml"
    result = import_cli(config, source, "-p", "dev")
    assert result.returncode == 0, result.stderr
    assert (
        "  keystore.password NOT stored: export MPAGENT_KEYSTORE_PASSWORD=<the keystore.password"
        " from c.properties> where mpagent runs, or run `mpagent secret set dev` once a keyring"
        " works\n"
    ) in result.stdout
    assert (
        "  keystore.alias.password NOT stored: export MPAGENT_KEY_PASSWORD=<the"
        " keystore.alias.password from c.properties> where mpagent runs, or run"
        " `mpagent secret set dev --key` once a keyring works\n"
    ) in result.stdout
    assert "mpagent: warning: cannot store passwords in the OS keyring" in result.stderr
    assert (
        f"mpagent: warning: {source} holds keystore.password and keystore.alias.password in"
        " plain text; delete the file once the password is kept somewhere safer"
        " (mpagent no longer needs it)\n"
    ) in result.stderr
    assert all(line.startswith("mpagent: ") for line in result.stderr.splitlines())
    for secret in (PASSWORD, KEY_PASSWORD):
        assert secret not in result.stdout + result.stderr + config.read_text()


@pytest.mark.keyring
def test_passwords_go_to_the_keyring(
    tmp_path: Path,
    home: Path,
    base: dict[str, str],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a real Secret Service: exit 0, both passwords stored under mpagent/<profile>/...,
    the output names service and entry, and tells the user to delete the file now."""
    if not HAVE_SECRET_SERVICE:
        pytest.skip("secret service fixture not available yet")
    service: Any = request.getfixturevalue("secret_service")
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", service.address)
    monkeypatch.delenv("PYTHON_KEYRING_BACKEND", raising=False)
    service.clear()
    props = {**base, "keystore.password": PASSWORD, "keystore.alias.password": KEY_PASSWORD}
    source = write_props(tmp_path / "c.properties", props)
    result = run_cli(
        "--config", str(tmp_path / "config.toml"), "import-properties", str(source), "-p", "dev"
    )
    assert result.returncode == 0, result.stderr
    assert service.stored("dev/keystore") == PASSWORD
    assert service.stored("dev/key") == KEY_PASSWORD
    assert (
        "  keystore.password stored in the OS keyring: service 'mpagent', entry 'dev/keystore'\n"
        in result.stdout
    )
    assert (
        "  keystore.alias.password stored in the OS keyring: service 'mpagent', entry 'dev/key'\n"
        in result.stdout
    )
    assert result.stderr == (
        f"mpagent: warning: {source} holds keystore.password and keystore.alias.password in"
        " plain text; delete the file now (mpagent no longer needs it)\n"
    )
    for secret in (PASSWORD, KEY_PASSWORD):
        assert secret not in result.stdout + result.stderr


# -- end to end -------------------------------------------------------------------------------


def test_imported_profile_gets_a_token(
    tmp_path: Path, home: Path, emulator: Emulator, p12_bytes: bytes
) -> None:
    """An emulator properties file with an inline keystore imports, then `get --no-agent` works."""
    props = emulator_props(
        emulator,
        SCOPES[0],
        inline(p12_bytes),
        **{"token.endpoint": emulator.token_endpoint, "keystore.type": "PKCS12"},
        **{"keystore.alias": "auth", "keystore.alias.password": PASSWORD},
    )
    source = write_props(tmp_path / "emulator.properties", props)  # PASSWORD is non-ASCII
    config = tmp_path / "config.toml"
    imported = import_cli(config, source)
    assert imported.returncode == 0, imported.stderr
    assert (
        f"mpagent: warning: {source} holds keystore.password, keystore.alias.password and the"
        " keystore itself (base64:) in plain text; delete the file once the password is kept"
        " somewhere safer (mpagent no longer needs it)\n"
    ) in imported.stderr
    got = get_no_agent(config, "emulator", SCOPES[0])
    assert got.returncode == 0, got.stderr
    claims = claims_of(got.stdout)
    assert claims["scope"] == SCOPES[0] and claims["client_id"] == CLIENT_ID


@pytest.mark.parametrize("prod_scope", [SCOPES[0], SCOPES[1]], ids=["same-scope", "other-scope"])
def test_two_imported_files_both_get_tokens(
    tmp_path: Path, home: Path, ca: pki.Issued, p12: Path, prod_scope: str
) -> None:
    """test.properties (inline PKCS#12) and prod.properties (a relative PKCS#12 declared JKS),
    each against its own emulator, in one config: `get --no-agent -p` works for both, each
    token from its own issuer, also when both use the same scope."""
    with (
        Emulator(
            signing_key=issuer_key(), clients={CLIENT_ID: SCOPES}, trust=[ca.cert]
        ) as test_emu,
        Emulator(
            signing_key=issuer_key(), clients={CLIENT_ID: SCOPES}, trust=[ca.cert]
        ) as prod_emu,
    ):
        test_props = emulator_props(test_emu, SCOPES[0], inline(p12.read_bytes()))
        prod_props = emulator_props(prod_emu, prod_scope, p12.name, **{"keystore.type": "JKS"})
        config = tmp_path / "config.toml"
        for name, props in (("test", test_props), ("prod", prod_props)):
            source = write_props(tmp_path / f"{name}.properties", props)
            result = import_cli(config, source, cwd=tmp_path)
            assert result.returncode == 0, result.stderr
            assert f"imported {source} as profile {name!r}" in result.stdout
        for name, emu, scope in (("test", test_emu, SCOPES[0]), ("prod", prod_emu, prod_scope)):
            got = get_no_agent(config, name, scope)
            assert got.returncode == 0, got.stderr
            assert claims_of(got.stdout)["iss"] == emu.issuer
            assert claims_of(got.stdout)["scope"] == scope
        assert (test_emu.tokens_issued, prod_emu.tokens_issued) == (1, 1)


def test_scope_set_gives_one_token(
    tmp_path: Path, home: Path, emulator: Emulator, p12: Path
) -> None:
    """`scope=a b`: `get "a b"` gets one token for both, and the agent keeps one token for the
    set, so the env file holds one token (under its names) and the emulator issued one."""
    both = f"{SCOPES[1]} {SCOPES[0]}"
    props = emulator_props(emulator, both, str(p12))
    config = tmp_path / "config.toml"
    imported = import_cli(config, write_props(tmp_path / "c.properties", props), "-p", "dev")
    assert imported.returncode == 0, imported.stderr
    got = get_no_agent(config, "dev", both)
    assert got.returncode == 0, got.stderr
    assert set(claims_of(got.stdout)["scope"].split()) == set(SCOPES[:2])
    issued = emulator.tokens_issued
    env = {**FAIL_BACKEND, "MPAGENT_KEYSTORE_PASSWORD": PASSWORD}
    agent = AgentProcess(config, tmp_path / "agent.log", env=env).wait_ready()
    try:
        env_file = Path(paths.default_env_file())
        wait_for(lambda: env_file.exists() and envfile.PREFIX in env_file.read_text())
        lines = env_file.read_text().splitlines()[1:]
    finally:
        agent.stop()
    tokens = {v for k, _, v in (line.partition("=") for line in lines) if not k.endswith("_AT")}
    assert len(tokens) == 1, lines
    assert set(claims_of(tokens.pop())["scope"].split()) == set(SCOPES[:2])
    assert emulator.tokens_issued == issued + 1
