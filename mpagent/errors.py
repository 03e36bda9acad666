"""The one exception hierarchy. Stdlib only: the client imports it on the hot path.

Every message is written for a person and says what to do next. No message ever holds a
secret (token, grant, key, password). Across the agent's socket an error travels as data
(`to_wire`) and is rebuilt as the same class on the other side (`from_wire`).
"""

# typing costs ~10 ms to import; this module is on the `mpagent get` hot path.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar

# sysexits.h codes, so scripts can tell the failure kinds apart.
EX_GENERIC = 1
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78


class MpagentError(Exception):
    """Base class. `details` holds extra, non-secret fields (JSON-safe values only)."""

    kind: "ClassVar[str]" = "error"
    exit_code: "ClassVar[int]" = EX_GENERIC

    def __init__(self, message: str, **details: "Any") -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def again(self) -> "MpagentError":
        """A new instance with the same class, message and details. Raising one stored
        exception over and over grows its traceback (and the frames it keeps) each time."""
        return type(self)(self.message, **self.details)

    def to_wire(self) -> "dict[str, Any]":
        return {**self.details, "kind": self.kind, "message": self.message}

    @staticmethod
    def from_wire(data: "dict[str, Any]") -> "MpagentError":
        fields = dict(data)
        kind = fields.pop("kind", "error")
        message = str(fields.pop("message", "the agent reported an error without a message"))
        cls = _BY_KIND.get(str(kind), MpagentError)
        return cls(message, **fields)


class ConfigError(MpagentError):
    """The configuration is missing, unreadable or wrong. Never retried."""

    kind = "config"
    exit_code = EX_CONFIG


class KeystoreError(ConfigError):
    """The keystore, key or certificate cannot be used to sign grants."""

    kind = "keystore"


class SecretUnavailable(ConfigError):
    """A password is needed and no source (keyring, environment, terminal) has it."""

    kind = "secret"


class IssuerRejected(MpagentError):
    """Maskinporten answered 4xx: the grant or the client registration is wrong. Not retried."""

    kind = "rejected"
    exit_code = EX_NOPERM

    @property
    def error(self) -> str | None:
        return self.details.get("error")

    @property
    def error_description(self) -> str | None:
        return self.details.get("error_description")

    @property
    def mp_code(self) -> str | None:
        return self.details.get("mp_code")


class IssuerUnavailable(MpagentError):
    """Maskinporten could not be reached, timed out, or failed (5xx, 429, not JSON). Retried."""

    kind = "unavailable"
    exit_code = EX_TEMPFAIL


class AdminApiError(MpagentError):
    """Digdir's admin API (the client's registered keys) refused a request (4xx) or answered
    with a body mpagent cannot use. Not retried: the message says what to change."""

    kind = "admin"
    exit_code = EX_NOPERM


class AgentNotRunning(MpagentError):
    """No agent answers on the socket."""

    kind = "no_agent"
    exit_code = EX_UNAVAILABLE


class AlreadyRunning(MpagentError):
    """Another agent already serves this socket."""

    kind = "already_running"


class ProtocolError(MpagentError):
    """A malformed message on the agent's socket."""

    kind = "protocol"


_BY_KIND: "dict[str, type[MpagentError]]" = {
    cls.kind: cls
    for cls in (
        MpagentError,
        ConfigError,
        KeystoreError,
        SecretUnavailable,
        IssuerRejected,
        IssuerUnavailable,
        AdminApiError,
        AgentNotRunning,
        AlreadyRunning,
        ProtocolError,
    )
}
