"""config.toml → frozen dataclasses. Every error names the file, the profile and the key,
says what is wrong and what to write instead. Passwords are never read from here."""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mpagent import altinn, envfile, paths, tokenfiles
from mpagent.altinn import is_loopback
from mpagent.errors import ConfigError
from mpagent.private import read_regular
from mpagent.tokens import scope_string

# The issuers, exactly as the grant's `aud` must be: Maskinporten's end in a slash, Digdir's
# Skyporten issuers (for cloud workload-identity federation) have none (MASKINPORTEN.md §1, §7;
# Digdir's Skyporten pages show "issuer":"https://test.sky.maskinporten.no").
ENVIRONMENTS = {
    "test": "https://test.maskinporten.no/",
    "prod": "https://maskinporten.no/",
    "sky-test": "https://test.sky.maskinporten.no",
    "sky": "https://sky.maskinporten.no",
}
ALGORITHMS = ("RS256", "RS384", "RS512")
KEYSTORE_TYPES = ("jks", "pkcs12", "pem", "jwk")
OPTIONAL_CLAIMS = ("resource", "consumer_org", "pid", "iss_onbehalfof", "authorization_details")
PROFILE_KEYS = (
    "environment",
    "client_id",
    "scopes",
    "keystore",
    "keystore_type",
    "alias",
    "certificate",
    "kid",
    "algorithm",
    "env_names",
    "password_command",
    "password_file",
    "key_password_command",
    "admin_profile",
    "admin_api",
    "auto_renew",
    "exchange",
    "altinn_test_org",
    "systemuser_org",
    "systemuser_ref",
    *OPTIONAL_CLAIMS,
)
AGENT_KEYS = ("env_file", "idle_timeout", "log_level", "mode", "log_format")
AGENT_MODES = ("user", "server")
LOG_FORMATS = ("text", "json")
# The keystore itself, base64, when `keystore` is not set (a CI secret): per profile first.
KEYSTORE_B64_ENV = "MPAGENT_KEYSTORE_B64"
HTTP_KEYS = (
    "connect_timeout", "read_timeout", "listen", "allow_uids", "allow_any_local", "profile",
)  # fmt: skip
BRIDGE_KEYS = ("listen", "secret_file")
FILES_KEYS = ("dir", "file_mode", "group")
TOP_KEYS = ("default_profile", "profiles", "agent", "http", "bridge", "files")


