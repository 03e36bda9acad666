"""The token bridge: an opt-in loopback OAuth2 token endpoint (RFC 6749 client credentials)
in front of the agent's cache, for HTTP tools that cannot sign Maskinporten's grant (Postman,
httpyac, ...): client_id is a profile name, client_secret the bridge secret. PRIOR-ART lesson
12: loopback bind only; secret compared in constant time; Host must be a loopback name (DNS
rebinding); browsers (Origin, Sec-Fetch-*) refused; head, body, read time and connections
capped, so no client can hurt the agent (the HTTP itself: loopback.py, shared with the
texas-compatible endpoint). One request per connection; logs show fingerprints.
The listen address applies when the agent starts; the secret is read again on every reload,
so `mpagent bridge secret --rotate` takes effect without a restart.

A loopback port is open to every local user, so on Linux the bridge answers only connections
whose peer socket belongs to the agent's user (its uid, asked of the kernel by `peers`), and
counts connections per peer uid; a secret another user stole is then of no use. Where the
platform gives no such answer (macOS, Windows) `status` says so, and the secret alone guards it."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import http
import http.client
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from concurrent.futures import Executor
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus, urlencode

import platformdirs

from mpagent import passwords, paths
from mpagent.altinn import is_loopback
from mpagent.config import BridgeSettings
from mpagent.errors import ConfigError, IssuerRejected, IssuerUnavailable, MpagentError
from mpagent.errors import SecretUnavailable as NoKeyring
from mpagent.logs import RateLimit
from mpagent.loopback import (
    MAX_BODY,
    READ_TIMEOUT,
    Refusal,
    Request,
    Slots,  # noqa: F401 - bridge.Slots: tests/reliability/test_local_attacker.py uses it
    ascii_description,
    listen_text,
    render,
)
from mpagent.loopserver import LoopbackServer, bind
from mpagent.passwords import SERVICE
from mpagent.peers import PEER_CHECK, describe, holder, peer
from mpagent.private import read_regular, write_atomic
from mpagent.refresher import Customer, customer
from mpagent.tokens import SCOPE_TOKEN, Token, fingerprint

log = logging.getLogger(__name__)
# Refused connections: one line a minute, then a count, so another user's loop cannot fill
# the log (the lines of one kind share a count, whichever uid they name).
peer_log = logging.getLogger(f"{__name__}.peers")
peer_log.addFilter(RateLimit(burst=1))

KEYRING_USER = "bridge"
KEYRING_PLACE = f'the OS keyring (service "{SERVICE}", username "{KEYRING_USER}")'
HINT = "run `mpagent bridge secret`: it makes one if there is none, and a running agent takes it"
NO_SECRET = f"the agent has no usable bridge secret (see its log); {HINT}"
WRONG_SECRET = "wrong client_secret; `mpagent bridge secret` shows the current one"  # noqa: S105
PROBE_CLIENT = "mpagent-secret-check"
ROUTES = {"/token": "POST"}
_UNAUTHORIZED = {"WWW-Authenticate": 'Basic realm="mpagent"'}


async def start(
    settings: BridgeSettings, refresher: Any, io: Executor, *, read_timeout: float = READ_TIMEOUT
) -> Bridge:
    """Read the secret (on the I/O thread), then listen on the loopback address."""
    if settings.listen is None or not is_loopback(settings.listen[0]):
        raise ConfigError(f"[bridge] listen {settings.listen}: use 127.0.0.1:PORT or [::1]:PORT")
    bridge = Bridge(refresher, settings, io, read_timeout)
    bridge.set_secret(await bridge.read_secret(settings))
    server = await bind(
        "[bridge]",
        settings.listen,
        bridge.serve,
        "a tool that sends the bridge secret there gives it to that process: ",
    )
    bridge.server = server
    log.info("token bridge for HTTP tools on %s", token_url(settings.listen))
    return bridge


class Off:
    """The bridge when [bridge] listen is not set (`error` None) or it could not start (null
    object)."""

    def __init__(self, listen: tuple[str, int] | None = None, error: str | None = None) -> None:
        self.listen, self.error = listen, error

    async def reread(self, settings: BridgeSettings) -> None:
        """Nothing to re-read: the listen address applies when the agent starts."""

    def close(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        listen = listen_text(self.listen) if self.listen else None
        return {"listen": listen, "serving": False, "error": self.error}


def not_serving(state: dict[str, Any] | None, listen: tuple[str, int]) -> str | None:
    """Why the running agent's bridge (its `status()["bridge"]`) does not serve on `listen`
    (the config's), or None when it does."""
    where = listen_text(listen)
    if not state or state.get("listen") is None:
        return "the running agent has no bridge: it started before [bridge] listen was set"
    if not state.get("serving"):
        return f"the running agent's bridge is off: {state.get('error')}"
    if state["listen"] != where:
        return f"the running agent's bridge listens on {state['listen']}, [bridge] says {where}"
    return None


def accepts(listen: tuple[str, int], secret: str, timeout: float = 5.0) -> bool:
    """Does the bridge on `listen` take `secret`? Asks with a client_id no profile has and no
    grant_type, so that no token is ever fetched; raises OSError when nothing answers, or
    when what answers is another user's (it is not sent the secret)."""
    form = urlencode({"client_id": PROBE_CLIENT, "client_secret": secret})
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    connection = http.client.HTTPConnection(*listen, timeout=timeout)
    try:
        connection.connect()
        if PEER_CHECK and connection.sock is not None:
            found = peer(connection.sock.getsockname(), connection.sock.getpeername())
            if found is None or found.uid != os.getuid():
                raise OSError(
                    f"{listen_text(listen)} is held by {describe(holder(listen) or found)}, "
                    "not by your agent: the secret was not sent"
                )
        connection.request("POST", "/token", body=form, headers=headers)
        response = connection.getresponse()
        body = response.read(MAX_BODY)
    except http.client.HTTPException as exc:
        raise OSError(f"not the token bridge: {exc}") from exc
    finally:
        connection.close()
    try:
        description = json.loads(body).get("error_description")
    except (ValueError, AttributeError):
        raise OSError("not the token bridge: its answer is not JSON") from None
    return description not in (ascii_description(WRONG_SECRET), ascii_description(NO_SECRET))


def token_url(listen: tuple[str, int]) -> str:
    return f"http://{listen_text(listen)}/token"


class Bridge(LoopbackServer):
    """Serves connections (loopserver); `refresher` is the agent's (sources, cached(), get())."""

    name, log, peer_log = "bridge", log, peer_log
    routes, example = ROUTES, "http://127.0.0.1:PORT/token"

    def __init__(
        self, refresher: Any, settings: BridgeSettings, io: Executor, read_timeout: float
    ) -> None:
        super().__init__(read_timeout)
        self.refresher, self.settings, self.io = refresher, settings, io
        self._secret: bytes | None = None

    def status(self) -> dict[str, Any]:
        check = f"on: only uid {self.uid} is answered (each peer's uid asked of the kernel)"
        listen = self.settings.listen
        return {
            "listen": listen_text(listen) if listen else None,
            "serving": True,
            "url": token_url(listen) if listen else None,
            "peer_check": check if PEER_CHECK else "unavailable on this platform",
            "connections": self.slots.count(self.uid),
            "refused": {str(uid): n for uid, n in self.refused.items()},
        }

    def set_secret(self, secret: str | None) -> None:
        self._secret = secret.encode() if secret else None

    async def read_secret(self, settings: BridgeSettings) -> str | None:
        """On the I/O thread: the keyring may block."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.io, SecretStore(settings.secret_file).load)

    async def reread(self, settings: BridgeSettings) -> None:
        """On a reload: the secret as it is kept now (a rotated one replaces the old at once);
        when none can be read, the previous one keeps working, as the old configuration does
        when a new one is wrong."""
        if settings.listen != self.settings.listen:
            log.warning("bridge: [bridge] listen changes when the agent restarts (`mpagent stop`)")
        secret = await self.read_secret(settings)
        if secret is not None:
            self.set_secret(secret)
        elif self._secret is not None:
            log.error("bridge: the previous secret keeps working until one can be read")

    def refusal_headers(self, refusal: Refusal) -> Mapping[str, str]:
        return {**refusal.headers, **(_UNAUTHORIZED if refusal.status == 401 else {})}

    async def answer(self, request: Request) -> bytes:
        if self._secret is None:
            raise Refusal(NO_SECRET, 401)
        form = request.form()
        client_id, secret = credentials(request, form)
        if not hmac.compare_digest(secret.encode(), self._secret):
            raise Refusal(WRONG_SECRET, 401)
        names = [*self.refresher.sources, *self.refresher.unusable]
        if client_id not in names:
            known = ", ".join(sorted(names))
            raise Refusal(f"client_id is a profile name; no {client_id[:64]!r} in {known}", 401)
        grant_type = form.get("grant_type")
        if grant_type != "client_credentials":
            error = "invalid_request" if grant_type is None else "unsupported_grant_type"
            raise Refusal("send grant_type=client_credentials, the one supported", 400, error)
        try:
            source = self.refresher.source(client_id)
        except MpagentError as exc:  # the profile's configuration is wrong
            raise Refusal(exc.message, 500, "server_error") from exc
        try:  # per customer: the form's systemuser_org / consumer_org, as on the socket
            org = customer(form.get("systemuser_org"), form.get("consumer_org"))
        except ConfigError as exc:
            raise Refusal(exc.message, 400, "invalid_request") from exc
        token = await self._token(client_id, self._scopes(form.get("scope"), source), org)
        log.debug("bridge: token %s for %s", fingerprint(token.access_token), client_id)
        expires_in = max(1, int(token.expires_at - time.time()))
        body = {"access_token": token.access_token, "token_type": token.token_type or "Bearer"}
        return render(200, {**body, "expires_in": expires_in, "scope": token.scope})

    async def _token(self, profile: str, scopes: list[str], org: Customer | None) -> Token:
        try:  # the request's own mistakes: claims its customer cannot have, a full key cap
            cached: Token | None = self.refresher.cached(profile, scopes, None, org)
        except MpagentError as exc:
            raise Refusal(exc.message, 400, "invalid_request") from exc
        try:
            return cached or await self.refresher.get(profile, scopes, None, org)
        except IssuerRejected as exc:
            error = "invalid_scope" if exc.error == "invalid_scope" else "invalid_grant"
            raise Refusal(exc.message, 400, error) from exc
        except IssuerUnavailable as exc:
            raise Refusal(exc.message, 503, "temporarily_unavailable") from exc
        except MpagentError as exc:  # the profile cannot sign (keystore, password, clock)
            raise Refusal(exc.message, 500, "server_error") from exc

    def _scopes(self, scope: str | None, source: Any) -> list[str]:
        """RFC 6749 §3.3; without a scope, the profile's one configured scope."""
        configured = source.profile.scopes
        if scope is None or not scope.strip():
            if len(configured) == 1:
                return list(configured)
            choices = ", ".join(configured) or "any scope of the client; the profile keeps none"
            raise Refusal(f"name a scope: {choices}", 400, "invalid_scope")
        if not all(SCOPE_TOKEN.fullmatch(word) for word in scope.split()):
            raise Refusal("scope holds characters RFC 6749 does not allow", 400, "invalid_scope")
        return scope.split()


def credentials(request: Request, form: dict[str, str]) -> tuple[str, str]:
    """(client_id, client_secret) from HTTP Basic (RFC 6749 §2.3.1) or the form."""
    authorization = request.headers.get("authorization")
    if authorization is None:
        if not form.get("client_id") or "client_secret" not in form:
            raise Refusal("authenticate: HTTP Basic, or client_id and client_secret", 401)
        return form["client_id"], form["client_secret"]
    scheme, _, encoded = authorization.strip().partition(" ")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        decoded = ""
    user, colon, secret = decoded.partition(":")
    if scheme.lower() != "basic" or not colon:
        raise Refusal("the Authorization header is not HTTP Basic client credentials", 401)
    client_id, secret = unquote_plus(user), unquote_plus(secret)
    # Some tools repeat the credentials in the form; they must then agree.
    repeated = form.get("client_id", client_id), form.get("client_secret", secret)
    if repeated != (client_id, secret):
        raise Refusal("HTTP Basic and the form name different client credentials")
    return client_id, secret


class SecretStore:
    """The bridge secret: in the OS keyring (service "mpagent", username "bridge"), else a 0600
    file; the keyring's wins, as the agent reads it. Blocking: the agent uses it on its I/O
    thread. passwords handles keyring quirks."""

    def __init__(self, secret_file: Path | None) -> None:
        config_dir = platformdirs.user_config_dir(paths.APP, appauthor=False)
        self.path = secret_file or Path(config_dir, "bridge.secret")

    def where(self, in_keyring: bool) -> str:
        return KEYRING_PLACE if in_keyring else f"{self.path} (mode 0600)"

    def find(self) -> tuple[str, bool] | None:
        """(the secret, kept in the keyring?), or None if neither place has one. A keyring that
        cannot be used counts as empty; a file that cannot be used raises ConfigError."""
        with contextlib.suppress(NoKeyring):
            if stored := passwords.stored(KEYRING_USER):
                return stored, True
        try:
            secret = self.read_file()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc.strerror or exc}; {HINT}") from exc
        return (secret, False) if secret else None

    def load(self) -> str | None:
        """For the agent: the secret, or None; where it came from, or why none, logged."""
        try:
            found = self.find()
        except ConfigError as exc:
            log.error("bridge: %s; all token requests are refused", exc)
            return None
        if found is None:
            log.error("bridge: no secret in the OS keyring or %s; %s", self.path, HINT)
            return None
        log.info("bridge: using the secret in %s", self.where(found[1]))
        return found[0]

    def read_file(self) -> str | None:
        """Refuses a symlink, and a file that is not regular, not ours, or open to others."""
        try:
            data = read_regular(self.path, 4096, private=True)
        except ConfigError as exc:
            raise ConfigError(
                f"{exc.message}; `chmod 600 {self.path}` if it is, else "
                "`mpagent bridge secret --rotate`"
            ) from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(
                f"{self.path} is not UTF-8 text; `mpagent bridge secret --rotate` replaces it"
            ) from None
        return text.strip() or None

    def obtain(self, *, rotate: bool, to_file: bool) -> tuple[str, str, str]:
        """`mpagent bridge secret`: (secret, where it is kept, what happened: "found", "moved",
        "made" or "rotated"). The current secret unless there is none or `rotate`; a new one
        is kept where the old one was, in the file if `to_file`, else in the keyring if usable.
        `to_file` moves a secret found in the keyring to the file (the tools keep theirs)."""
        try:
            found = self.find()
        except ConfigError:
            if not rotate:
                raise
            found = None  # a file that cannot be used is what --rotate replaces
        if found is not None and not rotate:
            secret, in_keyring = found
            if to_file and in_keyring:
                return secret, self.keep(secret, to_file=True), "moved"
            return secret, self.where(in_keyring), "found"
        secret = secrets.token_urlsafe(32)
        to_file = to_file or (found is not None and not found[1])
        return secret, self.keep(secret, to_file=to_file), "rotated" if found else "made"

    def keep(self, secret: str, *, to_file: bool) -> str:
        """Keep the secret in the keyring (or the file: asked for, or no usable keyring) and
        remove the other place's, so the agent reads this one; returns where it is kept."""
        where = self.where(False)
        try:
            if not to_file:
                passwords.store(KEYRING_USER, secret)
                self.path.unlink(missing_ok=True)
                return self.where(True)
        except NoKeyring:
            where += "; the OS keyring is not usable here"
        except OSError as exc:
            raise ConfigError(f"cannot remove the old secret {self.path}: {exc.strerror}") from exc
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(self.path, secret + "\n")
        except OSError as exc:
            raise ConfigError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        # Best effort: a secret left in the keyring would win over the file.
        with contextlib.suppress(NoKeyring):
            passwords.forget(KEYRING_USER)
        return where
