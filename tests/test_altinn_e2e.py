"""Altinn 3 end to end: a real agent and the real CLI against the emulator's Maskinporten and its
Altinn token exchange. A profile with `exchange` serves Altinn tokens (signed with the
emulator's Altinn key, read from its Altinn JWKS) through `get`, the env file and the bridge
(newman included), refreshed ahead of the earlier of both expiries; a failing exchange names the
step, exits 77 or 75 and keeps the cached token; tokens per customer organisation
(`--systemuser-org`, `--consumer-org`) are cached under keys of their own and listed by
`status`, not the env file; a mistyped organisation number is refused before any request.
Pure parts (the fast parser, customer claims, the status text) get unit tests at the end."""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from mpagent import altinn, bridge, client, fastcli, paths, protocol, refresher, report
from mpagent import config as mpconfig
from mpagent.agent import load_sources
from mpagent.config import Profile
from mpagent.emulator import Emulator, pki
from mpagent.emulator.server import ALTINN_JWKS
from mpagent.errors import ConfigError
from mpagent.exchange import customer_claims

from .agentproc import AgentProcess, status, wait_for
from .conftest import CLIENT_ID, PASSWORD, SCOPES, issuer_key, profile_for, run_cli, write_config
from .test_bridge import bridge_env, free_port, make_secret, start_agent  # noqa: F401 - fixture
from .test_fastpath import HOT_HALF, importtime
from .test_http_tools import newman, run_shell  # noqa: F401 - newman is a fixture
from .testapi import ProtectedApi

SCOPE = SCOPES[0]
ORG_A, ORG_B = "123456785", "987654325"  # valid MOD11 check digits; both have a system user
NO_SYSTEMUSER = "310520012"  # valid, but the client has no system user for it
BAD_DIGIT = "123456780"  # the check digit of 12345678 is 5
ENV_TT02 = "MASKINPORTEN_TOKEN_TT02_IDPORTEN_DCR_READ"
ENV_PLAIN = "MASKINPORTEN_TOKEN_PLAIN_IDPORTEN_DCR_READ"
STEP = "Maskinporten accepted the grant; Altinn's exchange answered"


@functools.cache
def altinn_key() -> rsa.RSAPrivateKey:
    """The emulators' Altinn signing key: another key than Maskinporten's, made once."""
    return pki.new_rsa_key()


@pytest.fixture
def emulator(request: pytest.FixtureRequest, ca: pki.Issued) -> Iterator[Emulator]:
    """Maskinporten and Altinn on loopback; the client has system users for ORG_A and ORG_B.
    Indirect parameters (lifetimes) go to the Emulator."""
    options: dict[str, Any] = getattr(request, "param", {})
    with Emulator(
        clients={CLIENT_ID: SCOPES},
        trust=[ca.cert],
        hang_seconds=3,
        signing_key=issuer_key(),
        altinn_signing_key=altinn_key(),
        systemusers={CLIENT_ID: [ORG_A, ORG_B]},
        **options,
    ) as emu:
        yield emu


def profiles(emulator: Emulator, p12: Path) -> dict[str, dict[str, Any]]:
    """tt02: Altinn tokens; plain: the same client and keystore, Maskinporten tokens."""
    return {
        "tt02": profile_for(emulator, p12, exchange=emulator.altinn_exchange),
        "plain": profile_for(emulator, p12),
    }


@pytest.fixture
def config(tmp_path: Path, home: Path, emulator: Emulator, p12: Path) -> Path:
    return write_config(
        tmp_path / "config.toml",
        profiles(emulator, p12),
        default_profile="tt02",
        agent={"env_file": str(tmp_path / "tokens.env"), "log_level": "debug"},
    )


def altinn_claims(emulator: Emulator, token: str) -> dict[str, Any]:
    """The claims of an Altinn token, its signature checked with the emulator's Altinn JWKS."""
    keys = requests.get(emulator.issuer.rstrip("/") + ALTINN_JWKS, timeout=5).json()["keys"]
    key = jwt.PyJWK(next(k for k in keys if k["kid"] == jwt.get_unverified_header(token)["kid"]))
    claims = jwt.decode(token, key, algorithms=["RS256"], options={"verify_aud": False})
    assert claims["iss"] == emulator.altinn_issuer
    return claims


