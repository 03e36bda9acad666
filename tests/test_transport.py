"""The transport interface shared by the Unix socket and the Windows named pipe: a Listener
serving `server.answer`, and `client.call` on the other end. The same cases run against
every transport this platform has (the Unix socket here; the pipe on Windows)."""

from __future__ import annotations

import asyncio
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpagent import client, protocol, server, winpipe
from mpagent.errors import IssuerRejected, MpagentError, ProtocolError


def handler(words: list[str], fields: protocol.Fields) -> bytes | object:
    """A toy agent: echo, a rejection, a slow answer, and a bug."""
    if words == ["echo"]:
        return protocol.encode(["ok"], fields)
    if words == ["reject"]:
        raise IssuerRejected("Maskinporten refused", mp_code="MP-200")
    if words == ["slow"]:

        async def later() -> bytes:
            await asyncio.sleep(0.05)
            return protocol.encode(["ok"], [("waited", "yes")])

        return later()
    if words == ["bug"]:

        async def broken() -> bytes:
            raise ZeroDivisionError

        return broken()
    raise ProtocolError(f"unknown request {words}")


def unix_listener(directory: Path) -> server.Listener:
    return server.UnixListener(server.bind_private(directory / "run" / "t.sock"), owned=True)


def pipe_listener(directory: Path) -> server.Listener:
    return winpipe.PipeListener(rf"\\.\pipe\mpagent-test-{directory.name}")


TRANSPORTS = [pipe_listener] if sys.platform == "win32" else [unix_listener]


@pytest.fixture(params=TRANSPORTS, ids=lambda f: f.__name__)
def address(request: pytest.FixtureRequest) -> Iterator[str]:
    directory = Path(
        tempfile.mkdtemp(prefix="mpt-", dir="/tmp" if sys.platform != "win32" else None)
    )
    loop = asyncio.new_event_loop()
    listener: server.Listener = request.param(directory)
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(listener.start(handler))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(10)
    yield listener.address
    loop.call_soon_threadsafe(listener.close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_ok_reply_round_trip(address: str) -> None:
    """A request's fields come back through the listener and the client unchanged."""
    assert client.call(address, "echo", [("a", "1 2%"), ("a", "ø")]) == [("a", "1 2%"), ("a", "ø")]


def test_error_reply_is_the_same_class(address: str) -> None:
    """An error raised by the handler reaches the client as the same class and details."""
    with pytest.raises(IssuerRejected, match="Maskinporten refused") as info:
        client.call(address, "reject")
    assert info.value.mp_code == "MP-200" and info.value.exit_code == 77


def test_awaited_reply(address: str) -> None:
    """A reply that has to wait is awaited on the loop and then sent."""
    assert client.call(address, "slow") == [("waited", "yes")]


def test_handler_bug_becomes_an_error_reply(address: str) -> None:
    """An unexpected exception in a handler answers that client with an error, no crash."""
    with pytest.raises(MpagentError, match="internal error in the agent: ZeroDivisionError"):
        client.call(address, "bug")
    assert client.call(address, "echo") == []


def test_unknown_request(address: str) -> None:
    """A request the handler does not know gets a protocol error."""
    with pytest.raises(ProtocolError, match="unknown request"):
        client.call(address, "explode")


@pytest.mark.skipif(sys.platform == "win32", reason="raw socket framing; the pipe has its own")
def test_wrong_version_and_garbage(address: str) -> None:
    """Another protocol version and bytes that are not a message get protocol errors."""
    for data in (b"mpagent/2 echo\n", b"\x00\xff\n"):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(address)
            s.sendall(data)
            assert s.recv(1000).startswith(b"error kind=protocol")


def test_owner_only_dacl() -> None:
    """The pipe's DACL grants the user's SID alone, protected from inheritance."""
    assert winpipe.owner_only_sddl("S-1-5-21-1-2-3-1001") == "D:P(A;;GA;;;S-1-5-21-1-2-3-1001)"
    with pytest.raises(ValueError, match="not a SID"):
        winpipe.owner_only_sddl("Everyone")


@pytest.mark.skipif(sys.platform == "win32", reason="Unix sockets only")
def test_close_leaves_a_newer_socket_alone(tmp_path: Path) -> None:
    """Stopping removes our socket file, but not one another agent bound there since."""
    path = Path(tempfile.mkdtemp(prefix="mpt-", dir="/tmp")) / "run" / "t.sock"
    ours = server.UnixListener(server.bind_private(path), owned=True)
    ours.close()
    assert not path.exists()
    mine = server.UnixListener(server.bind_private(path), owned=True)
    path.unlink()  # a quick restart elsewhere replaced the file
    newer = socket.socket(socket.AF_UNIX)
    newer.bind(str(path))
    mine.close()
    assert path.exists()
    newer.close()
