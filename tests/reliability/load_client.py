"""`get` clients for the reliability cases, run as a process of their own so that their
threads do not compete with the emulator (which lives in the test process) for one GIL.

    python load_client.py SOCKET SCOPE THREADS START_AT DURATION INTERVAL OUT

From wall time START_AT until START_AT + DURATION, each thread calls `get` for SCOPE through
mpagent.client.call (the real socket, a new connection per call), pausing INTERVAL seconds
between calls. OUT receives JSON: the distinct tokens, and per call its send and reply wall
times, latency in ms, and either the token (an index) and expires_at or the error kind.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from mpagent import client
from mpagent.errors import MpagentError


def run(path: str, scope: str, start_at: float, until: float, interval: float, out: dict) -> None:
    tokens: dict[str, int] = {}
    ok: list[list] = []
    errors: list[list] = []
    time.sleep(max(0.0, start_at - time.time()))
    while time.time() < until:
        sent, begun = time.time(), time.perf_counter()
        try:
            reply = dict(client.call(path, "get", [("scope", scope)], timeout=30))
        except MpagentError as exc:
            latency = (time.perf_counter() - begun) * 1000
            errors.append([sent, time.time(), latency, exc.kind, exc.message[:200]])
        else:
            latency = (time.perf_counter() - begun) * 1000
            index = tokens.setdefault(reply["token"], len(tokens))
            ok.append([sent, time.time(), latency, index, float(reply["expires_at"])])
        if interval:
            time.sleep(interval)
    out["parts"].append((tokens, ok, errors))


def main(argv: list[str]) -> int:
    path, scope, threads, start_at, duration, interval, target = argv
    start, until = float(start_at), float(start_at) + float(duration)
    out: dict = {"parts": []}
    workers = [
        threading.Thread(target=run, args=(path, scope, start, until, float(interval), out))
        for _ in range(int(threads))
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    table: dict[str, int] = {}
    ok, errors = [], []
    for tokens, part_ok, part_errors in out["parts"]:
        local = {i: table.setdefault(t, len(table)) for t, i in tokens.items()}
        ok += [[*r[:3], local[r[3]], r[4]] for r in part_ok]
        errors += part_errors
    result = {"tokens": sorted(table, key=table.__getitem__), "ok": ok, "errors": errors}
    with open(target, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
