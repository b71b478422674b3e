"""Whether the process a record names still runs, judged from here (igops.process_identity),
against real processes: children of the test, some killed, and the test itself."""

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from igops import process_identity, safety
from igops.process_identity import Verdict

pytestmark = pytest.mark.skipif(process_identity.pid_namespace() is None, reason="needs this namespace's /proc")


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "60"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def record_of(pid: int) -> dict[str, object]:
    """What a holder running as `pid` on this machine records about itself."""
    return {
        "host": safety.operator_host(),
        "pid": pid,
        "boot_id": process_identity.boot_id(),
        "pid_namespace": process_identity.pid_namespace(),
        "process_start": process_identity.process_start(pid),
    }


def test_this_process_is_running_by_its_own_record():
    record = {"host": safety.operator_host(), "pid": os.getpid(), **process_identity.own()}
    assert None not in record.values()
    assert process_identity.judge(record) is Verdict.RUNNING


def test_a_live_process_of_ours_is_running(child):
    assert process_identity.judge(record_of(child.pid)) is Verdict.RUNNING


def test_a_process_that_exited_is_gone(child):
    record = record_of(child.pid)
    child.kill()
    child.wait()
    assert process_identity.judge(record) is Verdict.GONE


def test_a_pid_now_held_by_a_process_that_started_at_another_time_is_gone(child):
    """The pid names a process that runs, but not the one the record was written by: the holder
    died and its pid was given to another (after a reboot, or once pids wrapped)."""
    record = {**record_of(child.pid), "process_start": process_identity.process_start(child.pid) - 1}
    assert process_identity.judge(record) is Verdict.GONE


@pytest.mark.parametrize(
    "change",
    [
        {"pid_namespace": 1},  # a container of this host with a PID namespace of its own
        {"boot_id": "00000000-0000-0000-0000-000000000000"},  # an earlier boot
        {"host": "another-bastion"},
    ],
)
def test_a_record_from_another_pid_namespace_boot_or_host_cannot_be_judged(child, change):
    """Its pid means nothing here, whether or not a process here has it: the child's pid, alive,
    and the same pid once the child has exited."""
    record = {**record_of(child.pid), **change}
    assert process_identity.judge(record) is Verdict.UNKNOWN
    child.kill()
    child.wait()
    assert process_identity.judge(record) is Verdict.UNKNOWN


def test_a_record_without_the_identity_cannot_be_judged(child):
    """An older igops recorded only its host and pid: it is never judged gone, alive or not."""
    record = {"host": safety.operator_host(), "pid": child.pid}
    assert process_identity.judge(record) is Verdict.UNKNOWN
    child.kill()
    child.wait()
    assert process_identity.judge(record) is Verdict.UNKNOWN
    assert process_identity.judge({**record_of(os.getpid()), "process_start": None}) is Verdict.UNKNOWN


def test_a_killed_process_its_parent_has_not_reaped_holds_nothing(child):
    """A zombie still takes a signal, so kill(pid, 0) alone took an igops killed under a parent
    that reaps late for one still running: its lease and its run were held for it."""
    record = record_of(child.pid)
    assert process_identity.process_alive(child.pid)
    os.kill(child.pid, signal.SIGKILL)
    stat = Path(f"/proc/{child.pid}/stat")
    while stat.read_text().rsplit(") ", 1)[1].split()[0] != "Z":
        pass
    assert not process_identity.process_alive(child.pid)
    assert process_identity.judge(record) is Verdict.GONE
    child.wait()
    assert not process_identity.process_alive(child.pid)
    assert not process_identity.process_alive(0)
