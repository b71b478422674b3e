"""The canary analysis on synthetic windows of traffic: what fails it, what leaves it
inconclusive, and that a good release under the lab's kind of load does not fail it."""

import random

import pytest

from igops import deploy_canary as canary
from igops.deploy_accesslog import Request
from igops.inventory_model import DeployCanary

LIMITS = canary.Thresholds.of(DeployCanary())
ENDPOINTS = ("GET /api/feed", "GET /api/photos/:id", "POST /api/photos/:id/like", "GET /api/users/:id")


def window(
    rng,
    hosts,
    requests,
    error_rate=0.001,
    median_s=0.012,
    slow_endpoint=None,
    slow_factor=1.0,
    failing_endpoint=None,
    endpoint_error_rate=0.0,
):
    """Requests on `hosts`: lognormal response times (a long right tail), rounded to nginx's
    millisecond, spread over four endpoints."""
    records = {host: [] for host in hosts}
    for index in range(requests):
        endpoint = ENDPOINTS[index % len(ENDPOINTS)]
        took = median_s * rng.lognormvariate(0, 0.6) * (slow_factor if endpoint == slow_endpoint else 1.0)
        rate = endpoint_error_rate if endpoint == failing_endpoint else error_rate
        status = 503 if rng.random() < rate else 200
        host = hosts[index % len(hosts)]
        records[host].append(Request(1000.0 + index / 40, f"{host}:8000", status, round(took, 3), endpoint))
    return records


def analyse(canary_records, baseline_records, restarts=None, limits=LIMITS):
    return canary.analyse(
        ["app1"],
        ["app2", "app3"],
        {**canary_records, **baseline_records},
        restarts or {},
        limits,
        60.0,
    )


def test_a_good_release_under_lab_load_never_fails():
    """Forty requests a second through one nginx, a third to the canary, for a minute: the same
    release on both sides, a hundred windows. Significance alone fails some of them (a test at
    alpha 0.01 is wrong once in a hundred, and each window runs ten); with the effect
    thresholds, none fails."""
    rng = random.Random(20)
    significant = 0
    for _ in range(100):
        evidence = analyse(window(rng, ["app1"], 800), window(rng, ["app2", "app3"], 1600))
        assert evidence.verdict == canary.PASS, evidence.summary()
        tested = [evidence.overall, *(item.comparison for item in evidence.endpoints)]
        significant += any(
            p is not None and p < LIMITS.alpha for found in tested for p in (found.error_p, found.latency_p)
        )
    assert significant > 0, "the draw had no window that significance alone would fail: a weaker test"


def test_more_server_errors_on_the_canary_fail_it_with_the_evidence():
    rng = random.Random(1)
    evidence = analyse(window(rng, ["app1"], 800, error_rate=0.05), window(rng, ["app2", "app3"], 1600))
    assert evidence.verdict == canary.FAIL
    assert evidence.overall.error_p < 0.001 and evidence.overall.error_increase > 0.03
    assert any(reason.startswith("5xx ") for reason in evidence.reasons), evidence.reasons
    assert "canary fail" in evidence.summary() and "5xx" in evidence.summary()
    brief = evidence.brief()
    assert brief["verdict"] == "fail" and brief["canary"]["requests"] == 800


def test_a_significant_but_small_rise_in_errors_is_not_a_regression():
    rng = random.Random(2)
    # 0.4% against 0.1% on 20000 requests a side: significant, under one percentage point.
    evidence = analyse(
        window(rng, ["app1"], 20000, error_rate=0.004), window(rng, ["app2", "app3"], 20000, error_rate=0.001)
    )
    assert evidence.overall.error_p < LIMITS.alpha
    assert evidence.verdict == canary.PASS, evidence.summary()


def test_a_slower_canary_fails_on_latency_with_the_ratios():
    rng = random.Random(3)
    evidence = analyse(window(rng, ["app1"], 800, median_s=0.060), window(rng, ["app2", "app3"], 1600))
    assert evidence.verdict == canary.FAIL
    assert evidence.overall.latency_p < 0.001 and evidence.overall.p50_ratio > 3
    assert any(reason.startswith("p50 ") for reason in evidence.reasons), evidence.reasons


def test_a_ratio_of_a_few_milliseconds_is_no_regression():
    """2 ms against 1 ms is twice as slow and significant, and harmless: the increase floor."""
    rng = random.Random(4)
    evidence = analyse(window(rng, ["app1"], 4000, median_s=0.002), window(rng, ["app2", "app3"], 4000, median_s=0.001))
    assert evidence.overall.latency_p < LIMITS.alpha and evidence.overall.p50_ratio >= 1.5
    assert evidence.verdict == canary.PASS, evidence.summary()


