"""`mpagent service`: the unit and plist text, install/uninstall/status through the real CLI
(with `systemctl`/`launchctl` stand-ins that record their arguments: this container has no
user service manager), and the one-owner rule for start-up."""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import subprocess
import sys
import time
from importlib.resources import files
from itertools import takewhile
from pathlib import Path
from string import Template

import pytest

from mpagent import client, paths, service
from mpagent.emulator import Emulator
from mpagent.errors import ConfigError, MpagentError

from .agentproc import AgentProcess, wait_for
from .conftest import PASSWORD, SCOPES, profile_for, run_cli, write_config
from .test_envfile import HOLD_LOCK

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def config(tmp_path: Path, home: Path, emulator: Emulator, p12: Path) -> Path:
    return write_config(tmp_path / "config.toml", {"dev": profile_for(emulator, p12)})


@pytest.fixture
def shim(tmp_path: Path) -> dict[str, str]:
    """PATH with `systemctl` and `launchctl` that append their arguments to calls.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for name in ("systemctl", "launchctl"):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\necho "{name} shim: $*"\n')
        script.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(log)}


def calls(shim: dict[str, str]) -> list[str]:
    log = Path(shim["CALLS"])
    return log.read_text().splitlines() if log.exists() else []


def unit_dir() -> Path:
    return Path(os.environ["XDG_CONFIG_HOME"]) / "systemd" / "user"


def install(config: Path, shim: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = run_cli("--config", str(config), "service", "install", env=shim)
    assert result.returncode == 0, result.stderr
    return result


def require(tool: str, package: str) -> str:
    found = shutil.which(tool)
    if found is None:
        if os.environ.get("MPAGENT_REQUIRE_ALL") == "1":
            pytest.fail(f"{tool} is missing; install the {package} package")
        pytest.skip(f"{tool} is missing; `apt-get install {package}` to run this test")
    return found


def exec_line(unit: str) -> str:
    return next(line for line in unit.splitlines() if line.startswith("ExecStart="))


# -- rendering ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "readable",
    ["systemd/mpagent.socket", "systemd/mpagent.service", f"launchd/{service.LABEL}.plist"],
)
def test_top_level_templates_equal_the_package_data(readable: str) -> None:
    """Each file in systemd/ and launchd/ is byte for byte the template shipped in
    mpagent/units, the one `mpagent service` renders."""
    shipped = files("mpagent") / "units" / Path(readable).name
    assert (ROOT / readable).read_bytes() == shipped.read_bytes()


def test_package_data_holds_exactly_the_templates() -> None:
    """mpagent/units ships the three templates and nothing else (no stray copy to drift)."""
    shipped = sorted(entry.name for entry in (files("mpagent") / "units").iterdir())
    assert shipped == ["mpagent.service", "mpagent.socket", f"{service.LABEL}.plist"]


def test_rendering_fills_the_documented_placeholders() -> None:
    """The socket unit is the template as it is; the service's ${EXEC} and the plist's
    ${PROGRAM_ARGUMENTS} and ${LOG_FILE} are filled in, quoted for systemd or XML."""
    argv = ["/opt/mp agent/bin/mpagent", "--config", "/etc/mp&<cfg>.toml"]
    exec_words = '"/opt/mp agent/bin/mpagent" --config "/etc/mp&<cfg>.toml"'
    socket_file = (ROOT / "systemd" / "mpagent.socket").read_text()
    service_file = Template((ROOT / "systemd" / "mpagent.service").read_text())
    plist_file = Template((ROOT / "launchd" / f"{service.LABEL}.plist").read_text())
    assert service.render_socket() == socket_file and "$" not in socket_file
    assert service.render_service(argv) == service_file.substitute(EXEC=exec_words)
    log = Path("/Users/kari/Library/Logs/mpagent/agent.log")
    arguments = "\n".join(
        f"\t\t<string>{a}</string>"
        for a in ["/opt/mp agent/bin/mpagent", "--config", "/etc/mp&amp;&lt;cfg&gt;.toml", "agent"]
    )
    assert service.render_plist(argv, log) == plist_file.substitute(
        PROGRAM_ARGUMENTS=arguments, LOG_FILE=str(log)
    )


def test_exec_words_survive_systemd_quoting() -> None:
    """Spaces, quotes, backslashes, % specifiers and $ variables reach the agent literally."""
    assert service.systemd_quote("/usr/bin/mpagent") == "/usr/bin/mpagent"
    assert service.systemd_quote("/a b/50%/$HOME") == '"/a b/50%%/$$HOME"'
    assert service.systemd_quote('say "hi" \\') == '"say \\"hi\\" \\\\"'
    with pytest.raises(ConfigError, match="line break"):
        service.systemd_quote("/a\nb")


def test_plist_keys(home: Path, config: Path) -> None:
    """The LaunchAgent runs the real mpagent in the foreground, restarts it after a crash but
    not after a clean exit, starts at load and logs under ~/Library/Logs/mpagent."""
    argv = service.command(shutil.which("mpagent"), sys.executable, str(config))
    launchd = service.Launchd(home, 501)
    plist = plistlib.loads(service.render_plist(argv, launchd.log_file).encode())
    assert plist["Label"] == "no.mpagent.agent"
    assert plist["ProgramArguments"] == [*argv, "agent"]
    assert os.path.isabs(argv[0]) and os.access(argv[0], os.X_OK)
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["RunAtLoad"] is True
    log = str(home / "Library" / "Logs" / "mpagent" / "agent.log")
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == log
    assert plist["Umask"] == 0o077


def test_launchd_steps(home: Path) -> None:
    """launchd install writes the plist and bootstraps it in gui/<uid>; uninstall boots it
    out and removes it."""
    launchd = service.Launchd(home, 501)
    plist = home / "Library" / "LaunchAgents" / "no.mpagent.agent.plist"
    installing = service.script(launchd.install(["/usr/bin/mpagent"], "/tmp/s.sock"))
    assert f"cat > {plist} <<'EOF'\n<?xml" in installing
    assert installing.rstrip().endswith(f"launchctl bootstrap gui/501 {plist}")
    assert f"mkdir -p -m 700 {home}/Library/Logs/mpagent" in installing
    removing = service.script(launchd.uninstall())
    assert "launchctl bootout gui/501/no.mpagent.agent || true" in removing
    assert removing.rstrip().endswith(f"rm -f {plist}")


def test_socket_path_limit() -> None:
    """A socket path over the platform's limit (104 bytes on macOS) is refused at install."""
    service.check_socket_path("/Users/kari/Library/Caches/TemporaryItems/mpagent/agent.sock", 103)
    with pytest.raises(ConfigError, match="over the system's limit of 103 bytes"):
        service.check_socket_path("/Users/" + "k" * 80 + "/Library/mpagent/agent.sock", 103)


