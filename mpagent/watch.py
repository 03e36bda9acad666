"""Watch the config and key files for changes. Editors replace files rather than write them
in place, so the directories are watched and events are matched by path."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

log = logging.getLogger(__name__)


class _Handler(FileSystemEventHandler):
    def __init__(self, files: set[str], changed: Callable[[], object]) -> None:
        self.files, self.changed = files, changed

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        paths = {os.fsdecode(event.src_path), os.fsdecode(getattr(event, "dest_path", "") or "")}
        if paths & self.files:
            self.changed()


def watch(files: Iterable[Path], changed: Callable[[], object]) -> BaseObserver:
    """Start an observer that calls `changed` (from its own thread) when any file changes."""
    wanted = {os.path.abspath(f) for f in files}
    observer = Observer()
    handler = _Handler(wanted, changed)
    for directory in sorted({os.path.dirname(f) for f in wanted}):
        if os.path.isdir(directory):
            observer.schedule(handler, directory, recursive=False)
        else:
            log.warning("cannot watch %s: no such directory", directory)
    observer.daemon = True
    observer.start()
    return observer
