"""`mpagent doctor`: every check fails where it should, with a fix, and skips what depends on
it. The real CLI as a subprocess for the end-to-end cases, the check functions for the rest;
generated keystores and the emulator throughout. No secret ever reaches the output."""

from __future__ import annotations

import datetime as dt
import email.utils
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from mpagent import doctor, issuer
from mpagent.config import Profile
from mpagent.doctor import FAIL, OK, SKIP, WARN, Result
from mpagent.emulator import Emulator, pki
from mpagent.emulator.pki import write_pkcs12
from mpagent.errors import IssuerRejected
from mpagent.exchange import Exchange
from mpagent.issuer import HINTS, Issuer
from mpagent.keys import SigningKey, certificate_warning, load_signing_key

from .conftest import CLIENT_ID, PASSWORD, SCOPES, issuer_key, profile_for, run_cli, write_config
from .keystores import (
    StaticPasswords,
    write_cert_pem,
    write_jks,
    write_jwk,
    write_pem,
)

NOW = dt.datetime.now(dt.UTC)
WRONG = "wrong-pw-987"
ASCII_PW = "store-pw-4"  # keytool refuses non-ASCII PKCS#12 passwords


def doctor_cli(config: Path, *args: str, password: str | None = PASSWORD):
    env = {"MPAGENT_KEYSTORE_PASSWORD": password} if password else {}
    return run_cli("--config", str(config), "doctor", *args, env=env)


def assert_no_secrets(text: str, *secrets: str) -> None:
    """No password, token, grant (JWTs start with eyJ) or key material in `text`."""
    for secret in (PASSWORD, WRONG, *secrets):
        assert secret not in text
    assert "eyJ" not in text and "PRIVATE KEY" not in text


def statuses(results: Sequence[Result]) -> list[str]:
    return [r.status for r in results]


def profile(keystore: Path, environment: str = "test", **extra: Any) -> Profile:
    scopes = (SCOPES[0],)
    return Profile("dev", environment, CLIENT_ID, scopes, keystore, **extra)


def signing_key(ca: pki.Issued, tmp_path: Path, **leaf_options: Any) -> SigningKey:
    """The key as doctor loads it: its certificate judged, errors kept on the key."""
    issued = pki.make_leaf(ca, **leaf_options)
    path = write_pkcs12(tmp_path / "k.p12", {"auth": issued}, PASSWORD)
    return load_signing_key(path, passwords=StaticPasswords(PASSWORD), strict=False)


@pytest.fixture
def config(tmp_path: Path, home: Path) -> Path:
    return tmp_path / "config.toml"


@pytest.fixture(scope="module")
def two_keys_bytes(
    ca: pki.Issued, leaf: pki.Issued, tmp_path_factory: pytest.TempPathFactory
) -> bytes:
    """Buypass-style, from the CA the emulator trusts: 'sign' (nonRepudiation only) and 'auth'
    (digitalSignature), merged by keytool (hence an ASCII password); made once (a JVM)."""
    signing = pki.make_leaf(ca, usage="nonRepudiation")
    path = tmp_path_factory.mktemp("two-keys") / "buypass.p12"
    entries = {"sign": signing, "auth": leaf}
    return write_pkcs12(path, entries, ASCII_PW, ca_chain=[ca.cert]).read_bytes()


@pytest.fixture
def two_keys(tmp_path: Path, two_keys_bytes: bytes) -> Path:
    """This test's own copy of the two-key PKCS#12 (store password ASCII_PW)."""
    path = tmp_path / "buypass.p12"
    path.write_bytes(two_keys_bytes)
    return path


# -- end to end: the real CLI ---------------------------------------------------------------


