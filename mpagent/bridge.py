"""The token bridge: an opt-in loopback OAuth2 token endpoint (RFC 6749 client credentials)
in front of the agent's cache, for HTTP tools that cannot sign Maskinporten's grant (Postman,
httpyac, ...): client_id is a profile name, client_secret the bridge secret. PRIOR-ART lesson
12: loopback bind only; secret compared in constant time; Host must be a loopback name (DNS
rebinding); browsers (Origin, Sec-Fetch-*) refused; head, body, read time and connections
capped, so no client can hurt the agent. One request per connection; logs show fingerprints.
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
import errno
import hmac
import http
import http.client
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit

import platformdirs

from mpagent import passwords, paths
from mpagent.altinn import is_loopback
from mpagent.config import BridgeSettings
from mpagent.errors import ConfigError, IssuerRejected, IssuerUnavailable, MpagentError
from mpagent.errors import SecretUnavailable as NoKeyring
from mpagent.logs import RateLimit
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

MAX_HEAD, MAX_BODY, READ_TIMEOUT, MAX_CLIENTS = 16 * 1024, 64 * 1024, 10.0, 64
EARLY_IDLE = 2.0  # near the cap, a connection with no request head after this long is closed
KEYRING_USER = "bridge"
KEYRING_PLACE = f'the OS keyring (service "{SERVICE}", username "{KEYRING_USER}")'
HINT = "run `mpagent bridge secret`: it makes one if there is none, and a running agent takes it"
NO_SECRET = f"the agent has no usable bridge secret (see its log); {HINT}"
WRONG_SECRET = "wrong client_secret; `mpagent bridge secret` shows the current one"  # noqa: S105
PROBE_CLIENT = "mpagent-secret-check"
_FIXED_HEADERS = (
    "Content-Type: application/json;charset=UTF-8\r\nCache-Control: no-store\r\n"
    "Pragma: no-cache\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n"
)
_STATUS_HEADERS = {401: 'WWW-Authenticate: Basic realm="mpagent"\r\n', 405: "Allow: POST\r\n"}
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SINGLE = {"host", "content-length", "content-type", "authorization", "transfer-encoding"}


async def start(
    settings: BridgeSettings, refresher: Any, io: Executor, *, read_timeout: float = READ_TIMEOUT
) -> Bridge:
    """Read the secret (on the I/O thread), then listen on the loopback address."""
    if settings.listen is None or not is_loopback(settings.listen[0]):
        raise ConfigError(f"[bridge] listen {settings.listen}: use 127.0.0.1:PORT or [::1]:PORT")
    bridge = Bridge(refresher, settings, io, read_timeout)
    bridge.set_secret(await bridge.read_secret(settings))
    try:
        server = await asyncio.start_server(bridge.serve, *settings.listen, limit=MAX_HEAD)
    except OSError as exc:
        where = listen_text(settings.listen)
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"[bridge] listen {where} is taken by {describe(holder(settings.listen))}; a "
                "tool that sends the bridge secret there gives it to that process. Stop it, or "
                "set [bridge] listen to a free port; then `mpagent stop` and start the agent again"
            ) from exc
        raise ConfigError(f"[bridge] cannot listen on {where}: {exc.strerror}") from exc
    # "localhost" is resolved by the system: it must have given loopback addresses only.
    if not all(is_loopback(s.getsockname()[0]) for s in server.sockets):
        server.close()
        raise ConfigError(f"[bridge] listen {settings.listen}: not only loopback addresses")
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
    return description not in (_ascii(WRONG_SECRET), _ascii(NO_SECRET))


def token_url(listen: tuple[str, int]) -> str:
    return f"http://{listen_text(listen)}/token"


def listen_text(listen: tuple[str, int]) -> str:
    host, port = listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Refusal(Exception):
    """An answer other than a token: RFC 6749 §5.2 JSON, raised where the request fails."""

    def __init__(self, description: str, status: int = 400, error: str | None = None):
        super().__init__(_ascii(description))
        self.status = status
        self.error = error or ("invalid_client" if status == 401 else "invalid_request")


def render(status: int, document: dict[str, Any]) -> bytes:
    body = json.dumps(document).encode()
    start = f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n{_FIXED_HEADERS}"
    extra = _STATUS_HEADERS.get(status, "")
    return f"{start}{extra}Content-Length: {len(body)}\r\n\r\n".encode("latin-1") + body


class Bridge:
    """Serves connections; `refresher` is the agent's (sources, cached(), get())."""

    def __init__(
        self, refresher: Any, settings: BridgeSettings, io: Executor, read_timeout: float
    ) -> None:
        self.refresher, self.settings, self.io = refresher, settings, io
        self.read_timeout, self.slots = read_timeout, Slots()
        self.uid = os.getuid() if PEER_CHECK else None
        self.refused: dict[int | None, int] = {}  # connections of other users, by uid
        self._secret: bytes | None = None
        self.server: asyncio.AbstractServer | None = None

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

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = ":".join(map(str, (writer.get_extra_info("peername") or ("?", "?"))[:2]))
        slot = self._admit(writer, address)
        if slot is None:  # another user's, or no room: closed before a byte is read
            writer.transport.abort()
            return
        try:
            reply = await self._reply(reader, address, slot)
            if not slot.closed:
                writer.write(reply)
                await asyncio.wait_for(writer.drain(), self.read_timeout)
        except (ConnectionError, TimeoutError) as exc:
            log.debug("bridge: %s went away: %s", address, type(exc).__name__)
        except Exception:  # connection boundary: a bug here must not reach the agent
            log.exception("bridge: unexpected error serving %s", address)
        finally:
            self.slots.release(slot)
            writer.close()  # the reply is small: the kernel takes it even from a peer not reading

    def _admit(self, writer: asyncio.StreamWriter, address: str) -> Slot | None:
        """A slot for a connection of the agent's user (of anyone, where the platform cannot
        tell), or None; each kind of refusal logged once a minute at most."""
        uid = None  # where the platform cannot tell, all peers share one count
        if PEER_CHECK:
            here, there = writer.get_extra_info("sockname"), writer.get_extra_info("peername")
            found = peer(here, there) if here and there else None
            uid = found.uid if found else None
            if uid != self.uid:
                self.refused[uid] = self.refused.get(uid, 0) + 1
                who = "a peer whose uid cannot be found" if uid is None else f"uid {uid}"
                peer_log.warning(
                    "bridge: refused a connection from %s; it answers only uid %s, the "
                    "agent's user",
                    who,
                    self.uid,
                )
                return None
        slot = self.slots.admit(uid, time.monotonic(), writer.transport.abort)
        if slot is None:
            peer_log.warning("bridge: %d connections busy; dropping %s", MAX_CLIENTS, address)
        return slot

    async def _reply(self, reader: asyncio.StreamReader, address: str, slot: Slot) -> bytes:
        try:
            return await self._answer(await self._read(reader, slot))
        except Refusal as refusal:
            if not slot.closed:  # closed to make room: it hears nothing, nor does the log
                log.info("bridge: %d %s to %s: %s", refusal.status, refusal.error, address, refusal)
            error = {"error": refusal.error, "error_description": str(refusal)}
            return render(refusal.status, error)

    async def _read(self, reader: asyncio.StreamReader, slot: Slot) -> Request:
        try:
            async with asyncio.timeout(self.read_timeout):
                request = Request(await reader.readuntil(b"\r\n\r\n"))
                slot.idle = False
                request.body = await reader.readexactly(request.screen())
                return request
        except asyncio.LimitOverrunError:
            raise Refusal(f"request line and headers exceed {MAX_HEAD} bytes", 431) from None
        except asyncio.IncompleteReadError:
            raise Refusal("the request ended early") from None
        except TimeoutError:
            raise Refusal(f"no complete request within {self.read_timeout:g} s", 408) from None

    async def _answer(self, request: Request) -> bytes:
        if self._secret is None:
            raise Refusal(NO_SECRET, 401)
        form = request.form()
        client_id, secret = request.credentials(form)
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


