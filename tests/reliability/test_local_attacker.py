"""Another local user against the agent: squatting the token bridge's port, using a stolen
bridge secret, holding the bridge's connections, and planting the runtime directory that
mpagent falls back to without XDG_RUNTIME_DIR. The attacker is a real second uid
(`other_user`, made with useradd; root only, skipped otherwise, and CI runs as root); the
agent is the test's own user, on the real CLI and the emulator."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from mpagent import bridge, paths, peers

from ..agentproc import AgentProcess, wait_for
from ..conftest import PASSWORD, SCOPES, profile_for, run_cli, write_config
from ..test_bridge import (  # noqa: F401 - bridge_env and running are fixtures
    Running,
    bridge_config,
    bridge_env,
    free_port,
    make_secret,
    running,
    start_agent,
)
from .test_isolation import OtherUser, other_user  # noqa: F401 - other_user is a fixture

# Listens on the port and keeps whatever anyone sends it, until its stdin closes.
SQUAT = """
listener = socket.socket()
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(16)
print(json.dumps({"pid": os.getpid()}), flush=True)
received, conns = bytearray(), []
while True:
    ready = select.select([sys.stdin, listener, *conns], [], [])[0]
    if sys.stdin in ready:
        break
    if listener in ready:
        conns.append(listener.accept()[0])
    for conn in [c for c in conns if c in ready]:
        data = conn.recv(65536)
        received += data
        if not data:
            conns.remove(conn)
print(json.dumps({"received": received.decode("latin-1")}), flush=True)
"""

# A stolen secret (read from stdin: no secret in argv) sent to the real bridge, N times.
STEAL = """
port, times = int(sys.argv[1]), int(sys.argv[2])
secret = sys.stdin.readline().strip()
body = f"grant_type=client_credentials&client_id=dev&client_secret={secret}".encode()
head = (
    f"POST /token HTTP/1.1\\r\\nHost: 127.0.0.1:{port}\\r\\n"
    "Content-Type: application/x-www-form-urlencoded\\r\\n"
    f"Content-Length: {len(body)}\\r\\n\\r\\n"
).encode()
answers = []
for _ in range(times):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(head + body)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        answers.append(reply.split(b"\\r\\n")[0].decode("latin-1") or "closed")
    except OSError as exc:
        answers.append(errno.errorcode.get(exc.errno, str(exc)))
print(json.dumps(answers))
"""

# Holds N idle connections; every tenth of a second, one the bridge closed is opened again.
HOLD = """
port, count = int(sys.argv[1]), int(sys.argv[2])

def opened():
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return None
    s.setblocking(False)
    return s

def open_still(s):
    if s is None:
        return False
    try:
        s.recv(1, socket.MSG_PEEK)  # the end, or a refusal being sent
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False

conns = [opened() for _ in range(count)]
print(json.dumps({"opened": count}), flush=True)
opens, most_held, sweeps = count, 0, 0
while not select.select([sys.stdin], [], [], 0.1)[0]:
    sweeps += 1
    alive = [s for s in conns if open_still(s)]
    most_held = max(most_held, len(alive))
    for s in conns:
        if s is not None and s not in alive:
            s.close()
    conns = alive + [opened() for _ in range(count - len(alive))]
    opens += count - len(alive)