def maskinporten_claims(emulator: Emulator, token: str) -> dict[str, Any]:
    """The claims of a Maskinporten token, its signature checked with the emulator's /jwk."""
    keys = requests.get(emulator.issuer + "jwk", timeout=5).json()["keys"]
    claims = jwt.decode(
        token, jwt.PyJWK(keys[0]), algorithms=["RS256"], options={"verify_aud": False}
    )
    assert claims["iss"] == emulator.issuer
    return claims


def get(*argv: str, status: int = 0) -> str:
    result = run_cli("get", *argv)
    assert result.returncode == status, result.stderr
    return result.stdout.strip() if status == 0 else result.stderr


def env_file(config: Path) -> dict[str, str]:
    path = config.parent / "tokens.env"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return dict(line.split("=", 1) for line in lines if "=" in line)


# -- a profile with `exchange` ----------------------------------------------------------------


def test_get_serves_the_altinn_token(agent: AgentProcess, emulator: Emulator) -> None:
    """`get` on a profile with `exchange` prints an Altinn token (Altinn's key and issuer, the
    client's scope), served until the Maskinporten token's earlier expiry; the profile without
    `exchange`, on the same client and keystore, still gets the Maskinporten token."""
    document = json.loads(get("--json", SCOPE))
    claims = altinn_claims(emulator, document["access_token"])
    assert claims["client_id"] == CLIENT_ID and claims["scope"] == SCOPE
    assert claims["urn:altinn:authenticatemethod"] == "maskinporten"
    assert document["expires_at"] <= time.time() + 121 < claims["exp"]  # 120 s, not 1800 s
    plain = get("--profile", "plain", SCOPE)
    assert maskinporten_claims(emulator, plain)["scope"] == SCOPE
    assert plain != document["access_token"]
    assert get(SCOPE) == document["access_token"]  # cached: one exchange per token
    assert emulator.altinn_tokens_issued == 1


def test_env_file_holds_the_altinn_token(agent: AgentProcess, emulator: Emulator) -> None:
    """The env file holds the Altinn token under the exchanging profile's names, the
    Maskinporten token under the other's; `mpagent env` exports the same Altinn token."""
    tokens = wait_for(
        lambda: (t := env_file(agent.config)).get(ENV_TT02) and t.get(ENV_PLAIN) and t
    )
    assert tokens[ENV_TT02] == get(SCOPE)
    altinn_claims(emulator, tokens[ENV_TT02])
    maskinporten_claims(emulator, tokens[ENV_PLAIN])
    exported = run_cli("env", "--profile", "tt02")
    assert f"export {ENV_TT02}={tokens[ENV_TT02]}\n" in exported.stdout, exported.stderr


def test_status_names_the_exchange(agent: AgentProcess, emulator: Emulator) -> None:
    """`status` says which profile's tokens are exchanged and where, in JSON and in text."""
    get(SCOPE)
    document = status()
    assert document["exchanges"] == {"tt02": emulator.altinn_exchange}
    entry = next(t for t in document["tokens"] if t["profile"] == "tt02")
    assert entry["exchange"] == emulator.altinn_exchange and entry["systemuser_org"] is None
    text = run_cli("status").stdout
    assert f"exchange  tt02: Maskinporten tokens exchanged at {emulator.altinn_exchange}" in text


@pytest.mark.slow
@pytest.mark.parametrize(
    ("emulator", "shorter"),
    [({"token_lifetime": 4}, "maskinporten"), ({"altinn_lifetime": 4}, "altinn")],
    indirect=["emulator"],
)
def test_refreshed_ahead_of_the_shorter_expiry(
    agent: AgentProcess, emulator: Emulator, shorter: str
) -> None:
    """The token served expires with the shorter-lived of the Maskinporten token (4 s here)
    and the Altinn token (4 s here), and the agent fetches and exchanges a new one in the
    background before then."""
    document = json.loads(get("--json", SCOPE))
    claims = altinn_claims(emulator, document["access_token"])
    if shorter == "altinn":
        assert document["expires_at"] == claims["exp"]
    else:
        assert document["expires_at"] < claims["exp"] - 1000
    wait_for(lambda: emulator.altinn_tokens_issued >= 2, timeout=8)  # a background refresh
    assert time.time() < document["expires_at"] + 1  # before the old one expired
    fresh = json.loads(get("--json", SCOPE))
    assert fresh["access_token"] != document["access_token"]
    assert fresh["expires_at"] > document["expires_at"]


