"""The agent's log: one escaped line per record, priorities for journald, and repeated lines
counted instead of written: a flood of one failure (a client in a loop, no file descriptors
left) must not grow the log by a line, or a traceback, each time."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import sys
import threading
from dataclasses import dataclass
from typing import Any

from mpagent.console import printable

WINDOW = 60.0  # seconds
BURST = 10  # lines of one kind written per window; the rest are counted
SWEEP = 1.0  # how often, at most, ended windows are looked for (seconds)
_SUMMARY = "mpagent_summary"  # marks the filter's own lines, which always pass


def setup(level: str, *, journal: bool, json_lines: bool = False) -> None:
    """The agent's logging: stderr, in the journal's format under systemd (`journal`: its
    JOURNAL_STREAM is set), else with time and pid; with `json_lines` (server mode), one
    JSON object per line on stdout instead. Floods counted by RateLimit."""
    handler = logging.StreamHandler(sys.stdout if json_lines else None)
    handler.setFormatter(
        JsonFormatter() if json_lines else JournalFormatter() if journal else PLAIN
    )
    handler.addFilter(RateLimit())  # a flood of one failure is counted, not written
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # watchdog logs every event at debug level; a log file in a watched directory would then
    # feed itself forever.
    logging.getLogger("watchdog").setLevel(logging.INFO)


class PlainFormatter(logging.Formatter):
    """Log records with text from outside (an issuer's error_description, a client's scope)
    escaped as on stderr: a record is one line, so nothing can forge another, and no ESC
    sequence reaches the terminal that shows the log. A traceback keeps its line breaks."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return self._escape(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return "\n".join(map(self._escape, super().formatException(ei).split("\n")))

    def formatStack(self, stack_info: str) -> str:
        return "\n".join(map(self._escape, super().formatStack(stack_info).split("\n")))

    @staticmethod
    def _escape(text: str) -> str:
        return printable(text)  # the one escaping rule, as on stderr


PLAIN = PlainFormatter("%(asctime)s mpagent[%(process)d] %(levelname)s %(message)s")


class JournalFormatter(PlainFormatter):
    """Under systemd: journald adds time and pid itself; a <N> prefix gives the priority,
    so `journalctl -p err` finds errors."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelname, 6)}>{super().format(record)}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line for a log collector (a container's stdout): time (UTC, ISO
    8601), level, logger, message, and exception (the traceback) when there is one. JSON's
    escaping keeps a record on one line and, ASCII only, no control character raw. What a
    message holds is what the text log holds: fingerprints, never a token or password."""

    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created, dt.UTC)
        line = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=True)


_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


@dataclass
class _Window:
    start: float
    written: int = 1
    dropped: int = 0
    first_dropped: float = 0.0
    last: tuple[Any, Any] = ("", None)  # the last left-out line's msg and args


class RateLimit(logging.Filter):
    """Per kind of line (logger, level and the message before its arguments are filled in):
    the first BURST lines of each WINDOW seconds are written and later ones only counted.
    When the window has ended, at the next line logged of any kind, a line says how many
    were left out: "<the last of them> (… 12,345 more like this in the last 60 s)". DEBUG
    lines always pass: whoever asks for them wants every one.

    Times are the records' own (`created`), so the filter is tested with plain values."""

    def __init__(self, burst: int = BURST, window: float = WINDOW) -> None:
        super().__init__()
        self.burst, self.window = burst, window
        self._windows: dict[tuple[str, int, str], _Window] = {}
        self._next_sweep = 0.0
        self._lock = threading.Lock()  # the agent's threads (I/O, fetches) log too

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or getattr(record, _SUMMARY, False):
            return True
        kind = (record.name, record.levelno, str(record.msg))
        now = record.created
        with self._lock:
            ended = self._ended(now, kind)
            keep = self._admit(kind, record, now)
        for ended_kind, window in ended:  # outside the lock: these are logged through us
            _summarise(ended_kind, window, now)
        return keep

    def _ended(self, now: float, kind: tuple[str, int, str]) -> list[tuple[Any, _Window]]:
        """Remove the windows that have ended (this kind's, and once a SWEEP all); return
        those that left lines out."""
        kinds = [kind]
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP
            kinds = list(self._windows)
        ended = []
        for k in kinds:
            window = self._windows.get(k)
            if window is not None and now - window.start >= self.window:
                del self._windows[k]
                if window.dropped:
                    ended.append((k, window))
        return ended

    def _admit(self, kind: tuple[str, int, str], record: logging.LogRecord, now: float) -> bool:
        window = self._windows.get(kind)
        if window is None:
            self._windows[kind] = _Window(now)
            return True
        if window.written < self.burst:
            window.written += 1
            return True
        if not window.dropped:
            window.first_dropped = now
        window.dropped += 1
        window.last = (record.msg, record.args)
        return False


def _summarise(kind: tuple[str, int, str], window: _Window, now: float) -> None:
    name, level, _ = kind
    msg, args = window.last
    try:
        text = str(msg) % args if args else str(msg)
    except (TypeError, ValueError, KeyError):  # as LogRecord.getMessage would fail
        text = str(msg)
    logging.getLogger(name).log(
        level,
        "%s (… %s more like this in the last %d s)",
        text,
        f"{window.dropped:,}",
        max(1, math.ceil(now - window.first_dropped)),
        extra={_SUMMARY: True},
    )
