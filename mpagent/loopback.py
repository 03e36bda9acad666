"""The plain HTTP/1.1 of the agent's loopback listeners (the token bridge, the texas-compatible
endpoint): a request head parsed and screened, RFC 6749 §5.2 refusals, answers rendered, and
connections counted per peer uid. Pure: bytes and values in and out; the listeners own the
sockets, the clock and the peer check.

What every listener refuses before it reads a body (PRIOR-ART lesson 12): a request from a
web browser (Origin, Sec-Fetch-*), a Host that is not a loopback name (DNS rebinding), a path
or method it does not serve, a query string, a body without a Content-Length or above
MAX_BODY; a head above MAX_HEAD and a request slower than READ_TIMEOUT are the listener's."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from mpagent.altinn import is_loopback

MAX_HEAD, MAX_BODY, READ_TIMEOUT, MAX_CLIENTS = 16 * 1024, 64 * 1024, 10.0, 64
EARLY_IDLE = 2.0  # near the cap, a connection with no request head after this long is closed
MAX_FIELDS = 32
_FIXED_HEADERS = (
    "Cache-Control: no-store\r\nPragma: no-cache\r\nX-Content-Type-Options: nosniff\r\n"
    "Connection: close\r\n"
)
# The reason phrases of the statuses the listeners answer (http.HTTPStatus's; the http
# package is I/O to the import rules, and a client reads the code, not the phrase).
PHRASES = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
    413: "Request Entity Too Large", 421: "Misdirected Request",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    503: "Service Unavailable",
}  # fmt: skip
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SINGLE = {"host", "content-length", "content-type", "authorization", "transfer-encoding"}


class Refusal(Exception):
    """An answer other than the one asked for: an RFC 6749 §5.2 error document, raised where
    the request fails. Not an MpagentError: it is an HTTP answer, not a failure of the agent.
    `headers`: extra response headers (Allow for a 405)."""

    def __init__(
        self,
        description: str,
        status: int = 400,
        error: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.description = ascii_description(description)
        super().__init__(self.description)
        self.status = status
        self.error = error or ("invalid_client" if status == 401 else "invalid_request")
        self.headers = dict(headers or {})

    def document(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


def ascii_description(text: str) -> str:
    """RFC 6749 §5.2 allows only printable ASCII except '"' and '\\' in error_description."""
    text = text.replace("\u2014", "-").replace("\u2026", "...").replace('"', "'")
    return "".join(c if " " <= c <= "~" else "?" for c in text.replace("\\", "/"))


def render(
    status: int,
    document: Any,
    headers: Mapping[str, str] | None = None,
    content_type: str = "application/json;charset=UTF-8",
) -> bytes:
    """A whole response: `document` as JSON (bytes as they are), never cached, then closed."""
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    start = f"HTTP/1.1 {status} {PHRASES.get(status, 'Status')}\r\nContent-Type: {content_type}"
    head = f"{start}\r\n{_FIXED_HEADERS}{extra}Content-Length: {len(body)}\r\n\r\n"
    return head.encode("latin-1") + body


def listen_text(listen: tuple[str, int]) -> str:
    host, port = listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Request:
    """One request, parsed from its head (up to CRLF CRLF); every check raises Refusal."""

    def __init__(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")[:-2]
        parts = lines[0].split(" ") if lines else []
        if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0") or parts[1][:1] != "/":
            raise Refusal("not an HTTP/1.1 request line")
        try:  # a target urlsplit cannot take ("//[", an unclosed IPv6 literal) is no request
            target = urlsplit(parts[1])
        except ValueError:
            raise Refusal("not an HTTP/1.1 request line") from None
        self.method, self.body = parts[0], b""
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

    def screen(self, routes: Mapping[str, str], example: str) -> int:
        """Everything checked before reading the body; returns the body's length. `routes`:
        the method each path served takes; `example` a URL to show for a Host refused."""
        headers = self.headers
        if "origin" in headers or any(name.startswith("sec-fetch-") for name in headers):
            raise Refusal("requests from web browsers are refused", 403)
        if not loopback_host(headers.get("host", "")):
            raise Refusal(f"Host must be a loopback name; use {example}", 421)
        method = routes.get(self.path)
        if method is None:
            served = ", ".join(f"{m} {p}" for p, m in routes.items())
            raise Refusal(f"no such path; this endpoint serves {served}", 404)
        if self.method != method:
            raise Refusal(f"{self.path} takes {method}", 405, headers={"Allow": method})
        if self.query:
            raise Refusal("send the parameters in the body, not in the URL")
        length = headers.get("content-length")
        if "transfer-encoding" in headers or (length is None and method == "POST"):
            raise Refusal("send the body with a Content-Length", 411)
        length = length or "0"
        if not (length.isascii() and length.isdigit()):
            raise Refusal("Content-Length is not a number")
        if int(length) > MAX_BODY:
            raise Refusal(f"the body exceeds {MAX_BODY} bytes", 413)
        return int(length)

    @property
    def media_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    def form(self) -> dict[str, str]:
        """The body as an application/x-www-form-urlencoded form."""
        if self.media_type != "application/x-www-form-urlencoded":
            raise Refusal("send the parameters as application/x-www-form-urlencoded")
        try:
            text = self.body.decode()
        except UnicodeDecodeError:
            raise Refusal(f"the body is not a UTF-8 form of at most {MAX_FIELDS} fields") from None
        pairs = form_pairs(text)
        if len(dict(pairs)) != len(pairs):
            raise Refusal("a parameter appears twice")
        return dict(pairs)


def form_pairs(text: str, max_fields: int = MAX_FIELDS) -> list[tuple[str, str]]:
    """A form's fields in order (a name may repeat: the caller decides); Refusal for a bad
    %-escape or more than `max_fields` fields."""
    try:
        return parse_qsl(text, keep_blank_values=True, errors="strict", max_num_fields=max_fields)
    except ValueError:  # a bad %-escape (UnicodeDecodeError), or too many fields
        raise Refusal(f"the body is not a UTF-8 form of at most {max_fields} fields") from None


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