def test_all_green(config: Path, emulator: Emulator, p12: Path) -> None:
    """A correct profile: every check passes, a token is fetched, exit 0, no secret shown."""
    write_config(config, {"dev": profile_for(emulator, p12)})
    result = doctor_cli(config)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    environment = f"- certificate fits the environment: skipped (cannot tell for this issuer ({emulator.issuer})"
    assert [line for line in lines[:-2] if not line.startswith("✓")] == [
        f"{environment}; test CA mpagent throwaway test CA)"
    ], result.stdout
    assert f"✓ token for {SCOPES[0]}: Bearer token" in result.stdout
    assert lines[-1] == "9 ok, 0 warnings, 0 failed, 1 skipped"
    assert emulator.tokens_issued == 1
    assert_no_secrets(result.stdout + result.stderr)


def test_bad_config_through_the_cli(config: Path, emulator: Emulator) -> None:
    """A broken config fails the first check with exit 78; every later check says skipped."""
    config.write_text('[profiles.a]\nenvironment = "test"\n')
    result = doctor_cli(config)
    assert result.returncode == 78
    first, *rest = result.stdout.splitlines()[:-2]
    # scopes are optional (issue 9): client_id is the first missing key now
    assert first.startswith("✗ config:") and "[profiles.a] client_id is missing" in first
    assert rest and all(line.startswith("- ") and "skipped" in line for line in rest)
    assert emulator.token_requests == 0


def test_wrong_password_through_the_cli(config: Path, emulator: Emulator, p12: Path) -> None:
    """A wrong store password: exit 78, the fix names the profile, the password is not shown."""
    write_config(config, {"dev": profile_for(emulator, p12)})
    result = doctor_cli(config, password=WRONG)
    assert result.returncode == 78
    assert "✗ keystore opens" in result.stdout and "fix: mpagent secret set dev" in result.stdout
    assert "- token request: skipped" in result.stdout
    assert_no_secrets(result.stdout + result.stderr)


def test_expiring_certificate_warns_with_exit_0(
    config: Path, emulator: Emulator, ca: pki.Issued
) -> None:
    """A certificate expiring in 10 days is a warning (!) only: the token still works, exit 0."""
    soon = pki.make_leaf(ca, not_after=NOW + dt.timedelta(days=10))
    ks = write_pkcs12(config.parent / "soon.p12", {"auth": soon}, PASSWORD)
    write_config(config, {"dev": profile_for(emulator, ks)})
    result = doctor_cli(config)
    assert result.returncode == 0, result.stdout
    assert "! certificate validity:" in result.stdout and "expires in 10 days" in result.stdout
    assert "fix: order a renewed certificate" in result.stdout
    assert f"✓ token for {SCOPES[0]}" in result.stdout


def test_non_repudiation_key_is_a_warning_through_the_cli(
    config: Path, emulator: Emulator, two_keys: Path
) -> None:
    """The nonRepudiation entry of a two-key PKCS#12: a `!` key-usage row whose fix names
    'auth', the token is still fetched, exit 0."""
    write_config(config, {"dev": profile_for(emulator, two_keys, alias="sign")})
    result = doctor_cli(config, password=ASCII_PW)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    usage = lines.index(
        "! key usage includes digitalSignature: the certificate (TEST ORGANISASJON, org. no."
        f" {pki.TEST_ORG_NUMBER}) has key usage nonRepudiation, not digitalSignature:"
        " Maskinporten may refuse it (MP-120)"
    )
    assert lines[usage + 1].startswith('    fix: if it does, set `alias = "auth"`')
    assert f"✓ token for {SCOPES[0]}: Bearer token" in result.stdout
    assert lines[-1].endswith("1 warnings, 0 failed, 1 skipped")


