"""The server half of the Windows transport: the agent's named pipe, private to its user.

- The pipe is created with an explicit DACL granting access to the user's SID only (the
  default DACL lets Everyone read), with PIPE_REJECT_REMOTE_CLIENTS, and the first instance
  with FILE_FLAG_FIRST_PIPE_INSTANCE, so an agent cannot start on a name someone else holds.
- Requests are read with `server.read_request` and answered by `server.answer` on the agent's
  event loop, the same code the Unix socket uses; the pipe side is blocking I/O on threads,
  one per connection.

The client half is mpagent.pipeclient. Not yet run on real Windows: the pure parts are tested
on Linux (see tests/test_transport.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from mpagent.errors import AlreadyRunning, MpagentError
from mpagent.pipeclient import PipeChannel, connect, current_user_sid
from mpagent.server import Handler, answer, error_reply, read_request

log = logging.getLogger(__name__)

PIPE_REJECT_REMOTE_CLIENTS = 0x00000008
FILE_FLAG_FIRST_PIPE_INSTANCE = 0x00080000
ERROR_ACCESS_DENIED = 5
ERROR_PIPE_CONNECTED = 535
BUFFER = 65536
READ_TIMEOUT = 5.0


def owner_only_sddl(sid: str) -> str:
    """A protected DACL with one ACE: generic-all for `sid`. No inheritance, no Everyone."""
    if not sid.startswith("S-1-"):
        raise ValueError(f"not a SID string: {sid!r}")
    return f"D:P(A;;GA;;;{sid})"


def _security_attributes() -> Any:
    import win32security

    sid = win32security.ConvertSidToStringSid(current_user_sid())
    attributes = win32security.SECURITY_ATTRIBUTES()
    attributes.SECURITY_DESCRIPTOR = (
        win32security.ConvertStringSecurityDescriptorToSecurityDescriptor(
            owner_only_sddl(sid), win32security.SDDL_REVISION_1
        )
    )
    attributes.bInheritHandle = False
    return attributes


class PipeListener:
    """The agent's side; implements server.Listener."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._closed = threading.Event()
        self._active = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handler: Handler | None = None

    async def start(self, handler: Handler) -> None:
        self._loop, self._handler = asyncio.get_running_loop(), handler
        first = self._create(first=True)
        threading.Thread(
            target=self._accept, args=(first,), daemon=True, name="mpagent-pipe"
        ).start()

    def close(self) -> None:
        self._closed.set()
        try:  # wake the accept thread, which is blocked in ConnectNamedPipe
            connect(self.address, 1.0).close()
        except MpagentError:
            pass

    def busy(self) -> bool:
        return self._active > 0

    def _create(self, *, first: bool) -> Any:
        import pywintypes
        import win32pipe

        mode = win32pipe.PIPE_ACCESS_DUPLEX | (FILE_FLAG_FIRST_PIPE_INSTANCE if first else 0)
        kind = win32pipe.PIPE_TYPE_BYTE | win32pipe.PIPE_READMODE_BYTE | win32pipe.PIPE_WAIT
        try:
            return win32pipe.CreateNamedPipe(
                self.address, mode, kind | PIPE_REJECT_REMOTE_CLIENTS,
                win32pipe.PIPE_UNLIMITED_INSTANCES, BUFFER, BUFFER, 0, _security_attributes(),
            )  # fmt: skip
        except pywintypes.error as exc:
            if first and exc.winerror == ERROR_ACCESS_DENIED:
                raise AlreadyRunning(
                    f"{self.address} is already taken: another agent (or another user) holds it"
                ) from None
            raise

    def _accept(self, pipe: Any) -> None:
        import pywintypes
        import win32pipe

        while not self._closed.is_set():
            try:
                win32pipe.ConnectNamedPipe(pipe, None)
            except pywintypes.error as exc:
                if exc.winerror != ERROR_PIPE_CONNECTED:
                    log.warning("pipe accept failed: %s", exc.strerror)
                    continue
            if self._closed.is_set():
                break
            following = self._create(first=False)
            threading.Thread(target=self._serve, args=(pipe,), daemon=True).start()
            pipe = following
        pipe.Close()

    def _serve(self, pipe: Any) -> None:
        import win32file
        import win32pipe

        with self._lock:
            self._active += 1
        timer = threading.Timer(READ_TIMEOUT, lambda: win32pipe.DisconnectNamedPipe(pipe))
        timer.start()
        try:
            line = read_request(PipeChannel(pipe).recv)
            reply = self._answer(line) if isinstance(line, bytes) else error_reply(line)
            timer.cancel()
            win32file.WriteFile(pipe, reply)
            win32file.FlushFileBuffers(pipe)
        except Exception as exc:  # connection boundary: one client must not hurt the agent
            log.debug("pipe client failed: %s", exc)
        finally:
            timer.cancel()
            with self._lock:
                self._active -= 1
            try:
                win32pipe.DisconnectNamedPipe(pipe)
            finally:
                pipe.Close()

    def _answer(self, line: bytes) -> bytes:
        """The same answer the Unix socket gives, computed on the agent's event loop."""
        assert self._loop is not None and self._handler is not None
        handler = self._handler

        async def on_loop() -> bytes:
            reply = answer(handler, line)
            return reply if isinstance(reply, bytes) else await reply

        return asyncio.run_coroutine_threadsafe(on_loop(), self._loop).result()
