"""Switchover, failover and rejoin with repmgrd running on every node, as most repmgr fleets run it.

repmgrd promotes a standby on its own when it loses the primary. A planned switchover stops the
primary cleanly, which looks the same to it, so igops pauses repmgrd on every member first and
unpauses it afterwards; and when repmgrd has promoted a standby after a real crash, `pg failover`
finishes that failover instead of promoting another. The same scenarios with repmgrd off are in
test_failover.py."""

import time
from pathlib import Path

import pytest

from tests.labtools import postgres, wait_for
from tests.reliability.test_failover import (
    HOME_PRIMARY,
    OTHER_PRIMARY,
    Load,
    describe,
    igops,
    kill_postgres,
    lab_up,
    node_of,
    pg_state,
    restore_home,
    sign_up_succeeds,
)

pytestmark = pytest.mark.lab


def _lab_up(repmgrd: bool) -> None:
    from igops import lab as lab_module
    from igops.output import Reporter

    lab_module.up(Reporter(), repmgrd=repmgrd)


@pytest.fixture
def repmgrd_running(lab):
    restore_home(lab)
    _lab_up(repmgrd=True)
    try:
        yield lab
    finally:
        _lab_up(repmgrd=False)
        restore_home(lab)


def repmgrd_states(lab, cluster="main") -> dict[str, str]:
    return {node["name"]: node["repmgrd"] for node in pg_state(lab, cluster)["nodes"]}


def test_switchovers_under_load_pause_repmgrd_and_leave_it_running(repmgrd_running, tmp_path):
    lab = repmgrd_running
    assert set(repmgrd_states(lab).values()) == {"running"}
    with Load(lab, tmp_path) as load:
        for target in (OTHER_PRIMARY, HOME_PRIMARY):  # one round trip: each member promoted once
            result, envelope = igops(lab, "pg", "switchover", "main", "--to", target, "--yes")
            switched = time.monotonic()
            assert result.returncode == 0, result.stderr[-3000:]
            steps = envelope["data"]["plan"]["steps"]
            assert steps[0].startswith("repmgrd: pause") and steps[-1].startswith("repmgrd: unpause")
            assert envelope["data"]["after"]["primary"] == target
            # Unpaused everywhere, and repmgrd promoted nothing on its own: one primary, the target.
            assert set(repmgrd_states(lab).values()) == {"running"}
            time.sleep(0.5)
        assert load.running
    verified = load.verify()
    print(f"\nswitchovers with repmgrd: {describe(load.report, verified)}")
    assert load.report["errors"] == 0 and load.report["write_errors"] == 0
    assert verified.ok, verified.missing_writes[:5]
    # Long after: still one primary, the one igops made. 8 s after the last switchover ended (and
    # unpaused repmgrd): as long as repmgrd takes to promote on its own, reconnect_attempts x
    # reconnect_interval (6 s) plus a monitoring interval (2 s). The load's end and its
    # verification used some of them.
    time.sleep(max(0.0, switched + 8 - time.monotonic()))
    main = pg_state(lab)
    assert main["primary"] == HOME_PRIMARY and not main["problems"], main["problems"]


def test_pg_failover_finishes_what_repmgrd_began(repmgrd_running):
    lab = repmgrd_running
    kill_postgres(lab, HOME_PRIMARY)

    def promoted() -> bool:
        try:
            connection = postgres(lab, OTHER_PRIMARY)
        except Exception:  # noqa: BLE001 - restarting
            return False
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_is_in_recovery()")
                return not cursor.fetchone()[0]
        finally:
            connection.close()

    # reconnect_attempts x reconnect_interval (6 s) plus a monitoring interval, then the promotion
    assert wait_for(promoted, 40, interval=0.5), "repmgrd did not promote db2"
    before = pg_state(lab)
    assert before["primary"] == OTHER_PRIMARY
    assert set(before["pgbouncer"]["pgb1"].values()) == {HOME_PRIMARY}

    result, envelope = igops(lab, "pg", "failover", "main", "--yes")
    assert result.returncode == 0, result.stderr[-3000:]
    plan = envelope["data"]["plan"]
    assert plan["title"].startswith("Finish the failover of main: db2 was promoted already"), plan["title"]
    assert not any("promote" in step for step in plan["steps"]), plan["steps"]
    assert any(step.startswith(f"{HOME_PRIMARY}: fence") for step in plan["steps"])
    main = pg_state(lab)
    assert main["primary"] == OTHER_PRIMARY
    assert set(main["pgbouncer"]["pgb1"].values()) == {OTHER_PRIMARY}
    assert wait_for(lambda: sign_up_succeeds(lab), 10, interval=0.2)
    pgdata = Path(lab.path_for(lab.model.postgres.data_directory, lab.host(HOME_PRIMARY)))
    assert (pgdata / "standby.signal").exists(), "the old primary was not fenced"

    lab_up()  # the old primary comes back read-only (fenced); repmgrd is still on
    assert node_of(pg_state(lab), HOME_PRIMARY)["role"] == "standby"
    result, envelope = igops(lab, "pg", "rejoin", HOME_PRIMARY, "--yes")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = envelope["data"]["plan"]["steps"]
    assert steps[0].startswith("repmgrd: pause") and steps[-1].startswith("repmgrd: unpause"), steps
    after = pg_state(lab)
    assert node_of(after, HOME_PRIMARY)["streaming_from"] == OTHER_PRIMARY
    assert set(repmgrd_states(lab).values()) == {"running"}
    assert not after["problems"], after["problems"]
