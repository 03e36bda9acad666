"""The texas-compatible HTTP API: request bodies in, (status, JSON document) out. Pure: no
sockets, no clock reads; the HTTP listener that serves it passes the time and the tokens in.

NAV's token sidecar texas (github.com/nais/texas, doc/openapi-spec.json) answers
`POST /api/v1/token` and `POST /api/v1/introspect`; an app written against it runs unchanged
with mpagent beside it. mpagent serves identity_provider "maskinporten" only; the other
providers of texas's enum get a clear 400, as texas answers for a provider it has not enabled.
The spec mpagent implements ships beside this module as package data, SPEC_RESOURCE; the
listener reads it (importlib.resources) and serves it at SPEC_PATH.

What follows texas (src/handler.rs, src/oauth/request.rs):
- the body is JSON or a form (media type application/json or
  application/x-www-form-urlencoded), anything else is 400 invalid_request;
- fields texas does not know are ignored (serde's default), so newer clients still work;
- authorization_details (RFC 9396) is a JSON array of objects, or in either body a string
  holding one (a form can carry only strings);
- errors are RFC 6749 §5.2 `{error, error_description}`: the request's mistakes 400, the
  issuer's refusal 400 with its code, everything on mpagent's side (issuer unreachable,
  keystore, password) 500 server_error.
Where mpagent is stricter: a target must be RFC 6749 §3.3 scope tokens, each
authorization_details entry needs its `type` (RFC 9396 §2), and a key may not repeat; each
is a 400 that names the field, before any grant is signed.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mpagent.console import printable
from mpagent.errors import IssuerRejected, MpagentError
from mpagent.loopback import MAX_BODY, MAX_FIELDS, Refusal, ascii_description, form_pairs
from mpagent.tokens import SCOPE_TOKEN, Token, scope_string, unverified_claims

TOKEN_PATH = "/api/v1/token"  # noqa: S105 (a URL path, no secret)
INTROSPECT_PATH = "/api/v1/introspect"
SPEC_PATH = "/openapi.json"
SPEC_RESOURCE = "openapi.json"  # in the mpagent package
IDENTITY_PROVIDER = "maskinporten"
# texas's enum (entra_id was azuread, which texas still accepts); only maskinporten is served.
IDENTITY_PROVIDERS = ("entra_id", "azuread", "tokenx", "maskinporten", "idporten", "ansattporten")
# RFC 6749 §5.2, as texas's OAuthErrorCode lists them.
ERROR_CODES = (
    "invalid_request", "invalid_client", "invalid_grant", "unauthorized_client",
    "unsupported_grant_type", "invalid_scope", "server_error",
)  # fmt: skip
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
_SHOWN = 64  # characters of a caller's value quoted back in an error


@dataclass(frozen=True)
class TokenRequest:
    """A texas token request for Maskinporten. `scopes` is the target as a canonical scope set;
    skip_cache, like texas's, is no part of the request's identity."""

    scopes: tuple[str, ...]
    resource: str | None = None
    authorization_details: tuple[dict[str, Any], ...] | None = field(default=None, hash=False)
    skip_cache: bool = field(default=False, compare=False)

    @property
    def scope(self) -> str:
        """The canonical scope string (TokenKey.scope)."""
        return scope_string(self.scopes)

    @property
    def claims(self) -> dict[str, Any]:
        """The optional grant claims asked for, in Profile.claims' shape (empty: none)."""
        claims: dict[str, Any] = {}
        if self.resource is not None:
            claims["resource"] = self.resource
        if self.authorization_details is not None:
            claims["authorization_details"] = list(self.authorization_details)
        return claims


@dataclass(frozen=True)
class IntrospectRequest:
    token: str = field(repr=False)  # a token: never in a repr
    identity_provider: str


def parse_token_request(content_type: str | None, body: bytes) -> TokenRequest:
    """The request a POST /api/v1/token body makes; Refusal (400) for anything else."""
    fields = _fields(content_type, body)
    _identity_provider(fields, serve_only=True)
    return TokenRequest(
        scopes=_scopes(fields.get("target")),
        resource=_resource(fields.get("resource")),
        authorization_details=_details(fields.get("authorization_details")),
        skip_cache=_flag(fields.get("skip_cache")),
    )


