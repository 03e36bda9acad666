"""Measurement 6: cached `mpagent get` and `mpagent env` per installer, each against
`python -c pass` on the interpreter its command runs (the shebang's path and flags).

The bench's wheel (bootstrap.py builds it once) is installed the ways users install it:
- pip 23 venv: a `--without-pip` venv, the wheel installed by the pip that `python -m venv`
  would seed (ensurepip's bundled wheel, 23.2.1 on Python 3.11), run from that wheel;
- current pip venv: the bench's own venv (current pip, non-editable install);
- pipx, pip backend and uv backend (pipx ≥ 1.18 picks uv when it is installed);
- `uv tool install`.
All run one agent (the bench venv's) through one socket; pairs alternate as in measurement 1.
The installs are made fresh in a temp dir for each run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from stack import Stack
from startup import paired
from sysinfo import median

QUIET = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run(argv: list[str], env: dict[str, str] | None = None) -> str:
    out = subprocess.run(argv, env=env or QUIET, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {out.returncode}:\n{out.stdout}{out.stderr}")
    return out.stdout


def bundled_pip() -> Path:
    import ensurepip

    (pip,) = (Path(ensurepip.__file__).parent / "_bundled").glob("pip-*.whl")
    return pip / "pip"


def make_installs(root: Path, wheel: Path, bin_dir: Path) -> dict[str, Path]:
    """installer name -> the `mpagent` command it made."""
    base = getattr(sys, "_base_executable", sys.executable)
    made = {}

    say("install: pip 23 venv")
    venv = root / "pip23"
    run([base, "-m", "venv", "--without-pip", str(venv)])
    run(
        [str(venv / "bin" / "python"), str(bundled_pip()), "install", "-q", "--no-deps", str(wheel)]
    )
    made["pip 23 venv"] = venv / "bin" / "mpagent"

    made["current pip venv"] = bin_dir / "mpagent"

    for backend in ("pip", "uv"):
        say(f"install: pipx ({backend} backend)")
        home = root / f"pipx-{backend}"
        env = dict(
            QUIET,
            PIPX_HOME=str(home / "home"),
            PIPX_BIN_DIR=str(home / "bin"),
            PIPX_MAN_DIR=str(home / "man"),
            PIPX_DEFAULT_BACKEND=backend,
        )
        run([sys.executable, "-m", "pipx", "install", "--python", base, str(wheel)], env=env)
        made[f"pipx ({backend} backend)"] = home / "bin" / "mpagent"

    say("install: uv tool install")
    tools = root / "uv"
    env = dict(QUIET, UV_TOOL_DIR=str(tools / "tools"), UV_TOOL_BIN_DIR=str(tools / "bin"))
    run([str(bin_dir / "uv"), "tool", "install", "-q", "--python", base, str(wheel)], env=env)
    made["uv tool install"] = tools / "bin" / "mpagent"
    return made


def interpreter(command: Path) -> list[str]:
    """The shebang of the command: interpreter path and flags (pipx adds -E)."""
    line = command.resolve().read_bytes().split(b"\n", 1)[0].decode()
    if not line.startswith("#!") or "python" not in line:
        raise RuntimeError(f"{command}: not a Python script ({line!r})")
    return line[2:].split()


def installer_version(name: str, command: Path) -> str:
    python = interpreter(command)[0]
    if name.startswith("pip 23"):
        return "pip " + bundled_pip().parent.name.split("-")[1]
    if name.startswith("current pip"):
        return "pip " + run([python, "-m", "pip", "--version"]).split()[1]
    if name.startswith("pipx"):
        return "pipx " + run([sys.executable, "-m", "pipx", "--version"]).strip()
    return "uv " + run([str(Path(sys.executable).with_name("uv")), "--version"]).split()[1]


def measure(bin_dir: Path, wheel: Path, *, runs: int) -> list[dict]:
    scope = "bench:s0000"
    rows = []
    with tempfile.TemporaryDirectory(prefix="mpb-inst-") as tmp:
        installs = make_installs(Path(tmp), wheel, bin_dir)
        with Stack(bin_dir, [scope], lifetime=3600) as st:
            st.start_agent()
            # As for a user: Python writes the .pyc files an install did not (uv compiles none
            # by default) on the first run. PYTHONDONTWRITEBYTECODE, set on some machines (this
            # one), would have every run of a uv install compile mpagent's modules again.
            env = {k: v for k, v in st.env.items() if k != "PYTHONDONTWRITEBYTECODE"}
            for name, command in installs.items():
                python = [*interpreter(command), "-c", "pass"]
                text = command.resolve().read_text(encoding="utf-8")
                row: dict = {
                    "installer": name,
                    "version": installer_version(name, command),
                    "launcher": "generated" if "__name__" in text else "shipped",
                    "imports re": "import re" in (line.strip() for line in text.splitlines()),
                    "interpreter": " ".join(interpreter(command)),
                }
                for verb, argv in (
                    ("get", [str(command), "get", scope]),
                    ("env", [str(command), "env"]),
                ):
                    say(f"6. {name}: {verb}")
                    try:
                        t_py, t_cmd, _ = paired(python, argv, env, runs, warmup=10)
                    except RuntimeError as exc:  # e.g. a verb the installed version lacks
                        row[verb] = {"error": str(exc).splitlines()[0]}
                        continue
                    row[verb] = {
                        "python_ms": median(t_py) * 1e3,
                        "command_ms": median(t_cmd) * 1e3,
                        "ratio": median([c / p for c, p in zip(t_cmd, t_py, strict=True)]),
                        "n": runs,
                    }
                rows.append(row)
    return rows
