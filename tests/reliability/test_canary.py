"""Canary analysis in the lab under load through nginx: a release that fails one endpoint now and
then, or slows one down, while /health stays 200, is rolled back after the canary and never
reaches the second batch; a good release passes every time; too little traffic holds for a
person or follows --on-inconclusive; min_in_service refuses a plan, and holds across two
deploys to different app servers at once."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from igops.errors import ExitCode
from tests.conftest import ROOT, run_igops
from tests.labtools import wait_for
from tests.reliability.test_deploy import (
    APP_HOSTS,
    DEPLOY_TIMEOUT,
    app_copy,
    current_of,
    drained,
    served_by,
    upstream_text,
)
from tests.reliability.test_failover import Load

pytestmark = pytest.mark.lab

# Seconds of analysis: at the load below, about 700 requests reach the canary (one of three app
# servers) in it, past [deploy.canary] min_requests with room to spare.
WINDOW = 20
# What a good release and a slow one need: 350 requests in 10 s, 1.75 times min_requests, and about
# 90 of them the photo endpoint's (min_endpoint_requests is 50). 150 ms more on each of those 90 is
# far past what the latency comparison needs; a good release's false failures are the unit tests'.
SHORT_WINDOW = 10
# Errors are rare events: the canary (a third of the traffic) shows a 5% error rate on the photo
# endpoint as about 0.45 errors a second, and the per-endpoint Fisher test (alpha 0.01 over the
# endpoints compared) needs about six with none on the baseline. In 20 s that is a Poisson mean of
# 9, and a release missed about one run in eight; it takes 40 s to make a miss rarer than one in
# 5,000 (docs/deploy.md). The release below fails 10% of them instead: a mean of 18 in 20 s.
# How often a good release fails is the unit tests' (a hundred same-release windows of this kind
# of load, none failing); here three real releases show that nothing in the lab itself (workers
# booting, the first requests of a release) fails a good one.
GOOD_RUNS = 3


class ReadLoad(Load):
    """Mostly reads, faster than the failover tests' load: the endpoints a bad release breaks
    are read ones, and the analysis needs their traffic."""

    def __init__(self, lab, tmp_path):
        super().__init__(lab, tmp_path, duration=900)
        self.argv[self.argv.index("--rate") + 1] = "110"
        self.argv[self.argv.index("--write-ratio") + 1] = "0.2"


@pytest.fixture(scope="module", autouse=True)
def ends_on_the_working_tree_release(lab):
    yield
    done = run_igops("-c", str(lab.source), "deploy", "--analysis", "0", "--yes", timeout=DEPLOY_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert " down" not in upstream_text()


def patched(source: Path, original: str, replacement: str) -> Path:
    views = source / "views.py"
    text = views.read_text()
    assert original in text, original
    views.write_text(text.replace(original, replacement))
    return source


PHOTO_DETAIL = '    return JsonResponse(current.service.get_photo(parse_id(photo_ref, "photo id")))\n'
# One request of ten to the photo endpoint fails; /health stays 200.
ERROR_RELEASE = (
    "    import random\n\n    if random.random() < 0.1:\n"
    '        return JsonResponse({"error": "injected by the canary test"}, status=500)\n' + PHOTO_DETAIL
)
# The analysis with a tenth of the traffic on the canary: about 10 requests a second reach it at
# the load below, a quarter of them the photo endpoint. A 5% error rate there comes at about 0.13
# errors a second, and against none on the baseline the per-endpoint Fisher test needs 3 (2 give
# p = 0.008, above alpha over the endpoints): a 30 s window misses about one run in four (CI saw
# it: 2 errors in 301 requests), and it takes 120 s (a mean of 15) to make a miss rarer than one
# in 40,000 (docs/deploy.md). This test is about the share and the weights, so its release fails
# half of those requests instead: about 1.3 errors a second, a mean of 25 in 20 s where 3 are
# enough (fewer come less than one run in 50 million). In those 20 s the canary answers about 200
# requests (ReadLoad drives 110 a second), 50 of them the photo endpoint's: the test's inventory
# halves min_requests and min_endpoint_requests (200 and 50 by default) to 100 and 25, which that
# clears about twice over. Feed and photo are the endpoints compared (the next, like, gets about
# 18), so alpha is split in two and 3 errors still do.
SHARED_WINDOW = 20
SHARED_LIMITS = "min_requests = 100\nmin_endpoint_requests = 25\n"
SHARED_ERROR_RELEASE = ERROR_RELEASE.replace("random.random() < 0.1", "random.random() < 0.5")


def deploy(
    lab, source: Path | None, *extra: str, config: Path | None = None
) -> tuple[subprocess.CompletedProcess, dict]:
    argv = ["-c", str(config or lab.source), "deploy"]
    argv += ["--source", str(source)] if source else []
    argv += ["--batch", "1", "--yes", "--json", *extra]
    if not any(arg.startswith("--analysis") for arg in extra):
        argv += ["--analysis", str(WINDOW)]
    done = run_igops(*argv, timeout=DEPLOY_TIMEOUT + max(WINDOW, SHARED_WINDOW))
    return done, json.loads(done.stdout) if done.stdout.strip() else {}


def canary_of(envelope: dict) -> dict:
    """The canary's evidence in a deploy's envelope, whether it ended well or not."""
    text = json.dumps(envelope)
    found = re.search(r'"verdict": "(pass|fail|inconclusive)"', text)
    assert found, text[-3000:]
    return envelope


def canary_facts(envelope) -> list[dict]:
    """Each analysis in a deploy's envelope: its verdict, the reasons and the evidence."""
    if isinstance(envelope, dict):
        here = [envelope] if "verdict" in envelope and "reasons" in envelope else []
        return here + [found for value in envelope.values() for found in canary_facts(value)]
    if isinstance(envelope, list):
        return [found for value in envelope for found in canary_facts(value)]
    return []


