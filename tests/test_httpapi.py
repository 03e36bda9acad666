"""The texas-compatible endpoint ([http] listen) of a real agent process, over real HTTP on
loopback, with the emulator behind it: texas's requests answered as the shipped spec says,
/openapi.json, /healthz, skip_cache without a stampede, the peer-uid rule against a real second
local user, and `agent --print-env`."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any, cast

import pytest
import requests

from mpagent import config as configuration
from mpagent import texas
from mpagent.emulator import Emulator, pki
from mpagent.errors import ConfigError, MpagentError

from .agentproc import AgentProcess, status, wait_for
from .conftest import CLIENT_ID, PASSWORD, SCOPES, profile_for, run_cli, shared_agent, write_config
from .reliability.test_isolation import OtherUser, other_user  # noqa: F401 - a fixture
from .test_refresher import (  # noqa: F401 - world is a fixture
    ORG_A,
    SCOPE,
    World,
    customer_world,
    until,
    world,
)
from .test_texas import SPEC, response_schema

SPEC_BYTES = resources.files("mpagent").joinpath(texas.SPEC_RESOURCE).read_bytes()
# The scopes texas's examples ask for, registered for the client beside the usual ones.
EXAMPLE_SCOPES = ("altinn:serviceowner/rolesandrights", "skatteetaten:skattekorttilarbeidsgiver")
SYSTEMUSER: dict[str, Any] = {
    "type": "urn:altinn:systemuser",
    "systemuser_org": {"authority": "iso6523-actorid-upis", "ID": "0192:313367002"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def examples(path: str) -> dict[str, dict[str, Any]]:
    content = SPEC["paths"][path]["post"]["requestBody"]["content"]
    return {name: e["value"] for name, e in content["application/json"]["examples"].items()}


class Endpoint:
    def __init__(self, port: int) -> None:
        self.port, self.base = port, f"http://127.0.0.1:{port}"

    def post(self, path: str, fields: dict[str, Any], *, form: bool = False, **kw: Any) -> Any:
        if form:
            text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
            return requests.post(self.base + path, data=text, timeout=30, **kw)
        return requests.post(self.base + path, json=fields, timeout=30, **kw)

    def token(self, target: str = SCOPES[0], **fields: Any) -> Any:
        body = {"identity_provider": "maskinporten", "target": target, **fields}
        return self.post(texas.TOKEN_PATH, body)

    def introspect(self, token: str, provider: str = "maskinporten") -> Any:
        body = {"identity_provider": provider, "token": token}
        return self.post(texas.INTROSPECT_PATH, body)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.base + path, timeout=30, **kw)


def http_config(root: Path, emulator: Emulator, p12: Path, port: int, **http: Any) -> Path:
    return write_config(
        root / "config.toml",
        {"dev": profile_for(emulator, p12)},
        http={"listen": f"127.0.0.1:{port}", **http},
    )


@pytest.fixture(scope="module")
def served(ca: pki.Issued, p12_bytes: bytes) -> Iterator[Endpoint]:
    """One agent for the tests that only ask it (tokens live an hour)."""
    port = free_port()
    clients = {CLIENT_ID: (*SCOPES, *EXAMPLE_SCOPES)}
    make = lambda root, emulator, p12: http_config(root, emulator, p12, port)  # noqa: E731
    with shared_agent(ca, p12_bytes, make, clients):
        endpoint = Endpoint(port)
        wait_for(lambda: endpoint.get("/healthz").status_code == 200, timeout=15)
        yield endpoint


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def config(tmp_path: Path, home: Path, emulator: Emulator, p12: Path, port: int) -> Path:
    """A config for this test's own agent (`agent` fixture), [http] on `port`."""
    return http_config(tmp_path, emulator, p12, port)


# -- texas's requests, as the spec says