def test_refused_non_repudiation_key_names_the_cause_through_the_cli(
    config: Path, other_ca: pki.Issued, two_keys: Path
) -> None:
    """An issuer refusing the nonRepudiation entry: exit 77, the fix names the key usage as the
    likely cause and 'auth' as the alias to use."""
    with Emulator(
        signing_key=issuer_key(), clients={CLIENT_ID: SCOPES}, trust=[other_ca.cert]
    ) as distrustful:
        write_config(config, {"dev": profile_for(distrustful, two_keys, alias="sign")})
        result = doctor_cli(config, password=ASCII_PW)
    assert result.returncode == 77, result.stdout
    assert f"✗ token for {SCOPES[0]}: Maskinporten refused: invalid_grant [MP-120]" in result.stdout
    fix = next(line for line in result.stdout.splitlines() if "likely cause" in line)
    assert fix.startswith(f"    fix: likely cause: the certificate of {two_keys} (entry 'sign')")
    assert "nonRepudiation, not digitalSignature" in fix and 'alias = "auth"' in fix


def test_expired_certificate_through_the_cli(
    config: Path, emulator: Emulator, ca: pki.Issued
) -> None:
    """An expired certificate: the keystore rows pass, validity fails, exit 78, no request."""
    old = pki.make_leaf(
        ca, not_before=NOW - dt.timedelta(days=9), not_after=NOW - dt.timedelta(days=2)
    )
    ks = write_pkcs12(config.parent / "old.p12", {"auth": old}, PASSWORD)
    write_config(config, {"dev": profile_for(emulator, ks)})
    result = doctor_cli(config)
    assert result.returncode == 78, result.stdout
    assert all(f"✓ {title}" in result.stdout for title in doctor.KEYSTORE_ROWS)
    expired = (
        f"✗ certificate validity: expired on {old.cert.not_valid_after_utc:%Y-%m-%d} (2 days ago)"
    )
    assert expired in result.stdout
    assert "- token request: skipped (fix the failures first)" in result.stdout
    assert emulator.token_requests == 0


def test_unknown_scope_through_the_cli(config: Path, emulator: Emulator, p12: Path) -> None:
    """An unregistered scope: the refusal with its MP code and next step, exit 77."""
    write_config(config, {"dev": profile_for(emulator, p12, scopes=["nav:secret"])})
    result = doctor_cli(config)
    assert result.returncode == 77
    assert "✗ token for nav:secret: Maskinporten refused: invalid_scope [MP-200]" in result.stdout
    assert f"fix: {HINTS['MP-200']}" in result.stdout
    assert_no_secrets(result.stdout + result.stderr)


def test_no_token_skips_the_request(config: Path, emulator: Emulator, p12: Path) -> None:
    """--no-token runs every local check and the metadata check, but asks for no token."""
    write_config(config, {"dev": profile_for(emulator, p12)})
    result = doctor_cli(config, "--no-token")
    assert result.returncode == 0
    assert "- token request: skipped (--no-token)" in result.stdout
    assert emulator.token_requests == 0


# -- configuration and keystore ----------------------------------------------------------------


def test_missing_config_file(tmp_path: Path) -> None:
    """No config file: the config check fails with exit 78 and says how to create one."""
    result, cfg, prof = doctor.check_config(str(tmp_path / "none.toml"), None)
    assert (result.status, result.exit_code, cfg, prof) == (FAIL, 78, None, None)
    assert "no configuration file" in result.detail


@pytest.mark.parametrize(("password", "fix"), [(WRONG, "secret set dev"), (None, "MPAGENT_KEY")])
def test_keystore_password_missing_or_wrong(p12: Path, password: str | None, fix: str) -> None:
    """A wrong or missing store password fails 'keystore opens'; the rest is skipped."""
    rows, key = doctor.check_keystore(profile(p12), StaticPasswords(password))
    assert statuses(rows) == [FAIL, SKIP, SKIP] and key is None
    assert str(p12) in rows[0].detail and fix in rows[0].fix
    assert_no_secrets(doctor.render(rows))


def test_wrong_alias(p12: Path) -> None:
    """An alias the keystore lacks fails the private-key row and lists the aliases there."""
    rows, key = doctor.check_keystore(profile(p12, alias="nope"), StaticPasswords(PASSWORD))
    assert statuses(rows) == [OK, FAIL, SKIP] and key is None
    assert "'nope'" in rows[1].detail and "'auth'" in rows[1].detail