def releases() -> dict[str, str]:
    return {host: current_of(host) for host in APP_HOSTS}


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "kind, original, replacement, endpoint, window",
    [
        (
            "errors",
            PHOTO_DETAIL,
            ERROR_RELEASE,
            "/api/photos/:id",
            WINDOW,
        ),
        (
            "latency",
            PHOTO_DETAIL,
            "    import time\n\n    time.sleep(0.15)\n" + PHOTO_DETAIL,
            "/api/photos/:id",
            SHORT_WINDOW,
        ),
    ],
)
def test_a_release_bad_where_health_does_not_look_is_rolled_back_after_the_canary(
    lab, tmp_path, kind, original, replacement, endpoint, window
):
    before = releases()
    bad = patched(app_copy(tmp_path, f"bad-{kind}"), original, replacement)
    with ReadLoad(lab, tmp_path):
        done, envelope = deploy(lab, bad, "--analysis", str(window))
    assert done.returncode == ExitCode.FAILED, (done.returncode, done.stderr[-3000:])
    text = json.dumps(canary_of(envelope))
    assert '"verdict": "fail"' in text, text[-3000:]
    assert endpoint in text, f"the report does not name {endpoint}: {text[-3000:]}"
    # The canary is back on the release it had; batch 2 never began.
    assert releases() == before, (releases(), before)
    assert " down" not in upstream_text()
    print(f"\n{kind}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")


def overall_of(document) -> dict | None:
    """The canary evidence's `overall` comparison, wherever the envelope holds it."""
    if isinstance(document, dict):
        if isinstance(document.get("overall"), dict) and "canary" in document["overall"]:
            return document["overall"]
        children = list(document.values())
    elif isinstance(document, list):
        children = document
    else:
        return None
    return next((found for child in children if (found := overall_of(child)) is not None), None)


