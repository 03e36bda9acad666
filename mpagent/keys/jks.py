"""JKS (and JCEKS) through pyjks, the extra `mpagent[jks]`: its twofish dependency publishes
no wheels and needs a C compiler, so the base install goes without. pyjks is imported only
when a JKS is loaded; without it the error gives the exact keytool command converting the
keystore to PKCS#12, which mpagent always reads."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from mpagent.errors import KeystoreError
from mpagent.keys.common import Entry, Passwords, ders, fail, need


def load_jks(path: Path, data: bytes, passwords: Passwords) -> list[Entry]:
    try:
        import jks
    except ImportError:
        raise unsupported(path, sys.platform) from None
    try:
        store = jks.KeyStore.loads(data, need(path, passwords.keystore()))
    except jks.util.KeystoreSignatureException as exc:
        raise fail(path, "wrong_store_password") from exc
    except jks.util.KeystoreException as exc:
        raise fail(path, "unknown_format", read_as="JKS (corrupt?)") from exc
    entries = [
        Entry(alias, partial(_key, path, e, passwords), ders(c for _, c in e.cert_chain))
        for alias, e in store.private_keys.items()
    ]
    return entries + [Entry(alias, None, ders([e.cert])) for alias, e in store.certs.items()]


def unsupported(path: Path, platform: str) -> KeystoreError:
    """The error for a JKS without pyjks: the keytool command, its paths quoted for the
    platform's shell, and the extra (which brings pyjks everywhere but on Windows)."""
    import shlex
    import subprocess

    p12 = path.with_suffix(".p12")
    windows = platform == "win32"
    quote = (lambda arg: subprocess.list2cmdline([arg])) if windows else shlex.quote
    command = (
        f"keytool -importkeystore -srckeystore {quote(str(path))} -srcstoretype JKS"
        f" -destkeystore {quote(str(p12))} -deststoretype PKCS12"
    )
    install = "; or add JKS support: `pip install 'mpagent[jks]'` (needs a C compiler)"
    if windows:
        install = "; `pip install 'mpagent[jks]'` adds JKS support on Linux and macOS only"
    return fail(path, "jks_unsupported", command=command, p12=str(p12), install=install)


def _key(path: Path, entry: Any, passwords: Passwords) -> Any:
    import jks

    if not entry.is_decrypted():  # the store password did not open it: the key has its own
        try:
            entry.decrypt(need(path, passwords.key()))
        except (jks.util.DecryptionFailureException, ValueError) as exc:
            raise fail(path, "wrong_key_password", alias=entry.alias) from exc
    return serialization.load_der_private_key(entry.pkey_pkcs8, None)
