"""The blocking client for the agent's socket. Stdlib only, and `_socket` rather than
`socket`: the Python wrapper pulls in enum and selectors, which cost more than the rest of
`mpagent get` together."""

import _socket
import sys
import time

from mpagent import protocol
from mpagent.errors import AgentNotRunning, MpagentError, ProtocolError

Reply = protocol.Fields

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    class Channel(Protocol):
        """What both transports give the client: a Unix socket or a Windows pipe."""

        def sendall(self, data: bytes, /) -> None: ...
        def recv(self, size: int, /) -> bytes: ...
        def close(self) -> None: ...


def connect(address: str, timeout: float) -> "Channel":
    """A connected channel to the agent: a Unix socket, or a named pipe on Windows."""
    if sys.platform == "win32":
        from mpagent import pipeclient

        return pipeclient.connect(address, timeout)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        _connect_patiently(sock, address, timeout)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
        sock.close()
        raise AgentNotRunning(
            f"no agent is listening on {address}; start one with `mpagent agent`", absent=True
        ) from exc
    except TimeoutError:
        sock.close()
        raise AgentNotRunning(
            f"the agent at {address} is too busy to accept within {timeout:g} s", connected=True
        ) from None
    except OSError as exc:
        sock.close()
        raise AgentNotRunning(
            f"cannot connect to the agent at {address}: {exc.strerror or exc}"
        ) from exc
    return sock


def _connect_patiently(sock: "_socket.socket", address: str, timeout: float) -> None:
    """A full listen backlog (EAGAIN) means a busy agent, not a missing one: retry until
    the timeout instead of reporting "no agent" (which would start a second one)."""
    give_up = time.monotonic() + timeout
    while True:
        try:
            sock.connect(address)
            return
        except BlockingIOError:
            if time.monotonic() > give_up:
                raise TimeoutError from None
            time.sleep(0.005)


def call(
    address: str, verb: str, fields: protocol.Fields | None = None, timeout: float = 30.0
) -> Reply:
    """Send one request and return the fields of an `ok` reply; an `error` reply is raised
    as the same MpagentError class the agent raised."""
    channel = connect(address, timeout)
    try:
        channel.sendall(protocol.encode([protocol.VERSION, verb], fields or []))
        line = protocol.read_line(channel.recv, protocol.MAX_REPLY)
    except protocol.MessageError:
        raise ProtocolError("the agent's reply is larger than the protocol allows") from None
    except TimeoutError:
        raise AgentNotRunning(
            f"the agent at {address} did not answer within {timeout:g} s", connected=True
        ) from None
    except OSError as exc:
        raise AgentNotRunning(
            f"the agent at {address} closed the connection: {exc.strerror or exc}"
        ) from None
    finally:
        channel.close()
    if not line.endswith(b"\n"):  # a reply cut short must not pass for a shorter one
        raise ProtocolError(
            f"the agent at {address} closed the connection before its reply was complete; "
            "see its log, and restart it with `mpagent stop` if this persists"
        )
    return parse_reply(line)


def parse_reply(line: bytes) -> Reply:
    """The fields of an `ok` reply line; an `error` reply is raised as its MpagentError."""
    try:
        words, reply = protocol.decode(line)
        if words == ["error"]:
            raise MpagentError.from_wire(protocol.from_details(reply))
    except protocol.MessageError as exc:
        raise ProtocolError(
            f"the agent sent a malformed reply ({exc}); restart it with `mpagent stop`"
        ) from None
    if words == ["ok"]:
        return reply
    raise ProtocolError(
        f"the agent sent an unknown reply {words[:1]}; is it another mpagent version?"
    )
