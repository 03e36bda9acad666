"""The refresh policy in tokens.py, tested with plain values: no clock, no sleeps."""

from __future__ import annotations

import pytest

from mpagent import tokens
from mpagent.tokens import Token


def token(requested_at: float = 1000.0, lifetime: float = 120.0) -> Token:
    return Token("t", "Bearer", "s", requested_at, requested_at + lifetime)


def test_soft_deadline_is_half_to_sixty_percent_of_lifetime() -> None:
    """A 120 s token is refreshed in the background between 60 and 72 s after the request."""
    t = token()
    assert tokens.soft_deadline(t, 0.0) == 1060.0
    assert tokens.soft_deadline(t, 0.999) == pytest.approx(1071.988)


def test_jitter_spreads_keys_fetched_together() -> None:
    """Keys fetched in the same instant get different refresh moments."""
    t = token()
    moments = {round(tokens.soft_deadline(t, r / 10), 3) for r in range(10)}
    assert len(moments) == 10 and max(moments) - min(moments) >= 10


def test_hard_deadline_default_min_ttl() -> None:
    """Default minimum remaining life: 10 s for long tokens, a quarter for short ones."""
    assert tokens.hard_deadline(token()) == 1110.0
    assert tokens.hard_deadline(token(lifetime=6)) == 1004.5


def test_usable_honours_min_ttl_and_never_expired() -> None:
    """A token is served only with at least min_ttl left, and never once expired."""
    t = token()
    assert tokens.usable(t, 1100.0)
    assert not tokens.usable(t, 1110.0)
    assert tokens.usable(t, 1100.0, 19.0) and not tokens.usable(t, 1100.0, 21.0)
    assert not tokens.usable(t, 1120.0, 0.0) and not tokens.usable(t, 1500.0, 0.0)
    assert not tokens.usable(None, 0.0)


def test_nearly_expired_answer_is_not_acceptable() -> None:
    """An issuer answer already past its hard deadline (a slow request) counts as a failure."""
    assert tokens.acceptable(token(), 1001.0)
    assert not tokens.acceptable(token(), 1115.0)


def test_backoff_is_exponential_capped_and_randomised() -> None:
    """1, 2, 4, ... s up to 60 s, each randomised between half and all of it."""
    assert [tokens.backoff(n, 1.0) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert tokens.backoff(3, 0.0) == 2.0
    assert tokens.backoff(30, 0.5) == 45.0


def test_rejections_back_off_longer() -> None:
    """A rejection is not retried in a hot loop: its backoff starts at 15 s."""
    assert tokens.backoff(1, 1.0, rejected=True) == 15.0
    assert tokens.backoff(3, 1.0, rejected=True) == 60.0


def test_token_key_orders_and_names() -> None:
    """Token keys compare by value and print as profile:scope (no secrets in them)."""
    a = tokens.TokenKey("p", "test", "c", "sha256:x", "a b", "{}")
    b = tokens.TokenKey("p", "test", "c", "sha256:x", "a b", "{}")
    assert a == b and hash(a) == hash(b) and str(a) == "p:a b"
    assert a != tokens.TokenKey("p", "test", "c", "sha256:y", "a b", "{}")


def test_a_token_shows_only_its_fingerprint() -> None:
    """repr(Token) and fingerprint() show the length and last four characters, never the token."""
    t = Token("eyJhbGciOi.secret-part.sig-WXYZ", "Bearer", "a b", 1000.0, 1120.0)
    assert tokens.fingerprint(t.access_token) == "…WXYZ(31)"
    assert repr(t) == "Token(scope='a b', expires_at=1120, fp=…WXYZ(31))"
    assert "secret-part" not in repr(t) and t.lifetime == 120.0


def test_scope_string_is_the_canonical_scope_set() -> None:
    """Scopes split on spaces, de-duplicated and sorted, whatever order they come in."""
    assert tokens.scope_string(["b a", "a", "c  b"]) == "a b c"
    assert tokens.scope_string([]) == ""


def test_the_policy_imports_no_io() -> None:
    """Importing tokens loads no other mpagent module, and neither requests nor asyncio."""
    import subprocess
    import sys

    code = (
        "import sys, mpagent.tokens\n"
        "print(sorted(m for m in sys.modules if m.startswith('mpagent') or m in "
        "('requests', 'asyncio', 'socket')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['mpagent', 'mpagent.tokens']"
