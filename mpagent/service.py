"""`mpagent service`: the agent as a user service, systemd units on Linux, a LaunchAgent on macOS.

Rendering is pure: values in, unit text out. Installing is a list of steps built from that
text; `--dry-run` prints the steps as a shell script, otherwise they are carried out one by
one, each echoed. The templates ship as package data in mpagent/units (`${EXEC}` in the
service, `${PROGRAM_ARGUMENTS}` and `${LOG_FILE}` in the plist, string.Template placeholders);
the same files sit in systemd/ and launchd/ at the top of the source tree for readers and
packagers, and a test keeps the two byte for byte equal.

Stdlib only and light: `mpagent get` imports this (through autostart) to learn whether a
service owns start-up.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any, Protocol, TextIO

from mpagent import paths, private
from mpagent.errors import AgentNotRunning, ConfigError, MpagentError

LABEL = "no.mpagent.agent"
STOP_TIMEOUT = 10.0

# -- pure rendering -------------------------------------------------------------------------


def command(which: str | None, python: str, config: str | None) -> list[str]:
    """How the service runs mpagent: the installed script, else this Python with -m."""
    if which:
        argv = [os.path.abspath(which)]
    elif python:
        argv = [python, "-m", "mpagent"]
    else:
        raise MpagentError("cannot tell where mpagent is installed; put `mpagent` on PATH")
    if config:
        argv += ["--config", config]
    return argv


def systemd_quote(arg: str) -> str:
    """One word of an Exec= line, safe from systemd's splitting, %-specifiers and $VARs."""
    if "\n" in arg or "\r" in arg:
        raise ConfigError(f"a path with a line break cannot go into a unit file: {arg!r}")
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if arg and all(c.isalnum() or c in "/._-+:,=@" for c in arg):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def template(name: str) -> str:
    """The text of mpagent/units/`name` (package data; importlib.resources finds it in a wheel,
    an editable install or a zip alike)."""
    from importlib.resources import files

    return (files("mpagent") / "units" / name).read_text(encoding="utf-8")


def render_socket() -> str:
    """The socket unit: nothing in it depends on the install (`%t` is systemd's)."""
    return template("mpagent.socket")


def render_service(argv: list[str]) -> str:
    exec_words = " ".join(systemd_quote(a) for a in argv)
    return Template(template("mpagent.service")).substitute(EXEC=exec_words)


def xml_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_plist(argv: list[str], log_file: Path) -> str:
    arguments = "\n".join(f"\t\t<string>{xml_text(a)}</string>" for a in [*argv, "agent"])
    plist = Template(template(f"{LABEL}.plist"))
    return plist.substitute(PROGRAM_ARGUMENTS=arguments, LOG_FILE=xml_text(str(log_file)))


def credentials_help(profiles: Sequence[str], directory: Path) -> str:
    """How to give the service each profile's keystore password as a systemd credential,
    which the agent reads from $CREDENTIALS_DIRECTORY/<profile>.keystore. `systemd-creds
    --user` came in systemd 256, but a user service decrypts such a credential only from 258
    (systemd/systemd#37598, implemented by PR #35536); plain LoadCredential= works in user
    services on 252 already (systemd/systemd#25768)."""
    names = list(profiles) or ["PROFILE"]
    ask = {n: f"systemd-ask-password -n {shlex.quote(f'{n} keystore password:')}" for n in names}
    plain = {n: directory / f"{n}.keystore" for n in names}
    encrypted = {n: directory / f"{n}.keystore.cred" for n in names}
    return "\n".join(
        [
            "Passwords for the service where no keyring runs: a systemd credential per",
            "profile. mpagent reads $CREDENTIALS_DIRECTORY/PROFILE.keystore (and PROFILE.key",
            "for a JKS key with a password of its own). With systemd 258 or newer",
            "(`systemctl --version`), encrypt each password for your user:",
            f"  mkdir -p -m 700 {shlex.quote(str(directory))}",
            *(
                f"  {ask[n]} | systemd-creds encrypt --user"
                f" --name={shlex.quote(n + '.keystore')} - {shlex.quote(str(file))}"
                for n, file in encrypted.items()
            ),
            "then add these lines with `systemctl --user edit mpagent.service` and run",
            "`systemctl --user restart mpagent.service`:",
            "  [Service]",
            *(
                f"  LoadCredentialEncrypted={_unit_value(f'{n}.keystore:{file}')}"
                for n, file in encrypted.items()
            ),
            "Older systemd cannot decrypt credentials for a user service (256 and 257 encrypt",
            "with --user, only 258 decrypts): keep each password in a file in that private",
            "directory instead,",
            *(f"  {ask[n]} > {shlex.quote(str(file))}" for n, file in plain.items()),
            "and add, the same way:",
            "  [Service]",
            *(
                f"  LoadCredential={_unit_value(f'{n}.keystore:{file}')}"
                for n, file in plain.items()
            ),
            "(SetCredential=PROFILE.keystore:PASSWORD works too, but systemd.exec(5) warns that",
            "its value can be read over IPC.)",
        ]
    )


