"""The PgBouncer pause watchdog in the lab, under the app's write load: a `pg switchover` stopped
(SIGSTOP: no heartbeat, its SSH sessions still open) or killed (SIGKILL: sessions drop) while
PgBouncer holds main's databases PAUSED. The watchdog on pgb1 RESUMEs them: after the heartbeat
deadline, or at once when its session drops. Throughout, never do two members accept writes;
a rerun of the switchover finishes the job, and the ledger shows no acknowledged write lost."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT
from tests.labtools import postgres, wait_for
from tests.reliability.test_failover import (
    HOME_PRIMARY,
    IN_FLIGHT_RATE,
    OTHER_PRIMARY,
    Load,
    assert_one_primary_routed_and_followed,
    at_home,
    describe,
    igops,
    paused_databases,
    sign_up_succeeds,
)

pytestmark = pytest.mark.lab
__all__ = ["at_home"]  # the fixture, imported for pytest to find

# The fence step begins once the PAUSE has completed: from here on, writes wait.
PAUSED_MARKER = "fence it with standby.signal"
MARGIN_S = 2.0
# The drilled switchovers' watchdog deadline (the lab's is 15 s), so that the stopped one is waited
# out sooner. It keeps the two cases as far apart: a missed heartbeat RESUMEs no sooner than
# deadline - 1 s after the stop or kill, the EOF of a kill within deadline - 2 s (here 3 s).
WATCHDOG_DEADLINE_S = 5


class WritableMembers:
    """Asks db1 and db2, every 100 ms for as long as the test acts, whether they accept writes;
    keeps each moment at which both did."""

    def __init__(self, lab):
        self.lab = lab
        self.both: list[float] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _writable(self, node: str) -> bool:
        try:
            connection = postgres(self.lab, node)
        except Exception:  # noqa: BLE001 - down, stopping or starting: not writable
            return False
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT NOT pg_is_in_recovery()")
                return cursor.fetchone()[0]
        except Exception:  # noqa: BLE001
            return False
        finally:
            connection.close()

    def _watch(self):
        while not self._stop.wait(0.1):
            if all(self._writable(node) for node in (HOME_PRIMARY, OTHER_PRIMARY)):
                self.both.append(time.time())
            self.samples += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(timeout=30)


def switchover_until_paused(lab, target: str) -> subprocess.Popen:
    """`pg switchover main --to target`, running, once it has paused PgBouncer."""
    process = subprocess.Popen(
        [sys.executable, "-m", "igops", "-c", str(lab.source), "pg", "switchover", "main", "--to", target, "--yes"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    printed = []
    for line in process.stderr:
        printed.append(line)
        if PAUSED_MARKER in line and line.lstrip().startswith("["):
            return process
    process.kill()
    process.wait(timeout=30)
    raise AssertionError("the switchover never reached its fence step:\n" + "".join(printed)[-3000:])


def rerun_to(lab, target: str) -> None:
    result, envelope = igops(lab, "pg", "switchover", "main", "--to", target, "--yes")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_one_primary_routed_and_followed(lab, target)
    assert sign_up_succeeds(lab)


def test_the_watchdog_resumes_pgbouncer_when_igops_stops_beating_or_dies(at_home, tmp_path):
    from igops import inventory

    lab = at_home
    text = lab.source.read_text()
    assert text.count("\n[pgbouncer]\n") == 1, "the lab's [pgbouncer] section"
    config = tmp_path / "igops.toml"
    config.write_text(text.replace("\n[pgbouncer]\n", f"\n[pgbouncer]\nwatchdog_deadline = {WATCHDOG_DEADLINE_S}\n"))
    drilled = inventory.load_file(config)
    deadline = drilled.model.pgbouncer.watchdog_deadline
    with WritableMembers(lab) as writable, Load(lab, tmp_path, rate=IN_FLIGHT_RATE) as load:
        # Stopped: its sessions stay open, so only the missing heartbeat can trip the watchdog.
        process = switchover_until_paused(drilled, OTHER_PRIMARY)
        process.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            assert paused_databases(lab) == ["directory", "main"]
            assert wait_for(lambda: not paused_databases(lab), deadline + MARGIN_S, interval=0.1) is True
            resumed_after_stop = time.monotonic() - stopped_at
            # The last heartbeat left at most a second before the stop.
            assert deadline - 1 - 0.5 <= resumed_after_stop <= deadline + MARGIN_S, resumed_after_stop
        finally:
            process.kill()  # SIGKILL ends a stopped process too
            process.wait(timeout=30)
        rerun_to(lab, OTHER_PRIMARY)

        # Killed: its SSH sessions drop, stdin reaches EOF, and the watchdog acts at once.
        process = switchover_until_paused(drilled, HOME_PRIMARY)
        process.kill()
        killed_at = time.monotonic()
        process.wait(timeout=30)
        assert wait_for(lambda: not paused_databases(lab), deadline + MARGIN_S, interval=0.1) is True
        resumed_after_kill = time.monotonic() - killed_at
        # Its session's EOF did it: the heartbeat deadline cannot pass before deadline - 1 s.
        assert resumed_after_kill < deadline - 2, resumed_after_kill
        rerun_to(lab, HOME_PRIMARY)
        assert load.running
    verified = load.verify()
    print(
        f"\npause watchdog: resumed {resumed_after_stop:.1f} s after igops stopped (deadline {deadline:g} s), "
        f"{resumed_after_kill:.2f} s after it was killed; {writable.samples} role samples; "
        f"load: {describe(load.report, verified)}"
    )
    assert writable.samples > 50
    assert not writable.both, f"two writable members at {writable.both[:3]}"
    assert verified.ok, verified.missing_writes[:5]