def test_one_slow_endpoint_is_named_and_fails_the_canary():
    rng = random.Random(5)
    evidence = analyse(
        window(rng, ["app1"], 2000, slow_endpoint="GET /api/feed", slow_factor=8),
        window(rng, ["app2", "app3"], 4000),
    )
    assert evidence.verdict == canary.FAIL
    assert evidence.endpoints[0].endpoint == "GET /api/feed" and evidence.endpoints[0].comparison.failed
    assert evidence.worst_endpoints[0].startswith("GET /api/feed:") and "(regressed)" in evidence.worst_endpoints[0]
    assert any(reason.startswith("GET /api/feed: p") for reason in evidence.reasons), evidence.reasons


def test_an_endpoint_that_errors_is_found_even_when_the_whole_is_within_limits():
    rng = random.Random(6)
    evidence = analyse(
        window(rng, ["app1"], 4000, failing_endpoint="POST /api/photos/:id/like", endpoint_error_rate=0.03),
        window(rng, ["app2", "app3"], 8000),
    )
    assert evidence.overall.error_increase < LIMITS.max_error_rate_increase
    assert evidence.verdict == canary.FAIL
    assert evidence.endpoints[0].endpoint == "POST /api/photos/:id/like"


def test_endpoints_with_too_few_requests_on_either_side_are_not_compared():
    rng = random.Random(7)
    evidence = analyse(window(rng, ["app1"], 240), window(rng, ["app2", "app3"], 1600))
    # 60 canary requests per endpoint: compared; with min_endpoint_requests 100, none are.
    assert len(evidence.endpoints) == 4
    strict = canary.Thresholds.of(DeployCanary(min_endpoint_requests=100))
    assert analyse(window(rng, ["app1"], 240), window(rng, ["app2", "app3"], 1600), limits=strict).endpoints == []


def test_too_little_traffic_is_inconclusive_never_a_pass():
    rng = random.Random(8)
    evidence = analyse(window(rng, ["app1"], 150), window(rng, ["app2", "app3"], 1600))
    assert evidence.verdict == canary.INCONCLUSIVE
    assert evidence.reasons == ["the canary answered 150 requests, fewer than min_requests 200"]
    none = canary.analyse(["app1"], [], window(rng, ["app1"], 800), {}, LIMITS, 60.0)
    assert none.verdict == canary.INCONCLUSIVE and "no app server on the old release" in none.reasons[0]


def test_worker_restarts_beyond_the_baselines_fail_the_canary_even_when_quiet():
    rng = random.Random(9)
    busy = analyse(
        window(rng, ["app1"], 800), window(rng, ["app2", "app3"], 1600), restarts={"app1": 3, "app2": 1, "app3": 0}
    )
    assert busy.verdict == canary.FAIL
    assert busy.reasons == ["app1: 3 gunicorn worker restarts in the window (allowed 1)"]
    even = analyse(
        window(rng, ["app1"], 800), window(rng, ["app2", "app3"], 1600), restarts={"app1": 1, "app2": 1, "app3": None}
    )
    assert even.verdict == canary.PASS, "as many as the busiest baseline host: no regression"
    quiet = analyse(window(rng, ["app1"], 10), window(rng, ["app2", "app3"], 20), restarts={"app1": 2})
    assert quiet.verdict == canary.FAIL
    unknown = analyse(window(rng, ["app1"], 800), window(rng, ["app2", "app3"], 1600), restarts={"app1": None})
    assert unknown.verdict == canary.PASS and unknown.restarts == {"app1": None}


def test_identical_times_on_both_sides_are_no_latency_test():
    records = {
        "app1": [Request(1.0, "a:1", 200, 0.0, "GET /x")] * 300,
        "app2": [Request(1.0, "b:1", 200, 0.0, "GET /x")] * 300,
    }
    evidence = canary.analyse(["app1"], ["app2"], records, {}, LIMITS, 60.0)
    assert evidence.verdict == canary.PASS and evidence.overall.latency_p is None
    assert evidence.overall.p50_ratio == 0.0


@pytest.mark.parametrize("name", [field for field in canary.Thresholds.__dataclass_fields__])
def test_every_threshold_is_an_inventory_key_with_the_same_default(name):
    assert getattr(canary.Thresholds(), name) == getattr(DeployCanary(), name)
