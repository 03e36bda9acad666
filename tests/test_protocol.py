"""The wire protocol: round trips, malformed lines, and every error class across the socket."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpagent import errors, protocol

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


@pytest.mark.parametrize(
    "cls",
    [
        errors.MpagentError,
        errors.ConfigError,
        errors.KeystoreError,
        errors.SecretUnavailable,
        errors.IssuerRejected,
        errors.IssuerUnavailable,
        errors.AgentNotRunning,
        errors.AlreadyRunning,
        errors.ProtocolError,
    ],
)
def test_every_error_class_survives_the_socket(cls: type[errors.MpagentError]) -> None:
    """Each error class crosses the wire as the same class, message and exit code."""
    exc = cls("what went wrong; what to do", mp_code="MP-200", error="invalid_scope")
    line = protocol.encode(["error"], [(k, str(v)) for k, v in exc.to_wire().items()])
    words, fields = protocol.decode(line)
    back = errors.MpagentError.from_wire(dict(fields))
    assert words == ["error"] and type(back) is cls
    assert str(back) == str(exc) and back.exit_code == exc.exit_code
    assert back.details == {"mp_code": "MP-200", "error": "invalid_scope"}


def test_details_cannot_overwrite_kind_or_message() -> None:
    """A detail named kind does not change the error's class on the other side."""
    exc = errors.IssuerRejected("real", kind="config")
    assert errors.MpagentError.from_wire(exc.to_wire()).message == "real"
    assert type(errors.MpagentError.from_wire(exc.to_wire())) is errors.IssuerRejected