@pytest.mark.timeout(900)
def test_a_canary_given_a_tenth_of_the_traffic_takes_about_that_and_every_weight_goes_back(lab, tmp_path):
    """[deploy.canary] traffic_percent = 10: while the analysis watches, the canary (one server of
    three, a third of the traffic on its even share) answers about a tenth of the requests, an
    error-rate release still fails its analysis on them, and nginx's weights are as before."""
    config = tmp_path / "igops.toml"
    config.write_text(lab.source.read_text() + "\n[deploy.canary]\ntraffic_percent = 10\n" + SHARED_LIMITS)
    before, weights_before = releases(), upstream_text()
    bad = patched(app_copy(tmp_path, "bad-share"), PHOTO_DETAIL, SHARED_ERROR_RELEASE)
    with ReadLoad(lab, tmp_path):
        done, envelope = deploy(lab, bad, "--analysis", str(SHARED_WINDOW), config=config)
    assert done.returncode == ExitCode.FAILED, (done.returncode, done.stderr[-3000:])
    assert '"verdict": "fail"' in json.dumps(envelope), json.dumps(envelope)[-3000:]
    overall = overall_of(envelope)
    assert overall is not None, json.dumps(envelope)[-3000:]
    canary, baseline = overall["canary"]["requests"], overall["baseline"]["requests"]
    share = canary / (canary + baseline)
    print(f"\nthe canary answered {canary} of {canary + baseline} requests ({share:.1%}) at traffic_percent 10")
    # 1/11 by the weights nginx was given (the two others at weight=5); nginx's round robin
    # holds it to within a request or two per cycle, far from a third.
    assert 0.05 < share < 0.13, share
    assert releases() == before
    assert upstream_text() == weights_before, "every weight went back, nothing left down"


@pytest.mark.timeout(1200)
def test_a_good_release_passes_every_time(lab, tmp_path):
    verdicts = []
    with ReadLoad(lab, tmp_path) as load:
        for run in range(GOOD_RUNS):
            done, envelope = deploy(lab, app_copy(tmp_path, f"good-{run}"), "--analysis", str(SHORT_WINDOW))
            text = json.dumps(envelope)
            # On a failure, the verdict's reasons and evidence say which test the release failed.
            assert done.returncode == 0, (run, canary_facts(envelope), done.stderr[-3000:])
            assert '"verdict": "pass"' in text, (run, canary_facts(envelope))
            assert len(set(releases().values())) == 1, releases()
            verdicts.append("pass")
        assert load.running
    assert verdicts == ["pass"] * GOOD_RUNS


@pytest.mark.timeout(900)
def test_too_little_traffic_holds_for_a_person_or_follows_on_inconclusive(lab, tmp_path):
    """With no load the analysis sees too little: the deploy holds (exit 6) with the canary in
    place; the same deploy again with --on-inconclusive continue goes on from batch 2; a third
    release with --on-inconclusive rollback returns its canary."""
    before = releases()
    quiet = app_copy(tmp_path, "quiet")
    done, envelope = deploy(lab, quiet, "--analysis", "2")
    assert done.returncode == ExitCode.HELD, (done.returncode, done.stderr[-3000:])
    assert '"verdict": "inconclusive"' in json.dumps(envelope)
    held = releases()
    changed = [host for host in APP_HOSTS if held[host] != before[host]]
    assert len(changed) == 1, (held, before)  # the canary alone
    assert " down" not in upstream_text()
    done, envelope = deploy(lab, quiet, "--analysis", "2", "--on-inconclusive", "continue")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(set(releases().values())) == 1, releases()
    on_quiet = releases()
    done, envelope = deploy(lab, app_copy(tmp_path, "quiet-back"), "--analysis", "2", "--on-inconclusive", "rollback")
    assert done.returncode != 0, done.stderr[-3000:]
    assert releases() == on_quiet, (releases(), on_quiet)


def all_serving(lab) -> bool:
    """Every app server answers /health (one started again takes a few seconds to boot)."""
    try:
        return all(served_by(lab, host) for host in APP_HOSTS)
    except OSError:
        return False