def test_every_example_request_of_the_spec_gets_an_answer_the_spec_allows(
    served: Endpoint,
) -> None:
    """Each example of the spec: Maskinporten's get 200 TokenResponse, other providers 400
    ErrorResponse, the introspection example (a token not issued here) 200 inactive. texas's
    system-user example carries systemuser_id and system_id, which Maskinporten (and so the
    emulator) refuses in a grant: its refusal is passed on as 400 invalid_grant."""
    for name, body in examples(texas.TOKEN_PATH).items():
        response = served.post(texas.TOKEN_PATH, body)
        refused = body["identity_provider"] != "maskinporten" or "system_id" in json.dumps(body)
        expected = 400 if refused else 200
        assert response.status_code == expected, (name, response.text)
        assert response.headers["Content-Type"].startswith("application/json")
        response_schema(texas.TOKEN_PATH, expected).validate(response.json())
    for name, body in examples(texas.INTROSPECT_PATH).items():
        response = served.post(texas.INTROSPECT_PATH, body)
        assert response.status_code == 200, name
        response_schema(texas.INTROSPECT_PATH, 200).validate(response.json())
        assert response.json()["active"] is False


def test_form_and_json_bodies_get_the_same_cached_token(served: Endpoint) -> None:
    """A form body is served as a JSON one: both get the cached token of the scope set."""
    fields = {"identity_provider": "maskinporten", "target": SCOPES[0]}
    as_json = served.post(texas.TOKEN_PATH, fields).json()
    as_form = served.post(texas.TOKEN_PATH, fields, form=True).json()
    assert as_json["access_token"] == as_form["access_token"]
    assert as_json["token_type"] == "Bearer" and 0 < as_form["expires_in"] <= 3600


@pytest.mark.parametrize("provider", ["entra_id", "azuread", "tokenx", "idporten", "ansattporten"])
def test_other_identity_providers_get_a_clear_400(served: Endpoint, provider: str) -> None:
    """Every other provider of texas's enum: 400 invalid_request saying only maskinporten is
    served, in a form body as in JSON."""
    fields = {"identity_provider": provider, "target": "api://x/.default"}
    for form in (False, True):
        response = served.post(texas.TOKEN_PATH, fields, form=form)
        document = response.json()
        assert response.status_code == 400 and document["error"] == "invalid_request"
        assert "maskinporten" in document["error_description"]


def test_introspect_is_active_only_for_a_token_this_agent_issued(served: Endpoint) -> None:
    """Its own token: active with the JWT's claims; garbage, a foreign JWT or another provider:
    200 inactive; all as IntrospectResponse."""
    token = served.token().json()["access_token"]
    mine = served.introspect(token).json()
    assert mine["active"] is True and mine["scope"] == SCOPES[0]
    assert mine["client_id"] == CLIENT_ID
    head, _, _ = token.partition(".")
    foreign = head + ".eyJzY29wZSI6ImEifQ.c2ln"  # a JWT of the same header, never issued
    for other in (served.introspect("garbage"), served.introspect(foreign)):
        assert other.status_code == 200 and other.json()["active"] is False
    assert served.introspect(token, "tokenx").json()["active"] is False
    for document in (mine, served.introspect("garbage").json()):
        response_schema(texas.INTROSPECT_PATH, 200).validate(document)


def test_openapi_json_is_the_shipped_spec(served: Endpoint) -> None:
    """GET /openapi.json answers the package's openapi.json byte for byte, as JSON."""
    response = served.get("/openapi.json")
    assert response.status_code == 200 and response.content == SPEC_BYTES
    assert response.headers["Content-Type"].startswith("application/json")


def test_resource_and_authorization_details_get_tokens_of_their_own(served: Endpoint) -> None:
    """A request's resource / authorization_details make a token key of their own: its token
    is not the plain one, and asking again gets it from the cache."""
    plain = served.token(EXAMPLE_SCOPES[0]).json()["access_token"]
    audience = served.token(EXAMPLE_SCOPES[0], resource="https://api.example/").json()
    details = served.token(EXAMPLE_SCOPES[1], authorization_details=[SYSTEMUSER]).json()
    assert audience["access_token"] != plain
    again = served.token(EXAMPLE_SCOPES[0], resource="https://api.example/").json()
    assert again["access_token"] == audience["access_token"]
    claims = served.introspect(details["access_token"]).json()
    assert claims["active"] and claims["authorization_details"][0]["type"] == SYSTEMUSER["type"]


