"""The texas-compatible API (mpagent/texas.py) against the spec mpagent ships
(mpagent/openapi.json): every example request, texas's own included, gets an answer that
validates against the spec's schemas; bad input gets a 400 naming the field; nothing a caller
sends makes parsing raise anything but the module's Refusal."""

from __future__ import annotations

import base64
import functools
import json
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi

from mpagent import texas
from mpagent.errors import (
    ConfigError,
    IssuerRejected,
    IssuerUnavailable,
    KeystoreError,
    MpagentError,
    SecretUnavailable,
)
from mpagent.tokens import Token

SPEC: dict[str, Any] = json.loads(
    resources.files("mpagent").joinpath(texas.SPEC_RESOURCE).read_text(encoding="utf-8")
)
NOW = 1_764_640_800.0
PLACEHOLDER = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJleGFtcGxlIn0.c2ln"  # texas's examples: a JWT

# The example requests of texas's own spec (nais/texas doc/openapi-spec.json, and the examples
# its handlers declare in src/handler/token.rs), written out here: compatibility means each
# gets an answer from mpagent that its spec allows.
TEXAS_TOKEN_EXAMPLES: list[dict[str, Any]] = [
    {
        "identity_provider": "maskinporten",
        "resource": "http://resource.example/api",
        "target": "altinn:serviceowner/rolesandrights",
    },
    {
        "identity_provider": "maskinporten",
        "target": "skatteetaten:skattekorttilarbeidsgiver",
        "authorization_details": [
            {
                "type": "urn:altinn:systemuser",
                "systemuser_org": {"authority": "iso6523-actorid-upis", "ID": "0192:313367002"},
                "systemuser_id": ["33a0911a-5459-456f-bc57-3d37ef9a016c"],
                "system_id": "974761076_skatt_demo_system",
            }
        ],
    },
    {"identity_provider": "azuread", "target": "api://cluster.namespace.application/.default"},
    {
        "identity_provider": "azuread",
        "skip_cache": True,
        "target": "api://cluster.namespace.application/.default",
    },
    {"identity_provider": "entra_id", "target": "api://cluster.namespace.application/.default"},
]
TEXAS_INTROSPECT_EXAMPLES: list[dict[str, Any]] = [
    {"identity_provider": "tokenx", "token": PLACEHOLDER}
]


@functools.cache
def validator(name: str) -> Draft202012Validator:
    """A validator for one of the spec's component schemas, its $refs resolved in the spec."""
    return Draft202012Validator({**SPEC, "$ref": f"#/components/schemas/{name}"})


def response_schema(path: str, status: int) -> Draft202012Validator:
    """The schema the spec gives the answer `status` on `path`; fails if it allows none."""
    responses = SPEC["paths"][path]["post"]["responses"]
    assert str(status) in responses, f"the spec allows no {status} on {path}"
    ref = responses[str(status)]["content"]["application/json"]["schema"]["$ref"]
    return validator(ref.rsplit("/", 1)[1])


def spec_examples(path: str) -> list[dict[str, Any]]:
    content = SPEC["paths"][path]["post"]["requestBody"]["content"]
    return [e["value"] for e in content["application/json"]["examples"].values()]


def as_json(fields: dict[str, Any]) -> tuple[str, bytes]:
    return "application/json", json.dumps(fields).encode()