def with_deploy_settings(lab, tmp_path: Path, settings: str) -> Path:
    """A copy of the lab's inventory whose [deploy] section says `settings`."""
    text = lab.source.read_text()
    config = tmp_path / "igops.toml"
    if re.search(r"^\[deploy\]$", text, re.M):
        text = re.sub(r"^\[deploy\]$", "[deploy]\n" + settings, text, count=1, flags=re.M)
    else:
        text += "\n[deploy]\n" + settings + "\n"
    config.write_text(text)
    return config


@pytest.mark.timeout(600)
def test_a_plan_that_would_leave_fewer_than_min_in_service_is_refused(lab, tmp_path):
    """One of three app servers out of the load balancer (its gunicorn stopped), min_in_service 2
    and batches of 2: refused before anything changes."""
    config = with_deploy_settings(lab, tmp_path, "min_in_service = 2")
    from igops.lab import proc, state

    before = releases()
    pid = int((state.paths().app_root("app3") / "shared" / "gunicorn.pid").read_text().strip())
    os.kill(pid, signal.SIGTERM)
    # Dead, not gone: the lab's daemons may be this process's children, left as zombies.
    assert wait_for(lambda: not proc.alive(pid), 30)
    try:
        argv = ["-c", str(config), "deploy", "--source", str(app_copy(tmp_path, "min")), "--batch", "2"]
        done = run_igops(*argv, "--analysis", "0", "--yes", timeout=DEPLOY_TIMEOUT)
        assert done.returncode == ExitCode.REFUSED, (done.returncode, done.stderr[-3000:])
        assert "min_in_service" in done.stderr, done.stderr[-3000:]
        assert releases() == before
    finally:
        restarted = run_igops("lab", "up", timeout=600)
        assert restarted.returncode == 0, restarted.stderr[-3000:]
        assert proc.running_pid(state.paths().app_root("app3") / "shared" / "gunicorn.pid"), "app3 not started again"
        assert wait_for(lambda: all_serving(lab), 60), "app3 never answered /health again"


def deploy_to(config: Path, source: Path, host: str) -> subprocess.CompletedProcess:
    """A /health-gated deploy of `source` to `host` alone."""
    argv = ["-c", str(config), "deploy", "--source", str(source), "--hosts", host, "--analysis", "0", "--yes"]
    return run_igops(*argv, timeout=DEPLOY_TIMEOUT)


@pytest.mark.timeout(600)
def test_two_deploys_together_never_take_more_than_min_in_service_allows(lab, tmp_path):
    """A deploy to app1 whose release fails /health holds app1 out of rotation while its gate
    waits (10 s: the second deploy's refusal takes about one); meanwhile a deploy to app2
    (min_in_service 2 of 3) is refused, naming the other operation; once the first is over, the
    second goes through."""
    assert wait_for(lambda: all_serving(lab), 60), "an app server does not answer /health"
    config = with_deploy_settings(lab, tmp_path, "min_in_service = 2")
    broken = app_copy(tmp_path, "broken", break_health=True)
    first = subprocess.Popen(
        [sys.executable, "-m", "igops", "-c", str(config), "deploy", "--source", str(broken)]
        + ["--hosts", "app1", "--analysis", "0", "--health-timeout", "10", "--yes"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: drained(lab, "app1"), 90), first.communicate()
        app2_before = current_of("app2")
        done = deploy_to(config, app_copy(tmp_path, "second"), "app2")
        assert done.returncode == ExitCode.REFUSED, (done.returncode, done.stderr[-3000:])
        print(f"\nthe second deploy: {done.stderr.strip().splitlines()[-1]}")
        assert "min_in_service" in done.stderr, done.stderr[-3000:]
        # The refusal names the server out and the deploy that holds it out.
        assert re.search(r"app1 \(drained by igops \(deploy \S+ to ", done.stderr), done.stderr[-3000:]
        assert current_of("app2") == app2_before
    finally:
        first.communicate(timeout=DEPLOY_TIMEOUT)
    assert first.returncode != 0  # its release failed the gate and was switched back
    assert wait_for(lambda: " down" not in upstream_text(), 30), upstream_text()
    done = deploy_to(config, app_copy(tmp_path, "after"), "app2")
    assert done.returncode == 0, done.stderr[-3000:]