def test_failing_exchange_names_the_step_and_keeps_the_cached_token(
    agent: AgentProcess, emulator: Emulator
) -> None:
    """Altinn refusing (401) while Maskinporten works: `refresh` exits 77 saying Maskinporten
    accepted the grant and the exchange answered 401; Altinn failing (503): exit 75. Each time
    `get` still serves the valid token it had."""
    token = get(SCOPE)
    before = emulator.token_requests
    emulator.inject_exchange("401")
    refused = run_cli("refresh", "tt02")
    assert refused.returncode == 77, refused.stderr
    assert f"{STEP} 401: the token was refused (injected fault)" in refused.stderr
    assert emulator.token_requests == before + 1  # Maskinporten was asked, and answered
    assert get(SCOPE) == token
    emulator.inject_exchange("503")
    failing = run_cli("refresh", "tt02")
    assert failing.returncode == 75, failing.stderr
    assert "Altinn's exchange answered HTTP 503" in failing.stderr
    assert get(SCOPE) == token
    entry = next(t for t in status()["tokens"] if t["profile"] == "tt02")
    assert entry["valid"] and "HTTP 503" in entry["last_error"]["message"]
    assert entry["last_error"]["step"] == "altinn"


def test_get_through_the_agent_without_a_cached_token_classifies(
    agent: AgentProcess, emulator: Emulator
) -> None:
    """Through the agent, a `get` with no cached token (a scope nobody asked for yet) while
    Altinn refuses (401) exits 77 at once, naming the step; an Altinn failing (503) is
    retried, then exits 75 naming it too."""
    get(SCOPE)  # the agent's configured token is exchanged: the fault is for the next one
    emulator.inject_exchange("401")
    refused = run_cli("get", "--profile", "tt02", SCOPES[1])
    assert refused.returncode == 77 and refused.stdout == "", refused.stderr
    assert f"{STEP} 401: the token was refused (injected fault)" in refused.stderr


@pytest.mark.slow
def test_get_through_the_agent_waits_out_then_reports_a_failing_exchange(
    agent: AgentProcess, emulator: Emulator
) -> None:
    """Altinn answering 503 to every exchange: a `get` with no cached token waits out the
    short backoffs (GET_WAIT), then exits 75 naming the step; Maskinporten was asked."""
    get(SCOPE)  # the agent's configured token is exchanged: the faults are for the next ones
    before = emulator.token_requests
    emulator.inject_exchange("503", 20)
    failing = run_cli("get", "--profile", "tt02", SCOPES[2])
    assert failing.returncode == 75 and failing.stdout == "", failing.stderr
    assert "Maskinporten accepted the grant; Altinn's exchange answered HTTP 503" in (
        failing.stderr
    )
    assert emulator.token_requests > before


def test_no_agent_get_exchanges_and_classifies(config: Path, emulator: Emulator) -> None:
    """`get --no-agent` exchanges in the process too, for a customer as well; a failing
    exchange exits 75 (503) or 77 (401) naming the step."""
    env = {"MPAGENT_KEYSTORE_PASSWORD": PASSWORD, "MPAGENT_CONFIG": str(config)}
    result = run_cli("get", "--no-agent", SCOPE, "--systemuser-org", ORG_A, env=env)
    assert result.returncode == 0, result.stderr
    claims = altinn_claims(emulator, result.stdout.strip())
    assert altinn.systemuser_org_of(claims["authorization_details"]) == ORG_A
    for fault, code in (("503", 75), ("401", 77)):
        emulator.inject_exchange(fault)
        failed = run_cli("get", "--no-agent", SCOPE, env=env)
        assert failed.returncode == code and "Altinn's exchange answered" in failed.stderr


# -- per customer organisation ---------------------------------------------------------------


