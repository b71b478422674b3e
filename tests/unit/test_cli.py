"""The CLI's conventions, through the real command line: exit codes, the JSON envelope,
confirmation, dry runs, locks, the audit trail and start-up imports."""

import json
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from igops import safety
from igops.errors import ExitCode
from tests.conftest import IGOPS, ROOT, run_igops
from tests.serving import served
from tests.unit.inventories import unit_inventory


def inventory(tmp_path: Path) -> Path:
    return unit_inventory(tmp_path, [("web1", "127.0.20.250", "app"), ("web2", "127.0.20.251", "app")])


def test_json_envelope_is_the_only_thing_on_stdout(tmp_path):
    result = run_igops("-c", str(inventory(tmp_path)), "hosts", "--json")
    assert result.returncode == 0
    envelope = json.loads(result.stdout)
    assert envelope["ok"] is True and envelope["exit_code"] == 0 and envelope["command"] == "hosts"
    assert [host["name"] for host in envelope["data"]["hosts"]] == ["web1", "web2"]


def test_bad_inventory_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[hosts]]\nname = "x"\naddress = "10.0.0.1"\nroles = ["nope"]\n')
    result = run_igops("-c", str(path), "hosts")
    assert result.returncode == ExitCode.USAGE
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown role 'nope'" in lines[0] and "use one of" in lines[0]


def test_bad_inventory_in_json_mode(tmp_path):
    result = run_igops("-c", str(tmp_path / "missing.toml"), "hosts", "--json")
    envelope = json.loads(result.stdout)
    assert result.returncode == 2 and envelope["ok"] is False
    assert "inventory not found" in envelope["error"]["message"]


def test_unknown_host_and_role(tmp_path):
    config = str(inventory(tmp_path))
    result = run_igops("-c", config, "exec", "--yes", "-H", "web9", "--", "true")
    assert result.returncode == 2 and "unknown host 'web9'" in result.stderr
    result = run_igops("-c", config, "hosts", "--role", "webserver")
    assert result.returncode == 2 and "unknown role" in result.stderr


def test_mutating_command_refuses_without_yes_when_not_a_tty(tmp_path):
    config = inventory(tmp_path)
    result = run_igops("-c", str(config), "exec", "--", "touch", "/tmp/never")
    assert result.returncode == ExitCode.USAGE
    assert "stdin is not a terminal" in result.stderr and "--yes" in result.stderr
    assert not (tmp_path / "state" / "audit.log").exists()


def test_dry_run_prints_the_exact_plan_and_touches_nothing(tmp_path):
    config = inventory(tmp_path)
    result = run_igops("-c", str(config), "exec", "--dry-run", "--json", "--", "echo", "a b;c")
    assert result.returncode == 0
    envelope = json.loads(result.stdout)
    assert envelope["data"] == {"dry_run": True, "command": "echo 'a b;c'", "hosts": ["web1", "web2"]}
    assert "web1 (root@127.0.20.250:22): echo 'a b;c'" in result.stderr
    assert not (tmp_path / "state").exists()


def test_unreachable_hosts_fail_with_clear_reason_and_audit(tmp_path):
    config = inventory(tmp_path)
    result = run_igops("-c", str(config), "exec", "--yes", "--json", "--", "true")
    assert result.returncode == ExitCode.FAILED
    envelope = json.loads(result.stdout)
    errors = [host["error"] for host in envelope["data"]["hosts"]]
    assert all("connection refused" in error for error in errors)
    record = json.loads((tmp_path / "state" / "audit.log").read_text().splitlines()[-1])
    assert record["command"].startswith("igops -c") and record["exit_code"] == 1
    assert record["targets"] == ["web1", "web2"] and record["result"].startswith("failed on web1")
    assert record["user"] and record["time"] and record["duration_ms"] >= 0


@pytest.fixture
def pingdom_api(tmp_path):
    """The lab's Pingdom receiver on an ephemeral loopback port: a mutating command that
    reaches its lock without SSH."""
    from http.server import ThreadingHTTPServer

    from igops.lab.pingdom_receiver import Pingdom
    from igops.lab.receiver_base import handler_for

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(Pingdom(tmp_path, "unit-token", probe_interval=60)))
    server.daemon_threads = True
    with served(server):
        yield f"http://127.0.0.1:{server.server_address[1]}/api/3.1"


