"""The transport interface shared by the Unix socket and the Windows named pipe: a Listener
serving `server.answer`, and `client.call` on the other end. The same cases run against
every transport this platform has (the Unix socket here; the pipe on Windows)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpagent import client, pipeserver, protocol, server
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
    return pipeserver.PipeListener(rf"\\.\pipe\mpagent-test-{directory.name}")


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


def raw_request(address: str, *pieces: bytes, pause: float = 0.0, end: bool = False) -> bytes:
    """Send `pieces` to the listener, `pause` seconds apart, then (with `end`) the end of the
    stream; return the whole reply."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(address)
        for i, piece in enumerate(pieces):
            if i and pause:
                threading.Event().wait(pause)
            s.sendall(piece)
        if end:
            s.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: s.recv(65536), b""))


UNIX_ONLY = pytest.mark.skipif(sys.platform == "win32", reason="raw Unix socket framing")


@UNIX_ONLY
def test_request_in_pieces(address: str) -> None:
    """A request whose newline comes in a later piece is answered once it has arrived."""
    reply = raw_request(address, b"mpagent/1 echo a", b"=1", b" b=2\n", pause=0.05)
    assert reply == b"ok a=1 b=2\n"


@UNIX_ONLY
def test_request_of_exactly_the_limit(address: str) -> None:
    """A request of MAX_REQUEST bytes before its newline is served, in one piece or two."""
    head = b"mpagent/1 echo a="
    value = b"x" * (protocol.MAX_REQUEST - len(head))
    assert raw_request(address, head + value + b"\n") == b"ok a=" + value + b"\n"
    assert raw_request(address, head, value + b"\n", pause=0.05) == b"ok a=" + value + b"\n"


@UNIX_ONLY
@pytest.mark.parametrize("pause", [0.0, 0.05], ids=["at once", "in pieces"])
def test_request_over_the_limit(address: str, pause: float) -> None:
    """One byte over MAX_REQUEST without a newline is refused with the limit named."""
    head = b"mpagent/1 echo a="
    value = b"x" * (protocol.MAX_REQUEST + 1 - len(head))
    reply = raw_request(address, head, value, pause=pause)
    words, fields = protocol.decode(reply)
    assert words == ["error"] and ("kind", "protocol") in fields
    assert protocol.first(fields, "message") == f"request larger than {protocol.MAX_REQUEST} bytes"


@UNIX_ONLY
@pytest.mark.parametrize("sent", [b"", b"mpagent/1 echo a=1"], ids=["nothing", "no newline"])
def test_request_ended_before_its_newline(address: str, sent: bytes) -> None:
    """A client that ends its stream before the newline gets an error saying so."""
    words, fields = protocol.decode(raw_request(address, sent, end=True))
    assert words == ["error"]
    assert protocol.first(fields, "message") == "the request ended before its newline"


def test_read_request_framing() -> None:
    """The pipe server's reader (server.read_request, blocking): the line and nothing after
    it; the end of the stream before the newline, and a request over the limit, as errors."""
    cases = [
        (b"mpagent/1 echo\nafter", b"mpagent/1 echo\n"),
        (b"mpagent/1 echo", "the request ended before its newline"),
        (b"x" * (protocol.MAX_REQUEST + 1), f"request larger than {protocol.MAX_REQUEST} bytes"),
    ]
    for sent, expected in cases:
        left, right = socket.socketpair()
        with left, right:
            left.sendall(sent)
            left.shutdown(socket.SHUT_WR)
            got = server.read_request(right.recv)
        if isinstance(expected, bytes):
            assert got == expected
        else:
            assert isinstance(got, ProtocolError) and str(got) == expected


def fake_agent(tmp: Path, reply: bytes) -> str:
    """A socket that answers one client with `reply` and closes: an agent gone wrong."""
    path = str(tmp / "fake.sock")
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(path)
    listening.listen(1)

    def serve() -> None:
        with listening, listening.accept()[0] as conn:
            conn.recv(65536)
            conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return path