def as_form(fields: dict[str, Any]) -> tuple[str, bytes]:
    """The fields as a form, texas's way: booleans as true/false, arrays as JSON text."""

    def text(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return value if isinstance(value, str) else json.dumps(value)

    form = urlencode({k: text(v) for k, v in fields.items() if v is not None})
    return "application/x-www-form-urlencoded; charset=UTF-8", form.encode()


def held(access_token: str = PLACEHOLDER, expires_at: float = NOW + 120) -> Token:
    return Token(access_token, "Bearer", "altinn:serviceowner/rolesandrights", NOW, expires_at)


def jwt(claims: dict[str, Any]) -> str:
    def part(document: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(document).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256', 'kid': 'k'})}.{part(claims)}.c2ln"


def answer_token(content_type: str | None, body: bytes) -> tuple[int, dict[str, Any]]:
    """What the listener answers: the token for a request that parses, else the refusal."""
    try:
        texas.parse_token_request(content_type, body)
    except texas.Refusal as exc:
        return texas.error_response(exc)
    return texas.token_response(held(), NOW)


def answer_introspect(content_type: str | None, body: bytes) -> tuple[int, dict[str, Any]]:
    try:
        request = texas.parse_introspect_request(content_type, body)
    except texas.Refusal as exc:
        return texas.error_response(exc)
    return texas.introspect(request, [held()], NOW)


# -- the spec itself


def test_spec_schemas_and_examples_are_valid() -> None:
    """The document is valid OpenAPI 3.1, every component schema valid JSON Schema 2020-12
    (3.1's dialect), and every example validates against the schema it illustrates."""
    assert SPEC["openapi"].startswith("3.1.")
    validate_openapi(SPEC)
    for schema in SPEC["components"]["schemas"]:
        Draft202012Validator.check_schema(SPEC["components"]["schemas"][schema])
    checked = 0
    for path, item in SPEC["paths"].items():
        operation = item["post"]
        for content in operation["requestBody"]["content"].values():
            name = content["schema"]["$ref"].rsplit("/", 1)[1]
            for example in content.get("examples", {}).values():
                validator(name).validate(example["value"])
                checked += 1
        for status, response in operation["responses"].items():
            for example in response["content"]["application/json"].get("examples", {}).values():
                response_schema(path, int(status)).validate(example["value"])
                checked += 1
    assert checked >= 8


def test_spec_serves_the_two_texas_paths() -> None:
    """The shipped spec describes exactly the paths the module answers."""
    assert set(SPEC["paths"]) == {texas.TOKEN_PATH, texas.INTROSPECT_PATH}
    enum = SPEC["components"]["schemas"]["IdentityProvider"]["enum"]
    assert tuple(enum) == texas.IDENTITY_PROVIDERS
    assert tuple(SPEC["components"]["schemas"]["OAuthErrorCode"]["enum"]) == texas.ERROR_CODES


# -- every example request


@pytest.mark.parametrize("encode", [as_json, as_form], ids=["json", "form"])
def test_every_token_example_gets_an_answer_the_spec_allows(encode: Any) -> None:
    """texas's and the spec's token examples, as JSON and as a form: maskinporten ones get a
    200 TokenResponse, the others a 400 ErrorResponse; each validates."""
    examples = TEXAS_TOKEN_EXAMPLES + spec_examples(texas.TOKEN_PATH)
    for example in examples:
        status, body = answer_token(*encode(example))
        response_schema(texas.TOKEN_PATH, status).validate(body)
        expected = 200 if example["identity_provider"] == "maskinporten" else 400
        assert status == expected, (example, body)
        if status == 400:
            assert example["identity_provider"] in body["error_description"]


@pytest.mark.parametrize("encode", [as_json, as_form], ids=["json", "form"])
def test_every_introspect_example_gets_an_answer_the_spec_allows(encode: Any) -> None:
    """texas's and the spec's introspection examples get a 200 IntrospectResponse; texas's
    tokenx one is inactive and says the provider is not served."""
    for example in TEXAS_INTROSPECT_EXAMPLES + spec_examples(texas.INTROSPECT_PATH):
        status, body = answer_introspect(*encode(example))
        assert status == 200
        response_schema(texas.INTROSPECT_PATH, status).validate(body)
        if example["identity_provider"] != "maskinporten":
            assert body["active"] is False and "tokenx" in body["error"]


# -- parsing


def test_json_and_form_give_the_same_request() -> None:
    """A JSON body and a form with the same fields (details as JSON text) parse alike; the
    target becomes the canonical scope set and the claims take Profile.claims' shape."""
    fields = {
        "identity_provider": "maskinporten",
        "target": "b:two  a:one b:two",
        "resource": "https://api.example/",
        "authorization_details": [{"type": "urn:altinn:systemuser", "x": 1}],
        "skip_cache": True,
    }
    from_json = texas.parse_token_request(*as_json(fields))
    from_form = texas.parse_token_request(*as_form(fields))
    assert from_json == from_form
    assert from_json.scopes == ("a:one", "b:two") and from_json.scope == "a:one b:two"
    assert from_json.skip_cache and from_form.skip_cache
    assert from_json.claims == {
        "resource": "https://api.example/",
        "authorization_details": [{"type": "urn:altinn:systemuser", "x": 1}],
    }


def test_skip_cache_is_no_part_of_the_request_identity() -> None:
    """As texas's cache key: a forced renewal equals the plain request, and hashes alike."""
    plain = texas.parse_token_request(
        *as_json({"identity_provider": "maskinporten", "target": "s"})
    )
    forced = texas.parse_token_request(
        *as_json({"identity_provider": "maskinporten", "target": "s", "skip_cache": True})
    )
    assert plain == forced and hash(plain) == hash(forced)
    assert not plain.skip_cache and forced.skip_cache
    assert plain.claims == {} and plain.resource is None and plain.authorization_details is None


def test_unknown_fields_and_nulls_are_ignored_as_texas_does() -> None:
    """Fields texas does not know are ignored, null optionals are absent, and an empty
    authorization_details asks for none."""
    request = texas.parse_token_request(
        *as_json(
            {
                "identity_provider": "maskinporten",
                "target": "s",
                "resource": None,
                "skip_cache": None,
                "authorization_details": [],
                "something_new": {"a": 1},
            }
        )
    )
    assert request == texas.TokenRequest(scopes=("s",)) and request.claims == {}


BAD_TOKEN_REQUESTS = [
    # (content type, body, error code, a word the description must hold)
    ("text/plain", b"target=s", "invalid_request", "text/plain"),
    (None, b"{}", "invalid_request", "media type"),
    ("application/json", b"{not json", "invalid_request", "JSON"),
    ("application/json", b"[1, 2]", "invalid_request", "object"),
    ("application/json", b'{"target": NaN}', "invalid_request", "NaN"),
    ("application/json", b'{"target": "a", "target": "b"}', "invalid_request", "twice"),
    ("application/json", b"\xff\xfe", "invalid_request", "UTF-8"),
    ("application/json", b"[" * 100_000, "invalid_request", "bytes"),
    ("application/json", b"[" * 60_000, "invalid_request", "JSON"),
    ("application/x-www-form-urlencoded", b"target=a&target=b", "invalid_request", "twice"),
    ("application/x-www-form-urlencoded", b"target=%ff", "invalid_request", "form"),
    ("application/x-www-form-urlencoded", b"&".join([b"a=1"] * 40), "invalid_request", "32"),
    ("application/json", b'{"target": "s"}', "invalid_request", "identity_provider"),
    ("application/json", b'{"identity_provider": "okta", "target": "s"}', "invalid_request", "okta"),
    ("application/json", b'{"identity_provider": 7, "target": "s"}', "invalid_request", "identity_provider"),
    ("application/json", b'{"identity_provider": "tokenx", "target": "s"}', "invalid_request", "tokenx"),
    ("application/json", b'{"identity_provider": "maskinporten"}', "invalid_request", "target"),
    ("application/json", b'{"identity_provider": "maskinporten", "target": ["s"]}', "invalid_request", "target"),
    ("application/json", b'{"identity_provider": "maskinporten", "target": "  "}', "invalid_scope", "target"),
    ("application/json", b'{"identity_provider": "maskinporten", "target": "a\\"b"}', "invalid_scope", "target"),
    ("application/json", b'{"identity_provider": "maskinporten", "target": "a\\tb"}', "invalid_scope", "target"),
    ("application/json", b'{"identity_provider": "maskinporten", "target": "s", "resource": 1}', "invalid_request", "resource"),
    ("application/json", b'{"identity_provider": "maskinporten", "target": "s", "resource": ""}', "invalid_request", "resource"),
    ("application/json", b'{"identity_provider": "maskinporten", "target": "s", "resource": "a b"}', "invalid_request", "resource"),
    ("application/json", b'{"identity_provider": "maskinporten", "target": "s", "authorization_details": {"type": "t"}}', "invalid_request", "authorization_details"),
    ("application/json", b'{"identity_provider": "maskinporten", "target": "s", "authorization_details": [1]}', "invalid_request", "authorization_details"),
    ("application/json", b'{"identity_provider": "maskinporten", "target": "s", "authorization_details": [{"x": 1}]}', "invalid_request", "type"),
    ("application/json", b'{"identity_provider": "maskinporten", "target": "s", "authorization_details": "[{"}', "invalid_request", "authorization_details"),
    ("application/x-www-form-urlencoded", b"identity_provider=maskinporten&target=s&authorization_details=%5B%7B%22type%22%3A1%7D%5D", "invalid_request", "type"),
    ("application/json", b'{"identity_provider": "maskinporten", "target": "s", "skip_cache": "yes"}', "invalid_request", "skip_cache"),
    ("application/x-www-form-urlencoded", b"identity_provider=maskinporten&target=s&skip_cache=1", "invalid_request", "skip_cache"),
]  # fmt: skip


@pytest.mark.parametrize(("content_type", "body", "code", "word"), BAD_TOKEN_REQUESTS)
def test_bad_token_requests_get_a_400_naming_the_problem(
    content_type: str | None, body: bytes, code: str, word: str
) -> None:
    """Each malformed request is a 400 with its RFC 6749 code, a description naming the field
    or value, and a body the spec's ErrorResponse allows."""
    status, document = answer_token(content_type, body)
    assert (status, document["error"]) == (400, code), document
    assert word in document["error_description"]
    response_schema(texas.TOKEN_PATH, status).validate(document)


@pytest.mark.parametrize(
    "body",
    [b'{"identity_provider": "maskinporten"}', b'{"identity_provider": "maskinporten", "token": 1}',
     b'{"token": "t"}', b'{"identity_provider": "nope", "token": "t"}', b"[]"],
)  # fmt: skip
def test_bad_introspect_requests_get_a_400(body: bytes) -> None:
    """A malformed introspection request is a 400 ErrorResponse, as the spec documents."""
    status, document = answer_introspect("application/json", body)
    assert status == 400 and document["error"] == "invalid_request"
    response_schema(texas.INTROSPECT_PATH, status).validate(document)


def test_a_callers_value_is_quoted_short_and_escaped() -> None:
    """A control character or a huge value sent back in a description is escaped (RFC 6749
    §5.2: printable ASCII without backslash, so \\x1b shows as /x1b) and cut."""
    body = json.dumps({"identity_provider": "\x1b[31m" + "x" * 500, "target": "s"}).encode()
    status, document = answer_token("application/json", body)
    description = document["error_description"]
    assert status == 400 and "\x1b" not in description and "/x1b[31m" in description
    assert all(" " <= c <= "~" and c not in '"\\' for c in description)
    assert len(description) < 300


# -- answers


def test_token_response_counts_expires_in_from_now() -> None:
    """expires_in is the whole seconds left at `now`, never negative; token_type is "Bearer"
    whatever the issuer's spelling."""
    token = Token("tok", "bearer", "s", NOW, NOW + 120.9)
    assert texas.token_response(token, NOW + 0.5) == (
        200,
        {"access_token": "tok", "expires_in": 120, "token_type": "Bearer"},
    )
    assert texas.token_response(token, NOW + 500)[1]["expires_in"] == 0
    response_schema(texas.TOKEN_PATH, 200).validate(texas.token_response(token, NOW)[1])


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (IssuerRejected("Maskinporten refused: invalid_scope", error="invalid_scope"), 400, "invalid_scope"),
        (IssuerRejected("refused", error="invalid_client", status=401), 400, "invalid_client"),
        (IssuerRejected("refused", error="consumer_not_allowed"), 400, "invalid_grant"),
        (IssuerRejected("refused", error="server_error"), 400, "invalid_grant"),
        (IssuerRejected("refused"), 400, "invalid_grant"),
        (IssuerUnavailable("https://test.maskinporten.no/token timed out"), 500, "server_error"),
        (KeystoreError("key.p12: wrong password"), 500, "server_error"),
        (SecretUnavailable("no password"), 500, "server_error"),
        (ConfigError("config.toml: bad"), 500, "server_error"),
        (MpagentError("the agent keeps at most 64 keys"), 500, "server_error"),
        (texas.Refusal("nope", 400, "invalid_scope"), 400, "invalid_scope"),
    ],
)  # fmt: skip
def test_error_kinds_map_to_texas_statuses(exc: BaseException, status: int, code: str) -> None:
    """The issuer's refusal is a 400 with its RFC 6749 code (an unknown one as invalid_grant);
    every failure on mpagent's side is 500 server_error; the message is the description."""
    answer = texas.error_response(exc)
    assert answer[0] == status and answer[1]["error"] == code
    assert answer[1]["error_description"] == str(exc)
    response_schema(texas.TOKEN_PATH, status).validate(answer[1])


