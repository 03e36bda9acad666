"""`mpagent demo`: the whole product against the built-in emulator, with throwaway keys.

It starts the emulator in-process, lets `mpagent get` autostart an agent, shows the cache,
a refresh ahead of expiry and the env file, then stops the agent. Everything lives in a
temporary directory with its own socket, so the user's own agent and files are untouched.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from mpagent.emulator import Emulator, pki

CLIENT_ID = "0b8f3a52-8c0e-4d7a-9a4e-5f1f2d6c7e90"
SCOPE = "idporten:dcr.read"
LIFETIME = 10  # short, so the demo can show a refresh ahead of expiry


def short(token: str) -> str:
    return f"{token[:16]}…{token[-6:]}" if len(token) > 30 else token


def run(out: TextIO) -> int:
    work = Path(tempfile.mkdtemp(prefix="mpa-demo-"))
    try:
        return _run(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(work: Path, out: TextIO) -> int:
    os.chmod(work, 0o700)
    password = secrets.token_urlsafe(16)
    ca = pki.make_ca()
    leaf = {"auth": pki.make_leaf(ca)}
    keystore = pki.write_pkcs12(work / "virksomhet.p12", leaf, password, [ca.cert])
    with Emulator(clients={CLIENT_ID: [SCOPE]}, trust=[ca.cert], token_lifetime=LIFETIME) as emu:
        config = work / "config.toml"
        env_file = work / "tokens.env"
        config.write_text(
            f'[agent]\nenv_file = "{env_file}"\n\n[profiles.demo]\nenvironment = "{emu.issuer}"\n'
            f'client_id = "{CLIENT_ID}"\nscopes = ["{SCOPE}"]\nkeystore = "{keystore}"\n',
            encoding="utf-8",
        )
        env = dict(
            os.environ,
            MPAGENT_CONFIG=str(config),
            MPAGENT_SOCKET=str(work / "agent.sock"),
            MPAGENT_KEYSTORE_PASSWORD=password,
            XDG_STATE_HOME=str(work / "state"),
        )

        def mpagent(*args: str) -> subprocess.CompletedProcess[str]:
            out.write(f"\n$ mpagent {' '.join(args)}\n")
            out.flush()
            return subprocess.run(
                [sys.executable, "-m", "mpagent", *args],
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=False,
            )

        out.write(f"emulator  {emu.issuer} (tokens live {LIFETIME} s)\nconfig    {config}\n")
        first = mpagent("get", SCOPE)
        if first.returncode != 0:
            out.write(first.stderr + f"\nthe demo failed with exit status {first.returncode}\n")
            return first.returncode
        out.write(f"{short(first.stdout.strip())}   (agent autostarted, token fetched)\n")
        started = time.perf_counter()
        again = mpagent("get", SCOPE)
        took = (time.perf_counter() - started) * 1000
        out.write(f"{short(again.stdout.strip())}   (from the agent's cache, {took:.0f} ms)\n")
        out.write(mpagent("status").stdout)
        out.write(
            f"\n… waiting for the agent to refresh ahead of expiry (about {LIFETIME // 2} s)\n"
        )
        deadline = time.monotonic() + LIFETIME
        while (
            time.monotonic() < deadline
            and env_file.exists()
            and first.stdout.strip() in env_file.read_text()
        ):
            time.sleep(0.2)
        out.write(f"\n$ cat {env_file}\n")
        for line in env_file.read_text().splitlines():
            name, _, value = line.partition("=")
            out.write(f"{name}={short(value)}\n" if value else line + "\n")
        refreshed = emu.token_requests > 1
        out.write(
            f"(refreshed: {refreshed}; the emulator has issued {emu.token_requests} tokens)\n"
        )
        mpagent("stop")
        out.write(
            '\nThe emulator enforces Maskinporten\'s grant rules. Point `environment` at "test" or\n'
            '"prod" and `keystore` at your business certificate to do the same for real.\n'
        )
        return 0 if refreshed else 1
