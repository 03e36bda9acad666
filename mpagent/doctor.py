"""`mpagent doctor`: check one profile step by step, from the config file to a real token.

Each check is a small function returning a `Result`; `render` makes text of them, `main` prints.
A check whose inputs failed is skipped. Exit status: that of the first failure's error class (78
config, key or certificate; 75 issuer unreachable; 77 refused; 1 clock), else 0. No secrets shown.
"""

from __future__ import annotations

import datetime as dt
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from cryptography.x509.oid import NameOID

from mpagent import config as config_module
from mpagent import errors
from mpagent.config import ENVIRONMENTS, Profile
from mpagent.envfile import name_part
from mpagent.exchange import Exchange, load_key
from mpagent.issuer import Issuer, endpoints_from, hint_for, other_host
from mpagent.keys import Passwords, SigningKey, days_left, describe, key_usages
from mpagent.keywatch import watches
from mpagent.ownkeys import RENEW_DAYS, RegisteredKey, expiry_text
from mpagent.passwords import ProfilePasswords

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
SYMBOLS = {OK: "✓", WARN: "!", FAIL: "✗", SKIP: "-"}
SKEW_WARN, SKEW_FAIL = 5.0, 10.0  # Maskinporten allows 10 s
# Test CAs say so in their name: "Buypass Class 3 Test4 CA G2 ST Business", "Commfides CPN
# Enterprise-Norwegian SHA256 CA - TEST2", "mpagent throwaway test CA". Production ones do not.
_TEST_CA = re.compile(r"\btest", re.IGNORECASE)
KEYSTORE_ROWS = ("keystore opens", "the alias holds a private key", "key and certificate match")
CERTIFICATE_ROWS: tuple[str, ...] = ("key usage includes digitalSignature", "certificate validity")
CERTIFICATE_ROWS += ("certificate fits the environment",)
# keys.MESSAGES checks failing the second and third keystore rows; any other fails the first.
_KEY_CHECKS = {"alias_not_found", "trusted_cert_alias", "no_private_key", "several_keys"}
_KEY_CHECKS |= {"wrong_key_password", "not_rsa", "unreadable_key"}
_MATCH_CHECKS = ("key_certificate_mismatch", "no_certificate", "unreadable_certificate")
_SECRET_FIX = {  # a fix line of its own for the password failures, as for every other row
    "wrong_store_password": "mpagent secret set {p}   (or MPAGENT_KEYSTORE_PASSWORD_{P}, "
    "password_command; see README, Passwords)",
    "no_password": "mpagent secret set {p}   (or MPAGENT_KEYSTORE_PASSWORD_{P}, password_command, "
    "or `mpagent unlock {p}` for a running agent)",
    "wrong_key_password": "mpagent secret set {p} --key   (or MPAGENT_KEY_PASSWORD_{P})",
}


@dataclass(frozen=True)
class Result:
    status: str  # OK, WARN, FAIL or SKIP
    title: str
    detail: str = ""
    fix: str = ""
    exit_code: int = 0  # for a failure: the exit status of its error class


def ok(title: str, detail: str = "") -> Result:
    return Result(OK, title, detail)


def skipped(title: str, why: str) -> Result:
    return Result(SKIP, title, why)


def failed(title: str, detail: str, fix: str = "", code: int = errors.EX_CONFIG) -> Result:
    return Result(FAIL, title, detail, fix, code)


# -- configuration and key material


def check_config(path: str | None, name: str | None) -> tuple[Result, Any, Profile | None]:
    try:
        cfg = config_module.load(path)
        profile = cfg.profile(name)
    except errors.ConfigError as exc:
        return failed("config", str(exc), code=exc.exit_code), None, None
    where = f"{cfg.path}, profile {profile.name} ({profile.environment})"
    others = cfg.problems(except_for=profile.name)
    if others:  # another profile's mistake does not stop this one
        fix = "fix the other profiles too, or remove them; this one is checked below"
        return Result(WARN, "config", f"{where}; " + "; ".join(others), fix), cfg, profile
    return ok("config", where), cfg, profile