def test_a_request_the_configuration_rules_refuse_is_a_400(served: Endpoint) -> None:
    """authorization_details Maskinporten would refuse (a bad organisation number, two system
    users: ConfigErrors of the request) are a 400 naming the field, before any grant, in JSON
    and form bodies; the agent serves on."""
    bad_org = {**SYSTEMUSER, "systemuser_org": {**SYSTEMUSER["systemuser_org"], "ID": "0192:1"}}
    for details in ([bad_org], [SYSTEMUSER, SYSTEMUSER]):
        for form in (False, True):
            fields = {
                "identity_provider": "maskinporten",
                "target": EXAMPLE_SCOPES[1],
                "authorization_details": details,
            }
            response = served.post(texas.TOKEN_PATH, fields, form=form)
            document = response.json()
            assert response.status_code == 400, response.text
            assert document["error"] == "invalid_request"
            assert "authorization_details" in document["error_description"]
            response_schema(texas.TOKEN_PATH, 400).validate(document)
    assert served.token().status_code == 200


def test_browsers_foreign_hosts_and_wrong_methods_are_refused(served: Endpoint) -> None:
    """Origin: 403; a Host that is not loopback: 421; GET on the token path 405 Allow: POST,
    POST on /healthz 405 Allow: GET; another path 404; a query string 400."""
    fields = {"identity_provider": "maskinporten", "target": SCOPES[0]}
    origin = served.post(texas.TOKEN_PATH, fields, headers={"Origin": "https://evil.example"})
    assert origin.status_code == 403
    host = served.post(texas.TOKEN_PATH, fields, headers={"Host": "evil.example"})
    assert host.status_code == 421
    get = served.get(texas.TOKEN_PATH)
    assert get.status_code == 405 and get.headers["Allow"] == "POST"
    post = served.post("/healthz", {})
    assert post.status_code == 405 and post.headers["Allow"] == "GET"
    assert served.get("/api/v1/other").status_code == 404
    query = requests.post(served.base + texas.TOKEN_PATH + "?target=x", json=fields, timeout=9)
    assert query.status_code == 400


