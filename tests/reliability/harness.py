"""What the reliability cases share: an emulator that records what it saw, token checks
against the emulator's own signing key, the env-file format, and views of /proc."""

from __future__ import annotations

import ctypes
import os
import re
import select
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt

from mpagent import envfile
from mpagent.emulator import Emulator

from ..agentproc import alive

SCRIPTS = Path(__file__).parent


@dataclass(frozen=True)
class Seen:
    """One POST /token as the emulator saw it: when its body had arrived, and its fault."""

    arrived: float
    fault: str | None


@dataclass(frozen=True)
class Issued:
    """One token the emulator issued, with its own claims and the wall-clock span of the
    request that produced it."""

    token: str
    iat: int
    exp: int
    started: float
    finished: float


class RecordingEmulator(Emulator):
    """The real emulator, also keeping every token request (arrival time, fault), every
    grant it was sent and every token it issued.

    Faults are decided in `Emulator._next_fault`, the one place that sees every token
    request; overriding it is the only way to time faults from outside. The tests check
    `len(requests) == token_requests`, so a renamed hook fails loudly instead of recording
    nothing."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.requests: list[Seen] = []
        self.issued: list[Issued] = []
        self.grants: list[str] = []
        self._record_lock = threading.Lock()

    def _next_fault(self) -> str | None:
        arrived = time.time()
        fault = super()._next_fault()
        with self._record_lock:
            self.requests.append(Seen(arrived, fault))
        return fault

    def handle_token(self, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
        started = time.time()
        status, payload = super().handle_token(content_type, body)
        finished = time.time()
        grants = parse_qs(body.decode(errors="replace")).get("assertion", [])
        with self._record_lock:
            self.grants += grants
            if status == 200:
                claims = self.verify(payload["access_token"])
                self.issued.append(
                    Issued(payload["access_token"], claims["iat"], claims["exp"], started, finished)
                )
        return status, payload

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims if this emulator signed it (a whole, untampered JWT), else raise."""
        [jwk] = self.jwks_document()["keys"]
        key = jwt.PyJWK(jwk).key
        return jwt.decode(
            token, key, algorithms=["RS256"], options={"verify_aud": False, "verify_exp": False}
        )

    def issued_by_token(self) -> dict[str, Issued]:
        with self._record_lock:
            return {i.token: i for i in self.issued}


# -- the env file -------------------------------------------------------------------------

_LINE = re.compile(r"([A-Z][A-Z0-9_]*)=(\S+)")


def env_file_problems(content: str, names: set[str], verify: Any) -> list[str]:
    """Why `content` is not a whole env file (empty list: it is one). Whole means: the
    header first, then NAME=token / NAME_EXPIRES_AT=int pairs for known names only, every
    token a complete JWT signed by the emulator, and the final newline."""
    problems = []
    if not content.endswith("\n"):
        problems.append("no final newline")
    lines = content.splitlines()
    if not lines or lines[0] != envfile.HEADER:
        problems.append(f"first line is not the header: {lines[:1]!r}")
    values = {}
    for line in lines[1:]:
        match = _LINE.fullmatch(line)
        if match is None:
            problems.append(f"malformed line {line[:40]!r}")
            continue
        values[match.group(1)] = match.group(2)
    for name, value in values.items():
        if name.endswith("_EXPIRES_AT"):
            if name.removesuffix("_EXPIRES_AT") not in values or not value.isdigit():
                problems.append(f"{name} without its token, or not a number")
            continue
        if name not in names:
            problems.append(f"unknown variable {name}")
        if name + "_EXPIRES_AT" not in values:
            problems.append(f"{name} without its _EXPIRES_AT")
        try:
            verify(value)
        except jwt.PyJWTError as exc:
            problems.append(f"{name} is not a whole token signed by the issuer: {exc}")
    return problems


# -- /proc --------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def rss_kib(pid: int) -> int:
    """Resident memory now (VmRSS), in KiB."""
    return int(proc_status(pid)["VmRSS"].split()[0])


def peak_rss_kib(pid: int) -> int:
    """The high-water mark of resident memory (VmHWM), in KiB."""
    return int(proc_status(pid)["VmHWM"].split()[0])


def read_proc(pid: int | str, name: str) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:  # gone, or not ours to read
        return None


def pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def agent_pids(runtime_dir: str) -> list[int]:
    """Live `mpagent ... agent` processes whose XDG_RUNTIME_DIR is `runtime_dir`: this test's
    agents only, whatever else runs on the machine."""
    marker = f"XDG_RUNTIME_DIR={runtime_dir}".encode()
    found = []
    for pid in pids():
        argv = (read_proc(pid, "cmdline") or b"").split(b"\0")
        environ = (read_proc(pid, "environ") or b"").split(b"\0")
        if b"mpagent" in argv and argv[-2:-1] == [b"agent"] and marker in environ and alive(pid):
            found.append(pid)
    return found


def parent_pid(pid: int) -> int:
    stat = read_proc(pid, "stat") or b") ? 0"
    return int(stat.rsplit(b")", 1)[1].split()[1])


class ProcWatcher:
    """Snapshots, every `interval` seconds while running, the argv and environment of every
    process this test started: the descendants of the test process, and processes whose
    environment holds `marker` (an autostarted agent outlives the `get` that spawned it
    and is adopted by init)."""

    def __init__(self, marker: str, interval: float = 0.01) -> None:
        self.marker, self.interval = marker.encode(), interval
        self.cmdlines: dict[int, set[bytes]] = {}
        self.environs: dict[tuple[int, bytes], bytes] = {}  # (pid, argv) -> environ
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proc-watcher", daemon=True)

    def __enter__(self) -> ProcWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _ours(self, pid: int, environ: bytes | None, me: int) -> bool:
        if environ and self.marker in environ:
            return True
        for _ in range(64):  # up the parent chain to us, or to init
            pid = parent_pid(pid)
            if pid == me:
                return True
            if pid <= 1:
                return False
        return False

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            for pid in pids():
                if pid == me:
                    continue
                argv = read_proc(pid, "cmdline")
                environ = read_proc(pid, "environ")
                if argv and self._ours(pid, environ, me):
                    self.cmdlines.setdefault(pid, set()).add(argv)
                    if environ:
                        self.environs[(pid, argv)] = environ
            self.scans += 1
            self._stop.wait(self.interval)


class DirectoryEvents:
    """inotify(7) on one directory, through libc: the names created or renamed into it, as
    they happen. Linux only; lets a test act within microseconds of the agent opening its
    temp file."""

    IN_CREATE = 0x100
    IN_MOVED_TO = 0x80
    _HEADER = struct.Struct("iIII")

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = self.IN_CREATE | self.IN_MOVED_TO
        if libc.inotify_add_watch(self.fd, os.fsencode(directory), mask) < 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")

    def wait(self, predicate: Any, timeout: float) -> str | None:
        """The first name created or moved in for which predicate(name) holds, or None."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.fd], [], [], left)[0]:
                return None
            data = os.read(self.fd, 65536)
            offset = 0
            while offset < len(data):
                _, _, _, size = self._HEADER.unpack_from(data, offset)
                start = offset + self._HEADER.size
                name = data[start : start + size].rstrip(b"\0").decode()
                offset = start + size
                if predicate(name):
                    return name
        return None

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> DirectoryEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
