"""Measurement 1: whole-process cost of `mpagent get` with a cached token.

Runs are paired: each loop iteration runs `python -c pass` (same interpreter as the
console script's shebang) and `mpagent get SCOPE` back to back, alternating which goes first,
so slow phases of a shared machine hit both alike; the ratio is taken per pair. Processes are
started with posix_spawn (vfork, no copy of this large process) and timed with perf_counter
from spawn to reaped exit, stdin and stdout on /dev/null.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from stack import Stack
from sysinfo import median, percentile

DEVNULL_IO = [
    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
]


def spawn_seconds(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, env, file_actions=DEVNULL_IO)
    _, status = os.waitpid(pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited with status {os.waitstatus_to_exitcode(status)}"
        )
    return elapsed


def paired(
    a: list[str],
    b: list[str],
    env: dict[str, str],
    runs: int,
    warmup: int,
    extra: list[str] | None = None,
) -> tuple[list[float], list[float], list[float]]:
    """`runs` pairs of (a, b), order alternating; `extra` (if any) runs once per pair too."""
    ta, tb, tx = [], [], []
    for i in range(warmup + runs):
        if i % 2:
            db, da = spawn_seconds(b, env), spawn_seconds(a, env)
        else:
            da, db = spawn_seconds(a, env), spawn_seconds(b, env)
        dx = spawn_seconds(extra, env) if extra else 0.0
        if i >= warmup:
            ta.append(da)
            tb.append(db)
            tx.append(dx)
    return ta, tb, tx


def summary(times: list[float]) -> dict[str, float]:
    return {
        "n": len(times),
        "median_ms": median(times) * 1e3,
        "p99_ms": percentile(times, 99) * 1e3,
    }


def hyperfine(commands: list[list[str]], env: dict[str, str], runs: int) -> list[float] | None:
    """hyperfine's medians (ms) for the same commands, unpaired, as a cross-check."""
    exe = shutil.which("hyperfine")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "hf.json"
        subprocess.run(
            [
                exe,
                "-N",
                "--warmup",
                "10",
                "--runs",
                str(runs),
                "--style",
                "none",
                "--export-json",
                str(out),
                *[" ".join(c) for c in commands],
            ],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return [r["median"] * 1e3 for r in json.loads(out.read_text())["results"]]


def measure(bin_dir: Path, *, runs: int, no_agent_runs: int) -> dict:
    python = [str(bin_dir / "python"), "-c", "pass"]
    scope = "bench:s0000"
    with Stack(bin_dir, [scope], lifetime=3600) as st:
        st.start_agent()
        get = [str(bin_dir / "mpagent"), "get", scope]
        check = subprocess.run(get, env=st.env, capture_output=True, text=True, check=True)
        assert check.stdout.count("\n") == 1 and len(check.stdout) > 100, "get printed no token"
        cat = [shutil.which("cat") or "/bin/cat", str(st.env_file)]
        t_py, t_get, t_cat = paired(python, get, st.env, runs, warmup=10, extra=cat)
        ratios = [g / p for g, p in zip(t_get, t_py, strict=True)]
        no_agent = [*get, "--no-agent"]
        t_py2, t_one, _ = paired(python, no_agent, st.env, no_agent_runs, warmup=2)
        hf = hyperfine([python, get, cat], st.env, runs=min(runs, 100))
    return {
        "python -c pass": summary(t_py),
        "mpagent get (cached)": summary(t_get),
        "mpagent get --no-agent": summary(t_one),
        "cat env file": summary(t_cat),
        "ratio_median_of_pairs": median(ratios),
        "ratio_of_medians": median(t_get) / median(t_py),
        "extra_ms_median_of_pairs": median(
            [(g - p) * 1e3 for g, p in zip(t_get, t_py, strict=True)]
        ),
        "no_agent_ratio_median_of_pairs": median(
            [o / p for o, p in zip(t_one, t_py2, strict=True)]
        ),
        "hyperfine_medians_ms": (
            None
            if hf is None
            else dict(
                zip(["python -c pass", "mpagent get (cached)", "cat env file"], hf, strict=True)
            )
        ),
    }
