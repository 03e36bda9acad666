"""The token bridge: an opt-in loopback OAuth2 token endpoint (RFC 6749 client credentials)
in front of the agent's cache, for HTTP tools that cannot sign Maskinporten's grant (Postman,
httpyac, ...): client_id is a profile name, client_secret the bridge secret. PRIOR-ART lesson
12: loopback bind only; secret compared in constant time; Host must be a loopback name (DNS
rebinding); browsers (Origin, Sec-Fetch-*) refused; head, body, read time and connections
capped, so no client can hurt the agent. One request per connection; logs show fingerprints."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import http
import ipaddress
import json
import logging
import os
import re
import secrets
import stat
import time
from concurrent.futures import Executor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlsplit

import platformdirs

from mpagent import envfile, passwords, paths
from mpagent.config import BridgeSettings
from mpagent.errors import ConfigError, IssuerRejected, IssuerUnavailable, MpagentError
from mpagent.errors import SecretUnavailable as NoKeyring
from mpagent.issuer import Token, fingerprint
from mpagent.passwords import SERVICE

log = logging.getLogger(__name__)

MAX_HEAD, MAX_BODY, READ_TIMEOUT, MAX_CLIENTS = 16 * 1024, 64 * 1024, 10.0, 64
KEYRING_USER = "bridge"
HINT = "run `mpagent bridge secret`, then restart the agent (`mpagent stop`)"
_FIXED_HEADERS = (
    "Content-Type: application/json;charset=UTF-8\r\nCache-Control: no-store\r\n"
    "Pragma: no-cache\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n"
)
_STATUS_HEADERS = {401: 'WWW-Authenticate: Basic realm="mpagent"\r\n', 405: "Allow: POST\r\n"}
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 §3.3
_SINGLE = {"host", "content-length", "content-type", "authorization", "transfer-encoding"}


async def start(
    settings: BridgeSettings, refresher: Any, io: Executor, *, read_timeout: float = READ_TIMEOUT
) -> asyncio.AbstractServer:
    """Read the secret (on the I/O thread), then listen on the loopback address."""
    if settings.listen is None or not is_loopback(settings.listen[0]):
        raise ConfigError(f"[bridge] listen {settings.listen}: use 127.0.0.1:PORT or [::1]:PORT")
    store = SecretStore(settings.secret_file)
    secret = await asyncio.get_running_loop().run_in_executor(io, store.load)
    bridge = Bridge(refresher, secret, read_timeout)
    try:
        server = await asyncio.start_server(bridge.serve, *settings.listen, limit=MAX_HEAD)
    except OSError as exc:
        raise ConfigError(f"[bridge] cannot listen on {settings.listen}: {exc.strerror}") from exc
    # "localhost" is resolved by the system: it must have given loopback addresses only.
    if not all(is_loopback(s.getsockname()[0]) for s in server.sockets):
        server.close()
        raise ConfigError(f"[bridge] listen {settings.listen}: not only loopback addresses")
    log.info("token bridge for HTTP tools on %s", token_url(settings.listen))
    return server


def token_url(listen: tuple[str, int]) -> str:
    host, port = listen
    return f"http://[{host}]:{port}/token" if ":" in host else f"http://{host}:{port}/token"


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

    def __init__(self, refresher: Any, secret: str | None, read_timeout: float) -> None:
        self.refresher, self.read_timeout = refresher, read_timeout
        self._secret, self.clients = (secret.encode() if secret else None), 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = ":".join(map(str, (writer.get_extra_info("peername") or ("?", "?"))[:2]))
        if self.clients >= MAX_CLIENTS:
            log.warning("bridge: %d connections open; dropping %s", self.clients, peer)
            writer.transport.abort()
            return
        self.clients += 1
        try:
            writer.write(await self._reply(reader, peer))
            await asyncio.wait_for(writer.drain(), self.read_timeout)
        except (ConnectionError, TimeoutError) as exc:
            log.debug("bridge: %s went away: %s", peer, type(exc).__name__)
        except Exception:  # connection boundary: a bug here must not reach the agent
            log.exception("bridge: unexpected error serving %s", peer)
        finally:
            self.clients -= 1
            writer.close()  # the reply is small: the kernel takes it even from a peer not reading

    async def _reply(self, reader: asyncio.StreamReader, peer: str) -> bytes:
        try:
            return await self._answer(await self._read(reader))
        except Refusal as refusal:
            log.info("bridge: %d %s to %s: %s", refusal.status, refusal.error, peer, refusal)
            error = {"error": refusal.error, "error_description": str(refusal)}
            return render(refusal.status, error)

    async def _read(self, reader: asyncio.StreamReader) -> Request:
        try:
            async with asyncio.timeout(self.read_timeout):
                request = Request(await reader.readuntil(b"\r\n\r\n"))
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
            raise Refusal(f"the agent has no usable bridge secret (see its log); {HINT}", 401)
        form = request.form()
        client_id, secret = request.credentials(form)
        if not hmac.compare_digest(secret.encode(), self._secret):
            raise Refusal("wrong client_secret; use the one `mpagent bridge secret` printed", 401)
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
        token = await self._token(client_id, self._scopes(form.get("scope"), source))
        log.debug("bridge: token %s for %s", fingerprint(token.access_token), client_id)
        expires_in = max(1, int(token.expires_at - time.time()))
        body = {"access_token": token.access_token, "token_type": token.token_type or "Bearer"}
        return render(200, {**body, "expires_in": expires_in, "scope": token.scope})

    async def _token(self, profile: str, scopes: list[str]) -> Token:
        try:
            cached: Token | None = self.refresher.cached(profile, scopes, None)
            return cached or await self.refresher.get(profile, scopes, None)
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
        if not all(_SCOPE_TOKEN.fullmatch(word) for word in scope.split()):
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


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ascii(text: str) -> str:
    """RFC 6749 §5.2 allows only printable ASCII except '"' and '\\' in error_description."""
    text = text.replace("\u2014", "-").replace('"', "'").replace("\\", "/")
    return "".join(c if " " <= c <= "~" else "?" for c in text)


class SecretStore:
    """The bridge secret: in the OS keyring (service "mpagent", username "bridge"), else a 0600
    file. Blocking: the agent uses it on its I/O thread. passwords handles keyring quirks."""

    def __init__(self, secret_file: Path | None) -> None:
        config_dir = platformdirs.user_config_dir(paths.APP, appauthor=False)
        self.path = secret_file or Path(config_dir, "bridge.secret")

    def load(self) -> str | None:
        """The keyring's secret, else the file's; None (the reason logged) if neither."""
        with contextlib.suppress(NoKeyring):
            if stored := passwords.stored(KEYRING_USER):
                log.info("bridge: using the secret stored in the OS keyring")
                return stored
        try:
            if stored := self.read_file():
                log.info("bridge: using the secret in %s", self.path)
                return str(stored)
        except FileNotFoundError:
            pass
        except (OSError, ConfigError) as exc:
            log.error("bridge: cannot use %s: %s; all token requests are refused", self.path, exc)
            return None
        log.error("bridge: no secret in the OS keyring or %s; %s", self.path, HINT)
        return None

    def read_file(self) -> str | None:
        """Refuses a symlink, and a file that is not regular, not ours, or open to others."""
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, encoding="utf-8") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                mode = f"mode {st.st_mode & 0o777:o}"
                raise ConfigError(f"not a private file of yours ({mode}); {HINT}")
            return f.read(4096).strip() or None

    def store_new(self, *, to_file: bool) -> tuple[str, str]:
        """A new secret, kept in the keyring (or the file: asked for, or no usable keyring);
        the other place's old one is removed so the agent reads this one. (secret, where)"""
        secret, where = secrets.token_urlsafe(32), f"{self.path} (mode 0600)"
        try:
            if not to_file:
                passwords.store(KEYRING_USER, secret)
                self.path.unlink(missing_ok=True)
                return secret, f'the OS keyring (service "{SERVICE}", username "{KEYRING_USER}")'
        except NoKeyring:
            where += "; the OS keyring is not usable here"
        except OSError as exc:
            raise ConfigError(f"cannot remove the old secret {self.path}: {exc.strerror}") from exc
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            envfile.write_atomic(self.path, secret + "\n")
        except OSError as exc:
            raise ConfigError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        # Best effort: a secret left in the keyring would win over the file.
        with contextlib.suppress(NoKeyring):
            passwords.forget(KEYRING_USER)
        return secret, where