def test_an_unexpected_exception_never_shows_its_text() -> None:
    """An exception outside mpagent's hierarchy answers 500 without its text, which may hold
    anything; a description's control characters are escaped."""
    status, body = texas.error_response(RuntimeError("secret-grant-eyJ"))
    assert status == 500 and "secret" not in body["error_description"]
    _, body = texas.error_response(IssuerRejected("bad\x1b]0;title\x07", error="invalid_grant"))
    assert "\x1b" not in body["error_description"] and "\x07" not in body["error_description"]


def test_introspect_is_active_only_for_the_token_this_agent_holds() -> None:
    """The held token, unexpired, is active with its JWT's claims; another token, an expired
    one, or another provider is inactive with the reason; every answer validates."""
    claims = {
        "iss": "https://test.maskinporten.no/",
        "scope": "s",
        "exp": int(NOW) + 120,
        "active": "x",
    }
    token = jwt(claims)
    request = texas.IntrospectRequest(token=token, identity_provider="maskinporten")
    schema = response_schema(texas.INTROSPECT_PATH, 200)
    status, body = texas.introspect(request, [held("other"), held(token)], NOW)
    assert status == 200 and body == {**claims, "active": True}
    schema.validate(body)
    for answer, reason in [
        (texas.introspect(request, [], NOW), "not issued"),
        (texas.introspect(request, [held("other")], NOW), "not issued"),
        (texas.introspect(request, [held(token, NOW + 1)], NOW + 1), "expired"),
        (
            texas.introspect(texas.IntrospectRequest(token, "idporten"), [held(token)], NOW),
            "idporten",
        ),
    ]:
        assert answer[0] == 200 and answer[1]["active"] is False and reason in answer[1]["error"]
        schema.validate(answer[1])


