"""The agent's wire protocol, version 1. Stdlib only and free of json/re, because the
`mpagent get` client parses it on its hot path.

A message is one line of UTF-8 ending in "\\n": words, then `key=value` fields, separated by
single spaces. Values are percent-encoded (`%XX` of UTF-8 bytes) wherever they hold a space,
a `%`, a control character or a non-ASCII character; a key may repeat.

    request:  mpagent/1 get scope=idporten:dcr.read profile=dev min_ttl=30
    reply:    ok token=eyJ... expires_at=1764420000.5 scope=idporten:dcr.read
    reply:    error kind=rejected message=Maskinporten%20refused... mp_code=MP-200 connected:json=true

Verbs: `get` (fields scope..., profile, min_ttl, and for a customer organisation's own token
either systemuser_org or consumer_org, nine digits; the reply may add `warning` fields),
`env` (fields profile, scope..., min_ttl; reply: `name`/`value` pairs in order, each token's
NAME_EXPIRES_AT after it, then `warning` fields), `status` (reply field `json`, a JSON
document), `reload` (reply `json`: the unusable profiles), `refresh` (field profile; reply
`json`: each token's outcome), `stop` (reply `pid`). Requests are at most MAX_REQUEST bytes; replies MAX_REPLY.

Framing is sans-I/O and written once: `LineReader` takes bytes as they arrive and gives the
line once its newline has come; `read_line` is the blocking loop over it. Every reader uses
them: the client, the server, both halves of the Windows pipe and the systemd glue.

An error's fields are its details (`details`/`from_details`): a string travels as itself, any
other JSON value as JSON under the key with TYPED appended (`aliases:json=["a","b"]`), so
only an error with such a detail costs the client a `json` import.
"""

VERSION = "mpagent/1"
MAX_REQUEST = 16 * 1024
MAX_REPLY = 8 * 1024 * 1024

TYPED = ":json"

Fields = list[tuple[str, str]]  # a key may repeat, so not a dict

TYPE_CHECKING = False  # the typing module's constant, without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable


class MessageError(ValueError):
    """A line that is not a protocol message."""


class LineReader:
    """One line, assembled from the bytes as they arrive; at most `limit` bytes before its
    newline (the newline itself is not counted)."""

    __slots__ = ("_scanned", "limit", "received")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.received = bytearray()  # everything fed so far
        self._scanned = 0  # no newline before this offset

    def feed(self, data: bytes) -> bytes | None:
        """The complete line, newline included, once it has arrived (bytes after it are not
        part of it); None while it has not. Raises MessageError once more than `limit` bytes
        have arrived without a newline."""
        received = self.received
        if not received:  # the common case, a whole line in one piece: no copy
            end = data.find(b"\n", 0, self.limit + 1)
            if end >= 0:
                return data[: end + 1]
        received += data
        end = received.find(b"\n", self._scanned, self.limit + 1)
        if end >= 0:
            return bytes(received[: end + 1])
        if len(received) > self.limit:
            raise MessageError(f"no newline within {self.limit} bytes")
        self._scanned = len(received)
        return None


def read_line(recv: "Callable[[int], bytes]", limit: int) -> bytes:
    """Call `recv(n)` until a line has arrived, and return it, newline included; at end of
    stream (recv returns b"") return what arrived, which then lacks its newline and may be
    empty. MessageError: more than `limit` bytes without a newline. recv's errors pass."""
    reader = LineReader(limit)
    size = min(limit + 1, 65536)
    while True:
        data = recv(size)
        if not data:
            return bytes(reader.received)
        line = reader.feed(data)
        if line is not None:
            return line


def quote(value: str) -> str:
    if value.isascii() and value.isprintable() and " " not in value and "%" not in value:
        return value
    return "".join(
        chr(b) if 0x21 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in value.encode()
    )


def unquote(value: str) -> str:
    if "%" not in value:
        return value
    out = bytearray()
    i = 0
    while i < len(value):
        if value[i] == "%":
            try:
                out.append(int(value[i + 1 : i + 3], 16))
            except ValueError:
                # not the characters themselves: the value may be a password (unlock)
                raise MessageError("a % not followed by two hex digits") from None
            i += 3
        else:
            out += value[i].encode()
            i += 1
    try:
        return out.decode()
    except UnicodeDecodeError:
        raise MessageError("percent-escapes that are not UTF-8") from None


def encode(words: list[str], fields: Fields) -> bytes:
    parts = words + [f"{key}={quote(value)}" for key, value in fields]
    return (" ".join(parts) + "\n").encode()


def decode(line: bytes) -> tuple[list[str], Fields]:
    """Split one line (with or without its newline) into words and fields."""
    try:
        text = line.decode().rstrip("\n")
    except UnicodeDecodeError:
        raise MessageError("not UTF-8") from None
    if not text or "\n" in text or "\r" in text:
        raise MessageError("not a single non-empty line")
    words: list[str] = []
    fields: Fields = []
    for part in text.split(" "):
        key, sep, value = part.partition("=")
        if sep:
            if not key:
                raise MessageError("a field without a name")
            fields.append((key, unquote(value)))
        elif fields or not part:
            raise MessageError("words must come before fields, one space apart")
        else:
            words.append(part)
    return words, fields


def first(fields: Fields, key: str, default: str | None = None) -> str | None:
    for k, v in fields:
        if k == key:
            return v
    return default


def every(fields: Fields, key: str) -> list[str]:
    return [v for k, v in fields if k == key]


def details(values: "dict[str, object]") -> Fields:
    """Fields for a dict of values; a non-string travels JSON-encoded (see TYPED)."""
    fields: Fields = []
    for key, value in values.items():
        if isinstance(value, str):
            fields.append((key, value))
        else:
            import json

            # default=str: a value JSON cannot hold still arrives, as its text
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
            fields.append((key + TYPED, text))
    return fields


def from_details(fields: Fields) -> "dict[str, object]":
    """The values `details` encoded, each with its JSON type; the last of a repeated key wins."""
    values: dict[str, object] = {}
    for key, value in fields:
        if key.endswith(TYPED):
            import json

            try:
                values[key[: -len(TYPED)]] = json.loads(value)
            except ValueError:
                raise MessageError(f"field {key} is not JSON") from None
        else:
            values[key] = value
    return values
