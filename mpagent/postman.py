"""`mpagent postman`: a Postman environment and a v2.1 collection template that get their
Maskinporten tokens from the agent's token bridge. Pure renderers plus a thin write.

The collection offers two ways, one folder each:
- Postman's own OAuth 2.0 helper (collection-level auth, client credentials against the bridge;
  turn on its auto-refresh in the Authorization tab), for the Postman app;
- a pre-request script that asks the bridge with `pm.sendRequest` before every request and puts
  the token in the request-local `{{token}}` variable, for Postman and for newman, which does not
  run the OAuth 2.0 helper. The bridge answers from the agent's cache, so this is cheap, and the
  token is never stored in an environment or collection variable. When the bridge refuses, the
  request is not sent and the run fails with the bridge's reason.

The environment file holds a placeholder for the secret (Postman syncs imported values to its
cloud); `environment(..., secret=)` is for newman, read from a pipe: `-e <(mpagent postman
--with-secret)`, so the secret is in no argv and no file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mpagent.private import write_atomic

SCHEMA = "https://schema.getpostman.com/json/collection/v2.1.0/collection.json"
SECRET_PLACEHOLDER = "paste the output of `mpagent bridge secret` here"  # noqa: S105
BASE_URL_PLACEHOLDER = "https://api.example.no"
OAUTH_FOLDER = "Postman OAuth 2.0 helper"
SCRIPT_FOLDER = "Pre-request script (Postman and newman)"
BRIDGE_TEST = "mpagent token bridge gives a token"  # the test the pre-request script fails

PRE_REQUEST_SCRIPT = """\
// mpagent: a Maskinporten token from the agent's token bridge, before every request.
// The bridge answers from the agent's cache; the token lives only in this request's
// local {{token}} variable, never in a saved environment or collection variable.
// When the bridge refuses, the request is not sent and the run fails with the bridge's
// reason: an error thrown in this callback would be lost (newman sends the request anyway),
// so the reason goes into a failed test and the request is skipped.
function refuse(reason) {
    pm.test("mpagent token bridge gives a token", function () { throw new Error(reason); });
    if (pm.execution && pm.execution.skipRequest) {
        pm.execution.skipRequest();
    } else {
        throw new Error(reason);  // a Postman without skipRequest: at least say why
    }
}
const tokenUrl = pm.variables.get("token_url");
pm.sendRequest({
    url: tokenUrl,
    method: "POST",
    header: [{ key: "Content-Type", value: "application/x-www-form-urlencoded" }],
    body: {
        mode: "urlencoded",
        urlencoded: [
            { key: "grant_type", value: "client_credentials" },
            { key: "client_id", value: pm.variables.get("client_id") },
            { key: "client_secret", value: pm.variables.get("client_secret") },
            { key: "scope", value: pm.variables.get("scope") }
        ]
    }
}, function (err, res) {
    if (err) {
        return refuse("mpagent token bridge not reachable at " + tokenUrl +
            " (is the agent running, with [bridge] listen set?): " + err);
    }
    let body = {};
    try { body = res.json(); } catch (e) { /* not the bridge: said below */ }
    if (res.code !== 200 || !body.access_token) {
        return refuse("mpagent token bridge at " + tokenUrl + " answered " + res.code + " " +
            (body.error || res.status) + ": " +
            (body.error_description || "not a token response; is token_url the bridge's?"));
    }
    pm.variables.set("token", body.access_token);
});
"""

DESCRIPTION = (
    "Tokens come from mpagent's token bridge (see its README). Import the environment too and "
    "set client_secret's current value to the output of `mpagent bridge secret`, and base_url "
    f"to your API. '{OAUTH_FOLDER}' uses Postman's OAuth 2.0 authorization of this collection; "
    f"'{SCRIPT_FOLDER}' fetches a token before each request, in Postman and in newman "
    "(newman run COLLECTION -e <(mpagent postman --with-secret) "
    f'--folder "{SCRIPT_FOLDER}" --env-var base_url=URL: the secret in no argv and no file).'
)

TEST_SCRIPT = """\
pm.test("the API accepts the Maskinporten token", function () {
    pm.expect(pm.response.code).to.be.below(400);
});
"""


def file_stem(profile: str) -> str:
    return "mpagent-" + re.sub(r"[^A-Za-z0-9._-]+", "_", profile)


def environment(
    profile: str, token_url: str, scope: str, secret: str | None = None
) -> dict[str, Any]:
    """A Postman environment: where the bridge is, which profile and scope, and the secret
    (for newman, through a pipe) or a slot to paste it into."""
    values = [
        ("token_url", token_url, "default"),
        ("client_id", profile, "default"),
        ("client_secret", secret or SECRET_PLACEHOLDER, "secret"),
        ("scope", scope, "default"),
        ("base_url", BASE_URL_PLACEHOLDER, "default"),
    ]
    return {
        "name": f"mpagent {profile}",
        "values": [
            {"key": key, "value": value, "type": kind, "enabled": True}
            for key, value, kind in values
        ],
        "_postman_variable_scope": "environment",
    }


def collection(profile: str) -> dict[str, Any]:
    """A v2.1 collection template; every value comes from the environment's variables."""
    oauth2 = [
        ("grant_type", "client_credentials"),
        ("accessTokenUrl", "{{token_url}}"),
        ("clientId", "{{client_id}}"),
        ("clientSecret", "{{client_secret}}"),
        ("scope", "{{scope}}"),
        ("client_authentication", "header"),
        ("tokenName", "Maskinporten (mpagent)"),
        ("addTokenTo", "header"),
        ("headerPrefix", "Bearer"),
    ]
    return {
        "info": {
            "name": f"Maskinporten via mpagent ({profile})",
            "description": DESCRIPTION,
            "schema": SCHEMA,
        },
        "auth": {"type": "oauth2", "oauth2": _pairs(oauth2)},
        "item": [
            {
                "name": OAUTH_FOLDER,
                "description": "Uses the collection's OAuth 2.0 authorization: in the "
                "collection's Authorization tab, click Get New Access Token once and turn on "
                "auto-refresh.",
                "item": [_example()],
            },
            {
                "name": SCRIPT_FOLDER,
                "description": "Each request gets a token from the bridge first (works in newman).",
                "auth": {"type": "bearer", "bearer": _pairs([("token", "{{token}}")])},
                "event": [_script("prerequest", PRE_REQUEST_SCRIPT)],
                "item": [_example()],
            },
        ],
    }


def documents(profile: str, token_url: str, scope: str) -> dict[str, dict[str, Any]]:
    """File name → document, for one profile."""
    stem = file_stem(profile)
    return {
        f"{stem}.postman_environment.json": environment(profile, token_url, scope),
        f"{stem}.postman_collection.json": collection(profile),
    }


def write(directory: Path, docs: dict[str, dict[str, Any]]) -> list[Path]:
    """Write each document (atomically, 0600: someone may paste the secret into the file);
    returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, document in docs.items():
        path = directory / name
        write_atomic(path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        written.append(path)
    return written


def _example() -> dict[str, Any]:
    return {
        "name": "Example: GET {{base_url}}/",
        "event": [_script("test", TEST_SCRIPT)],
        "request": {"method": "GET", "header": [], "url": "{{base_url}}/"},
    }


def _script(listen: str, source: str) -> dict[str, Any]:
    return {"listen": listen, "script": {"type": "text/javascript", "exec": source.splitlines()}}


def _pairs(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"key": key, "value": value, "type": "string"} for key, value in pairs]