def _unit_value(text: str) -> str:
    """Text in a unit setting's value: systemd expands % specifiers there."""
    if "\n" in text or "\r" in text:
        raise ConfigError(f"a path with a line break cannot go into a unit file: {text!r}")
    return text.replace("%", "%%")


def check_socket_path(path: str, limit: int) -> None:
    if len(os.fsencode(path)) > limit:
        raise ConfigError(
            f"the agent's socket path {path} is over the system's limit of {limit} bytes; "
            "install from an account with a shorter home directory path"
        )


# -- steps: described for --dry-run, or carried out ----------------------------------------


class Step(Protocol):
    def describe(self) -> str: ...
    def run(self, out: TextIO) -> None: ...


@dataclass(frozen=True)
class Note:
    """Text for the user: shell comments in a --dry-run script, printed at install."""

    text: str

    def describe(self) -> str:
        return "\n".join(f"# {line}".rstrip() for line in self.text.splitlines())

    def run(self, out: TextIO) -> None:
        out.write(self.text + "\n")


@dataclass(frozen=True)
class MakeDir:
    path: Path
    mode: int = 0o755

    def describe(self) -> str:
        return f"mkdir -p -m {self.mode:o} {shlex.quote(str(self.path))}"

    def run(self, out: TextIO) -> None:
        self.path.mkdir(mode=self.mode, parents=True, exist_ok=True)


@dataclass(frozen=True)
class WriteFile:
    path: Path
    content: str

    def describe(self) -> str:
        return f"cat > {shlex.quote(str(self.path))} <<'EOF'\n{self.content}EOF"

    def run(self, out: TextIO) -> None:
        private.write_atomic(self.path, self.content)
        out.write(f"wrote {self.path}\n")


@dataclass(frozen=True)
class RemoveFile:
    path: Path

    def describe(self) -> str:
        return f"rm -f {shlex.quote(str(self.path))}"

    def run(self, out: TextIO) -> None:
        if self.path.exists():
            self.path.unlink()
            out.write(f"removed {self.path}\n")


@dataclass(frozen=True)
class Run:
    argv: tuple[str, ...]
    may_fail: bool = False

    def describe(self) -> str:
        return shlex.join(self.argv) + (" || true" if self.may_fail else "")

    def run(self, out: TextIO) -> None:
        status = self.call(out)
        if status and self.may_fail:
            out.write(f"  (exit status {status}; continuing)\n")
        elif status:
            raise MpagentError(
                f"`{shlex.join(self.argv)}` failed with exit status {status}; fix that "
                "and run `mpagent service install` again, or `mpagent service uninstall`"
            )

    def call(self, out: TextIO) -> int:
        """Run the command, echoing it and its output; return its exit status."""
        out.write(f"$ {shlex.join(self.argv)}\n")
        try:
            done = subprocess.run(
                self.argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
            )
        except FileNotFoundError:
            if self.may_fail:
                out.write(f"  ({self.argv[0]} not found)\n")
                return 127
            manager = "launchd" if self.argv[0] == "launchctl" else "systemd"
            raise MpagentError(
                f"{self.argv[0]} is not on PATH; `mpagent service` needs {manager}"
            ) from None
        out.write(done.stdout + done.stderr)
        return done.returncode


