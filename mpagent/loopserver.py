"""The connections of the agent's loopback HTTP listeners (the token bridge, the
texas-compatible endpoint): each peer's uid checked before a byte is read, connections counted
per uid (loopback.Slots), the request read within the caps (loopback.Request), one answer,
then closed. A subclass says whom it answers (`allowed`) and what (`answer`), and what a
refused peer hears (`refused_reply`: by default nothing, the connection reset)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping

from mpagent.altinn import is_loopback
from mpagent.errors import ConfigError
from mpagent.logs import RateLimit
from mpagent.loopback import (
    MAX_CLIENTS,
    MAX_HEAD,
    Refusal,
    Request,
    Slot,
    Slots,
    listen_text,
    render,
)  # fmt: skip
from mpagent.peers import PEER_CHECK, describe, holder, peer

# Unexpected errors serving a connection: a few tracebacks a minute, then a count (a peer
# that can trigger one must not fill the log).
bug_log = logging.getLogger(f"{__name__}.errors")
bug_log.addFilter(RateLimit(burst=3))
# Refused connections being answered at once (refused_reply), at most; beyond, reset.
MAX_REFUSING = 16
REFUSE_LINGER = 1.0  # s a refused peer's request is read (and discarded) after the answer


async def bind(
    section: str,
    listen: tuple[str, int],
    serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    taken_note: str = "",
) -> asyncio.Server:
    """Listen on `listen` for `section` ("[bridge]", "[http]"), loopback only; ConfigError
    naming the section when it cannot: a port taken says by whom (`taken_note` says what
    that means), and a name such as "localhost" must resolve to loopback addresses only."""
    try:
        server = await asyncio.start_server(serve, *listen, limit=MAX_HEAD)
    except OSError as exc:
        where = listen_text(listen)
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"{section} listen {where} is taken by {describe(holder(listen))}; "
                f"{taken_note}stop it, or set {section} listen to a free port; then "
                "`mpagent stop` and start the agent again"
            ) from exc
        raise ConfigError(f"{section} cannot listen on {where}: {exc.strerror}") from exc
    if not all(is_loopback(s.getsockname()[0]) for s in server.sockets):
        server.close()
        raise ConfigError(f"{section} listen {listen}: not only loopback addresses")
    return server


class LoopbackServer:
    """Serves one request per connection. Class attributes of a subclass: `name` (the prefix
    of its log lines), `log` and `peer_log` (refusals; rate-limited), `routes` (the method each
    path takes) and `example` (a URL shown when a Host is refused)."""

    name = "loopback"
    log = logging.getLogger(__name__)
    peer_log = logging.getLogger(f"{__name__}.peers")
    routes: Mapping[str, str] = {}
    example = "http://127.0.0.1:PORT/"

    def __init__(self, read_timeout: float) -> None:
        self.read_timeout, self.slots = read_timeout, Slots()
        self.uid = os.getuid() if PEER_CHECK else None
        self.refused: dict[int | None, int] = {}  # connections refused, by peer uid
        self.server: asyncio.AbstractServer | None = None
        self._refusing = 0  # refused connections being answered (refused_reply)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def allowed(self, uid: int) -> bool:
        """Whether a connection of `uid` is answered: the agent's user's only, unless a
        subclass says otherwise."""
        return uid == self.uid

    def answers(self) -> str:
        """Whom it answers, for the log line of a refused connection."""
        return f"only uid {self.uid}, the agent's user"

    async def answer(self, request: Request) -> bytes:
        """The whole response to a request that passed the screen; may raise Refusal."""
        raise NotImplementedError

    def refusal_headers(self, refusal: Refusal) -> Mapping[str, str]:
        return refusal.headers

    def refused_reply(self, uid: int | None) -> bytes | None:
        """The fixed answer for a peer the uid check refuses, or None: the connection reset."""
        return None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = ":".join(map(str, (writer.get_extra_info("peername") or ("?", "?"))[:2]))
        slot, refused = self._admit(writer, address)
        if slot is None:  # a user not answered, or no room: no byte of the request is parsed
            reply = self.refused_reply(refused[1]) if refused else None
            if reply is None or self._refusing >= MAX_REFUSING:
                writer.transport.abort()
            else:
                await self._refuse(reader, writer, reply)
            return
        try:
            reply = await self._reply(reader, address, slot)
            if not slot.closed:
                writer.write(reply)
                await asyncio.wait_for(writer.drain(), self.read_timeout)
        except (ConnectionError, TimeoutError) as exc:
            self.log.debug("%s: %s went away: %s", self.name, address, type(exc).__name__)
        except Exception:  # connection boundary: a bug here must not reach the agent
            bug_log.exception("%s: unexpected error serving %s", self.name, address)
        finally:
            self.slots.release(slot)
            writer.close()  # the reply is small: the kernel takes it even from a peer not reading

    async def _refuse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: bytes
    ) -> None:
        """`reply` without parsing the request: written, the write side shut, and what the
        peer sends discarded for up to REFUSE_LINGER s, so that closing with its request
        unread does not reset the connection before it reads the answer."""
        self._refusing += 1
        try:
            async with asyncio.timeout(REFUSE_LINGER):
                writer.write(reply)
                await writer.drain()
                if writer.can_write_eof():
                    writer.write_eof()
                while await reader.read(MAX_HEAD):
                    pass
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self._refusing -= 1
            writer.close()

    def _admit(
        self, writer: asyncio.StreamWriter, address: str
    ) -> tuple[Slot | None, tuple[bool, int | None] | None]:
        """A slot for a connection of a user answered (of anyone, where the platform cannot
        tell), or None and, when the uid check refused it, (True, the peer's uid); each kind
        of refusal logged once a minute at most."""
        uid = None  # where the platform cannot tell, all peers share one count
        if PEER_CHECK:
            here, there = writer.get_extra_info("sockname"), writer.get_extra_info("peername")
            found = peer(here, there) if here and there else None
            uid = found.uid if found else None
            if uid is None or not self.allowed(uid):
                self.refused[uid] = self.refused.get(uid, 0) + 1
                who = "a peer whose uid cannot be found" if uid is None else f"uid {uid}"
                self.peer_log.warning(
                    "%s: refused a connection from %s; it answers %s",
                    self.name,
                    who,
                    self.answers(),
                )
                return None, (True, uid)
        slot = self.slots.admit(uid, time.monotonic(), writer.transport.abort)
        if slot is None:
            self.peer_log.warning(
                "%s: %d connections busy; dropping %s", self.name, MAX_CLIENTS, address
            )
        return slot, None

    async def _reply(self, reader: asyncio.StreamReader, address: str, slot: Slot) -> bytes:
        try:
            return await self.answer(await self._read(reader, slot))
        except Refusal as refusal:
            if not slot.closed:  # closed to make room: it hears nothing, nor does the log
                self.log.info(
                    "%s: %d %s to %s: %s",
                    self.name,
                    refusal.status,
                    refusal.error,
                    address,
                    refusal,
                )
            return render(refusal.status, refusal.document(), self.refusal_headers(refusal))

    async def _read(self, reader: asyncio.StreamReader, slot: Slot) -> Request:
        try:
            async with asyncio.timeout(self.read_timeout):
                request = Request(await reader.readuntil(b"\r\n\r\n"))
                slot.idle = False
                request.body = await reader.readexactly(request.screen(self.routes, self.example))
                return request
        except asyncio.LimitOverrunError:
            raise Refusal(f"request line and headers exceed {MAX_HEAD} bytes", 431) from None
        except asyncio.IncompleteReadError:
            raise Refusal("the request ended early") from None
        except TimeoutError:
            raise Refusal(f"no complete request within {self.read_timeout:g} s", 408) from None
