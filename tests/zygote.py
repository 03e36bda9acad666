"""`mpagent` processes for the fast suite, forked from a process that has imported mpagent.

`python -m mpagent doctor` spends ~0.45 s of CPU starting the interpreter and importing
requests, cryptography, PyJWT and keyring before the command runs; the fast suite starts
hundreds of such processes, and an agent costs more. So each xdist worker keeps one process
(the zygote) that has imported every mpagent module once, and each `mpagent` a test starts is
a fork of it: a process of its own, with its own pid, exit status and signals, given the
test's argv, environment, working directory, umask and stdin/stdout/stderr, that runs
`mpagent/__main__.py` as `python -m mpagent` does and ends as the interpreter ends (threads
joined, atexit handlers run, stdio flushed). It is the real CLI; only the interpreter's start
and the imports are not repeated.

Those two are tested by real starts: the import-graph and start-up tests (test_imports.py,
test_fastpath.py) and bench/ start their own processes, and the reliability suite starts
every process by exec. A start the zygote cannot make the way exec would (a PYTHON* or
locale variable that differs from its own, other subprocess arguments) is a real one; off Linux,
and with MPAGENT_TEST_EXEC=1, every start is. A forked process's /proc/PID/cmdline and
/proc/PID/environ are the zygote's (its argv; PATH and those variables), not the test's: a
test that reads them of a process it starts (not of one mpagent spawns) starts it by exec.
The zygote imports mpagent from the work tree (as the tests do), whatever the child's cwd."""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import locale
import os
import pkgutil
import runpy
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

# Read once by the interpreter at its start (or by the C library), so a fork keeps the
# zygote's values: a start that asks for others is made by exec.
_STARTUP_VARIABLES = ("LANG", "LANGUAGE", "TZ")
_STARTUP_PREFIXES = ("PYTHON", "LC_")
_READ_LATER = "PYTHON_KEYRING_BACKEND"  # keyring reads it when first asked, in the child
_HEADER = struct.Struct("!I")
_ENCODING = locale.getpreferredencoding(False)  # what subprocess's text=True uses
# Read at import (conftest's), before the tests' fixtures clear MPAGENT_* variables.
EXEC_ONLY = os.environ.get("MPAGENT_TEST_EXEC") == "1"


def _startup_environment(env: Mapping[str, str]) -> dict[str, str]:
    return {
        k: v
        for k, v in env.items()
        if (k in _STARTUP_VARIABLES or k.startswith(_STARTUP_PREFIXES)) and k != _READ_LATER
    }


# ---- the test's side ---------------------------------------------------------------------


class Zygote:
    """The fork server of this test process (one per xdist worker), started on first use."""

    def __init__(self, directory: Path) -> None:
        self._socket_path = directory / "zygote.sock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._env: dict[str, str] = {}
        self._lock = threading.Lock()
        self.exec_only = EXEC_ONLY

    def _ensure(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return
            # Only what the interpreter reads at its start: the zygote holds none of the
            # tests' secrets (a test scanning /proc/*/environ for a password finds it).
            self._env = _startup_environment(os.environ)
            if "PATH" in os.environ:
                self._env["PATH"] = os.environ["PATH"]
            self._socket_path.unlink(missing_ok=True)
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import sys; from tests import zygote; zygote.serve(sys.argv[1])",
                    str(self._socket_path),
                ],
                cwd=Path(__file__).resolve().parent.parent,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=self._env,
            )
            deadline = time.monotonic() + 30
            while not self._socket_path.exists():
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the test zygote did not start")
                time.sleep(0.01)

    def can_fork(self, env: Mapping[str, str]) -> bool:
        if self.exec_only or not hasattr(os, "pidfd_open"):  # Linux only
            return False
        self._ensure()
        return _startup_environment(env) == _startup_environment(self._env)

    def start(
        self,
        args: Sequence[str],
        env: Mapping[str, str],
        stdin: int,
        stdout: int,
        stderr: int,
        cwd: str | os.PathLike[str] | None = None,
        terminal: bool = False,
    ) -> Forked:
        umask = os.umask(0)
        os.umask(umask)
        request = json.dumps(
            {
                "args": list(args),
                "env": dict(env),
                "cwd": os.fspath(cwd) if cwd is not None else os.getcwd(),
                "umask": umask,
                "terminal": terminal,
            }
        ).encode()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(self._socket_path))
            socket.send_fds(conn, [_HEADER.pack(len(request))], [stdin, stdout, stderr])
            conn.sendall(request)
            pid = _read_message(conn)["pid"]
        except BaseException:
            conn.close()
            raise
        return Forked([sys.executable, "-m", "mpagent", *args], pid, conn)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


