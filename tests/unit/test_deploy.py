"""Deploy planning without a fleet: batch sizes, release building and ids, host plans and
failure thresholds, result exit codes, and the nginx upstream rewriting the drain relies on."""

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from igops import deploy, deploy_agents, deploy_plan, deploy_record, deploy_rollout, inventory, process_identity, safety
from igops.agent import upstream
from igops.errors import ExitCode, RefusedError, UsageError
from igops.lab import services
from igops.output import Reporter
from tests.conftest import ROOT, run_igops
from tests.unit.in_process import UNSHARE, unshare_works
from tests.unit.inventories import unit_inventory

APP = Path(__file__).resolve().parents[2] / "app"


# --- batches ---------------------------------------------------------------------------------


def test_batches_like_ansible_serial_with_the_last_size_repeating():
    sizes = deploy.parse_batches("1,25%")
    assert [str(size) for size in sizes] == ["1", "25%"]
    hosts = [f"app{i}" for i in range(1, 11)]
    assert [len(batch) for batch in deploy.split_batches(hosts, sizes)] == [1, 2, 2, 2, 2, 1]
    assert deploy.split_batches(hosts, sizes)[0] == ["app1"]
    assert deploy.split_batches(["a", "b", "c"], sizes) == [["a"], ["b"], ["c"]]


def test_percentages_round_down_but_never_to_zero():
    assert deploy.split_batches(["a", "b", "c"], deploy.parse_batches("50%")) == [["a"], ["b"], ["c"]]
    assert deploy.split_batches(list("abcde"), deploy.parse_batches("100%")) == [list("abcde")]
    assert deploy.split_batches(list("abcde"), deploy.parse_batches("2")) == [["a", "b"], ["c", "d"], ["e"]]
    assert deploy.split_batches([], deploy.parse_batches("1")) == []


@pytest.mark.parametrize("spec", ["", "0", "0%", "101%", "-1", "a", "1,,2", "25 %x"])
def test_bad_batch_sizes_are_usage_errors(spec):
    with pytest.raises(UsageError, match="batch"):
        deploy.parse_batches(spec)


# --- releases --------------------------------------------------------------------------------


def test_release_ids_sort_by_time_and_carry_the_tag():
    early = deploy.release_id(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "abc1234")
    later = deploy.release_id(datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC), "0000000")
    assert early == "20260102030405-abc1234"
    assert sorted([later, early]) == [early, later]
    # The lab's first release (a bare timestamp) sorts with them.
    assert sorted([later, "20260102030405", early]) == ["20260102030405", early, later]


def test_content_hash_matches_the_labs_so_its_first_release_counts_as_a_release():
    tree = deploy.read_source(APP, None)
    assert deploy.content_hash(tree.files) == services._source_digest(APP)


def test_release_tarball_holds_the_manifest_and_app_and_nothing_built(tmp_path):
    source = tmp_path / "app"
    (source / "pkg" / "__pycache__").mkdir(parents=True)
    (source / "pkg" / "mod.py").write_text("X = 1\n")
    (source / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    (source / "requirements.txt").write_text("Django>=4.2\n")
    (source / "run.sh").write_text("#!/bin/sh\n")
    (source / "run.sh").chmod(0o755)
    tree = deploy.read_source(source, None)
    release, tarball = deploy.package(tree, "20260102030405-abc1234")
    assert release.size == len(tarball)
    with tarfile.open(fileobj=io.BytesIO(tarball)) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("RELEASE.json"))
        modes = {member.name: member.mode for member in tar.getmembers()}
    assert sorted(names) == ["RELEASE.json", "app/pkg/mod.py", "app/requirements.txt", "app/run.sh"]
    assert modes["app/run.sh"] == 0o755 and modes["app/pkg/mod.py"] == 0o644
    assert manifest["id"] == release.id and manifest["content"] == release.content
    assert manifest["requirements"] == deploy.requirements_hash(b"Django>=4.2\n")
    again, _ = deploy.package(deploy.read_source(source, None), "20260102030406-abc1234")
    assert again.content == release.content


