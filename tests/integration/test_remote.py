"""Remote execution against real OpenSSH servers on loopback addresses (no lab needed)."""

import json
import socket
import time
from pathlib import Path

import pytest

from igops import remote
from igops.errors import ExitCode
from igops.lab import sshd
from tests.conftest import run_igops
from tests.labtools import wait_for

pytestmark = pytest.mark.ssh

PORT = 2222
TRUSTED = [f"127.0.20.{i}" for i in range(1, 9)]
IMPOSTOR = "127.0.20.20"  # serves a different host key than known_hosts says
UNKNOWN = "127.0.20.21"  # not in known_hosts at all
SILENT = "127.0.20.22"  # accepts TCP but never speaks SSH
NOBODY = "127.0.20.23"  # nothing listens


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sshd")
    keys = sshd.ensure_keys(directory)
    other = directory / "other"
    other_keys = sshd.ensure_keys(other)
    (other / "authorized_keys").write_text(keys.client_key.with_suffix(".pub").read_text())
    sshd.write_known_hosts(keys, [(address, PORT) for address in TRUSTED + [IMPOSTOR]])
    sshd.start(directory, "trusted", keys, TRUSTED + [UNKNOWN], PORT)
    sshd.start(other, "impostor", other_keys, [IMPOSTOR], PORT)
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    silent.bind((SILENT, PORT))
    silent.listen(16)
    yield directory, keys
    silent.close()
    sshd.stop(directory, "trusted")
    sshd.stop(other, "impostor")


def settings(keys, connect_timeout=2.0, command_timeout=10.0, parallel=8):
    return remote.SshSettings(keys.known_hosts, keys.client_key, connect_timeout, command_timeout, parallel)


def target(address):
    return remote.Target(address, address, PORT, "root")


def test_runs_and_reports_per_host(servers):
    _, keys = servers
    results = remote.run([target(a) for a in TRUSTED[:3]], "echo out; echo err >&2; exit 3", settings(keys))
    assert [r.host for r in results] == TRUSTED[:3]
    for result in results:
        assert result.exit_code == 3 and not result.ok and result.reached
        assert result.stdout == "out\n" and result.stderr == "err\n" and result.duration_ms > 0


def test_unknown_host_key_is_refused(servers):
    _, keys = servers
    [result] = remote.run([target(UNKNOWN)], "touch /tmp/igops-should-not-exist", settings(keys))
    assert not result.reached and "unknown" in result.error and "never trusts a new key" in result.error
    assert not Path("/tmp/igops-should-not-exist").exists()
    assert UNKNOWN not in keys.known_hosts.read_text()  # nothing was added behind our back


def test_changed_host_key_is_refused(servers):
    _, keys = servers
    [result] = remote.run([target(IMPOSTOR)], "true", settings(keys))
    assert not result.reached and "CHANGED" in result.error


def test_hashed_known_hosts_entries_are_matched_and_an_edited_file_is_read_again(servers, tmp_path):
    import shutil
    import subprocess

    _, keys = servers
    hashed = tmp_path / "known_hosts"
    shutil.copy(keys.known_hosts, hashed)
    subprocess.run(["ssh-keygen", "-H", "-f", str(hashed)], check=True, capture_output=True)
    assert TRUSTED[0] not in hashed.read_text()
    hashed_settings = remote.SshSettings(hashed, keys.client_key, 2.0, 10.0, 8)
    [result] = remote.run([target(TRUSTED[0])], "true", hashed_settings)
    assert result.ok, result.error
    lines = hashed.read_text().splitlines()
    hashed.write_text("\n".join(lines[1:]) + "\n")  # the first host's entry removed
    [result] = remote.run([target(TRUSTED[0])], "true", hashed_settings)
    assert not result.reached and "unknown" in result.error


def test_nothing_listening(servers):
    _, keys = servers
    [result] = remote.run([target(NOBODY)], "true", settings(keys))
    assert not result.reached and "connection refused" in result.error


def test_silent_server_times_out(servers):
    _, keys = servers
    started = time.monotonic()
    [result] = remote.run([target(SILENT)], "true", settings(keys, connect_timeout=1))
    assert time.monotonic() - started < 5
    assert not result.reached and "handshake did not complete" in result.error


def test_hung_command_times_out_and_is_killed_on_the_host(servers):
    _, keys = servers
    marker = "sleep 60.4711"
    started = time.monotonic()
    results = remote.run([target(TRUSTED[0]), target(TRUSTED[1])], marker, settings(keys), timeout=1)
    assert time.monotonic() - started < 5
    assert all(not r.ok and "timed out after 1 s" in r.error for r in results)
    # The host's own deadline (TERM at 2 s, KILL 2 s later) runs from when the command began
    # there, which a slow login puts after `started` by an amount the client does not know.
    assert wait_for(lambda: not _running(marker), timeout=10, interval=0.2), _running(marker)


def _running(marker: str) -> list[Path]:
    return [p for p in Path("/proc").glob("[0-9]*") if _cmdline(p).startswith(marker)]


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_one_dead_host_does_not_hold_up_the_others(servers):
    _, keys = servers
    started = time.monotonic()
    results = remote.run([target(SILENT), *[target(a) for a in TRUSTED[:4]]], "true", settings(keys, connect_timeout=2))
    assert time.monotonic() - started < 6
    assert [r.ok for r in results] == [False, True, True, True, True]