def test_a_malformed_body_is_a_400_never_a_500(served: Endpoint) -> None:
    """Bodies texas.py refuses reach the client as 400 ErrorResponse over real HTTP."""
    url = served.base + texas.TOKEN_PATH
    for content_type, body in [
        ("application/json", b"{"),
        ("application/json", b'{"target": "a", "identity_provider": "maskinporten", "x": NaN}'),
        ("application/json", b"\xff\xfe"),
        ("text/plain", b"target=a"),
        ("application/x-www-form-urlencoded", b"target=%ZZ&identity_provider=maskinporten"),
        ("application/json", b'{"identity_provider": "maskinporten", "target": "a\\"b"}'),
    ]:
        response = requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=9)
        assert response.status_code == 400, (body, response.text)
        response_schema(texas.TOKEN_PATH, 400).validate(response.json())


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(served: Endpoint) -> None:
    """schemathesis, from the served /openapi.json, 40 cases an operation that fit the spec
    and 40 that do not: no answer is a 5xx, and each body is what the spec says for its
    status (malformed requests must be 400s, whatever the issuer says to the rest)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import response_schema_conformance

    schema = schemathesis.openapi.from_url(served.base + "/openapi.json")
    operations = [cast(Any, result).ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} == {texas.TOKEN_PATH, texas.INTROSPECT_PATH}
    seen: list[int] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=40,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(mode))
            def check(case: Any) -> None:
                response = case.call(base_url=served.base, timeout=30)
                seen.append(response.status_code)
                assert response.status_code < 500, (case.body, response.text)
                case.validate_response(
                    response, checks=[not_a_server_error, response_schema_conformance]
                )

            check()
    assert len(seen) >= 100 and {200, 400} <= set(seen), sorted(set(seen))


# -- /healthz, skip_cache


@pytest.mark.slow
def test_healthz_is_503_naming_the_missing_token_then_200(
    emulator: Emulator, config: Path, port: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """While the configured token is not held (the issuer fails every fetch) /healthz is 503
    and names it; once the issuer answers again and the token is held, 200 {"status":
    "ready"}. The failures last until the test has seen the 503 (no race with the backoff)."""
    emulator.inject("503", count=10_000)
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    monkeypatch.setenv("MPAGENT_NO_AUTOSTART", "1")
    proc = AgentProcess(config, tmp_path / "agent.log").wait_ready()
    try:
        endpoint = Endpoint(port)
        wait_for(lambda: endpoint.get("/healthz").status_code == 503, timeout=15)
        first = endpoint.get("/healthz")
        assert first.status_code == 503, first.text
        assert first.json()["status"] == "not ready"
        assert any(SCOPES[0] in line for line in first.json()["missing"])
        emulator.clear_faults()  # the issuer answers again
        wait_for(lambda: endpoint.get("/healthz").status_code == 200, timeout=20)
        assert endpoint.get("/healthz").json() == {"status": "ready"}
    finally:
        proc.stop()


@pytest.mark.slow
def test_skip_cache_gets_a_new_token_and_50_at_once_cost_few_issuer_requests(
    agent: AgentProcess, emulator: Emulator, port: int
) -> None:
    """skip_cache=true answers a token fetched after the request came (not the cached one,
    once that is SKIP_CACHE_AGE s old), and the one it replaced still introspects active;
    skip_cache again within SKIP_CACHE_AGE s gets that same token, no issuer request; 50
    such requests at once join one refresh: a few issuer requests, not 50."""
    from mpagent.refresher import SKIP_CACHE_AGE

    endpoint = Endpoint(port)
    wait_for(lambda: endpoint.get("/healthz").status_code == 200)
    cached = endpoint.token().json()["access_token"]
    time.sleep(SKIP_CACHE_AGE + 0.2)
    fresh = endpoint.token(skip_cache=True).json()["access_token"]
    assert fresh != cached
    assert endpoint.token().json()["access_token"] == fresh  # the new one is the cached one now
    assert endpoint.introspect(cached).json()["active"] is True  # replaced, but still valid
    before = emulator.token_requests
    for _ in range(20):
        assert endpoint.token(skip_cache=True).json()["access_token"] == fresh
    assert emulator.token_requests == before
    time.sleep(SKIP_CACHE_AGE + 0.2)
    answers: list[Any] = []
    start = threading.Barrier(50)

    def ask() -> None:
        start.wait()
        answers.append(endpoint.token(skip_cache=True))

    threads = [threading.Thread(target=ask) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [a.status_code for a in answers] == [200] * 50
    issued = emulator.token_requests - before
    assert 1 <= issued <= 5, issued
    assert fresh not in {a.json()["access_token"] for a in answers}


# -- the refresher's part, with a fake exchange and clock (fast)


def test_a_requests_own_claims_are_a_key_of_their_own_within_the_customer_cap(
    world: World,  # noqa: F811
) -> None:
    """resource / authorization_details become the grant's claims, one key per canonical JSON
    (key order does not matter), counted against MAX_REQUEST_CLAIM_KEYS; a system-user grant
    Maskinporten refuses is a ConfigError naming the field; none asked for: no own key."""
    from mpagent import refresher as module

    exchange = customer_world(world)
    details = [{"type": "urn:altinn:systemuser", "systemuser_org": SYSTEMUSER["systemuser_org"]}]
    one = module.request_claims(
        [SCOPE], {"resource": "https://a/", "authorization_details": details}
    )
    same = module.request_claims(
        [SCOPE], {"authorization_details": details, "resource": "https://a/"}
    )
    assert one == same and module.request_claims([SCOPE], {}) is None

    async def main() -> None:
        await world.refresher.get(None, [SCOPE], None, one)
        assert world.refresher.cached(None, [SCOPE], None, same) is not None

    world.run(main)
    assert exchange.claims == [{"resource": "https://a/", "authorization_details": details}]
    with pytest.raises(ConfigError, match=r"systemuser_org\.ID"):
        module.request_claims(
            [SCOPE],
            {
                "authorization_details": [
                    {
                        **details[0],
                        "systemuser_org": {"authority": "iso6523-actorid-upis", "ID": "0192:1"},
                    }
                ]
            },
        )
    world.refresher.entries.clear()
    for n in range(module.MAX_REQUEST_CLAIM_KEYS):
        world.refresher.cached(
            None, [SCOPE], None, module.request_claims([SCOPE], {"resource": f"https://{n}/"})
        )
    with pytest.raises(MpagentError, match="too many"):
        world.refresher.cached(
            None, [SCOPE], None, module.request_claims([SCOPE], {"resource": "https://x/"})
        )


def test_fresh_joins_the_refresh_in_flight_or_starts_one(world: World) -> None:  # noqa: F811
    """skip_cache's `fresh`: 20 at once while no refresh runs start one fetch and all get its
    token, which is not the cached one (SKIP_CACHE_AGE s old); the next `fresh`,
    SKIP_CACHE_AGE s later, fetches again."""
    import threading as th

    from mpagent.refresher import SKIP_CACHE_AGE

    release = th.Event()

    async def main() -> None:
        cached = await world.refresher.get(None, [SCOPE], None)
        world.clock.now += SKIP_CACHE_AGE  # younger, it is what skip_cache answers
        world.exchange.will(SCOPE, release)
        tasks = [asyncio.create_task(world.refresher.fresh(None, [SCOPE])) for _ in range(20)]
        await until(lambda: len(world.exchange.calls) == 2, "the one fetch")
        release.set()
        got = await asyncio.gather(*tasks)
        assert {t.access_token for t in got} == {"token-2"} != {cached.access_token}
        world.clock.now += SKIP_CACHE_AGE
        again = await world.refresher.fresh(None, [SCOPE])
        assert again.access_token == "token-3"

    world.run(main)
    assert world.exchange.calls == [SCOPE] * 3


# -- who may call


ASK_AS_OTHER = """
port = int(sys.argv[1])
body = b'{"identity_provider": "maskinporten", "target": "' + sys.argv[2].encode() + b'"}'
request = (b"POST /api/v1/token HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nContent-Type: "
           b"application/json\\r\\nContent-Length: " + str(len(body)).encode() + b"\\r\\n\\r\\n" + body)
try:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(request)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\\r\\n\\r\\n")
    line = head.split(b"\\r\\n", 1)[0].decode()
    print(json.dumps(line + (" " + body.decode() if line.endswith("403 Forbidden") else "")
                     if reply else "closed"))
except OSError as exc:
    print(json.dumps(errno.errorcode.get(exc.errno, str(exc))))
"""


@pytest.mark.slow
def test_another_user_is_refused_unless_allowed(
    agent: AgentProcess, config: Path, emulator: Emulator, p12: Path, port: int,
    other_user: OtherUser,  # noqa: F811
) -> None:  # fmt: skip
    """A real second local user gets 403 access_denied naming its uid and allow_uids; after a
    reload with allow_uids = [its uid] it gets a token, with allow_any_local too, and is
    refused again once both are gone; status counts the refusals."""

    def ask() -> str:
        return str(other_user.run(ASK_AS_OTHER, str(port), SCOPES[0]))

    def reload_with(**http: Any) -> None:
        http_config(config.parent, emulator, p12, port, **http)
        reloaded = run_cli("--config", str(config), "reload")
        assert reloaded.returncode == 0, reloaded.stderr

    refused = ask()
    assert refused.startswith("HTTP/1.1 403 Forbidden ") and "access_denied" in refused
    assert f"uid {other_user.uid} may not call this endpoint" in refused
    assert status()["http"]["refused"] == {str(other_user.uid): 1}
    reload_with(allow_uids=[other_user.uid])
    assert ask() == "HTTP/1.1 200 OK"
    reload_with(allow_any_local=True)
    assert ask() == "HTTP/1.1 200 OK"
    reload_with()
    assert ask().startswith("HTTP/1.1 403 Forbidden ")
    assert Endpoint(port).token().status_code == 200  # the agent's own user, always


# -- the CLI and the configuration


def test_print_env_names_the_endpoints_of_http_listen(tmp_path: Path) -> None:
    """`agent --print-env` prints the two NAIS_ variables for [http] listen and exits 0; with
    no [http] listen it exits 78 saying what to add, and runs no agent either way."""
    profile = {"environment": "test", "client_id": CLIENT_ID, "keystore": "/nonexistent.p12"}
    path = write_config(tmp_path / "c.toml", {"dev": profile}, http={"listen": "[::1]:7164"})
    printed = run_cli("--config", str(path), "agent", "--print-env")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.splitlines() == [
        "NAIS_TOKEN_ENDPOINT=http://[::1]:7164/api/v1/token",
        "NAIS_TOKEN_INTROSPECTION_ENDPOINT=http://[::1]:7164/api/v1/introspect",
    ]
    write_config(path, {"dev": profile})
    missing = run_cli("--config", str(path), "agent", "--print-env")
    assert missing.returncode == 78 and missing.stdout == ""
    assert str(path) in missing.stderr and 'listen = "127.0.0.1:7164"' in missing.stderr


def test_status_shows_the_http_listener(served: Endpoint) -> None:
    """`mpagent status` has a line for the endpoint: its token URL and who it answers."""
    shown = run_cli("status")
    assert shown.returncode == 0, shown.stderr
    line = next(x for x in shown.stdout.splitlines() if x.startswith("http "))
    assert f"texas-compatible on {served.base}/api/v1/token" in line and "only uid" in line


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({"listen": "0.0.0.0:7164"}, "[http] listen binds '0.0.0.0', which is not loopback"),
        ({"listen": "127.0.0.1"}, "[http] listen is '127.0.0.1'; write \"127.0.0.1:PORT\""),
        ({"allow_uids": [-1]}, "[http] allow_uids is [-1]; write a list of numeric user ids"),
        ({"allow_uids": "1000"}, "[http] allow_uids is '1000'"),
        ({"allow_any_local": "yes"}, "[http] allow_any_local is 'yes'; write allow_any_local ="),
    ],
)
def test_http_settings_errors_name_the_file_and_key(table: dict[str, Any], named: str) -> None:
    """A wrong [http] listen / allow_uids / allow_any_local is a ConfigError naming the file,
    table and key and saying what to write."""
    with pytest.raises(ConfigError) as raised:
        configuration._http(table, Path("/etc/mpagent.toml"))
    assert raised.value.message.startswith("/etc/mpagent.toml: ") and named in raised.value.message


def test_http_settings_parse() -> None:
    """listen, allow_uids and allow_any_local as written; unset, the endpoint is off."""
    settings = configuration._http(
        {"listen": "[::1]:7164", "allow_uids": [0, 1000], "allow_any_local": True}, Path("/c")
    )
    assert settings.listen == ("::1", 7164) and settings.allow_uids == (0, 1000)
    assert settings.allow_any_local and configuration._http({}, Path("/c")).listen is None


# -- the listener in-process, over real loopback HTTP, with the fake exchange and clock (fast)


async def ask(port: int, raw: bytes) -> tuple[int, dict[str, Any]]:
    """One raw request to the listener; its status and JSON body (empty: none)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    reply = await reader.read()
    writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body) if body else {}


