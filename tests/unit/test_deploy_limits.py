"""max_fail and min_in_service: counts or percentages, the rounding each way, the inventory's
[deploy] section and its validation."""

import pytest

from igops import inventory
from igops.deploy_limits import HostLimit, describe_budget, too_many_failures
from igops.errors import ConfigError, UsageError
from tests.unit.test_inventory import GOOD, write


def failures_tolerated(limit: str, total: int) -> list[bool]:
    """For 0..total failed hosts: whether the rollout goes on."""
    allowed = HostLimit.of(limit, "--max-fail").allowed_failures(total)
    return [not too_many_failures(failed, allowed) for failed in range(total + 1)]


def test_max_fail_25_percent_of_4_lets_one_fail_and_stops_at_the_second():
    """Ansible's max_fail_percentage: the play stops when MORE than the percentage failed."""
    assert failures_tolerated("25%", 4) == [True, True, False, False, False]
    assert HostLimit.of("25%").allowed_failures(4) == 1


@pytest.mark.parametrize(
    ("limit", "total", "allowed"),
    [("0", 4, 0), ("1", 4, 1), ("24%", 4, 0), ("50%", 4, 2), ("50%", 5, 2), ("10%", 25, 2), ("100%", 3, 3)],
)
def test_a_failure_budget_rounds_down(limit, total, allowed):
    assert HostLimit.of(limit).allowed_failures(total) == allowed


@pytest.mark.parametrize(("limit", "total", "needed"), [("1", 25, 1), ("50%", 5, 3), ("50%", 4, 2), ("1%", 25, 1)])
def test_a_minimum_in_service_rounds_up(limit, total, needed):
    assert HostLimit.of(limit).at_least(total) == needed


@pytest.mark.parametrize("bad", ["-1", "x", "101%", "1.5", "25 percent"])
def test_a_bad_max_fail_option_is_a_usage_error_naming_the_option(bad):
    with pytest.raises(UsageError) as refused:
        HostLimit.of(bad, "--max-fail")
    assert "--max-fail 25%" in refused.value.hint


def test_budgets_read_as_people_say_them():
    assert describe_budget(HostLimit.of("25%"), 4) == "25% (1 of 4 hosts)"
    assert describe_budget(HostLimit.of(2), 4) == "2"


def test_the_deploy_section_and_its_defaults(tmp_path):
    model = inventory.load_file(write(tmp_path, GOOD)).model.deploy
    assert (model.min_in_service, model.max_fail) == (1, 0)
    assert (model.canary.window, model.canary.alpha, model.canary.min_requests) == (60, 0.01, 200)
    text = GOOD + '[deploy]\nmin_in_service = "50%"\nmax_fail = "25%"\n[deploy.canary]\nmax_p95_ratio = 3\n'
    model = inventory.load_file(write(tmp_path, text)).model.deploy
    assert (model.min_in_service, model.max_fail, model.canary.max_p95_ratio) == ("50%", "25%", 3.0)


@pytest.mark.parametrize(
    ("addition", "where", "words"),
    [
        ("[deploy]\nmax_fail = -1\n", "deploy.max_fail", "negative"),
        ('[deploy]\nmax_fail = "many"\n', "deploy.max_fail", "not a host count"),
        ("[deploy]\nmax_fail = true\n", "deploy.max_fail", "not a host count"),
        ('[deploy]\nmin_in_service = "100%"\n', "deploy.min_in_service", "never let a server out"),
        ("[deploy.canary]\nalpha = 0.5\n", "deploy.canary.alpha", "at most 0.2"),
        ("[deploy.canary]\nmax_p50_ratio = 0.9\n", "deploy.canary.max_p50_ratio", "at least 1"),
        ("[deploy.canary]\nmin_endpoint_requests = 500\n", "deploy.canary", "above min_requests"),
        ("[deploy.canary]\nwindow = 0\n", "deploy.canary.window", "at least 1"),
        ("[deploy.canary]\nbogus = 1\n", "deploy.canary.bogus", "unknown key"),
    ],
)
def test_deploy_values_that_cannot_work_are_refused_with_where_and_why(tmp_path, addition, where, words):
    with pytest.raises(ConfigError) as caught:
        inventory.load_file(write(tmp_path, GOOD + addition))
    [problem] = caught.value.problems
    assert problem.where == where and words in problem.problem, problem