def test_parallel_cap_is_honoured(servers):
    _, keys = servers
    results = remote.run(
        [target(a) for a in TRUSTED[:6]], "date +%s.%N; sleep 0.6; date +%s.%N", settings(keys), parallel=2
    )
    spans = [tuple(float(x) for x in r.stdout.split()) for r in results]
    moments = sorted({start for start, _ in spans} | {end for _, end in spans})
    peak = max(sum(1 for start, end in spans if start <= m < end) for m in moments)
    assert all(r.ok for r in results) and peak <= 2
    assert max(end for _, end in spans) - min(start for start, _ in spans) >= 1.7  # 3 waves of 0.6 s


HOSTILE = [
    "a;b",
    "$(touch /tmp/igops-pwned)",
    "`id`",
    "it's",
    'say "hi"',
    "line1\nline2",
    "&& rm -rf /x",
    "*",
    "$HOME",
    "\\",
    "",
    " lead and trail ",
    "|",
    ">/tmp/igops-pwned",
]


def test_hostile_arguments_arrive_literally(servers, tmp_path):
    directory, keys = servers
    config = tmp_path / "igops.toml"
    config.write_text(f"""
[fleet]
state_dir = "{tmp_path / "state"}"
[ssh]
port = {PORT}
known_hosts = "{keys.known_hosts}"
identity_file = "{keys.client_key}"
[[hosts]]
name = "h1"
address = "{TRUSTED[0]}"
roles = ["app"]
""")
    result = run_igops(
        "-c",
        str(config),
        "exec",
        "--yes",
        "--json",
        "--",
        "python3",
        "-c",
        "import json, sys; print(json.dumps(sys.argv[1:]))",
        *HOSTILE,
    )
    assert result.returncode == 0, result.stderr
    [host] = json.loads(result.stdout)["data"]["hosts"]
    assert json.loads(host["stdout"]) == HOSTILE
    assert not Path("/tmp/igops-pwned").exists()


def test_exec_partial_failure_exit_code(servers, tmp_path):
    _, keys = servers
    config = tmp_path / "igops.toml"
    hosts = "".join(
        f'[[hosts]]\nname = "h{i}"\naddress = "{a}"\nroles = ["app"]\n'
        for i, a in enumerate([TRUSTED[0], TRUSTED[1], NOBODY])
    )
    config.write_text(f"""
[fleet]
state_dir = "{tmp_path / "state"}"
[ssh]
port = {PORT}
known_hosts = "{keys.known_hosts}"
identity_file = "{keys.client_key}"
{hosts}""")
    result = run_igops("-c", str(config), "exec", "--yes", "--", "true")
    assert result.returncode == ExitCode.PARTIAL
    assert "2 of 3 hosts ok" in result.stdout and "connection refused" in result.stdout


def test_kept_connections_log_in_once_per_host_and_replace_one_that_died(servers, monkeypatch):
    _, keys = servers
    logins = []
    opened = remote.open_connection

    async def counting(target, ssh_settings):
        logins.append(target.address)
        return await opened(target, ssh_settings)

    monkeypatch.setattr(remote, "open_connection", counting)
    hosts = [target(a) for a in TRUSTED[:2]]
    with remote.keep_connections() as kept:
        remote.connect_ahead(hosts, settings(keys))
        for _ in range(3):
            results = remote.run(hosts, "echo $$", settings(keys))
            assert all(r.ok for r in results), results
        assert sorted(logins) == sorted(TRUSTED[:2]), "one login per host, made ahead"
        # The connection to the first host dies (its sshd child is gone): the next command logs in again.
        connection = kept._connections[kept._key(hosts[0], settings(keys))]
        connection.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        [again] = remote.run(hosts[:1], "true", settings(keys))
        assert again.ok and logins.count(TRUSTED[0]) == 2
        with remote.keep_connections() as inner:
            assert inner is kept, "a nested keep uses the outer one's connections"
    assert not kept._connections, "every kept connection closed at the end"
    remote.run(hosts[:1], "true", settings(keys))
    assert logins.count(TRUSTED[0]) == 3, "outside, each command logs in"


# A library caller of host_commands.replace_file, sending a file too large to arrive at once.
REPLACE_A_LARGE_FILE = """
import sys
from pathlib import Path
from igops import inventory
from igops.host_commands import replace_file

fleet = inventory.load_file(Path(sys.argv[1]))
replace_file(fleet, fleet.host("h1"), sys.argv[2], "x" * 200_000_000)
"""


def test_a_file_replaced_by_a_run_killed_mid_send_stays_as_it_was(servers, tmp_path):
    """SIGKILLed while it sends the new file: the host's end of the channel sees its input end,
    and the file stays as it was, with nothing left beside it. (Before, `cat` took that end for
    the file's, and an empty or half file was renamed into place.)"""
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    _, keys = servers
    config = tmp_path / "igops.toml"
    config.write_text(
        f'[fleet]\nstate_dir = "{tmp_path / "state"}"\n[ssh]\nport = {PORT}\nknown_hosts = "{keys.known_hosts}"\n'
        f'identity_file = "{keys.client_key}"\n[[hosts]]\nname = "h1"\naddress = "{TRUSTED[0]}"\nroles = ["app"]\n'
    )
    path = tmp_path / "databases.ini"
    path.write_text("[databases]\nmain = host=10.0.0.21\n")
    sender = subprocess.Popen([sys.executable, "-c", REPLACE_A_LARGE_FILE, str(config), str(path)], cwd=ROOT)
    try:

        def arriving() -> bool:
            return any(p.stat().st_size > 1_000_000 for p in tmp_path.glob("databases.ini.igops-*"))

        assert wait_for(arriving, 30, interval=0.01), "the new file never began to arrive"
    finally:
        sender.send_signal(signal.SIGKILL)
        sender.wait(10)
    assert wait_for(lambda: not list(tmp_path.glob("databases.ini.igops-*")), 10), "the partial file was left"
    assert path.read_text() == "[databases]\nmain = host=10.0.0.21\n"
