"""What the command line says on stderr: one `mpagent: ` line per message, with control
characters escaped. The one escaping rule: agent, doctor, report and bridge use `printable`
from here. Stdlib only, on the hot path."""

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mpagent.errors import MpagentError


def say(text: str) -> None:
    """One `mpagent: ` line on stderr. Text from outside (an issuer's error_description, a
    scope as typed) may hold control characters: shown escaped, they cannot drive the
    terminal or break the one-line contract."""
    print("mpagent: " + printable(text), file=sys.stderr)


def fail(exc: "MpagentError") -> int:
    """The error as one line on stderr; returns the exit status it stands for."""
    say(str(exc))
    return exc.exit_code


def printable(text: str) -> str:
    """C0 and C1 control characters and DEL as `\\xNN`; everything else as it is."""
    if text.isprintable():
        return text
    return "".join(
        f"\\x{ord(c):02x}" if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F else c for c in text
    )