# -- systemd through the real CLI ---------------------------------------------------------


def test_install_writes_units_and_enables_the_socket(config: Path, shim: dict[str, str]) -> None:
    """install writes both units to $XDG_CONFIG_HOME/systemd/user with the real executable
    and --config, then reloads systemd and enables the socket."""
    install(config, shim)
    unit = (unit_dir() / "mpagent.service").read_text()
    executable = exec_line(unit).removeprefix("ExecStart=").split()[0]
    assert os.path.isabs(executable) and os.access(executable, os.X_OK)
    assert exec_line(unit).endswith(f"--config {config} agent")
    assert (unit_dir() / "mpagent.socket").read_text() == service.render_socket()
    assert calls(shim) == [
        "systemctl --user daemon-reload",
        "systemctl --user enable --now mpagent.socket",
    ]


def test_installed_units_verify(home: Path, config: Path, shim: dict[str, str]) -> None:
    """`systemd-analyze --user verify` accepts the installed units with nothing on stderr,
    even with a config path holding a space, a quote, a %-specifier and a $VARIABLE."""
    analyze = require("systemd-analyze", "systemd")
    odd = home / 'my %Z "$config"'
    odd.mkdir()
    install(Path(shutil.copy(config, odd / "config.toml")), shim)
    files = [str(unit_dir() / "mpagent.socket"), str(unit_dir() / "mpagent.service")]
    result = subprocess.run(
        [analyze, "--user", "verify", *files], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_dry_run_prints_everything_and_does_nothing(config: Path, shim: dict[str, str]) -> None:
    """--dry-run prints each file's path and content and each command, changing nothing;
    run by sh, the script installs exactly what install does."""
    result = run_cli("--config", str(config), "service", "install", "--dry-run", env=shim)
    assert result.returncode == 0, result.stderr
    socket_unit, service_unit = unit_dir() / "mpagent.socket", unit_dir() / "mpagent.service"
    assert f"cat > {socket_unit} <<'EOF'\n{service.render_socket()}EOF\n" in result.stdout
    assert f"cat > {service_unit} <<'EOF'\n" in result.stdout
    assert "systemctl --user enable --now mpagent.socket\n" in result.stdout
    assert not unit_dir().exists() and calls(shim) == []
    subprocess.run(["sh"], input=result.stdout, text=True, env={**os.environ, **shim}, check=True)
    dry = {p.name: p.read_text() for p in (socket_unit, service_unit)}
    shutil.rmtree(unit_dir())
    install(config, shim)
    assert dry == {p.name: p.read_text() for p in (socket_unit, service_unit)}


# -- passwords as systemd credentials -------------------------------------------------------


def test_credentials_help_gives_each_profile_its_lines() -> None:
    """The credential text: per profile, the systemd-creds command that makes the file and the
    LoadCredentialEncrypted= line (systemd 258+), the plain LoadCredential= fallback, the
    version to check; shell words quoted, % doubled in unit lines."""
    directory = Path("/home/kari/my creds/50%")
    text = service.credentials_help(["test", "prod"], directory)
    for name in ("test", "prod"):
        cred = f"/home/kari/my creds/50%/{name}.keystore.cred"
        assert (
            f"systemd-ask-password -n '{name} keystore password:' | systemd-creds encrypt --user "
            f"--name={name}.keystore - '{cred}'"
        ) in text
        assert f"LoadCredentialEncrypted={name}.keystore:{cred.replace('%', '%%')}\n" in text
        assert f"LoadCredential={name}.keystore:/home/kari/my creds/50%%/{name}.keystore" in text
    assert "systemctl --user edit mpagent.service" in text and "258" in text
    assert "$CREDENTIALS_DIRECTORY/PROFILE.keystore" in text and "PROFILE.key" in text


def credential_blocks(text: str) -> list[list[str]]:
    """The [Service] blocks of the credential text, each as the lines of a drop-in."""
    lines = [line.strip() for line in text.splitlines()]
    return [
        ["[Service]", *takewhile(lambda s: s.startswith("LoadCredential"), lines[i + 1 :])]
        for i, line in enumerate(lines)
        if line == "[Service]"
    ]


def test_install_shows_the_credential_lines(
    tmp_path: Path, home: Path, emulator: Emulator, p12: Path, shim: dict[str, str]
) -> None:
    """--dry-run shows the credential lines for every profile as comments (the script still
    runs), install prints them, and each block, put in a drop-in as `systemctl --user edit`
    would, passes `systemd-analyze --user verify`."""
    cfg = write_config(
        tmp_path / "config.toml",
        {"test": profile_for(emulator, p12), "prod": profile_for(emulator, p12)},
    )
    cred = tmp_path / "credentials" / "prod.keystore.cred"
    dry = run_cli("--config", str(cfg), "service", "install", "--dry-run", env=shim)
    assert dry.returncode == 0, dry.stderr
    assert f"\n#   LoadCredentialEncrypted=prod.keystore:{cred}\n" in dry.stdout
    assert "--name=test.keystore" in dry.stdout
    installed = install(cfg, shim)
    assert f"\n  LoadCredentialEncrypted=prod.keystore:{cred}\n" in installed.stdout
    blocks = credential_blocks(installed.stdout)
    assert len(blocks) == 2 and all(len(block) == 3 for block in blocks)
    analyze = require("systemd-analyze", "systemd")
    drop_in = unit_dir() / "mpagent.service.d" / "override.conf"
    drop_in.parent.mkdir()
    for block in blocks:
        drop_in.write_text("\n".join(block) + "\n")
        result = subprocess.run(
            [analyze, "--user", "verify", str(unit_dir() / "mpagent.service")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0 and result.stderr == "", result.stderr


def test_uninstall_reverses_install(config: Path, shim: dict[str, str]) -> None:
    """uninstall disables the units, removes both files and reloads systemd."""
    install(config, shim)
    Path(shim["CALLS"]).unlink()
    result = run_cli("service", "uninstall", env=shim)
    assert result.returncode == 0, result.stderr
    assert not (unit_dir() / "mpagent.socket").exists()
    assert not (unit_dir() / "mpagent.service").exists()
    assert calls(shim) == [
        "systemctl --user disable --now mpagent.socket mpagent.service",
        "systemctl --user daemon-reload",
    ]


def test_status(config: Path, shim: dict[str, str]) -> None:
    """status says 'not installed' (exit 3) before install; after, it names the files and
    shows systemctl's status of both units."""
    before = run_cli("service", "status", env=shim)
    assert before.returncode == 3 and "not installed" in before.stdout
    install(config, shim)
    after = run_cli("service", "status", env=shim)
    assert after.returncode == 0, after.stderr
    assert f"installed ({unit_dir() / 'mpagent.socket'}" in after.stdout
    assert "systemctl shim: --user status mpagent.socket mpagent.service --no-pager" in after.stdout


def test_install_refuses_a_broken_config(tmp_path: Path, home: Path, shim: dict[str, str]) -> None:
    """A configuration the agent would reject (exit 78: not valid TOML) is reported and
    nothing is written."""
    broken = tmp_path / "broken.toml"
    broken.write_text("[profiles.dev\nclient_id = 3\n")
    result = run_cli("--config", str(broken), "service", "install", env=shim)
    assert result.returncode == 78 and str(broken) in result.stderr
    assert not unit_dir().exists() and calls(shim) == []


def test_install_without_systemctl_changes_nothing(
    config: Path, tmp_path: Path, home: Path
) -> None:
    """Where systemctl is missing, install fails before writing a unit that would stop
    `get` from starting agents."""
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("--config", str(config), "service", "install", env={"PATH": str(empty)})
    assert result.returncode == 1 and "systemctl is not on PATH" in result.stderr
    assert not unit_dir().exists()


def test_install_takes_over_from_a_self_started_agent(
    config: Path, shim: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running agent is stopped, and has let go of its socket, before systemd is told to
    listen there: two agents never overlap."""
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    agent = AgentProcess(config, tmp_path / "agent.log").wait_ready()
    try:
        result = install(config, shim)
        assert "stopped the running agent" in result.stdout
        assert not Path(paths.socket_path()).exists()
        assert agent.proc.wait(10) == 0
    finally:
        agent.stop()


def test_install_stops_waiting_for_an_agent_that_holds_its_lock(tmp_path: Path) -> None:
    """While the old agent still holds its lock past the deadline, install gives up with a
    message saying how to go on; with no lock file (no agent ever ran there), it goes on."""
    lock_file = tmp_path / "agent.sock.lock"
    service._wait_for_lock(lock_file, time.monotonic())  # no file: nothing to wait for
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as holder:
        assert holder.stdout is not None
        holder.stdout.readline()  # it holds the lock now
        with pytest.raises(MpagentError) as raised:
            service._wait_for_lock(lock_file, time.monotonic() + 0.2)
    assert str(raised.value) == (
        f"the running agent did not stop within {service.STOP_TIMEOUT:g} s; stop it with "
        "`mpagent stop` and run `mpagent service install` again"
    )
    assert raised.value.exit_code == 1


# -- one owner of start-up ----------------------------------------------------------------


def test_installed_service_means_get_never_spawns(
    config: Path, shim: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the units installed and nothing listening, `get` starts no agent: it fails fast
    with exit 69 and says how to start the socket or uninstall."""
    install(config, shim)
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)  # a spawned agent would work
    started = time.monotonic()
    result = run_cli("--config", str(config), "get", SCOPES[0])
    assert time.monotonic() - started < 5
    assert result.returncode == 69 and result.stdout == ""
    assert "systemctl --user start mpagent.socket" in result.stderr
    assert "mpagent service uninstall" in result.stderr
    time.sleep(0.5)
    assert not Path(paths.socket_path()).exists()
    assert not (Path(os.environ["XDG_STATE_HOME"]) / "mpagent" / "agent.log").exists()


def test_installed_service_and_another_socket(
    config: Path, shim: dict[str, str], home: Path
) -> None:
    """With the service installed, `get` on an MPAGENT_SOCKET elsewhere does not spawn either,
    and the message says that MPAGENT_SOCKET points away from the service's socket."""
    install(config, shim)
    other = str(home / "other.sock")
    result = run_cli("--config", str(config), "get", SCOPES[0], env={"MPAGENT_SOCKET": other})
    assert result.returncode == 69
    assert f"MPAGENT_SOCKET points away from the service's {service.socket_path()}" in (
        result.stderr
    )
    assert not Path(other).exists()


def test_after_uninstall_get_starts_its_own_agent(
    config: Path, shim: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the service is uninstalled, `get` self-starts an agent again."""
    install(config, shim)
    assert run_cli("service", "uninstall", env=shim).returncode == 0
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    result = run_cli("--config", str(config), "get", SCOPES[0])
    assert result.returncode == 0, result.stderr
    client.call(paths.socket_path(), "stop")
    wait_for(lambda: not Path(paths.socket_path()).exists())


def test_installed_service_is_sandboxed(home: Path, config: Path, shim: dict[str, str]) -> None:
    """`systemd-analyze --user security` rates the installed service 3.0 or better (the unit
    without its sandbox rated 9.7, UNSAFE)."""
    analyze = require("systemd-analyze", "systemd")
    install(config, shim)
    result = subprocess.run(
        [analyze, "--user", "security", "--offline=true", str(unit_dir() / "mpagent.service")],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Overall exposure level for mpagent.service: (\d+\.\d)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= 3.0, result.stdout


def test_failed_install_puts_everything_back(
    config: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the real systemctl and no user manager to talk to, install fails, says nothing is
    installed, leaves no unit file behind, and `get` then starts its own agent."""
    require("systemctl", "systemd")
    result = run_cli("--config", str(config), "service", "install")
    assert result.returncode != 0 and "Nothing is installed" in result.stderr, result.stderr
    assert not (unit_dir() / "mpagent.socket").exists()
    assert not (unit_dir() / "mpagent.service").exists()
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    got = run_cli("--config", str(config), "get", SCOPES[0])
    assert got.returncode == 0, got.stderr
    client.call(paths.socket_path(), "stop")
