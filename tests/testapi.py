"""A stand-in for an API protected by Maskinporten, for the tests with real HTTP tools: it
answers 200 only to a request with a valid, unexpired Bearer token signed by the emulator's
key (from its /jwk) for the required scope, else 401. It records what it accepted."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import requests


class ProtectedApi:
    def __init__(self, issuer: str, scope: str) -> None:
        self.issuer, self.scope = issuer, scope
        keys = requests.get(issuer + "jwk", timeout=5).json()["keys"]
        self.keys = {key["kid"]: jwt.PyJWK(key) for key in keys}
        self.accepted: list[tuple[str, dict[str, Any]]] = []  # (token, claims)
        self.refused: list[str] = []  # reasons
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.api = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> ProtectedApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def check(self, authorization: str | None) -> tuple[int, dict[str, Any]]:
        try:
            token = self._bearer(authorization)
            key = self.keys.get(jwt.get_unverified_header(token).get("kid"))
            if key is None:
                raise jwt.InvalidTokenError("unknown signing key")
            claims = jwt.decode(
                token,
                key,
                algorithms=["RS256"],
                issuer=self.issuer,
                options={"require": ["exp", "iat", "iss", "scope"], "verify_aud": False},
            )
            if self.scope not in claims["scope"].split():
                raise jwt.InvalidTokenError(f"the token lacks scope {self.scope}")
        except jwt.InvalidTokenError as exc:
            with self._lock:
                self.refused.append(str(exc))
            return 401, {"error": "invalid_token", "error_description": str(exc)}
        with self._lock:
            self.accepted.append((token, claims))
        return 200, {"hello": claims["client_id"], "scope": claims["scope"]}

    @staticmethod
    def _bearer(authorization: str | None) -> str:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise jwt.InvalidTokenError("no Bearer token")
        return token.strip()


class _Handler(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        status, body = self.server.api.check(self.headers.get("Authorization"))  # type: ignore[attr-defined]
        data = json.dumps(body).encode()
        self.send_response(status)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer error="invalid_token"')
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass
