"""`mpagent import-properties`: a jwt-grant-generator properties file becomes a profile.

`parse_properties` (Java properties syntax), `key_problems` (unknown keys, "did you mean") and
`to_profile` (MASKINPORTEN.md §6 keys to TOML) are pure; `main` reads the keystore as the Java
tool would (a relative path from the working directory), validates, writes an inline keystore
0600 beside the config, appends the profile atomically and stores the passwords in the OS
keyring. No password or key byte is ever shown.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import re
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from mpagent import config, paths
from mpagent.errors import ConfigError, SecretUnavailable
from mpagent.passwords import KEY_ENV, KEYSTORE_ENV, SERVICE, keyring_set, keyring_username
from mpagent.private import read_regular, write_atomic, write_new

_WHITESPACE = " \t\f"
_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}
REQUIRED = {"issuer": "the client_id", "scope": "the scopes", "keystore.file": "the keystore"}
_OPTIONAL = {"keystore.alias": "alias", "keystore.kid": "kid", "resource": "resource"}
_OPTIONAL |= {"consumer_org": "consumer_org", "pid": "pid"}
KNOWN = (*REQUIRED, *_OPTIONAL, "audience", "token.endpoint", "keystore.type")
KNOWN += ("keystore.password", "keystore.alias.password")
# Test environments retired or renamed: ver1/ver2 (June 2024) and the ID-porten hosts before 2020.
_OLD_TEST_HOSTS: tuple[str, ...] = ("ver1.maskinporten.no", "ver2.maskinporten.no")
_OLD_TEST_HOSTS += ("oidc-ver1.difi.no", "oidc-ver2.difi.no")
_NAMED = {url.rstrip("/"): env for env, url in config.ENVIRONMENTS.items()}
_EXTENSIONS = {"jks": "jks", "pkcs12": "p12", "pem": "pem", "jwk": "jwk"}
_PASSWORDS = {"keystore": ("keystore.password", KEYSTORE_ENV)}
_PASSWORDS["key"] = ("keystore.alias.password", KEY_ENV)
_ALIASES = {"pkcs#12": "pkcs12", "p12": "pkcs12", "pfx": "pkcs12", "jceks": "jks"}
_LABELS = {"jks": "JKS", "pkcs12": "PKCS#12", "pem": "PEM", "jwk": "a JWK"}


# -- Java properties syntax


def parse_properties(text: str) -> dict[str, str]:
    """Keys and values as java.util.Properties.load reads them; ValueError names the line."""
    return {key: value for _, key, value in _entries(text)}


def key_lines(text: str) -> dict[str, int]:
    """The line each key is given on (its last occurrence, the one that counts)."""
    return {key: number for number, key, _ in _entries(text)}


def _entries(text: str) -> list[tuple[int, str, str]]:
    entries = []
    for number, line in _logical_lines(text):
        key, value = _split(line)
        entries.append((number, _unescape(key, number), _unescape(value, number)))
    return entries


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) per logical line: comments and blank lines dropped,
    continuation lines (after an odd number of trailing backslashes) joined."""
    lines, pending, start = [], None, 0
    for number, natural in enumerate(re.split(r"\r\n|\r|\n", text), 1):
        line = natural.lstrip(_WHITESPACE)
        if pending is None:
            if not line or line[0] in "#!":
                continue
            pending, start = "", number
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2:
            pending += line[:-1]
            continue
        lines.append((start, pending + line))
        pending = None
    if pending is not None:
        lines.append((start, pending))
    return lines


def _split(line: str) -> tuple[str, str]:
    """Key and raw value: the key ends at the first unescaped '=', ':' or whitespace."""
    i = 0
    while i < len(line) and line[i] not in "=:" + _WHITESPACE:
        i += 2 if line[i] == "\\" else 1
    key, rest = line[:i], line[i:].lstrip(_WHITESPACE)
    if rest[:1] in ("=", ":"):
        rest = rest[1:].lstrip(_WHITESPACE)
    return key, rest