def check_keystore(
    profile: Profile, passwords: Passwords
) -> tuple[list[Result], SigningKey | None]:
    """The keystore rows and the key if it loads, once, as the agent loads it, except that a
    certificate error is kept on the key (`problems`) for the certificate rows to show."""
    try:
        key = load_key(profile, passwords, strict=False)
    except errors.ConfigError as exc:
        return _keystore_failure(profile, exc), None
    return _keystore_rows(key), key


def _keystore_rows(key: SigningKey) -> list[Result]:
    leaf = f"certificate {describe(key.chain[0])}" if key.chain else "no certificate (kid mode)"
    entry = f"{key.source}: RSA {key.private_key.key_size} bit, {key.fingerprint}"
    opened = key.source.split(" (entry")[0]
    return [ok(KEYSTORE_ROWS[0], opened), ok(KEYSTORE_ROWS[1], entry), ok(KEYSTORE_ROWS[2], leaf)]


def _keystore_failure(profile: Profile, exc: errors.ConfigError) -> list[Result]:
    check = str(exc.details.get("check", ""))
    row = 1 if check in _KEY_CHECKS else 2 if check in _MATCH_CHECKS else 0
    fix = _SECRET_FIX.get(check, "").format(p=profile.name, P=name_part(profile.name))
    rows = [ok(title) for title in KEYSTORE_ROWS[:row]]
    rows.append(failed(KEYSTORE_ROWS[row], str(exc), fix, exc.exit_code))
    why = f"needs '{KEYSTORE_ROWS[row]}'"
    return rows + [skipped(title, why) for title in KEYSTORE_ROWS[row + 1 :]]


def check_key_usage(key: SigningKey) -> Result:
    """A warning (!) when the certificate lacks digitalSignature: Maskinporten may refuse it."""
    title = CERTIFICATE_ROWS[0]
    found = [p.details for p in key.problems if p.check == "not_digital_signature"]
    if found:
        usage = found[0]
        detail = (
            f"the certificate ({usage['subject']}) has key usage {usage['usages']}, not"
            " digitalSignature: Maskinporten may refuse it (MP-120)"
        )
        return Result(WARN, title, detail, f"if it does, {usage['instead']}")
    usages = key_usages(key.chain[0])
    return ok(
        title, "no key usage extension (no restriction)" if usages is None else ", ".join(usages)
    )


def check_validity(key: SigningKey, now: dt.datetime) -> Result:
    title, leaf = CERTIFICATE_ROWS[1], key.chain[0]
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    found = {p.check: p for p in key.problems}
    if "certificate_not_yet_valid" in found:
        return failed(title, f"not valid before {start:%Y-%m-%d %H:%M} UTC", "check the clock")
    if "certificate_expired" in found:
        fix = "order a renewed certificate and point `keystore` at it"
        return failed(title, f"expired on {end:%Y-%m-%d} ({-days_left(key, now)} days ago)", fix)
    if "certificate_expiring" in found:
        detail = found["certificate_expiring"].message
        return Result(WARN, title, detail, "order a renewed certificate now")
    return ok(title, f"valid until {end:%Y-%m-%d} ({days_left(key, now)} days left)")


def is_test_ca(issuer_name: str) -> bool:
    return bool(_TEST_CA.search(issuer_name))


# Skyporten is Maskinporten's clients under other issuers: sky-test takes test certificates as
# test does, sky production ones (Digdir: "et ekte Maskinporten-token mot det rette miljøet").
_KINDS = {"test": "test", "prod": "prod", "sky-test": "test", "sky": "prod"}
_OTHER_KIND = {"test": "prod", "prod": "test", "sky-test": "sky", "sky": "sky-test"}