@dataclass(frozen=True)
class StopAgent:
    """Hand start-up over to the service manager: stop an agent that `mpagent get` started,
    and wait for it to let go of the socket, so that two agents never overlap."""

    socket: str
    argv: tuple[str, ...]

    def describe(self) -> str:
        return f"MPAGENT_SOCKET={shlex.quote(self.socket)} {shlex.join(self.argv)} stop || true"

    def run(self, out: TextIO) -> None:
        from mpagent import client

        try:
            client.call(self.socket, "stop", timeout=5)
        except AgentNotRunning:
            return
        _wait_for_lock(Path(self.socket + ".lock"), time.monotonic() + STOP_TIMEOUT)
        out.write("stopped the running agent; from now on the service manager starts it\n")


def _wait_for_lock(lock_file: Path, deadline: float) -> None:
    """Until the agent holding `lock_file` (if it ever made one) has exited."""
    if not lock_file.exists():
        return
    fd = private.lock(lock_file, deadline)
    if fd is None:
        raise MpagentError(
            f"the running agent did not stop within {STOP_TIMEOUT:g} s; "
            "stop it with `mpagent stop` and run `mpagent service install` again"
        )
    os.close(fd)


# -- the two service managers ---------------------------------------------------------------


def socket_path() -> str:
    """Where the service's agent listens: the default path, whatever MPAGENT_SOCKET says."""
    return os.path.join(paths.runtime_dir(), "agent.sock")


