"""A rollout run end to end without a fleet: the switches, gates and load balancers are fakes, the
plan and the rollout are igops'. The steps a run shows are the plan's, with or without a canary
analysis; each verdict does what it says (go on, hold with exit 6, return the canary); a
--canary-only or held canary is continued from batch 2, found in the journal; max_fail counts
as Ansible's max_fail_percentage."""

import random
import tomllib
from contextlib import contextmanager

import pytest

from igops import deploy, deploy_analysis, deploy_canary, deploy_plan, deploy_rollout, deploy_switch, inventory
from igops.deploy_accesslog import Request
from igops.deploy_canary_plan import AnalysisOptions
from igops.deploy_gate import GateResult
from igops.errors import ExitCode
from igops.output import Reporter, StepRecord

TREE = deploy.SourceTree({"views.py": (False, b"X = 2\n"), "requirements.txt": (False, b"")}, None, "working tree")
NEW = deploy.content_hash(TREE.files)


def app_fleet(tmp_path, count=4, deploy_section=""):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    hosts = "".join(
        f'[[hosts]]\nname = "app{i}"\naddress = "127.0.20.{i}"\nroles = ["app"]\n' for i in range(1, count + 1)
    )
    text = (
        f'[fleet]\nname = "unit"\nstate_dir = "{tmp_path / "state"}"\n[ssh]\nknown_hosts = "{known_hosts}"\n'
        f'[app]\nroot = "/srv/{{host}}/app"\n{deploy_section}{hosts}'
        '[[hosts]]\nname = "lb1"\naddress = "127.0.20.100"\nroles = ["lb"]\n'
    )
    return deploy.AppFleet.of(inventory.validate(tomllib.loads(text), tmp_path / "igops.toml"))


def surveys(app, on_new=()):
    """Every host on R1 with the new release staged (nothing to upload); `on_new` run it."""
    found = {}
    for host in app.hosts:
        releases = [{"id": "R1", "content": "old"}, {"id": "R2", "content": NEW, "built_at": "x"}]
        current = "R2" if host.name in on_new else "R1"
        found[host.name] = deploy.HostReleases(
            host.name, str(host.address), app.root(host), True, current=current, releases=releases, venvs=[""]
        )
    return found


def lb_state(app):
    return deploy.LbState([deploy.LbServer("lb1", app.server(host), False, False, None) for host in app.hosts])


class Recorder(Reporter):
    """The steps a run shows, and the facts it journals."""

    def __init__(self):
        self.steps: list[StepRecord] = []
        self.facts: dict = {}

    @contextmanager
    def step(self, title):
        record = StepRecord(len(self.steps) + 1, title)
        self.steps.append(record)
        yield record

    def fact(self, **fields):
        self.facts.update(fields)


class Fleet:
    """Fakes for what touches hosts: switches answer, gates pass unless the host is in
    `failing`, load balancer changes are recorded, the canary window gives `verdict`."""

    def __init__(self, monkeypatch, app, verdict=deploy_canary.PASS, failing=(), records=(), on_new=()):
        self.lb_changes: list[tuple[list[str], list[str]]] = []
        self.weight_changes: list = []  # the canary's share, and "reset" when its weights go back
        self.switched: list[tuple[str, list[str]]] = []
        self.failing = set(failing)
        monkeypatch.setattr(
            deploy_plan, "survey_for_change", lambda app, parallel: (surveys(app, on_new), lb_state(app))
        )
        monkeypatch.setattr(deploy_plan, "journal_records", lambda fleet: list(records))
        monkeypatch.setattr(deploy_switch.HostSwitcher, "_switch", self._switch)
        monkeypatch.setattr(deploy_switch.HostSwitcher, "_gate", self._gate)
        monkeypatch.setattr(deploy_rollout.Rollout, "_lb_change", self._lb_change)
        monkeypatch.setattr(deploy_rollout.Rollout, "_read_lbs", lambda rollout: None)
        monkeypatch.setattr(deploy_analysis, "observe", lambda app, plan, reporter: evidence(plan, verdict))

    def _switch(self, names, release_of, action):
        self.switched.append((action, list(names)))
        return {name: ({"reload_exit": 0, "reload_output": ""}, None, True) for name in names}

    def _gate(self, names, release_of):
        # A failing host fails on the new release only: back on its old one, it is healthy.
        return {
            name: GateResult(name not in self.failing or release_of(name) != "R2", "fake gate", 1.0) for name in names
        }

    def _lb_change(self, down=(), up=(), share=None, reset_weights=False):
        if share or reset_weights:
            self.weight_changes.append((sorted(share[0]), share[1]) if share else "reset")
        if down or up:
            self.lb_changes.append((sorted(down), sorted(up)))