def test_two_customer_orgs_give_two_tokens(
    agent: AgentProcess, emulator: Emulator, config: Path
) -> None:
    """`get --systemuser-org` for two organisations gives two Altinn tokens, each naming its
    organisation's system user, each cached under its own key ("0192:" + the number is the
    same key); `status` lists both with the organisation, the env file neither."""
    a = get(SCOPE, "--systemuser-org", ORG_A)
    b = get(SCOPE, "--systemuser-org", altinn.ORG_PREFIX + ORG_B)
    assert len({a, b, get(SCOPE)}) == 3
    for token, org in ((a, ORG_A), (b, ORG_B)):
        claims = altinn_claims(emulator, token)
        assert altinn.systemuser_org_of(claims["authorization_details"]) == org
    requests_before = emulator.token_requests
    assert get(SCOPE, "--systemuser-org", altinn.ORG_PREFIX + ORG_A) == a
    assert get(SCOPE, "--systemuser-org", ORG_B) == b
    assert emulator.token_requests == requests_before
    listed = {t["systemuser_org"] for t in status()["tokens"] if t["profile"] == "tt02"}
    assert listed == {None, ORG_A, ORG_B}
    text = run_cli("status").stdout
    assert f"systemuser {ORG_A}" in text and f"systemuser {ORG_B}" in text
    assert not {a, b} & set(env_file(config).values())


def test_organisation_without_system_user_gets_mp303_hint(agent: AgentProcess) -> None:
    """An organisation the client has no system user for: exit 77, Maskinporten's MP-303 and
    the next step, naming the organisation."""
    said = get(SCOPE, "--systemuser-org", NO_SYSTEMUSER, status=77)
    assert "MP-303" in said and f"is there a system user for org {NO_SYSTEMUSER}" in said


def test_consumer_org_per_request(agent: AgentProcess, emulator: Emulator) -> None:
    """`get --consumer-org` on the plain profile gives a Maskinporten token whose consumer is
    that organisation; through `header` as well."""
    token = get("--profile", "plain", SCOPE, "--consumer-org", ORG_B)
    assert maskinporten_claims(emulator, token)["consumer"]["ID"] == altinn.ORG_PREFIX + ORG_B
    header = run_cli("header", "--profile", "plain", SCOPE, "--consumer-org", ORG_B)
    assert header.stdout == f"Authorization: Bearer {token}\n", header.stderr