def test_trusted_certificate_alias(tmp_path: Path, leaf: pki.Issued, ca: pki.Issued) -> None:
    """An alias naming a trusted-certificate entry fails: it holds no private key."""
    ks = write_jks(tmp_path / "v.jks", {"auth": leaf}, PASSWORD, PASSWORD, trusted={"ca": ca.cert})
    rows, _ = doctor.check_keystore(profile(ks, alias="ca"), StaticPasswords(PASSWORD))
    assert statuses(rows) == [OK, FAIL, SKIP]
    assert "trusted certificate without a private key" in rows[1].detail


def test_key_and_certificate_mismatch(tmp_path: Path, leaf: pki.Issued, ca: pki.Issued) -> None:
    """A certificate of another key fails 'key and certificate match'."""
    key = write_pem(tmp_path / "key.pem", leaf)
    other = write_cert_pem(tmp_path / "other.pem", [pki.make_leaf(ca).cert])
    rows, key_ = doctor.check_keystore(profile(key, certificate=other), StaticPasswords(None))
    assert statuses(rows) == [OK, OK, FAIL] and key_ is None
    assert "does not belong to the private key" in rows[2].detail


def test_non_repudiation_certificate(tmp_path: Path, leaf: pki.Issued, ca: pki.Issued) -> None:
    """The signing (nonRepudiation) certificate loads; key usage is a warning naming 'auth'."""
    signing = pki.make_leaf(ca, usage="nonRepudiation")
    ks = write_jks(tmp_path / "v.jks", {"sign": signing, "auth": leaf}, PASSWORD, PASSWORD)
    rows, key = doctor.check_keystore(profile(ks, alias="sign"), StaticPasswords(PASSWORD))
    assert statuses(rows) == [OK, OK, OK] and key is not None
    usage = doctor.check_key_usage(key)
    assert (usage.status, usage.exit_code) == (WARN, 0)
    assert "has key usage nonRepudiation, not digitalSignature" in usage.detail
    assert usage.fix.startswith('if it does, set `alias = "auth"`')
    assert doctor.exit_status([*rows, usage]) == 0
    assert doctor.render([usage]).startswith("! key usage includes digitalSignature: ")


def test_authentication_certificate_passes_key_usage(ca: pki.Issued, tmp_path: Path) -> None:
    """The digitalSignature certificate passes key usage, listing its usages."""
    usage = doctor.check_key_usage(signing_key(ca, tmp_path))
    assert (usage.status, usage.detail) == (OK, "digitalSignature, keyEncipherment")


def test_expired_certificate_opens_the_keystore_once(ca: pki.Issued, tmp_path: Path) -> None:
    """An expired certificate: the keystore rows pass with one password ask, and the key comes
    back with its error for the validity row."""
    start, end = NOW - dt.timedelta(days=40), NOW - dt.timedelta(days=3)
    old = pki.make_leaf(ca, not_before=start, not_after=end)
    path = write_pkcs12(tmp_path / "k.p12", {"auth": old}, PASSWORD)
    passwords = StaticPasswords(PASSWORD)
    rows, key = doctor.check_keystore(profile(path), passwords)
    assert statuses(rows) == [OK, OK, OK] and key is not None
    assert passwords.store_asks == 1
    assert doctor.check_validity(key, NOW).status == FAIL


# -- certificate validity and environment -------------------------------------------------------


def test_expired_certificate(ca: pki.Issued, tmp_path: Path) -> None:
    """An expired certificate fails validity with its date."""
    start, end = NOW - dt.timedelta(days=40), NOW - dt.timedelta(days=3)
    key = signing_key(ca, tmp_path, not_before=start, not_after=end)
    result = doctor.check_validity(key, NOW)
    assert result.status == FAIL and f"expired on {end:%Y-%m-%d} (3 days ago)" in result.detail