def request(method: str, path: str, document: dict[str, Any] | None = None) -> bytes:
    body = json.dumps(document).encode() if document is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def asking(target: str, **fields: Any) -> bytes:
    body = {"identity_provider": "maskinporten", "target": target, **fields}
    return request("POST", texas.TOKEN_PATH, body)


HEALTH = request("GET", "/healthz")


async def listening(world: World, **http: Any) -> Any:  # noqa: F811
    """The real listener on a kernel-chosen loopback port, serving `world`'s refresher."""
    from mpagent import httpapi

    files = http.pop("files_problem", lambda: None)
    settings = configuration.HttpSettings(listen=("127.0.0.1", 0), **http)
    return await httpapi.start(settings, world.refresher, clock=world.clock, files_problem=files)


def port_of(api: Any) -> int:
    return int(api.server.sockets[0].getsockname()[1])


def two_profiles(world: World) -> None:  # noqa: F811
    """Profiles p (a:read) and q (b:read), no default_profile."""
    from .test_refresher import source

    sources = {"p": source("p", world.exchange), "q": source("q", world.exchange, ("b:read",))}
    world.refresher.set_sources(sources, None)


def test_two_profiles_without_http_profile_are_not_ready_and_say_what_to_set(
    world: World,  # noqa: F811
) -> None:
    """Two profiles, no default_profile, no [http] profile: /healthz 503 and a token request
    500, both naming [http] profile, with no CLI hint (--profile, MPAGENT_PROFILE)."""
    two_profiles(world)

    async def main() -> None:
        api = await listening(world)
        try:
            status, health = await ask(port_of(api), HEALTH)
            assert status == 503 and "[http] profile" in health["missing"][0]
            status, error = await ask(port_of(api), asking(SCOPE))
            assert status == 500 and "[http] profile" in error["error_description"]
            for hint in ("--profile", "MPAGENT_PROFILE"):
                assert hint not in error["error_description"]
            assert "set [http] profile" in api.status()["profile_error"]
        finally:
            api.close()

    world.run(main)
    assert world.exchange.calls == []