def _unescape(raw: str, number: int) -> str:
    out, i = [], 0
    while i < len(raw):
        char, i = raw[i], i + 1
        if char != "\\" or i == len(raw):  # a lone trailing backslash is dropped, as Java does
            out.append(char if char != "\\" else "")
            continue
        char, i = raw[i], i + 1
        if char != "u":
            out.append(_ESCAPES.get(char, char))
            continue
        digits, i = raw[i : i + 4], i + 4
        if not re.fullmatch(r"[0-9a-fA-F]{4}", digits):
            raise ValueError(f"line {number}: malformed \\uXXXX escape")
        out.append(chr(int(digits, 16)))
    try:  # \uD83D\uDE00 escapes one character as a UTF-16 surrogate pair
        return "".join(out).encode("utf-16-le", "surrogatepass").decode("utf-16-le")
    except UnicodeDecodeError:
        raise ValueError(f"line {number}: a \\u escape is half of a surrogate pair") from None


# -- mapping to a profile


def environment_for(audience: str | None, token_endpoint: str | None) -> tuple[str, list[str]]:
    """The profile's `environment` for jwt-grant-generator's audience (else token.endpoint)."""
    source = "audience" if audience else "token.endpoint"
    url = (audience or token_endpoint or "").strip()
    notes = [] if audience else ["no audience: the issuer is taken from token.endpoint"]
    endpoint = url.rstrip("/").endswith("/token")  # Maskinporten refuses it as aud
    if endpoint:
        url = url.rstrip("/").removesuffix("/token")
    env = _NAMED.get(url.rstrip("/").lower())
    if endpoint:
        url = config.ENVIRONMENTS[env] if env else url + "/"
        notes += [f"audience is a token endpoint, not the issuer {url}"] if audience else []
    elif env and url.endswith("/") != config.ENVIRONMENTS[env].endswith("/"):
        # Maskinporten's issuers end in a slash, Skyporten's do not: the aud must match exactly.
        slash = (
            "has a trailing slash the issuer lacks"
            if url.endswith("/")
            else "lacks the issuer's trailing slash"
        )
        notes.append(f"{source} {url} {slash}")
    if env is None and (urlsplit(url).hostname or "").lower() in _OLD_TEST_HOSTS:
        env = "test"
        notes.append(f"{source} {url} is a retired test environment; check your client is in test")
    notes.append(f"{source} {url} → environment = {_toml(env or url)}")
    if audience and token_endpoint:
        notes.append("token.endpoint: not needed, mpagent knows or discovers it from the issuer")
    return env or url, notes


def embedded_keystore(props: Mapping[str, str]) -> bytes | None:
    """The keystore bytes of `keystore.file=base64:...`, else None."""
    value = props.get("keystore.file", "").strip()
    if not value.startswith("base64:"):
        return None
    try:
        return base64.b64decode("".join(value[len("base64:") :].split()), validate=True)
    except binascii.Error:
        raise ValueError("keystore.file holds base64: text that is not valid base64") from None


def key_problems(
    props: Mapping[str, str], lines: Mapping[str, int], source: object
) -> tuple[list[str], list[str]]:
    """(errors, warnings) for keys jwt-grant-generator does not know. A near miss of a known
    key that the file does not set is an error: importing without it would drop its value
    unseen (`keystore.pasword` would lose the password, `resourse` the audience). Any other
    unknown key is ignored with a warning. A key without a value is not shown: a stray line
    may be a pasted password."""
    errors, warnings = [], []
    for key in props:
        if key in KNOWN:
            continue
        where = f"{source}: line {lines.get(key, '?')}"
        close = difflib.get_close_matches(key, KNOWN, n=1)
        if not props[key]:
            warnings.append(f"{where}: a key without a value (not shown), ignored")
        elif close and close[0] not in props:
            errors.append(
                f"line {lines.get(key, '?')}: unknown key {key!r}, did you mean {close[0]!r}?"
            )
        elif close:
            used = f"{close[0]!r} (line {lines.get(close[0], '?')})"
            warnings.append(f"{where}: unknown key {key!r} ignored; {used} is used")
        else:
            warnings.append(
                f"{where}: unknown key {key!r} ignored: jwt-grant-generator has no such key"
            )
    return errors, warnings


