"""The agent's key watch as pure policy: which sets it renews, what it says, when it checks
again; plain values and a fake clock."""

from __future__ import annotations

from pathlib import Path

from mpagent import keywatch
from mpagent.config import Config, parse
from mpagent.keywatch import after_renewal, decide, next_check, render, summary, warning
from mpagent.ownkeys import KeySet, RegisteredKey

NOW = 1_800_000_000.0
DAY = 86400.0


def key(kid: str, days: float | None) -> RegisteredKey:
    expires = None if days is None else NOW + days * DAY
    return RegisteredKey(kid, {"kid": kid, "kty": "RSA"}, expires)


def keyset(*keys: RegisteredKey) -> KeySet:
    return KeySet(tuple(keys))


def test_no_renewal_while_every_key_has_30_days_or_more() -> None:
    """A set whose keys all have at least 30 days left is left alone, auto_renew or not."""
    ks = keyset(key("a", 30.0), key("b", 364))
    assert decide(ks, NOW, auto_renew=True) == keywatch.Decision(renew=False, expiring=())


def test_a_key_under_30_days_renews_the_set_with_auto_renew() -> None:
    """With auto_renew, one key under 30 days makes the check re-post the set."""
    ks = keyset(key("a", 29.9), key("b", 364))
    assert decide(ks, NOW, auto_renew=True) == keywatch.Decision(renew=True, expiring=("a",))


def test_without_auto_renew_an_expiring_key_is_only_reported() -> None:
    """Without auto_renew nothing is posted; the expiring kid is still named."""
    ks = keyset(key("a", 3), key("b", -1))
    assert decide(ks, NOW, auto_renew=False) == keywatch.Decision(False, ("a", "b"))


def test_an_expired_key_is_renewed_too() -> None:
    """A key past its exp (MP-121 at /token) counts: re-posting it renews it."""
    assert decide(keyset(key("old", -2)), NOW, auto_renew=True).renew


def test_a_key_without_exp_is_never_a_reason_to_renew() -> None:
    """A key the API gave no exp for is not judged expiring."""
    assert decide(keyset(key("a", None)), NOW, auto_renew=True).renew is False


def test_a_renewal_that_still_leaves_under_30_days_is_said_once() -> None:
    """Keys the server gives < 30 days: the first renewal says so, the next ones do not."""
    short = keyset(key("a", 10))
    message, noted = after_renewal(short, NOW, noted=False)
    assert noted and message is not None
    assert "a" in message and "10.0 days" in message
    assert after_renewal(short, NOW + 12 * 3600, noted=True) == (None, True)


def test_a_renewal_that_worked_says_nothing_and_clears_the_note() -> None:
    """Keys past 30 days after a renewal: no message, and a later short one is said again."""
    assert after_renewal(keyset(key("a", 365)), NOW, noted=True) == (None, False)


def test_next_check_in_12_hours_after_success_1_hour_after_failure() -> None:
    """The schedule: CHECK_EVERY after a check that worked, RETRY_AFTER after a failure."""
    assert next_check(NOW, ok=True) == NOW + 12 * 3600
    assert next_check(NOW, ok=False) == NOW + 3600


def test_summary_gives_days_left_and_the_signing_kid() -> None:
    """status' registered_keys: kid, days left to one decimal (None if unknown), signing."""
    ks = keyset(key("a", 12.345), key("b", None))
    assert summary(ks, NOW, "b") == [
        {"kid": "a", "expires_in_days": 12.3, "signing": False},
        {"kid": "b", "expires_in_days": None, "signing": True},
    ]


def test_warning_names_the_key_and_the_renew_command() -> None:
    """Under 30 days without auto_renew, the warning says `mpagent keys renew --profile P`."""
    text = warning(keyset(key("a", 12.2), key("b", 200)), NOW, "prod", auto_renew=False)
    assert text is not None
    assert "a expires in 12 days" in text and "b" not in text.split(";")[0]
    assert "mpagent keys renew --profile prod" in text


def test_warning_with_auto_renew_says_the_agent_renews() -> None:
    """With auto_renew the warning says the agent renews, and names an expired key as such."""
    text = warning(keyset(key("a", -1)), NOW, "prod", auto_renew=True)
    assert text is not None and "a expired" in text and "the agent renews" in text


def test_no_warning_at_30_days_or_more() -> None:
    """No warning while every key has at least 30 days."""
    assert warning(keyset(key("a", 30.0)), NOW, "prod", auto_renew=False) is None


