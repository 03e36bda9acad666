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
    """The message of the first mistake: in the file's top level, or in the first profile."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, profiles, **top).profile(next(iter(profiles)))
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
                "consumer_org": "123456785",
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
        "consumer_org": "123456785",
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
        'systemuser_org = { authority = "iso6523-actorid-upis", ID = "0192:123456785" }\n'
    )
    claims = config.load(path).profile().claims
    assert claims["authorization_details"] == [
        {
            "type": "urn:altinn:systemuser",
            "systemuser_org": {"authority": "iso6523-actorid-upis", "ID": "0192:123456785"},
        }
    ]


def test_profile_choice_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The requested profile (--profile, else MPAGENT_PROFILE) beats default_profile, which
    beats the only profile; the config itself reads no environment variable: the caller
    passes MPAGENT_PROFILE's value."""
    names = ["a", "b", "c"]
    assert config.choose_profile("b", "a", names) == "b"
    assert config.choose_profile(None, "a", names) == "a"
    assert config.choose_profile(None, None, ["only"]) == "only"
    cfg = load(tmp_path, {n: {**BASE, "scopes": [n]} for n in "abc"}, default_profile="a")
    monkeypatch.setenv("MPAGENT_PROFILE", "b")
    assert cfg.profile().name == "a"
    assert cfg.profile("c").name == "c"


def test_several_profiles_and_no_choice(tmp_path: Path) -> None:
    """With several profiles and no choice, the message lists them and the three ways to choose;
    an unknown name gets "did you mean"."""
    cfg = load(tmp_path, {n: {**BASE, "scopes": [n]} for n in ("test", "prod")})
    with pytest.raises(
        ConfigError, match=r"several profiles \(prod, test\).*--profile.*MPAGENT_PROFILE"
    ):
        cfg.profile()
    with pytest.raises(
        ConfigError, match=r"no profile 'tset' \(profiles: prod, test\); did you mean 'test'"
    ):
        cfg.profile("tset")


def test_a_broken_profile_blocks_only_itself(tmp_path: Path) -> None:
    """A mistake in one profile makes that profile unusable; the others load and are chosen as
    usual, and the broken one's error names its file, table and key."""
    cfg = load(tmp_path, {"test": BASE, "prod": {**BASE, "algorithm": "ES256"}})
    assert cfg.profile("test").name == "test"
    assert cfg.names == ["test", "prod"]
    with pytest.raises(ConfigError, match=r"\[profiles.prod\] algorithm is 'ES256'"):
        cfg.profile("prod")
    (problem,) = cfg.problems(except_for="test")
    assert problem.startswith("profile prod cannot be used: ") and "ES256" in problem
    assert cfg.problems(except_for="prod") == []


def test_scopes_are_optional(tmp_path: Path) -> None:
    """A profile without scopes keeps nothing warm: it is valid and has no scope sets."""
    profile = {k: v for k, v in BASE.items() if k != "scopes"}
    assert load(tmp_path, {"p": profile}).profile().scopes == ()


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    """A config.toml saved by Notepad (UTF-8 with a byte-order mark) loads."""
    path = write_config(tmp_path / "config.toml", {"p": BASE})
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert config.load(path).profile().name == "p"


def test_not_utf8_is_named(tmp_path: Path) -> None:
    """A file in another encoding gets an error naming the file and the fix."""
    path = tmp_path / "config.toml"
    path.write_bytes(b"# caf\xe9\n[profiles.p]\n")
    with pytest.raises(
        ConfigError, match=rf"{re.escape(str(path))}: not UTF-8 text.*save the file as UTF-8"
    ):
        config.load(path)


@pytest.mark.parametrize(
    ("written", "read"),
    [
        ("https://test.maskinporten.no", "test"),
        ("https://test.maskinporten.no/", "test"),
        ("https://maskinporten.no", "prod"),
        ("https://test.sky.maskinporten.no", "sky-test"),
        ("https://test.sky.maskinporten.no/", "sky-test"),
        ("https://sky.maskinporten.no", "sky"),
        ("https://sky.maskinporten.no/", "sky"),
        ("https://other.sky.maskinporten.no", "https://other.sky.maskinporten.no"),
    ],
)
def test_known_issuer_urls_are_their_environment(tmp_path: Path, written: str, read: str) -> None:
    """The presets' issuer URLs, with or without a trailing slash (Maskinporten's have one,
    Skyporten's none), are their preset; other issuers are kept as written."""
    assert load(tmp_path, {"p": {**BASE, "environment": written}}).profile().environment == read


