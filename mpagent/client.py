"""The blocking client for the agent's socket. Stdlib only, and `_socket` rather than
`socket`: the Python wrapper pulls in enum and selectors, which cost more than the rest of
`mpagent get` together."""

import _socket

from mpagent import protocol
from mpagent.errors import AgentNotRunning, MpagentError, ProtocolError

Reply = protocol.Fields


def call(
    path: str, verb: str, fields: protocol.Fields | None = None, timeout: float = 30.0
) -> Reply:
    """Send one request and return the fields of an `ok` reply; an `error` reply is raised
    as the same MpagentError class the agent raised."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            raise AgentNotRunning(
                f"no agent is listening on {path}; start one with `mpagent agent`"
            ) from exc
        except OSError as exc:
            raise AgentNotRunning(
                f"cannot connect to the agent at {path}: {exc.strerror or exc}"
            ) from exc
        try:
            sock.sendall(protocol.encode([protocol.VERSION, verb], fields or []))
            line = _read_line(sock)
        except TimeoutError:
            raise AgentNotRunning(
                f"the agent at {path} did not answer within {timeout:g} s"
            ) from None
        except OSError as exc:
            raise AgentNotRunning(
                f"the agent at {path} closed the connection: {exc.strerror or exc}"
            ) from None
    finally:
        sock.close()
    try:
        words, reply = protocol.decode(line)
    except protocol.MessageError as exc:
        raise ProtocolError(
            f"the agent sent a malformed reply ({exc}); restart it with `mpagent stop`"
        ) from None
    if words == ["ok"]:
        return reply
    if words == ["error"]:
        raise MpagentError.from_wire(dict(reply))
    raise ProtocolError(
        f"the agent sent an unknown reply {words[:1]}; is it another mpagent version?"
    )


def _read_line(sock: _socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n"):
            break
        if size > protocol.MAX_REPLY:
            raise ProtocolError("the agent's reply is larger than the protocol allows")
    return b"".join(chunks)