def environment_name(environment: str) -> str | None:
    """The preset (test, prod, sky-test, sky) for its name or its issuer URL (trailing slash
    or not); None for any other issuer (the emulator, a custom URL)."""
    if environment in ENVIRONMENTS:
        return environment
    url = environment.strip().rstrip("/").lower()
    return next((name for name, issuer in ENVIRONMENTS.items() if issuer.rstrip("/") == url), None)


def environment_kind(environment: str) -> str | None:
    """ "test" or "prod" for the presets and their issuers; None for any other issuer (the
    emulator, a custom URL), whose CA doctor cannot judge."""
    name = environment_name(environment)
    return None if name is None else _KINDS[name]


def check_environment(key: SigningKey, environment: str) -> Result:
    title, issuer = CERTIFICATE_ROWS[2], key.chain[0].issuer
    names = issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    ca = ", ".join(str(n.value) for n in names) or issuer.rfc4514_string()
    kind, wanted = ("test" if is_test_ca(ca) else "prod"), environment_kind(environment)
    if wanted is None:
        return skipped(title, f"cannot tell for this issuer ({environment}); {kind} CA {ca}")
    if kind == wanted:
        return ok(title, f"{kind} CA ({ca}) for a {wanted} environment")
    name = environment_name(environment) or wanted
    detail = f"a {kind} certificate (issuer {ca}) in {name}: Maskinporten refuses it (MP-120)"
    fix = f'use your {wanted} certificate, or environment = "{_OTHER_KIND[name]}"'
    return failed(title, detail, fix)


# -- Maskinporten


def check_metadata(issuer: Issuer) -> tuple[Result, float | None]:
    """GET the metadata document and judge its token endpoint as the agent does (https,
    no redirect elsewhere), warning when it is on another host; also the clock skew from
    its Date header."""
    title, url = "metadata reachable", issuer.metadata_url()
    try:
        found = endpoints_from(issuer.metadata(), issuer.url, url)
    except errors.IssuerUnavailable as exc:
        fix = "check the network, and that `environment` is a Maskinporten issuer"
        return failed(title, str(exc), fix, exc.exit_code), issuer.skew
    endpoint = found.token_endpoint
    detail = f"{url}: token endpoint {endpoint}"
    preset = ENVIRONMENTS.get(issuer.environment)
    if preset is not None and found.issuer != preset:  # the aud sent is the preset, exactly
        detail += f", issuer {found.issuer}, but mpagent sends aud {preset}"
        fix = (
            f"the grants would be refused (MP-110): mpagent's {issuer.environment!r} preset no "
            "longer matches the issuer; report it to mpagent's maintainers"
        )
        return Result(WARN, title, detail, fix), issuer.skew
    host = other_host(issuer.url, endpoint)
    if host is not None:
        detail += f", on {host}, not on the issuer's host"
        fix = (
            f"the signed grants go to {host}: make sure it is your issuer's, else fix `environment`"
        )
        return Result(WARN, title, detail, fix), issuer.skew
    return ok(title, detail), issuer.skew


def check_clock(skew: float | None) -> Result:
    if skew is None:
        return skipped("clock", "the issuer's answer had no Date header")
    side = "behind" if skew > 0 else "ahead of"
    text = f"this machine's clock is {abs(skew):.0f} s {side} Maskinporten's"
    fix = "enable time synchronisation (NTP), e.g. `timedatectl set-ntp true`"
    if abs(skew) <= SKEW_WARN:
        return ok("clock", f"within {abs(skew):.0f} s of Maskinporten's")
    if abs(skew) <= SKEW_FAIL:
        return Result(WARN, "clock", text + " (it allows 10 s)", fix)
    return failed("clock", text + "; it refuses grants more than 10 s off", fix, errors.EX_GENERIC)