def test_not_yet_valid_certificate(ca: pki.Issued, tmp_path: Path) -> None:
    """A certificate valid only from tomorrow fails validity and points at the clock."""
    key = signing_key(ca, tmp_path, not_before=NOW + dt.timedelta(days=1))
    result = doctor.check_validity(key, NOW)
    assert result.status == FAIL and "clock" in result.fix


def test_certificate_expiring_in_10_days_is_a_warning(ca: pki.Issued, tmp_path: Path) -> None:
    """Expiry within 30 days is a warning, which does not make the exit status non-zero."""
    key = signing_key(ca, tmp_path, not_after=NOW + dt.timedelta(days=10))
    result = doctor.check_validity(key, NOW)
    assert result.status == WARN and "expires in 10 days" in result.detail
    assert doctor.exit_status([result, Result(OK, "x")]) == 0


def test_certificate_warning(ca: pki.Issued, tmp_path: Path) -> None:
    """certificate_warning: None when far off, a text within 30 days or after expiry."""
    far, soon = (
        signing_key(ca, tmp_path),
        signing_key(ca, tmp_path, not_after=NOW + dt.timedelta(days=29)),
    )
    assert certificate_warning(far, NOW) is None
    assert "expires in 29 days" in (certificate_warning(soon, NOW.timestamp()) or "")
    later = NOW + dt.timedelta(days=31)
    assert "expired on" in (certificate_warning(soon, later) or "")


def test_certificate_warning_without_certificate(tmp_path: Path) -> None:
    """A bare key (kid mode) has no certificate and so no warning."""
    path = write_jwk(tmp_path / "k.jwk", pki.new_rsa_key(), kid="k1")
    key = load_signing_key(path, passwords=StaticPasswords(None))
    assert certificate_warning(key, NOW) is None


def test_test_certificate_with_prod_profile(ca: pki.Issued, tmp_path: Path) -> None:
    """A certificate from a test CA in a prod profile fails: Maskinporten refuses it (MP-120)."""
    result = doctor.check_environment(signing_key(ca, tmp_path), "prod")
    assert result.status == FAIL and "a test certificate" in result.detail
    assert "MP-120" in result.detail and 'environment = "test"' in result.fix


def test_prod_certificate_with_test_profile(tmp_path: Path) -> None:
    """A certificate from a production CA in a test profile fails the other way round."""
    prod_ca = pki.make_ca("Buypass Class 3 CA G2 ST Business")
    result = doctor.check_environment(signing_key(prod_ca, tmp_path), "test")
    assert result.status == FAIL and "a prod certificate" in result.detail


@pytest.mark.parametrize(
    "environment",
    [
        "https://issuer.example/",
        "http://127.0.0.1:8080/",
        "http://127.0.0.1:8080",
    ],
)
def test_other_issuers_cannot_be_told(ca: pki.Issued, tmp_path: Path, environment: str) -> None:
    """Any issuer but the presets' (a custom URL, the emulator) skips the check saying it
    cannot tell, never a failure, for a test and a prod certificate alike."""
    prod_ca = pki.make_ca("Buypass Class 3 CA G2 ST Business")
    for issuer_ca, kind in ((ca, "test"), (prod_ca, "prod")):
        result = doctor.check_environment(signing_key(issuer_ca, tmp_path), environment)
        assert result.status == SKIP and result.exit_code == 0
        assert result.detail == (
            f"cannot tell for this issuer ({environment}); {kind} CA {issuer_ca.cert.subject.rfc4514_string()[3:]}"
        )


