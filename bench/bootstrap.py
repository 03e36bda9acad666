"""The bench's own venv under /tmp: a current pip, pipx and uv, and this repository built
into a wheel (from a copy of the work tree) and installed from it, non-editable. Measurement
6 installs the same wheel with the other installers. Stdlib only.

Why a venv of its own: an editable install adds an import hook (a .pth file and a finder)
that every `python` start pays for, and pip before 25 writes console-script wrappers that
`import re` (~6 ms). Either would make `mpagent get` look slower than a user's install.
Why a copy: building in place would write build/ and *.egg-info into the work tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_VENV = Path(tempfile.gettempdir()) / "mpagent-bench-venv"
WHEEL_DIR = Path(tempfile.gettempdir()) / "mpagent-bench-wheel"
SKIP = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", ".venv"
)


def prepare(repo: Path, venv: Path, *, fresh: bool) -> dict[str, str]:
    """Create (or reuse) the venv, upgrade pip, reinstall the repo; describe the result."""
    if fresh and venv.exists():
        shutil.rmtree(venv)
    python = venv / "bin" / "python"
    if not python.exists():
        say(f"creating venv {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    pip = [str(python), "-m", "pip"]
    say("pip install -U pip pipx uv")
    subprocess.run([*pip, "install", "-q", "-U", "pip", "pipx", "uv"], check=True, env=env)
    shutil.rmtree(WHEEL_DIR, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="mpagent-bench-src-") as tmp:
        src = Path(tmp) / "mpagent"
        shutil.copytree(repo, src, ignore=SKIP)
        say(f"pip wheel {repo} (from a copy)")
        subprocess.run(
            [*pip, "wheel", "-q", "--no-deps", "-w", str(WHEEL_DIR), str(src)], check=True, env=env
        )
    (wheel,) = WHEEL_DIR.glob("mpagent-*.whl")
    say(f"pip install {wheel.name} (non-editable)")
    # The version number does not change with the code: uninstall first, or pip keeps the old.
    subprocess.run([*pip, "uninstall", "-q", "-y", "mpagent"], check=False, env=env)
    subprocess.run([*pip, "install", "-q", str(wheel)], check=True, env=env)
    # Python 3.11's venv seeds setuptools, whose distutils-precedence.pth runs at every start;
    # 3.12+ venvs have none. Without it `python -c pass` is the leaner, stricter baseline.
    if any(venv.glob("lib/python*/site-packages/distutils-precedence.pth")):
        subprocess.run(
            [str(python), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True, env=env
        )
    pip_version = subprocess.run(
        [str(python), "-m", "pip", "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    wrapper = (venv / "bin" / "mpagent").read_text(encoding="utf-8")
    return {
        "source": source_revision(repo),
        "venv": str(venv),
        "wheel": str(wheel),
        "pip": pip_version,
        "wrapper imports re": "yes" if "import re" in wrapper.splitlines() else "no",
    }


def source_revision(repo: Path) -> str:
    """The commit installed, and whether the package's files differ from it. Read-only:
    GIT_OPTIONAL_LOCKS=0 stops `git status` from refreshing the index."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, env=env, check=False
        )
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "not a git checkout"
    changed = git("status", "--porcelain", "--", "mpagent", "pyproject.toml")
    return f"{commit}" + (" + uncommitted changes in mpagent/" if changed else " (clean)")


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
