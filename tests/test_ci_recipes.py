"""The CI recipes in docs/ci/ run for real: each YAML is parsed, its job's commands are run
in bash as the CI runner would (GitHub Actions: each step's `run` with the job's and step's
env, `${{ }}` filled in; GitLab CI: the `script` lines in one shell with `variables`),
against the emulator, with the keystore a generated PKCS#12 as base64 in the environment and
a stub ./deploy.sh that checks the token it was given. Only the install step is left out (it
needs the network; mpagent comes from this venv)."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mpagent.emulator import Emulator

from .conftest import CLIENT_ID, PASSWORD, SCOPES, write_config

RECIPES = Path(__file__).parent.parent / "docs" / "ci"
SCOPE = SCOPES[0]
VENV_BIN = str(Path(sys.executable).parent)

# Checks what it was given and writes what it saw (never the token) to deploy.result.
DEPLOY_SH = """#!/bin/bash
set -eu
case "$MASKINPORTEN_TOKEN" in eyJ*.*.*) ;; *) echo "no token" >&2; exit 3 ;; esac
test "$MASKINPORTEN_TOKEN_EXPIRES_AT" -gt "$(date +%s)"
python3 - > deploy.result <<'EOF'
import base64, hashlib, json, os
token = os.environ["MASKINPORTEN_TOKEN"]
body = token.split(".")[1]
claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
print(json.dumps({"client_id": claims.get("client_id"), "scope": claims.get("scope"),
                  "sha256": hashlib.sha256(token.encode()).hexdigest()}))
EOF
"""


@pytest.fixture
def workspace(home: Path, tmp_path: Path, emulator: Emulator) -> Path:
    """A checked-out repository as the recipes expect it: mpagent.toml (the recipe's, with the
    emulator as environment and its test client and scope) and ./deploy.sh."""
    work = tmp_path / "repo"
    work.mkdir()
    profile = {
        "environment": emulator.issuer,
        "client_id": CLIENT_ID,
        "scopes": [SCOPE],
        "env_names": {SCOPE: "MASKINPORTEN_TOKEN"},
    }
    write_config(work / "mpagent.toml", {"ci": profile}, agent={"mode": "server"})
    deploy = work / "deploy.sh"
    deploy.write_text(DEPLOY_SH, encoding="utf-8")
    deploy.chmod(0o755)
    return work


@pytest.fixture
def keystore_b64(p12_bytes: bytes) -> str:
    return base64.b64encode(p12_bytes).decode("ascii")


def runner_env(home: Path, **extra: str) -> dict[str, str]:
    """A runner's environment: PATH (this venv's mpagent first), HOME, TMPDIR and the XDG
    dirs of the test, nothing of mpagent's own."""
    keep = ("HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR", "XDG_STATE_HOME", "XDG_DATA_HOME")
    env = {k: os.environ[k] for k in keep}
    env["TMPDIR"] = str(job_tmp(home))
    env["PATH"] = VENV_BIN + os.pathsep + os.environ["PATH"]
    env["PYTHON_KEYRING_BACKEND"] = "keyring.backends.fail.Keyring"  # a runner has none
    return {**env, **extra}


