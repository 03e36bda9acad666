"""The install suite: the built wheel installed the ways users install it (pip 23 in a stock
venv, current pip, pipx with each backend, `uv tool install`), each a real install into a
private directory. Every test here is marked `install` and `slow` (`-m "not slow"` leaves it
out).

The wheel is built once per session, from a copy of the work tree (a build writes build/ and
*.egg-info into its source directory). Installs are made on first use and shared by the tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REPO = HERE.parent.parent
# The interpreter under the test venv: every install is made for it, as a user's would be.
BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)
SKIP = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", ".venv"
)
QUIET = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects, which is also this hook
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this directory is `install` and `slow`: the fast suite (`-m "not slow"`,
    or `-m "not reliability and not install"`) leaves it out; plain `pytest` (CI's) runs it."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.install)
            item.add_marker(pytest.mark.slow)


def missing(reason: str) -> None:
    """Skip where a tool is missing, but fail in CI (MPAGENT_REQUIRE_ALL=1)."""
    if os.environ.get("MPAGENT_REQUIRE_ALL") == "1":
        pytest.fail(f"{reason} (MPAGENT_REQUIRE_ALL=1)", pytrace=False)
    pytest.skip(reason)


def run(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """Run a setup step; a failure fails the test with the step's output."""
    result = subprocess.run(
        argv, env=env or QUIET, cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result.stdout


def uv_command() -> list[str]:
    exe = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if not os.access(exe, os.X_OK):
        missing("uv is not installed (pip install uv, or '.[test]')")
    return [exe]


def pipx_command() -> list[str]:
    if subprocess.run([sys.executable, "-c", "import pipx"], check=False).returncode != 0:
        missing("pipx is not installed (pip install pipx, or '.[test]')")
    return [sys.executable, "-m", "pipx"]


@pytest.fixture(scope="session")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the work tree, as a user's checkout: what gets built and installed."""
    src = tmp_path_factory.mktemp("source") / "mpagent"
    shutil.copytree(REPO, src, ignore=SKIP)
    return src


@pytest.fixture(scope="session")
def wheel(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from the copy, once per session (by uv, which caches its build
    environment, where it is installed; else by pip)."""
    out = tmp_path_factory.mktemp("wheel")
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if os.access(uv, os.X_OK):
        run([uv, "build", "-q", "--wheel", "-o", str(out), str(source)])
    else:
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)])
    (built,) = out.glob("mpagent-*.whl")
    return built


@dataclass
class Install:
    """One way of installing: the `mpagent` command it made, and the interpreter that command
    runs (its shebang: path and flags), so `python -c pass` can be timed on the same one."""

    name: str
    command: Path
    interpreter: list[str]

    @property
    def script(self) -> Path:
        return self.command.resolve()


def shebang(command: Path) -> list[str]:
    line = command.resolve().read_bytes().split(b"\n", 1)[0].decode()
    assert line.startswith("#!") and "python" in line, f"{command}: not a Python script: {line}"
    return line[2:].split()


def stock_pip_venv(root: Path) -> tuple[Path, list[str]]:
    """A fresh venv and the pip a stock `python -m venv` gives it (23.2.1 on Python 3.11):
    (python, pip command). ensurepip's bundled wheel is run as it is, which skips ensurepip's
    slow copy into the venv; where the interpreter has no bundled wheel (Debian's), the venv is
    made the stock way."""
    import ensurepip

    bundled = sorted((Path(ensurepip.__file__).parent / "_bundled").glob("pip-*.whl"))
    if not bundled:
        run([BASE_PYTHON, "-m", "venv", str(root)])
        return root / "bin" / "python", [str(root / "bin" / "python"), "-m", "pip"]
    run([BASE_PYTHON, "-m", "venv", "--without-pip", str(root)])
    python = root / "bin" / "python"
    return python, [str(python), str(bundled[-1] / "pip")]


def install_pip(root: Path, wheel: Path, *, current: bool) -> Path:
    """The wheel installed (no dependencies) by pip 23, the one a stock Python 3.11 venv has
    and whose wrappers `import re`, or by the current pip."""
    python, pip = stock_pip_venv(root)
    version = run([*pip, "--version"]).split()[1]
    if current or not version.startswith("23."):
        run([*pip, "install", "-q", "--upgrade", "pip" if current else "pip>=23,<24"])
        pip = [str(python), "-m", "pip"]
    run([*pip, "install", "-q", "--no-deps", str(wheel)])
    return root / "bin" / "mpagent"


def install_pipx(root: Path, wheel: Path, backend: str) -> Path:
    env = dict(
        QUIET,
        PIPX_HOME=str(root / "home"),
        PIPX_BIN_DIR=str(root / "bin"),
        PIPX_MAN_DIR=str(root / "man"),
        PIPX_DEFAULT_BACKEND=backend,
    )
    # pipx reads each dependency's metadata to find its apps, so it cannot take --no-deps.
    pip_args = ["--pip-args=--no-compile"] if backend == "pip" else []
    run([*pipx_command(), "install", "--python", BASE_PYTHON, *pip_args, str(wheel)], env=env)
    return root / "bin" / "mpagent"


def install_uv(root: Path, wheel: Path) -> Path:
    env = dict(QUIET, UV_TOOL_DIR=str(root / "tools"), UV_TOOL_BIN_DIR=str(root / "bin"))
    run([*uv_command(), "tool", "install", "-q", "--python", BASE_PYTHON, str(wheel)], env=env)
    return root / "bin" / "mpagent"


INSTALLERS: dict[str, Callable[[Path, Path], Path]] = {
    "pip 23 venv": lambda root, whl: install_pip(root, whl, current=False),
    "current pip venv": lambda root, whl: install_pip(root, whl, current=True),
    "pipx (pip backend)": lambda root, whl: install_pipx(root, whl, "pip"),
    "pipx (uv backend)": lambda root, whl: install_pipx(root, whl, "uv"),
    "uv tool install": install_uv,
}


@pytest.fixture(scope="session")
def installs(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Install]:
    """installs(name) -> the Install made by that installer, made on first use."""
    made: dict[str, Install] = {}

    def get(name: str) -> Install:
        if name not in made:
            root = tmp_path_factory.mktemp(name.split()[0])
            command = INSTALLERS[name](root, wheel)
            assert command.exists(), (
                f"{name} made no {command}: {sorted(os.listdir(command.parent))}"
            )
            made[name] = Install(name, command, shebang(command))
        return made[name]

    return get