def keystore_path(value: str, cwd: Path) -> Path:
    """keystore.file as the Java tool opened it: a relative path from the working directory."""
    return Path(value) if Path(value).is_absolute() else cwd / value


def detect(data: bytes, what: str) -> str:
    """The keystore type of `data` in mpagent's words; ValueError naming `what` otherwise."""
    from mpagent.keys import detect_type

    try:
        return detect_type(data)
    except ValueError:
        raise ValueError(f"{what} is not a JKS, PKCS#12, PEM or JWK keystore") from None


def to_profile(
    props: Mapping[str, str], name: str, *, base_dir: Path, data: bytes | None = None
) -> tuple[str, dict[str, str], list[str]]:
    """The `[profiles.NAME]` TOML, the passwords ("keystore", "key") and what was done, line by
    line. A relative keystore.file is taken from `base_dir` (the working directory, as the Java
    tool took it); `data`, the keystore file's bytes when read, is checked against keystore.type."""
    _require(props)
    env, env_notes = environment_for(props.get("audience"), props.get("token.endpoint"))
    profile: dict[str, Any] = {"environment": env, "client_id": props["issuer"].strip()}
    # The Java tool asked for one token for the whole set; so does a scopes entry with spaces.
    profile["scopes"] = [config.scope_string([props["scope"]])]
    keystore, keystore_notes = _keystore_settings(props, name, base_dir, data)
    optional = {s: props[k].strip() for k, s in _OPTIONAL.items() if props.get(k, "").strip()}
    profile |= keystore | optional
    passwords, password_notes = _passwords(props)
    several = " for the set, as the Java tool asked" if " " in profile["scopes"][0] else ""
    notes = [
        f"issuer → client_id = {_toml(profile['client_id'])}",
        *env_notes,
        f"scope → scopes = {_toml(profile['scopes'])} (one token{several})",
        *keystore_notes,
        *(f"{k} → {s} = {_shown(s, optional[s])}" for k, s in _OPTIONAL.items() if s in optional),
        *password_notes,
    ]
    lines = [f"[profiles.{name}]", *(f"{k} = {_toml(v)}" for k, v in profile.items())]
    return "\n".join(lines) + "\n", passwords, notes


def _require(props: Mapping[str, str]) -> None:
    missing = [f"{k} ({what})" for k, what in REQUIRED.items() if not props.get(k, "").strip()]
    if not (props.get("audience", "").strip() or props.get("token.endpoint", "").strip()):
        missing.append("audience (Maskinporten's issuer URL, or token.endpoint)")
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}; add it to the file and import again")


def _shown(setting: str, value: str) -> str:
    return "(set; a person id is not shown)" if setting == "pid" else _toml(value)


def inline_keystore_path(name: str, kind: str | None) -> str:
    """Where an inline keystore goes, relative to the config file."""
    return f"keystores/{name}.{_EXTENSIONS.get(kind or '', 'keystore')}"


def _keystore_settings(
    props: Mapping[str, str], name: str, base: Path, data: bytes | None
) -> tuple[dict[str, str], list[str]]:
    value, declared = props["keystore.file"].strip(), props.get("keystore.type", "").strip()
    inline = embedded_keystore(props)
    content = inline if inline is not None else data
    detected = None if content is None else detect(content, f"keystore.file {_short(value)}")
    if inline is not None:
        path = inline_keystore_path(name, detected)
        notes = [f"keystore.file base64:… ({detected}) → keystore = {_toml(path)}, a 0600 file"]
    else:
        path = str(keystore_path(value, base))
        how = "" if Path(value).is_absolute() else " (from the working directory, as Java reads it)"
        notes = [f"keystore.file {value}{how} → keystore = {_toml(path)}"]
    if not declared:
        found = f"the file is {_LABELS[detected]}" if detected else "mpagent detects the type"
        notes.append(f"keystore.type not set (the Java tool assumed JKS): {found}")
        return {"keystore": path}, notes
    kind = detected or _ALIASES.get(declared.lower(), declared.lower())
    notes.append(_type_note(declared, kind, detected))
    return {"keystore": path, "keystore_type": kind}, notes