def evidence(plan, verdict):
    """A window that gives `verdict` on the plan's canary against its baseline."""
    rng = random.Random(1)

    def requests(hosts, count, error_rate=0.001):
        return {
            host: [
                Request(1.0, f"{host}:8000", 500 if rng.random() < error_rate else 200, 0.01, "GET /api/feed")
                for _ in range(count)
            ]
            for host in hosts
        }

    count = 20 if verdict == deploy_canary.INCONCLUSIVE else 600
    canary_rate = 0.2 if verdict == deploy_canary.FAIL else 0.001
    records = {**requests(plan.canary, count, canary_rate), **requests(plan.baseline, count)}
    found = deploy_canary.analyse(plan.canary, plan.baseline, records, {}, plan.thresholds, 60.0)
    assert found.verdict == verdict, found.summary()
    return found


def plan(app, batch="1,25%", analysis=None, max_fail=None):
    gate = deploy.HealthGate("/health", 8000, 3, 30)
    made, _ = deploy.plan_deploy(app, TREE, batch, max_fail, gate, analysis=analysis or AnalysisOptions())
    return made


def run(app, made):
    reporter = Recorder()
    try:
        result = deploy.execute(app, made, reporter)
    except deploy.RolloutFailed as failed:
        result = failed.result
    return result, reporter


def test_without_analysis_the_plan_is_the_health_gated_rollout_it_was(tmp_path, monkeypatch):
    app = app_fleet(tmp_path)
    Fleet(monkeypatch, app)
    made = plan(app, analysis=AnalysisOptions(seconds=0))
    assert made.canary is None and "no canary analysis (--analysis 0)" in made.canary_note
    steps = made.steps()
    assert [step.split(":")[0] for step in steps] == [
        "batch 1/4",
        "batch 2/4",
        "batch 3/4",
        "batch 4/4",
        "put app4 back in the load balancer",
    ]
    result, reporter = run(app, made)
    assert result.exit_code == ExitCode.OK and len(reporter.steps) == len(steps)


def test_the_analysis_is_a_numbered_step_after_the_canary_takes_traffic(tmp_path, monkeypatch):
    app = app_fleet(tmp_path)
    fake = Fleet(monkeypatch, app)
    made = plan(app)
    steps = made.steps()
    assert steps[0].startswith("batch 1/4: app1 — mark down")
    assert steps[1] == "put app1 back in the load balancer: the canary takes traffic"
    assert steps[2].startswith("canary analysis: app1 on R2 against app2, app3, app4 on R1, 60 s of traffic")
    assert "fail: app1 back to R1; inconclusive: hold with the canary in place (exit 6)" in steps[2]
    assert steps[3].startswith("batch 2/4: app2 — mark down"), "the canary is back already: nothing to put back"
    result, reporter = run(app, made)
    assert result.exit_code == ExitCode.OK
    assert [step.number for step in reporter.steps] == list(range(1, len(steps) + 1))
    assert reporter.steps[2].title.startswith("canary analysis: app1 against app2, app3, app4, 60 s")
    assert result.canary.verdict == deploy_canary.PASS and reporter.facts["canary"]["verdict"] == "pass"
    assert fake.lb_changes[:3] == [(["app1"], []), ([], ["app1"]), (["app2"], [])]


def test_a_failing_canary_is_returned_to_its_release_and_the_rollout_stops(tmp_path, monkeypatch):
    app = app_fleet(tmp_path)
    fake = Fleet(monkeypatch, app, verdict=deploy_canary.FAIL)
    result, reporter = run(app, plan(app))
    assert result.exit_code == ExitCode.FAILED
    outcomes = {host.host: host for host in result.hosts}
    assert outcomes["app1"].state == deploy.ROLLED_BACK and outcomes["app1"].release == "R1"
    assert outcomes["app1"].detail.startswith("canary analysis fail; back on R1") and outcomes["app1"].in_lb
    assert [outcomes[name].state for name in ("app2", "app3", "app4")] == [deploy.NOT_STARTED] * 3
    assert fake.switched == [("deploy", ["app1"]), ("rollback", ["app1"])]
    assert fake.lb_changes[-2:] == [(["app1"], []), ([], ["app1"])]
    assert "the canary analysis (fail)" in result.stopped and reporter.steps[-1].status == "failed"
    assert reporter.facts["canary"]["verdict"] == "fail" and "canary fail" in result.summary()


