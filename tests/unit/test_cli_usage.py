"""Usage errors through the real command line: one igops line on stderr, and with --json
anywhere on the line, exactly one envelope on stdout (exit 2, error and hint filled)."""

import json

import pytest

from tests.conftest import run_igops

USAGE_ERRORS = {
    "missing argument": (["pg", "switchover"], "pg switchover", "missing argument CLUSTER"),
    "missing option": (["redis", "switchover"], "redis switchover", "missing option --to"),
    "missing option value": (["hosts", "--role"], "hosts", "option '--role' requires an argument"),
    "unknown flag": (["hosts", "--rol", "db"], "hosts", "unknown option --rol"),
    "non-numeric id": (["shard", "move", "x"], "shard move", "bad value for SHARD: 'x' is not a whole number"),
    "out of range": (["shard", "move", "--", "-3"], "shard move", "must be at least 0"),
    "unknown command": (["frob"], "igops", "no such command 'frob'"),
}


@pytest.mark.parametrize("name", USAGE_ERRORS)
@pytest.mark.parametrize("json_first", [True, False])
def test_usage_error_with_json_is_one_envelope(name, json_first):
    argv, command, message = USAGE_ERRORS[name]
    verb = 1 if command == "igops" else len(command.split())  # --json right after the verb
    line = ["--json", *argv] if json_first else [*argv[:verb], "--json", *argv[verb:]]
    result = run_igops(*line)
    assert result.returncode == 2, result.stderr
    envelope = json.loads(result.stdout)  # the whole of stdout is one JSON document
    assert envelope["command"] == command and envelope["ok"] is False and envelope["exit_code"] == 2
    assert message in envelope["error"]["message"]
    assert envelope["error"]["hint"] and "--help" in envelope["error"]["hint"]


@pytest.mark.parametrize("name", USAGE_ERRORS)
def test_usage_error_without_json_is_one_igops_line(name):
    argv, _, message = USAGE_ERRORS[name]
    result = run_igops(*argv)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Input should be" not in result.stderr and "Usage:" not in result.stderr


def test_unknown_flag_names_the_close_one():
    result = run_igops("hosts", "--rol", "db")
    assert "did you mean --role?" in result.stderr


def test_inventory_type_error_is_in_igops_words(tmp_path):
    path = tmp_path / "igops.toml"
    path.write_text('[ssh]\nport = "x"\n[[hosts]]\nname = "web1"\naddress = "127.0.0.1"\nroles = ["app"]\n')
    result = run_igops("-c", str(path), "hosts")
    assert result.returncode == 2
    assert "ssh.port: 'x' is not a whole number" in result.stderr
    assert "Input should be" not in result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["pg", "switchover", "main", "--to", "db2", "--force"],
        ["redis", "rejoin", "redis1", "--force", "--yes"],
        ["pg", "failover", "main", "--force"],
    ],
)
def test_force_is_refused_naming_both_meanings(argv):
    """patronictl's --force skips the prompt; igops' safety override is --accept-risk. --force is
    refused rather than guessed, with one line that says which is which."""
    result = run_igops("--json", *argv)
    assert result.returncode == 2
    envelope = json.loads(result.stdout)
    assert envelope["error"]["message"] == "--force is not an igops option"
    hint = envelope["error"]["hint"]
    assert "--yes to skip the confirmation prompt" in hint and "--accept-risk to override the safety checks" in hint
    assert len(result.stderr.strip().splitlines()) == 1


def test_force_on_a_verb_without_a_safety_override_points_at_yes():
    result = run_igops("snapshot", "create", "db1", "--force")
    assert result.returncode == 2 and result.stdout == ""
    assert "pass --yes to skip the confirmation prompt (this command has no safety override)" in result.stderr


def test_force_after_the_double_dash_belongs_to_the_remote_command(tmp_path):
    from tests.unit.inventories import unit_inventory

    config = unit_inventory(tmp_path, [("web1", "127.0.20.250", "app")])
    result = run_igops("-c", str(config), "exec", "--dry-run", "--", "rm", "--force", "/tmp/x")
    assert result.returncode == 0, result.stderr
    assert "--force" in result.stdout


def test_a_misspelt_deploy_verb_is_suggested_before_it_is_taken_for_a_revision():
    result = run_igops("deploy", "rollbak", "--json")
    assert result.returncode == 2
    error = json.loads(result.stdout)["error"]
    assert error["message"] == "no such command 'rollbak'"
    assert error["hint"].startswith("did you mean: igops deploy rollback?")
    assert "igops deploy run rollbak" in error["hint"]  # a revision of that name still deploys


def test_an_unknown_verb_suggests_the_whole_command_line():
    result = run_igops("snapshot", "lst")
    assert result.returncode == 2
    assert "error: no such command 'lst' — did you mean: igops snapshot list?" in result.stderr


def test_deploy_help_names_the_run_form_and_its_examples():
    text = run_igops("deploy", "--help").stdout
    assert "igops deploy [REV]" in text and "igops deploy run --help" in text and "Examples:" in text


def test_a_revision_that_only_looks_like_run_is_still_a_revision(tmp_path):
    from tests.unit.inventories import unit_inventory

    config = unit_inventory(tmp_path, [("app1", "127.0.20.250", "app")])
    result = run_igops("-c", str(config), "deploy", "run2", "--dry-run")
    assert result.returncode == 2 and "unknown git revision 'run2'" in result.stderr
