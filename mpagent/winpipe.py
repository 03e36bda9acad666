"""The Windows transport: a named pipe private to the current user.

- The pipe is created with an explicit DACL granting access to the user's SID only (the
  default DACL lets Everyone read), with PIPE_REJECT_REMOTE_CLIENTS, and the first instance
  with FILE_FLAG_FIRST_PIPE_INSTANCE, so an agent cannot start on a name someone else holds.
- The client opens the pipe with SECURITY_IDENTIFICATION (the server cannot impersonate it)
  and refuses a server process that belongs to another user (pipe names are machine-wide,
  so another user could squat on ours).
- Requests are answered by `server.answer` on the agent's event loop, the same code the
  Unix socket uses; the pipe side is blocking I/O on threads, one per connection.

Not yet run on real Windows: the pure parts are tested on Linux (see tests/test_transport.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
from typing import Any

from mpagent import protocol
from mpagent.errors import AgentNotRunning, AlreadyRunning, MpagentError, ProtocolError
from mpagent.server import answer, error_reply

log = logging.getLogger(__name__)

PIPE_REJECT_REMOTE_CLIENTS = 0x00000008
FILE_FLAG_FIRST_PIPE_INSTANCE = 0x00080000
SECURITY_SQOS_PRESENT = 0x00100000
SECURITY_IDENTIFICATION = 0x00010000
PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
ERROR_FILE_NOT_FOUND = 2
ERROR_ACCESS_DENIED = 5
ERROR_PIPE_BUSY = 231
ERROR_BROKEN_PIPE = 109
ERROR_PIPE_CONNECTED = 535
BUFFER = 65536
READ_TIMEOUT = 5.0


def owner_only_sddl(sid: str) -> str:
    """A protected DACL with one ACE: generic-all for `sid`. No inheritance, no Everyone."""
    if not sid.startswith("S-1-"):
        raise ValueError(f"not a SID string: {sid!r}")
    return f"D:P(A;;GA;;;{sid})"


def _current_user_sid() -> Any:
    import win32api
    import win32security

    token = win32security.OpenProcessToken(win32api.GetCurrentProcess(), win32security.TOKEN_QUERY)
    return win32security.GetTokenInformation(token, win32security.TokenUser)[0]


def _security_attributes() -> Any:
    import win32security

    sid = win32security.ConvertSidToStringSid(_current_user_sid())
    attributes = win32security.SECURITY_ATTRIBUTES()
    attributes.SECURITY_DESCRIPTOR = (
        win32security.ConvertStringSecurityDescriptorToSecurityDescriptor(
            owner_only_sddl(sid), win32security.SDDL_REVISION_1
        )
    )
    attributes.bInheritHandle = False
    return attributes


def _server_user_sid(handle: Any) -> Any:
    import win32api
    import win32security

    pid = ctypes.c_ulong()
    if not ctypes.windll.kernel32.GetNamedPipeServerProcessId(int(handle), ctypes.byref(pid)):  # type: ignore[attr-defined]
        raise AgentNotRunning("cannot tell which process serves the agent's pipe; refusing it")
    process = win32api.OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, False, pid.value)
    token = win32security.OpenProcessToken(process, win32security.TOKEN_QUERY)
    return win32security.GetTokenInformation(token, win32security.TokenUser)[0]


# -- client ---------------------------------------------------------------------------------


class PipeChannel:
    """What client.call needs: sendall, recv, close."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def sendall(self, data: bytes) -> None:
        import win32file

        win32file.WriteFile(self.handle, data)

    def recv(self, size: int) -> bytes:
        import pywintypes
        import win32file

        try:
            return bytes(win32file.ReadFile(self.handle, size)[1])
        except pywintypes.error as exc:
            if exc.winerror == ERROR_BROKEN_PIPE:
                return b""
            raise OSError(exc.winerror, exc.strerror) from None

    def close(self) -> None:
        self.handle.Close()


def connect(address: str, timeout: float) -> PipeChannel:
    import pywintypes
    import win32file
    import win32pipe

    flags = SECURITY_SQOS_PRESENT | SECURITY_IDENTIFICATION
    access = win32file.GENERIC_READ | win32file.GENERIC_WRITE
    for _ in range(2):
        try:
            handle = win32file.CreateFile(
                address, access, 0, None, win32file.OPEN_EXISTING, flags, None
            )
            break
        except pywintypes.error as exc:
            if exc.winerror == ERROR_PIPE_BUSY:
                win32pipe.WaitNamedPipe(address, int(timeout * 1000))
                continue
            if exc.winerror == ERROR_FILE_NOT_FOUND:
                raise AgentNotRunning(
                    f"no agent is listening on {address}; start one with `mpagent agent`",
                    absent=True,
                ) from None
            raise AgentNotRunning(
                f"cannot connect to the agent at {address}: {exc.strerror}"
            ) from None
    else:
        raise AgentNotRunning(f"the agent at {address} is busy; try again")
    if _server_user_sid(handle) != _current_user_sid():
        handle.Close()
        raise AgentNotRunning(
            f"{address} is served by another user's process; refusing to talk to it"
        )
    return PipeChannel(handle)


# -- server ---------------------------------------------------------------------------------


class PipeListener:
    """The agent's side; implements server.Listener."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._closed = threading.Event()
        self._active = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handler: Any = None

    async def start(self, handler: Any) -> None:
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
            try:
                reply = self._answer(self._read_line(pipe))
            except ProtocolError as exc:
                reply = error_reply(exc)
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

    def _read_line(self, pipe: Any) -> bytes:
        buffer = PipeChannel(pipe)
        data = b""
        while b"\n" not in data:
            chunk = buffer.recv(4096)
            if not chunk:
                raise ProtocolError("the request ended before its newline")
            data += chunk
            if len(data) > protocol.MAX_REQUEST:
                raise ProtocolError(f"request larger than {protocol.MAX_REQUEST} bytes")
        return data[: data.index(b"\n") + 1]

    def _answer(self, line: bytes) -> bytes:
        """The same answer the Unix socket gives, computed on the agent's event loop."""

        async def on_loop() -> bytes:
            reply = answer(self._handler, line)
            return reply if isinstance(reply, bytes) else await reply

        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(on_loop(), self._loop).result()