@UNIX_ONLY
def test_reply_cut_short(tmp_path: Path) -> None:
    """A reply without its newline (the agent died while writing) is not taken for a
    shorter one: a protocol error that says what happened and what to do."""
    address = fake_agent(tmp_path, b"ok token=eyJhbGciOi")
    with pytest.raises(ProtocolError, match=r"closed the connection before its reply was co"):
        client.call(address, "get")


@UNIX_ONLY
def test_reply_over_the_limit(tmp_path: Path) -> None:
    """A reply longer than MAX_REPLY without a newline is refused, not buffered forever."""
    address = fake_agent(tmp_path, b"ok json=" + b"x" * protocol.MAX_REPLY)
    with pytest.raises(ProtocolError, match="reply is larger than the protocol allows"):
        client.call(address, "status")


HEAVY = {"asyncio", "socket", "selectors", "typing", "json", "re", "threading", "ctypes"}
PIPE = r"\\.\pipe\mpagent-nobody"

# The Windows client half, on Linux: sys.platform says win32, and pywin32 is stood in for by
# modules whose CreateFile finds no pipe (what Windows says when no agent runs). Prints what
# the agent-less call said, then every module imported.
AS_WINDOWS = """
import sys, types
sys.platform = "win32"
before = set(sys.modules)
import mpagent.client, mpagent.pipeclient
if sys.argv[1] == "call":
    class error(Exception):
        def __init__(self, winerror, strerror):
            self.winerror, self.strerror = winerror, strerror
    def create_file(*args):
        raise error(2, "The system cannot find the file specified.")
    stubs = {
        "pywintypes": types.SimpleNamespace(error=error),
        "win32file": types.SimpleNamespace(
            GENERIC_READ=1, GENERIC_WRITE=2, OPEN_EXISTING=3, CreateFile=create_file
        ),
        "win32pipe": types.SimpleNamespace(),
    }
    sys.modules.update(stubs)
    before |= set(stubs)
    try:
        mpagent.client.call(sys.argv[2], "get")
    except mpagent.errors.AgentNotRunning as exc:
        print(exc.details.get("absent"), exc)
print(" ".join(sorted(set(sys.modules) - before)))
"""


def as_windows(*argv: str) -> list[str]:
    # -S: without site, nothing heavy is loaded before the script looks (site imports re,
    # typing and more on some interpreters), so every module in the list is the client's.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-S", "-c", AS_WINDOWS, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_pipe_client_half_imports_light() -> None:
    """On Windows `import mpagent.client` and `mpagent.pipeclient` bring in no asyncio,
    socket, typing, json, re, threading or ctypes, and no mpagent module but the hot ones."""
    (imported,) = as_windows("import")
    modules = set(imported.split())
    assert not modules & HEAVY
    assert {m for m in modules if m.startswith("mpagent")} == {
        "mpagent", "mpagent.client", "mpagent.errors", "mpagent.pipeclient", "mpagent.protocol",
    }  # fmt: skip


def test_pipe_client_call_with_no_agent() -> None:
    """On Windows a call goes through the pipe client: with no pipe there it says no agent
    listens and how to start one (absent, so the CLI may start one), still without asyncio,
    the server half or any other heavy module."""
    said, imported = as_windows("call", PIPE)
    assert said == f"True no agent is listening on {PIPE}; start one with `mpagent agent`"
    modules = set(imported.split())
    assert not modules & (HEAVY | {"mpagent.server", "mpagent.pipeserver"})


def test_owner_only_dacl() -> None:
    """The pipe's DACL grants the user's SID alone, protected from inheritance."""
    assert pipeserver.owner_only_sddl("S-1-5-21-1-2-3-1001") == "D:P(A;;GA;;;S-1-5-21-1-2-3-1001)"
    with pytest.raises(ValueError, match="not a SID"):
        pipeserver.owner_only_sddl("Everyone")


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
