"""The agent under systemd: the socket it passes (sd_listen_fds), the clients that wait in it
when the agent cannot start, and the state it asks for (sd_notify). Each is a no-op when
systemd did not start us."""

from __future__ import annotations

import contextlib
import os
import socket

from mpagent import protocol, server
from mpagent.errors import MpagentError

SD_LISTEN_FDS_START = 3
QUEUED_CLIENTS_WAIT = 0.5


def inherited_listener() -> socket.socket | None:
    """sd_listen_fds(3): a listening socket passed as fd 3, if LISTEN_PID names us."""
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS", "0")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    if pid != str(os.getpid()) or not count.isdigit() or int(count) < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise MpagentError("the socket passed by the service manager is not a Unix stream socket")
    sock.set_inheritable(False)
    return sock


def refuse_queued_clients(exc: MpagentError) -> None:
    """Under socket activation the clients that made systemd start us wait in the inherited
    socket's queue; answer them with the error at once instead of leaving them to time out.
    (With RestartPreventExitStatus=78 the next `get` starts us again and gets the same.)"""
    sock = inherited_listener()
    if sock is None:
        return
    sock.settimeout(QUEUED_CLIENTS_WAIT)
    with sock:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # nobody else is waiting
                return
            with conn:
                if server.peer_uid(conn) != os.getuid():
                    continue
                conn.settimeout(QUEUED_CLIENTS_WAIT)
                # Whatever it sent (a request, too much, nothing in time), it gets the error;
                # one that has left needs no answer.
                with contextlib.suppress(OSError):
                    with contextlib.suppress(OSError, protocol.MessageError):
                        protocol.read_line(conn.recv, protocol.MAX_REQUEST)
                    conn.sendall(server.error_reply(exc))


def notify(message: str) -> None:
    """sd_notify(3): tell systemd about our state when it asked (NOTIFY_SOCKET)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        sock.sendto(message.encode(), address)