def test_render_marks_keys_under_30_days_and_the_signing_one() -> None:
    """`mpagent status` lines: `!` before a short expiry, `*` on the kid the profile signs
    with, the failure of a check, and the warnings; control characters escaped."""
    doc = {
        "registered_keys": {
            "prod": {
                "keys": [
                    {"kid": "new", "expires_in_days": 364.5, "signing": True},
                    {"kid": "old\x1b", "expires_in_days": 12.0, "signing": False},
                ],
                "checked_at": NOW,
                "error": None,
            },
            "test": {"keys": [], "checked_at": None, "error": "the admin API refused"},
        },
        "key_warnings": {"prod": "registered key old expires in 12 days"},
    }
    lines = render(doc)
    new = next(line for line in lines if " new " in line)
    old = next(line for line in lines if "old\\x1b" in line)
    assert "in 364 days" in new and new.rstrip().endswith("*") and "!" not in new
    assert "!in 12 days" in old and not old.rstrip().endswith("*")
    assert any(
        "test" in line and "key check failed: the admin API refused" in line for line in lines
    )
    assert "WARNING profile prod: registered key old expires in 12 days" in lines
    assert not any("\x1b" in line for line in lines)


def test_render_says_nothing_without_watched_profiles() -> None:
    """An agent without admin profiles adds no lines to `status`."""
    assert render({"registered_keys": {}}) == []


def profiles(**extra: dict[str, object]) -> Config:
    """A config of plain values: each profile a kid client with an admin profile."""
    base = {"environment": "test", "client_id": "c", "keystore": "/k.pem"}
    tables = {name: {**base, "kid": "a", **values} for name, values in extra.items()}
    return parse({"profiles": {"cert": base, **tables}}, Path("/config.toml"))


def test_update_keeps_the_schedule_of_an_unchanged_profile() -> None:
    """A reload keeps an unchanged watched profile's last check; a new kid (a rotation) or a
    new profile is checked at once; a profile no longer watched is dropped."""
    watch = keywatch.KeyWatch(refresher=None, clock=lambda: NOW)  # type: ignore[arg-type]
    watch.update(profiles(app={"admin_profile": "cert"}, other={"auto_renew": True}))
    assert set(watch.watched) == {"app", "other"}  # cert: neither admin_profile nor auto_renew
    for w in watch.watched.values():
        w.due, w.keys, w.checked_at = NOW + 100, keyset(key("a", 300)), NOW
    watch.update(profiles(app={"admin_profile": "cert", "kid": "b"}, other={"auto_renew": True}))
    assert watch.watched["other"].due == NOW + 100 and watch.watched["other"].keys is not None
    assert watch.watched["app"].due == 0.0 and watch.watched["app"].keys is None
    watch.update(profiles(app={"admin_profile": "cert", "kid": "b"}))
    assert set(watch.watched) == {"app"}


def test_status_reports_keys_and_the_warning() -> None:
    """`status`'s registered_keys and key_warnings for a profile's last check."""
    watch = keywatch.KeyWatch(refresher=None, clock=lambda: NOW)  # type: ignore[arg-type]
    watch.update(profiles(app={"admin_profile": "cert"}))
    w = watch.watched["app"]
    w.keys, w.checked_at, w.due = keyset(key("a", 5), key("b", 200)), NOW, NOW + 43200
    doc = watch.status()
    assert doc["registered_keys"]["app"] == {
        "keys": [
            {"kid": "a", "expires_in_days": 5.0, "signing": True},
            {"kid": "b", "expires_in_days": 200.0, "signing": False},
        ],
        "checked_at": NOW,
        "next_check": NOW + 43200,
        "auto_renew": False,
        "error": None,
    }
    assert doc["key_warnings"]["app"].startswith("registered key a expires in 5 days")


def test_a_stopping_watch_sends_no_request() -> None:
    """Once the agent is stopping, a check asks for no admin token and sends nothing: it
    ends quietly, recording neither keys nor an error."""
    asked: list[str] = []
    cfg = profiles(app={"admin_profile": "cert", "admin_api": "http://127.0.0.1:9/clients/"})
    watch = keywatch.KeyWatch(refresher=None, clock=lambda: NOW)  # type: ignore[arg-type]
    watch.update(cfg)
    watch.stopping.set()
    w = watch.watched["app"]

    def token(admin: str, scope: str) -> str:
        asked.append(scope)
        return "token"

    watch._check(cfg, w, token)
    assert asked == [] and w.keys is None and w.error is None
