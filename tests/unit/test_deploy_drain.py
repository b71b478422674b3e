"""A batch's drain with two load balancers, one of which refuses it (its `nginx -t` fails), run
through the real upstream agent on real upstream files: the one that took the batch out puts it
back, so the batch is out on every load balancer or on none; if that fails too, the batch's
hosts are reported out of the load balancer that still has them out, and keep their rotation
leases until the run ends."""

import asyncio
import shlex

import pytest

from igops import deploy, deploy_agents, deploy_plan, inventory
from igops.agent import upstream
from igops.coordination import LocalCoordinator
from igops.deploy_canary_plan import AnalysisOptions
from igops.deploy_gate import LoadBalancers
from igops.operations import engine, rotation
from igops.output import Reporter
from tests.unit.inventories import unit_inventory
from tests.unit.test_deploy_rollout import TREE, surveys
from tests.unit.test_deploy_rotation import spec


async def upstream_answer(session, document) -> deploy_agents.AgentAnswer:
    """What a load balancer's upstream agent answers `document` with: its request handler run in
    this process, on the files its command line names."""
    *_, path, test_command, reload_command, drain_seconds = shlex.split(session.command)
    try:
        answer = await asyncio.to_thread(
            upstream.handle, path, test_command, reload_command, float(drain_seconds), document
        )
    except upstream.Refused as refused:
        return deploy_agents.AgentAnswer(None, str(refused), True)
    return deploy_agents.AgentAnswer(answer, None, True)


APPS = {"app1": "127.0.32.1", "app2": "127.0.32.2", "app3": "127.0.32.3"}
LBS = {"lb1": "127.0.32.100", "lb2": "127.0.32.101"}

# `nginx -t` on one load balancer: passes as many more times as its `passes` file says (no file:
# always), then fails as nginx does on a broken configuration.
NGINX = """#!/bin/sh
here=$(dirname "$0")
[ -f "$here/passes" ] || exit 0
left=$(cat "$here/passes")
if [ "$left" -gt 0 ]; then echo $((left - 1)) > "$here/passes"; exit 0; fi
echo 'nginx: [emerg] unknown directive "sever" in /etc/nginx/conf.d/app.conf:12' >&2
exit 1
"""


@pytest.fixture
def lb_agents(monkeypatch):
    """Each load balancer's upstream agent runs its request handler in this process, on that
    LB's own files, without nginx's workers to wait for. Only the load balancers are asked:
    a batch that never leaves rotation is never switched."""
    monkeypatch.setattr(upstream, "workers", dict)

    async def request(session, document, timeout, payload=b""):
        assert "igops-upstream" in session.command, f"{session.target.name} was asked {document}"
        return await upstream_answer(session, document)

    monkeypatch.setattr(deploy_agents.AgentSession, "request", request)


def two_lbs(tmp_path, passes):
    """app1..app3 behind lb1 and lb2; `passes`: LB -> how many `nginx -t` runs pass there."""
    for name in LBS:
        directory = tmp_path / name
        directory.mkdir()
        (directory / "upstream.conf").write_text(
            "upstream app {\n" + "".join(f"    server {address}:8000;\n" for address in APPS.values()) + "}\n"
        )
        (directory / "nginx").write_text(NGINX)
        (directory / "nginx").chmod(0o755)
        if name in passes:
            (directory / "passes").write_text(str(passes[name]))
    sections = (
        f'[app]\nroot = "{tmp_path}/hosts/{{host}}/app"\n'
        f'[lb]\nupstream_file = "{tmp_path}/{{host}}/upstream.conf"\n'
        f'test_command = "{tmp_path}/{{host}}/nginx -t"\nreload_command = "true"\n'
    )
    hosts = [(name, address, "app") for name, address in APPS.items()]
    hosts += [(name, address, "lb") for name, address in LBS.items()]
    return deploy.AppFleet.of(inventory.load(unit_inventory(tmp_path, hosts, sections=sections)))


def deploy_in_operation(app, monkeypatch):
    """A deploy in batches of one, run as an operation: its result, and the rotation leases it
    held as the run ended, and once the operation was over."""
    monkeypatch.setattr(
        deploy_plan, "survey_for_change", lambda app, parallel: (surveys(app), LoadBalancers(app, "survey").read())
    )
    monkeypatch.setattr(deploy_plan, "journal_records", lambda fleet: [])
    backend = LocalCoordinator(app.fleet.state_dir)

    def leased():
        return sorted(name for (_, name), _ in backend.holders(rotation.ROTATION))

    at_end = []
    release_all = rotation.RotationLeases.release_all

    def released_at_the_end(leases):
        at_end.extend(leased())
        release_all(leases)

    monkeypatch.setattr(rotation.RotationLeases, "release_all", released_at_the_end)
    gate = deploy.HealthGate("/health", 8000, 3, 30)

    def action(operation):
        made, _ = deploy.plan_deploy(app, TREE, "1", None, gate, analysis=AnalysisOptions(seconds=0))
        with pytest.raises(deploy.RolloutFailed) as failed:
            deploy.execute(app, made, operation.reporter)
        return failed.value.result

    result = engine.perform(app.fleet, spec(list(APPS)), action, Reporter())
    return result, at_end, leased()


def marked_down(tmp_path, lb):
    text = (tmp_path / lb / "upstream.conf").read_text()
    return [name for name, address in APPS.items() if f"server {address}:8000 down;" in text]


def test_a_drain_one_load_balancer_refuses_is_undone_on_the_others(tmp_path, monkeypatch, lb_agents):
    app = two_lbs(tmp_path, {"lb2": 0})
    result, at_end, after = deploy_in_operation(app, monkeypatch)
    assert marked_down(tmp_path, "lb1") == [] and marked_down(tmp_path, "lb2") == []
    assert "igops-drained" not in (tmp_path / "lb1" / "upstream.conf").read_text()
    assert result.stopped.startswith(
        "batch 1: could not take app1 out of the load balancer: load balancer change failed: lb2: configuration "
        "test failed, upstream file restored (exit 1): nginx: [emerg] unknown directive"
    )
    assert result.stopped.endswith("; put back in on lb1, which had taken it out; nothing in it was switched")
    assert [(host.state, host.in_lb) for host in result.hosts] == [(deploy.NOT_STARTED, True)] * 3
    assert "; out of the load balancer:" not in result.summary()
    assert at_end == after == []


def test_a_drain_not_undone_either_leaves_its_hosts_named_out_and_leased_until_the_run_ends(
    tmp_path, monkeypatch, lb_agents
):
    # lb1's configuration breaks after the drain: its `nginx -t` passes once, then fails.
    app = two_lbs(tmp_path, {"lb1": 1, "lb2": 0})
    result, at_end, after = deploy_in_operation(app, monkeypatch)
    assert marked_down(tmp_path, "lb1") == ["app1"] and marked_down(tmp_path, "lb2") == []
    assert "still out of rotation on lb1, where putting it back failed: load balancer change failed: lb1: " in (
        result.stopped
    )
    outcomes = {host.host: host for host in result.hosts}
    assert (outcomes["app1"].state, outcomes["app1"].in_lb, outcomes["app1"].out_on) == (
        deploy.NOT_STARTED,
        False,
        ["lb1"],
    )
    assert outcomes["app2"].in_lb and outcomes["app3"].in_lb
    assert result.summary().endswith("; out of the load balancer: app1 (on lb1) (rerun to finish)")
    assert at_end == ["app1"], "other operations count app1 out for as long as the run goes on"
    assert after == []
