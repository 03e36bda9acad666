"""A new key of the client's own: an RSA key pair made here, the private half in a 0600
PKCS#8 PEM file (a `keystore_type = "pem"` keystore), the public half as the JWK that Digdir's
admin API registers."""

from __future__ import annotations

import datetime as dt
import re
import secrets
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mpagent import paths
from mpagent.console import printable
from mpagent.errors import ConfigError, KeystoreError
from mpagent.private import ensure_private_dir, write_new

KEY_SIZE = 2048  # the size Digdir's docs name; Maskinporten takes RS256 only
_KID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def keys_dir() -> Path:
    """Where `mpagent keys create` keeps private keys unless told otherwise; absolute, as it
    goes into config.toml, where a relative path is taken from the file's directory."""
    return (Path(paths.data_dir()) / "keys").absolute()


def new_kid(profile: str, now: float) -> str:
    """A kid unique across all of Digdir's customers (the API refuses one in use elsewhere):
    the profile and date say what it is, 32 random bits make it unique."""
    day = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y%m%d")
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "-" for c in profile)
    return f"mpagent-{safe}-{day}-{secrets.token_hex(4)}"


def check_kid(kid: str) -> str:
    """A kid given by the user: it also names the key's file, so nothing a path could take
    apart. (Digdir's examples are plain names: "min_egen_nokkel".)"""
    if not _KID.fullmatch(kid):
        raise ConfigError(
            f"kid {printable(kid)!r} cannot be used: write 1-100 letters, digits, '.', '_' or "
            "'-' (it also names the private key's file)"
        )
    return kid


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_SIZE)


def public_jwk(key: rsa.RSAPrivateKey | rsa.RSAPublicKey, kid: str) -> dict[str, Any]:
    """The public JWK with what Digdir requires of every key: kty, alg, use, kid, n, e."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    full = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    return {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid, "n": full["n"], "e": full["e"]}


def create_key(path: Path | None, kid: str) -> tuple[Path, dict[str, Any]]:
    """Generate a key and write its private half to `path` (default: `<kid>.pem` in
    keys_dir(), made 0700), never over an existing file. Returns (path, public JWK)."""
    if path is None:
        ensure_private_dir(keys_dir())
        path = keys_dir() / f"{kid}.pem"
    key = new_key()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        write_new(path, pem)
    except FileExistsError:
        raise KeystoreError(
            f"{path} exists already; mpagent never writes over a key: give another --out path",
            check="exists",
        ) from None
    except OSError as exc:
        raise KeystoreError(
            f"{path}: cannot write the new private key: {exc.strerror or exc}; check the "
            "directory, or give another --out path",
            check="unwritable",
        ) from exc
    return path, public_jwk(key, kid)
