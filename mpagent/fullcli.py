"""The command line's cold half: argparse, and every command but the fast path (`fastcli`:
a cached `get` and `env`, which it reuses). Each command imports what it needs inside its own
function. Only it, cli, fastcli and console print or choose an exit status. It never imports
`cli` (which imports it, lazily).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from mpagent import fastcli
from mpagent.ask import ask_agent, get_fields, profile_name
from mpagent.console import printable, say
from mpagent.errors import (
    AgentNotRunning,
    ConfigError,
    KeystoreError,
    MpagentError,
    SecretUnavailable,
)
from mpagent.fastcli import get_token, write_token
from mpagent.paths import socket_path

if TYPE_CHECKING:
    from mpagent.config import Profile


def run(argv: list[str]) -> int:
    """Parse argv and run its command; the exit status. An MpagentError is one line on
    stderr and its exit status; a usage mistake, argparse's message and 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    log_to_stderr(args)
    return fastcli.run(args, in_process=in_process)


def build_parser() -> argparse.ArgumentParser:
    from mpagent import __version__

    parser = argparse.ArgumentParser(
        prog="mpagent",
        description="A credential agent for Maskinporten.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mpagent {__version__}")
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    parser.add_argument("--profile", "-p", help=PROFILE_HELP)
    # --config (and --profile, where a command takes one) also after the command. SUPPRESS:
    # when not given there, the value given before the command is kept.
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP)
    sub = parser.add_subparsers(metavar="COMMAND")

    def command(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[after])
        p.set_defaults(func=func)
        return p

    def profile_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--profile", "-p", default=argparse.SUPPRESS, help=PROFILE_HELP)

    def scopes_argument(p: argparse.ArgumentParser) -> None:
        p.add_argument("scopes", nargs="+", metavar="SCOPE", help=SCOPE_HELP)

    p = command("get", cmd_get, "print an access token for SCOPE (one token for several scopes)")
    scopes_argument(p)
    profile_option(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="print the token response as JSON: access_token, token_type, expires_in, "
        "expires_at, scope (default: the token alone)",
    )
    p.add_argument("--min-ttl", type=float, metavar="SECONDS", help=MIN_TTL_HELP)
    p.add_argument(
        "--no-agent",
        action="store_true",
        help="sign a grant and exchange it in this process, without the agent or its cache",
    )
    p.add_argument("--no-start", action="store_true", help=NO_START_HELP)
    customer_options(p)

    p = command("header", cmd_header, "print `Authorization: Bearer <token>` for curl -H @file")
    scopes_argument(p)
    profile_option(p)
    p.add_argument("--min-ttl", type=float, metavar="SECONDS", help=MIN_TTL_HELP)
    p.add_argument("--no-start", action="store_true", help=NO_START_HELP)
    customer_options(p)

    p = command("grant", cmd_grant, "print a signed JWT grant for SCOPE (for debugging)")
    scopes_argument(p)
    profile_option(p)

    p = command("emulator", cmd_emulator, "run a local Maskinporten emulator")
    p.epilog = (
        "Prints its issuer URL on the first line of stdout, logs each token request to stderr "
        "and serves until Ctrl-C. It also serves Digdir's admin API for its clients' keys: "
        "GET, POST, PUT and DELETE ISSUERclients/CLIENT_ID/jwks, with a Bearer token it issued "
        "for idporten:dcr.read (to read) or idporten:dcr.write (to change) to a client that signs "
        "with a certificate. And Altinn 3's token exchange: GET "
        "ISSUERauthentication/api/v1/exchange/maskinporten[?test=true] with a Bearer token it "
        "issued answers an Altinn token (a JWT, as text), anything else 401. Example: mpagent "
        "emulator --trust ca.pem "
        "--client 'CLIENT_ID=idporten:dcr.read,idporten:dcr.write;lifetime=3599'"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=0, help="port to listen on; 0 picks a free one (default: 0)"
    )
    p.add_argument(
        "--no-trailing-slash",
        dest="issuer_slash",
        action="store_false",
        help="an issuer without the trailing slash, http://HOST:PORT, as Skyporten's "
        "(https://sky.maskinporten.no); aud must then be exactly that (default: with it)",
    )
    p.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="CLIENT_ID=SCOPE[,SCOPE...][;lifetime=SECONDS]",
        help="register a client, the scopes it may ask for and, optionally, its own "
        "access-token lifetime (1-7200 s); repeatable (default: no clients)",
    )
    p.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="CA.pem",
        help="trust the CA certificates in this PEM file for x5c grants; repeatable "
        "(default: none, so only kid grants can pass)",
    )
    p.add_argument(
        "--jwk",
        action="append",
        default=[],
        metavar="KID=PUBLIC.pem",
        help="register an RSA public key under KID for kid grants; repeatable (default: none)",
    )
    p.add_argument(
        "--token-lifetime",
        type=int,
        default=120,
        metavar="SECONDS",
        help="access-token lifetime for clients without their own lifetime=, 1-7200 "
        "(default: 120, Maskinporten's default)",
    )
    p.add_argument(
        "--key-lifetime",
        type=float,
        default=365 * 86400,
        metavar="SECONDS",
        help="how long a key registered through the admin API (ISSUERclients/CLIENT_ID/jwks) is "
        "valid from upload; a grant signed with it later gets MP-121 Expired key "
        "(default: 31536000, one year, as Maskinporten)",
    )
    p.add_argument(
        "--propagation",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="delay before a change to a client's keys through the admin API reaches /token; "
        "the admin API shows it at once (default: 0; Maskinporten takes 0-120 s, sometimes more)",
    )
    p.add_argument(
        "--altinn-lifetime",
        type=int,
        default=1800,
        metavar="SECONDS",
        help="lifetime of the Altinn tokens its exchange gives, not capped at the Maskinporten "
        "token's expiry (default: 1800, as Altinn's tt02)",
    )
    p.add_argument(
        "--systemuser",
        action="append",
        default=[],
        metavar="CLIENT_ID=ORGNO[,ORGNO...]",
        help="the organisations that have a system user for this client; a grant with "
        "urn:altinn:systemuser authorization_details for any other gets MP-303; repeatable "
        "(default: none, and then every organisation has one for every client)",
    )

    p = command("agent", cmd_agent, "run the agent in the foreground (what systemd/launchd run)")
    p.add_argument(
        "--foreground-only",
        action="store_true",
        help='server mode, for containers and CI (as [agent] mode = "server", with which '
        "clients also never start an agent): no keyring, no prompt, JSON log lines on stdout "
        '(unless [agent] log_format = "text"), exit within 5 s of SIGTERM',
    )
    p.add_argument(
        "--print-env",
        action="store_true",
        help="print NAIS_TOKEN_ENDPOINT and NAIS_TOKEN_INTROSPECTION_ENDPOINT for the "
        "config's [http] listen (for a pod spec or a CI step) and exit; runs no agent",
    )

    p = command("status", cmd_status, "show the agent's tokens, deadlines and errors")
    p.add_argument(
        "--json", action="store_true", help="print the status document as JSON (default: a table)"
    )
    command("stop", cmd_stop, "stop the agent")
    command("reload", cmd_reload, "re-read the configuration and keys (keeps the old on error)")
    p = command("refresh", cmd_refresh, "fetch the agent's tokens again now, failed ones included")
    p.add_argument(
        "refresh_profile",
        nargs="?",
        metavar="PROFILE",
        help="only this profile's tokens (default: --profile, else every profile)",
    )
    profile_option(p)

    p = command("env", fastcli.cmd_env, "print `export NAME=token` lines for eval")
    profile_option(p)
    p.set_defaults(scopes=[])  # every scope the profile lists
    p = command("exec", cmd_exec, "run CMD with the token variables in its environment")
    profile_option(p)
    p.add_argument(
        "--scope",
        action="append",
        dest="scopes",
        default=[],
        metavar="SCOPE",
        help="put this scope's token in the environment; repeatable "
        "(default: every scope the profile lists)",
    )
    p.add_argument(
        "--no-agent",
        action="store_true",
        help="sign grants and exchange them in this process, without an agent (CI jobs: "
        "nothing is started, nothing is left running)",
    )
    p.add_argument(
        "cmd",
        nargs=argparse.REMAINDER,
        metavar="-- CMD ARGS",
        help="the command to run and its arguments, after --",
    )

    p = command("service", cmd_service, "install the agent as a systemd/launchd user service")
    p.add_argument(
        "action",
        choices=["install", "uninstall", "status"],
        help="install and start the service, stop and remove it, or show its state",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print every file and command, change nothing"
    )

    p = command(
        "unlock",
        cmd_unlock,
        "hand the running agent a locked profile's password, checked against its keystore "
        "(kept in the agent's memory only, like ssh-add)",
    )
    p.add_argument(
        "profiles",
        nargs="*",
        metavar="PROFILE",
        help="the profiles to unlock (default: --all if given, else the chosen profile)",
    )
    p.add_argument("--all", action="store_true", help="every profile the agent reports locked")
    p.add_argument(
        "--key", action="store_true", help="also ask for the key password (a JKS key with its own)"
    )
    p.add_argument(
        "--stdin", action="store_true", help="read one line per password from stdin, no prompt"
    )
    p = command("lock", cmd_lock, "make the agent forget the passwords given by unlock")
    p.add_argument(
        "profiles", nargs="*", metavar="PROFILE", help="the profiles to lock (default: all)"
    )

    p = command("secret", cmd_secret, "store passwords in the OS keyring")
    p.add_argument(
        "action",
        choices=["set", "delete", "status"],
        help="store a password (prompted, or --stdin), remove it, or show which are stored",
    )
    p.add_argument(
        "profile",
        nargs="?",
        default=argparse.SUPPRESS,
        metavar="PROFILE",
        help="the profile the password is for (default: --profile, MPAGENT_PROFILE, "
        "default_profile, else the only profile)",
    )
    profile_option(p)
    p.add_argument(
        "--key",
        action="store_true",
        help="the key password, where it differs from the keystore's (default: the keystore's)",
    )
    p.add_argument(
        "--stdin", action="store_true", help="read the password as one line from stdin, no prompt"
    )

    p = command(
        "doctor", cmd_doctor, "check the configuration, keys, clock and a real token request"
    )
    profile_option(p)
    p.add_argument("--no-token", action="store_true", help="skip the final token request")

    p = command(
        "import-properties", cmd_import_properties, "import a jwt-grant-generator properties file"
    )
    p.epilog = (
        "Run it where you ran the Java tool: a relative keystore.file is taken from the "
        "working directory, as Java did. Import test.properties, then prod.properties, to get "
        "[profiles.test] and [profiles.prod] in one config."
    )
    p.add_argument("file", metavar="FILE", help="the jwt-grant-generator .properties file")
    p.add_argument(
        "--profile",
        "-p",
        default=argparse.SUPPRESS,
        help="name of the new profile (default: from the file name)",
    )

    p = command("bridge", cmd_bridge, "the token bridge for HTTP tools: show its client secret")
    p.add_argument(
        "action", choices=["secret"], help="print the client secret (made once, if none exists)"
    )
    p.add_argument(
        "--rotate",
        action="store_true",
        help="make a new secret instead; a running agent takes it at once, the old one stops "
        "working",
    )
    p.add_argument(
        "--file",
        action="store_true",
        help="keep it in a 0600 file, not the OS keyring (default: the keyring, if usable)",
    )
    p = command("postman", cmd_postman, "write a Postman environment and collection for the bridge")
    profile_option(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument(
        "--out", default=".", metavar="DIR", help="where to write (default: the current directory)"
    )
    out.add_argument(
        "--with-secret",
        action="store_true",
        help="write no file; print the environment with the bridge secret in it, for newman: "
        "newman run COLLECTION -e <(mpagent postman --with-secret)",
    )

    # -- `mpagent keys`: the client's own keys in Digdir's admin API
    p = command(
        "keys", cmd_keys, "the client's own registered keys: list, create, renew, rotate, delete"
    )
    p.epilog = KEYS_EPILOG
    keys = p.add_subparsers(metavar="ACTION")

    def keys_command(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        k = keys.add_parser(name, help=help_text, description=help_text, parents=[after])
        k.set_defaults(func=func)
        profile_option(k)
        return k

    def dry_run_option(k: argparse.ArgumentParser) -> None:
        k.add_argument("--dry-run", action="store_true", help=KEYS_DRY_RUN_HELP)

    keys_command("list", cmd_keys_list, "show the client's registered keys and their expiry")
    k = keys_command(
        "create",
        cmd_keys_create,
        "make an RSA key here and register its public half with the client's other keys",
    )
    k.add_argument(
        "--out",
        metavar="PATH",
        help="the new private key's file, 0600 PKCS#8 PEM (default: <kid>.pem in mpagent's "
        "keys directory, ~/.local/share/mpagent/keys/ on Linux)",
    )
    k.add_argument(
        "--kid",
        help="the key's kid, unique across all of Digdir's customers (default: "
        "mpagent-<profile>-<date>-<random>)",
    )
    k.add_argument(
        "--switch",
        action="store_true",
        help="also make the profile sign with the new key: writes keystore, keystore_type and "
        "kid into the config file, comments kept (default: print the lines only)",
    )
    dry_run_option(k)
    k = keys_command(
        "renew", cmd_keys_renew, "re-register every key unchanged: each lives a year from now"
    )
    dry_run_option(k)
    k = keys_command(
        "rotate",
        cmd_keys_rotate,
        "replace the key the profile signs with by a new one, without a failed token request; "
        "rerun it to finish an interrupted rotation",
    )
    k.add_argument(
        "--grace",
        type=seconds,
        default=300.0,
        metavar="SECONDS",
        help="how long the old key stays registered after the switch, for agents and copies "
        "still signing with it (default: 300)",
    )
    dry_run_option(k)
    k = keys_command("delete", cmd_keys_delete, "remove one key from the client's registered keys")
    k.add_argument("delete_kid", metavar="KID", help="the kid of the key to remove")
    k.add_argument("--yes", action="store_true", help="do not ask for confirmation (default: ask)")
    dry_run_option(k)

    command("demo", cmd_demo, "show mpagent working against the built-in emulator")
    return parser


def seconds(text: str) -> float:
    """argparse type: a finite number of seconds, 0 or more."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


KEYS_EPILOG = (
    "The keys live in Digdir's self-service admin API (admin_api, else Digdir's for test or "
    "prod), reached with a token of the profile's admin_profile (default: the profile itself "
    "when it signs with a business certificate); its client needs the scopes "
    "idporten:dcr.read and idporten:dcr.write. A registered key lives a year; renew or rotate "
    "before that (auto_renew = true lets the agent renew)."
)
KEYS_DRY_RUN_HELP = (
    "print each change (method, URL, JSON body) instead of sending it; reads are still sent "
    "(default: send)"
)


CONFIG_HELP = (
    "the config file (default: MPAGENT_CONFIG, else config.toml in the user config dir, "
    "~/.config/mpagent/ on Linux)"
)
PROFILE_HELP = (
    "the profile to use (default: MPAGENT_PROFILE, else default_profile, else the only profile)"
)
SCOPE_HELP = "a Maskinporten scope, e.g. idporten:dcr.read; several give one token for the set"
MIN_TTL_HELP = (
    "the least remaining lifetime the token must have; a newer one is fetched otherwise "
    "(default: 10 s, or a quarter of the token's lifetime if that is less)"
)
NO_START_HELP = (
    "fail with exit 69 if no agent runs, instead of starting one (default: start one; "
    "also MPAGENT_NO_AUTOSTART=1)"
)
EPILOG = """\
environment variables:
  MPAGENT_CONFIG             the config file, when --config is not given
  MPAGENT_PROFILE            the profile, when --profile is not given
  MPAGENT_SOCKET             the agent's socket (default: agent.sock in the user runtime dir,
                             $XDG_RUNTIME_DIR/mpagent/ on Linux)
  MPAGENT_NO_AUTOSTART=1     `get` never starts an agent (as --no-start)
  MPAGENT_KEYSTORE_PASSWORD_<PROFILE>, MPAGENT_KEYSTORE_PASSWORD
                             the keystore password (beats the OS keyring)
  MPAGENT_KEY_PASSWORD_<PROFILE>, MPAGENT_KEY_PASSWORD
                             the key password, where it differs from the keystore's
  MPAGENT_KEYSTORE_B64_<PROFILE>, MPAGENT_KEYSTORE_B64
                             the keystore itself, base64 (a CI secret), for a profile
                             without keystore; decoded in memory, never written
  CREDENTIALS_DIRECTORY      systemd credentials <profile>.keystore and <profile>.key
  MPAGENT_LOG_LEVEL          the agent's log level: debug, info, warning, error
                             (default: [agent] log_level)
  `~` in MPAGENT_CONFIG and MPAGENT_SOCKET is your home directory.

exit status: 0 ok, 2 usage error, 69 no agent, 75 Maskinporten unreachable or failing,
77 refused by Maskinporten, 78 configuration or keystore error, 1 anything else.
Run `mpagent COMMAND --help` for a command's options."""


class LogFormatter(logging.Formatter):
    """A command's log records as its other stderr lines: `mpagent: warning: ...`."""

    def format(self, record: logging.LogRecord) -> str:
        return f"mpagent: {record.levelname.lower()}: {printable(record.getMessage())}"


def customer_options(p: argparse.ArgumentParser) -> None:
    """`get`'s and `header`'s token for one customer organisation (Altinn 3)."""
    one = p.add_mutually_exclusive_group()
    one.add_argument(
        "--systemuser-org",
        metavar="ORGNO",
        help='a token for the system user of this organisation (nine digits, "0192:" '
        "accepted): the grant's authorization_details name it; cached under its own key "
        "(default: the profile's systemuser_org, if any)",
    )
    one.add_argument(
        "--consumer-org",
        metavar="ORGNO",
        help="a token delegated by this organisation in Altinn (the grant's consumer_org); "
        "cached under its own key (default: the profile's consumer_org, if any)",
    )


def log_to_stderr(args: argparse.Namespace) -> None:
    """Warnings from the modules a command uses (a clock skew, say) reach stderr in the
    CLI's own form. Not for the agent and the emulator, which set up their own logging."""
    if args.func in (cmd_agent, cmd_emulator):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(LogFormatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


def load_config(args: argparse.Namespace) -> Any:
    from mpagent import config

    return config.load(args.config)


def load_profile(args: argparse.Namespace) -> tuple[Any, Any]:
    """The configuration and the profile this command uses. Only that profile must be
    right: a mistake in another one is a warning on stderr."""
    cfg = load_config(args)
    profile = cfg.profile(profile_name(args))
    for problem in cfg.problems(except_for=profile.name):
        say(f"warning: {problem}")
    return cfg, profile


def open_profile(args: argparse.Namespace) -> Any:
    """load_profile, then the profile's key: the exchange, its warnings said on stderr."""
    from mpagent.exchange import open_exchange

    exchange = open_exchange(*load_profile(args))
    for warning in exchange.key.warnings:
        say(f"warning: {warning}")
    return exchange


def cmd_get(args: argparse.Namespace) -> int:
    """`get` through the agent as on the fast path; with --no-agent, sign and exchange in
    this process."""
    if not args.no_agent:
        return fastcli.cmd_get(args)
    from mpagent.exchange import customer_claims

    get_fields(args)  # the organisation numbers checked before the key is opened
    exchange = open_profile(args)
    claims = None
    if args.systemuser_org or args.consumer_org:
        claims = customer_claims(exchange.profile, args.systemuser_org, args.consumer_org)
    token = exchange.fetch(args.scopes, claims)
    write_token(token.access_token, token.token_type, token.scope, token.expires_at, args.json)
    return 0


def cmd_header(args: argparse.Namespace) -> int:
    """For `curl -H @<(mpagent header S)`: the token never appears in any argv."""
    reply = get_token(args)
    sys.stdout.write(f"Authorization: Bearer {reply['token']}\n")
    return 0


def cmd_grant(args: argparse.Namespace) -> int:
    sys.stdout.write(open_profile(args).grant(args.scopes) + "\n")
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mpagent.emulator import Emulator

    # What it issued, refused and warned about (e.g. a grant longer than the documented 120 s)
    # is what a developer runs it to see.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s mpagent emulator %(levelname)s %(message)s"
    )
    emulator = Emulator.from_files(
        host=args.host,
        port=args.port,
        clients=args.client,
        trust=[Path(p) for p in args.trust],
        jwks=args.jwk,
        token_lifetime=args.token_lifetime,
        key_lifetime=args.key_lifetime,
        propagation=args.propagation,
        altinn_lifetime=args.altinn_lifetime,
        systemusers=args.systemuser,
        issuer_slash=args.issuer_slash,
    )
    print(emulator.issuer, flush=True)
    emulator.serve_forever()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mpagent import demo

    return demo.run(sys.stdout)


def cmd_agent(args: argparse.Namespace) -> int:
    from mpagent import agent

    if getattr(args, "print_env", False):
        return print_http_env(load_config(args))
    return agent.run(args.config, foreground_only=getattr(args, "foreground_only", False))


def print_http_env(cfg: Any) -> int:
    """`agent --print-env`: the texas variables for [http] listen, as NAME=VALUE lines."""
    from mpagent import httpapi

    if cfg.http.listen is None:
        raise ConfigError(
            f"{cfg.path}: [http] listen is not set, so the agent serves no texas-compatible "
            'endpoint; add [http] with listen = "127.0.0.1:7164"'
        )
    for name, value in httpapi.environment(cfg.http.listen).items():
        print(f"{name}={value}")
    return 0


def ask_running_agent(
    args: argparse.Namespace, verb: str, absent: str, fields: list[tuple[str, str]] | None = None
) -> dict[str, str]:
    """One request to the agent that is running, never starting one; with none, the error
    says so plainly and `absent` says what that means for this command."""
    try:
        return dict(ask_agent(args, verb, fields, start=False))
    except AgentNotRunning as exc:
        if not exc.details.get("absent"):
            raise
        raise AgentNotRunning(f"no agent is running on {socket_path()}; {absent}") from None


def cmd_status(args: argparse.Namespace) -> int:
    import json

    starts = (
        "`mpagent get SCOPE` starts one, or run `mpagent agent` "
        '(`mpagent agent --foreground-only` for [agent] mode = "server")'
    )
    document = json.loads(ask_running_agent(args, "status", starts)["json"])
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    from mpagent import keywatch, report

    print(report.status(document))
    for line in keywatch.render(document):  # registered keys, with admin_profile/auto_renew
        print(line)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    reply = ask_running_agent(args, "stop", "nothing to stop")
    pid = f" (pid {reply['pid']})" if reply.get("pid") else ""
    say(f"stopped the agent{pid} on {socket_path()}")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    import json

    reply = ask_running_agent(
        args, "reload", "nothing to reload: an agent reads the configuration when it starts"
    )
    say("reloaded")
    document = json.loads(reply["json"]) if "json" in reply else {}
    for name, message in sorted((document.get("unusable") or {}).items()):
        say(f"profile {name} cannot be used: {message}")
    if document.get("files"):
        say(f"token files: {document['files']}")
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    """Every token of the profile (or of all) fetched again now; exit 0 if all worked, else
    the exit status of the first failure."""
    import json

    profile = args.refresh_profile or args.profile
    fields = [("profile", profile)] if profile else []
    reply = ask_running_agent(args, "refresh", "nothing to refresh", fields)
    results = json.loads(reply["json"])
    if not results:
        say(f"no tokens to refresh{f' for profile {profile}' if profile else ''}")
    status = 0
    for result in results:
        name = f"{result['profile']}:{result['scope']}"
        if result.get("systemuser_org"):  # a per-customer token: which organisation's
            name += f" (systemuser {result['systemuser_org']})"
        elif result.get("consumer_org"):
            name += f" (consumer {result['consumer_org']})"
        if result["ok"]:
            say(f"refreshed {name}")
            continue
        error = MpagentError.from_wire(
            result["error"] or {"message": "the agent reported neither a token nor an error"}
        )
        say(f"{name} failed: {error}")
        status = status or error.exit_code
    return status


def cmd_exec(args: argparse.Namespace) -> int:
    """CMD with the variables of `env` (the agent's answer to it) added to its environment."""
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        say("exec needs a command: mpagent exec [--scope S] -- CMD ARGS")
        return 2
    from mpagent.passwords import child_env

    pairs = env_without_agent(args) if args.no_agent else fastcli.ask_env(args)
    env = {**child_env(os.environ), **dict(pairs)}  # never the keystore or its passwords
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        say(f"cannot run {command[0]}: {exc.strerror}")
        return 127


def in_process(args: Any) -> int | None:
    """`get`, `env` and `exec` when no agent answers and the configuration's agent runs in
    server mode (which clients never start, autostart.py): as with --no-agent, in this
    process, nothing started or left behind. None for any other command."""
    args.no_agent = True
    if args.func in (fastcli.cmd_get, cmd_get):
        return cmd_get(args)
    if args.func is cmd_exec:
        return cmd_exec(args)
    if args.func is fastcli.cmd_env:
        pairs = env_without_agent(args)
        sys.stdout.write("".join(f"export {n}={fastcli.shell_quote(v)}\n" for n, v in pairs))
        return 0
    return None


def env_without_agent(args: argparse.Namespace) -> list[tuple[str, str]]:
    """`exec --no-agent`: the variables the agent's `env` answer holds (agent._env_reply),
    each token fetched here, one scope at a time as the agent does."""
    from mpagent import envfile
    from mpagent.exchange import open_exchange
    from mpagent.tokens import scope_string

    cfg, profile = load_profile(args)
    scopes = args.scopes or list(profile.scopes)
    if not scopes:
        raise ConfigError(
            f"profile {profile.name} lists no scopes; pass --scope SCOPE, or add scopes to "
            f"[profiles.{profile.name}]"
        )
    exchange = open_exchange(cfg, profile)
    for warning in exchange.key.warnings:
        say(f"warning: {warning}")
    tokens = [(scope, exchange.fetch([scope])) for scope in scopes]
    variables = envfile.variables(
        profile.name,
        profile.env_names,
        [(scope_string([s]), t.access_token, t.expires_at) for s, t in tokens],
        short=profile.name == cfg.default_name,
    )
    return list(variables.items())


def cmd_service(args: argparse.Namespace) -> int:
    from mpagent import service

    return service.main(args, sys.stdout)


def cmd_unlock(args: argparse.Namespace) -> int:
    from mpagent import config, unlock

    cfg = config.load(args.config)
    names = unlock.chosen(args, cfg)
    if not names:
        say("no profile is locked; nothing to unlock")
        return 0
    unlock.hand_over(args, cfg, names, say)
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    from mpagent import unlock

    locked = unlock.lock(args)
    if not locked:
        say("no password given by `mpagent unlock` was held; nothing to forget")
    for name in locked:
        say(f"profile {name} locked: its password and tokens are forgotten")
    return 0


# -- `mpagent secret`: a profile's passwords in the OS keyring ---------------------------
#
# `set` opens the profile's keystore with the password before storing it, so a wrong one is
# refused at once instead of showing up later in the agent. The keyring itself is reached only
# through mpagent.passwords. No password is ever printed, logged or put in a message;
# `status` says only whether one is stored.

WHICH = {False: "keystore", True: "key"}
WRONG_CHECK = {"keystore": "wrong_store_password", "key": "wrong_key_password"}
STDIN_HINT = "pipe it as one line: printf '%s\\n' \"$PW\" | mpagent secret set PROFILE --stdin"


def cmd_secret(args: argparse.Namespace) -> int:
    action = {"set": secret_set, "delete": secret_delete, "status": secret_status}[args.action]
    return action(args)


def secret_set(args: argparse.Namespace) -> int:
    from mpagent import passwords

    which = WHICH[bool(args.key)]
    name = _secret_profile(args)
    profile = _configured(args, name)
    try:
        # Reading first finds an unusable keyring before anyone types a password for it.
        replacing = passwords.keyring_read(name, which) is not None
    except SecretUnavailable as exc:
        raise passwords.without_keyring(exc, name) from exc
    password = _password_from_stdin() if args.stdin else _password_prompted(name, which)
    checked = _check_password(profile, which, password) if profile else ""
    passwords.keyring_set(name, which, password)
    done = "replaced" if replacing else "stored"
    print(f"{done} the {which} password of profile {name} in the OS keyring{checked}")
    return 0


def _check_password(profile: Profile, which: str, password: str) -> str:
    """Open the keystore with `password` as its `which` password (the other password from
    the profile's usual sources). A wrong one raises: nothing is stored. Anything else that
    keeps the key from loading only warns, as the password may well be right. Returns what
    to add to the "stored" line."""
    from mpagent.exchange import load_key
    from mpagent.passwords import ProfilePasswords

    trial = ProfilePasswords.for_profile(profile, unlocked={which: password})
    problem: MpagentError | None = None
    try:
        load_key(profile, trial, strict=False)
    except MpagentError as exc:
        problem = exc
    used = trial.source(which) == "unlock"  # the password was asked for, so it was tried
    if problem is not None and used and problem.details.get("check") == WRONG_CHECK[which]:
        raise _refusal(profile, which, problem) from None
    if not used:
        say(f"warning: {_unchecked(profile, which, problem)}")
        return ""
    if problem is not None:
        say(f"warning: {_but(profile, problem)}")
    return f" (checked: it opens {profile.key_location})"


def _unchecked(profile: Profile, which: str, problem: MpagentError | None) -> str:
    if problem is not None:
        return f"could not check the password: {problem.message}; storing it anyway"
    what = "the keystore password opens its key" if which == "key" else "it is not encrypted"
    return f"{profile.key_location} needs no {which} password ({what}); storing it anyway"


def _but(profile: Profile, problem: MpagentError) -> str:
    """The password is right; what still keeps the key from being used."""
    if problem.details.get("check") == WRONG_CHECK["key"]:  # found checking the keystore's
        return (
            f"the key of entry {problem.details.get('alias')!r} has a password of its own; "
            f"store it too: mpagent secret set {profile.name} --key"
        )
    return f"the password is right, but the key cannot be used yet: {problem.message}"


def _refusal(profile: Profile, which: str, exc: MpagentError) -> KeystoreError:
    flag = " --key" if which == "key" else ""
    what = (
        f"the key of entry {exc.details.get('alias')!r} in {profile.key_location}"
        if which == "key"
        else f"the keystore {profile.key_location}"
    )
    return KeystoreError(
        f"that {which} password does not open {what} (profile {profile.name}); nothing "
        f"stored. Run `mpagent secret set {profile.name}{flag}` again with the right one",
        check=WRONG_CHECK[which],
        source=str(profile.key_location),
    )


def secret_delete(args: argparse.Namespace) -> int:
    from mpagent import passwords

    which = WHICH[bool(args.key)]
    profile = _secret_profile(args)
    try:
        deleted = passwords.keyring_delete(profile, which)
    except SecretUnavailable as exc:
        raise passwords.without_keyring(exc, profile) from exc
    if not deleted:
        say(
            f"the OS keyring holds no {which} password for profile {profile}; nothing "
            "deleted (see `mpagent secret status`)"
        )
        return 1
    print(f"deleted the {which} password of profile {profile} from the OS keyring")
    return 0


def secret_status(args: argparse.Namespace) -> int:
    from mpagent import passwords

    def stored(profile: str, which: str) -> str:
        return "stored" if passwords.keyring_read(profile, which) is not None else "not stored"

    names = [args.profile] if args.profile else load_config(args).names
    backend = passwords.keyring_backend_name()
    rows = [(name, stored(name, "keystore"), stored(name, "key")) for name in names]
    width = max(len("profile"), *(len(name) for name in names))
    print(f"OS keyring: {backend} (service {passwords.SERVICE!r})")
    print(f"{'profile':<{width}}  {'keystore password':<17}  key password")
    for name, store, key in rows:
        print(f"{name:<{width}}  {store:<17}  {key}")
    print(
        f"`mpagent unlock`, {passwords.KEYSTORE_ENV}_<PROFILE> / {passwords.KEYSTORE_ENV} "
        f"(and {passwords.KEY_ENV}...), password_command and a systemd credential come before "
        "the keyring, a prompt after it; the key password defaults to the keystore password."
    )
    return 0


def _secret_profile(args: argparse.Namespace) -> str:
    """PROFILE as given (the config may not exist yet), else the config's chosen profile."""
    from mpagent.config import choose_profile

    requested = profile_name(args)
    if requested:
        return requested
    cfg = load_config(args)
    return choose_profile(None, cfg.default_profile, cfg.names, cfg.path)


def _configured(args: argparse.Namespace, name: str) -> Profile | None:
    """The profile to check the password against. Storing a password before writing the
    profile is fine, so a profile that is missing or wrong only warns."""
    try:
        cfg = load_config(args)
    except ConfigError as exc:
        say(f"warning: cannot check profile {name} against the configuration: {exc}")
        return None
    if name not in cfg.names:
        known = ", ".join(cfg.names) or "none"
        say(
            f"warning: {cfg.path} has no profile {name} (profiles: {known}); storing the "
            f"password anyway, unchecked: add a [profiles.{name}] table to use it"
        )
        return None
    if name in cfg.broken:
        say(f"warning: cannot check the password, the profile is wrong: {cfg.broken[name]}")
        return None
    profile: Profile = cfg.profiles[name]
    return profile


def _password_from_stdin() -> str:
    """Exactly one line; its line ending is not part of the password."""
    raw = sys.stdin.buffer.readline()
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretUnavailable("the password on stdin is not UTF-8; nothing stored") from None
    password = line.removesuffix("\n").removesuffix("\r")
    if not password:
        raise SecretUnavailable(f"stdin held no password (an empty line); {STDIN_HINT}")
    return password


def _password_prompted(profile: str, which: str) -> str:
    """Hidden, twice: a typo stored here would only show up later as a wrong password."""
    if not sys.stdin.isatty():
        raise SecretUnavailable(
            f"stdin is not a terminal, so there is no hidden prompt; {STDIN_HINT}"
        )
    import getpass

    try:
        first = getpass.getpass(f"mpagent: {which} password for profile {profile}: ")
        again = getpass.getpass(f"mpagent: the same {which} password again: ")
    except EOFError:
        raise SecretUnavailable("no password entered; nothing stored") from None
    if not first:
        raise SecretUnavailable("the password is empty; nothing stored")
    if first != again:
        raise SecretUnavailable("the two passwords differ; nothing stored, try again")
    return first


def cmd_doctor(args: argparse.Namespace) -> int:
    from mpagent import doctor

    return doctor.main(args, sys.stdout)


def cmd_import_properties(args: argparse.Namespace) -> int:
    from mpagent import properties

    return properties.main(args, sys.stdout)


def cmd_bridge(args: argparse.Namespace) -> int:
    """`bridge secret`: stdout is the secret alone; stderr says where it is kept and, for a
    new one, whether the running agent took it."""
    cfg = load_config(args)
    secret = bridge_secret(args, cfg, rotate=args.rotate, to_file=args.file)
    sys.stdout.write(secret + "\n")
    return 0


SECRET_NEWS = {
    "found": "the bridge secret, kept in {where}",
    "moved": "moved the bridge secret, unchanged, to {where}",
    "made": "no bridge secret yet: made one, kept in {where}",
    "rotated": "made a new bridge secret, kept in {where}; tools holding the old one need this",
}


def bridge_secret(
    args: argparse.Namespace,
    cfg: Any,
    *,
    rotate: bool = False,
    to_file: bool = False,
    quiet: bool = False,
) -> str:
    """The bridge secret: the current one, else (or with `rotate`) a new one. When it is new
    or moved, a running agent is asked to take it. Says on stderr where it is kept, and what
    the agent did (`quiet`: only when something changed)."""
    from mpagent import bridge

    store = bridge.SecretStore(cfg.bridge.secret_file)
    secret, where, done = store.obtain(rotate=rotate, to_file=to_file)
    if quiet and done == "found":
        return secret
    say(SECRET_NEWS[done].format(where=where))
    if cfg.bridge.listen is None:
        say(f'the bridge is off; add [bridge] listen = "127.0.0.1:8765" to {cfg.path}')
    elif done != "found":  # the running agent may hold none, the old one, or read elsewhere
        say(agent_takes(args, cfg.bridge.listen, secret))
    return secret


def agent_takes(args: argparse.Namespace, listen: tuple[str, int], secret: str) -> str:
    """Has the running agent taken a new secret? It reloads, then its bridge is asked."""
    from mpagent import bridge

    try:
        ask_agent(args, "reload", start=False)
    except AgentNotRunning as exc:
        if exc.details.get("absent"):
            return "no agent is running; the next one to start uses it"
        return f"the running agent has not taken it: {exc}; run `mpagent reload` later"
    except MpagentError as exc:
        return f"the running agent has not taken it, its reload failed: {exc}"
    url = bridge.token_url(listen)
    try:
        took = bridge.accepts(listen, secret)
    except OSError as exc:
        return (
            f"the running agent reloaded, but no token bridge answers on {url} "
            f"({exc.strerror or exc}); it listens where [bridge] said when the agent started: "
            "`mpagent stop`, then start it again"
        )
    if took:
        return f"the running agent took it: the bridge on {url} accepts it"
    return (
        f"the running agent's bridge on {url} still refuses it: the agent cannot read it (its "
        "log says why; an agent outside your desktop session may have no OS keyring); "
        "`mpagent bridge secret --file` moves it to a file the agent can read"
    )


def cmd_postman(args: argparse.Namespace) -> int:
    """The files to import into Postman; with --with-secret instead, the environment with the
    secret in it on stdout, for newman to read from a pipe: in no argv and no file."""
    import json
    import shlex
    from pathlib import Path

    from mpagent import bridge, postman
    from mpagent.errors import ConfigError

    cfg, profile = load_profile(args)
    if cfg.bridge.listen is None:
        raise ConfigError(
            f"{cfg.path}: the token bridge is off, and Postman gets its tokens from it; add "
            '[bridge] with listen = "127.0.0.1:8765" and restart the agent (`mpagent stop`)'
        )
    url = bridge.token_url(cfg.bridge.listen)
    # Only for a bridge the running agent serves: whatever else holds the port would get the
    # secret from Postman or newman (the agent's socket answers only our user: ask it).
    try:
        state = json.loads(dict(ask_agent(args, "status", start=False))["json"]).get("bridge")
    except AgentNotRunning as exc:
        if not exc.details.get("absent"):
            raise
        raise ConfigError(
            f"no agent is running on {socket_path()}, so no token bridge serves on {url}; start "
            "one first (`mpagent agent`, or `mpagent get SCOPE` starts one), then run this again"
        ) from None
    problem = bridge.not_serving(state, cfg.bridge.listen)
    if problem:
        raise ConfigError(f"the token bridge on {url} is not serving, nothing written: {problem}")
    # A profile without scopes: the environment's scope variable is for the user to fill in.
    scope = next(iter(profile.scopes), "SCOPE")
    if args.with_secret:
        secret = bridge_secret(args, cfg, quiet=True)  # newman reads it on every run
        document = postman.environment(profile.name, url, scope, secret)
        sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        return 0
    written = postman.write(Path(args.out), postman.documents(profile.name, url, scope))
    for path in written:
        print(f"wrote {path}")
    mpagent = "mpagent" + (f" --config {shlex.quote(args.config)}" if args.config else "")
    collection = next(p for p in written if p.name.endswith("_collection.json"))
    print(
        f'Postman: import both, select the environment "mpagent {profile.name}", and set '
        "client_secret's current value to the output of `mpagent bridge secret` and base_url "
        "to your API.\nnewman (the secret in no argv and no file):\n"
        f"  newman run {shlex.quote(str(collection))} "
        f"-e <({mpagent} postman --profile {shlex.quote(profile.name)} --with-secret) "
        f'--folder "{postman.SCRIPT_FOLDER}" --env-var base_url=https://api.example.no'
    )
    return 0


# -- `mpagent keys`: the client's own keys (adminapi, ownkeys, keys.generate, configedit) ----
#
# Reads are sent even in a dry run; a change is shown instead (adminapi's `show`). What a
# command found is its stdout (the table, the profile lines, the new expiries); what it did,
# and warnings, are `mpagent:` lines on stderr.


def cmd_keys(args: argparse.Namespace) -> int:
    say("keys needs an action: list, create, renew, rotate or delete (mpagent keys --help)")
    return 2


def _keys_api(args: argparse.Namespace) -> tuple[Any, Profile, Any]:
    """(config, profile, its admin API) for a `keys` command."""
    from mpagent import adminapi

    cfg, profile = load_profile(args)
    show = _show_request if getattr(args, "dry_run", False) else None
    return cfg, profile, adminapi.for_profile(cfg, profile, show=show)


def _writer(args: argparse.Namespace, profile: Profile) -> Any:
    """The profile's key-set lock for a command that changes the set (none for a dry run):
    refused while a rotation or another keys command holds it."""
    import contextlib

    from mpagent import rotation

    return contextlib.nullcontext() if args.dry_run else rotation.exclusive(profile.name)


def _show_request(text: str) -> None:
    """A change a dry run does not send: its request line, then its JSON body, line by line
    (a kid from the admin API may hold anything: each line is escaped)."""
    first, *body = text.splitlines()
    print(printable(f"dry run, not sent: {first}"), flush=True)
    for line in body:
        print(printable(line), flush=True)


def _held(profile: Profile, kids: list[str]) -> set[str]:
    """The kids whose private key this machine holds: `<kid>.pem` in mpagent's keys
    directory, or the profile's keystore for the kid it signs with."""
    from mpagent.keys.generate import keys_dir

    held = {kid for kid in kids if (keys_dir() / f"{kid}.pem").is_file()}
    in_file = profile.keystore is not None and profile.keystore.is_file()
    if profile.kid is not None and (in_file or profile.keystore_env is not None):
        held.add(profile.kid)
    return held


def cmd_keys_list(args: argparse.Namespace) -> int:
    import time

    from mpagent import ownkeys

    _, profile, api = _keys_api(args)
    ks = api.keys(profile.client_id)
    if not ks.keys:
        say(
            f"client {profile.client_id} has no registered keys; create one: "
            f"mpagent keys create --profile {profile.name} --switch"
        )
        return 0
    print(f"client {profile.client_id}, profile {profile.name} (* signs with it)")
    for line in ownkeys.table(ks, time.time(), profile.kid, _held(profile, ks.kids())):
        print(printable(line))
    for warning in ownkeys.warnings(ks, time.time(), profile.kid):
        say(f"warning: {warning}")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    import time

    from mpagent import adminapi
    from mpagent.keys.generate import check_kid, new_kid

    cfg, profile, api = _keys_api(args)
    adminapi.refuse_admin_lockout(cfg, profile)
    kid = check_kid(args.kid) if args.kid else new_kid(profile.name, time.time())
    with _writer(args, profile):
        return _create(args, cfg, profile, api, kid)


def _create(args: argparse.Namespace, cfg: Any, profile: Profile, api: Any, kid: str) -> int:
    import time
    from pathlib import Path

    from mpagent import configedit, ownkeys
    from mpagent.errors import AdminApiError
    from mpagent.keys.generate import create_key, new_key, public_jwk

    ks = api.keys(profile.client_id)
    ownkeys.with_key(ks, ownkeys.RegisteredKey(kid, {}))  # the limit, before a key is made
    if args.dry_run:  # the request as it would be, with a key made for it and not kept
        api.replace(
            profile.client_id,
            ownkeys.with_key(ks, ownkeys.RegisteredKey.new(public_jwk(new_key(), kid))),
        )
        say("dry run: nothing registered, no key file written")
        return 0
    # Absolute: config.toml takes a relative path from its own directory, not from here.
    path, jwk = create_key(Path(args.out).expanduser().absolute() if args.out else None, kid)
    try:
        registered = api.replace(
            profile.client_id, ownkeys.with_key(ks, ownkeys.RegisteredKey.new(jwk))
        )
    except BaseException as exc:
        path.unlink(missing_ok=True)  # nothing half-done: no private key without its public half
        status = exc.details.get("status") if isinstance(exc, AdminApiError) else None
        if not (isinstance(status, int) and 400 <= status < 500):  # else it may have taken it
            say(
                f"if the admin API took kid {kid} before failing, `mpagent keys list` shows it; "
                f"remove it: mpagent keys delete {kid}"
            )
        raise
    key = registered.get(kid)
    expires = ownkeys.expiry_text(key, time.time()) if key else "unknown"
    say(
        f"registered kid {kid} on client {profile.client_id}, expires {expires}; private key {path}"
    )
    values = {"keystore": str(path), "keystore_type": "pem", "kid": kid}
    for name, value in values.items():
        print(f"{name} = {configedit.toml_string(value)}")
    if not args.switch:
        say(
            f"to sign with it, put these lines in [profiles.{profile.name}] (without alias and "
            f"certificate), or run `mpagent keys rotate` next time: it switches once the key works"
        )
        return 0
    configedit.update_profile(
        cfg.path, profile.name, {**values, "alias": None, "certificate": None}
    )
    say(
        f"switched profile {profile.name} to kid {kid} in {cfg.path} (comments kept); a running "
        "agent reloads it. Maskinporten takes a new key 0-2 minutes after it is registered, "
        "sometimes longer: until then its grants may be refused"
    )
    return 0


def cmd_keys_renew(args: argparse.Namespace) -> int:
    import time

    from mpagent import ownkeys

    _, profile, api = _keys_api(args)
    with _writer(args, profile):
        ks = api.keys(profile.client_id)
        if not ks.keys:
            say(f"client {profile.client_id} has no registered keys; nothing to renew")
            return 0
        renewed = api.replace(profile.client_id, ks.keys)
    if args.dry_run:
        return 0
    for key in renewed.keys:
        print(printable(f"{key.kid}  expires {ownkeys.expiry_text(key, time.time())}"))
    say(f"renewed {len(renewed.keys)} key(s) of client {profile.client_id}")
    return 0


def cmd_keys_delete(args: argparse.Namespace) -> int:
    from mpagent import ownkeys, rotation

    cfg, profile, api = _keys_api(args)
    kid = args.delete_kid
    users = [
        p.name for p in cfg.profiles.values() if p.client_id == profile.client_id and p.kid == kid
    ]
    if users:
        raise ConfigError(
            f"profile {', '.join(users)} signs with kid {kid}; deleting it would stop its "
            "tokens. Switch to another key first (`mpagent keys rotate` does it without a "
            "failed request), then delete it"
        )
    state = rotation.rotating_kids(cfg, profile.client_id).get(kid)
    if state is not None:
        raise ConfigError(
            f"kid {kid} is the new key of a rotation under way ({state}); finish it first "
            "(run `mpagent keys rotate` again), or delete that file to give it up"
        )
    with _writer(args, profile):
        ks = api.keys(profile.client_id)
        rest = ownkeys.without_key(ks, kid)
        if not args.yes and not args.dry_run:
            _confirm(
                f"delete key {kid} from client {profile.client_id}? Grants signed with it stop "
                "working"
            )
        if rest:
            api.replace(profile.client_id, rest)
        else:
            api.delete_all(profile.client_id)  # the only way to remove the last key
    if not args.dry_run:
        say(f"deleted kid {kid} from client {profile.client_id}; {len(rest)} key(s) left")
        from mpagent.keys.generate import keys_dir

        made = keys_dir() / f"{kid}.pem"
        if made.is_file():
            say(f"its private key {made} is of no use now; delete it when nothing refers to it")
    return 0


def _confirm(question: str) -> None:
    """A yes on the terminal, else MpagentError: nothing is changed."""
    if not sys.stdin.isatty():
        raise MpagentError(
            "stdin is not a terminal, so there is no one to confirm; nothing deleted. "
            "Add --yes to delete without asking"
        )
    sys.stderr.write(f"mpagent: {printable(question)} [y/N] ")
    sys.stderr.flush()
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise MpagentError("not confirmed; nothing deleted")


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from mpagent.rotation import rotate

    cfg, profile = load_profile(args)

    def out(line: str) -> None:
        print(printable(line), flush=True)

    rotate(cfg.path, profile.name, grace=args.grace, dry_run=args.dry_run, say=say, out=out)
    return 0
