"""The agent's wire protocol, version 1. Stdlib only and free of json/re, because the
`mpagent get` client parses it on its hot path.

A message is one line of UTF-8 ending in "\\n": words, then `key=value` fields, separated by
single spaces. Values are percent-encoded (`%XX` of UTF-8 bytes) wherever they hold a space,
a `%`, a control character or a non-ASCII character; a key may repeat.

    request:  mpagent/1 get scope=idporten:dcr.read profile=dev min_ttl=30
    reply:    ok token=eyJ... expires_at=1764420000.5 scope=idporten:dcr.read
    reply:    error kind=rejected message=Maskinporten%20refused... mp_code=MP-200 connected:json=true

Verbs: `get` (fields scope..., profile, min_ttl; the reply may add `warning` fields),
`status` (reply field `json`, a JSON document), `reload` (reply `json`: the unusable
profiles), `refresh` (field profile; reply `json`: each token's outcome), `stop` (reply
`pid`). Requests are at most MAX_REQUEST bytes; replies MAX_REPLY.

An error's fields are its details (`details`/`from_details`): a string travels as itself, any
other JSON value as JSON under the key with TYPED appended (`aliases:json=["a","b"]`), so
only an error with such a detail costs the client a `json` import.
"""

VERSION = "mpagent/1"
MAX_REQUEST = 16 * 1024
MAX_REPLY = 8 * 1024 * 1024

TYPED = ":json"

Fields = list[tuple[str, str]]  # a key may repeat, so not a dict


class MessageError(ValueError):
    """A line that is not a protocol message."""


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
                raise MessageError(f"bad percent-escape in {value[i : i + 3]!r}") from None
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
