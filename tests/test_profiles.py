"""Several profiles in one agent, as organisations have them: test and prod side by side with
the same scopes, profiles that serve only on demand, and one unusable profile that blocks no
other. Real agent processes, two emulators on loopback, the real CLI."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from mpagent import client, paths
from mpagent.emulator import Emulator, pki
from mpagent.errors import ConfigError

from .agentproc import AgentProcess, status, wait_for
from .conftest import CLIENT_ID, PASSWORD, SCOPES, issuer_key, profile_for, run_cli, write_config

SCOPE = SCOPES[0]
SHORT = "MASKINPORTEN_TOKEN_IDPORTEN_DCR_READ"
TEST_NAME = "MASKINPORTEN_TOKEN_TEST_IDPORTEN_DCR_READ"
PROD_NAME = "MASKINPORTEN_TOKEN_PROD_IDPORTEN_DCR_READ"


@pytest.fixture
def test_issuer(ca: pki.Issued) -> Iterator[Emulator]:
    with Emulator(signing_key=issuer_key(), clients={CLIENT_ID: SCOPES}, trust=[ca.cert]) as emu:
        yield emu


@pytest.fixture
def prod_issuer(ca: pki.Issued) -> Iterator[Emulator]:
    with Emulator(signing_key=issuer_key(), clients={CLIENT_ID: SCOPES}, trust=[ca.cert]) as emu:
        yield emu


@pytest.fixture
def prod_p12(p12: Path, tmp_path: Path) -> Path:
    """prod's own keystore file, so that a test can take it away."""
    return Path(shutil.copy(p12, tmp_path / "prod.p12"))


@pytest.fixture
def two_profiles(
    tmp_path: Path,
    home: Path,
    test_issuer: Emulator,
    prod_issuer: Emulator,
    p12: Path,
    prod_p12: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    """test and prod with the same scope and no env_names; test is the default."""
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    monkeypatch.setenv("MPAGENT_NO_AUTOSTART", "1")
    profiles = {
        "test": profile_for(test_issuer, p12, scopes=[SCOPE]),
        "prod": profile_for(prod_issuer, prod_p12, scopes=[SCOPE]),
    }
    return write_config(tmp_path / "config.toml", profiles, default_profile="test")


@pytest.fixture
def agent(two_profiles: Path, tmp_path: Path) -> Iterator[AgentProcess]:
    proc = AgentProcess(two_profiles, tmp_path / "agent.log").wait_ready()
    yield proc
    proc.stop()


def env_values() -> dict[str, str]:
    text = Path(paths.default_env_file()).read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if not line.startswith("#"))


def issuer_of(token: str) -> str:
    return jwt.decode(token, options={"verify_signature": False})["iss"]


def test_test_and_prod_side_by_side(
    agent: AgentProcess, two_profiles: Path, test_issuer: Emulator, prod_issuer: Emulator
) -> None:
    """The same scope in test and prod: each profile's token comes from its own issuer, the env
    file has both under distinct names, and the default profile's also under the short name."""
    test = run_cli("get", "--profile", "test", SCOPE)
    prod = run_cli("get", SCOPE, "--profile", "prod")
    assert test.returncode == 0 and prod.returncode == 0, test.stderr + prod.stderr
    assert issuer_of(test.stdout.strip()) == test_issuer.issuer
    assert issuer_of(prod.stdout.strip()) == prod_issuer.issuer
    assert run_cli("get", SCOPE).stdout == test.stdout  # default_profile

    values = wait_for(lambda: (v := env_values()) and {SHORT, TEST_NAME, PROD_NAME} <= set(v) and v)
    assert issuer_of(values[PROD_NAME]) == prod_issuer.issuer
    assert values[SHORT] == values[TEST_NAME] and issuer_of(values[SHORT]) == test_issuer.issuer
    assert f"{PROD_NAME}_EXPIRES_AT" in values and f"{SHORT}_EXPIRES_AT" in values

    exported = run_cli("--config", str(two_profiles), "env", "--profile", "prod").stdout
    assert [line.split("=")[0] for line in exported.splitlines()] == [
        f"export {PROD_NAME}",
        f"export {PROD_NAME}_EXPIRES_AT",
    ]
    default = run_cli("--config", str(two_profiles), "env").stdout
    assert f"export {SHORT}=" in default and f"export {TEST_NAME}=" in default