@pytest.mark.parametrize("verdict", [deploy_canary.PASS, deploy_canary.FAIL, deploy_canary.INCONCLUSIVE])
def test_a_canary_given_a_share_of_the_traffic_takes_it_back_in_rotation_and_every_weight_goes_back(
    tmp_path, monkeypatch, verdict
):
    app = app_fleet(tmp_path, deploy_section="[deploy.canary]\ntraffic_percent = 10\n")
    fake = Fleet(monkeypatch, app, verdict=verdict)
    made = plan(app)
    steps = made.steps()
    assert steps[1] == "put app1 back in the load balancer: the canary takes at most 10% of the traffic"
    assert "the canary with at most 10% of the traffic (the other servers' nginx weights raised, put back" in steps[2]
    result, reporter = run(app, made)
    assert reporter.steps[1].title == steps[1], "the run's step is the plan's"
    # The share comes with the put-back (one reload); the weights go back whatever the verdict.
    assert fake.weight_changes == [(["app1"], 10), "reset"]
    assert fake.lb_changes[1] == ([], ["app1"])


def test_a_held_canary_analysed_again_is_given_its_share_in_place(tmp_path, monkeypatch):
    app = app_fleet(tmp_path, deploy_section="[deploy.canary]\ntraffic_percent = 10\n")
    fact = {"verdict": "inconclusive", "hosts": ["app1"], "before": {"app1": "R1"}}
    record = {"id": "20261204-1-c", "kind": "deploy", "params": {"target": "R2"}, "facts": {"canary": fact}}
    fake = Fleet(monkeypatch, app, verdict=deploy_canary.PASS, records=[record], on_new=["app1"])
    made = plan(app)
    assert made.canary.in_place and "at most 10% of the traffic" in made.steps()[0]
    assert made.canary.warmup is None and "warm-up" not in made.steps()[0], "it has served since that deploy"
    run(app, made)
    assert fake.weight_changes == [(["app1"], 10), "reset"]


def test_the_window_begins_after_the_canary_has_served_its_warm_up(tmp_path, monkeypatch):
    """A release just started answers its first requests slowly (the lab's canary, seconds after
    it was put back, answered dozens of requests in 200-700 ms): they are not judged."""
    app = app_fleet(tmp_path, deploy_section="[deploy.canary]\nwarmup = 7\nwindow = 20\n")
    observe = deploy_analysis.observe
    Fleet(monkeypatch, app)
    made = plan(app)
    assert "20 s of traffic through nginx on lb1 after a 7 s warm-up" in made.steps()[2]
    result, reporter = run(app, made)
    assert reporter.steps[2].title.endswith("20 s after a 7 s warm-up")
    slept: list[float] = []
    began: list[float] = []
    monkeypatch.setattr(deploy_analysis.time, "monotonic", lambda: sum(slept))
    start = deploy_analysis.deploy_window.WindowStart(0.0, [], {})
    monkeypatch.setattr(deploy_analysis.deploy_window, "begin", lambda app, hosts: began.append(sum(slept)) or start)
    monkeypatch.setattr(deploy_analysis.deploy_window, "end", lambda *args: deploy_analysis.deploy_window.Window(20.0))
    observe(app, made.canary, Reporter(), sleep=slept.append)
    assert began == [7.0] and sum(slept) == 27.0


def test_an_inconclusive_canary_holds_in_place_with_exit_6(tmp_path, monkeypatch):
    app = app_fleet(tmp_path)
    Fleet(monkeypatch, app, verdict=deploy_canary.INCONCLUSIVE)
    made = plan(app)
    with pytest.raises(deploy.RolloutFailed) as held:
        deploy.execute(app, made, Recorder())
    result = held.value.result
    assert held.value.exit_code == ExitCode.HELD == 6 and held.value.result_word == "held"
    assert held.value.data is result, "the --json envelope carries the hosts and the evidence"
    assert "held: canary analysis inconclusive: the canary answered 20 requests" in result.summary()
    outcomes = {host.host: host for host in result.hosts}
    assert outcomes["app1"].state == deploy.DEPLOYED and outcomes["app1"].in_lb
    assert "igops deploy rollback" in held.value.hint


@pytest.mark.parametrize(("choice", "code"), [("continue", ExitCode.OK), ("rollback", ExitCode.FAILED)])
def test_on_inconclusive_continue_goes_on_and_rollback_returns_the_canary(tmp_path, monkeypatch, choice, code):
    app = app_fleet(tmp_path)
    Fleet(monkeypatch, app, verdict=deploy_canary.INCONCLUSIVE)
    result, _ = run(app, plan(app, analysis=AnalysisOptions(on_inconclusive=choice)))
    assert result.exit_code == code
    assert result.hosts[0].state == (deploy.DEPLOYED if choice == "continue" else deploy.ROLLED_BACK)


