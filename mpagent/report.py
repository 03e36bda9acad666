"""Human-readable renderings of the agent's status document. Pure.

Every line is escaped (`console.printable`): scopes come from clients and errors from issuers,
and neither may move the cursor, clear the screen or start a line of its own.
"""

from __future__ import annotations

import time
from typing import Any

from mpagent.console import printable


def _when(at: float | None, now: float) -> str:
    if at is None:
        return "-"
    delta = at - now
    return f"in {delta:.0f} s" if delta >= 0 else f"{-delta:.0f} s ago"


def _customer(token: dict[str, Any]) -> str:
    """The FOR cell: the organisation a per-customer token is for."""
    if token.get("systemuser_org"):
        return f"systemuser {token['systemuser_org']}"
    if token.get("consumer_org"):
        return f"consumer {token['consumer_org']}"
    if token.get("claims"):  # a texas request's own resource / authorization_details
        return str(token["claims"])
    return "-"


def status(doc: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [
        f"agent     pid {doc['pid']}, up {doc['uptime']:.0f} s, version {doc['version']}",
        f"socket    {doc['socket']}",
        f"env file  {doc['env_file']}"
        + (f"  NOT WRITTEN: {doc['env_file_error']}" if doc.get("env_file_error") else ""),
        f"config    {doc['config']}",
    ]
    files = doc.get("files") or {}
    if files.get("dir"):
        lines.append(
            f"files     {files['dir']}, {files['count']} scope sets"
            + (f"  NOT WRITTEN: {files['error']}" if files.get("error") else "")
        )
    bridge = doc.get("bridge") or {}
    if bridge.get("listen"):
        lines.append(
            f"bridge    serving on {bridge['url']}; peer check: {bridge['peer_check']}"
            if bridge.get("serving")
            else f"bridge    OFF: {bridge.get('error')}"
        )
    http = doc.get("http") or {}
    if http.get("listen"):
        lines.append(
            (
                f"http      texas-compatible on {http['url']}; answers {http['peer_check']}"
                if http.get("serving")
                else f"http      OFF: {http.get('error')}"
            )
            + (f"  NOT SERVING: {http['profile_error']}" if http.get("profile_error") else "")
            + (f"  ({http['pending']})" if http.get("pending") else "")
        )
    for name, state in doc.get("passwords", {}).items():
        if state:
            lines.append(f"password  {name}: {state}")
    if doc.get("reload_error"):
        lines.append(f"RELOAD FAILED (old configuration still running): {doc['reload_error']}")
    for name, error in sorted(doc.get("profiles", {}).items()):
        if error:
            lines.append(f"profile {name} unusable: {error}")
    for name, target in sorted((doc.get("exchanges") or {}).items()):
        lines.append(
            f"exchange  {name}: Maskinporten tokens exchanged at {target}, Altinn tokens served"
        )
    for name, warning in sorted(doc.get("warnings", {}).items()):
        lines.append(f"WARNING profile {name}: {warning}; renew it before Maskinporten refuses it")
    lines.append("")
    tokens = doc.get("tokens", [])
    # The FOR column only when a token is for a customer organisation (get --systemuser-org).
    customers = any(_customer(t) != "-" for t in tokens)
    column = f"{'FOR':<20} " if customers else ""
    lines.append(
        f"{'PROFILE':<12} {'SCOPE':<32} {column}{'EXPIRES':<12} {'REFRESH':<12} "
        f"{'REFRESHES':>9} ERROR"
    )
    for t in tokens:
        error = t.get("last_error") or {}
        cell = f"{_customer(t):<20} " if customers else ""
        lines.append(
            f"{t['profile']:<12} {t['scope']:<32} {cell}{_when(t['expires_at'], now):<12} "
            f"{_when(t['next_refresh'], now):<12} {t['refreshes']:>9} {error.get('message', '')}"
        )
    return "\n".join(map(printable, lines))