def check_token(exchange: Exchange, scope: str) -> Result:
    title = f"token for {scope}"
    try:
        token = exchange.fetch([scope])
    except errors.IssuerRejected as exc:
        code = f" [{exc.mp_code}]" if exc.mp_code else ""
        detail = f"Maskinporten refused: {exc.error}{code}: {exc.error_description}"
        return failed(title, detail, explain(exc, exchange.profile.name), exc.exit_code)
    except errors.MpagentError as exc:
        return failed(title, str(exc), code=exc.exit_code)
    return ok(title, f"{token.token_type} token for {token.scope!r}, {token.lifetime:.0f} s")


def explain(exc: errors.IssuerRejected, profile: str = "<profile>") -> str:
    """The next step for a refusal: the likely cause exchange found first (the key usage)."""
    cause = exc.details.get("likely_cause")
    found = hint_for(exc.mp_code, exc.error, exc.error_description or "")
    steps = [f"likely cause: {cause}" if cause else "", found.replace("<profile>", profile)]
    return "; ".join(filter(None, steps)) or "check the client's registration with Digdir"


def check_registered_keys(cfg: Any, profile: Profile, now: float) -> list[Result]:
    """For a profile with admin access (admin_profile or auto_renew): a row per key of the
    client's set in Digdir's admin API, with its expiry, `!` under RENEW_DAYS, and the one
    the profile signs with. The API failing is a row too."""
    from mpagent import adminapi

    title = "registered keys"
    try:
        keys = adminapi.for_profile(cfg, profile).keys(profile.client_id)
    except errors.MpagentError as exc:
        return [failed(title, str(exc), code=exc.exit_code)]
    rows = [registered_key_row(k, now, profile) for k in keys.keys]
    if profile.kid is not None and keys.get(profile.kid) is None:
        detail = f"the profile signs with kid {profile.kid!r}, which client {profile.client_id}"
        detail += f" has not registered ({', '.join(keys.kids()) or 'no keys'})"
        fix = f"mpagent keys create --profile {profile.name} --switch, or correct kid"
        rows.append(failed(title, detail, fix, errors.EX_NOPERM))
    return rows or [ok(title, f"client {profile.client_id} has no registered keys")]


def registered_key_row(key: RegisteredKey, now: float, profile: Profile) -> Result:
    """One key's row: ok, a warning under RENEW_DAYS, a failure if the profile signs with
    an expired one (Maskinporten refuses it: MP-121)."""
    signing = key.kid == profile.kid
    title = f"registered key {key.kid}"
    detail = f"expires {expiry_text(key, now)}" + ("; the profile signs with it" if signing else "")
    left = key.days_left(now)
    if left is None or left >= RENEW_DAYS:
        return ok(title, detail)
    fix = f"mpagent keys renew --profile {profile.name}"
    fix += "" if profile.auto_renew else " (or auto_renew = true: the agent renews)"
    if left <= 0 and signing:
        return failed(title, detail + ": Maskinporten refuses it (MP-121)", fix, errors.EX_NOPERM)
    return Result(WARN, title, detail + f": under {RENEW_DAYS} days", fix)


def check_bridge(config_path: str | None) -> list[Result]:
    """With [bridge] listen set: does the running agent serve its bridge there, or, with no
    agent running, is the port free for one? Whatever else holds it gets the bridge secret
    from the tools that send it there."""
    import json

    from mpagent import bridge, client, paths

    try:
        listen = config_module.load(config_path).bridge.listen
    except errors.ConfigError:
        return []  # the config row says why
    if listen is None:
        return []
    title, where = "token bridge", bridge.listen_text(listen)
    fix = "stop that process, or set [bridge] listen to a free port; then restart the agent"
    try:
        status = json.loads(dict(client.call(paths.socket_path(), "status", timeout=5))["json"])
    except errors.AgentNotRunning as exc:
        if not exc.details.get("absent"):
            return [failed(title, str(exc), code=exc.exit_code)]
        if not bridge.PEER_CHECK:
            return [skipped(title, f"no agent is running; this system cannot show who has {where}")]
        taken = bridge.holder(listen)
        if taken is not None:
            detail = f"{where} is taken by {bridge.describe(taken)}: no agent can serve there"
            return [failed(title, detail, fix)]
        return [ok(title, f"no agent is running; {where} is free for its bridge")]
    problem = bridge.not_serving(status.get("bridge"), listen)
    if problem:
        return [failed(title, problem, fix)]
    state = status["bridge"]
    detail = f"served on {state['url']}; peer check: {state['peer_check']}"
    if not bridge.PEER_CHECK:
        return [
            Result(WARN, title, detail, "other local users reach it: only the secret guards it")
        ]
    return [ok(title, detail)]


