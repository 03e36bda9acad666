#!/usr/bin/env python3
"""mpagent benchmarks: one command, `python3 bench/run.py` (or `bench/run`).

Benchmarks are not tests: nothing here asserts; it measures, prints a table with the machine
and each target, and exits 0 unless something could not be measured at all.

First (with the python3 that runs this file, stdlib only) it makes its own venv under /tmp
with a current pip and installs this repository into it non-editable; then it runs itself
again with that venv's python, which does the measuring. See docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
INSIDE = "MPAGENT_BENCH_SETUP"  # set (to the venv's description) in the re-run inside the venv


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--only", default="1,2,3,4,5,6,7", help="measurements to run (3 and 5 share a run)"
    )
    p.add_argument("--quick", action="store_true", help="short windows everywhere (~2 min)")
    p.add_argument("--runs", type=int, default=200, help="1: paired runs of get and python")
    p.add_argument("--no-agent-runs", type=int, default=20, help="1: paired runs of --no-agent")
    p.add_argument(
        "--installer-runs", type=int, default=200, help="6: paired runs per installer and verb"
    )
    p.add_argument("--clients", default="1,16,64", help="2: concurrency levels")
    p.add_argument("--load-seconds", type=float, default=5.0, help="2, 7: window per level")
    p.add_argument(
        "--http-clients", type=int, default=16, help="7: clients of the HTTP endpoint and socket"
    )
    p.add_argument("--refresh-seconds", type=float, default=40.0, help="3/5: run length")
    p.add_argument("--refresh-keys", type=int, default=4, help="3/5: configured scopes")
    p.add_argument("--lifetime", type=int, default=4, help="3/5: emulator token lifetime (s)")
    p.add_argument("--keys", default="1,20,100,1000", help="4: token key counts")
    p.add_argument("--idle-seconds", type=float, default=60.0, help="4: window per key count")
    p.add_argument("--idle-warmup", type=float, default=5.0, help="4: wait after the first fetch")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for a 1-minute load below 0.5",
    )
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--venv", type=Path, default=None, help="venv to use (default under /tmp)")
    p.add_argument("--new-venv", action="store_true", help="delete and recreate the venv")
    if "--quick" in argv:  # shorter defaults; flags given explicitly still win
        p.set_defaults(
            runs=50,
            no_agent_runs=5,
            installer_runs=50,
            load_seconds=2.0,
            refresh_seconds=20.0,
            idle_seconds=10.0,
            idle_warmup=2.0,
        )
    return p.parse_args(argv)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def outside(argv: list[str]) -> int:
    """Make the venv, then run this file again inside it."""
    import bootstrap

    args = parse(argv)
    venv = args.venv or bootstrap.DEFAULT_VENV
    setup = bootstrap.prepare(REPO, venv, fresh=args.new_venv)
    python = str(venv / "bin" / "python")
    env = dict(os.environ, **{INSIDE: json.dumps(setup)})
    os.execve(python, [python, str(HERE / "run.py"), *argv], env)
    return 1  # not reached


def inside(argv: list[str]) -> int:
    import sysinfo
    import table

    args = parse(argv)
    # SIGTERM unwinds like Ctrl-C, so every agent started is stopped and temp dirs removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    setup = json.loads(os.environ[INSIDE])
    bin_dir = Path(setup["venv"]) / "bin"
    only = set(ints(args.only))
    say = lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True)  # noqa: E731

    if args.wait_quiet > 0:
        say(f"waiting up to {args.wait_quiet:.0f} s for a 1-minute load below 0.5")
        sysinfo.wait_until_quiet(args.wait_quiet)
    info = sysinfo.machine(str(bin_dir / "python"))
    hf = sysinfo.hyperfine_version()
    info["pip (bench venv)"] = (
        f"{setup['pip']}; its mpagent command imports re: {setup['wrapper imports re']}"
        " (pip < 25's generated wrappers do, ~6 ms per start; mpagent ships its own launcher)"
    )
    info["mpagent source"] = setup["source"]
    info["install"] = (
        "non-editable into the venv (editable installs add an import hook); venv's setuptools"
        " removed (its .pth runs at every start)"
    )
    info["bytecode"] = (
        f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '(unset)')} here;"
        " measurement 6 runs without it, as a user's shell does"
    )
    info["hyperfine"] = (
        f"{hf} (cross-check only)" if hf else "not installed (apt-get install hyperfine)"
    )

    results: dict = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    sections: list[str] = []
    targets: list[list[str]] = []
    loads: list[str] = []
    started = time.monotonic()

    def run(number: int, title: str, fn: Callable[[], Any]) -> Any:
        loads.append(f"{number}: {sysinfo.load_text()}")
        say(f"{number}. {title} (load {sysinfo.load_text()})")
        return fn()

    if 1 in only:
        import startup

        r = run(
            1,
            "process start",
            lambda: startup.measure(bin_dir, runs=args.runs, no_agent_runs=args.no_agent_runs),
        )
        results["1_startup"] = r
        text, t = table.startup_section(r, "bench:s0000")
        sections.append(text)
        targets += t
    if 2 in only:
        import throughput

        r = run(
            2,
            "agent throughput",
            lambda: throughput.measure(
                bin_dir, levels=ints(args.clients), seconds=args.load_seconds
            ),
        )
        results["2_throughput"] = r
        text, t = table.throughput_section(r, args.load_seconds)
        sections.append(text)
        targets += t
    if only & {3, 5}:
        import refreshes

        r = run(
            3,
            "issuer requests and env-file latency",
            lambda: refreshes.measure(
                bin_dir,
                key_count=args.refresh_keys,
                lifetime=args.lifetime,
                seconds=args.refresh_seconds,
            ),
        )
        results["3_5_refreshes"] = r
        if 3 in only:
            text, t = table.refresh_section(r)
            sections.append(text)
            targets += t
    if 4 in only:
        import idle

        r = run(
            4,
            "idle CPU and memory",
            lambda: idle.measure(
                bin_dir, levels=ints(args.keys), seconds=args.idle_seconds, warmup=args.idle_warmup
            ),
        )
        results["4_idle"] = r
        text, t = table.idle_section(r)
        sections.append(text)
        targets += t
    if 5 in only:
        text, t = table.envfile_section(results["3_5_refreshes"])
        sections.append(text)
        targets += t
    if 7 in only:
        import httpload

        r = run(
            7,
            "HTTP endpoint beside the Unix socket",
            lambda: httpload.measure(bin_dir, clients=args.http_clients, seconds=args.load_seconds),
        )
        results["7_http"] = r
        text, t = table.http_section(r, args.load_seconds)
        sections.append(text)
        targets += t
    if 6 in only:
        import installers

        r = run(
            6,
            "get and env per installer",
            lambda: installers.measure(bin_dir, Path(setup["wheel"]), runs=args.installer_runs),
        )
        results["6_installers"] = r
        text, t = table.installers_section(r)
        sections.append(text)
        targets += t

    info["load at end"] = sysinfo.load_text()
    info["load before each"] = "; ".join(loads)
    info["bench time"] = f"{time.monotonic() - started:.0f} s"
    print("mpagent benchmarks\n")
    print(table.machine_section(info) + "\n")
    for text in sections:
        print(text + "\n")
    print(table.targets_section(targets))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(inside(sys.argv[1:]) if INSIDE in os.environ else outside(sys.argv[1:]))
