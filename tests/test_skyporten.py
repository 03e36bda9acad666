"""Skyporten: Digdir's issuers for cloud workload-identity federation have no trailing slash
(`https://sky.maskinporten.no`), unlike Maskinporten's, and the grant's aud must be exactly the
issuer. The presets, the URL mapping, doctor's checks, and end to end the real CLI against the
emulator run as a slash-less issuer over real HTTP on loopback."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization

from mpagent import doctor
from mpagent.config import ENVIRONMENTS, load
from mpagent.emulator import Emulator, pki
from mpagent.errors import ConfigError
from mpagent.issuer import JWT_BEARER, Endpoints, Issuer
from mpagent.keys import SigningKey, load_signing_key

from .conftest import CLIENT_ID, PASSWORD, SCOPES, issuer_key, profile_for, run_cli, write_config
from .keystores import StaticPasswords

SKY = {"sky-test": "https://test.sky.maskinporten.no", "sky": "https://sky.maskinporten.no"}
ENV = {"MPAGENT_KEYSTORE_PASSWORD": PASSWORD, "MPAGENT_NO_AUTOSTART": "1"}
KEY = {"keystore": "/nonexistent/k.p12"}  # loading a config does not open the keystore


@pytest.fixture
def sky_emulator(ca: pki.Issued) -> Iterator[Emulator]:
    """The emulator as a Skyporten-shaped issuer: http://127.0.0.1:PORT, no slash."""
    with Emulator(
        clients={CLIENT_ID: SCOPES}, trust=[ca.cert], signing_key=issuer_key(), issuer_slash=False
    ) as emu:
        yield emu


def profile(tmp_path: Path, environment: str) -> str:
    """The environment a profile with `environment` written has once loaded."""
    path = write_config(
        tmp_path / "config.toml",
        {"p": {"environment": environment, "client_id": CLIENT_ID, "scopes": ["a:b"]} | KEY},
    )
    return load(path).profile("p").environment


def signing_key(ca: pki.Issued, tmp_path: Path) -> SigningKey:
    path = pki.write_pkcs12(tmp_path / "k.p12", {"auth": pki.make_leaf(ca)}, PASSWORD)
    return load_signing_key(path, passwords=StaticPasswords(PASSWORD), strict=False)


# -- presets ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "issuer"), SKY.items())
def test_presets_are_the_slashless_issuers(name: str, issuer: str) -> None:
    """sky-test and sky are Digdir's Skyporten issuers, exactly, with no trailing slash."""
    assert ENVIRONMENTS[name] == issuer


@pytest.mark.parametrize(("name", "issuer"), SKY.items())
def test_preset_endpoints_keep_the_issuer_as_written(name: str, issuer: str) -> None:
    """A Skyporten preset's aud is its issuer without a slash, its token endpoint
    issuer/token (no double slash, no request needed)."""
    assert Issuer(name).endpoints() == Endpoints(issuer=issuer, token_endpoint=issuer + "/token")


def test_maskinporten_presets_keep_their_slash() -> None:
    """test and prod keep their trailing-slash issuer and ISSUER + "token"."""
    assert Issuer("test").endpoints() == Endpoints(
        "https://test.maskinporten.no/", "https://test.maskinporten.no/token"
    )
    assert Issuer("prod").endpoints().token_endpoint == "https://maskinporten.no/token"


def test_metadata_urls() -> None:
    """Skyporten's metadata is read where Digdir documents it (openid-configuration), with one
    slash; Maskinporten's at RFC 8414's path."""
    assert Issuer("sky").metadata_url() == (
        "https://sky.maskinporten.no/.well-known/openid-configuration"
    )
    assert Issuer("sky-test").metadata_url().startswith("https://test.sky.maskinporten.no/.well")
    assert Issuer("test").metadata_url() == (
        "https://test.maskinporten.no/.well-known/oauth-authorization-server"
    )


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "read"),
    [
        ("sky", "sky"),
        ("sky-test", "sky-test"),
        ("https://sky.maskinporten.no", "sky"),
        ("https://sky.maskinporten.no/", "sky"),
        ("https://test.sky.maskinporten.no//", "sky-test"),
    ],
)
def test_skyporten_urls_are_their_preset(tmp_path: Path, written: str, read: str) -> None:
    """A Skyporten issuer URL, with a slash or without, is its preset."""
    assert profile(tmp_path, written) == read


def test_skyporten_token_endpoint_suggests_the_preset(tmp_path: Path) -> None:
    """Skyporten's token endpoint as environment is refused, naming the preset to write."""
    with pytest.raises(ConfigError) as caught:
        profile(tmp_path, "https://sky.maskinporten.no/token")
    assert 'the token endpoint; write the issuer instead: environment = "sky"' in str(caught.value)


def test_unknown_environment_lists_the_presets(tmp_path: Path) -> None:
    """A word that is no preset is refused with all four presets named."""
    with pytest.raises(ConfigError) as caught:
        profile(tmp_path, "skyporten")
    assert 'write "test", "prod", "sky-test", "sky", or an issuer URL' in str(caught.value)


# -- doctor -----------------------------------------------------------------------------------