def test_introspect_of_a_token_with_a_lone_surrogate_is_inactive() -> None:
    """JSON may escape a lone surrogate into the token; the comparison takes it, no crash."""
    body = b'{"identity_provider": "maskinporten", "token": "ab\\ud800"}'
    assert answer_introspect("application/json", body) == (
        200,
        {"active": False, "error": "token was not issued by this agent, or expired"},
    )


def test_introspect_of_an_opaque_token_gives_what_the_agent_knows() -> None:
    """A held token that is no JWT is active with its scope, exp and iat."""
    request = texas.IntrospectRequest(token="opaque", identity_provider="maskinporten")
    _, body = texas.introspect(request, [held("opaque")], NOW)
    expected = {"active": True, "scope": "altinn:serviceowner/rolesandrights"}
    assert body == {**expected, "exp": int(NOW) + 120, "iat": int(NOW)}


@pytest.mark.parametrize("token", ["", "a.b", "a.!!!.c", "a.W10.c", "a.bm90IGpzb24.c", "a.b.c.d"])
def test_jwt_claims_of_garbage_is_none(token: str) -> None:
    """A value that is no JWT with a JSON object payload has no claims, and no exception."""
    assert texas.jwt_claims(token) is None


def test_introspect_request_keeps_the_token_out_of_its_repr() -> None:
    """The token to introspect never shows in a repr (logs, tracebacks)."""
    request = texas.parse_introspect_request(
        *as_json({"identity_provider": "maskinporten", "token": "secret-token"})
    )
    assert request.token == "secret-token" and "secret-token" not in repr(request)


