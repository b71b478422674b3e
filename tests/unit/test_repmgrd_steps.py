"""The repmgrd pause and unpause around Postgres operations: none where repmgrd does not run; where
it runs, the pause comes first and its unpause is both the last step and the release that runs
when any later step fails."""

from igops.failover import _repmgrd_steps


def test_no_repmgrd_no_steps():
    assert _repmgrd_steps([], "promote") == ([], [])


def test_the_pause_releases_with_the_final_unpause():
    [pause], [unpause] = _repmgrd_steps(["db1", "db2"], "promote a standby while db1 is stopped")
    assert pause.action == "pause_repmgrd" and pause.args == (("db1", "db2"),)
    assert pause.release is unpause
    assert unpause.action == "unpause_repmgrd" and unpause.args == (("db1", "db2"),)
    assert "db1, db2" in pause.title and "cannot promote a standby while db1 is stopped" in pause.title