def test_bad_check_digit_refused_before_any_request(
    config: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mistyped organisation number fails with exit 78 naming the option and the right
    digit, on the fast path, through argparse (`header`) and with --no-agent, before anything
    is asked: no agent is running (which would be exit 69) and Maskinporten saw no request."""
    monkeypatch.setenv("MPAGENT_NO_AUTOSTART", "1")
    monkeypatch.setenv("MPAGENT_CONFIG", str(config))
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    for argv in (
        ["get", SCOPE, "--systemuser-org", BAD_DIGIT],
        ["get", SCOPE, f"--consumer-org={BAD_DIGIT}"],
        ["header", SCOPE, "--systemuser-org", BAD_DIGIT],
        ["get", "--no-agent", SCOPE, "--systemuser-org", BAD_DIGIT],
    ):
        result = run_cli(*argv)
        option = "--consumer-org" if "consumer" in argv[-1] else "--systemuser-org"
        assert result.returncode == 78 and result.stdout == "", result.stderr
        assert f"{option} = '{BAD_DIGIT}' has a wrong check digit: the last digit must be 5" in (
            result.stderr
        )
    assert emulator.token_requests == 0


def test_wire_protocol_checks_the_organisation_number(
    agent: AgentProcess, emulator: Emulator
) -> None:
    """A raw `get` on the socket naming a systemuser_org with a bad check digit is refused
    with kind=config naming the field, before any token request; the agent keeps serving."""
    get(SCOPE)  # the agent's own tokens are fetched; count from here
    before = emulator.token_requests
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(paths.socket_path()))
        s.sendall(f"mpagent/1 get scope={SCOPE} systemuser_org={BAD_DIGIT}\n".encode())
        words, fields = protocol.decode(s.recv(65536))
    assert words == ["error"] and protocol.first(fields, "kind") == "config", fields
    message = protocol.first(fields, "message") or ""
    assert message.startswith(f"systemuser_org = '{BAD_DIGIT}' has a wrong check digit")
    assert emulator.token_requests == before
    assert get(SCOPE)


def test_refresh_tells_customer_keys_apart(agent: AgentProcess) -> None:
    """`refresh`'s reply carries each key's systemuser_org / consumer_org, so two customer
    keys of one scope are told apart, and its lines name the organisation."""
    get(SCOPE, "--systemuser-org", ORG_A)
    get(SCOPE, "--systemuser-org", ORG_B)
    get("--profile", "plain", SCOPE, "--consumer-org", ORG_B)
    rows = json.loads(dict(client.call(str(paths.socket_path()), "refresh"))["json"])
    orgs = {(r["profile"], r["systemuser_org"], r["consumer_org"]) for r in rows if r["ok"]}
    assert orgs == {
        ("tt02", None, None),
        ("tt02", ORG_A, None),
        ("tt02", ORG_B, None),
        ("plain", None, None),
        ("plain", None, ORG_B),
    }
    said = run_cli("refresh").stderr
    for line in (
        f"refreshed tt02:{SCOPE} (systemuser {ORG_A})",
        f"refreshed tt02:{SCOPE} (systemuser {ORG_B})",
        f"refreshed plain:{SCOPE} (consumer {ORG_B})",
        f"refreshed tt02:{SCOPE}\n",
    ):
        assert line in said, said


def test_customer_get_stays_on_the_fast_path(agent: AgentProcess) -> None:
    """A cached `get --systemuser-org` is answered on the fast path: no fullcli, no argparse;
    mpagent.altinn is the one module it adds (to check the number)."""
    assert run_cli("get", SCOPE, "--systemuser-org", ORG_A).returncode == 0
    result, imported = importtime("console-script", "get", SCOPE, "--systemuser-org", ORG_A)
    assert result.returncode == 0 and result.stdout.startswith("eyJ"), result.stderr
    ours = {name for name in imported if name.split(".")[0] == "mpagent"}
    assert ours == HOT_HALF | {"mpagent.altinn"} and "argparse" not in imported, sorted(ours)


# -- the bridge ---------------------------------------------------------------------------------


@pytest.fixture
def bridged(
    bridge_env: None,  # noqa: F811
    tmp_path: Path,
    emulator: Emulator,
    p12: Path,
) -> Iterator[tuple[AgentProcess, str, str]]:
    """An agent with the bridge on: (agent, token URL, secret)."""
    port = free_port()
    cfg = write_config(
        tmp_path / "config.toml",
        profiles(emulator, p12),
        default_profile="tt02",
        agent={"log_level": "debug"},
        bridge={"listen": f"127.0.0.1:{port}"},
    )
    running = start_agent(cfg, tmp_path / "agent.log", port, make_secret(cfg))
    yield running.agent, running.url, running.secret
    running.agent.stop()
    assert running.secret not in running.agent.log() and "eyJ" not in running.agent.log()


def test_bridge_serves_altinn_tokens_per_customer(
    bridged: tuple[AgentProcess, str, str], emulator: Emulator
) -> None:
    """The bridge answers with the Altinn token; its form's systemuser_org gives the system
    user's token; a mistyped number is a 400 naming the field, with no token request."""
    _, url, secret = bridged
    form = {"grant_type": "client_credentials", "client_id": "tt02", "client_secret": secret}
    plain = requests.post(url, data={**form, "scope": SCOPE}, timeout=10)
    assert plain.status_code == 200, plain.text
    assert altinn_claims(emulator, plain.json()["access_token"])["scope"] == SCOPE
    customer = requests.post(
        url, data={**form, "scope": SCOPE, "systemuser_org": ORG_B}, timeout=10
    )
    claims = altinn_claims(emulator, customer.json()["access_token"])
    assert altinn.systemuser_org_of(claims["authorization_details"]) == ORG_B
    before = emulator.token_requests
    bad = requests.post(url, data={**form, "scope": SCOPE, "consumer_org": BAD_DIGIT}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_request"
    assert "consumer_org = '123456780' has a wrong check digit" in bad.json()["error_description"]
    assert emulator.token_requests == before


def test_bridge_answers_customer_mistakes_400(
    bridge_env: None,  # noqa: F811
    tmp_path: Path,
    emulator: Emulator,
    p12: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bridge (in process, with a real refresher) answers consumer_org on a profile with
    iss_onbehalfof, and a customer beyond the customer-key cap, with 400 invalid_request and
    the reason, not 500; neither reaches Maskinporten."""
    monkeypatch.setattr(refresher, "MAX_CUSTOMER_KEYS", 1)
    port = free_port()
    path = write_config(
        tmp_path / "config.toml",
        {**profiles(emulator, p12), "onbehalf": profile_for(emulator, p12, iss_onbehalfof="x")},
        default_profile="tt02",
        bridge={"listen": f"127.0.0.1:{port}"},
    )
    cfg = mpconfig.load(path)
    secret = make_secret(path)
    form = {"grant_type": "client_credentials", "client_secret": secret, "scope": SCOPE}
    url = f"http://127.0.0.1:{port}/token"
    answers: list[requests.Response] = []

    def clients() -> None:
        for extra in (
            {"client_id": "onbehalf", "consumer_org": ORG_A},
            {"client_id": "tt02", "systemuser_org": ORG_A},
            {"client_id": "tt02", "systemuser_org": ORG_B},
        ):
            answers.append(requests.post(url, data={**form, **extra}, timeout=10))

    async def main() -> None:
        with ThreadPoolExecutor(2) as pool, ThreadPoolExecutor(1) as io:
            kept = refresher.Refresher(pool)
            loaded = load_sources(cfg)
            kept.set_sources(loaded.sources, cfg.default_profile, loaded.unusable)
            server = await bridge.start(cfg.bridge, kept, io)
            try:
                await asyncio.to_thread(clients)
            finally:
                server.close()

    asyncio.run(main())
    onbehalf, first, beyond = answers
    assert onbehalf.status_code == 400 and onbehalf.json()["error"] == "invalid_request"
    said = onbehalf.json()["error_description"]
    assert "takes only one of iss_onbehalfof and consumer_org" in said
    assert first.status_code == 200, first.text
    assert beyond.status_code == 400 and beyond.json()["error"] == "invalid_request"
    assert "too many customer organisations at once: 1" in beyond.json()["error_description"]
    assert emulator.token_requests == 1  # the first customer's only


@pytest.mark.slow
def test_newman_gets_altinn_tokens_through_the_bridge(
    newman: str,  # noqa: F811
    bridged: tuple[AgentProcess, str, str],
    emulator: Emulator,
    tmp_path: Path,
) -> None:
    """The newman line `mpagent postman` prints, for the exchanging profile, reaches an API that
    takes only Altinn tokens (Altinn's key and issuer), with the agent's Altinn token."""
    agent, _, _ = bridged
    work = tmp_path / "work"
    work.mkdir()
    out = run_cli("--config", str(agent.config), "postman", "--profile", "tt02", "--out", str(work))
    assert out.returncode == 0, out.stderr
    line = next(line.strip() for line in out.stdout.splitlines() if "newman run" in line)
    with ProtectedApi(emulator.issuer, SCOPE) as api:
        # Altinn's tokens: its issuer and its keys, not Maskinporten's /jwk.
        api.issuer = emulator.altinn_issuer
        keys = requests.get(emulator.issuer.rstrip("/") + ALTINN_JWKS, timeout=5).json()["keys"]
        api.keys = {key["kid"]: jwt.PyJWK(key) for key in keys}
        run_shell(line.replace("https://api.example.no", api.url) + " --color off", cwd=work)
        assert len(api.accepted) == 1 and not api.refused, api.refused
        assert api.accepted[0][0] == get(SCOPE)


# -- pure parts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "orgs"),
    [
        (["get", "s", "--systemuser-org", ORG_A], (ORG_A, None)),
        (["get", "s", f"--consumer-org={ORG_B}", "-p", "x"], (None, ORG_B)),
        (["get", "--systemuser-org", "0192:" + ORG_A, "s"], ("0192:" + ORG_A, None)),
        (["get", "s"], (None, None)),
    ],
)
def test_fast_parse_takes_the_customer_options(argv: list[str], orgs: tuple[Any, Any]) -> None:
    """The fast parser reads --systemuser-org and --consumer-org of a get, as argparse does."""
    args = fastcli.parse(argv)
    assert args is not None and args.scopes == ["s"]
    assert (args.systemuser_org, args.consumer_org) == orgs


@pytest.mark.parametrize(
    "argv",
    [
        ["get", "s", "--systemuser-org"],
        ["get", "s", "--systemuser-org", ORG_A, "--consumer-org", ORG_B],
        ["env", "--systemuser-org", ORG_A],
        ["--systemuser-org", ORG_A, "get", "s"],
    ],
)
def test_fast_parse_leaves_customer_mistakes_to_argparse(argv: list[str]) -> None:
    """A missing number, both options at once, or the option outside `get`: argparse's."""
    assert fastcli.parse(argv) is None


def test_both_options_at_once_is_a_usage_error(home: Path) -> None:
    """argparse refuses --systemuser-org with --consumer-org: exit 2, naming both."""
    result = run_cli("get", "s", "--systemuser-org", ORG_A, "--consumer-org", ORG_B)
    assert result.returncode == 2 and "not allowed with argument" in result.stderr


def customer_profile(**claims: Any) -> Profile:
    return Profile("vendor", "test", "c", ("s",), Path("k.p12"), claims=claims, systemuser_ref="r1")


def test_customer_claims() -> None:
    """A system user's org replaces the profile's authorization_details (with its
    systemuser_ref as externalRef) and keeps its other claims; a consumer_org is set as its
    nine digits; the profile's own claims are left as they are."""
    profile = customer_profile(resource="https://api/", authorization_details=[{"type": "x"}])
    claims = customer_claims(profile, systemuser_org="0192:" + ORG_A)
    assert claims == {
        "resource": "https://api/",
        "authorization_details": altinn.systemuser_details(ORG_A, "r1"),
    }
    assert customer_claims(profile, consumer_org=altinn.ORG_PREFIX + ORG_B)["consumer_org"] == ORG_B
    assert profile.claims["authorization_details"] == [{"type": "x"}]


def test_customer_claims_drop_the_other_kind() -> None:
    """Asking for one kind of customer token drops the other kind the profile carries: a
    system user's claims lose the profile's consumer_org; a delegated token's lose the
    profile's system user (details of other types stay)."""
    system_user = altinn.systemuser_details(ORG_A)
    both = customer_profile(authorization_details=[*system_user, {"type": "x"}])
    assert customer_claims(both, consumer_org=ORG_B) == {
        "consumer_org": ORG_B,
        "authorization_details": [{"type": "x"}],
    }
    only = customer_profile(authorization_details=system_user)
    assert customer_claims(only, consumer_org=ORG_B) == {"consumer_org": ORG_B}
    delegated = customer_profile(consumer_org=ORG_B)
    assert customer_claims(delegated, systemuser_org=ORG_A) == {
        "authorization_details": altinn.systemuser_details(ORG_A, "r1")
    }


def test_customer_claims_refusals() -> None:
    """Both organisations at once, consumer_org on a profile with iss_onbehalfof, and a bad
    check digit are ConfigErrors saying what to do."""
    with pytest.raises(ConfigError, match="not both at once"):
        customer_claims(customer_profile(), ORG_A, ORG_B)
    with pytest.raises(ConfigError, match="takes only one of iss_onbehalfof and consumer_org"):
        customer_claims(customer_profile(iss_onbehalfof="x"), consumer_org=ORG_A)
    with pytest.raises(ConfigError, match="systemuser_org = '123456780' has a wrong check digit"):
        customer_claims(customer_profile(), systemuser_org=BAD_DIGIT)


def test_status_text_shows_exchange_and_customers() -> None:
    """The status text has a line per exchanging profile, and a FOR column naming each
    token's customer organisation once there is one (none without)."""
    token = {"profile": "tt02", "scope": SCOPE, "expires_at": None, "next_refresh": None}
    doc: dict[str, Any] = {
        "pid": 1,
        "uptime": 1.0,
        "version": "x",
        "socket": "s",
        "env_file": "e",
        "config": "c",
        "exchanges": {"tt02": "altinn-tt02"},
        "tokens": [{**token, "refreshes": 1, "exchange": "altinn-tt02"}],
    }
    lines = report.status(doc, now=0).splitlines()
    wanted = "exchange  tt02: Maskinporten tokens exchanged at altinn-tt02, Altinn tokens served"
    assert wanted in lines and "FOR" not in lines[-2]
    doc["tokens"] += [
        {**token, "refreshes": 2, "systemuser_org": ORG_A},
        {**token, "refreshes": 3, "consumer_org": ORG_B},
    ]
    lines = report.status(doc, now=0).splitlines()
    header = lines.index(next(line for line in lines if line.startswith("PROFILE")))
    start = lines[header].index("FOR")
    cells = [line[start : start + 21].strip() for line in lines[header + 1 :]]
    assert cells == ["-", f"systemuser {ORG_A}", f"consumer {ORG_B}"]
    assert [line.split()[-1] for line in lines[header + 1 :]] == ["1", "2", "3"]