def test_http_profile_serves_its_tokens_and_refuses_another_profiles_scope_unasked(
    world: World,  # noqa: F811
) -> None:
    """[http] profile = "p": a:read is served; b:read, a scope of profile q only, is 400
    invalid_scope naming both profiles, and the issuer is never asked for it (no entry
    either); [http] profile naming no profile is 503 naming it."""
    two_profiles(world)

    async def main() -> None:
        api = await listening(world, profile="p")
        try:
            status, token = await ask(port_of(api), asking(SCOPE))
            assert status == 200 and token["access_token"].startswith("token-")
            status, error = await ask(port_of(api), asking("b:read"))
            assert (status, error["error"]) == (400, "invalid_scope")
            assert error["error_description"] == (
                "b:read is a scope of profile q; this endpoint serves profile p ([http] profile)"
            )
            await world.refresher.get("q", ["b:read"], None)  # q's pinned token, for ready
            assert (await ask(port_of(api), HEALTH))[0] == 200
            api.reread(configuration.HttpSettings(listen=api.listen, profile="nope"))
            status, health = await ask(port_of(api), HEALTH)
            assert status == 503 and "[http] profile = 'nope' names no profile" in str(health)
        finally:
            api.close()

    world.run(main)
    assert world.exchange.calls == [SCOPE, "b:read"]  # b:read only by q's own `get`
    assert all(e.key.scope != "b:read" or e.pinned for e in world.refresher.entries.values())


def test_an_issuer_refusal_over_http_carries_no_cli_hint(world: World) -> None:  # noqa: F811
    """An on-demand scope the issuer refuses: 400 invalid_scope with the issuer's words, and
    no `mpagent refresh` (an HTTP caller has no CLI); a `get` keeps the hint."""
    from mpagent.errors import IssuerRejected

    rejected = IssuerRejected("the issuer refused", error="invalid_scope")
    world.exchange.will("c:x", rejected, rejected)

    async def main() -> None:
        api = await listening(world)
        try:
            status, error = await ask(port_of(api), asking("c:x"))
            assert (status, error["error"]) == (400, "invalid_scope")
            assert "mpagent refresh" not in error["error_description"]
        finally:
            api.close()
        world.refresher.entries.clear()
        with pytest.raises(IssuerRejected, match="mpagent refresh p"):
            await world.refresher.get(None, ["c:x"], None)

    world.run(main)


def test_reload_changing_listen_keeps_the_bound_address_and_says_it_waits(
    world: World,  # noqa: F811
) -> None:
    """A reread with another [http] listen: status still shows the bound address, and says
    the listen changes at restart; the bound port still answers."""

    async def main() -> None:
        api = await listening(world)
        try:
            bound = f"127.0.0.1:{port_of(api)}"
            assert api.status()["listen"] == bound and api.status()["pending"] is None
            api.reread(configuration.HttpSettings(listen=("127.0.0.1", 7999)))
            state = api.status()
            assert state["listen"] == bound and state["url"].startswith(f"http://{bound}/")
            assert state["pending"].startswith("listen changes to 127.0.0.1:7999 at restart")
            assert (await ask(port_of(api), asking(SCOPE)))[0] == 200
        finally:
            api.close()

    world.run(main)


def test_healthz_is_503_while_the_token_files_are_not_written(world: World) -> None:  # noqa: F811
    """With a files problem (the agent's [files] writer), /healthz is 503 naming it, though
    every token is held; once it is gone, 200."""
    problem: list[str] = ["token files: cannot write /run/x: Permission denied"]

    async def main() -> None:
        await world.refresher.get(None, [SCOPE], None)
        api = await listening(world, files_problem=lambda: problem[0] if problem else None)
        try:
            status, health = await ask(port_of(api), HEALTH)
            assert status == 503 and health["missing"] == problem
            problem.clear()
            assert await ask(port_of(api), HEALTH) == (200, {"status": "ready"})
        finally:
            api.close()

    world.run(main)


def test_a_refused_uid_gets_a_403_naming_allow_uids(world: World) -> None:  # noqa: F811
    """A peer the uid check refuses hears 403 access_denied naming its uid and [http]
    allow_uids (its request unread), not a reset connection; status counts it."""
    import os

    async def main() -> None:
        api = await listening(world)
        api.uid = os.getuid() + 1  # this process's connections are now another user's
        try:
            status, error = await ask(port_of(api), asking(SCOPE))
            assert (status, error["error"]) == (403, "access_denied")
            assert error["error_description"] == (
                f"uid {os.getuid()} may not call this endpoint: add it to [http] allow_uids"
            )
            assert api.status()["refused"] == {str(os.getuid()): 1}
        finally:
            api.close()

    world.run(main)
    assert world.exchange.calls == []