@dataclass(frozen=True)
class Profile:
    name: str
    environment: str
    client_id: str
    scopes: tuple[str, ...]
    # None with admin_profile (a client that has no key of its own yet: `mpagent keys create`),
    # or when MPAGENT_KEYSTORE_B64[_<PROFILE>] holds the keystore (keystore_env)
    keystore: Path | None
    keystore_type: str | None = None
    alias: str | None = None
    certificate: Path | None = None
    kid: str | None = None
    algorithm: str = "RS256"
    claims: Mapping[str, Any] = field(default_factory=dict)
    env_names: Mapping[str, str] = field(default_factory=dict)
    # argv of a program that prints the password (passwords.py runs it, without a shell)
    password_command: tuple[str, ...] | None = None
    key_password_command: tuple[str, ...] | None = None
    # The profile whose token authorises Digdir's admin API for this client's keys (None: this
    # profile itself, when it signs with a certificate), its URL, and renewing keys near expiry.
    admin_profile: str | None = None
    admin_api: str | None = None
    auto_renew: bool = False
    # Altinn 3: every token of the profile is exchanged at `exchange` (the full URL, with
    # ?test=true for altinn_test_org); `exchange_name` is the target as written, for status.
    exchange: str | None = None
    exchange_name: str | None = None
    # The externalRef of the system users asked for, the profile's and per request's alike.
    systemuser_ref: str | None = None
    # The keystore password from a file (a mounted Kubernetes Secret or systemd credential)
    password_file: Path | None = None
    # Without keystore: the variable holding the keystore as base64 (keys.keystore_from_env),
    # resolved by parse() from the environment it was given; None: no such variable is set.
    keystore_env: str | None = None

    @property
    def key_location(self) -> str | None:
        """Where the profile's key comes from, for messages: the keystore file or the
        variable; None for a client with no key yet (admin_profile, `mpagent keys create`)."""
        return str(self.keystore) if self.keystore is not None else self.keystore_env

    @property
    def claims_json(self) -> str:
        """The optional claims in canonical form: part of a token's identity."""
        return json.dumps(self.claims, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class AgentSettings:
    env_file: Path | None = None
    idle_timeout: float = 900.0
    log_level: str = "info"
    mode: str = "user"  # "server": no autostart, no keyring, no prompt (agent --foreground-only)
    # "json": one JSON object per line on stdout; None (not written): json in server mode
    log_format: str | None = None


@dataclass(frozen=True)
class HttpSettings:
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    # The texas-compatible token endpoint (httpapi.py): (loopback host, port); None: off.
    listen: tuple[str, int] | None = None
    allow_uids: tuple[int, ...] = ()  # peer uids answered besides the agent's own
    allow_any_local: bool = False  # any local peer: the pod's loopback is private to the pod
    # The profile whose tokens the endpoint serves; None: default_profile, else the only one.
    profile: str | None = None


@dataclass(frozen=True)
class BridgeSettings:
    """The opt-in loopback OAuth2 token endpoint for HTTP tools (Postman, httpyac, ...)."""

    listen: tuple[str, int] | None = None  # (loopback host, port); None: off
    secret_file: Path | None = None


@dataclass(frozen=True)
class FilesSettings:
    """Token files (mpagent/tokenfiles.py): every configured token under `dir`; None: off."""

    dir: Path | None = None
    file_mode: int = 0o600
    group: str | int | None = None


@dataclass(frozen=True)
class Config:
    path: Path
    profiles: Mapping[str, Profile]
    default_profile: str | None = None
    agent: AgentSettings = AgentSettings()
    http: HttpSettings = HttpSettings()
    bridge: BridgeSettings = BridgeSettings()
    files: FilesSettings = FilesSettings()
    # Profiles whose table has a mistake: each is unusable alone, the others still work.
    broken: Mapping[str, ConfigError] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """Every profile in the file, usable or not, in file order."""
        return [*self.profiles, *(n for n in self.broken if n not in self.profiles)]

    @property
    def default_name(self) -> str | None:
        """The profile whose tokens also get the short env-file names."""
        names = self.names
        return self.default_profile or (names[0] if len(names) == 1 else None)

    def profile(self, requested: str | None = None) -> Profile:
        """The profile a command uses (see choose_profile); its own mistake is raised here."""
        name = choose_profile(requested, self.default_profile, self.names, self.path)
        if name in self.broken:
            raise self.broken[name].again()
        return self.profiles[name]

    def problems(self, except_for: str | None = None) -> list[str]:
        """One line per unusable profile other than `except_for`: warnings for a command
        that uses another profile."""
        return [
            f"profile {name} cannot be used: {exc}"
            for name, exc in self.broken.items()
            if name != except_for
        ]


def choose_profile(
    requested: str | None, default: str | None, names: Collection[str], where: object = "config"
) -> str:
    """The one rule for which profile serves a request, used by the CLI, the agent and the
    bridge: the requested one (--profile, else MPAGENT_PROFILE, which the caller folds into
    `requested`), else default_profile, else the only profile."""
    chosen = requested or default
    if chosen is None:
        if len(names) == 1:
            return next(iter(names))
        raise ConfigError(
            f"{where}: several profiles ({', '.join(sorted(names))}) and none chosen; pass "
            '--profile NAME, set MPAGENT_PROFILE, or add default_profile = "NAME" at the top '
            "of the configuration"
        )
    if chosen not in names:
        close = difflib.get_close_matches(chosen, list(names), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"add a [profiles.{chosen}] table"
        raise ConfigError(
            f"{where}: no profile {chosen!r} (profiles: {', '.join(sorted(names)) or 'none'}); "
            f"{hint}"
        )
    return chosen


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate the whole file. Raises ConfigError for a file that cannot be read,
    is not TOML, or has a mistake outside [profiles]; a mistake inside one profile makes
    only that profile unusable (Config.broken)."""
    file = Path(path or paths.config_file()).expanduser()
    try:
        data = read_regular(file)
    except FileNotFoundError:
        raise ConfigError(
            f"{file}: no configuration file; create it with a [profiles.NAME] table "
            "(see README, 'Configuration'), or point --config / MPAGENT_CONFIG at yours"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the configuration: {exc.strerror or exc}") from exc
    try:
        # utf-8-sig: Notepad starts a UTF-8 file with a byte-order mark, which TOML forbids.
        raw = tomllib.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{file}: not UTF-8 text (byte {exc.start}); save the file as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from exc
    return parse(raw, file, os.environ)


def parse(raw: Mapping[str, Any], file: Path, env: Mapping[str, str] | None = None) -> Config:
    """The configuration in `raw` (read from `file`). `env`: the environment whose
    MPAGENT_KEYSTORE_B64[_<PROFILE>] may hold a profile's keystore (load() passes the
    process's); None: no keystore comes from the environment."""
    env = env or {}
    _check_keys(raw, TOP_KEYS, file, "the top level")
    profiles_raw = _table(raw, "profiles", file, "the top level")
    if not profiles_raw:
        raise ConfigError(
            f"{file}: no profiles; add a [profiles.NAME] table with environment, client_id "
            "and keystore"
        )
    default = raw.get("default_profile")
    if default is not None and default not in profiles_raw:
        raise ConfigError(
            f"{file}: default_profile = {default!r} names no profile; "
            f"write one of: {', '.join(sorted(profiles_raw))}"
        )
    profiles: dict[str, Profile] = {}
    broken: dict[str, ConfigError] = {}
    for name in profiles_raw:
        try:
            table = _table(profiles_raw, name, file, "[profiles]")
            profiles[name] = _profile(name, table, file, env)
        except ConfigError as exc:
            broken[name] = exc
    for name, wrong in _unknown_admin_profiles(profiles, profiles_raw, file).items():
        broken[name] = wrong
        del profiles[name]
    default_name = default or (next(iter(profiles_raw)) if len(profiles_raw) == 1 else None)
    for name, clash in _env_name_clashes(profiles, default_name, file).items():
        broken[name] = clash
        del profiles[name]
    return Config(
        path=file,
        profiles=profiles,
        default_profile=default,
        agent=_agent(_table(raw, "agent", file, "the top level"), file),
        http=_http(_table(raw, "http", file, "the top level"), file),
        bridge=_bridge(_table(raw, "bridge", file, "the top level"), file),
        files=_files(_table(raw, "files", file, "the top level"), file),
        broken=broken,
    )


def _profile(name: str, t: Mapping[str, Any], file: Path, env: Mapping[str, str]) -> Profile:
    where = f"[profiles.{name}]"
    _check_keys(t, PROFILE_KEYS, file, where)
    get = _Getter(t, file, where)
    # Optional: a profile without scopes keeps nothing warm and serves `get` on demand.
    scopes = get.texts("scopes")
    if not envfile.name_part(name):
        raise ConfigError(
            f"{file}: profile name {name!r} has no letter or digit A-Z/0-9 to name its "
            "env-file variables; rename the profile"
        )
    keystore_type = get.text("keystore_type")
    if keystore_type is not None:
        keystore_type = keystore_type.lower().replace("p12", "pkcs12").replace("pfx", "pkcs12")
        if keystore_type not in KEYSTORE_TYPES:
            raise get.error(
                "keystore_type",
                f"is {t['keystore_type']!r}",
                f"write one of {', '.join(KEYSTORE_TYPES)}",
            )
    algorithm = get.text("algorithm") or "RS256"
    if algorithm not in ALGORITHMS:
        raise get.error("algorithm", f"is {algorithm!r}", f"write one of {', '.join(ALGORITHMS)}")
    environment = _environment(get)
    client_id = get.text("client_id", required=True) or ""
    admin_profile = get.text("admin_profile")
    keystore_env = None if "keystore" in t else _keystore_env(name, env, admin_profile)
    if admin_profile is None and "keystore" not in t and keystore_env is None:
        b64 = " or ".join(keystore_env_names(name))
        raise get.error(
            "keystore",
            f"is missing and {b64} is not set",
            f'add keystore = "..."; or set {b64} to the keystore as base64 (a CI secret); or, '
            "for a client with no key yet, set admin_profile = "
            '"PROFILE" (the profile whose token may manage this client\'s keys) and run '
            f"`mpagent keys create --profile {name} --switch`",
        )
    if "password_file" in t and "password_command" in t:
        raise get.error(
            "password_file",
            "is set together with password_command",
            "the keystore password comes from one of them; remove the other",
        )
    exchange_name, exchange = _exchange(get)
    env_names = get.table("env_names")
    for scope, env_name in env_names.items():
        if not isinstance(env_name, str) or not _is_env_name(env_name):
            raise get.error(
                f"env_names.{scope}", f"is {env_name!r}", "write a variable name like MY_TOKEN"
            )
    return Profile(
        name=name,
        environment=environment,
        client_id=client_id,
        scopes=tuple(scopes),
        keystore=get.path("keystore"),
        keystore_type=keystore_type,
        alias=get.text("alias"),
        certificate=get.path("certificate"),
        kid=get.text("kid"),
        algorithm=algorithm,
        claims=_claims(get, scopes),
        env_names={scope_string([k]): v for k, v in env_names.items()},
        password_command=_command(get, "password_command", name),
        key_password_command=_command(get, "key_password_command", name),
        admin_profile=admin_profile,
        admin_api=_admin_api(get),
        auto_renew=get.flag("auto_renew"),
        exchange=exchange,
        exchange_name=exchange_name,
        systemuser_ref=get.text("systemuser_ref"),
        password_file=get.path("password_file"),
        keystore_env=keystore_env,
    )


def keystore_env_names(profile: str) -> tuple[str, ...]:
    """The variables that may hold a profile's keystore as base64, the per-profile one first
    (named as passwords.env_names names the password's)."""
    part = envfile.name_part(profile)
    return (f"{KEYSTORE_B64_ENV}_{part}", KEYSTORE_B64_ENV) if part else (KEYSTORE_B64_ENV,)


def _keystore_env(profile: str, env: Mapping[str, str], admin_profile: str | None) -> str | None:
    """The variable that holds the keystore: the first of keystore_env_names that is set and
    not blank, else the first that is set, even empty (a CI secret not defined for the job is
    then said so when the key is loaded, instead of "keystore is missing"). A client with an
    admin_profile and no key yet takes only its own MPAGENT_KEYSTORE_B64_<PROFILE>: the
    generic one is another client's key."""
    names = keystore_env_names(profile)
    if admin_profile is not None:
        names = names[:-1]
    present = [name for name in names if name in env]
    filled = [name for name in present if env[name].strip()]
    chosen = filled or present
    return chosen[0] if chosen else None


def _exchange(get: _Getter) -> tuple[str | None, str | None]:
    """(the target as written, the URL to GET) of `exchange`, or (None, None)."""
    test_org = get.flag("altinn_test_org")
    if "exchange" not in get.t:
        if test_org:
            raise get.error(
                "altinn_test_org",
                "is set without exchange",
                'add exchange = "altinn-tt02" (test organisations live in tt02)',
            )
        return None, None
    where = f"{get.file}: {get.where} exchange"
    target = altinn.check_target(get.t["exchange"], where)
    return target, altinn.exchange_url(target, test_org, where)


def _admin_api(get: _Getter) -> str | None:
    """The admin API's base URL (…/clients/): https, or plain http to loopback (the emulator),
    as for `environment`: the bearer token with the admin scopes goes there."""
    url = get.text("admin_api")
    if url is None:
        return None
    parts = urlsplit(url)
    example = 'e.g. admin_api = "https://api.test.samarbeid.digdir.no/clients/"'
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise get.error("admin_api", f"is {url!r}", f"write the admin API's URL, {example}")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise get.error(
            "admin_api",
            f"uses plain http:// to {parts.hostname}",
            "use https://; plain http is allowed only for loopback (the emulator)",
        )
    return url.rstrip("/") + "/"


def _unknown_admin_profiles(
    profiles: Mapping[str, Profile], names: Collection[str], file: Path
) -> dict[str, ConfigError]:
    """A profile whose admin_profile names no profile is unusable (a typo would otherwise
    show up only at `mpagent keys ...`)."""
    wrong: dict[str, ConfigError] = {}
    for p in profiles.values():
        # The admin API takes Maskinporten tokens; a profile with `exchange` serves Altinn's.
        admin = profiles.get(p.admin_profile) if p.admin_profile else p if p.auto_renew else None
        if admin is not None and admin.exchange:
            setting = f"admin_profile = {admin.name!r}" if p.admin_profile else "auto_renew"
            wrong[p.name] = ConfigError(
                f"{file}: [profiles.{p.name}] {setting}: the tokens of profile {admin.name} are "
                "Altinn's (it sets exchange), and Digdir's admin API takes Maskinporten's; set "
                "admin_profile to a profile without exchange (one on the same keystore will do)"
            )
            continue
        if p.admin_profile is None or p.admin_profile in names:
            continue
        close = difflib.get_close_matches(p.admin_profile, list(names), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"write one of: {', '.join(names)}"
        wrong[p.name] = ConfigError(
            f"{file}: [profiles.{p.name}] admin_profile = {p.admin_profile!r} names no "
            f"profile; {hint}"
        )
    return wrong


def _command(get: _Getter, key: str, profile: str) -> tuple[str, ...] | None:
    """An argv list, kept word for word: it is run without a shell, so a single string
    would be one program name with spaces in it."""
    value = get.t.get(key)
    if value is None:
        return None
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    try:
        words = shlex.split(value) if isinstance(value, str) else []
    except ValueError:  # unbalanced quotes: no guess at what was meant
        words = []
    example = json.dumps(words or ["pass", "show", f"mpagent/{profile}"])
    raise get.error(
        key,
        f"is {value!r}",
        f"write the program and its arguments as a list of non-empty strings (run without a "
        f"shell): {key} = {example}",
    )


def _env_name_clashes(
    profiles: Mapping[str, Profile], default_name: str | None, file: Path
) -> dict[str, ConfigError]:
    """Two tokens must not share one env-file variable. Default names never clash, so a
    clash comes from env_names or from profile names that normalise alike; the profile that
    comes later in the file is the one made unusable."""
    seen: dict[str, tuple[str, str]] = {}
    clashes: dict[str, ConfigError] = {}
    for p in profiles.values():
        for entry in p.scopes:
            scope = scope_string([entry])
            names = envfile.variable_names(p.name, scope, p.env_names, short=p.name == default_name)
            for name in names:
                other = seen.setdefault(name, (p.name, scope))
                if other != (p.name, scope) and p.name not in clashes:
                    fix = (
                        f"{envfile.PREFIX}{envfile.name_part(p.name)}_{envfile.name_part(scope)}_2"
                    )
                    clashes[p.name] = ConfigError(
                        f"{file}: [profiles.{p.name}] scope {scope!r} and [profiles.{other[0]}] "
                        f"scope {other[1]!r} would both be {name} in the env file; rename a "
                        f'profile, or give one another name: env_names = {{ "{scope}" = "{fix}" }}'
                    )
    return clashes


def _environment(get: _Getter) -> str:
    env = get.text("environment", required=True) or ""
    if env in ENVIRONMENTS:
        return env
    parts = urlsplit(env)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise get.error(
            "environment",
            f"is {env!r}",
            f"write {', '.join(map(json.dumps, ENVIRONMENTS))}, or an issuer URL such as "
            '"https://test.maskinporten.no/"',
        )
    for known, url in ENVIRONMENTS.items():
        # The slash is part of the issuer (Maskinporten's have one, Skyporten's none); writing
        # it wrong is common, so a known issuer is its preset either way.
        if env.rstrip("/") == url.rstrip("/"):
            return known
    if parts.path.rstrip("/").endswith("/token"):
        base = env.rstrip("/").removesuffix("/token")
        suggestion = next((k for k, url in ENVIRONMENTS.items() if url.rstrip("/") == base), None)
        suggestion = suggestion or base + "/"
        raise get.error(
            "environment",
            f"is {env!r}, the token endpoint",
            f'write the issuer instead: environment = "{suggestion}"',
        )
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise get.error(
            "environment",
            f"uses plain http:// to {parts.hostname}",
            "use https://; plain http is allowed only for loopback (the emulator)",
        )
    return env


def _claims(get: _Getter, scopes: list[str]) -> dict[str, Any]:
    claims: dict[str, Any] = {}
    resource = get.t.get("resource")
    if resource is not None:
        claims["resource"] = (
            get.text("resource") if isinstance(resource, str) else get.texts("resource")
        )
    for key in ("pid", "iss_onbehalfof"):
        value = get.text(key)
        if value is not None:
            claims[key] = value
    where = f"{get.file}: {get.where}"
    if "consumer_org" in get.t:
        claims["consumer_org"] = altinn.check_org_number(
            get.t["consumer_org"], f"{where} consumer_org"
        )
        if "iss_onbehalfof" in claims:
            raise get.error(
                "consumer_org",
                "is set together with iss_onbehalfof",
                "Maskinporten accepts only one of them; remove one",
            )
    details = get.t.get("authorization_details")
    if "systemuser_org" in get.t:
        if details is not None:
            raise get.error(
                "systemuser_org",
                "is set together with authorization_details",
                "systemuser_org is written out as authorization_details; keep one of them",
            )
        if "consumer_org" in claims:
            raise get.error(
                "systemuser_org",
                "is set together with consumer_org",
                "a token is either a system user's (systemuser_org) or delegated "
                "(consumer_org); use one profile for each",
            )
        ref = get.text("systemuser_ref")
        details = altinn.systemuser_details(get.t["systemuser_org"], ref, f"{where} systemuser_org")
    if details is not None:
        if not isinstance(details, list) or not all(
            isinstance(d, dict) and "type" in d for d in details
        ):
            raise get.error(
                "authorization_details",
                "is not a list of tables with a type",
                'write [[profiles.NAME.authorization_details]] tables with type = "urn:altinn:systemuser"',
            )
        # "At least one scope" is checked per request (a profile may keep no scopes and
        # serve `get SCOPE`); the organisation count and numbers are checked here.
        altinn.check_systemuser_grant(scopes or ["(asked for by get)"], details, where)
        claims["authorization_details"] = details
    return claims


def _agent(t: Mapping[str, Any], file: Path) -> AgentSettings:
    _check_keys(t, AGENT_KEYS, file, "[agent]")
    get = _Getter(t, file, "[agent]")
    level = (get.text("log_level") or "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise get.error("log_level", f"is {level!r}", "write debug, info, warning or error")
    mode = get.text("mode") or "user"
    if mode not in AGENT_MODES:
        raise get.error(
            "mode",
            f"is {mode!r}",
            'write "user" (a person\'s machine) or "server" (CI, containers)',
        )
    log_format = get.text("log_format")
    if log_format is not None and log_format not in LOG_FORMATS:
        raise get.error("log_format", f"is {log_format!r}", 'write "text" or "json"')
    return AgentSettings(
        env_file=get.path("env_file"),
        idle_timeout=get.number("idle_timeout", 900.0),
        log_level=level,
        mode=mode,
        log_format=log_format,
    )


def _http(t: Mapping[str, Any], file: Path) -> HttpSettings:
    _check_keys(t, HTTP_KEYS, file, "[http]")
    get = _Getter(t, file, "[http]")
    uids = t.get("allow_uids", [])
    if not isinstance(uids, list) or not all(
        isinstance(u, int) and not isinstance(u, bool) and 0 <= u < 2**32 for u in uids
    ):
        raise get.error(
            "allow_uids",
            f"is {uids!r}",
            "write a list of numeric user ids, e.g. allow_uids = [1000] (`id -u USER` shows one)",
        )
    return HttpSettings(
        get.number("connect_timeout", 5.0),
        get.number("read_timeout", 10.0),
        listen=_listen(get, "the texas-compatible endpoint", "127.0.0.1:7164"),
        allow_uids=tuple(uids),
        allow_any_local=get.flag("allow_any_local"),
        profile=get.text("profile"),
    )


def _bridge(t: Mapping[str, Any], file: Path) -> BridgeSettings:
    _check_keys(t, BRIDGE_KEYS, file, "[bridge]")
    get = _Getter(t, file, "[bridge]")
    listen = _listen(get, "the bridge", "127.0.0.1:8765")
    return BridgeSettings(listen=listen, secret_file=get.path("secret_file"))


def _listen(get: _Getter, what: str, example: str) -> tuple[str, int] | None:
    """A table's `listen`: a loopback host and port ([::1]:PORT for IPv6), or None."""
    listen = get.text("listen")
    if listen is None:
        return None
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise get.error(
            "listen", f"is {listen!r}", f'write "127.0.0.1:PORT", e.g. listen = "{example}"'
        )
    if not is_loopback(host):
        raise get.error(
            "listen",
            f"binds {host!r}, which is not loopback",
            f"{what} hands out tokens; bind it to 127.0.0.1 or [::1] only",
        )
    return host, int(port)


def _files(t: Mapping[str, Any], file: Path) -> FilesSettings:
    _check_keys(t, FILES_KEYS, file, "[files]")
    get = _Getter(t, file, "[files]")
    mode, group = t.get("file_mode", 0o600), t.get("group")
    if isinstance(mode, str) and re.fullmatch(r"(0o?)?[0-7]{3}", mode.strip()):
        mode = int(mode.strip().removeprefix("0o"), 8)  # "0640", "640", "0o640": octal
    elif isinstance(mode, bool) or not isinstance(mode, int) or mode in (600, 640):
        raise get.error(
            "file_mode",
            f"is {mode!r}" + (" (decimal)" if mode in (600, 640) else ""),
            "write TOML's octal: file_mode = 0o600, or 0o640 with a group",
        )
    if group is not None and (
        isinstance(group, bool)
        or not isinstance(group, int | str)
        or (isinstance(group, int) and group < 0)
        or (isinstance(group, str) and not group.strip())
    ):
        raise get.error("group", f"is {group!r}", 'write a group name or gid: group = "mpagent"')
    group = group.strip() if isinstance(group, str) else group
    tokenfiles.check_mode(mode, group, f"{file}: [files]")
    return FilesSettings(dir=get.path("dir"), file_mode=mode, group=group)


class _Getter:
    """Typed access to one table, with errors that name file, table and key."""

    def __init__(self, t: Mapping[str, Any], file: Path, where: str) -> None:
        self.t, self.file, self.where = t, file, where

    def error(self, key: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(f"{self.file}: {self.where} {key} {problem}; {fix}")

    def _present(self, key: str, required: bool, example: str) -> bool:
        if key in self.t:
            return True
        if required:
            raise self.error(key, "is missing", f"add {key} = {example}")
        return False

    def text(self, key: str, *, required: bool = False) -> str | None:
        if not self._present(key, required, '"..."'):
            return None
        value = self.t[key]
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"is {value!r}", f'write a non-empty string: {key} = "..."')
        return value.strip()

    def texts(self, key: str, *, required: bool = False) -> list[str]:
        if not self._present(key, required, '["..."]'):
            return []
        value = self.t[key]
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise self.error(
                key, f"is {value!r}", f'write a list of non-empty strings: {key} = ["..."]'
            )
        return [v.strip() for v in value]

    def path(self, key: str, *, required: bool = False) -> Path | None:
        value = self.text(key, required=required)
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.file.parent / p)

    def flag(self, key: str) -> bool:
        value = self.t.get(key, False)
        if not isinstance(value, bool):
            raise self.error(key, f"is {value!r}", f"write {key} = true or {key} = false")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.t.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise self.error(
                key,
                f"is {value!r}",
                f"write a positive number of seconds, e.g. {key} = {default:g}",
            )
        return float(value)

    def table(self, key: str) -> Mapping[str, Any]:
        return _table(self.t, key, self.file, self.where)


def _table(t: Mapping[str, Any], key: str, file: Path, where: str) -> Mapping[str, Any]:
    value = t.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(
            f"{file}: {where} {key} is {type(value).__name__}, not a table; write it as [{key}] or {key} = {{ ... }}"
        )
    return value


def _check_keys(t: Mapping[str, Any], allowed: tuple[str, ...], file: Path, where: str) -> None:
    for key in t:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(allowed)}"
            raise ConfigError(f"{file}: {where} has unknown key {key!r}; {hint}")


def _is_env_name(name: str) -> bool:
    return name.replace("_", "A").isalnum() and name.isascii() and not name[0].isdigit()