def test_without_agent_each_profile_signs_for_its_issuer(
    two_profiles: Path, test_issuer: Emulator, prod_issuer: Emulator
) -> None:
    """`get --no-agent` with test and prod side by side: no collision error, each its issuer."""
    for name, issuer in (("test", test_issuer), ("prod", prod_issuer)):
        result = run_cli("--config", str(two_profiles), "get", "--no-agent", "-p", name, SCOPE)
        assert result.returncode == 0, result.stderr
        assert result.stderr == "" and issuer_of(result.stdout.strip()) == issuer.issuer


def test_profile_without_scopes_serves_on_demand(
    tmp_path: Path, home: Path, test_issuer: Emulator, p12: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A profile without `scopes` keeps nothing warm and serves any registered scope on demand."""
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    monkeypatch.setenv("MPAGENT_NO_AUTOSTART", "1")
    profile = {k: v for k, v in profile_for(test_issuer, p12).items() if k != "scopes"}
    config = write_config(tmp_path / "config.toml", {"adhoc": profile})
    proc = AgentProcess(config, tmp_path / "agent.log").wait_ready()
    try:
        assert status()["tokens"] == [] and test_issuer.token_requests == 0
        result = run_cli("get", SCOPES[1])
        assert result.returncode == 0, result.stderr
        assert issuer_of(result.stdout.strip()) == test_issuer.issuer
        (token,) = status()["tokens"]
        assert token["scope"] == SCOPES[1] and not token["configured"]
    finally:
        proc.stop()


def test_reload_applies_edits_while_prod_keystore_is_missing(
    agent: AgentProcess, two_profiles: Path, prod_p12: Path
) -> None:
    """With prod's keystore gone, an edit to test is applied; prod is reported unusable by
    reload, status and the log, and keeps serving with the key it had."""
    prod_token = run_cli("get", "-p", "prod", SCOPE).stdout
    prod_p12.unlink()
    two_profiles.write_text(
        two_profiles.read_text().replace(
            f'scopes = ["{SCOPE}"]', f'scopes = ["{SCOPE}", "{SCOPES[1]}"]', 1
        )
    )
    reload = run_cli("reload")
    assert reload.returncode == 0, reload.stderr
    assert "mpagent: reloaded" in reload.stderr
    assert "profile prod cannot be used" in reload.stderr and str(prod_p12) in reload.stderr
    configured = {(t["profile"], t["scope"]) for t in status()["tokens"] if t["configured"]}
    assert ("test", SCOPES[1]) in configured and ("prod", SCOPES[1]) not in configured
    problem = status()["profiles"]["prod"]
    assert str(prod_p12) in problem and "previous configuration keeps running" in problem
    assert status()["profiles"]["test"] is None and status()["reload_error"] is None
    assert "profile prod cannot be used" in agent.log()
    assert run_cli("get", "-p", "prod", SCOPE).stdout == prod_token
    assert run_cli("get", "-p", "test", SCOPES[1]).returncode == 0


def test_start_with_one_profile_unusable(
    two_profiles: Path, tmp_path: Path, prod_p12: Path, p12: Path
) -> None:
    """An agent started while prod's keystore is missing serves test; `get -p prod` fails with
    exit 78 naming the keystore; putting the file back makes prod work without a restart."""
    prod_p12.unlink()
    proc = AgentProcess(two_profiles, tmp_path / "agent.log").wait_ready()
    try:
        assert run_cli("get", "-p", "test", SCOPE).returncode == 0
        failed = run_cli("get", "-p", "prod", SCOPE)
        assert failed.returncode == 78 and failed.stdout == ""
        assert str(prod_p12) in failed.stderr and failed.stderr.startswith("mpagent: ")
        assert str(prod_p12) in status()["profiles"]["prod"]
        with pytest.raises(ConfigError) as env:  # `env` fails as `get` does
            client.call(paths.socket_path(), "env", [("profile", "prod")])
        assert env.value.exit_code == 78 and str(prod_p12) in str(env.value)
        shutil.copy(p12, prod_p12)
        wait_for(lambda: status()["profiles"]["prod"] is None)
        assert run_cli("get", "-p", "prod", SCOPE).returncode == 0
    finally:
        proc.stop()


def test_a_broken_profile_only_warns_other_commands(two_profiles: Path) -> None:
    """A mistake in prod's table: commands for test work and warn on stderr; prod's own
    commands fail with exit 78 and the mistake."""
    two_profiles.write_text(
        two_profiles.read_text() + 'algorithm = "ES256"\n'
    )  # the last table: prod
    for command in (["get", "--no-agent", SCOPE], ["grant", SCOPE]):
        result = run_cli("--config", str(two_profiles), *command, "-p", "test")
        assert result.returncode == 0, result.stderr
        assert result.stderr.startswith("mpagent: warning: profile prod cannot be used: ")
        assert "[profiles.prod] algorithm is 'ES256'" in result.stderr
        assert result.stderr.count("\n") == 1
    prod = run_cli("--config", str(two_profiles), "get", "--no-agent", "-p", "prod", SCOPE)
    assert prod.returncode == 78 and "[profiles.prod] algorithm is 'ES256'" in prod.stderr


def test_a_broken_profile_in_a_reload_keeps_its_previous_version(
    agent: AgentProcess, two_profiles: Path
) -> None:
    """A reload whose prod table has a mistake applies the rest; prod keeps serving as before."""
    before = run_cli("get", "-p", "prod", SCOPE).stdout
    two_profiles.write_text(
        two_profiles.read_text().replace("[profiles.test]", '[profiles.test]\nalgorithm = "RS512"')
        + "clientid = 'typo'\n"
    )
    reload = run_cli("reload")
    assert reload.returncode == 0
    assert "profile prod cannot be used" in reload.stderr and "'clientid'" in reload.stderr
    assert run_cli("get", "-p", "prod", SCOPE).stdout == before
    assert "unknown key 'clientid'" in status()["profiles"]["prod"]


def test_unknown_profile_gets_did_you_mean(agent: AgentProcess) -> None:
    """A mistyped --profile is named with the profile it probably meant, exit 78."""
    result = run_cli("get", "-p", "prdo", SCOPE)
    assert result.returncode == 78
    assert "no profile 'prdo' (profiles: prod, test); did you mean 'prod'?" in result.stderr


def test_env_verb_names_each_profiles_tokens(
    agent: AgentProcess, test_issuer: Emulator, prod_issuer: Emulator
) -> None:
    """The agent's `env` for prod gives prod's token under prod's names only; for the default
    profile (test) also the short names; an unknown profile fails as `get` does (78)."""

    def env(*profile: str) -> list[tuple[str, str]]:
        fields = client.call(paths.socket_path(), "env", [("profile", p) for p in profile])
        return [(fields[i][1], fields[i + 1][1]) for i in range(0, len(fields), 2)]

    prod = env("prod")
    assert [name for name, _ in prod] == [PROD_NAME, f"{PROD_NAME}_EXPIRES_AT"]
    assert issuer_of(prod[0][1]) == prod_issuer.issuer
    default = env()
    names = [TEST_NAME, f"{TEST_NAME}_EXPIRES_AT", SHORT, f"{SHORT}_EXPIRES_AT"]
    assert [name for name, _ in default] == names
    assert issuer_of(default[0][1]) == test_issuer.issuer == issuer_of(default[2][1])
    with pytest.raises(ConfigError) as unknown:
        env("prdo")
    assert unknown.value.exit_code == 78
    assert "no profile 'prdo' (profiles: prod, test); did you mean 'prod'?" in str(unknown.value)


def test_typo_in_an_on_demand_scope(agent: AgentProcess) -> None:
    """A scope the issuer rejects gets "did you mean" against the profile's scopes, and says
    when the agent tries again and how to make it try now."""
    result = run_cli("get", "idporten:dcr.raed")
    assert result.returncode == 77 and result.stdout == ""
    assert "did you mean 'idporten:dcr.read'?" in result.stderr
    assert "the agent tries again in" in result.stderr
    assert "`mpagent refresh test` tries now" in result.stderr


def test_doctor_checks_only_the_profile_it_is_given(two_profiles: Path) -> None:
    """`doctor --profile test` with a mistake in prod: the config row warns (`!`) naming prod,
    the rest is checked and doctor exits 0; `doctor --profile prod` fails with the mistake."""
    two_profiles.write_text(two_profiles.read_text() + 'algorithm = "ES256"\n')
    test = run_cli("doctor", "--profile", "test", "--config", str(two_profiles))
    assert test.returncode == 0, test.stdout + test.stderr
    config_row = next(line for line in test.stdout.splitlines() if "config" in line)
    assert config_row.startswith("!") and "profile prod cannot be used" in config_row
    assert "✓ token for idporten:dcr.read" in test.stdout
    prod = run_cli("doctor", "-p", "prod", "--config", str(two_profiles))
    assert prod.returncode == 78 and "[profiles.prod] algorithm is 'ES256'" in prod.stdout
