"""config.toml parsing: the fixed interface and an actionable message for every mistake."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mpagent import config
from mpagent.errors import ConfigError

from .conftest import write_config

BASE = {
    "environment": "test",
    "client_id": "abc",
    "scopes": ["idporten:dcr.read"],
    "keystore": "certs/ks.p12",
}


def load(tmp_path: Path, profiles: dict, **top) -> config.Config:
    return config.load(write_config(tmp_path / "config.toml", profiles, **top))


def error(tmp_path: Path, profiles: dict, **top) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, profiles, **top)
    return str(info.value)


def test_full_profile_parses(tmp_path: Path) -> None:
    """Every documented key is read into the Profile, relative paths resolved against the file."""
    cfg = load(
        tmp_path,
        {
            "dev": {
                **BASE,
                "keystore_type": "PKCS12",
                "alias": "Auth",
                "certificate": "chain.pem",
                "kid": "k1",
                "algorithm": "RS512",
                "resource": ["https://api.example/"],
                "consumer_org": "123456789",
                "pid": "01010112345",
                "env_names": {"idporten:dcr.read": "DCR"},
            }
        },
        agent={"idle_timeout": 60, "log_level": "DEBUG"},
        http={"read_timeout": 2},
    )
    p = cfg.profile()
    assert p.keystore == tmp_path / "certs/ks.p12"
    assert p.certificate == tmp_path / "chain.pem"
    assert (p.keystore_type, p.alias, p.kid, p.algorithm) == ("pkcs12", "Auth", "k1", "RS512")
    assert p.claims == {
        "resource": ["https://api.example/"],
        "consumer_org": "123456789",
        "pid": "01010112345",
    }
    assert p.env_names == {"idporten:dcr.read": "DCR"}
    assert cfg.agent.idle_timeout == 60 and cfg.agent.log_level == "debug"
    assert cfg.http.read_timeout == 2 and cfg.http.connect_timeout == 5


def test_authorization_details_pass_through(tmp_path: Path) -> None:
    """authorization_details tables are kept as JSON-ready dicts, in order."""
    path = tmp_path / "config.toml"
    path.write_text(
        '[profiles.s]\nenvironment = "test"\nclient_id = "c"\nscopes = ["a"]\nkeystore = "k"\n'
        '[[profiles.s.authorization_details]]\ntype = "urn:altinn:systemuser"\n'
        'systemuser_org = { authority = "iso6523-actorid-upis", ID = "0192:123456789" }\n'
    )
    claims = config.load(path).profile().claims
    assert claims["authorization_details"] == [
        {
            "type": "urn:altinn:systemuser",
            "systemuser_org": {"authority": "iso6523-actorid-upis", "ID": "0192:123456789"},
        }
    ]


def test_profile_choice_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--profile beats MPAGENT_PROFILE beats default_profile."""
    monkeypatch.delenv("MPAGENT_PROFILE", raising=False)
    cfg = load(tmp_path, {n: {**BASE, "scopes": [n]} for n in "abc"}, default_profile="a")
    assert cfg.profile().name == "a"
    monkeypatch.setenv("MPAGENT_PROFILE", "b")
    assert cfg.profile().name == "b"
    assert cfg.profile("c").name == "c"