# -- fuzz

FIELD_NAMES = [
    "identity_provider",
    "target",
    "resource",
    "authorization_details",
    "skip_cache",
    "token",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
documents = st.dictionaries(
    st.sampled_from(FIELD_NAMES) | st.text(max_size=5),
    json_values | st.sampled_from([*texas.IDENTITY_PROVIDERS, "a:b c:d", "true"]),
    max_size=6,
)
content_types = st.sampled_from(
    ["application/json", "application/x-www-form-urlencoded", "APPLICATION/JSON; charset=utf-8", "text/plain", ""]
) | st.none() | st.text(max_size=20)  # fmt: skip


def _bodies() -> st.SearchStrategy[tuple[str | None, bytes]]:
    raw = st.tuples(content_types, st.binary(max_size=200))
    as_text = documents.map(as_json)
    form = documents.map(
        lambda d: as_form({k: v for k, v in d.items() if isinstance(v, str | bool)})
    )
    return raw | as_text | form


@settings(max_examples=200, deadline=None)
@given(_bodies())
def test_parsing_refuses_but_never_raises_otherwise(request: tuple[str | None, bytes]) -> None:
    """Any content type and body: parsing gives a request or raises Refusal, never another
    exception; the answer validates against the spec and holds no raw control character."""
    content_type, body = request
    for path, answer in [
        (texas.TOKEN_PATH, answer_token),
        (texas.INTROSPECT_PATH, answer_introspect),
    ]:
        status, document = answer(content_type, body)
        response_schema(path, status).validate(document)
        if "error_description" in document:
            text = document["error_description"]
            assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text)
