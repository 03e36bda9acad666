"""Altinn's token exchange over HTTP: a Maskinporten access token in, an Altinn token out.

`GET <exchange URL>` with `Authorization: Bearer <Maskinporten token>`; a 200's body is the
Altinn token, a JWT, as plain text (docs.altinn.studio, Altinn Platform authentication:
"Request must include a bearer token in the authorization header"; Altinn's own tests read it
with ReadAsStringAsync and validate it as a JWT, Altinn/altinn-authentication
AuthenticationControllerTests). Altinn's .NET client (Altinn/altinn-apiclient-maskinporten
MaskinportenService) sends `Accept: application/json` and JSON-decodes the body as a string,
which ASP.NET's content negotiation answers with a JSON-quoted token: both forms are taken.

Failures say which step failed, as the token endpoint's do (issuer.py, whose deadline and
network wording this reuses): a refusal (401, 403, any 4xx but 408 and 429) is
IssuerRejected, not retried; the network, timeouts, 408, 429 and 5xx, redirects, any other
status and a 200 that holds no token are IssuerUnavailable, retried. The Maskinporten token
goes only where `exchange` says (https; altinn.check_target) and never along a redirect; it
and the Altinn token are logged only as fingerprints.
"""

from __future__ import annotations

import json
import logging
import re

import requests

from mpagent.console import printable
from mpagent.errors import IssuerRejected, IssuerUnavailable
from mpagent.issuer import (
    Answer,
    new_session,
    redirect_target,
    redirected,
    send,
)
from mpagent.tokens import fingerprint

log = logging.getLogger(__name__)

STEP = "Maskinporten accepted the grant; Altinn's exchange"
MAX_EXCERPT = 300
# Three non-empty segments: an empty signature is an unsigned (alg "none") token.
_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def exchange(
    url: str,
    maskinporten_token: str,
    *,
    connect_timeout: float,
    read_timeout: float,
    session: requests.Session | None = None,
) -> str:
    """The Altinn token for `maskinporten_token`, from the exchange at `url` (altinn.
    exchange_url's answer, already checked: https, or http to loopback). Pass a `session`
    (new_session) to keep the connection between exchanges; without one, one is opened and
    closed."""
    if session is None:
        with new_session() as own:
            return exchange(
                url,
                maskinporten_token,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                session=own,
            )
    log.debug("exchanging Maskinporten token %s at %s", fingerprint(maskinporten_token), url)
    answer = _get(url, maskinporten_token, (connect_timeout, read_timeout), session)
    target = redirect_target(answer)
    if target is not None:
        raise IssuerUnavailable(
            f"{STEP} {redirected(answer, target)}; mpagent does not follow it (the "
            "Maskinporten token would go along): check `exchange`",
            status=answer.status,
            step="altinn",
        )
    if 400 <= answer.status < 500 and answer.status not in (408, 429):
        raise refusal(answer, maskinporten_token)
    if answer.status != 200:  # 408 (a timeout), a 2xx other than 200: not a refusal
        raise IssuerUnavailable(
            f"{STEP} answered HTTP {answer.status} ({url}), neither a token nor a refusal; "
            "will retry",
            status=answer.status,
            step="altinn",
        )
    token = altinn_token(answer)
    log.debug("Altinn token %s from %s", fingerprint(token), url)
    return token


def _get(url: str, bearer: str, timeout: tuple[float, float], session: requests.Session) -> Answer:
    """One GET of the exchange (issuer.send); 429 and 5xx are Altinn failing."""
    headers = {"Authorization": f"Bearer {bearer}", "Accept": "text/plain, application/json"}
    answer = send(
        session,
        "GET",
        url,
        timeout,
        setting="`exchange`",
        expected="an Altinn token is a few KiB",
        prefix=f"{STEP} failed: ",
        details={"step": "altinn"},
        headers=headers,
    )
    if answer.status == 429 or answer.status >= 500:
        raise IssuerUnavailable(
            f"{STEP} answered HTTP {answer.status} ({url}); Altinn is failing, will retry",
            status=answer.status,
            step="altinn",
        )
    return answer


def altinn_token(answer: Answer) -> str:
    """The token in a 200's body: the text itself, or a JSON string holding it."""
    text = answer.body.decode("utf-8", errors="replace").strip()
    if text.startswith('"'):
        try:
            decoded = json.loads(text)
        except ValueError:
            decoded = None
        text = decoded.strip() if isinstance(decoded, str) else text
    if _JWT.fullmatch(text):
        return text
    # Not shown: the body may hold part of a token. Its size and type say what it is.
    kind = answer.headers.get("Content-Type") or "no Content-Type"
    raise IssuerUnavailable(
        f"{STEP} answered HTTP 200 ({answer.url}) with {len(answer.body)} bytes of "
        f"{printable(kind)} that are not a JWT (the Altinn token); is `exchange` Altinn's "
        "token exchange? Will retry",
        status=200,
        step="altinn",
    )


def refusal(answer: Answer, maskinporten_token: str) -> IssuerRejected:
    """A 4xx of the exchange as IssuerRejected: the status, what Altinn said (escaped,
    shortened, the token cut out should it be echoed) and the likely next step."""
    said = answer.body.decode("utf-8", errors="replace").strip()
    if maskinporten_token:
        said = said.replace(maskinporten_token, fingerprint(maskinporten_token))
    said = printable(said) or answer.reason or "no description"
    said = said if len(said) <= MAX_EXCERPT else said[:MAX_EXCERPT] + "…"
    return IssuerRejected(
        f"{STEP} answered {answer.status}: {said} — {_next_step(answer.status)}",
        error=f"http_{answer.status}",
        error_description=said,
        status=answer.status,
        step="altinn",
    )


def _next_step(status: int) -> str:
    if status == 401:
        return (
            "Altinn did not take the Maskinporten token: test tokens go to altinn-tt02, "
            "production tokens to altinn-prod (check `environment` and `exchange`); "
            "altinn_test_org = true only for test organisations"
        )
    if status == 403:
        return (
            "Altinn refused this organisation or scope: check that the scope is one Altinn "
            "grants to your organisation"
        )
    if status in (404, 405):
        return "is `exchange` the URL of Altinn's token exchange?"
    return "check `exchange` and the profile's scope"
