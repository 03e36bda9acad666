"""The client half of the Windows transport: a named pipe private to the current user.

The client opens the pipe with SECURITY_IDENTIFICATION (the server cannot impersonate it) and
refuses a server process that belongs to another user (pipe names are machine-wide, so
another user could squat on ours). This module is on the hot path of `mpagent get`: stdlib
only at import, and pywin32 and ctypes are imported where they are used. The server half,
which needs asyncio, is mpagent.pipeserver.

Not yet run on real Windows: the pure parts are tested on Linux (see tests/test_transport.py).
"""

from mpagent.errors import AgentNotRunning

TYPE_CHECKING = False  # the typing module's constant, without importing typing
if TYPE_CHECKING:
    from typing import Any

SECURITY_SQOS_PRESENT = 0x00100000
SECURITY_IDENTIFICATION = 0x00010000
PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
ERROR_FILE_NOT_FOUND = 2
ERROR_BROKEN_PIPE = 109
ERROR_PIPE_BUSY = 231


def current_user_sid() -> "Any":
    import win32api
    import win32security

    token = win32security.OpenProcessToken(win32api.GetCurrentProcess(), win32security.TOKEN_QUERY)
    return win32security.GetTokenInformation(token, win32security.TokenUser)[0]


def _server_user_sid(handle: "Any") -> "Any":
    import ctypes

    import win32api
    import win32security

    pid = ctypes.c_ulong()
    if not ctypes.windll.kernel32.GetNamedPipeServerProcessId(int(handle), ctypes.byref(pid)):  # type: ignore[attr-defined]
        raise AgentNotRunning("cannot tell which process serves the agent's pipe; refusing it")
    process = win32api.OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, False, pid.value)
    token = win32security.OpenProcessToken(process, win32security.TOKEN_QUERY)
    return win32security.GetTokenInformation(token, win32security.TokenUser)[0]


class PipeChannel:
    """One end of a pipe instance, as client.call and the server half need it: sendall,
    recv (b"" once the other end has gone), close."""

    def __init__(self, handle: "Any") -> None:
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
    """A channel to the agent's pipe at `address`, once its server is known to be ours."""
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
    if _server_user_sid(handle) != current_user_sid():
        handle.Close()
        raise AgentNotRunning(
            f"{address} is served by another user's process; refusing to talk to it"
        )
    return PipeChannel(handle)
