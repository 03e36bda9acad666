"""The wire protocol: round trips, malformed lines, and every error class (with typed details)
through the real error_reply and client decoding."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpagent import client, errors, protocol, server, tokens

keys = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz/0123456789", min_size=1, max_size=12)


@given(st.lists(words, min_size=1, max_size=3), st.lists(st.tuples(keys, st.text()), max_size=6))
def test_round_trip(w: list[str], fields: list[tuple[str, str]]) -> None:
    """Any words and any field values (spaces, %, newlines, non-ASCII) survive encoding."""
    line = protocol.encode(w, fields)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert protocol.decode(line) == (w, fields)


@given(st.binary(max_size=200))
def test_decode_never_crashes(data: bytes) -> None:
    """Arbitrary bytes decode or raise MessageError, nothing else."""
    try:
        protocol.decode(data)
    except protocol.MessageError:
        pass


def test_plain_values_are_not_escaped() -> None:
    """Scopes and tokens travel as they are, so the line stays readable."""
    line = protocol.encode(["ok"], [("token", "eyJ.a-b_c.d=="), ("scope", "idporten:dcr.read")])
    assert line == b"ok token=eyJ.a-b_c.d== scope=idporten:dcr.read\n"


@pytest.mark.parametrize(
    "line",
    [b"", b"\n", b"a  b\n", b"a=1 b\n", b"=x\n", b"a b=%zz\n", b"a b=%ff\n", b"\xff\n", b"a\rb\n"],
)
def test_malformed_lines(line: bytes) -> None:
    """Empty lines, double spaces, words after fields, bad escapes and bad UTF-8 are refused."""
    with pytest.raises(protocol.MessageError):
        protocol.decode(line)


def test_repeated_fields() -> None:
    """A key may repeat (several scopes); first/every read them."""
    _, fields = protocol.decode(b"mpagent/1 get scope=a scope=b\n")
    assert protocol.every(fields, "scope") == ["a", "b"]
    assert protocol.first(fields, "scope") == "a" and protocol.first(fields, "x") is None


@given(st.binary(max_size=40).filter(lambda b: b"\n" not in b), st.data())
def test_line_reader_any_split(body: bytes, data: st.DataObject) -> None:
    """However the bytes are split, the feed that brings the newline returns the line, whole
    and without what follows it; every feed before it returns None."""
    stream = body + b"\nafter"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    reader = protocol.LineReader(40)
    results = [reader.feed(piece) for piece in pieces]
    first = next(i for i, r in enumerate(results) if r is not None)
    assert results[first] == body + b"\n"
    assert len(b"".join(pieces[: first + 1])) > len(body) >= len(b"".join(pieces[:first]))


def test_line_reader_limit() -> None:
    """A line of exactly `limit` bytes before its newline is taken; one byte more without a
    newline is refused at once, without waiting for the rest."""
    assert protocol.LineReader(5).feed(b"abcde\n") == b"abcde\n"
    reader = protocol.LineReader(5)
    assert reader.feed(b"abcde") is None
    with pytest.raises(protocol.MessageError, match="no newline within 5 bytes"):
        reader.feed(b"f")


def test_line_reader_newline_after_the_limit_is_too_late() -> None:
    """A newline that comes after more than `limit` bytes does not make the line acceptable."""
    with pytest.raises(protocol.MessageError):
        protocol.LineReader(5).feed(b"abcdef\n")


def test_read_line_over_a_socket() -> None:
    """read_line returns the line from a real socket, newline included, in small pieces too."""
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"ok a=1 b=2\nrest")
        assert protocol.read_line(lambda n: right.recv(min(n, 3)), 100) == b"ok a=1 b=2\n"


def test_read_line_at_end_of_stream() -> None:
    """At end of stream read_line returns what arrived, without a newline (maybe nothing)."""
    for sent in (b"", b"ok a=1"):
        left, right = socket.socketpair()
        with left, right:
            left.sendall(sent)
            left.shutdown(socket.SHUT_WR)
            assert protocol.read_line(right.recv, 100) == sent


def test_read_line_over_the_limit() -> None:
    """read_line refuses a line longer than its limit, and reads no more than limit+1 bytes."""
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"x" * 50)
        with pytest.raises(protocol.MessageError, match="within 10 bytes"):
            protocol.read_line(right.recv, 10)
        assert len(right.recv(100)) == 50 - 11


def test_protocol_imports_nothing_heavy() -> None:
    """protocol is on the hot path: importing it brings in no json, re, typing or asyncio
    (under -S, so that site has imported none of them before)."""
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import mpagent.protocol\n"
        "added = set(sys.modules) - before\n"
        "print(sorted({'json', 're', 'typing', 'asyncio', 'socket'} & added))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def _hierarchy(cls: type[errors.MpagentError]) -> set[type[errors.MpagentError]]:
    return {cls}.union(*(_hierarchy(sub) for sub in cls.__subclasses__()))


def test_every_error_class_has_a_wire_kind() -> None:
    """Every class in the hierarchy is in the kind table, so the other side rebuilds it."""
    assert _hierarchy(errors.MpagentError) == set(errors._BY_KIND.values())
    assert all(errors._BY_KIND[cls.kind] is cls for cls in _hierarchy(errors.MpagentError))


DETAILS = {
    "mp_code": "MP-200",
    "text": 'a b%ø\n"[1]"',
    "looks_typed": "true",
    "aliases": ["a", "b"],
    "connected": False,
    "locked": True,
    "status_code": 400,
    "hint": None,
}


EVERY_ERROR = sorted(_hierarchy(errors.MpagentError), key=lambda cls: cls.__name__)


@pytest.mark.parametrize("cls", EVERY_ERROR, ids=[cls.__name__ for cls in EVERY_ERROR])
def test_every_error_class_survives_the_socket(cls: type[errors.MpagentError]) -> None:
    """Each error class crosses error_reply and the client as the same class, message,
    exit code and details, each detail with its type (str, bool, int, list, None)."""
    exc = cls("what went wrong; what to do", **DETAILS)
    with pytest.raises(cls) as info:
        client.parse_reply(server.error_reply(exc))
    back = info.value
    assert type(back) is cls and str(back) == str(exc) and back.exit_code == exc.exit_code
    assert back.details == DETAILS
    assert back.details["connected"] is False and back.details["status_code"] == 400


def test_string_details_travel_as_plain_fields() -> None:
    """An error whose details are all strings has no JSON on the line: the common case."""
    line = server.error_reply(errors.IssuerRejected("refused", mp_code="MP-200"))
    assert line == b"error mp_code=MP-200 kind=rejected message=refused\n"


def test_typed_details_are_marked_json() -> None:
    """A non-string detail travels as JSON under its key with :json appended."""
    line = server.error_reply(errors.KeystoreError("x", aliases=["a", "b"], connected=False))
    assert line == b'error aliases:json=["a","b"] connected:json=false kind=keystore message=x\n'


def test_value_json_cannot_hold_arrives_as_text() -> None:
    """A detail JSON cannot encode (a path) still arrives, as its text, not as a crash."""
    with pytest.raises(errors.ConfigError) as info:
        client.parse_reply(server.error_reply(errors.ConfigError("x", path=Path("/a b"))))
    assert info.value.details == {"path": "/a b"}


def test_bad_typed_detail_is_a_protocol_error() -> None:
    """A :json field that is not JSON is a malformed reply, with the advice to restart."""
    with pytest.raises(errors.ProtocolError, match=r"malformed reply .*a:json.*mpagent stop"):
        client.parse_reply(b"error kind=config message=x a:json=nope\n")


def test_string_errors_decode_without_json() -> None:
    """The client imports json only for an error with a typed detail, never for plain ones."""
    code = (
        "import sys\n"
        "from mpagent import client, errors\n"
        "def parse(line):\n"
        "    try: client.parse_reply(line)\n"
        "    except errors.MpagentError as exc: return exc.details\n"
        "assert parse(b'error mp_code=MP-200 kind=rejected message=x\\n') == {'mp_code': 'MP-200'}\n"
        "assert 'json' not in sys.modules, 'json imported for string details'\n"
        "assert parse(b'error locked:json=true kind=secret message=x\\n') == {'locked': True}\n"
        "assert 'json' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_token_reply_round_trip() -> None:
    """The reply to `get` carries the token, its expiry to the millisecond, scope, type and
    each warning, and the client reads them back as sent."""
    token = tokens.Token("eyJ.a.b", "Bearer", "a:b c:d", 1764420000.0, 1764420120.12345)
    fields = client.parse_reply(server.token_reply(token, ("w 1", "w%2")))
    assert fields == [
        ("token", "eyJ.a.b"),
        ("expires_at", "1764420120.123"),
        ("scope", "a:b c:d"),
        ("token_type", "Bearer"),
        ("warning", "w 1"),
        ("warning", "w%2"),
    ]


def test_ok_and_json_replies() -> None:
    """ok_reply sends its fields (none: a bare `ok`); json_reply one `json` field."""
    assert server.ok_reply() == b"ok\n"
    assert client.parse_reply(server.ok_reply([("pid", "7"), ("locked", "a b")])) == [
        ("pid", "7"),
        ("locked", "a b"),
    ]
    (field,) = client.parse_reply(server.json_reply({"unusable": {"dev": "x y"}}))
    assert field == ("json", '{"unusable": {"dev": "x y"}}')


def test_details_cannot_overwrite_kind_or_message() -> None:
    """A detail named kind does not change the error's class on the other side."""
    exc = errors.IssuerRejected("real", kind="config")
    assert errors.MpagentError.from_wire(exc.to_wire()).message == "real"
    assert type(errors.MpagentError.from_wire(exc.to_wire())) is errors.IssuerRejected


def test_a_bad_escape_is_refused_without_echoing_the_value() -> None:
    """A malformed value may be a password (unlock): the error names the mistake, not the
    characters around it."""
    with pytest.raises(protocol.MessageError) as caught:
        protocol.decode(b"mpagent/1 unlock profile=test keystore=s3%zZcret\n")
    assert "two hex digits" in str(caught.value)
    assert "zZ" not in str(caught.value) and "s3" not in str(caught.value)