class Request:
    """One request, parsed from its head (up to CRLF CRLF); every check raises Refusal."""

    def __init__(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")[:-2]
        parts = lines[0].split(" ") if lines else []
        if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0") or parts[1][:1] != "/":
            raise Refusal("not an HTTP/1.1 request line")
        self.method, target, self.body = parts[0], urlsplit(parts[1]), b""
        self.path, self.query = target.path, target.query
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            key, value = name.lower(), value.strip(" \t")
            if not colon or not _HEADER_NAME.fullmatch(name) or "\x00" in value:
                raise Refusal("a malformed header line")
            if key in self.headers and key in _SINGLE:
                raise Refusal(f"{name} appears twice")
            self.headers[key] = f"{self.headers[key]}, {value}" if key in self.headers else value

    def screen(self) -> int:
        """Everything checked before reading the body; returns the body's length."""
        headers = self.headers
        if "origin" in headers or any(name.startswith("sec-fetch-") for name in headers):
            raise Refusal("requests from web browsers are refused", 403)
        if not loopback_host(headers.get("host", "")):
            raise Refusal("Host must be a loopback name; use http://127.0.0.1:PORT/token", 421)
        if self.path != "/token":
            raise Refusal("the token endpoint is POST /token", 404)
        if self.method != "POST":
            raise Refusal("the token endpoint takes POST", 405)
        if self.query:
            raise Refusal("send the parameters in the body, not in the URL")
        length = headers.get("content-length")
        if "transfer-encoding" in headers or length is None:
            raise Refusal("send the body with a Content-Length", 411)
        if not (length.isascii() and length.isdigit()):
            raise Refusal("Content-Length is not a number")
        if int(length) > MAX_BODY:
            raise Refusal(f"the body exceeds {MAX_BODY} bytes", 413)
        return int(length)

    def form(self) -> dict[str, str]:
        media_type = self.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/x-www-form-urlencoded":
            raise Refusal("send the parameters as application/x-www-form-urlencoded")
        try:
            text = self.body.decode()
            pairs = parse_qsl(text, keep_blank_values=True, errors="strict", max_num_fields=32)
        except ValueError:  # UnicodeDecodeError included
            raise Refusal("the body is not a UTF-8 form of at most 32 fields") from None
        if len(dict(pairs)) != len(pairs):
            raise Refusal("a parameter appears twice")
        return dict(pairs)

    def credentials(self, form: dict[str, str]) -> tuple[str, str]:
        """(client_id, client_secret) from HTTP Basic (RFC 6749 §2.3.1) or the form."""
        authorization = self.headers.get("authorization")
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


def loopback_host(value: str) -> bool:
    """Host: localhost, 127.x.y.z or [::1], optional port: names no DNS answer can move."""
    try:
        parts = urlsplit("//" + value)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        return False
    if parts.netloc != value or "@" in value or parts.hostname is None:
        return False
    bracketed = value.startswith("[")
    return bracketed == (":" in parts.hostname) and is_loopback(parts.hostname)


def _ascii(text: str) -> str:
    """RFC 6749 §5.2 allows only printable ASCII except '"' and '\\' in error_description."""
    text = text.replace("\u2014", "-").replace('"', "'").replace("\\", "/")
    return "".join(c if " " <= c <= "~" else "?" for c in text)


# -- connections per peer uid


@dataclass(eq=False)
class Slot:
    """One connection's place: idle until its request head is complete."""

    uid: int | None
    opened: float
    close: Callable[[], None]
    idle: bool = True
    closed: bool = False  # by Slots, to make room: it gets no answer


class Slots:
    """At most `cap` connections per peer uid. From three quarters of the cap on, connections
    with no complete request head after `early` s are closed, and at the cap the oldest idle
    one makes room for the new one: connections held open and idle (by a stuck tool, or by
    another user where the platform cannot tell users apart) never lock out a request."""

    def __init__(self, cap: int = MAX_CLIENTS, early: float = EARLY_IDLE) -> None:
        self.cap, self.near, self.early = cap, cap * 3 // 4, early
        self.by_uid: dict[int | None, list[Slot]] = {}  # each in the order they came

    def count(self, uid: int | None) -> int:
        return len(self.by_uid.get(uid, ()))

    def admit(self, uid: int | None, now: float, close: Callable[[], None]) -> Slot | None:
        """A slot for a new connection (`close` ends it), or None: all are busy."""
        slots = self.by_uid.setdefault(uid, [])
        if len(slots) >= self.near:
            for slot in [s for s in slots if s.idle and now - s.opened >= self.early]:
                self._close(slot)
        if len(slots) >= self.cap:
            oldest_idle = next((s for s in slots if s.idle), None)
            if oldest_idle is None:
                return None
            self._close(oldest_idle)
        slot = Slot(uid, now, close)
        slots.append(slot)
        return slot

    def release(self, slot: Slot) -> None:
        slots = self.by_uid.get(slot.uid, [])
        if slot in slots:
            slots.remove(slot)

    def _close(self, slot: Slot) -> None:
        self.release(slot)
        slot.closed = True
        slot.close()


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