def bash(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def github_expressions(text: str, values: dict[str, str]) -> str:
    """`${{ name }}` filled in from `values`; an expression the test does not know fails it."""

    def fill(match: re.Match[str]) -> str:
        name = match.group(1).strip()
        assert name in values, f"unknown expression {name}"
        return values[name]

    return re.sub(r"\$\{\{(.*?)\}\}", fill, text)


def job_tmp(home: Path) -> Path:
    """The job's TMPDIR (in the test's HOME)."""
    tmp = home / "job-tmp"
    tmp.mkdir(exist_ok=True)
    return tmp


def snapshot(home: Path) -> set[Path]:
    """Every path under the places a job could write to, before it runs: what it adds is
    what the checks look at (/tmp: only entries new since, the rest of it is not ours)."""
    roots = [home, Path(os.environ["XDG_RUNTIME_DIR"]), Path("/tmp")]
    found: set[Path] = set()
    for root in roots:
        found.update(_walk(root, top_only=root == Path("/tmp")))
    return found


def _walk(root: Path, *, top_only: bool = False) -> list[Path]:
    try:
        return list(root.iterdir()) if top_only else list(root.rglob("*"))
    except OSError:
        return []


def is_install(command: str) -> bool:
    return bool(re.fullmatch(r'python -m pip install "\$MPAGENT_PACKAGE"', command.strip()))


def assert_job_left_nothing(
    work: Path,
    home: Path,
    p12_bytes: bytes,
    emulator: Emulator,
    result: Any,
    before: set[Path],
) -> None:
    """deploy.sh got a token of the client for the scope; no file in the test's directory,
    the job's TMPDIR, the runtime dir or what appeared in /tmp during the job holds the
    keystore (raw or as its base64 text), nor one in the test's own directories a token;
    every file the job wrote there is closed to others; no agent process or socket remains."""
    assert result.returncode == 0, result.stdout + result.stderr
    seen = json.loads((work / "deploy.result").read_text(encoding="utf-8"))
    assert (seen["client_id"], seen["scope"]) == (CLIENT_ID, SCOPE)
    assert emulator.tokens_issued == 1
    b64_text = base64.b64encode(p12_bytes)
    new_in_tmp = [p for p in _walk(Path("/tmp"), top_only=True) if p not in before]
    roots = [work.parent, home, Path(os.environ["XDG_RUNTIME_DIR"]), *new_in_tmp]
    written = []
    for root in roots:
        for path in [root, *_walk(root)] if root.is_dir() else [root]:
            if not path.is_file() or path.is_symlink():
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue  # another user's, in /tmp: not the job's
            assert p12_bytes not in data and b64_text[:64] not in data, path
            if root in new_in_tmp:
                continue  # /tmp is shared with other processes: the keystore is what counts
            assert b"eyJ" not in data or path.name == "deploy.sh", path
            if path not in before:
                written.append(path)
    assert work / "deploy.result" in written
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path  # umask 077 and 0600
    assert not list(Path(os.environ["XDG_RUNTIME_DIR"]).rglob("*.sock"))
    assert not agents_of(home), "an agent outlived the job"
    assert "eyJ" not in result.stdout + result.stderr  # nothing printed the token


def agents_of(home: Path) -> list[int]:
    """Processes running with this test's HOME: whatever the job left behind."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"HOME={home}".encode() in environ:
            found.append(int(proc.name))
    return found


def test_github_actions_recipe_runs(
    home: Path, workspace: Path, emulator: Emulator, keystore_b64: str, p12_bytes: bytes
) -> None:
    """docs/ci/github-actions.yml: every step but the install runs in bash with its env;
    ./deploy.sh gets the token, and nothing is left (files, agent, output)."""
    doc = yaml.safe_load((RECIPES / "github-actions.yml").read_text(encoding="utf-8"))
    (job,) = doc["jobs"].values()
    values = {
        "github.workspace": str(workspace),
        "secrets.MASKINPORTEN_KEYSTORE_B64": keystore_b64,
        "secrets.MASKINPORTEN_KEYSTORE_PASSWORD": PASSWORD,
    }
    job_env = {k: github_expressions(str(v), values) for k, v in job.get("env", {}).items()}
    runs = [s for s in job["steps"] if "run" in s]
    assert [s["name"] for s in runs if is_install(s["run"])] == ["Install mpagent"]
    assert any("mpagent exec" in s["run"] for s in runs)
    result = None
    before = snapshot(home) | set(_walk(workspace.parent))
    for step in runs:
        if is_install(step["run"]):
            continue
        step_env = {k: github_expressions(str(v), values) for k, v in step.get("env", {}).items()}
        assert "${{" not in step["run"], "secrets must reach the script through env, not text"
        result = bash(step["run"], runner_env(home, **job_env, **step_env), workspace)
        assert result.returncode == 0, (step["name"], result.stderr)
    assert_job_left_nothing(workspace, home, p12_bytes, emulator, result, before)


def test_gitlab_ci_recipe_runs(
    home: Path, workspace: Path, emulator: Emulator, keystore_b64: str, p12_bytes: bytes
) -> None:
    """docs/ci/gitlab-ci.yml: the job's script lines but the install run in one bash with
    its variables and the CI/CD variables; ./deploy.sh gets the token, nothing is left."""
    doc = yaml.safe_load((RECIPES / "gitlab-ci.yml").read_text(encoding="utf-8"))
    (job,) = (v for k, v in doc.items() if isinstance(v, dict) and "script" in v)
    lines = [line for line in job["script"] if not is_install(line)]
    assert len(lines) == len(job["script"]) - 1
    assert any("mpagent exec" in line for line in lines)
    # GitLab expands $VAR in `variables` from the predefined ones: as bash would here.
    exports = [f'export {k}="{v}"' for k, v in job.get("variables", {}).items()]
    env = runner_env(
        home,
        CI_PROJECT_DIR=str(workspace),
        MPAGENT_KEYSTORE_B64=keystore_b64,
        MPAGENT_KEYSTORE_PASSWORD=PASSWORD,
    )
    before = snapshot(home) | set(_walk(workspace.parent))
    result = bash("\n".join([*exports, *lines]), env, workspace)
    assert_job_left_nothing(workspace, home, p12_bytes, emulator, result, before)


def test_recipe_fails_the_job_without_the_secret(
    home: Path, workspace: Path, emulator: Emulator
) -> None:
    """The GitLab job with MPAGENT_KEYSTORE_B64 not defined for it (expands to "") fails
    before deploy.sh runs, saying the variable is empty."""
    doc = yaml.safe_load((RECIPES / "gitlab-ci.yml").read_text(encoding="utf-8"))
    job = doc["deploy"]
    lines = [line for line in job["script"] if not is_install(line)]
    exports = [f'export {k}="{v}"' for k, v in job["variables"].items()]
    env = runner_env(home, CI_PROJECT_DIR=str(workspace), MPAGENT_KEYSTORE_B64="")
    result = bash("\n".join([*exports, *lines]), env, workspace)
    assert result.returncode == 78
    assert "MPAGENT_KEYSTORE_B64" in result.stderr and "empty" in result.stderr
    assert not (workspace / "deploy.result").exists()


def test_exec_no_agent_still_works_and_recipes_use_plain_exec(
    home: Path, workspace: Path, emulator: Emulator, keystore_b64: str, p12_bytes: bytes
) -> None:
    """Both recipes run the issue's plain `mpagent exec -- ./deploy.sh` (server mode fetches
    in-process when no agent answers); the GitLab job with `exec --no-agent` instead works
    the same and leaves nothing behind."""
    for recipe in ("gitlab-ci.yml", "github-actions.yml"):
        text = (RECIPES / recipe).read_text(encoding="utf-8")
        assert re.search(r"^\s*-? ?mpagent exec -- \./deploy\.sh$", text, re.M), recipe
    doc = yaml.safe_load((RECIPES / "gitlab-ci.yml").read_text(encoding="utf-8"))
    job = doc["deploy"]
    lines = [
        line.replace("mpagent exec --", "mpagent exec --no-agent --")
        for line in job["script"]
        if not is_install(line)
    ]
    assert any(line.startswith("mpagent exec --no-agent -- ") for line in lines)
    exports = [f'export {k}="{v}"' for k, v in job["variables"].items()]
    env = runner_env(
        home,
        CI_PROJECT_DIR=str(workspace),
        MPAGENT_KEYSTORE_B64=keystore_b64,
        MPAGENT_KEYSTORE_PASSWORD=PASSWORD,
    )
    before = snapshot(home) | set(_walk(workspace.parent))
    result = bash("\n".join([*exports, *lines]), env, workspace)
    assert_job_left_nothing(workspace, home, p12_bytes, emulator, result, before)