print(json.dumps({"opens": opens, "most_held": most_held, "sweeps": sweeps}), flush=True)
"""

# Makes a directory (as the other user) where mpagent will look for its runtime directory.
PLANT = """
path, mode = sys.argv[1], int(sys.argv[2], 8)
os.mkdir(path)
os.chmod(path, mode)
print(json.dumps({"planted": path}))
"""


class Attacker:
    """A long-running script of the other user; stdin closing tells it to finish."""

    def __init__(self, user: OtherUser, code: str, *args: str) -> None:
        self.proc = user.python(
            code, *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read() if self.proc.stderr else ""
        self.started: dict[str, Any] = json.loads(line)

    def finish(self) -> dict[str, Any]:
        out, err = self.proc.communicate("", timeout=30)
        assert self.proc.returncode == 0, err
        return dict(json.loads(out))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def status_json() -> dict[str, Any]:
    result = run_cli("status", "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


# -- item 1: the bridge port taken by another user


@pytest.fixture
def squatted(
    other_user: OtherUser,  # noqa: F811
    bridge_env: None,  # noqa: F811
    tmp_path: Path,
    emulator: Any,
    p12: Path,
) -> Iterator[tuple[Attacker, Path, int]]:
    """The other user holds the bridge's port before the agent starts; yields the squatter,
    the config and the port."""
    port = free_port()
    cfg = bridge_config(tmp_path / "config.toml", emulator, p12, port)
    squatter = Attacker(other_user, SQUAT, str(port))
    try:
        yield squatter, cfg, port
    finally:
        squatter.kill()


def test_a_taken_bridge_port_is_named_and_gets_no_secret(
    squatted: tuple[Attacker, Path, int],
    other_user: OtherUser,  # noqa: F811
    tmp_path: Path,
    report: Any,
) -> None:
    """With another user on the bridge's port: postman refuses (78) with no agent and with an
    agent whose bridge is off; status, doctor (78) and the agent's log name the squatter's uid
    and pid; and neither postman, nor a rotated secret's probe, sends it the secret."""
    squatter, cfg, port = squatted
    pid, uid = squatter.started["pid"], other_user.uid
    out = tmp_path / "postman"
    no_agent = run_cli("--config", str(cfg), "postman", "--out", str(out))
    assert no_agent.returncode == 78, no_agent.stderr
    assert "no agent is running" in no_agent.stderr and "start one first" in no_agent.stderr
    make_secret(cfg)
    agent = AgentProcess(cfg, tmp_path / "agent.log").wait_ready()
    try:
        wait_for(lambda: "token bridge is off" in agent.log())
        logged = next(line for line in agent.log().splitlines() if "token bridge is off" in line)
        state = status_json()["bridge"]
        doctor = run_cli("--config", str(cfg), "doctor", "--no-token")
        postman = run_cli("--config", str(cfg), "postman", "--out", str(out))
        newman = run_cli("--config", str(cfg), "postman", "--with-secret")
        rotated = run_cli("--config", str(cfg), "bridge", "secret", "--rotate")
    finally:
        agent.stop()
    received = squatter.finish()["received"]
    owner = f"uid {uid} (user {other_user.name}), pid {pid}"
    report(
        agent_log=logged.split(" ERROR ")[-1],
        status_bridge=state,
        doctor=[line for line in doctor.stdout.splitlines() if "bridge" in line],
        postman=postman.stderr.strip(),
        bytes_the_squatter_got=len(received),
    )
    assert owner in logged and "127.0.0.1:" + str(port) in logged
    assert state["serving"] is False and owner in state["error"]
    assert doctor.returncode == 78 and owner in doctor.stdout, doctor.stdout
    assert postman.returncode == 78 and "not serving" in postman.stderr and owner in postman.stderr
    assert newman.returncode == 78 and newman.stdout == "" and owner in newman.stderr
    assert not out.exists()
    assert rotated.returncode == 0, rotated.stderr
    assert owner in rotated.stderr and "not sent" in rotated.stderr
    assert received == "", received  # no probe, no token request: nothing at all


def test_a_stolen_secret_is_useless_to_another_user(
    other_user: OtherUser,  # noqa: F811
    bridge_env: None,  # noqa: F811
    tmp_path: Path,
    emulator: Any,
    p12: Path,
    report: Any,
) -> None:
    """The bridge answers only its own user: another uid holding the right secret gets its
    connections closed unanswered (one log line for twenty tries), while the agent's user gets
    its token; status says how peers are checked."""
    port = free_port()
    cfg = bridge_config(tmp_path / "config.toml", emulator, p12, port)
    bridged = start_agent(cfg, tmp_path / "agent.log", port, make_secret(cfg))
    try:
        answers = other_user.run(STEAL, str(port), "20", stdin=bridged.secret + "\n")
        ours = bridged.post(bridged.form())
        state = status_json()["bridge"]
        refusals = [line for line in bridged.agent.log().splitlines() if "bridge: refused" in line]
    finally:
        bridged.agent.stop()
    report(
        other_user_answers=sorted(set(answers)),
        log_lines=len(refusals),
        peer_check=state["peer_check"],
    )
    assert ours.status_code == 200, ours.text
    assert not [a for a in answers if a.startswith("HTTP/")], answers
    assert len(refusals) == 1 and f"uid {other_user.uid}" in refusals[0], refusals
    assert state["serving"] is True and state["peer_check"].startswith("on")


# -- item 2: connections held open