def _type_note(declared: str, kind: str, detected: str | None) -> str:
    said = _ALIASES.get(declared.lower(), declared.lower())
    if detected is None or detected == said:
        return f"keystore.type {declared} → keystore_type = {_toml(kind)}"
    why = " (keytool's default since Java 9)" if (said, detected) == ("jks", "pkcs12") else ""
    # Java's JKS and PKCS12 KeyStore types each read both formats (keystore.type.compat).
    return f"keystore.type={declared}, but the file is {_LABELS[detected]}{why}; imported as {kind}"


def _short(value: str) -> str:
    return "base64:…" if value.startswith("base64:") else value


def _passwords(props: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    passwords = {which: props[key] for which, (key, _) in _PASSWORDS.items() if props.get(key)}
    if passwords.get("key") is not None and passwords.get("key") == passwords.get("keystore"):
        del passwords["key"]  # the key password defaults to the keystore password
        return passwords, ["keystore.alias.password equals keystore.password: stored once"]
    return passwords, []


def profile_name(name: str | None, path: Path) -> str:
    """--profile, else the file name made into a profile name."""
    if name is None:
        return re.sub(r"[^A-Za-z0-9_-]+", "-", path.stem).strip("-") or "imported"
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ConfigError(f"--profile {name!r}: use letters, digits, '-' and '_' only")
    return name


def _toml(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


# -- the command


def main(args: Any, out: TextIO, err: TextIO | None = None) -> int:
    err = err or sys.stderr
    source = Path(args.file)
    config_path = Path(args.config or paths.config_file()).expanduser()
    name = profile_name(args.profile, source)
    props, warnings = _read(source)
    err.writelines(f"mpagent: warning: {line}\n" for line in warnings)
    cwd = Path.cwd()  # where the Java tool would have opened a relative keystore.file
    try:
        block, passwords, notes = to_profile(
            props, name, base_dir=cwd, data=_keystore_bytes(props, source, cwd)
        )
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    text, others = _combined(config_path, name, f"# imported from {source.name}\n{block}", source)
    data = embedded_keystore(props)
    if data is not None:
        keystore = config_path.parent / inline_keystore_path(name, detect(data, "keystore.file"))
        _write_new_private(keystore, data)
    try:
        _replace_atomically(config_path, text)
    except OSError as exc:
        if data is not None:
            keystore.unlink(missing_ok=True)
        raise ConfigError(f"{config_path}: cannot write ({exc.strerror or exc})") from exc
    out.write(f"mpagent: imported {source} as profile {name!r} into {config_path}\n")
    out.writelines(f"  {note}\n" for note in [*notes, *others])
    stored, advice = store_passwords(name, passwords, props, source)
    out.writelines(f"  {line}\n" for line in stored)
    out.write(f"next: mpagent doctor --profile {name}\n")
    err.writelines(f"mpagent: warning: {line}\n" for line in advice)
    return 0


def _read(source: Path) -> tuple[dict[str, str], list[str]]:
    """The properties (ISO-8859-1, as Java reads them) and the warnings about their keys."""
    try:
        text = read_regular(source).decode("iso-8859-1")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read ({exc.strerror or exc})") from exc
    try:
        props = parse_properties(text)
        errors, warnings = key_problems(props, key_lines(text), source)
        if errors:
            raise ValueError(f"{'; '.join(errors)}; correct it and import again")
        _require(props)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return props, warnings


def _keystore_bytes(props: Mapping[str, str], source: Path, cwd: Path) -> bytes | None:
    """The keystore file's content, read now: a wrong path is found at import, not later."""
    value = props["keystore.file"].strip()
    if value.startswith("base64:"):
        return None
    path = keystore_path(value, cwd)
    try:
        return read_regular(path)
    except FileNotFoundError:
        raise ConfigError(_missing(source, value, path)) from None
    except OSError as exc:
        raise ConfigError(
            f"{source}: keystore.file {value}: cannot read {path} ({exc.strerror or exc})"
        ) from exc


def _missing(source: Path, value: str, path: Path) -> str:
    problem = f"{source}: keystore.file {value}: no file {path}"
    if Path(value).is_absolute():
        return f"{problem}; correct the path and import again"
    beside = source.absolute().parent / value
    fix = "run the import where you ran the Java tool, or make keystore.file absolute"
    if beside.is_file():
        fix = f"{beside} exists: run the import in {beside.parent}, or make keystore.file absolute"
    return f"{problem} (a relative path is taken from the working directory, as Java does); {fix}"


def _combined(config_path: Path, name: str, block: str, source: Path) -> tuple[str, list[str]]:
    """The config file's text with the profile appended, validated whole, and a note when
    the file now has several profiles and no default."""
    try:
        existing = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        existing = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config_path}: cannot read the configuration: {exc}") from exc
    try:
        profiles = tomllib.loads(existing).get("profiles", {})
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_path}: not valid TOML ({exc}); fix it first") from exc
    if isinstance(profiles, dict) and name in profiles:
        raise ConfigError(
            f"{config_path}: a profile {name!r} exists already; nothing imported. Choose "
            f"another name: mpagent import-properties {source} --profile {name}-2"
        )
    gap = "\n" if existing.endswith("\n") else "\n\n"
    text = existing + gap + block if existing else block
    problem: Exception | None
    try:
        raw = tomllib.loads(text)
        problem = config.parse(raw, config_path).broken.get(name)
    except (ConfigError, tomllib.TOMLDecodeError) as exc:
        problem = exc
    if problem is not None:
        raise ConfigError(f"{source}: not imported, the result would be invalid: {problem}")
    return text, _default_note(config_path, raw, name)


