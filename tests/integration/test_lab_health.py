"""`lab up` as the command that brings the lab to health: a closing check that writes through
PgBouncer."""

import pytest

from igops.lab import state
from igops.lab.credentials import load as load_credentials

pytestmark = pytest.mark.lab


def _admin(lab):
    from igops.lab import pooler

    return pooler.admin(load_credentials(state.paths()))


def test_the_closing_check_fails_naming_a_cluster_whose_pgbouncer_routes_to_a_standby(lab):
    from igops import lab as lab_module
    from igops.lab.proc import LabError
    from igops.postgres import repoint_databases

    paths = state.paths()
    cluster = "main"
    standby = lab.host(lab.model.postgres.clusters[cluster].standbys[0])
    databases_file = paths.databases_file()
    original = databases_file.read_text()
    try:
        databases_file.write_text(repoint_databases(original, {cluster}, str(standby.address), state.POSTGRES_PORT))
        with _admin(lab) as cursor:
            cursor.execute("RELOAD")
        with pytest.raises(LabError) as failure:
            lab_module.verify(lab, paths, load_credentials(paths), patience=0)
        message = failure.value.message
        assert f"cluster {cluster}: a write failed" in message, message
        assert "read-only transaction" in message, message
        assert "cluster pg2: a write failed" not in message, message
    finally:
        databases_file.write_text(original)
        with _admin(lab) as cursor:
            cursor.execute("RELOAD")
    lab_module.verify(lab, paths, load_credentials(paths), patience=0)
