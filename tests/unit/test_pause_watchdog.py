"""The PgBouncer pause watchdog without a fleet: its arguments and protocol, the heartbeat
deadline on an injected clock, what psql's RESUME said, and what igops makes of its events. The
program itself runs once, with the host's real psql, against an admin console that is not there:
it must refuse to arm."""

import json
import socket
import subprocess

import pytest

from igops import agent, bouncer_watchdog
from igops.agent import pause_watchdog


def test_arguments_are_checked_before_anything_runs():
    assert pause_watchdog.parse_args(["15", "10.0.0.20", "6432", "pgbouncer", "main", "directory"]) == (
        15.0,
        "10.0.0.20",
        6432,
        "pgbouncer",
        ["main", "directory"],
    )
    for argv, why in [
        (["15", "10.0.0.20", "6432", "pgbouncer"], "usage"),
        (["soon", "a", "6432", "u", "main"], "bad deadline"),
        (["0", "a", "6432", "u", "main"], "outside"),
        (["-1", "a", "6432", "u", "main"], "outside"),
        (["15", "a", "70000", "u", "main"], "bad port"),
        (["15", "a", "x", "u", "main"], "bad port"),
        (["15", "a", "6432", "u", ""], "empty database"),
    ]:
        with pytest.raises(ValueError, match=why):
            pause_watchdog.parse_args(argv)


def test_the_password_comes_as_a_json_line_and_may_be_absent():
    assert pause_watchdog.parse_password(b'{"password": "s3cr\\"et\\n"}\n') == 's3cr"et\n'
    assert pause_watchdog.parse_password(b'{"password": null}\n') is None
    assert pause_watchdog.parse_password(b'{"password": ""}\n') is None
    assert pause_watchdog.parse_password(b"{}\n") is None
    for line in (b"hunter2\n", b"[1]\n", b'{"password": 5}\n', b""):
        with pytest.raises(ValueError):
            pause_watchdog.parse_password(line)


def test_only_beat_and_done_are_commands():
    assert pause_watchdog.parse_command(b"beat\n") == "beat"
    assert pause_watchdog.parse_command(b" done \r\n") == "done"
    for line in (b"resume\n", b"beatbeat\n", b"\n", b"DONE\n"):
        assert pause_watchdog.parse_command(line) is None


class Script:
    """igops' side on a fake clock: lines that arrive at given times; next_line advances the
    clock to the next arrival, or by the whole timeout when none comes within it."""

    def __init__(self, arrivals):
        self.now = 100.0
        self.arrivals = [(100.0 + at, line) for at, line in arrivals]
        self.waits = []

    def clock(self):
        return self.now

    def next_line(self, timeout):
        self.waits.append(round(timeout, 3))
        if self.arrivals and self.arrivals[0][0] <= self.now + timeout:
            at, line = self.arrivals.pop(0)
            self.now = max(self.now, at)
            return line
        self.now += timeout
        return None


def watch(arrivals, deadline=15.0):
    script = Script(arrivals)
    reported = []
    reason = pause_watchdog.watch(script.next_line, pause_watchdog.Heartbeat(deadline, script.clock), reported.append)
    return reason, script.now - 100.0, reported, script


def test_done_ends_the_watch_without_acting():
    reason, at, _, _ = watch([(1, b"beat\n"), (2, b"beat\n"), (2.5, b"done\n")])
    assert reason == "done" and at == pytest.approx(2.5)


def test_eof_is_igops_gone():
    reason, at, _, _ = watch([(1, b"beat\n"), (1.4, b"")])
    assert reason == "eof" and at == pytest.approx(1.4)


def test_the_deadline_counts_from_the_last_beat():
    reason, at, _, script = watch([(1, b"beat\n"), (10, b"beat\n")])
    assert reason == "deadline" and at == pytest.approx(25.0)
    assert script.waits[-1] == pytest.approx(15.0)  # it waits exactly what is left, not a poll interval


def test_beats_keep_it_waiting_however_long_the_operation():
    arrivals = [(second, b"beat\n") for second in range(1, 200)] + [(200.5, b"done\n")]
    reason, at, _, _ = watch(arrivals)
    assert reason == "done" and at == pytest.approx(200.5)