class Forked:
    """A forked `mpagent`, with the part of subprocess.Popen the tests use."""

    def __init__(self, args: list[str], pid: int, conn: socket.socket) -> None:
        self.args, self.pid, self._conn = args, pid, conn
        self.returncode: int | None = None

    def poll(self) -> int | None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._conn], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            status = _read_message(self._conn)["status"]
            self._conn.close()
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run(
    zygote: Zygote,
    args: Sequence[str],
    env: Mapping[str, str],
    timeout: float,
    cwd: Any = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """subprocess.run(..., capture_output=True, text=True) of a forked mpagent, its stdin
    `input` (None: /dev/null)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe() if input is not None else (os.open(os.devnull, os.O_RDONLY), -1)
    try:
        proc = zygote.start(args, env, in_r, out_w, err_w, cwd=cwd)
    finally:
        for fd in (out_w, err_w, in_r):
            os.close(fd)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    pending = (input or "").encode(_ENCODING)
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        for fd in chunks:
            selector.register(fd, selectors.EVENT_READ)
        if in_w != -1:
            os.set_blocking(in_w, False)
            selector.register(in_w, selectors.EVENT_WRITE)
        try:
            while selector.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    proc.kill()
                    proc.wait()
                    raise subprocess.TimeoutExpired(proc.args, timeout)
                for key, _ in selector.select(left):
                    if key.fd == in_w:
                        try:
                            pending = pending[os.write(in_w, pending) :]
                        except BrokenPipeError:  # it exited without reading: as subprocess
                            pending = b""
                        if not pending:
                            selector.unregister(in_w)
                            os.close(in_w)
                            in_w = -1
                        continue
                    data = os.read(key.fd, 65536)
                    if data:
                        chunks[key.fd].append(data)
                    else:
                        selector.unregister(key.fd)
        finally:
            for fd in (out_r, err_r, in_w):
                if fd != -1:
                    os.close(fd)
    returncode = proc.wait(max(deadline - time.monotonic(), 0.1))
    stdout, stderr = (_text(b"".join(chunks[fd])) for fd in (out_r, err_r))
    return subprocess.CompletedProcess(proc.args, returncode, stdout, stderr)


def _text(data: bytes) -> str:
    """As subprocess decodes with text=True: the locale's encoding, universal newlines."""
    return data.decode(_ENCODING).replace("\r\n", "\n").replace("\r", "\n")


def _read_message(conn: socket.socket) -> dict[str, Any]:
    header = _read_exactly(conn, _HEADER.size)
    return json.loads(_read_exactly(conn, _HEADER.unpack(header)[0]))


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the test zygote closed the connection")
        data += chunk
    return data


def _send_message(conn: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    conn.sendall(_HEADER.pack(len(data)) + data)


_zygote: Zygote | None = None


def configure(directory: Path) -> None:
    """This test process's zygote will listen in `directory` (private; started on first use)."""
    global _zygote
    _zygote = Zygote(directory)


def shutdown() -> None:
    if _zygote is not None:
        _zygote.stop()


def forks(env: Mapping[str, str]) -> bool:
    """Whether a start with `env` is a fork (else an exec)."""
    return _zygote is not None and _zygote.can_fork(env)


@contextlib.contextmanager
def exec_only() -> Iterator[None]:
    """Within: every start is a real one (exec of the interpreter)."""
    if _zygote is None:
        yield
        return
    before, _zygote.exec_only = _zygote.exec_only, True
    try:
        yield
    finally:
        _zygote.exec_only = before


def run_mpagent(
    args: Sequence[str], env: Mapping[str, str], timeout: float, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """`python -m mpagent *args` to its end, output captured as text, stdin /dev/null."""
    if _zygote is not None and kwargs.keys() <= {"cwd", "input"} and forks(env):
        return run(_zygote, args, env, timeout, kwargs.get("cwd"), kwargs.get("input"))
    if "input" not in kwargs:
        kwargs["stdin"] = subprocess.DEVNULL
    return subprocess.run(
        [sys.executable, "-m", "mpagent", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


def start_on_terminal(args: Sequence[str], env: Mapping[str, str], terminal: int) -> Any:
    """`python -m mpagent *args` in a session of its own whose controlling terminal is
    `terminal` (a pseudo-terminal's slave), also its stdin, stdout and stderr."""
    if _zygote is not None and forks(env):
        return _zygote.start(args, env, terminal, terminal, terminal, terminal=True)
    return subprocess.Popen(
        [sys.executable, "-c", _TERMINAL, *args],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=dict(env),
        start_new_session=True,
    )


_TERMINAL = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable, '-m', 'mpagent', *sys.argv[1:]])"
)


def start_mpagent(args: Sequence[str], env: Mapping[str, str], output: IO[bytes]) -> Any:
    """`python -m mpagent *args` started, stdin /dev/null, stdout and stderr to `output`."""
    if _zygote is not None and forks(env):
        with open(os.devnull, "rb") as null:
            return _zygote.start(args, env, null.fileno(), output.fileno(), output.fileno())
    return subprocess.Popen(
        [sys.executable, "-m", "mpagent", *args],
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        env=dict(env),
    )


# ---- the zygote's side -------------------------------------------------------------------


def serve(socket_path: str) -> None:
    """Import mpagent, then fork a child for each request until the test process is gone."""
    _import_everything()
    if threading.active_count() != 1:
        raise RuntimeError("an import started a thread: forking would copy a broken lock")
    import gc

    gc.freeze()  # the children do not copy the imported modules' pages to count references
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path + ".new")
    os.rename(socket_path + ".new", socket_path)
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, connection)
    while os.getppid() == parent:
        for key, _ in selector.select(1.0):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                started = _fork(conn, listener, selector, children)
                if started is not None:
                    pidfd, pid = started
                    children[pidfd] = (pid, conn)
                    selector.register(pidfd, selectors.EVENT_READ)
                else:
                    conn.close()
            else:
                pid, conn = children.pop(key.fd)
                selector.unregister(key.fd)
                os.close(key.fd)
                _, status = os.waitpid(pid, 0)
                with contextlib.suppress(OSError):
                    _send_message(conn, {"status": status})
                conn.close()


