"""Real HTTP tools get Maskinporten tokens by themselves: newman runs the collection that
`mpagent postman` generates (its pre-request-script variant, through the token bridge), and
httpyac runs .http files that read the agent's env file or use its own OAuth2
client-credentials flow against the bridge. A local API (tests/testapi.py) accepts only
valid, unexpired tokens from the emulator, so a success means a real token reached it.
The commands run are the ones mpagent prints and the README shows, in bash, with the
secret in no argv: newman reads it from a pipe, httpyac from its environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpagent import postman
from mpagent.emulator import Emulator, pki

from .agentproc import wait_for
from .conftest import CLIENT_ID, SCOPES, issuer_key, run_cli
from .test_bridge import (  # noqa: F401 - bridge_env is a fixture
    Running,
    bridge_config,
    bridge_env,
    free_port,
    make_secret,
    start_agent,
)
from .testapi import ProtectedApi

LIFETIME = 6
ENV_NAME = "MASKINPORTEN_TOKEN_IDPORTEN_DCR_READ"
# Read now: the `home` fixture clears MPAGENT_* from the environment of every test.
REQUIRE_ALL = os.environ.get("MPAGENT_REQUIRE_ALL") == "1"


def tool(name: str) -> str:
    """The tool's path; without it skip, naming the install command, or fail in CI."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed; install it with `npm install -g newman httpyac`"
        if REQUIRE_ALL:
            pytest.fail(f"{reason} (MPAGENT_REQUIRE_ALL=1)", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def newman() -> str:
    return tool("newman")


@pytest.fixture(scope="session")
def httpyac() -> str:
    return tool("httpyac")


@pytest.fixture
def short_emulator(ca: pki.Issued) -> Iterator[Emulator]:
    with Emulator(
        signing_key=issuer_key(),
        clients={CLIENT_ID: SCOPES},
        trust=[ca.cert],
        token_lifetime=LIFETIME,
    ) as emu:
        yield emu


@pytest.fixture
def api(short_emulator: Emulator) -> Iterator[ProtectedApi]:
    with ProtectedApi(short_emulator.issuer, SCOPES[0]) as protected:
        yield protected


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """Where the tools' files go (beside, for httpyac, the agent's env file as .env)."""
    directory = tmp_path / "work"
    directory.mkdir()
    return directory


@pytest.fixture
def running(
    bridge_env: None,  # noqa: F811
    tmp_path: Path,
    work: Path,
    short_emulator: Emulator,
    p12: Path,
) -> Iterator[Running]:
    port = free_port()
    cfg = bridge_config(
        tmp_path / "config.toml", short_emulator, p12, port, env_file=str(work / ".env")
    )
    run = start_agent(cfg, tmp_path / "agent.log", port, make_secret(cfg))
    yield run
    run.agent.stop()


def run_tool(
    *argv: str, cwd: Path, env: dict[str, str] | None = None, status: int | None = 0
) -> str:
    """Run a tool; its exit status must be `status` (0, or None for any failure)."""
    result = subprocess.run(
        argv,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    expected = result.returncode != 0 if status is None else result.returncode == status
    assert expected, f"{argv[0]} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


# `mpagent` in the scripts below is this test's mpagent, whatever is on PATH.
SHELL_MPAGENT = 'mpagent() { "$MPAGENT_TEST_PYTHON" -m mpagent "$@"; }\n'


def run_shell(script: str, cwd: Path, status: int | None = 0) -> str:
    """A recipe as a user types it, in bash (process substitution `<(...)` is bash's)."""
    bash = shutil.which("bash") or "/bin/bash"
    env = {"MPAGENT_TEST_PYTHON": sys.executable}
    return run_tool(bash, "-c", SHELL_MPAGENT + script, cwd=cwd, env=env, status=status)


def postman_files(running: Running, work: Path) -> str:
    """`mpagent postman` into `work`; returns the newman line it printed."""
    result = run_cli(
        "--config", str(running.config), "postman", "--profile", "dev", "--out", str(work)
    )
    assert result.returncode == 0, result.stderr
    return next(line.strip() for line in result.stdout.splitlines() if "newman run" in line)


def assert_clean_log(running: Running, api: ProtectedApi) -> None:
    log = running.agent.log()
    assert running.secret not in log and "eyJ" not in log
    assert all(token not in log for token, _ in api.accepted)


def test_newman_runs_the_printed_command_across_a_refresh(
    newman: str, running: Running, api: ProtectedApi, work: Path
) -> None:
    """The newman line `mpagent postman` prints works, again after a refresh, with a new token."""
    line = postman_files(running, work)
    assert running.secret not in line and "--with-secret" in line
    command = line.replace("https://api.example.no", api.url) + " --color off"
    out = run_shell(command, cwd=work)
    assert "the API accepts the Maskinporten token" in out
    assert len(api.accepted) == 1, api.refused
    first, claims = api.accepted[0]
    wait_for(lambda: time.time() > claims["exp"] + 0.5, timeout=LIFETIME + 5)
    run_shell(command, cwd=work)
    assert len(api.accepted) == 2 and not api.refused, api.refused
    second, later = api.accepted[1]
    assert second != first and later["exp"] > claims["exp"]
    assert_clean_log(running, api)


def test_newman_fails_with_the_bridges_message_on_a_wrong_secret(
    newman: str, running: Running, api: ProtectedApi, work: Path
) -> None:
    """A wrong secret: newman exits 1 naming the bridge's reason; the API sees no request."""
    postman_files(running, work)  # its environment file holds the placeholder, not the secret
    out = run_tool(
        newman,
        "run",
        "mpagent-dev.postman_collection.json",
        "-e",
        "mpagent-dev.postman_environment.json",
        "--folder",
        postman.SCRIPT_FOLDER,
        "--env-var",
        f"base_url={api.url}",
        "--color",
        "off",
        cwd=work,
        status=1,
    )
    assert postman.BRIDGE_TEST in out
    assert "answered 401 invalid_client: wrong client_secret;" in out
    assert "`mpagent bridge secret` shows the current one" in out
    assert api.accepted == [] and api.refused == []  # no request reached the API at all
    assert "bridge: 401 invalid_client" in running.agent.log()


def test_newman_fails_when_the_bridge_does_not_answer(
    newman: str, running: Running, api: ProtectedApi, work: Path
) -> None:
    """No agent: `mpagent postman --with-secret` refuses before newman starts; newman run with
    the written environment exits non-zero naming the unreachable bridge; the API sees no
    request."""
    line = postman_files(running, work)
    running.agent.stop()
    command = line.replace("https://api.example.no", api.url) + " --color off"
    refused = run_shell(command, cwd=work, status=None)
    assert (
        "no agent is running" in refused and f"no token bridge serves on {running.url}" in refused
    )
    environment = work / "mpagent-dev.postman_environment.json"
    written = re.sub(r"-e <\([^)]*\)", f"-e {environment}", command)
    assert written != command
    out = run_shell(written, cwd=work, status=1)
    assert f"mpagent token bridge not reachable at {running.url}" in out
    assert api.accepted == [] and api.refused == []


def test_httpyac_reads_the_env_file(
    httpyac: str, running: Running, api: ProtectedApi, work: Path
) -> None:
    """httpyac sends `{{$dotenv NAME}}` from the agent's env file as .env; the API accepts it."""
    env_file = work / ".env"
    wait_for(lambda: env_file.exists() and f"{ENV_NAME}=" in env_file.read_text())
    (work / "envfile.http").write_text(
        f"GET {api.url}/hello\nAuthorization: Bearer {{{{$dotenv {ENV_NAME}}}}}\n\n?? status == 200\n"
    )
    run_tool(httpyac, "send", "envfile.http", "--all", cwd=work)
    assert len(api.accepted) == 1 and not api.refused, api.refused
    assert_clean_log(running, api)


def test_httpyac_oauth2_client_credentials_against_the_bridge(
    httpyac: str, running: Running, api: ProtectedApi, work: Path
) -> None:
    """httpyac's OAuth2 flow gets the agent's token; the secret comes in its environment."""
    (work / "bridge.http").write_text(
        f"@oauth2_tokenEndpoint = {running.url}\n"
        "@oauth2_clientId = dev\n"
        "@oauth2_clientSecret = {{$processEnv MPAGENT_BRIDGE_SECRET}}\n"
        f"@oauth2_scope = {SCOPES[0]}\n"
        "\n"
        f"GET {api.url}/hello\n"
        "Authorization: openid client_credentials\n"
        "\n"
        "?? status == 200\n"
    )
    # As the README has it: with the secret kept in the keyring or the file alike.
    recipe = 'MPAGENT_BRIDGE_SECRET="$(mpagent --config {} bridge secret)" httpyac send {} --all'
    run_shell(recipe.format(running.config, "bridge.http"), cwd=work)
    assert len(api.accepted) == 1 and not api.refused, api.refused
    token = run_cli("get", SCOPES[0]).stdout.strip()
    assert api.accepted[0][0] == token
    assert_clean_log(running, api)
