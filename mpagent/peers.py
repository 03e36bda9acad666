"""Who is at the other end of a loopback TCP connection: the peer socket's owner (uid) and
the processes holding it, and who holds a port. The token bridge answers only its own user's
connections with this, and names the process squatting its port.

Linux only (PEER_CHECK): asked of the kernel by address with sock_diag(7) netlink, where the
sandbox allows netlink, else read from /proc/net/tcp{,6}; processes from /proc/PID/fd, and
user names from pwd. Elsewhere the platform gives no such answer and callers say so.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Any

PROC_NET = {"tcp": "/proc/net/tcp", "tcp6": "/proc/net/tcp6"}
PEER_CHECK = sys.platform.startswith("linux") and os.path.exists(PROC_NET["tcp"])
_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY = 4, 20  # linux/netlink.h, linux/sock_diag.h


@dataclass(frozen=True)
class Peer:
    """A TCP socket of this machine: its owner's uid, and its inode (0 while it waits in a
    listen queue, not yet accepted)."""

    uid: int
    inode: int

    def pids(self) -> list[int]:
        """The processes that hold it, as far as /proc shows them to us (every process's to
        root, only our own to anyone else)."""
        target, found = f"socket:[{self.inode}]", []
        for pid in filter(str.isdigit, os.listdir("/proc") if self.inode else ()):
            with contextlib.suppress(OSError):
                fds = os.listdir(f"/proc/{pid}/fd")
                if any(_link(f"/proc/{pid}/fd/{fd}") == target for fd in fds):
                    found.append(int(pid))
        return found


def _link(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def proc_address(host: str, port: int) -> dict[str, str]:
    """How /proc/net/tcp and tcp6 spell host:port: the address as 32-bit words in this
    machine's byte order, in hex, and the port. An IPv4 address appears in tcp6 too, as
    ::ffff:a.b.c.d (a dual-stack socket's view of it)."""
    address = ipaddress.ip_address(host)
    v4 = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else address
    forms = {}
    if v4 is not None:
        forms["tcp"] = v4.packed
        address = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + v4.packed)
    forms["tcp6"] = address.packed
    return {
        table: "".join(f"{w:08X}" for w in struct.unpack(f"={len(raw) // 4}I", raw))
        + f":{port:04X}"
        for table, raw in forms.items()
    }


def _table(table: str) -> str:
    try:
        with open(PROC_NET[table], encoding="ascii") as f:
            return f.read()
    except OSError:
        return ""


def peer(local: tuple[Any, ...], remote: tuple[Any, ...]) -> Peer | None:
    """The socket at the other end of our connection from `local` to `remote`: the one whose
    own local address is our remote and whose remote is our local; None if there is none
    (it is gone). Asked of the kernel by its address (sock_diag), where netlink is allowed;
    else found in /proc/net/tcp{,6}, which the kernel writes out whole on every read: with
    3,300 sockets in TIME_WAIT (any user's connection loop leaves them) that took 13 ms."""
    try:
        return peer_by_netlink(local, remote)
    except OSError:  # no netlink here (a sandbox, RestrictAddressFamilies)
        return peer_by_proc(local, remote)


def peer_by_netlink(local: tuple[Any, ...], remote: tuple[Any, ...]) -> Peer | None:
    """sock_diag(7): one SOCK_DIAG_BY_FAMILY request for the exact socket (no dump), answered
    with an inet_diag_msg holding its uid and inode, or an error (ENOENT: none)."""
    (mine, my_port), (theirs, their_port) = local[:2], remote[:2]
    family = socket.AF_INET6 if ":" in theirs else socket.AF_INET
    src, dst = (ipaddress.ip_address(a).packed.ljust(16, b"\0") for a in (theirs, mine))
    sockid = struct.pack("!HH16s16s", their_port, my_port, src, dst)
    sockid += struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)  # any interface, no cookie
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, 1, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as link:
        link.settimeout(1.0)
        link.sendto(header + request, (0, 0))
        reply = link.recv(4096)
    if len(reply) < 88 or struct.unpack_from("=H", reply, 4)[0] != _SOCK_DIAG_BY_FAMILY:
        return None
    uid, inode = struct.unpack_from("=II", reply, 16 + 64)  # inet_diag_msg.idiag_uid, _inode
    return Peer(uid, inode)


def peer_by_proc(local: tuple[Any, ...], remote: tuple[Any, ...]) -> Peer | None:
    """The same, from /proc/net/tcp{,6}: one search of one or two files."""
    ours, theirs = proc_address(*local[:2]), proc_address(*remote[:2])
    for table in (t for t in PROC_NET if t in ours and t in theirs):
        text = _table(table)
        at = text.find(f" {theirs[table]} {ours[table]} ")
        if at >= 0:
            row = text[text.rfind("\n", 0, at) + 1 : text.find("\n", at)].split()
            return Peer(int(row[7]), int(row[9]))
    return None


def holder(listen: tuple[str, int]) -> Peer | None:
    """The socket that holds `listen`'s port (listening, if one does) at its address or at
    the wildcard address; None if /proc shows none."""
    host, port = listen
    hosts = ["127.0.0.1", "::1"] if host == "localhost" else [host]
    wanted: dict[str, set[str]] = {table: set() for table in PROC_NET}
    for address in [*hosts, "0.0.0.0", "::"]:  # noqa: S104 - what to look for, not a bind
        for table, spelled in proc_address(address, port).items():
            wanted[table].add(spelled)
    rows = [
        row
        for table in PROC_NET
        for row in (line.split() for line in _table(table).splitlines()[1:])
        if len(row) > 9 and row[1] in wanted[table]
    ]
    rows.sort(key=lambda row: row[3] != "0A")  # TCP_LISTEN first
    return Peer(int(rows[0][7]), int(rows[0][9])) if rows else None


def describe(found: Peer | None) -> str:
    """'uid 1001 (user mallory), pid 4242', as far as this process can see it."""
    if found is None:
        return "another process (this system does not say whose)"
    import pwd  # Unix only, as /proc is

    try:
        name = f" (user {pwd.getpwuid(found.uid).pw_name})"
    except KeyError:
        name = ""
    pids = found.pids()
    if not pids:
        return f"uid {found.uid}{name}; its pid is not visible to you"
    return f"uid {found.uid}{name}, pid{'s' if len(pids) > 1 else ''} {', '.join(map(str, pids))}"