def test_idle_connections_of_another_user_leave_the_bridge_to_its_user(
    other_user: OtherUser,  # noqa: F811
    bridge_env: None,  # noqa: F811
    tmp_path: Path,
    emulator: Any,
    p12: Path,
    report: Any,
) -> None:
    """With 200 idle connections from another uid, reopened as soon as they are closed, the
    agent's user still gets a token from the bridge within 1 s, every time."""
    port = free_port()
    cfg = bridge_config(tmp_path / "config.toml", emulator, p12, port)
    bridged = start_agent(cfg, tmp_path / "agent.log", port, make_secret(cfg))
    holder = Attacker(other_user, HOLD, str(port), "200")
    latencies: list[float] = []
    failures: list[int | str] = []  # a status code, or the exception's name
    try:
        time.sleep(1.0)  # let it settle into holding what it can
        for _ in range(10):
            started = time.monotonic()
            try:
                response = requests.post(bridged.url, data=bridged.form(), timeout=5)
                latencies.append(time.monotonic() - started)
                if response.status_code != 200:
                    failures.append(response.status_code)
            except requests.RequestException as exc:
                failures.append(type(exc).__name__)
            time.sleep(0.1)
        held = holder.finish()
    finally:
        holder.kill()
        bridged.agent.stop()
    report(**held, ours_ok=len(latencies) - len(failures), failures=failures)
    report(slowest_ms=round(max(latencies, default=0) * 1000))
    assert not failures, failures
    assert max(latencies) < 1.0, latencies


def test_the_agents_user_gets_a_slot_past_its_own_idle_connections(
    running: Running,  # noqa: F811
    report: Any,
) -> None:
    """100 idle connections of the agent's own user (over the cap of 64) do not lock out
    its next request: the oldest idle ones make room."""
    idle = []
    for _ in range(100):
        s = socket.create_connection(("127.0.0.1", running.port), timeout=5)
        idle.append(s)
    try:
        started = time.monotonic()
        response = running.post(running.form())
        took = time.monotonic() - started
    finally:
        for s in idle:
            s.close()
    report(latency_ms=round(took * 1000))
    assert response.status_code == 200, response.text
    assert took < 1.0


# -- the pure parts: slots per peer uid (bridge), /proc/net/tcp addresses; the peer lookup (peers)


class Closed(list[str]):
    def closer(self, name: str) -> Any:
        return lambda: self.append(name)


def test_slots_make_room_by_closing_the_oldest_idle_connection() -> None:
    """At the cap, a new connection closes the oldest one that has sent no request head."""
    closed, slots = Closed(), bridge.Slots(cap=3, early=2.0)
    first = slots.admit(1000, 0.0, closed.closer("first"))
    second = slots.admit(1000, 0.1, closed.closer("second"))
    slots.admit(1000, 0.2, closed.closer("third"))
    assert first is not None and second is not None
    first.idle = False  # it sent its request: it is being answered
    assert slots.admit(1000, 0.3, closed.closer("fourth")) is not None
    assert closed == ["second"] and slots.count(1000) == 3


def test_slots_close_idle_connections_early_near_the_cap() -> None:
    """Near the cap (three quarters), idle connections older than `early` s are closed."""
    closed, slots = Closed(), bridge.Slots(cap=4, early=2.0)
    for n in range(3):
        slots.admit(1000, float(n), closed.closer(f"c{n}"))
    assert slots.admit(1000, 3.5, closed.closer("new")) is not None
    assert closed == ["c0", "c1"] and slots.count(1000) == 2


def test_slots_refuse_when_every_connection_is_busy_and_count_per_uid() -> None:
    """With every slot of a uid being answered, its next connection is refused; another uid's
    full slots never take one of this uid's."""
    closed, slots = Closed(), bridge.Slots(cap=2, early=2.0)
    for n in range(2):
        slot = slots.admit(2000, 0.0, closed.closer(f"other{n}"))
        assert slot is not None
        slot.idle = False
    assert slots.admit(2000, 5.0, closed.closer("refused")) is None
    assert slots.admit(1000, 5.0, closed.closer("ours")) is not None
    assert closed == [] and slots.count(2000) == 2 and slots.count(1000) == 1


def test_released_slots_are_free_again() -> None:
    """A finished connection gives its slot back."""
    slots = bridge.Slots(cap=1, early=2.0)
    slot = slots.admit(None, 0.0, lambda: None)
    assert slot is not None
    slot.idle = False
    slots.release(slot)
    assert slots.admit(None, 0.1, lambda: None) is not None


def test_proc_net_tcp_spells_addresses_as_the_kernel_does() -> None:
    """127.0.0.1:8765 and [::1]:8765 in /proc/net/tcp{,6} notation (little-endian words)."""
    if socket.htonl(1) == 1:
        pytest.skip("the expected spelling is for little-endian machines")
    v4 = {"tcp": "0100007F:223D", "tcp6": "0000000000000000FFFF00000100007F:223D"}
    assert peers.proc_address("127.0.0.1", 8765) == v4
    assert peers.proc_address("::ffff:127.0.0.1", 8765) == v4  # a dual-stack socket's view
    assert peers.proc_address("::1", 8765) == {"tcp6": "00000000000000000000000001000000:223D"}