def test_canary_only_stops_after_a_pass_with_exit_0_and_the_next_deploy_goes_on_from_batch_2(tmp_path, monkeypatch):
    app = app_fleet(tmp_path)
    Fleet(monkeypatch, app)
    made = plan(app, analysis=AnalysisOptions(canary_only=True))
    steps = made.steps()
    assert len(steps) == 3 and steps[2].endswith("pass: stop (--canary-only)")
    result, reporter = run(app, made)
    assert result.exit_code == ExitCode.OK and result.canary_only and len(reporter.steps) == 3
    assert [host.state for host in result.hosts] == [deploy.DEPLOYED] + [deploy.NOT_STARTED] * 3
    fact = reporter.facts["canary"]
    assert fact["in_place"] and fact["hosts"] == ["app1"] and fact["before"] == {"app1": "R1"}

    # The next `igops deploy` of the release finds the canary in the journal and goes on.
    record = {"id": "20261204-1-a", "kind": "deploy", "params": {"target": "R2"}, "facts": {"canary": fact}}
    Fleet(monkeypatch, app, records=[record], on_new=["app1"])
    again = plan(app)
    assert again.held.operation == "20261204-1-a" and again.canary is None
    assert [step.split(":")[0] for step in again.steps()] == [
        "batch 2/4",
        "batch 3/4",
        "batch 4/4",
        "put app4 back in the load balancer",
    ]
    assert any("continues deploy 20261204-1-a" in note for note in again.notes())
    result, reporter = run(app, again)
    assert result.exit_code == ExitCode.OK and len(reporter.steps) == 4


def test_a_held_canary_is_analysed_again_before_the_rollout_goes_on(tmp_path, monkeypatch):
    app = app_fleet(tmp_path)
    fact = {"verdict": "inconclusive", "hosts": ["app1"], "before": {"app1": "R1"}}
    record = {"id": "20261204-1-b", "kind": "deploy", "params": {"target": "R2"}, "facts": {"canary": fact}}
    fake = Fleet(monkeypatch, app, verdict=deploy_canary.FAIL, records=[record], on_new=["app1"])
    made = plan(app)
    assert made.canary.in_place == "20261204-1-b" and made.steps()[0].startswith("canary analysis: app1 on R2")
    result, _ = run(app, made)
    # Failed this time: the canary returns to the release it ran before the held deploy.
    assert result.hosts[0].state == deploy.ROLLED_BACK and result.hosts[0].release == "R1"
    assert fake.switched == [("rollback", ["app1"])]


def test_a_held_canary_held_again_switches_nothing_else(tmp_path, monkeypatch):
    app = app_fleet(tmp_path)
    fact = {"verdict": "inconclusive", "hosts": ["app1"], "before": {"app1": "R1"}}
    record = {"id": "20261204-1-d", "kind": "deploy", "params": {"target": "R2"}, "facts": {"canary": fact}}
    fake = Fleet(monkeypatch, app, verdict=deploy_canary.INCONCLUSIVE, records=[record], on_new=["app1"])
    result, reporter = run(app, plan(app))
    assert result.exit_code == ExitCode.HELD and fake.switched == [] and fake.lb_changes == []
    assert [step.title.split(":")[0] for step in reporter.steps] == ["canary analysis"]


def test_a_canary_no_longer_in_place_is_not_continued(tmp_path, monkeypatch):
    app = app_fleet(tmp_path)
    fact = {"verdict": "pass", "hosts": ["app1"], "before": {"app1": "R1"}}
    record = {"id": "20261204-1-c", "kind": "deploy", "params": {"target": "R2"}, "facts": {"canary": fact}}
    Fleet(monkeypatch, app, records=[record])  # app1 was rolled back since
    made = plan(app)
    assert made.held is None and made.canary is not None and made.batch_offset == 0


def test_canary_only_without_a_possible_analysis_is_refused(tmp_path, monkeypatch):
    app = app_fleet(tmp_path)
    Fleet(monkeypatch, app, on_new=["app2", "app3", "app4"])  # app1 alone to roll: one batch
    with pytest.raises(deploy_plan.RefusedError, match="--canary-only stops after a canary analysis"):
        plan(app, analysis=AnalysisOptions(canary_only=True))
    assert "one batch" in plan(app).canary_note