def parse_introspect_request(content_type: str | None, body: bytes) -> IntrospectRequest:
    """The request a POST /api/v1/introspect body makes; Refusal (400) for a malformed one.
    Another provider of texas's enum is no refusal: `introspect` answers it inactive."""
    fields = _fields(content_type, body)
    provider = _identity_provider(fields, serve_only=False)
    token = fields.get("token")
    if token is None:
        raise Refusal("token is missing: send the access token to introspect")
    if not isinstance(token, str):
        raise Refusal("token is not a string")
    return IntrospectRequest(token=token, identity_provider=provider)


def token_response(token: Token, now: float) -> tuple[int, dict[str, Any]]:
    """200 and texas's TokenResponse; expires_in counts from `now`, whole seconds, never < 0."""
    expires_in = max(0, int(token.expires_at - now))
    # texas's TokenType is the one value "Bearer"; Maskinporten's tokens are bearer tokens
    # (issuer.py refuses any other), whatever the case the issuer spelt it in.
    return 200, {
        "access_token": token.access_token,
        "expires_in": expires_in,
        "token_type": "Bearer",
    }


def error_response(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The status and RFC 6749 error document for a failed request: a Refusal as it says; the
    issuer's refusal 400 with its code; any other failure 500 server_error."""
    if isinstance(exc, Refusal):
        return exc.status, _error(exc.error, exc.description)
    if isinstance(exc, IssuerRejected):
        # texas passes the issuer's error through; Maskinporten's codes are RFC 6749's.
        code = exc.error if exc.error in ERROR_CODES and exc.error != "server_error" else None
        return 400, _error(code or "invalid_grant", exc.message)
    if isinstance(exc, MpagentError):  # IssuerUnavailable, keystore, password, configuration
        return 500, _error("server_error", exc.message)
    # An unexpected exception's text may hold anything, a secret included: the log has it.
    return 500, _error("server_error", "the agent failed to answer; see its log")


def introspect_response(
    active: bool, claims: Mapping[str, Any] | None = None, *, error: str | None = None
) -> tuple[int, dict[str, Any]]:
    """200 and texas's IntrospectResponse: the claims when active, else the reason. texas
    answers 200 for an inactive token too; the caller must read `active`."""
    if not active:
        return 200, {"active": False, "error": printable(error or "token is not active")}
    document = {k: v for k, v in (claims or {}).items() if k not in ("active", "error")}
    return 200, {**document, "active": True}


def introspect(
    request: IntrospectRequest, held: Iterable[Token], now: float
) -> tuple[int, dict[str, Any]]:
    """The answer for `request`, given the tokens this agent holds: active only for one of
    them, before it expires. Its claims are the JWT's payload, read without checking the
    signature: the agent had the token straight from the issuer over TLS, and holding this very
    value is the proof."""
    if request.identity_provider != IDENTITY_PROVIDER:
        return introspect_response(False, error=_not_served(request.identity_provider))
    wanted = _bytes(request.token)
    token = next(
        (t for t in held if hmac.compare_digest(_bytes(t.access_token), wanted)),  # no timing
        None,
    )
    if token is None:
        return introspect_response(False, error="token was not issued by this agent, or expired")
    if now >= token.expires_at:
        return introspect_response(False, error="token is expired")
    claims = jwt_claims(token.access_token)
    if claims is None:  # an opaque token: what the agent knows of it
        claims = {
            "scope": token.scope,
            "exp": int(token.expires_at),
            "iat": int(token.requested_at),
        }
    return introspect_response(True, claims)


def jwt_claims(token: str) -> dict[str, Any] | None:
    """A JWT's payload as a dict, unverified; None if `token` is no JWT with a JSON object."""
    return unverified_claims(token) or None


# -- parsing


def _fields(content_type: str | None, body: bytes) -> dict[str, Any]:
    """The body's fields, JSON or form, by its media type."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type not in (JSON, FORM):
        shown = _shown(media_type) if media_type else "none"
        raise Refusal(f"unsupported media type {shown}: send {JSON} or {FORM}")
    if len(body) > MAX_BODY:
        raise Refusal(f"the body exceeds {MAX_BODY} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Refusal("the body is not UTF-8") from None
    if media_type == FORM:
        return _unique(form_pairs(text, MAX_FIELDS))
    try:
        document = json.loads(text, object_pairs_hook=_unique, parse_constant=_no_constant)
    except Refusal:
        raise
    except (ValueError, RecursionError):
        raise Refusal("the body is not JSON") from None
    if not isinstance(document, dict):
        raise Refusal("the body is not a JSON object")
    return document


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in pairs:
        if key in fields:
            raise Refusal(f"{_shown(key)} appears twice")
        fields[key] = value
    return fields


def _no_constant(name: str) -> Any:
    raise Refusal(f"the body holds {name}, which JSON does not allow")


def _identity_provider(fields: Mapping[str, Any], *, serve_only: bool) -> str:
    provider = fields.get("identity_provider")
    if provider is None:
        raise Refusal(f'identity_provider is missing: send "{IDENTITY_PROVIDER}"')
    if not isinstance(provider, str) or provider not in IDENTITY_PROVIDERS:
        raise Refusal(
            f"identity_provider {_shown(provider)} is none of texas's "
            f'({", ".join(IDENTITY_PROVIDERS)}); mpagent serves "{IDENTITY_PROVIDER}"'
        )
    if serve_only and provider != IDENTITY_PROVIDER:
        raise Refusal(_not_served(provider))
    return provider


def _not_served(provider: str) -> str:
    return (
        f"identity provider '{provider}' is not enabled: mpagent serves Maskinporten tokens "
        f'only; send identity_provider "{IDENTITY_PROVIDER}"'
    )


def _scopes(target: Any) -> tuple[str, ...]:
    if target is None:
        raise Refusal("target is missing: send the scope (or scopes, space-separated)")
    if not isinstance(target, str):
        raise Refusal("target is not a string: send the scopes space-separated")
    words = target.split(" ")
    scopes = [w for w in words if w]
    if not scopes:
        raise Refusal(
            "target is empty: send the scope (or scopes, space-separated)", 400, "invalid_scope"
        )
    bad = next((w for w in scopes if not SCOPE_TOKEN.fullmatch(w)), None)
    if bad is not None:
        raise Refusal(
            f"target holds {_shown(bad)}, which is no RFC 6749 scope: separate scopes with "
            'single spaces, and use printable ASCII without " or \\',
            400,
            "invalid_scope",
        )
    return tuple(scope_string(scopes).split(" "))


def _resource(resource: Any) -> str | None:
    """RFC 8707: an absolute URI; here only what is plainly none: empty, spaces, controls."""
    if resource is None:
        return None
    if not isinstance(resource, str):
        raise Refusal("resource is not a string: send the API's audience URI")
    if not resource or not resource.isprintable() or any(c.isspace() for c in resource):
        raise Refusal(f"resource {_shown(resource)} is not a URI: send the API's audience URI")
    return resource


def _details(details: Any) -> tuple[dict[str, Any], ...] | None:
    """RFC 9396: a JSON array of objects, each with a string `type`; texas also takes the
    array as a JSON string (a form's only way). An empty array asks for nothing: None."""
    if details is None:
        return None
    if isinstance(details, str):
        try:
            details = json.loads(details, object_pairs_hook=_unique, parse_constant=_no_constant)
        except Refusal as exc:
            raise Refusal(f"authorization_details: {exc.description}") from None
        except (ValueError, RecursionError):
            raise Refusal(
                "authorization_details is not JSON: send a JSON array of objects"
            ) from None
    if not isinstance(details, list) or not all(isinstance(d, dict) for d in details):
        raise Refusal("authorization_details is not a JSON array of objects")
    if not all(isinstance(d.get("type"), str) and d["type"] for d in details):
        raise Refusal(
            'authorization_details: every entry needs its "type" (RFC 9396), '
            'such as "urn:altinn:systemuser"'
        )
    return tuple(details) or None


def _flag(value: Any) -> bool:
    """skip_cache: a JSON boolean or null, or in a form "true" / "false" (as texas's serde)."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return value == "true"
    raise Refusal(f"skip_cache is {_shown(value)}: send true or false")


def _error(code: str, description: str) -> dict[str, Any]:
    return {"error": code, "error_description": ascii_description(description)}


def _shown(value: Any) -> str:
    """A caller's value quoted back: repr, shortened, control characters escaped."""
    text = repr(value)
    return printable(text if len(text) <= _SHOWN else text[: _SHOWN - 1] + "…")


def _bytes(text: str) -> bytes:
    """For hmac.compare_digest, which takes str of ASCII only; JSON may carry lone surrogates."""
    return text.encode("utf-8", "surrogatepass")