def _import_everything() -> None:
    import mpagent

    for module in pkgutil.walk_packages(mpagent.__path__, "mpagent."):
        if module.name.endswith(".__main__"):
            continue
        with contextlib.suppress(ImportError):
            __import__(module.name)
    for name in (
        "keyring",
        "keyring.backends.SecretService",
        "keyring.backends.fail",
        "jks",
        "watchdog.observers",
        "cryptography.hazmat.primitives.serialization.pkcs12",
        "requests.adapters",
    ):
        with contextlib.suppress(ImportError):
            __import__(name)


def _fork(
    conn: socket.socket,
    listener: socket.socket,
    selector: selectors.BaseSelector,
    children: dict[int, tuple[int, socket.socket]],
) -> tuple[int, int] | None:
    try:
        conn.settimeout(10)
        header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
        if len(header) != _HEADER.size or len(fds) != 3:
            return None
        request = json.loads(_read_exactly(conn, _HEADER.unpack(header)[0]))
    except (OSError, ValueError):
        return None
    pid = os.fork()
    if pid == 0:
        selector.close()
        listener.close()
        for pidfd, (_, other) in children.items():
            os.close(pidfd)
            other.close()
        conn.close()
        _child(request, fds)  # never returns
    for fd in fds:
        os.close(fd)
    try:
        _send_message(conn, {"pid": pid})
    except OSError:
        os.kill(pid, signal.SIGKILL)
    return os.pidfd_open(pid), pid


def _child(request: dict[str, Any], fds: list[int]) -> None:
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        if request["terminal"]:
            import fcntl
            import termios

            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        _new_stdio()
        sys.argv = ["-m", *request["args"]]
        sys.path[0] = request["cwd"]
        code = _run_main()
    except BaseException:  # the harness itself failed: say so where the test looks
        traceback.print_exc()
    finally:
        os._exit(_finish(code))


def _new_stdio() -> None:
    """sys.stdin/stdout/stderr over the new fds 0-2, made as the interpreter makes them."""
    made = []
    for fd, old in enumerate((sys.__stdin__, sys.__stdout__, sys.__stderr__)):
        assert old is not None
        raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
        buffered = io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)
        made.append(
            io.TextIOWrapper(
                buffered,
                encoding=old.encoding,
                errors=old.errors,
                newline="\n",
                line_buffering=fd == 2 or (fd == 1 and raw.isatty()),
            )
        )
    sys.stdin, sys.stdout, sys.stderr = made
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = made  # type: ignore[misc]


def _run_main() -> int:
    """`python -m mpagent`, with the interpreter's handling of what escapes it."""
    try:
        runpy.run_module("mpagent", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        if exit_.code is None:
            return 0
        if isinstance(exit_.code, int):
            return exit_.code
        print(exit_.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        _finish(0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return 130
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1
    return 0


def _finish(code: int) -> int:
    """What the interpreter does as it exits: join threads, run atexit, flush stdio."""
    with contextlib.suppress(BaseException):
        threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except BaseException:
            code = 120
    return code