def test_symlinks_in_the_source_are_refused(tmp_path):
    source = tmp_path / "app"
    source.mkdir()
    (source / "a.py").write_text("")
    (source / "link.py").symlink_to(source / "a.py")
    with pytest.raises(UsageError, match="regular file"):
        deploy.read_source(source, None)


def test_a_git_revision_builds_what_was_committed_not_the_working_tree(tmp_path):
    repo = tmp_path / "repo"
    (repo / "app").mkdir(parents=True)
    (repo / "app" / "views.py").write_text("VERSION = 1\n")
    git = ["git", "-C", str(repo), "-c", "user.email=t@example.invalid", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "app"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    (repo / "app" / "views.py").write_text("VERSION = 2\n")
    tree = deploy.read_source(repo / "app", "HEAD")
    assert tree.files == {"views.py": (False, b"VERSION = 1\n")}
    assert tree.revision == commit
    assert deploy.read_source(repo / "app", None).files["views.py"][1] == b"VERSION = 2\n"
    with pytest.raises(UsageError, match="git"):
        deploy.read_source(repo / "app", "no-such-revision")


def test_an_unknown_revision_is_said_once_in_igops_words_with_a_hint(tmp_path):
    """Not git's "fatal: Needed a single revision" with no hint, twice (step line and error)."""
    repo = tmp_path / "repo"
    (repo / "app").mkdir(parents=True)
    (repo / "app" / "views.py").write_text("VERSION = 1\n")
    git = ["git", "-C", str(repo), "-c", "user.email=t@example.invalid", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "app"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    subprocess.run([*git, "tag", "v1.4.2"], check=True)
    config = unit_inventory(tmp_path, [("app1", "127.0.20.250", "app")])
    result = run_igops("-c", str(config), "deploy", "v9.9.9", "--source", str(repo / "app"), "--json")
    assert result.returncode == 2
    error = json.loads(result.stdout)["error"]
    assert error["message"] == f"unknown git revision 'v9.9.9' in {repo}"
    assert "give a commit, tag or branch" in error["hint"]
    assert "fatal" not in result.stderr and result.stderr.count("unknown git revision") == 1
    close = run_igops("-c", str(config), "deploy", "v1.4.3", "--source", str(repo / "app"))
    assert "did you mean 'v1.4.2'?" in close.stderr


# --- host plans and thresholds ---------------------------------------------------------------


def app_fleet(tmp_path, count=3):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    hosts = "".join(
        f'[[hosts]]\nname = "app{i}"\naddress = "127.0.20.{i}"\nroles = ["app"]\n' for i in range(1, count + 1)
    )
    text = f"""[fleet]
name = "unit"
state_dir = "{tmp_path / "state"}"
[ssh]
known_hosts = "{known_hosts}"
[app]
root = "/srv/{{host}}/app"
{hosts}[[hosts]]
name = "lb1"
address = "127.0.20.100"
roles = ["lb"]
"""
    fleet = inventory.validate(tomllib.loads(text), tmp_path / "igops.toml")
    return deploy.AppFleet.of(fleet)


def test_a_deploy_raises_the_open_file_limit_for_a_session_on_every_host(tmp_path, monkeypatch):
    """A session stays open on every app server and load balancer for the whole run: a thousand
    hosts are past the soft limit most processes start with (1024)."""
    import resource

    limits = [(1024, 524288)]
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits[-1])
    monkeypatch.setattr(resource, "setrlimit", lambda which, new: limits.append(new))
    app_fleet(tmp_path, 1)
    assert limits == [(1024, 524288)]  # one app server and a load balancer: left alone
    hosts = [(f"app{i}", f"127.0.{20 + i // 200}.{1 + i % 200}", "app") for i in range(1000)]
    (tmp_path / "wide").mkdir()
    fleet = inventory.load_file(unit_inventory(tmp_path / "wide", [*hosts, ("lb1", "127.0.30.1", "lb")]))
    app = deploy.AppFleet.of(fleet)
    assert len(app.hosts) == 1000
    assert limits[-1][0] >= 1001 + deploy_agents.HEALTH_PROBES_AT_ONCE and limits[-1][1] == 524288


def survey(app, current, unreachable=(), releases=None):
    found = {}
    for host in app.hosts:
        if host.name in unreachable:
            found[host.name] = deploy.HostReleases(
                host.name, str(host.address), app.root(host), False, "connection refused by 127.0.20.3:22"
            )
        else:
            ids = releases or [current]
            found[host.name] = deploy.HostReleases(
                host.name, str(host.address), app.root(host), True, current=current, releases=[{"id": i} for i in ids]
            )
    return found


def lb_state(app, down_by_igops=(), down_by_others=(), note="deploy x"):
    servers = []
    for host in app.hosts:
        server = app.server(host)
        servers.append(
            deploy.LbServer(
                "lb1",
                server,
                host.name in (*down_by_igops, *down_by_others),
                host.name in down_by_igops,
                note if host.name in down_by_igops else None,
            )
        )
    return deploy.LbState(servers)


def test_plan_rolls_hosts_not_on_the_release_and_those_an_earlier_run_left_drained(tmp_path):
    app = app_fleet(tmp_path)
    surveys = survey(app, "R1", releases=["R1", "R2"])
    surveys["app1"].current = "R2"
    surveys["app2"].current = "R2"
    plans = deploy_plan.host_plans(app, surveys, lb_state(app, down_by_igops=["app2"]), "R2", max_fail=0)
    assert [(p.host, p.action, p.in_lb) for p in plans] == [
        ("app1", deploy.ALREADY, True),
        ("app2", "roll", False),
        ("app3", "roll", True),
    ]
    assert not plans[1].upload, "R2 is already staged there"


def test_plan_leaves_alone_a_host_someone_else_drained(tmp_path):
    app = app_fleet(tmp_path)
    plans = deploy_plan.host_plans(app, survey(app, "R1"), lb_state(app, down_by_others=["app3"]), "R2", max_fail=0)
    assert plans[2].action == deploy.SKIPPED and "someone else" in plans[2].detail
    assert plans[0].upload


def test_unreachable_hosts_beyond_max_fail_refuse_before_anything_changes(tmp_path):
    app = app_fleet(tmp_path)
    with pytest.raises(RefusedError, match="app3 .*refused.*nothing was changed"):
        deploy_plan.host_plans(app, survey(app, "R1", unreachable=["app3"]), lb_state(app), "R2", max_fail=0)
    plans = deploy_plan.host_plans(app, survey(app, "R1", unreachable=["app3"]), lb_state(app), "R2", max_fail=1)
    assert [p.action for p in plans] == ["roll", "roll", deploy.FAILED]


def test_servers_left_in_service_count_each_batch_against_those_back_from_earlier_ones():
    assert deploy_plan.servers_left_in_service({"a", "b", "c"}, [["a"], ["b", "c"]]) == [(1, 2), (2, 1)]
    assert deploy_plan.servers_left_in_service({"a", "b", "c"}, [["a", "b", "c"]]) == [(1, 0)]
    # A batch of servers already out of service takes nothing away; once back, they count.
    assert deploy_plan.servers_left_in_service({"c"}, [["a", "b"], ["c"]]) == [(2, 2)]


def plan_batches(app, surveys, lb, batch, minimum=1):
    hosts = deploy_plan.host_plans(app, surveys, lb, "R2", max_fail=1)
    batches = deploy.split_batches([h.host for h in hosts if h.action == "roll"], deploy.parse_batches(batch))
    deploy_plan.refuse_draining_below_minimum(app, hosts, batches, lb, minimum)
    return batches


def test_a_batch_of_every_server_is_refused(tmp_path):
    app = app_fleet(tmp_path)
    with pytest.raises(
        RefusedError,
        match=r"batch 1 \(app1, app2, app3\) would leave 0 app servers in service"
        r" in nginx on lb1, fewer than the minimum of 1",
    ) as refused:
        plan_batches(app, survey(app, "R1"), lb_state(app), "100%")
    assert "smaller batches" in refused.value.hint
    assert plan_batches(app, survey(app, "R1"), lb_state(app), "1,25%") == [["app1"], ["app2"], ["app3"]]


def test_a_batch_holding_the_only_server_in_rotation_is_refused(tmp_path):
    app = app_fleet(tmp_path)
    # app1 drained by an operator (skipped), app2 unreachable: app3 alone serves.
    with pytest.raises(RefusedError, match=r"batch 1 \(app3\) would leave 0"):
        plan_batches(app, survey(app, "R1", unreachable=["app2"]), lb_state(app, down_by_others=["app1"]), "1")
    # The refusal says why each server that is out is out.
    with pytest.raises(RefusedError, match=r"out of service now: app1 \(drained by igops \(deploy D1 to R2\)\)"):
        plan_batches(app, survey(app, "R1"), lb_state(app, down_by_igops=["app1"], note="deploy D1 to R2"), "1,2", 2)
    with pytest.raises(RefusedError, match=r"out of service now: app1 \(drained \(by someone else\)\), app2 \(did"):
        plan_batches(app, survey(app, "R1", unreachable=["app2"]), lb_state(app, down_by_others=["app1"]), "1")
    # Two servers drained by an earlier run come back after their batch: the last one may go.
    assert plan_batches(app, survey(app, "R1"), lb_state(app, down_by_igops=["app1", "app2"]), "2") == [
        ["app1", "app2"],
        ["app3"],
    ]
    # Every server already out: rolling them takes nothing away.
    assert plan_batches(app, survey(app, "R1"), lb_state(app, down_by_igops=["app1", "app2", "app3"]), "100%")


def test_a_fleet_without_a_load_balancer_has_no_minimum_to_keep(tmp_path):
    app = app_fleet(tmp_path)
    hosts = [deploy.HostPlan(f"app{i}", "roll", "R1") for i in (1, 2, 3)]
    deploy_plan.refuse_draining_below_minimum(app, hosts, [["app1", "app2", "app3"]], deploy.LbState())


def test_a_run_stops_before_a_batch_that_would_drain_the_last_server_left_by_earlier_failures(tmp_path):
    app = app_fleet(tmp_path)
    gate = deploy.HealthGate("/health", 8000, 3, 30)
    hosts = [deploy.HostPlan(f"app{i}", "roll", "R1", True, before="R1") for i in (1, 2, 3)]
    servers = [app.server(host) for host in app.hosts]
    plan = deploy.RolloutPlan(
        "deploy",
        "d",
        "unit",
        "R2",
        "x",
        hosts,
        [["app1"], ["app2"], ["app3"]],
        "1",
        2,
        gate,
        ["lb1"],
        1,
        5,
        False,
        in_service={"lb1": servers},
    )
    rollout = deploy_rollout.Rollout(app, plan, Reporter(), b"")
    assert rollout.below_minimum(["app1"], []) is None
    rollout.outcomes["app1"].state, rollout.outcomes["app1"].in_lb = deploy.FAILED, False
    assert rollout.below_minimum(["app2"], []) is None, "app3 still serves"
    rollout.outcomes["app2"].state, rollout.outcomes["app2"].in_lb = deploy.FAILED, False
    assert rollout.below_minimum(["app3"], []) == (
        "taking app3 out would leave 0 app servers in service in nginx on lb1, fewer than the minimum of 1"
    )
    rollout.outcomes["app2"].state = deploy.DEPLOYED
    assert rollout.below_minimum(["app3"], ["app2"]) is None, "app2 comes back in the same reload"


def interrupted_run(target="R2", before=None, interrupted=True):
    return {
        "kind": "deploy",
        "deploy_id": "d1",
        "target": target,
        "status": "running",
        "interrupted": interrupted,
        "before": before if before is not None else {"app1": "R1", "app2": "R1", "app3": "R1"},
    }


def test_a_host_an_interrupted_run_switched_returns_to_the_release_it_had_before_that_run(tmp_path):
    app = app_fleet(tmp_path)
    surveys = survey(app, "R1", releases=["R1", "R2"])
    surveys["app1"].current = "R2"
    hosts = deploy_plan.host_plans(app, surveys, lb_state(app, down_by_igops=["app1"]), "R2", max_fail=0)
    assert [h.before for h in hosts] == ["R2", "R1", "R1"], "alone, the survey knows only app1's current"
    deploy_record.inherit_releases_before(hosts, surveys, interrupted_run())
    assert [h.before for h in hosts] == ["R1", "R1", "R1"]
    assert "returns to R1 if it fails" in hosts[0].detail and "d1" in hosts[0].detail
    gate = deploy.HealthGate("/health", 8000, 3, 30)
    plan = deploy.RolloutPlan(
        "deploy", "d2", "unit", "R2", "x", hosts, [["app1"], ["app2", "app3"]], "1", 0, gate, ["lb1"], 1, 5, False
    )
    assert (
        "app1: drained by an earlier igops run; returns to R1 if it fails (its release before the interrupted "
        "deploy d1)" in plan.notes()
    )


def test_only_an_interrupted_run_that_switched_the_host_to_its_target_is_inherited(tmp_path):
    app = app_fleet(tmp_path)

    def plans(last_run, releases=("R1", "R2")):
        surveys = survey(app, "R1", releases=list(releases))
        surveys["app1"].current = "R2"
        hosts = deploy_plan.host_plans(app, surveys, lb_state(app, down_by_igops=["app1"]), "R3", max_fail=0)
        deploy_record.inherit_releases_before(hosts, surveys, last_run)
        return hosts

    assert plans(interrupted_run(interrupted=False))[0].before == "R2", "a run that ended left nothing to inherit"
    assert plans(None)[0].before == "R2"
    assert plans(interrupted_run(target="R9"))[0].before == "R2", "the host is not on that run's target"
    gone = plans(interrupted_run(), releases=["R2"])[0]
    assert gone.before == "R2" and "R1, its release before the interrupted deploy, is gone" in gone.detail


def test_the_journal_records_what_each_rolled_host_returns_to(tmp_path):
    app = app_fleet(tmp_path)
    hosts = [
        deploy.HostPlan("app1", "roll", "R2", before="R1"),
        deploy.HostPlan("app2", deploy.ALREADY, "R2", before="R2"),
    ]
    gate = deploy.HealthGate("/health", 8000, 3, 30)
    plan = deploy.RolloutPlan("deploy", "d2", "unit", "R2", "x", hosts, [["app1"]], "1", 0, gate, [], 1, 5, False)
    journal = deploy_record.LastRunRecord(app.fleet, plan)
    journal.update()
    assert json.loads(deploy_record.last_run_path(app.fleet).read_text())["before"] == {"app1": "R1"}
    rollout = deploy_rollout.Rollout(app, plan, Reporter(), b"")
    assert rollout.outcomes["app1"].before == "R1" and rollout.outcomes["app1"].release == "R2"


# --- whether the last run was interrupted ----------------------------------------------------

# A deploy's process, as far as its last-run record goes: records its run as running (the real
# LastRunRecord, with this process's identity), then runs until its stdin closes.
RUNNING_DEPLOY = (
    "import sys; from pathlib import Path; from tests.unit.test_deploy import record_a_running_deploy; "
    "record_a_running_deploy(Path(sys.argv[1])); print('recorded', flush=True); sys.stdin.read()"
)


def record_a_running_deploy(tmp_path: Path) -> None:
    """Deploy d1 of R2, which rolls app1 (on R1 before it), as its process records it."""
    app = app_fleet(tmp_path)
    hosts = [deploy.HostPlan("app1", "roll", "R1", before="R1")]
    gate = deploy.HealthGate("/health", 8000, 3, 30)
    plan = deploy.RolloutPlan("deploy", "d1", "unit", "R2", "x", hosts, [["app1"]], "1", 0, gate, [], 1, 5, False)
    deploy_record.LastRunRecord(app.fleet, plan).update(status="running")


@contextmanager
def deploy_process(tmp_path: Path, *wrapper: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """A process of its own that records deploy d1 running; it exits when the block ends."""
    process = subprocess.Popen(
        [*wrapper, sys.executable, "-c", RUNNING_DEPLOY, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "recorded"
        yield process
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(30)


def returns_app1_to(app) -> str | None:
    """The release a rerun's plan returns app1 to if it fails: app1 is on R2, d1's target, and
    was on R1 before d1 (which only an interrupted d1's record says)."""
    surveys = survey(app, "R1", releases=["R1", "R2"])
    surveys["app1"].current = "R2"
    hosts = deploy_plan.host_plans(app, surveys, lb_state(app, down_by_igops=["app1"]), "R2", max_fail=0)
    deploy_record.inherit_releases_before(hosts, surveys, deploy_record.read_last_runs(app.fleet))
    return hosts[0].before


def test_a_run_whose_process_exited_is_interrupted_and_one_whose_process_runs_is_not(tmp_path):
    app = app_fleet(tmp_path)
    with deploy_process(tmp_path) as process:
        [run] = deploy_record.read_last_runs(app.fleet)
        assert run["pid"] == process.pid and run["host"] == safety.operator_host()
        assert {key: run[key] for key in process_identity.FIELDS} == {
            **process_identity.own(),
            "process_start": process_identity.process_start(process.pid),
        }
        assert run["status"] == "running" and run["interrupted"] is False
        assert returns_app1_to(app) == "R2", "a run going on is not inherited from"
    [run] = deploy_record.read_last_runs(app.fleet)
    assert run["status"] == "running" and run["interrupted"] is True
    assert returns_app1_to(app) == "R1"


def test_the_operator_host_names_the_run_s_machine(tmp_path, monkeypatch):
    """Two bastions of one host name (IGOPS_OPERATOR_HOST): a run of the other is not judged
    here, alive or not; one of this one is."""
    app = app_fleet(tmp_path)
    monkeypatch.setenv(safety.OPERATOR_HOST_ENV, "bastion-1")
    with deploy_process(tmp_path, env={safety.OPERATOR_HOST_ENV: "bastion-2"}):
        [run] = deploy_record.read_last_runs(app.fleet)
        assert run["host"] == "bastion-2" and run["machine"] == socket.gethostname()
        assert "interrupted" not in run
    [run] = deploy_record.read_last_runs(app.fleet)
    assert "interrupted" not in run and returns_app1_to(app) == "R2"
    with deploy_process(tmp_path, env={safety.OPERATOR_HOST_ENV: "bastion-1"}):
        assert deploy_record.read_last_runs(app.fleet)[0]["interrupted"] is False
    assert deploy_record.read_last_runs(app.fleet)[0]["interrupted"] is True


def test_a_run_of_another_boot_or_of_an_older_igops_is_never_judged_gone(tmp_path):
    """Its pid is free here, and it ran on this host: still, its process cannot be told from
    here (another boot), or was named by host name and pid alone (an older igops's record)."""
    app = app_fleet(tmp_path)
    with deploy_process(tmp_path):
        pass
    path = deploy_record.last_run_path(app.fleet)
    record = json.loads(path.read_text())
    assert not process_identity.process_alive(record["pid"])
    path.write_text(json.dumps({**record, "boot_id": "00000000-0000-0000-0000-000000000000"}))
    assert "interrupted" not in deploy_record.read_last_runs(app.fleet)[0]
    older = {key: value for key, value in record.items() if key not in ("host", *process_identity.FIELDS)}
    path.write_text(json.dumps(older))
    [run] = deploy_record.read_last_runs(app.fleet)
    assert run["machine"] == socket.gethostname() and "interrupted" not in run
    assert returns_app1_to(app) == "R2"


@pytest.mark.skipif(not unshare_works(), reason="needs unshare of a user and PID namespace")
def test_a_run_of_another_pid_namespace_is_never_judged_gone(tmp_path):
    """A deploy in another container of this host name: its pid names another process here, or
    none, whether it runs or not."""
    app = app_fleet(tmp_path)
    with deploy_process(tmp_path, *UNSHARE):
        [run] = deploy_record.read_last_runs(app.fleet)
        assert run["host"] == safety.operator_host() and run["pid_namespace"] != process_identity.pid_namespace()
        assert "interrupted" not in run
    [run] = deploy_record.read_last_runs(app.fleet)
    assert "interrupted" not in run and returns_app1_to(app) == "R2"


def test_an_existing_release_with_the_same_content_keeps_its_id(tmp_path):
    app = app_fleet(tmp_path)
    surveys = survey(app, "R1")
    surveys["app1"].releases = [{"id": "R1", "content": "aaa"}, {"id": "R2", "content": "bbb"}]
    surveys["app2"].releases = [{"id": "R3", "content": "bbb"}]
    surveys["app2"].current = "R3"
    assert deploy_plan.existing_release(surveys, "bbb") == "R3", "the one a host runs wins"
    assert deploy_plan.existing_release(surveys, "ccc") is None


def result(*states):
    hosts = [deploy.HostOutcome(f"app{i}", state, "R", "P", True) for i, state in enumerate(states, 1)]
    return deploy.RolloutResult("deploy", "d", "R", hosts)


def test_exit_codes_of_a_rollout():
    assert result(deploy.DEPLOYED, deploy.ALREADY).exit_code == ExitCode.OK
    assert result(deploy.DEPLOYED, deploy.ROLLED_BACK).exit_code == ExitCode.PARTIAL
    assert result(deploy.ROLLED_BACK, deploy.NOT_STARTED).exit_code == ExitCode.FAILED
    rerun = result(deploy.ALREADY, deploy.ALREADY, deploy.ROLLED_BACK)
    assert "2 of 3 hosts on it" in rerun.summary() and rerun.exit_code == ExitCode.PARTIAL
    assert result(deploy.ALREADY, deploy.ALREADY).exit_code == ExitCode.OK
    stopped = result(deploy.DEPLOYED, deploy.DEPLOYED)
    stopped.stopped = "batch 2 failed"
    assert stopped.exit_code == ExitCode.PARTIAL


def test_summary_names_each_failed_host_and_why_and_who_is_out_of_the_lb():
    outcome = result(deploy.ROLLED_BACK, deploy.NOT_STARTED, deploy.UNKNOWN)
    outcome.hosts[0].detail = "/health answered 503: redis: down; back on P"
    outcome.hosts[2].in_lb = False
    outcome.hosts[2].detail = "unreachable during the switch"
    text = outcome.summary()
    assert "app1 rolled back: /health answered 503" in text
    assert "app3 unknown: unreachable" in text and "out of the load balancer: app3" in text


def test_plan_steps_say_what_each_batch_does(tmp_path):
    gate = deploy.HealthGate("/health", 8000, 3, 30)
    hosts = [deploy.HostPlan(f"app{i}", "roll", "R1", True, upload=True, venv="reuse") for i in (1, 2, 3)]
    tree = deploy.SourceTree({"requirements.txt": (False, b"")}, None, "working tree")
    plan = deploy.RolloutPlan(
        "deploy",
        "d",
        "unit",
        "R2",
        "working tree",
        hosts,
        [["app1"], ["app2", "app3"]],
        "1,100%",
        0,
        gate,
        ["lb1"],
        32,
        5,
        True,
        deploy.package(tree, "R2")[0],
    )
    steps = plan.steps()
    assert steps[0].startswith("upload release R2") and "reuse" in steps[0]
    assert steps[1].startswith("batch 1/2: app1 — mark down in nginx on lb1")
    assert steps[2].startswith("batch 2/2: app2, app3 — put app1 back, mark down in nginx on lb1")
    assert "3 passes of /health in a row within 30 s serving R2" in steps[2]
    # Numbered as the run numbers its progress lines: the last batch goes back in a step of its own.
    assert steps[3:] == ["put app2, app3 back in the load balancer", "PagerDuty change event for the deploy"]
    assert any("--max-fail 0" in note for note in plan.notes())


# --- the upstream file -----------------------------------------------------------------------

UPSTREAM = """upstream app {
    server 127.0.10.11:8000 max_fails=2 fail_timeout=5s;
    server 127.0.10.12:8000 max_fails=2 fail_timeout=5s;
    server 127.0.10.13:8000 max_fails=2 fail_timeout=5s down;
    keepalive 32;
    keepalive_timeout 4s;
}
"""


def test_draining_marks_down_with_a_marker_and_putting_back_removes_only_igops_drains():
    drained, servers = upstream.apply(UPSTREAM, {"127.0.10.11:8000"}, set(), "deploy d1 to R2")
    assert "server 127.0.10.11:8000 max_fails=2 fail_timeout=5s down;  # igops-drained: deploy d1 to R2" in drained
    assert [(s["address"], s["down"], s["igops"]) for s in servers] == [
        ("127.0.10.11:8000", True, True),
        ("127.0.10.12:8000", False, False),
        ("127.0.10.13:8000", True, False),
    ]
    back, servers = upstream.apply(drained, set(), {"127.0.10.11:8000", "127.0.10.13:8000"}, "x")
    assert back == UPSTREAM, "the operator's drain of .13 stays; .11 is exactly as before"


WEIGHTED = """upstream app {
    server 127.0.10.11:8000;
    server 127.0.10.12:8000 weight=2;
    server 127.0.10.13:8000 weight=3;
    server 127.0.10.14:8000 down;
}
"""


def test_a_canary_share_raises_the_others_weights_by_one_factor_and_any_change_puts_them_back():
    canary = {"servers": ["127.0.10.11:8000"], "percent": 10}
    shared, servers = upstream.apply(WEIGHTED, set(), {"127.0.10.11:8000"}, "d", canary, weights=True)
    # 1 / (1 + 2k + 3k) <= 10% first at k = 2; the others keep their split (2:3), .14 stays down.
    assert [s["weight"] for s in servers] == [1, 4, 6, 1]
    assert "server 127.0.10.12:8000 weight=4;  # igops-weight: weight=2" in shared
    assert "server 127.0.10.14:8000 down;\n" in shared
    # A later request (a killed run's next one, say) sees what it replaced.
    again, _ = upstream.apply(shared, set(), set(), "d", canary, weights=True)
    assert again == shared
    back, servers = upstream.apply(shared, set(), set(), "d", weights=True)
    assert back == WEIGHTED and [s["weight"] for s in servers] == [1, 2, 3, 1]
    # A server without a weight before gets none back; a drained one keeps both markers apart.
    shared, _ = upstream.apply(WEIGHTED, set(), set(), "d", {"servers": ["127.0.10.13:8000"], "percent": 20}, True)
    assert "server 127.0.10.11:8000 weight=4;  # igops-weight: -" in shared
    drained, _ = upstream.apply(shared, {"127.0.10.12:8000"}, set(), "deploy d2", weights=False)
    assert "weight=8 down;  # igops-weight: weight=2  # igops-drained: deploy d2" in drained
    back, _ = upstream.apply(drained, set(), {"127.0.10.12:8000"}, "deploy d2", weights=True)
    assert back == WEIGHTED
    # A reporting request (weights=False, nothing asked) changes nothing.
    assert upstream.apply(shared, set(), set(), "survey")[0] == shared


def test_a_share_already_met_changes_no_weight_and_the_factor_is_bounded():
    assert upstream.share_factor(1, 9, 10) == 1
    assert upstream.share_factor(1, 2, 10) == 5  # 1 / 11
    assert upstream.share_factor(1, 1, 0.1) == upstream.MAX_WEIGHT_FACTOR
    unchanged, _ = upstream.apply(WEIGHTED, set(), set(), "d", {"servers": ["127.0.10.11:8000"], "percent": 50}, True)
    assert unchanged == WEIGHTED
    with pytest.raises(upstream.Refused, match="127.0.10.99:8000"):
        upstream.apply(WEIGHTED, set(), set(), "d", {"servers": ["127.0.10.99:8000"], "percent": 10}, True)


def test_draining_is_idempotent_and_unknown_servers_are_refused():
    once, _ = upstream.apply(UPSTREAM, {"127.0.10.12:8000"}, set(), "n")
    twice, _ = upstream.apply(once, {"127.0.10.12:8000"}, set(), "n")
    assert once == twice
    with pytest.raises(upstream.Refused, match="127.0.10.99:8000"):
        upstream.apply(UPSTREAM, {"127.0.10.99:8000"}, set(), "n")


def test_a_host_the_load_balancer_does_not_list_is_refused(tmp_path):
    app = app_fleet(tmp_path)
    listed = lb_state(app)
    listed.servers = listed.servers[:2]
    with pytest.raises(RefusedError, match=r"app3 \(127.0.20.3:8000\)"):
        deploy_plan.host_plans(app, survey(app, "R1"), listed, "R2", max_fail=0)