def test_test_certificate_in_sky_suggests_sky_test(ca: pki.Issued, tmp_path: Path) -> None:
    """A test certificate in the sky (production) profile fails, suggesting sky-test."""
    result = doctor.check_environment(signing_key(ca, tmp_path), "sky")
    assert result.status == doctor.FAIL and "a test certificate" in result.detail
    assert "in sky:" in result.detail and 'environment = "sky-test"' in result.fix


def test_test_certificate_in_sky_test_passes(ca: pki.Issued, tmp_path: Path) -> None:
    """A test certificate in sky-test is what that issuer takes."""
    assert doctor.check_environment(signing_key(ca, tmp_path), "sky-test").status == doctor.OK


class AnsweringIssuer(Issuer):
    """A preset's Issuer whose metadata answer is given (the real host is not reachable here)."""

    def __init__(self, environment: str, document: dict[str, str]) -> None:
        super().__init__(environment)
        self.document = document

    def metadata(self) -> dict[str, str]:
        return self.document


def test_doctor_warns_when_the_issuer_differs_from_the_preset() -> None:
    """Metadata naming the issuer with a slash the preset lacks warns: every grant's aud would
    be refused."""
    document = {"issuer": SKY["sky"] + "/", "token_endpoint": SKY["sky"] + "/token"}
    result, _ = doctor.check_metadata(AnsweringIssuer("sky", document))
    assert result.status == doctor.WARN, result
    assert f"but mpagent sends aud {SKY['sky']}" in result.detail and "MP-110" in result.fix


def test_doctor_accepts_the_slashless_issuer() -> None:
    """Metadata naming exactly the preset's issuer passes."""
    document = {"issuer": SKY["sky-test"], "token_endpoint": SKY["sky-test"] + "/token"}
    result, _ = doctor.check_metadata(AnsweringIssuer("sky-test", document))
    assert result.status == doctor.OK, result


# -- end to end: the emulator as a slash-less issuer ------------------------------------------


def test_emulator_issuer_without_slash(sky_emulator: Emulator) -> None:
    """issuer_slash=False: the issuer and metadata have no trailing slash, the endpoints one."""
    issuer = sky_emulator.issuer
    assert not issuer.endswith("/") and sky_emulator.token_endpoint == issuer + "/token"
    url = issuer + "/.well-known/oauth-authorization-server"
    document = requests.get(url, timeout=5).json()
    assert document["issuer"] == issuer and document["token_endpoint"] == issuer + "/token"
    assert document["jwks_uri"] == issuer + "/jwk"


def test_grant_aud_is_the_slashless_issuer(
    sky_emulator: Emulator, p12: Path, tmp_path: Path, home: Path
) -> None:
    """The real CLI's grant for a slash-less issuer has aud exactly that issuer, and its token
    request passes; the token's iss is the issuer too."""
    config = write_config(tmp_path / "config.toml", {"sky": profile_for(sky_emulator, p12)})
    grant = run_cli("--config", str(config), "grant", SCOPES[0], env=ENV)
    assert grant.returncode == 0, grant.stderr
    claims = jwt.decode(grant.stdout.strip(), options={"verify_signature": False})
    assert claims["aud"] == sky_emulator.issuer and not claims["aud"].endswith("/")
    got = run_cli("--config", str(config), "get", SCOPES[0], "--no-agent", env=ENV)
    assert got.returncode == 0, got.stderr
    token = jwt.decode(got.stdout.strip(), options={"verify_signature": False})
    assert token["iss"] == sky_emulator.issuer and token["scope"] == SCOPES[0]


@pytest.mark.parametrize("suffix", ["/", "/token"])
def test_aud_with_slash_is_refused(sky_emulator: Emulator, leaf: pki.Issued, suffix: str) -> None:
    """A slash-less issuer refuses an aud with the slash (or the token endpoint): MP-110, as
    Maskinporten compares aud exactly."""
    now = int(time.time())
    claims: dict[str, object] = {"aud": sky_emulator.issuer + suffix, "iss": CLIENT_ID}
    claims |= {"scope": SCOPES[0], "iat": now, "exp": now + 120, "jti": str(uuid.uuid4())}
    x5c = [base64.b64encode(leaf.cert.public_bytes(serialization.Encoding.DER)).decode()]
    assertion = jwt.encode(claims, leaf.key, algorithm="RS256", headers={"x5c": x5c})
    form = {"grant_type": JWT_BEARER, "assertion": assertion}
    answer = requests.post(sky_emulator.token_endpoint, data=form, timeout=5)
    body = answer.json()
    assert answer.status_code == 400 and body["error"] == "invalid_grant", body
    assert "Invalid JWT claim aud" in body["error_description"]
    assert body["error_uri"].endswith("/MP-110")


def test_emulator_cli_no_trailing_slash() -> None:
    """`mpagent emulator --no-trailing-slash` prints an issuer with no trailing slash."""
    with subprocess.Popen(
        [sys.executable, "-m", "mpagent", "emulator", "--no-trailing-slash"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            issuer = proc.stdout.readline().strip()
            assert issuer.startswith("http://127.0.0.1:") and not issuer.endswith("/")
            url = issuer + "/.well-known/oauth-authorization-server"
            assert requests.get(url, timeout=5).json()["issuer"] == issuer
        finally:
            proc.terminate()