class Systemd:
    """User units in $XDG_CONFIG_HOME/systemd/user: mpagent.socket starts mpagent.service."""

    name, tool, logs = "systemd", "systemctl", "journalctl --user -u mpagent"

    def __init__(self, config_home: Path) -> None:
        self.unit_dir = config_home / "systemd" / "user"
        self.marker = self.unit_dir / "mpagent.socket"
        self.files = [self.marker, self.unit_dir / "mpagent.service"]

    @classmethod
    def here(cls) -> Systemd:
        xdg = os.environ.get("XDG_CONFIG_HOME")
        return cls(Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config")

    def install(self, argv: list[str], socket: str) -> list[Step]:
        return [
            MakeDir(self.unit_dir),
            WriteFile(self.files[0], render_socket()),
            WriteFile(self.files[1], render_service(argv)),
            StopAgent(socket, tuple(argv)),
            Run(("systemctl", "--user", "daemon-reload")),
            Run(("systemctl", "--user", "enable", "--now", "mpagent.socket")),
        ]

    def uninstall(self) -> list[Step]:
        return [
            Run(
                ("systemctl", "--user", "disable", "--now", "mpagent.socket", "mpagent.service"),
                True,
            ),
            *[RemoveFile(f) for f in self.files],
            Run(("systemctl", "--user", "daemon-reload"), True),
        ]

    def status(self) -> Run:
        return Run(
            ("systemctl", "--user", "status", "mpagent.socket", "mpagent.service", "--no-pager")
        )

    def not_running(self, socket: str) -> str:
        return (
            f"the mpagent service is installed ({self.marker}) but nothing listens on {socket}; "
            "start it with `systemctl --user start mpagent.socket` (logs: `journalctl --user "
            "-u mpagent`), or run `mpagent service uninstall` to let `mpagent get` start agents"
        )


class Launchd:
    """A LaunchAgent in ~/Library/LaunchAgents, logging to ~/Library/Logs/mpagent."""

    name, tool = "launchd", "launchctl"

    def __init__(self, home: Path, uid: int) -> None:
        self.marker = home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        self.files = [self.marker]
        self.log_file = home / "Library" / "Logs" / "mpagent" / "agent.log"
        self.logs = str(self.log_file)
        self.domain, self.target = f"gui/{uid}", f"gui/{uid}/{LABEL}"

    @classmethod
    def here(cls) -> Launchd:
        return cls(Path.home(), os.getuid())

    def install(self, argv: list[str], socket: str) -> list[Step]:
        return [
            MakeDir(self.marker.parent),
            MakeDir(self.log_file.parent, 0o700),
            WriteFile(self.marker, render_plist(argv, self.log_file)),
            StopAgent(socket, tuple(argv)),
            Run(("launchctl", "bootout", self.target), True),  # a previous install, if loaded
            Run(("launchctl", "bootstrap", self.domain, str(self.marker))),
        ]

    def uninstall(self) -> list[Step]:
        return [Run(("launchctl", "bootout", self.target), True), RemoveFile(self.marker)]

    def status(self) -> Run:
        return Run(("launchctl", "print", self.target))

    def kickstart(self) -> list[str]:
        """Ask launchd to start the agent now (a no-op if it runs)."""
        return ["launchctl", "kickstart", self.target]

    def not_running(self, socket: str) -> str:
        return (
            f"the mpagent LaunchAgent is installed ({self.marker}) but no agent answers on "
            f"{socket}; see {self.log_file} and `launchctl print {self.target}`, start it with "
            f"`launchctl kickstart {self.target}`, or run `mpagent service uninstall` to let "
            "`mpagent get` start agents"
        )


Manager = Systemd | Launchd


def manager() -> Manager:
    if sys.platform.startswith("linux"):
        return Systemd.here()
    if sys.platform == "darwin":
        return Launchd.here()
    raise MpagentError(
        f"`mpagent service` supports systemd (Linux) and launchd (macOS), not {sys.platform} "
        "yet; nothing was installed"
    )


def installed() -> Manager | None:
    """The service manager that owns start-up, if `mpagent service install` set one up."""
    if not (sys.platform.startswith("linux") or sys.platform == "darwin"):
        return None
    found = manager()
    return found if found.marker.exists() else None


# -- the command ----------------------------------------------------------------------------


def main(args: Any, out: TextIO) -> int:
    """`mpagent service install|uninstall|status [--dry-run]`. Status exits with the service
    manager's own status (0 running, 3 not running), or 3 when nothing is installed."""
    target = manager()
    if args.action == "status":
        return status(target, out, args.dry_run)
    if args.action == "install":
        if not args.dry_run and shutil.which(target.tool) is None:
            raise MpagentError(
                f"{target.tool} is not on PATH, so {target.name} cannot run the agent here; "
                "nothing was installed, and `mpagent get` keeps starting agents itself"
            )
        steps = install_steps(target, args.config)
    elif target.marker.exists() or args.dry_run:
        steps = target.uninstall()
    else:
        out.write(f"mpagent service: not installed (no {target.marker})\n")
        return 0
    if args.dry_run:
        out.write(script(steps))
        return 0
    if args.action == "install":
        install(target, steps, out)
    else:
        for step in steps:
            step.run(out)
    if args.action == "install":
        out.write(f"mpagent service: installed ({target.name}); logs: {target.logs}\n")
    else:
        out.write(f"mpagent service: uninstalled ({target.name})\n")
    return 0


def install(target: Manager, steps: list[Step], out: TextIO) -> None:
    """Carry the steps out; if one fails (say, no user manager to talk to), put the unit
    files back as they were, so that `mpagent get` does not wait for a service that is not
    there but goes on starting agents itself."""
    before = {f: f.read_text(encoding="utf-8") if f.exists() else None for f in target.files}
    try:
        for step in steps:
            step.run(out)
    except MpagentError as exc:
        for path, content in before.items():
            if content is None:
                path.unlink(missing_ok=True)
            else:
                private.write_atomic(path, content)
        raise type(exc)(
            f"{exc.message}. Nothing is installed: the unit files are as they were, and "
            "`mpagent get` keeps starting agents itself",
            **exc.details,
        ) from exc


def install_steps(target: Manager, config_arg: str | None) -> list[Step]:
    """Check what the service would run before writing anything."""
    from mpagent import config, server

    explicit = config_arg or os.environ.get("MPAGENT_CONFIG")
    config_file = os.path.abspath(os.path.expanduser(explicit)) if explicit else None
    cfg = config.load(config_file)  # a service that exits 78 at every start helps nobody
    socket = socket_path()
    check_socket_path(socket, server.MAX_SOCKET_PATH)
    argv = command(shutil.which("mpagent"), sys.executable, config_file)
    if isinstance(target, Systemd):
        credentials = cfg.path.parent / "credentials"
        return [*target.install(argv, socket), Note(credentials_help(cfg.names, credentials))]
    return target.install(argv, socket)


def script(steps: list[Step]) -> str:
    lines = ["#!/bin/sh", "# what `mpagent service` would do", "set -e", "umask 077"]
    return "\n".join([*lines, *(s.describe() for s in steps)]) + "\n"


def status(target: Manager, out: TextIO, dry_run: bool) -> int:
    if not target.marker.exists():
        out.write("mpagent service: not installed; `mpagent service install` sets it up\n")
        return 3
    out.write(f"mpagent service: installed ({', '.join(str(f) for f in target.files)})\n")
    check = target.status()
    if dry_run:
        out.write(check.describe() + "\n")
        return 0
    return check.call(out)