@pytest.mark.parametrize(
    ("name", "test"),
    [
        ("Buypass Class 3 Test4 CA 3", True),
        ("Buypass Class 3 Test4 CA G2 ST Business", True),
        ("Commfides CPN Enterprise-Norwegian SHA256 CA - TEST2", True),
        ("Commfides Enterprise-Norwegian SHA256 CA - TEST", True),
        ("mpagent throwaway test CA", True),
        ("Buypass Class 3 CA 3", False),
        ("Buypass Class 3 CA G2 HT Business", False),
        ("Commfides CPN Enterprise-Norwegian SHA256 CA", False),
    ],
)
def test_test_ca_names(name: str, test: bool) -> None:
    """Buypass and Commfides test CAs say "Test" in their name; production CAs do not."""
    assert doctor.is_test_ca(name) is test


@pytest.mark.parametrize(
    ("environment", "kind"),
    [
        ("test", "test"),
        ("prod", "prod"),
        ("https://test.maskinporten.no/", "test"),
        ("https://test.maskinporten.no", "test"),
        ("https://maskinporten.no/", "prod"),
        ("https://maskinporten.no", "prod"),
        ("sky-test", "test"),
        ("sky", "prod"),
        ("https://test.sky.maskinporten.no", "test"),
        ("https://sky.maskinporten.no/", "prod"),
        ("https://ver2.maskinporten.no/", None),
        ("https://test.maskinporten.no/token", None),
        ("http://127.0.0.1:8080/", None),
        ("http://localhost:1/", None),
        ("https://issuer.example/", None),
    ],
)
def test_environment_kind(environment: str, kind: str | None) -> None:
    """Only the presets and their issuers (with or without the slash) are known: Skyporten's
    sky-test takes test certificates, sky production ones."""
    assert doctor.environment_kind(environment) == kind


# -- Maskinporten: metadata, clock, token ---------------------------------------------------


def test_metadata_unreachable() -> None:
    """Nothing listening at the issuer: the metadata check fails with exit 75, no skew known."""
    result, skew = doctor.check_metadata(Issuer("http://127.0.0.1:9/"))
    assert (result.status, result.exit_code, skew) == (FAIL, 75, None)
    assert "cannot reach http://127.0.0.1:9/.well-known/oauth-authorization-server" in result.detail


def test_metadata_reachable(emulator: Emulator) -> None:
    """The emulator's metadata is found and names its token endpoint; the clocks agree."""
    result, skew = doctor.check_metadata(Issuer(emulator.issuer))
    assert result.status == OK and emulator.token_endpoint in result.detail
    assert skew is not None and abs(skew) < 2


@pytest.mark.parametrize(("offset", "side"), [(30, "behind"), (-30, "ahead of")])
def test_clock_skew(ca: pki.Issued, offset: float, side: str) -> None:
    """An issuer clock 30 s off either way fails the clock check with the direction."""
    with Emulator(
        signing_key=issuer_key(), clients={CLIENT_ID: SCOPES}, trust=[ca.cert], clock_offset=offset
    ) as emu:
        metadata, skew = doctor.check_metadata(Issuer(emu.issuer))
    assert metadata.status == OK and skew is not None and abs(skew - offset) < 2
    result = doctor.check_clock(skew)
    assert result.status == FAIL and result.exit_code == 1
    assert f"s {side} Maskinporten's" in result.detail and "NTP" in result.fix


@pytest.mark.parametrize(
    ("skew", "status"),
    [(0.4, OK), (-5.0, OK), (7.0, WARN), (-9.9, WARN), (10.5, FAIL), (None, SKIP)],
)
def test_clock_thresholds(skew: float | None, status: str) -> None:
    """Within 5 s is fine, up to 10 s a warning, beyond a failure; no Date header skips."""
    assert doctor.check_clock(skew).status == status


def test_skew_from_date() -> None:
    """The skew is the Date header minus the middle of the round trip; bad headers give None."""
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert issuer.skew_from_date(date, 999_999.0, 1_000_001.0) == 30.0
    assert issuer.skew_from_date("not a date", 0, 0) is None
    assert issuer.skew_from_date(None, 0, 0) is None