def test_token_endpoint_as_environment(tmp_path: Path) -> None:
    """A pasted token endpoint URL is refused with the issuer to write instead."""
    message = error(tmp_path, {"p": {**BASE, "environment": "https://test.maskinporten.no/token"}})
    assert "is 'https://test.maskinporten.no/token', the token endpoint" in message
    assert 'write the issuer instead: environment = "test"' in message
    other = error(tmp_path, {"p": {**BASE, "environment": "http://127.0.0.1:9/token"}})
    assert 'environment = "http://127.0.0.1:9/"' in other


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"client_id": None}, r"\[profiles.p\] client_id is missing; add client_id ="),
        ({"scopes": "a b"}, r"scopes is 'a b'; write a list of non-empty strings"),
        ({"environment": "staging"}, r"environment is 'staging'; write \"test\", \"prod\""),
        ({"environment": "http://maskinporten.example/"}, r"plain http:// to maskinporten.example"),
        ({"algorithm": "ES256"}, r"algorithm is 'ES256'; write one of RS256, RS384, RS512"),
        ({"keystore_type": "bks"}, r"keystore_type is 'bks'; write one of jks, pkcs12"),
        ({"consumer_org": "12345"}, r"consumer_org = '12345' is not a Norwegian organisation"),
        ({"consumer_org": "123456785", "iss_onbehalfof": "x"}, r"only one of them"),
        (
            {"consumer_org": "123456785", "systemuser_org": "987654325"},
            r"systemuser_org is set together with consumer_org; a token is either",
        ),
        ({"scope": ["a"]}, r"unknown key 'scope'; did you mean 'scopes'\?"),
        ({"password": "x"}, r"unknown key 'password'"),
        ({"env_names": {"a": "1BAD"}}, r"env_names.a is '1BAD'; write a variable name"),
        ({"environment": "https://maskinporten.no/token"}, r"the token endpoint"),
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


def test_same_scope_in_two_profiles_gets_two_names(tmp_path: Path) -> None:
    """test and prod with the same scope are valid together: names never collide by default."""
    cfg = load(tmp_path, {"test": BASE, "prod": BASE}, default_profile="test")
    assert not cfg.broken and cfg.default_name == "test"


def test_env_name_collision_from_explicit_names(tmp_path: Path) -> None:
    """Two tokens given one name through env_names: the later profile is unusable, and the
    error names both and suggests a name the validator accepts."""
    named = {**BASE, "env_names": {"idporten:dcr.read": "DCR"}}
    cfg = load(tmp_path, {"a": named, "my-prod": named})
    assert cfg.profile("a").name == "a"
    message = str(cfg.broken["my-prod"])
    assert "[profiles.my-prod] scope 'idporten:dcr.read' and [profiles.a] scope" in message
    assert "would both be DCR in the env file" in message
    suggested = "MASKINPORTEN_TOKEN_MY_PROD_IDPORTEN_DCR_READ_2"
    assert f'env_names = {{ "idporten:dcr.read" = "{suggested}" }}' in message
    fixed = {**BASE, "env_names": {"idporten:dcr.read": suggested}}
    assert not load(tmp_path, {"a": named, "my-prod": fixed}).broken


def test_env_name_collision_from_profile_names(tmp_path: Path) -> None:
    """Profile names that normalise alike (my-test, my_test) collide, and the error says so."""
    cfg = load(tmp_path, {"my-test": BASE, "my_test": BASE})
    assert list(cfg.profiles) == ["my-test"]
    assert "would both be MASKINPORTEN_TOKEN_MY_TEST_IDPORTEN_DCR_READ" in str(
        cfg.broken["my_test"]
    )


def test_profile_name_without_letters(tmp_path: Path) -> None:
    """A profile name that gives no variable name is refused with the fix."""
    assert "rename the profile" in error(tmp_path, {"--": BASE})


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


