"""The command line's cold half: argparse and every command except a cached `get`.
Each command imports what it needs inside its own function."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from mpagent.cli import ask_agent, cmd_get, get_fields, profile_name, write_token


def build_parser() -> argparse.ArgumentParser:
    from mpagent import __version__

    parser = argparse.ArgumentParser(
        prog="mpagent", description="A credential agent for Maskinporten."
    )
    parser.add_argument("--version", action="version", version=f"mpagent {__version__}")
    parser.add_argument(
        "--config", help="config file (default: MPAGENT_CONFIG or the user config dir)"
    )
    sub = parser.add_subparsers(metavar="COMMAND")

    def command(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = command("get", cmd_get, "print an access token for SCOPE (one token for several scopes)")
    p.add_argument("scopes", nargs="+", metavar="SCOPE")
    p.add_argument("--profile", "-p")
    p.add_argument("--json", action="store_true", help="print the token response as JSON")
    p.add_argument("--min-ttl", type=float, metavar="SECONDS", help="least remaining lifetime")
    p.add_argument("--no-agent", action="store_true", help="sign and exchange here, no agent")
    p.add_argument("--no-start", action="store_true", help="do not start an agent if none runs")

    p = command("header", cmd_header, "print `Authorization: Bearer <token>` for curl -H @file")
    p.add_argument("scopes", nargs="+", metavar="SCOPE")
    p.add_argument("--profile", "-p")
    p.add_argument("--min-ttl", type=float, metavar="SECONDS")
    p.add_argument("--no-start", action="store_true")

    p = command("grant", cmd_grant, "print a signed JWT grant for SCOPE (for debugging)")
    p.add_argument("scopes", nargs="+", metavar="SCOPE")
    p.add_argument("--profile", "-p")

    p = command("emulator", cmd_emulator, "run a local Maskinporten emulator")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--client", action="append", default=[], metavar="CLIENT_ID=SCOPE,SCOPE")
    p.add_argument("--trust", action="append", default=[], metavar="CA.pem")
    p.add_argument("--jwk", action="append", default=[], metavar="KID=PUBLIC.pem")
    p.add_argument("--token-lifetime", type=int, default=120, metavar="SECONDS")

    command("agent", cmd_agent, "run the agent in the foreground (what systemd/launchd run)")

    p = command("status", cmd_status, "show the agent's tokens, deadlines and errors")
    p.add_argument("--json", action="store_true")
    command("stop", cmd_stop, "stop the agent")
    command("reload", cmd_reload, "re-read the configuration and keys (keeps the old on error)")

    p = command("env", cmd_env, "print `export NAME=token` lines for eval")
    p.add_argument("--profile", "-p")
    p = command("exec", cmd_exec, "run CMD with the token variables in its environment")
    p.add_argument("--profile", "-p")
    p.add_argument("--scope", action="append", default=[], metavar="SCOPE")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")

    p = command("service", cmd_service, "install the agent as a systemd/launchd user service")
    p.add_argument("action", choices=["install", "uninstall", "status"])
    p.add_argument("--dry-run", action="store_true", help="print every file and command instead")

    p = command("secret", cmd_secret, "store passwords in the OS keyring")
    p.add_argument("action", choices=["set", "delete", "status"])
    p.add_argument("profile", nargs="?")
    p.add_argument("--key", action="store_true", help="the key password, not the keystore's")
    p.add_argument("--stdin", action="store_true", help="read one line from stdin, no prompt")

    p = command(
        "doctor", cmd_doctor, "check the configuration, keys, clock and a real token request"
    )
    p.add_argument("--profile", "-p")
    p.add_argument("--no-token", action="store_true", help="skip the final token request")

    p = command(
        "import-properties", cmd_import_properties, "import a jwt-grant-generator properties file"
    )
    p.add_argument("file")
    p.add_argument("--profile", "-p", help="name of the new profile (default: from the file name)")

    p = command("bridge", cmd_bridge, "the token bridge for HTTP tools: make its client secret")
    p.add_argument("action", choices=["secret"])
    p.add_argument("--file", action="store_true", help="keep it in a 0600 file, not the keyring")
    p = command("postman", cmd_postman, "write a Postman environment and collection for the bridge")
    p.add_argument("--profile", "-p")
    p.add_argument("--out", default=".", metavar="DIR", help="where to write (default: here)")

    command("demo", cmd_demo, "show mpagent working against the built-in emulator")
    return parser


def load_config(args: argparse.Namespace) -> Any:
    from mpagent import config

    return config.load(args.config)


def get_without_agent(args: Any) -> int:
    """`get --no-agent`: sign and exchange in this process."""
    from mpagent.exchange import open_exchange

    cfg = load_config(args)
    token = open_exchange(cfg, cfg.profile(profile_name(args))).fetch(args.scopes)
    write_token(token.access_token, token.token_type, token.scope, token.expires_at, args.json)
    return 0


def cmd_header(args: argparse.Namespace) -> int:
    """For `curl -H @<(mpagent header S)`: the token never appears in any argv."""
    reply = dict(ask_agent(args, "get", get_fields(args)))
    sys.stdout.write(f"Authorization: Bearer {reply['token']}\n")
    return 0


def cmd_grant(args: argparse.Namespace) -> int:
    from mpagent.exchange import open_exchange

    cfg = load_config(args)
    sys.stdout.write(open_exchange(cfg, cfg.profile(args.profile)).grant(args.scopes) + "\n")
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mpagent.emulator import Emulator

    emulator = Emulator.from_files(
        host=args.host,
        port=args.port,
        clients=args.client,
        trust=[Path(p) for p in args.trust],
        jwks=args.jwk,
        token_lifetime=args.token_lifetime,
    )
    print(emulator.issuer, flush=True)
    emulator.serve_forever()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mpagent import demo

    return demo.run(sys.stdout)


def cmd_agent(args: argparse.Namespace) -> int:
    from mpagent import agent

    return agent.run(args.config)


def cmd_status(args: argparse.Namespace) -> int:
    import json

    document = json.loads(dict(ask_agent(args, "status", start=False))["json"])
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    from mpagent import report

    print(report.status(document))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    ask_agent(args, "stop", start=False)
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    ask_agent(args, "reload", start=False)
    print("mpagent: reloaded", file=sys.stderr)
    return 0


def token_variables(args: argparse.Namespace, scopes: list[str]) -> dict[str, str]:
    """NAME → token for the given scopes, or for every scope the profile configures."""
    from mpagent import envfile

    profile = load_config(args).profile(profile_name(args))
    variables = {}
    for scope in scopes or profile.scopes:
        fields = [("scope", scope), ("profile", profile.name)]
        reply = dict(ask_agent(args, "get", fields))
        name = envfile.variable_name(scope, profile.env_names)
        variables[name] = reply["token"]
        variables[name + "_EXPIRES_AT"] = str(int(float(reply["expires_at"])))
    return variables


def cmd_env(args: argparse.Namespace) -> int:
    for name, value in token_variables(args, []).items():
        print(f"export {name}={value}")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        print(
            "mpagent: exec needs a command: mpagent exec [--scope S] -- CMD ARGS", file=sys.stderr
        )
        return 2
    env = {**os.environ, **token_variables(args, args.scope)}
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        print(f"mpagent: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127


def cmd_service(args: argparse.Namespace) -> int:
    from mpagent import service

    return service.main(args, sys.stdout)


def cmd_secret(args: argparse.Namespace) -> int:
    from mpagent import secretcmd

    return secretcmd.main(args, sys.stdout)


def cmd_doctor(args: argparse.Namespace) -> int:
    from mpagent import doctor

    return doctor.main(args, sys.stdout)


def cmd_import_properties(args: argparse.Namespace) -> int:
    from mpagent import properties

    return properties.main(args, sys.stdout)


def cmd_bridge(args: argparse.Namespace) -> int:
    """`bridge secret`: stdout is the new secret alone, printed this once."""
    from mpagent import bridge

    cfg = load_config(args)
    secret, where = bridge.SecretStore(cfg.bridge.secret_file).store_new(to_file=args.file)
    sys.stdout.write(secret + "\n")
    print(
        f"mpagent: new bridge secret stored in {where}. Give it to the tool as client_secret "
        "(client_id: a profile name). A running agent reads it only when it starts: "
        "`mpagent stop`, then start it again.",
        file=sys.stderr,
    )
    if cfg.bridge.listen is None:
        print(
            f'mpagent: the bridge is off; add [bridge] listen = "127.0.0.1:8765" to {cfg.path}',
            file=sys.stderr,
        )
    return 0


def cmd_postman(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mpagent import bridge, postman
    from mpagent.errors import ConfigError

    cfg = load_config(args)
    profile = cfg.profile(profile_name(args))
    if cfg.bridge.listen is None:
        raise ConfigError(
            f"{cfg.path}: the token bridge is off, and Postman gets its tokens from it; add "
            '[bridge] with listen = "127.0.0.1:8765", restart the agent, run `mpagent bridge secret`'
        )
    url = bridge.token_url(cfg.bridge.listen)
    documents = postman.documents(profile.name, url, profile.scopes[0])
    for path in postman.write(Path(args.out), documents):
        print(f"wrote {path}")
    print(
        "Import both into Postman, select the environment, and set client_secret (the output of "
        "`mpagent bridge secret`) and base_url. newman: newman run COLLECTION -e ENVIRONMENT "
        f'--folder "{postman.SCRIPT_FOLDER}" --env-var client_secret=... --env-var base_url=...'
    )
    return 0
