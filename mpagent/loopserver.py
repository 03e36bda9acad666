"""The connections of the agent's loopback HTTP listeners (the token bridge, the
texas-compatible endpoint): each peer's uid checked before a byte is read, connections counted
per uid (loopback.Slots), the request read within the caps (loopback.Request), one answer,
then closed. A subclass says whom it answers (`allowed`) and what (`answer`)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping

from mpagent.loopback import MAX_CLIENTS, MAX_HEAD, Refusal, Request, Slot, Slots, render
from mpagent.peers import PEER_CHECK, peer


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

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = ":".join(map(str, (writer.get_extra_info("peername") or ("?", "?"))[:2]))
        slot = self._admit(writer, address)
        if slot is None:  # a user not answered, or no room: closed before a byte is read
            writer.transport.abort()
            return
        try:
            reply = await self._reply(reader, address, slot)
            if not slot.closed:
                writer.write(reply)
                await asyncio.wait_for(writer.drain(), self.read_timeout)
        except (ConnectionError, TimeoutError) as exc:
            self.log.debug("%s: %s went away: %s", self.name, address, type(exc).__name__)
        except Exception:  # connection boundary: a bug here must not reach the agent
            self.log.exception("%s: unexpected error serving %s", self.name, address)
        finally:
            self.slots.release(slot)
            writer.close()  # the reply is small: the kernel takes it even from a peer not reading

    def _admit(self, writer: asyncio.StreamWriter, address: str) -> Slot | None:
        """A slot for a connection of a user answered (of anyone, where the platform cannot
        tell), or None; each kind of refusal logged once a minute at most."""
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
                return None
        slot = self.slots.admit(uid, time.monotonic(), writer.transport.abort)
        if slot is None:
            self.peer_log.warning(
                "%s: %d connections busy; dropping %s", self.name, MAX_CLIENTS, address
            )
        return slot

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