def with_pingdom(tmp_path: Path, url: str) -> Path:
    config = inventory(tmp_path)
    secrets_file = tmp_path / "secrets.toml"
    secrets_file.write_text('pingdom_token = "unit-token"\n')
    secrets_file.chmod(0o600)
    text = config.read_text().replace(
        "[[hosts]]", f'[monitoring]\npingdom_url = "{url}"\n[secrets]\nfile = "{secrets_file}"\n[[hosts]]', 1
    )
    config.write_text(text.replace('roles = ["app"]', 'roles = ["lb"]', 1))
    return config


@contextmanager
def lock_held(state, operation: str, target: str, command_line: str):
    """The lock held by another thread of this process while the body runs."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with safety.lock(state, operation, target, command_line):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        held.wait(5)
        yield
    finally:
        release.set()
        holder.join()


def test_second_run_exits_already_running_naming_the_holder(tmp_path, pingdom_api):
    config = with_pingdom(tmp_path, pingdom_api)
    with lock_held(tmp_path / "state", "pingdom", "all", "igops pingdom sync"):
        result = run_igops("-c", str(config), "pingdom", "sync", "--yes")
    assert result.returncode == ExitCode.LOCKED, result.stderr
    assert "pingdom all is held by" in result.stderr and f"pid {os.getpid()}" in result.stderr


def test_exec_takes_no_lock_so_unrelated_runs_do_not_block_each_other(tmp_path):
    """exec changes nothing igops keeps state about. It used to lock `N-hosts`, so any two
    runs on host sets of one size blocked each other."""
    config = inventory(tmp_path)
    state = tmp_path / "state"
    with lock_held(state, "exec", "web1,web2", "igops exec -- sleep 100"):
        result = run_igops("-c", str(config), "exec", "--yes", "--", "true")
    assert result.returncode == ExitCode.FAILED and "already running" not in result.stderr
    assert [path.name for path in (state / "locks").iterdir()] == ["exec--web1_web2.lock"]  # the holder's
    record = json.loads((state / "audit.log").read_text().splitlines()[-1])
    assert record["targets"] == ["web1", "web2"] and record["exit_code"] == 1


def run_with_a_terminal(args: list[str], answer: str) -> subprocess.CompletedProcess:
    """The real CLI with a pseudo-terminal on stdin, answering its question."""
    import pty

    controller, terminal = pty.openpty()
    try:
        os.write(controller, answer.encode())
        return subprocess.run(
            [*IGOPS, *args],
            stdin=terminal,
            capture_output=True,
            text=True,
            env={**os.environ, "NO_COLOR": "1"},
            timeout=60,
            cwd=ROOT,
        )
    finally:
        os.close(terminal)
        os.close(controller)


def test_a_declined_confirmation_exits_2_and_is_audited(tmp_path):
    config = inventory(tmp_path)
    result = run_with_a_terminal(["-c", str(config), "exec", "--json", "--", "touch", "/tmp/never"], "n\n")
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "not confirmed: nothing was changed" in result.stderr
    assert json.loads(result.stdout)["exit_code"] == ExitCode.USAGE
    record = json.loads((tmp_path / "state" / "audit.log").read_text().splitlines()[-1])
    assert record["result"] == "declined" and record["exit_code"] == ExitCode.USAGE
    assert record["targets"] == ["web1", "web2"] and "touch /tmp/never" in record["command"]


def test_the_reason_given_reaches_the_audit_trail(tmp_path):
    config = inventory(tmp_path)
    argv = ["-c", str(config), "exec", "--reason", "TICKET-7", "--", "touch", "/tmp/never"]
    result = run_with_a_terminal(argv, "n\n")
    assert result.returncode == ExitCode.USAGE, result.stderr
    record = json.loads((tmp_path / "state" / "audit.log").read_text().splitlines()[-1])
    assert record["result"] == "declined" and record["reason"] == "TICKET-7"


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    script = (
        "import sys, time; from pathlib import Path; from igops import safety\n"
        "with safety.lock(Path(sys.argv[1]), 'op', 't', 'x'):\n"
        "    print('held', flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    child.kill()
    child.wait()
    with safety.lock(tmp_path, "op", "t", "y"):
        pass


@pytest.fixture
def registered_secrets(monkeypatch):
    """The process-wide redaction list, emptied for one test and restored after it, so a
    secret a test registers never hides text in later tests."""
    from igops import secrets

    monkeypatch.setattr(secrets, "_registered", set())
    return secrets


def test_audit_redacts_secret_options_and_values(tmp_path, registered_secrets):
    registered_secrets.register("s3cr3t-value")
    line = safety.redact_argv(
        ["igops", "pagerduty", "test", "--routing-key", "abc123", "--token=xyz", "echo", "s3cr3t-value"]
    )
    assert "abc123" not in line and "xyz" not in line and "s3cr3t-value" not in line
    safety.audit(
        tmp_path, command=line, targets=[], result="ok", exit_code=0, duration_ms=1, detail="failed with s3cr3t-value"
    )
    text = (tmp_path / "audit.log").read_text()
    assert "s3cr3t-value" not in text and "***" in text
    assert oct((tmp_path / "audit.log").stat().st_mode & 0o777) == "0o600"


AWKWARD_SECRETS = ['pa"ss-word', "pass\\word", "päss-wörd", "tab\tand\nnewline"]


@pytest.mark.parametrize("secret", AWKWARD_SECRETS)
def test_secrets_that_json_escapes_are_redacted_in_every_writer(tmp_path, capsys, registered_secrets, secret):
    from igops.output import Output

    registered_secrets.register(secret)
    out = Output("unit", json_mode=True)
    with out.step(f"step naming {secret}"):
        pass
    out.finish({"note": f"token {secret}", secret: [secret]})
    text = capsys.readouterr().out
    envelope = json.loads(text)
    assert secret not in json.dumps(envelope) and envelope["data"] == {"note": "token ***", "***": ["***"]}
    assert envelope["steps"][0]["title"] == "step naming ***"

    people = Output("unit")
    people.table(None, ["value"], [[secret], [[secret, "x"]]])
    people.text(f"line with {secret}")
    assert secret not in capsys.readouterr().out

    safety.audit(
        tmp_path, command="igops x", targets=[secret], result=secret, exit_code=0, duration_ms=1, detail=secret
    )
    record = json.loads((tmp_path / "audit.log").read_text())
    assert secret not in json.dumps(record) and record["targets"] == ["***"] and record["detail"] == "***"
    with safety.lock(tmp_path, "op", "t", f"igops x {secret}") as path:
        assert safety.read_holder(path).command == "igops x ***"


def test_secrets_too_short_to_redact_are_refused(tmp_path, pingdom_api):
    config = with_pingdom(tmp_path, pingdom_api)
    result = run_igops("-c", str(config), "pingdom", "status", env={"IGOPS_PINGDOM_TOKEN": "abc"})
    assert result.returncode == ExitCode.USAGE
    assert "shorter than 4 characters" in result.stderr and "at least 4" in result.stderr
    assert "abc" not in result.stderr.replace("characters", "")
    (tmp_path / "secrets.toml").write_text('pingdom_token = "xyz"\n')
    result = run_igops("-c", str(config), "pingdom", "status", "--json")
    assert result.returncode == ExitCode.USAGE and "shorter than 4" in json.loads(result.stdout)["error"]["message"]


def test_help_imports_no_heavy_library():
    code = (
        "import sys; sys.argv = ['igops', '--help']\n"
        "from igops.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('boto3', 'asyncssh', 'fabric', 'paramiko', 'psycopg2', 'redis', 'pydantic', 'scipy', "
        "'numpy') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY []" in result.stdout, result.stdout


def test_every_command_offers_json():
    for args in (["hosts"], ["exec"], ["status"]):
        result = run_igops(*args, "--help")
        assert "--json" in result.stdout, args


def test_no_color_and_non_tty_output_is_plain(tmp_path):
    result = run_igops("-c", str(inventory(tmp_path)), "hosts")
    assert "\x1b[" not in result.stdout and "web1" in result.stdout


def test_global_options_are_accepted_after_the_subcommand(tmp_path):
    config = str(inventory(tmp_path))
    for args in (
        ["hosts", "--config", config, "--json"],
        ["hosts", "-c", config, "-v", "--json"],
        ["-c", str(tmp_path / "missing.toml"), "hosts", "-c", config, "--json"],
    ):
        result = run_igops(*args)
        assert result.returncode == 0, (args, result.stderr)
        assert [host["name"] for host in json.loads(result.stdout)["data"]["hosts"]] == ["web1", "web2"]
    nested = run_igops("snapshot", "list", "--config", str(tmp_path / "missing.toml"))
    assert nested.returncode == ExitCode.USAGE and "missing.toml" in nested.stderr
    # After `--`, exec passes every argument on literally, -c included.
    result = run_igops("exec", "-c", config, "--dry-run", "--json", "--", "echo", "-c", "x")
    assert json.loads(result.stdout)["data"]["command"] == "echo -c x"


def test_snapshot_create_refuses_a_relative_mount_before_anything_else(tmp_path):
    result = run_igops(
        "-c", str(inventory(tmp_path)), "snapshot", "create", "web1", "--mount", "data", "--dry-run", "--json"
    )
    assert result.returncode == ExitCode.USAGE
    error = json.loads(result.stdout)["error"]
    assert "--mount 'data' is not an absolute path" in error["message"] and "--mount /data" in error["hint"]


def test_the_repository_tracks_no_built_packages():
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert [name for name in tracked.splitlines() if name.endswith((".whl", ".tar.gz", ".egg"))] == []


def test_dry_run_plan_is_the_result_on_stdout(tmp_path):
    """`igops ... --dry-run > plan.txt` keeps the plan; the 'nothing was changed' note is a log."""
    config = inventory(tmp_path)
    result = run_igops("-c", str(config), "exec", "--dry-run", "--", "echo", "a b;c")
    assert result.returncode == 0, result.stderr
    assert "Run `echo 'a b;c'` on 2 hosts" in result.stdout
    assert "  1. web1 (root@127.0.20.250:22): echo 'a b;c'" in result.stdout
    assert "dry run: nothing was changed" in result.stderr and "1. web1" not in result.stderr


def test_dry_run_with_json_keeps_stdout_for_the_envelope(tmp_path):
    result = run_igops("-c", str(inventory(tmp_path)), "exec", "--dry-run", "--json", "--", "true")
    assert json.loads(result.stdout)["data"]["dry_run"] is True


def test_a_subcommands_own_config_flag_is_not_taken_for_the_inventory(tmp_path):
    """`munin fetch --config` asks for plugin configs: it must not reach the global --config."""
    missing = tmp_path / "nowhere.toml"
    result = run_igops("-c", str(missing), "munin", "fetch", "db1", "igops_postgres", "--config")
    assert result.returncode == 2
    assert str(missing) in result.stderr and "True" not in result.stderr, result.stderr


def test_a_host_that_does_not_answer_while_planning_exits_3_nothing_touched(tmp_path):
    """snapshot create against an unreachable host: nothing was frozen, so not 1 ("ran and failed")
    but 3, like every mutating command that fails before its plan is shown."""
    path = unit_inventory(
        tmp_path,
        [],
        sections='[[hosts]]\nname = "cache9"\naddress = "127.0.20.250"\n'
        'roles = ["memcached"]\ninstance_id = "i-0123456789abcdef0"\n',
    )
    result = run_igops("-c", str(path), "snapshot", "create", "cache9", "--mount", "/data", "--yes", "--json")
    assert result.returncode == ExitCode.REFUSED, result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["message"].startswith("cannot inspect block devices on cache9: connection refused")
    assert "nothing was frozen" in error["hint"]


def problem_fleet(tmp_path: Path) -> Path:
    """Every host on a loopback address where nothing answers: each read-only command finds problems."""
    return unit_inventory(
        tmp_path,
        [
            ("web1", "127.0.20.250", "app"),
            ("db1", "127.0.20.251", "postgres"),
            ("db2", "127.0.20.252", "postgres"),
            ("redis1", "127.0.20.253", "redis"),
        ],
        sections='[postgres.clusters.main]\nprimary = "db1"\nstandbys = ["db2"]\n'
        '[redis]\nmaster = "redis1"\nreplicas = []\n',
    )


@pytest.mark.parametrize(
    "argv",
    [["status"], ["pg", "status"], ["redis", "status"], ["deploy", "releases"], ["check", "--timeout", "5"]],
    ids=" ".join,
)
def test_problems_found_is_one_exit_code_across_read_only_commands(tmp_path, argv):
    result = run_igops("-c", str(problem_fleet(tmp_path)), *argv, "--json")
    assert result.returncode == ExitCode.PROBLEMS_FOUND == 5, result.stderr
    envelope = json.loads(result.stdout)
    assert envelope["exit_code"] == 5 and envelope["error"] is None


def test_check_nagios_keeps_the_nagios_codes(tmp_path):
    from igops.errors import NagiosStatus

    result = run_igops("-c", str(problem_fleet(tmp_path)), "check", "--nagios", "--timeout", "5")
    assert result.returncode == NagiosStatus.CRITICAL and result.stdout.startswith("IGOPS CRITICAL")
