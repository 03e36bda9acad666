"""Measurement 7: the texas-compatible HTTP endpoint next to the Unix socket, same agent.

One agent with `[http] listen` on a loopback port; 16 (by default) client processes load the
Unix socket (`mpagent/1 get`, as measurement 2) and then the HTTP endpoint, each for the same
window. An HTTP client does what an app written against texas does, with keep-alive off (the
listener serves one request per connection): new TCP connection, `POST /api/v1/token` with
`{"identity_provider":"maskinporten","target":SCOPE}` as JSON, read the whole answer until the
listener closes, check `HTTP/1.1 200` and an access_token in it. Raw `_socket`, so the client
side costs little; the cost measured is the agent's (peer-uid check, parse, JSON answer).
"""

from __future__ import annotations

import _socket
import json
import time
import urllib.request
from multiprocessing.connection import Connection
from pathlib import Path

from stack import Stack
from throughput import level, run_client

from mpagent.httpapi import HEALTH_PATH
from mpagent.texas import TOKEN_PATH


def token_request(listen: tuple[str, int], scope: str) -> bytes:
    body = json.dumps({"identity_provider": "maskinporten", "target": scope}).encode()
    head = (
        f"POST {TOKEN_PATH} HTTP/1.1\r\nHost: {listen[0]}:{listen[1]}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def _http_post(address: tuple[str, int], request: bytes) -> bool:
    """One token request over a new TCP connection, read until the listener closes it."""
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        sock.connect(address)
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        return reply.startswith(b"HTTP/1.1 200 ") and b'"access_token"' in reply
    except OSError:
        return False
    finally:
        sock.close()


def http_client(
    address: tuple[str, int], request: bytes, start_at: float, stop_at: float, out: Connection
) -> None:
    run_client(_http_post, address, request, start_at, stop_at, out)


def wait_healthy(listen: tuple[str, int], timeout: float = 30.0) -> None:
    """Until GET /healthz answers 200 (every pinned token held)."""
    url = f"http://{listen[0]}:{listen[1]}{HEALTH_PATH}"
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f} s ({last})")


def measure(bin_dir: Path, *, clients: int, seconds: float) -> dict:
    scope = "bench:s0000"
    with Stack(bin_dir, [scope], lifetime=3600, http=True) as st:
        st.start_agent()
        assert st.http_listen is not None
        wait_healthy(st.http_listen)
        unix = level(str(st.socket), scope, clients, seconds, st.pid)
        http = level(
            st.http_listen,
            scope,
            clients,
            seconds,
            st.pid,
            worker=http_client,
            request=token_request(st.http_listen, scope),
        )
        return {"unix": unix, "http": http, "listen": list(st.http_listen)}
