"""The installed `mpagent` command, per installer: it is the shipped launcher, and a cached
`get` and `env` through it import only the stdlib-only hot half. The base install needs no
compiler. Real installs of the built wheel, a real agent, the emulator on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mpagent.emulator import Emulator, pki

from ..agentproc import AgentProcess
from ..conftest import PASSWORD, SCOPES, profile_for, run_cli, write_config
from ..keystores import write_jks
from ..test_fastpath import HOT_HALF
from .conftest import (
    INSTALLERS,
    QUIET,
    REPO,
    Install,
    missing,
    run,
    stock_pip_venv,
)

# Standard-library modules that each cost more than the hot half's own code; `re` is what
# pip 23's console-script wrapper imports, the reason the launcher is shipped.
HEAVY_STDLIB = {"re", "typing", "json", "argparse", "socket", "asyncio", "shlex", "enum"}


@pytest.fixture
def agent(
    tmp_path: Path, home: Path, emulator: Emulator, p12: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[AgentProcess]:
    """An agent (the test venv's) with two scopes; installed commands reach it as clients."""
    profile = profile_for(emulator, p12, scopes=list(SCOPES[:2]))
    config = write_config(tmp_path / "config.toml", {"dev": profile})
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    monkeypatch.setenv("MPAGENT_NO_AUTOSTART", "1")
    proc = AgentProcess(config, tmp_path / "agent.log").wait_ready()
    yield proc
    proc.stop()


def imports(install: Install, *argv: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the installed command as its shebang would, under `-X importtime` (a shebang may
    carry -E, which ignores PYTHONPROFILEIMPORTTIME); return the result and the modules it
    imported beyond what `python -c pass` on the same interpreter imports."""

    def timed(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*install.interpreter, "-X", "importtime", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def modules(stderr: str) -> set[str]:
        return {
            line.rsplit("|", 1)[1].strip()
            for line in stderr.splitlines()
            if line.startswith("import time:") and "imported package" not in line
        }

    baseline = modules(timed("-c", "pass").stderr)
    result = timed(str(install.script), *argv)
    return result, modules(result.stderr) - baseline


def assert_hot_only(extra: set[str]) -> None:
    mpagent = {m for m in extra if m.split(".")[0] == "mpagent"}
    outside = {m for m in extra - mpagent if m.split(".")[0] not in sys.stdlib_module_names}
    assert mpagent <= HOT_HALF, f"cold mpagent modules imported: {sorted(mpagent - HOT_HALF)}"
    assert not outside, f"non-stdlib modules imported: {sorted(outside)}"
    assert not extra & HEAVY_STDLIB, (
        f"heavy stdlib modules imported: {sorted(extra & HEAVY_STDLIB)}"
    )


@pytest.mark.parametrize("name", list(INSTALLERS))
def test_installed_command_is_the_shipped_launcher(
    name: str, installs: Callable[[str], Install]
) -> None:
    """Each installer installs launcher/mpagent itself, pointed at its own interpreter, not a
    generated console-script wrapper."""
    install = installs(name)
    shipped = (REPO / "launcher" / "mpagent").read_text(encoding="utf-8").split("\n", 1)[1]
    installed = install.script.read_text(encoding="utf-8")
    assert installed.split("\n", 1)[1] == shipped, installed
    interpreter = Path(install.interpreter[0])
    assert interpreter.parent == install.script.parent and interpreter.name.startswith("python")


@pytest.mark.parametrize("name", list(INSTALLERS))
def test_cached_get_and_env_import_only_the_hot_half(
    name: str, installs: Callable[[str], Install], agent: AgentProcess
) -> None:
    """Through each installer's command, a cached `get` prints the agent's token and `env` its
    export lines, and neither imports a cold mpagent module, anything outside the standard
    library, or re, typing, json, argparse, socket, asyncio, shlex or enum."""
    install = installs(name)
    token = run_cli("get", SCOPES[0]).stdout.strip()
    assert token.count(".") == 2, "the agent gave the test venv's CLI no token"

    result, extra = imports(install, "get", SCOPES[0])
    assert result.returncode == 0, result.stderr
    assert result.stdout == token + "\n"
    assert_hot_only(extra)

    result, extra = imports(install, "env")
    assert result.returncode == 0, result.stderr
    assert f"export MASKINPORTEN_TOKEN_IDPORTEN_DCR_READ={token}" in result.stdout.splitlines()
    assert_hot_only(extra)


def test_closed_stdout_fails_as_with_a_normal_exit(
    installs: Callable[[str], Install], agent: AgentProcess
) -> None:
    """The launcher's early exit after a cached `get` keeps a failed write visible: with stdout
    a closed pipe it exits as `python -m mpagent` does (120, the interpreter's status when
    flushing stdout fails) and says so on stderr. stdout is block-buffered, as in a user's
    shell, so the failure comes at the flush."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

    def closed_stdout(argv: list[str]) -> subprocess.CompletedProcess[str]:
        read, write = os.pipe()
        os.close(read)
        try:
            return subprocess.run(
                argv,
                env=env,
                stdout=write,
                stderr=subprocess.PIPE,
                text=True,
                timeout=30,
                check=False,
            )
        finally:
            os.close(write)

    launched = closed_stdout([str(installs("pip 23 venv").command), "get", SCOPES[0]])
    normal = closed_stdout([sys.executable, "-m", "mpagent", "get", SCOPES[0]])
    assert normal.returncode == 120, normal.stderr
    assert launched.returncode == 120 and "BrokenPipeError" in launched.stderr, launched.stderr


def test_windows_wheel_gets_the_entry_point(
    source: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Built for Windows (setup.py sees win32), the wheel declares the console-script entry
    point, and pip then installs the generated wrapper instead of the script of that name."""
    root = tmp_path_factory.mktemp("winbuild")
    shutil.copytree(source, root / "source")  # the build writes into its source directory
    python, pip = stock_pip_venv(root / "venv")
    run([*pip, "install", "-q", "setuptools>=77"])
    build = (
        "import sys; sys.platform = 'win32'\n"
        "from setuptools import build_meta\n"
        f"print(build_meta.build_wheel({str(root / 'out')!r}))\n"
    )
    name = run([str(python), "-c", build], cwd=root / "source").strip().splitlines()[-1]
    with zipfile.ZipFile(root / "out" / name) as whl:
        (path,) = [n for n in whl.namelist() if n.endswith(".dist-info/entry_points.txt")]
        entry_points = whl.read(path).decode()
    assert "[console_scripts]\nmpagent = mpagent.cli:main" in entry_points

    target = root / "target"
    run(
        [
            *pip,
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(root / "out" / name),
        ]
    )
    installed = (target / "bin" / "mpagent").read_text(encoding="utf-8")
    assert "from mpagent.cli import main" in installed and "if __name__ ==" in installed


def test_base_install_needs_no_compiler_and_jks_gets_the_keytool_command(
    source: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    home: Path,
    emulator: Emulator,
    leaf: pki.Issued,
) -> None:
    """`pip install .` without extras succeeds in a stock venv whose CC and CXX are `false`
    and brings no pyjks; there a JKS keystore fails (exit 78) with the keytool command that
    converts it to PKCS#12."""
    try:
        import jks  # noqa: F401  (the test venv makes the JKS; the base install cannot read it)
    except ImportError:
        missing("pyjks is not installed in the test venv (pip install '.[test]')")
    root = tmp_path_factory.mktemp("base")
    python, pip = stock_pip_venv(root)
    no_compiler = dict(QUIET, CC="false", CXX="false")
    run([*pip, "install", "-q", "--no-compile", str(source)], env=no_compiler)
    assert subprocess.run([str(python), "-c", "import jks"], check=False).returncode != 0

    keystore = write_jks(tmp_path / "virksomhet.jks", {"auth": leaf}, PASSWORD, PASSWORD)
    config = write_config(tmp_path / "config.toml", {"dev": profile_for(emulator, keystore)})
    result = subprocess.run(
        [str(root / "bin" / "mpagent"), "--config", str(config), "get", SCOPES[0], "--no-agent"],
        env=dict(QUIET, MPAGENT_KEYSTORE_PASSWORD=PASSWORD),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    command = (
        f"keytool -importkeystore -srckeystore {keystore} -srcstoretype JKS"
        f" -destkeystore {keystore.with_suffix('.p12')} -deststoretype PKCS12"
    )
    assert result.returncode == 78, result.stderr
    assert result.stdout == "" and command in result.stderr, result.stderr