def test_an_analysis_asked_for_by_name_and_impossible_is_refused(tmp_path, monkeypatch):
    app = app_fleet(tmp_path)
    Fleet(monkeypatch, app, on_new=["app2", "app3", "app4"])  # app1 alone to roll: one batch
    with pytest.raises(deploy_plan.RefusedError, match="--analysis 30 asks for a canary analysis.*one batch"):
        plan(app, analysis=AnalysisOptions(seconds=30))
    assert "one batch" in plan(app, analysis=AnalysisOptions()).canary_note  # the inventory's window: a note


@pytest.mark.parametrize(("failing", "stops_at"), [(["app2"], None), (["app2", "app3"], "batch 3 of 4")])
def test_max_fail_25_percent_of_4_continues_past_one_failure_and_stops_at_the_second(
    tmp_path, monkeypatch, failing, stops_at
):
    app = app_fleet(tmp_path)
    Fleet(monkeypatch, app, failing=failing)
    made = plan(app, batch="1", max_fail="25%", analysis=AnalysisOptions(seconds=0))
    assert made.max_fail == 1 and "--max-fail 25% (1 of 4 hosts)" in made.notes()[0]
    result, _ = run(app, made)
    if stops_at is None:
        assert result.stopped is None and result.exit_code == ExitCode.PARTIAL
        assert [h.state for h in result.hosts] == [
            deploy.DEPLOYED,
            deploy.ROLLED_BACK,
            deploy.DEPLOYED,
            deploy.DEPLOYED,
        ]
    else:
        assert result.stopped.startswith(f"{stops_at} (2 failed, more than --max-fail 25% (1 of 4 hosts))")
        assert result.hosts[3].state == deploy.NOT_STARTED


def test_the_inventory_sets_max_fail_and_min_in_service(tmp_path, monkeypatch):
    app = app_fleet(tmp_path, deploy_section='[deploy]\nmax_fail = "50%"\nmin_in_service = "75%"\n')
    Fleet(monkeypatch, app)
    made = plan(app, batch="1", analysis=AnalysisOptions(seconds=0))
    assert (made.max_fail, made.min_in_service) == (2, 3)
    with pytest.raises(deploy_plan.RefusedError) as refused:
        plan(app, batch="2", analysis=AnalysisOptions(seconds=0))
    assert "would leave 2 app servers in service in nginx on lb1, fewer than the minimum of 3" in refused.value.message
    assert "(min_in_service 75% of 4 app servers: 3)" in refused.value.message
    assert "smaller batches" in refused.value.hint and "min_in_service" in refused.value.hint


def test_hosts_limits_the_plan_and_its_leases_to_those_servers(tmp_path, monkeypatch):
    app = app_fleet(tmp_path)
    Fleet(monkeypatch, app)
    gate = deploy.HealthGate("/health", 8000, 3, 30)
    made, _ = deploy.plan_deploy(app, TREE, "1", None, gate, only=["app3", "app2"], analysis=AnalysisOptions())
    assert made.scope() == ["app2", "app3"] and made.batches == [["app2"], ["app3"]]
    assert [h.action for h in made.hosts] == [deploy.OUTSIDE, "roll", "roll", deploy.OUTSIDE]
    # Those outside --hosts, and app3 until its batch, serve the old release during the window.
    assert made.canary.canary == ["app2"] and made.canary.baseline == ["app1", "app3", "app4"]
    assert deploy.resume_params(made)["hosts"] == ["app2", "app3"]
    result, _ = run(app, made)
    assert [h.host for h in result.hosts] == ["app2", "app3"] and result.exit_code == ExitCode.OK
    with pytest.raises(deploy_plan.UsageError, match="'db1' is not an app server"):
        deploy.plan_deploy(app, TREE, "1", None, gate, only=["db1"])


def test_ops_resume_refuses_a_deploy_interrupted_before_its_canary_passed(tmp_path):
    """Resume switches the hosts left without an analysis: only after the canary passed one."""
    from igops import interrupted

    fleet = app_fleet(tmp_path).fleet
    params = {"target": "R2", "batch": "1,25%", "max_fail": "0", "health_passes": 3, "health_timeout": 30}
    record = {"id": "20261204-2-a", "kind": "deploy", "params": {**params, "canary": True}, "facts": {}}
    with pytest.raises(interrupted.RefusedError) as refused:
        interrupted.plan_resume(fleet, record, [])
    assert "before its canary analysis passed" in refused.value.message
    assert "run the deploy again (igops deploy R2)" in refused.value.hint