def test_an_unparsable_target_is_a_400_and_bugs_log_a_few_tracebacks(
    world: World,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`GET //[ HTTP/1.1` (urlsplit's ValueError) is a 400 "not an HTTP/1.1 request line";
    an unexpected error serving connections logs at most 3 tracebacks for 20 connections."""

    async def main() -> None:
        api = await listening(world)
        try:
            raw = b"GET //[ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            status, error = await ask(port_of(api), raw)
            assert (status, error["error_description"]) == (400, "not an HTTP/1.1 request line")

            async def broken(_: Any) -> bytes:
                raise RuntimeError("a bug")

            api.answer = broken
            for _ in range(20):
                reader, writer = await asyncio.open_connection("127.0.0.1", port_of(api))
                writer.write(HEALTH)
                assert await reader.read() == b""
                writer.close()
        finally:
            api.close()

    with caplog.at_level("ERROR"):
        world.run(main)
    tracebacks = [r for r in caplog.records if r.exc_info and "unexpected error" in r.msg]
    assert 1 <= len(tracebacks) <= 3, len(tracebacks)


def test_introspect_knows_a_token_replaced_by_several_refreshes(world: World) -> None:  # noqa: F811
    """A token still valid after 7 more refreshes of its key introspects active; one that
    8 newer ones pushed out (KEPT_ISSUED) is inactive."""
    from mpagent.refresher import KEPT_ISSUED, SKIP_CACHE_AGE

    async def main() -> None:
        api = await listening(world)
        try:
            first = await world.refresher.get(None, [SCOPE], None)
            issued = [first]
            for _ in range(KEPT_ISSUED):
                world.clock.now += SKIP_CACHE_AGE
                issued.append(await world.refresher.fresh(None, [SCOPE]))
            body = lambda t: request(  # noqa: E731
                "POST", texas.INTROSPECT_PATH, {"identity_provider": "maskinporten", "token": t}
            )
            _, old = await ask(port_of(api), body(issued[1].access_token))
            assert old["active"] is True and old["scope"] == SCOPE
            _, gone = await ask(port_of(api), body(first.access_token))
            assert gone["active"] is False
        finally:
            api.close()

    world.run(main)


def test_skip_cache_in_a_loop_costs_one_issuer_request_per_5_s(world: World) -> None:  # noqa: F811
    """200 sequential `fresh` (skip_cache) within SKIP_CACHE_AGE of a fetch cost no issuer
    request; after SKIP_CACHE_AGE s the next one fetches again, once."""
    from mpagent.refresher import SKIP_CACHE_AGE

    async def main() -> None:
        first = await world.refresher.get(None, [SCOPE], None)
        for _ in range(200):
            assert await world.refresher.fresh(None, [SCOPE]) is first
        world.clock.now += SKIP_CACHE_AGE
        second = await world.refresher.fresh(None, [SCOPE])
        assert second is not first
        for _ in range(200):
            assert await world.refresher.fresh(None, [SCOPE]) is second

    world.run(main)
    assert world.exchange.calls == [SCOPE, SCOPE]


def test_request_claim_keys_have_a_cap_of_their_own(world: World) -> None:  # noqa: F811
    """MAX_REQUEST_CLAIM_KEYS texas claim keys: the next is refused, while per-customer keys
    (get --systemuser-org) still get room; status marks each claim key's row."""
    from mpagent import refresher as module

    customer_world(world)
    for n in range(module.MAX_REQUEST_CLAIM_KEYS):
        world.refresher.cached(
            None, [SCOPE], None, module.request_claims([SCOPE], {"resource": f"https://{n}/"})
        )
    with pytest.raises(MpagentError, match="resource / authorization_details at once"):
        world.refresher.cached(
            None, [SCOPE], None, module.request_claims([SCOPE], {"resource": "https://x/"})
        )
    world.refresher.cached(None, [SCOPE], None, module.customer(ORG_A, None))
    rows = world.refresher.status()
    assert {r["claims"] for r in rows if r["claims"]} == {
        f"resource=https://{n}/" for n in range(module.MAX_REQUEST_CLAIM_KEYS)
    }
    details = module.request_claims([SCOPE], {"authorization_details": [SYSTEMUSER]})
    assert module._claims_label(details.claims if details else None) == (
        "authorization_details=urn:altinn:systemuser"
    )
