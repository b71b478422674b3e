"""Usage errors through the real command line: one igops line on stderr, and with --json
anywhere on the line, exactly one envelope on stdout (exit 2, error and hint filled)."""

import json

import pytest

from tests.conftest import run_igops

USAGE_ERRORS = {
    "missing argument": (["pg", "switchover"], "pg switchover", "missing argument CLUSTER"),
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