# -- running and rendering


def run(config_path: str | None, profile_name: str | None, no_token: bool = False) -> list[Result]:
    result, cfg, profile = check_config(config_path, profile_name)
    if profile is None:
        later = (*KEYSTORE_ROWS, *CERTIFICATE_ROWS, "metadata reachable", "clock", "token request")
        return [result, *(skipped(title, "needs a valid configuration") for title in later)]
    rows, key = check_keystore(
        profile, ProfilePasswords.for_profile(profile, interactive=sys.stdin.isatty())
    )
    results = [result, *rows, *_certificate_checks(profile, key)]
    http = cfg.http
    issuer = Issuer(
        profile.environment, connect_timeout=http.connect_timeout, read_timeout=http.read_timeout
    )
    metadata, skew = check_metadata(issuer)
    clock = check_clock(skew) if metadata.status != FAIL else skipped("clock", "needs metadata")
    results += [metadata, clock]
    # The admin profile's token reads the key set, whatever this profile's own key does.
    registered = watches(profile) and not no_token
    if no_token or key is None or any(r.status == FAIL for r in results):
        results.append(
            skipped("token request", "--no-token" if no_token else "fix the failures first")
        )
    else:
        exchange = Exchange(profile, key, issuer)
        results += [check_token(exchange, scope) for scope in profile.scopes]
    return results + (check_registered_keys(cfg, profile, time.time()) if registered else [])


def _certificate_checks(profile: Profile, key: SigningKey | None) -> list[Result]:
    if key is None:
        return [skipped(title, "needs the key and certificate") for title in CERTIFICATE_ROWS]
    kid = profile.kid or key.kid
    if kid:
        why = f"kid mode (kid {kid!r}): no certificate is sent"
        return [skipped(title, why) for title in CERTIFICATE_ROWS]
    now = dt.datetime.now(dt.UTC)
    usage, validity = check_key_usage(key), check_validity(key, now)
    return [usage, validity, check_environment(key, profile.environment)]


def render(results: Sequence[Result]) -> str:
    """One line per check; text from outside (an issuer's error_description) is escaped."""
    from mpagent.console import printable

    lines = []
    for r in results:
        detail = f"skipped ({r.detail})" if r.status == SKIP else r.detail
        lines.append(f"{SYMBOLS[r.status]} {r.title}" + (f": {detail}" if detail else ""))
        if r.fix and r.status in (FAIL, WARN):
            lines.append(f"    fix: {r.fix}")
    n = {s: sum(r.status == s for r in results) for s in SYMBOLS}
    lines = [printable(line) for line in lines]
    lines.append(f"\n{n[OK]} ok, {n[WARN]} warnings, {n[FAIL]} failed, {n[SKIP]} skipped")
    return "\n".join(lines) + "\n"


def exit_status(results: Sequence[Result]) -> int:
    return next((r.exit_code or errors.EX_GENERIC for r in results if r.status == FAIL), 0)


def main(args: Any, out: TextIO) -> int:
    from mpagent.ask import profile_name

    results = run(args.config, profile_name(args), args.no_token)
    results += check_bridge(args.config)
    out.write(render(results))
    return exit_status(results)