def test_token_request_rejected(emulator: Emulator, p12: Path) -> None:
    """An unknown scope: the refusal verbatim with MP-200, its next step, and exit 77."""
    key = load_signing_key(p12, passwords=StaticPasswords(PASSWORD))
    exchange = Exchange(profile(p12, emulator.issuer), key, Issuer(emulator.issuer))
    result = doctor.check_token(exchange, "nav:secret")
    assert (result.status, result.exit_code, result.fix) == (FAIL, 77, HINTS["MP-200"])
    assert "invalid scopes for client, nav:secret" in result.detail and "[MP-200]" in result.detail


def test_token_request_unreachable(p12: Path) -> None:
    """A token endpoint that does not answer fails the token check with exit 75."""
    key = load_signing_key(p12, passwords=StaticPasswords(PASSWORD))
    issuer = Issuer("http://127.0.0.1:9/")
    result = doctor.check_token(Exchange(profile(p12, issuer.environment), key, issuer), "s")
    assert (result.status, result.exit_code) == (FAIL, 75)


@pytest.mark.parametrize(
    ("details", "hint"),
    [
        ({"mp_code": "MP-100", "error": "invalid_grant"}, HINTS["MP-100"]),
        ({"error": "invalid_grant", "error_description": "Issue time is after now"}, "clock"),
        ({"error": "invalid_grant", "error_description": "Unknown key identifier (kid)"}, "kid"),
        ({"error": "invalid_scope", "error_description": "?"}, HINTS["invalid_scope"]),
        ({"error": "invalid_grant", "error_description": "?"}, "registration"),
    ],
)
def test_explain(details: dict[str, str], hint: str) -> None:
    """A refusal is explained by MP code, else by description, else by error, else generally."""
    assert hint in doctor.explain(IssuerRejected("refused", **details))


def test_explain_puts_the_likely_cause_first() -> None:
    """A likely cause found by exchange (the key usage) comes first, the MP code's hint after."""
    exc = IssuerRejected("refused", mp_code="MP-120", likely_cause="the key usage; use 'auth'")
    assert doctor.explain(exc) == f"likely cause: the key usage; use 'auth'; {HINTS['MP-120']}"


def test_kid_mode_skips_certificate_checks(config: Path, tmp_path: Path) -> None:
    """A registered key without certificate: the certificate checks are skipped, the rest pass."""
    key = pki.new_rsa_key()
    path = write_jwk(tmp_path / "key.jwk", key, kid="k1")
    with Emulator(
        signing_key=issuer_key(), clients={CLIENT_ID: SCOPES}, jwks={"k1": key.public_key()}
    ) as emu:
        write_config(config, {"dev": profile_for(emu, path)})
        results = doctor.run(str(config), None)
    by_title = {r.title: r for r in results}
    for title in doctor.CERTIFICATE_ROWS:
        assert by_title[title].status == SKIP and "kid mode" in by_title[title].detail
    assert by_title[f"token for {SCOPES[0]}"].status == OK
    assert doctor.exit_status(results) == 0


# -- rendering --------------------------------------------------------------------------------


def test_render_and_exit_status() -> None:
    """A line per check, a fix under failures and warnings, a summary; exit = first failure's."""
    results = [
        Result(OK, "a", "fine"),
        Result(WARN, "b", "soon", "renew"),
        Result(FAIL, "c", "broken", "repair", 75),
        Result(SKIP, "d", "needs c"),
        Result(FAIL, "e", "also", "", 77),
    ]
    assert doctor.render(results).splitlines() == [
        "✓ a: fine",
        "! b: soon",
        "    fix: renew",
        "✗ c: broken",
        "    fix: repair",
        "- d: skipped (needs c)",
        "✗ e: also",
        "",
        "1 ok, 1 warnings, 2 failed, 1 skipped",
    ]
    assert doctor.exit_status(results) == 75
    assert doctor.exit_status(results[:2]) == 0