def test_several_profiles_and_no_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With several profiles and no choice, the message lists them and the three ways to choose."""
    monkeypatch.delenv("MPAGENT_PROFILE", raising=False)
    cfg = load(tmp_path, {n: {**BASE, "scopes": [n]} for n in "ab"})
    with pytest.raises(ConfigError, match=r"several profiles \(a, b\).*--profile.*MPAGENT_PROFILE"):
        cfg.profile()
    with pytest.raises(ConfigError, match="no profile 'x' \\(profiles: a, b\\)"):
        cfg.profile("x")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"client_id": None}, r"\[profiles.p\] client_id is missing; add client_id ="),
        ({"scopes": []}, r"\[profiles.p\] scopes is empty; list at least one scope"),
        ({"scopes": "a b"}, r"scopes is 'a b'; write a list of non-empty strings"),
        ({"environment": "staging"}, r"environment is 'staging'; write \"test\", \"prod\""),
        ({"environment": "http://maskinporten.example/"}, r"plain http:// to maskinporten.example"),
        ({"algorithm": "ES256"}, r"algorithm is 'ES256'; write one of RS256, RS384, RS512"),
        ({"keystore_type": "bks"}, r"keystore_type is 'bks'; write one of jks, pkcs12"),
        ({"consumer_org": "12345"}, r"consumer_org is '12345'; write the customer's 9-digit"),
        ({"consumer_org": "123456789", "iss_onbehalfof": "x"}, r"only one of them"),
        ({"scope": ["a"]}, r"unknown key 'scope'; did you mean 'scopes'\?"),
        ({"password": "x"}, r"unknown key 'password'"),
        ({"env_names": {"a": "1BAD"}}, r"env_names.a is '1BAD'; write a variable name"),
        ({"authorization_details": ["x"]}, r"authorization_details is not a list of tables"),
    ],
)
def test_profile_mistakes(tmp_path: Path, change: dict, expected: str) -> None:
    """Each mistake names the file and profile, says what is wrong and what to write."""
    profile = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    message = error(tmp_path, {"p": profile})
    assert message.startswith(f"{tmp_path / 'config.toml'}: ")
    assert re.search(expected, message), message


def test_top_level_mistakes(tmp_path: Path) -> None:
    """Unknown tables, a bad default_profile and bad agent settings are named precisely."""
    assert "did you mean 'profiles'" in error(tmp_path, {"p": BASE}, profile={"x": 1})
    assert "default_profile = 'q' names no profile; write one of: p" in error(
        tmp_path, {"p": BASE}, default_profile="q"
    )
    assert "[agent] idle_timeout is -1" in error(tmp_path, {"p": BASE}, agent={"idle_timeout": -1})
    assert "[agent] log_level is 'loud'" in error(
        tmp_path, {"p": BASE}, agent={"log_level": "loud"}
    )


def test_missing_and_broken_files(tmp_path: Path) -> None:
    """A missing file and invalid TOML each give a message naming the file and the next step."""
    with pytest.raises(ConfigError, match="no configuration file; create it"):
        config.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[profiles.a\n")
    with pytest.raises(ConfigError, match=f"{bad}: not valid TOML"):
        config.load(bad)


def test_no_profiles(tmp_path: Path) -> None:
    """A file without profiles says which table to add."""
    empty = tmp_path / "config.toml"
    empty.write_text('default_profile = "x"\n')
    with pytest.raises(ConfigError, match=r"no profiles; add a \[profiles.NAME\] table"):
        config.load(empty)


def test_config_path_from_environment(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MPAGENT_CONFIG overrides the default, which is under XDG_CONFIG_HOME."""
    (home / "config" / "mpagent").mkdir(parents=True)
    default = write_config(home / "config" / "mpagent" / "config.toml", {"d": BASE})
    assert config.load().path == default
    other = write_config(tmp_path / "other.toml", {"o": BASE})
    monkeypatch.setenv("MPAGENT_CONFIG", str(other))
    assert config.load().profile().name == "o"


def test_loopback_http_allowed(tmp_path: Path) -> None:
    """Plain http is accepted for loopback issuers (the emulator) only."""
    for url in ("http://127.0.0.1:8080/", "http://localhost:1/", "http://[::1]:9/"):
        assert load(tmp_path, {"p": {**BASE, "environment": url}}).profile().environment == url


def test_env_name_collision_between_profiles(tmp_path: Path) -> None:
    """The same scope in two profiles would share one env variable: refused with a fix."""
    message = error(tmp_path, {"a": BASE, "b": BASE})
    assert "would both be MASKINPORTEN_TOKEN_IDPORTEN_DCR_READ" in message
    assert (
        'env_names = { "idporten:dcr.read" = "MASKINPORTEN_TOKEN_IDPORTEN_DCR_READ_B" }' in message
    )
    renamed = {**BASE, "env_names": {"idporten:dcr.read": "B_TOKEN"}}
    assert load(tmp_path, {"a": BASE, "b": renamed}).profiles["b"].env_names == {
        "idporten:dcr.read": "B_TOKEN"
    }


def test_env_names_keys_are_canonical(tmp_path: Path) -> None:
    """env_names keys name the scope set in any order; they are stored sorted."""
    profile = {**BASE, "scopes": ["b a"], "env_names": {"b a": "AB"}}
    assert load(tmp_path, {"p": profile}).profile().env_names == {"a b": "AB"}


def test_bridge_settings(tmp_path: Path) -> None:
    """[bridge] listen takes a loopback host:port; anything else is refused with the fix."""
    cfg = load(tmp_path, {"p": BASE}, bridge={"listen": "127.0.0.1:8765"})
    assert cfg.bridge.listen == ("127.0.0.1", 8765)
    assert load(tmp_path, {"p": BASE}, bridge={"listen": "[::1]:9"}).bridge.listen == ("::1", 9)
    assert load(tmp_path, {"p": BASE}).bridge.listen is None
    assert "not loopback" in error(tmp_path, {"p": BASE}, bridge={"listen": "0.0.0.0:8765"})
    assert 'write "127.0.0.1:PORT"' in error(tmp_path, {"p": BASE}, bridge={"listen": "8765"})