@pytest.mark.parametrize("way", ["peer_by_netlink", "peer_by_proc"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_peer_of_a_loopback_connection_is_found_with_its_uid(host: str, way: str) -> None:
    """A real loopback connection: each end finds the other's socket and its uid (ours), by
    sock_diag and by /proc/net/tcp{,6} alike."""
    find = getattr(peers, way)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.socket(family)
        listener.bind((host, 0))
    except OSError:
        pytest.skip(f"no {host} here")
    with listener:
        listener.listen(1)
        with socket.create_connection(listener.getsockname()[:2]) as client:
            accepted, _ = listener.accept()
            with accepted:
                server_side = find(accepted.getsockname(), accepted.getpeername())
                client_side = find(client.getsockname(), client.getpeername())
                holders = client_side.pids() if client_side else []
    assert server_side is not None and server_side.uid == os.getuid()
    assert client_side is not None and client_side.uid == os.getuid()
    assert holders == [os.getpid()]


# -- item 3: the runtime directory fallback


@pytest.fixture
def no_runtime_dir(
    home: Path, monkeypatch: pytest.MonkeyPatch, emulator: Any, p12: Path
) -> Iterator[Path]:
    """No XDG_RUNTIME_DIR (ssh without pam_systemd, su, cron), and a shared temporary
    directory of the test's own, made as /tmp is (root's, 1777); yields it."""
    if os.path.isdir(f"/run/user/{os.getuid()}"):
        pytest.skip(f"/run/user/{os.getuid()} exists: mpagent never falls back to a temp dir")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    shared = Path(tempfile.mkdtemp(prefix="mpa-tmp-", dir="/tmp"))
    shared.chmod(0o1777)
    monkeypatch.setenv("TMPDIR", str(shared))
    cfg = write_config(home / "config.toml", {"dev": profile_for(emulator, p12)})
    monkeypatch.setenv("MPAGENT_CONFIG", str(cfg))
    monkeypatch.setenv("MPAGENT_KEYSTORE_PASSWORD", PASSWORD)
    yield shared
    shutil.rmtree(shared, ignore_errors=True)


def stop_any_agent() -> None:
    stop = run_cli("stop")
    assert stop.returncode in (0, 69, 78), stop.stderr


def test_the_fallback_runtime_directory_works_when_it_is_ours(no_runtime_dir: Path) -> None:
    """Without XDG_RUNTIME_DIR, `get` makes <tmp>/runtime-<uid> 0700 and its agent serves
    there (the check refuses only what is wrong)."""
    runtime = no_runtime_dir / f"runtime-{os.getuid()}"
    try:
        got = run_cli("get", SCOPES[0])
        assert got.returncode == 0, got.stderr
        assert paths.socket_path() == str(runtime / "mpagent" / "agent.sock")
        assert oct(runtime.stat().st_mode & 0o777) == "0o700"
    finally:
        stop_any_agent()


@pytest.mark.parametrize("mode", ["755", "777"])
def test_a_runtime_directory_planted_by_another_user_is_one_line(
    mode: str,
    other_user: OtherUser,  # noqa: F811
    no_runtime_dir: Path,
    report: Any,
) -> None:
    """Another user's <tmp>/runtime-<uid> turns `get` and `status` into one line (exit 78)
    naming the directory, its owner and mode, and saying to set XDG_RUNTIME_DIR."""
    planted = no_runtime_dir / f"runtime-{os.getuid()}"
    other_user.run(PLANT, str(planted), mode)
    try:
        got = run_cli("get", SCOPES[0])
        status = run_cli("status")
    finally:
        stop_any_agent()
    report(get_exit=got.returncode, stderr_lines=len(got.stderr.splitlines()), got=got.stderr)
    for result in (got, status):
        assert result.returncode == 78, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        line = result.stderr
        assert str(planted) in line and "XDG_RUNTIME_DIR" in line, line
        assert f"uid {other_user.uid}" in line and f"mode {int(mode, 8):04o}" in line, line
    assert list(planted.iterdir()) == []  # nothing of ours went into it


def test_a_shared_temp_directory_without_the_sticky_bit_is_refused(no_runtime_dir: Path) -> None:
    """A temporary directory anyone may write to without the sticky bit (anyone can replace
    runtime-<uid> in it) is refused in one line naming it."""
    no_runtime_dir.chmod(0o777)
    got = run_cli("get", SCOPES[0])
    assert got.returncode == 78, got.stderr
    assert len(got.stderr.splitlines()) == 1 and str(no_runtime_dir) in got.stderr, got.stderr
    assert "mode 0777" in got.stderr and "XDG_RUNTIME_DIR" in got.stderr, got.stderr