def test_a_line_that_is_not_a_command_is_reported_and_is_no_heartbeat():
    reason, at, reported, _ = watch([(1, b"beat\n"), (5, b"resume\n"), (10, b"hello\n")], deadline=15)
    assert reason == "deadline" and at == pytest.approx(16.0)
    assert reported == ["not a command: b'resume\\n'", "not a command: b'hello\\n'"]


def test_no_beat_at_all_trips_it_at_the_deadline():
    reason, at, _, _ = watch([], deadline=3)
    assert reason == "deadline" and at == pytest.approx(3.0)


def test_what_a_resume_said():
    assert pause_watchdog.resume_outcome(0, "") == "resumed"
    assert pause_watchdog.resume_outcome(3, "psql:<cmd>:1: ERROR:  database main is not paused\n") == "not paused"
    assert pause_watchdog.resume_outcome(
        2, 'psql: error: connection to server at "10.0.0.20", port 6432 failed:\n  Connection refused\n'
    ).endswith("failed: Connection refused")
    assert pause_watchdog.resume_outcome(1, "") == "psql exited 1"


def test_database_names_are_quoted_for_the_console():
    assert pause_watchdog.quote_identifier("main") == '"main"'
    assert pause_watchdog.quote_identifier('we"ird') == '"we""ird"'


def test_the_password_is_in_no_argv_and_only_in_psqls_environment(monkeypatch):
    console = pause_watchdog.Console("10.0.0.20", 6432, "pgbouncer", "s3cret-pw")
    seen = {}

    def run(argv, env, **kwargs):
        seen.update(argv=argv, env=env)
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(pause_watchdog.subprocess, "run", run)
    assert console.resume(["main"]) == {"main": "resumed"}
    assert not any("s3cret-pw" in word for word in seen["argv"])
    assert seen["argv"][-2:] == ["-c", 'RESUME "main"'] and "-w" in seen["argv"]
    assert seen["env"]["PGPASSWORD"] == "s3cret-pw"


def test_igops_reads_the_watchdogs_events():
    assert bouncer_watchdog.parse_event('{"event": "armed", "deadline_s": 15}') == {"event": "armed", "deadline_s": 15}
    for line in (None, "", "Traceback (most recent call last):", "[1]", '{"no": "event"}'):
        assert bouncer_watchdog.parse_event(line) == {}
    assert bouncer_watchdog.describe_release("pgb1", {"event": "released"}, True) == "pgb1 released"
    assert (
        bouncer_watchdog.describe_release("pgb1", {"event": "resumed", "reason": "deadline"}, True)
        == "pgb1 had RESUMEd already (deadline)"
    )
    assert bouncer_watchdog.describe_release("pgb1", {}, False) == "pgb1 left to RESUME from the host"
    assert bouncer_watchdog.describe_release("pgb1", {}, True) == "pgb1 did not confirm"


def test_the_program_refuses_to_arm_when_psql_cannot_reach_the_console():
    """The program as igops sends it, run by this machine's python3 and psql: nothing listens on
    the port, so it says why and exits 2 before it watches anything."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command, prefix = agent.invocation("pause_watchdog", ["15", "127.0.0.1", str(port), "pgbouncer", "main"])
    done = subprocess.run(
        ["sh", "-c", command],
        input=prefix + json.dumps({"password": "s3cret-pw"}).encode() + b"\n",
        capture_output=True,
        timeout=60,
    )
    event = json.loads(done.stdout.decode().splitlines()[-1])
    assert done.returncode == 2 and event["event"] == "error", done
    assert f"psql cannot read the admin console of 127.0.0.1:{port}" in event["message"]
    assert b"s3cret-pw" not in done.stdout + done.stderr


def test_a_bad_first_line_is_refused():
    command, prefix = agent.invocation("pause_watchdog", ["15", "127.0.0.1", "6432", "pgbouncer", "main"])
    done = subprocess.run(["sh", "-c", command], input=prefix + b"hunter2\n", capture_output=True, timeout=60)
    assert done.returncode == 2 and json.loads(done.stdout)["message"] == "the first line is not JSON"
    assert b"hunter2" not in done.stdout + done.stderr