def _default_note(config_path: Path, raw: Mapping[str, Any], name: str) -> list[str]:
    names = list(raw.get("profiles", {}))
    if len(names) < 2 or raw.get("default_profile") is not None:
        return []
    return [
        f"{config_path} now has profiles {', '.join(names)} and no default_profile: pass"
        f" --profile (mpagent get --profile {name} SCOPE), or add"
        f' default_profile = "{names[0]}" at the top of the file'
    ]


def _write_new_private(path: Path, data: bytes) -> None:
    """A new 0600 file in a 0700 directory; an existing file is never overwritten."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_new(path, data)
    except FileExistsError:
        raise ConfigError(
            f"{path} exists already; remove it, or import under another name with --profile"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the keystore ({exc.strerror or exc})") from exc


def _replace_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a partial one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, text)


def store_passwords(
    name: str, passwords: Mapping[str, str], props: Mapping[str, str], source: Path
) -> tuple[list[str], list[str]]:
    """Into the OS keyring: what was stored where, or how to provide what was not (names
    only), and the warnings: a keyring failure, and that `source` holds secrets in plain text."""
    lines, warnings = [], []
    if "keystore" not in passwords:
        lines.append(
            f"no keystore password stored: {source.name} has no keystore.password; if the"
            f" keystore has one, run `mpagent secret set {name}` (or set {KEYSTORE_ENV})"
        )
    try:  # keyring.set_password behind passwords.py's boundary: every failure is one error
        for which, password in passwords.items():
            keyring_set(name, which, password)
    except SecretUnavailable as exc:
        warnings.append(str(exc))
        for which in passwords:
            key, env = _PASSWORDS[which]
            flag = " --key" if which == "key" else ""
            lines.append(
                f"{key} NOT stored: export {env}=<the {key} from {source.name}> where mpagent"
                f" runs, or run `mpagent secret set {name}{flag}` once a keyring works"
            )
    else:
        for which in passwords:
            entry = keyring_username(name, which)
            lines.append(
                f"{_PASSWORDS[which][0]} stored in the OS keyring: service"
                f" {SERVICE!r}, entry {entry!r}"
            )
    held = [key for key, _ in _PASSWORDS.values() if props.get(key)]
    held += ["the keystore itself (base64:)"] if embedded_keystore(props) is not None else []
    if held:
        after = "now" if not warnings else "once the password is kept somewhere safer"
        what = " and ".join([", ".join(held[:-1]), held[-1]] if len(held) > 2 else held)
        warnings.append(
            f"{source} holds {what} in plain text; delete the file {after}"
            " (mpagent no longer needs it)"
        )
    return lines, warnings
