"""The reliability cases' numbers (requests served, failures, latency, memory) are collected
here and shown at the end of the run, for docs/RELIABILITY.md. Set MPAGENT_RELIABILITY_JSON
to a path to also get them as JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .. import zygote

RESULTS = pytest.StashKey[dict[str, dict[str, Any]]]()
HERE = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects, which is also this hook
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this directory is `reliability` and `slow`: `pytest -m "not slow"` is the
    fast suite, `pytest -m slow` the rest (serial: these tests time real behaviour)."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.reliability)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="package", autouse=True)
def started_by_exec() -> Iterator[None]:
    """Every mpagent process here starts as users start it, by exec (not forked by
    tests/zygote.py): these tests time and attack real behaviour, start-up included."""
    with zygote.exec_only():
        yield


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[..., None]:
    """report(name=value, ...) records numbers under the test's name."""
    results = request.config.stash.setdefault(RESULTS, {})
    numbers = results.setdefault(request.node.name, {})
    return numbers.update


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    results = config.stash.get(RESULTS, {})
    if not results:
        return
    terminalreporter.section("reliability results")
    for name, numbers in results.items():
        shown = ", ".join(f"{k}={_show(v)}" for k, v in numbers.items())
        terminalreporter.write_line(f"{name}: {shown}")
    path = os.environ.get("MPAGENT_RELIABILITY_JSON")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, sort_keys=True)


def _show(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