# -- Altinn 3 (issue 14) ------------------------------------------------------------------


def test_altinn_exchange_keys(tmp_path: Path) -> None:
    """exchange keeps the target as written (for status) and the URL to GET, with ?test=true
    for altinn_test_org; systemuser_org (and systemuser_ref) become Altinn's documented
    authorization_details; consumer_org is kept as its nine digits."""
    from mpagent import altinn

    cfg = load(
        tmp_path,
        {
            "tt02": {**BASE, "exchange": "altinn-tt02", "systemuser_org": "0192:123456785"},
            "ttd": {**BASE, "exchange": "altinn-tt02", "altinn_test_org": True},
            "url": {**BASE, "exchange": "http://127.0.0.1:9/x", "consumer_org": "0192:987654325"},
            "ref": {**BASE, "systemuser_org": "123456785", "systemuser_ref": "kunde-1"},
            "plain": BASE,
        },
        default_profile="plain",
    )
    tt02, ttd, url, ref = (cfg.profile(n) for n in ("tt02", "ttd", "url", "ref"))
    assert (tt02.exchange_name, tt02.exchange) == ("altinn-tt02", altinn.TARGETS["altinn-tt02"])
    assert ttd.exchange == altinn.TARGETS["altinn-tt02"] + "?test=true"
    assert (url.exchange_name, url.exchange) == ("http://127.0.0.1:9/x",) * 2
    assert tt02.claims["authorization_details"] == altinn.systemuser_details("123456785")
    assert ref.claims["authorization_details"] == altinn.systemuser_details("123456785", "kunde-1")
    assert url.claims["consumer_org"] == "987654325"
    assert cfg.profile("plain").exchange is None and cfg.profile("plain").exchange_name is None


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"exchange": "altinn-test"}, r"\[profiles.p\] exchange = 'altinn-test' is neither"),
        ({"exchange": "http://altinn.example/x"}, r"exchange = .* is plain http"),
        ({"altinn_test_org": True}, r"altinn_test_org is set without exchange; add exchange ="),
        ({"exchange": "altinn-tt02", "altinn_test_org": "yes"}, r"altinn_test_org is 'yes'"),
        ({"systemuser_org": "123456780"}, r"systemuser_org = '123456780' has a wrong check digit"),
        ({"consumer_org": "123456780"}, r"consumer_org = '123456780' has a wrong check digit"),
        ({"consumer_org": 123456785}, r"must be a string: write it in quotes"),
        (
            {"systemuser_org": "123456785", "authorization_details": [{"type": "x"}]},
            r"systemuser_org is set together with authorization_details; .* keep one",
        ),
        (
            {
                "authorization_details": [
                    {"type": "urn:altinn:systemuser", "systemuser_org": {"ID": f"0192:{n}"}}
                    for n in ("123456785", "987654325")
                ]
            },
            r"names 2 system-user organisations; Maskinporten takes one per token",
        ),
    ],
)
def test_altinn_mistakes(tmp_path: Path, change: dict, expected: str) -> None:
    """Each Altinn mistake names the file, the profile and the key, and says what to write."""
    message = error(tmp_path, {"p": {**BASE, **change}})
    assert message.startswith(f"{tmp_path / 'config.toml'}: ")
    assert re.search(expected, message), message


def test_admin_profile_with_exchange_is_refused(tmp_path: Path) -> None:
    """A profile whose keys are managed with a profile that exchanges its tokens (Altinn's
    tokens, which the admin API does not take) is unusable, saying what to set; the others
    work."""
    cfg = load(
        tmp_path,
        {
            "altinn": {**BASE, "exchange": "altinn-tt02"},
            "managed": {**BASE, "admin_profile": "altinn"},
            "renews": {**BASE, "exchange": "altinn-tt02", "auto_renew": True},
        },
        default_profile="altinn",
    )
    assert cfg.profile("altinn").exchange
    for name, setting in (("managed", "admin_profile = 'altinn'"), ("renews", "auto_renew")):
        with pytest.raises(ConfigError, match=f"{setting}: the tokens of profile") as info:
            cfg.profile(name)
        assert "set admin_profile to a profile without exchange" in str(info.value)
