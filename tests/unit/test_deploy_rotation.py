"""min_in_service across operations, on the engine's local backend: deploys lease only their own
app servers, so two to different servers run at once; each batch leaves rotation under a
rotation lease, and the check before it counts the servers other operations hold out. And the
load balancers' upstream file, changed by two of them at once, loses neither change."""

import threading

import pytest

from igops import deploy, deploy_rollout
from igops.agent import upstream
from igops.coordination import LocalCoordinator
from igops.errors import ExitCode
from igops.operations import conflicts, engine, rotation
from igops.operations.engine import OperationSpec
from igops.output import Reporter
from tests.unit.test_deploy_rollout import app_fleet


def spec(hosts, title="deploy test"):
    return OperationSpec("deploy", title, hosts, [conflicts.app_server(name) for name in hosts], ["roll"])


def rollout_plan(app, hosts, minimum):
    gate = deploy.HealthGate("/health", 8000, 3, 30)
    servers = [app.server(host) for host in app.hosts]
    plans = [deploy.HostPlan(name, "roll", "R1", True, before="R1") for name in hosts]
    return deploy.RolloutPlan(
        "deploy",
        "d",
        "unit",
        "R2",
        "x",
        plans,
        [[name] for name in hosts],
        "1",
        0,
        gate,
        ["lb1"],
        1,
        5,
        False,
        in_service={"lb1": servers},
        min_in_service=minimum,
        min_in_service_spec=str(minimum),
    )


def test_deploys_to_different_app_servers_run_at_once_and_to_the_same_one_do_not(tmp_path):
    fleet = app_fleet(tmp_path).fleet

    def second(hosts):
        return engine.perform(fleet, spec(hosts, "second"), lambda operation: "ran", Reporter())

    assert engine.perform(fleet, spec(["app1", "app2"]), lambda operation: second(["app3", "app4"])) == "ran"
    with pytest.raises(engine.coordination.Conflict) as refused:
        engine.perform(fleet, spec(["app1", "app2"]), lambda operation: second(["app2"]))
    assert refused.value.exit_code == ExitCode.LOCKED and "app app2 is held by deploy" in refused.value.message


def test_a_batch_is_checked_against_the_servers_other_operations_hold_out(tmp_path, monkeypatch):
    """Another deploy holds app1 out of rotation: this one may take app2 out while two serve,
    and not when the minimum is three; the refusal names the other operation."""
    app = app_fleet(tmp_path)
    monkeypatch.setattr(deploy_rollout.Rollout, "_read_lbs", lambda rollout: None)
    changes = []
    monkeypatch.setattr(deploy_rollout.Rollout, "_lb_change", lambda rollout, down=(), up=(): changes.append(down))

    outer = []

    def other(operation):
        outer.append(operation.id)
        leases = rotation.RotationLeases(operation)
        assert leases.take(["app1"], lambda others: None) is None
        return engine.perform(app.fleet, spec(["app2"], "this"), this, Reporter())

    def this(operation):
        leases = rotation.RotationLeases(operation)
        others = leases.others_out()
        assert list(others) == ["app1"] and others["app1"].startswith(f"deploy {outer[0]} by ")
        two = deploy_rollout.Rollout(app, rollout_plan(app, ["app2"], 2), operation.reporter, b"")
        assert two._take_out(["app2"], []) is None, "app3 and app4 still serve"
        assert two.rotation.held == ["app2"] and changes == [["app2"]]
        two.rotation.release_all()
        three = deploy_rollout.Rollout(app, rollout_plan(app, ["app2"], 3), operation.reporter, b"")
        return three._take_out(["app2"], [])

    refusal = engine.perform(app.fleet, spec(["app1"], "other"), other, Reporter())
    assert refusal.startswith("taking app2 out would leave 2 app servers in service in nginx on lb1")
    assert "fewer than the minimum of 3; out for other operations: app1 (out for deploy" in refusal


def test_rotation_leases_are_seen_while_held_and_gone_once_released(tmp_path):
    fleet = app_fleet(tmp_path).fleet
    backend = LocalCoordinator(fleet.state_dir)

    def action(operation):
        leases = rotation.RotationLeases(operation)
        leases.take(["app3", "app1"], lambda others: None)
        held = sorted(name for (_, name), _ in backend.holders(rotation.ROTATION))
        leases.release(["app1"])
        after = sorted(name for (_, name), _ in backend.holders(rotation.ROTATION))
        assert leases.others_out() == {}, "its own leases are not another's"
        return held, after

    held, after = engine.perform(fleet, spec(["app1", "app3"]), action, Reporter())
    assert (held, after) == (["app1", "app3"], ["app3"])
    assert backend.holders(rotation.ROTATION) == [], "the operation's end releases the rest"


def test_without_an_operation_no_other_is_known_and_nothing_is_leased():
    leases = rotation.of(Reporter())
    assert leases.others_out() == {} and leases.take(["app1"], lambda others: None) is None and leases.held == []
    assert leases.take(["app1"], lambda others: "too few") == "too few"


def test_two_runs_changing_the_upstream_file_at_once_lose_neither_change(tmp_path, monkeypatch):
    """Each reads, rewrites, tests (0.3 s here) and reloads under the file's lock: without it the
    second to write would put back the first one's server. (The reload's wait for nginx's
    workers is left out: there is no nginx here to reload.)"""
    monkeypatch.setattr(upstream, "reload_and_wait", lambda command, seconds: (0.0, []))
    path = tmp_path / "upstream.conf"
    path.write_text("upstream app {\n    server 10.0.0.1:8000;\n    server 10.0.0.2:8000;\n}\n")
    errors = []

    def change(server):
        try:
            upstream.handle(str(path), "sleep 0.3", "true", 1.0, {"down": [server], "up": [], "note": "test"})
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=change, args=(server,)) for server in ("10.0.0.1:8000", "10.0.0.2:8000")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    text = path.read_text()
    assert "10.0.0.1:8000 down;" in text and "10.0.0.2:8000 down;" in text, text


def test_a_run_limited_to_some_hosts_keeps_its_own_record_and_a_rerun_finds_it(tmp_path):
    """Two deploys to different servers at once do not overwrite each other's record of the
    releases their hosts return to."""
    from igops import deploy_record

    app = app_fleet(tmp_path)
    whole = rollout_plan(app, ["app1", "app2", "app3", "app4"], 1)
    part = rollout_plan(app, ["app1", "app2"], 1)
    part.hosts += [deploy.HostPlan(name, deploy.OUTSIDE, "R1") for name in ("app3", "app4")]
    deploy_record.LastRunRecord(app.fleet, whole).update()
    deploy_record.LastRunRecord(app.fleet, part).update(status="running", pid=2**22 + 1)
    paths = sorted(path.name for path in (app.fleet.state_dir / "deploy").iterdir())
    assert paths[0] == "unit.hosts-" + paths[0].split("-", 1)[1] and paths[1] == "unit.json"
    runs = deploy_record.read_last_runs(app.fleet)
    [gone] = [run for run in runs if run["pid"] == 2**22 + 1]
    assert len(runs) == 2 and gone["interrupted"], "the --hosts run's process is gone"
    hosts = [deploy.HostPlan("app1", "roll", "R2", before="R2")]
    surveys = {"app1": deploy.HostReleases("app1", "a", "/r", True, current="R2", releases=[{"id": "R1"}])}
    deploy_record.inherit_releases_before(hosts, surveys, runs)
    assert hosts[0].before == "R1"
