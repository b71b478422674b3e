import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_load_runner_needs_only_the_standard_library():
    # -S leaves site-packages off the path, as on a host with a bare Python
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import app.loadgen, app.loadgen.__main__;"
        "from app.loadgen import run_load, verify, Report, VerifyReport;"
        "third_party = {'django', 'psycopg2', 'redis', 'boto3', 'pymemcache'} & set(sys.modules);"
        "assert not third_party, third_party"
    )
    result = subprocess.run([sys.executable, "-I", "-S", "-c", probe, str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_cli_help_runs_without_third_party_packages():
    run_cli = (
        "import sys, runpy; sys.path.insert(0, sys.argv[1]); sys.argv[1:] = ['run', '--help'];"
        "runpy.run_module('app.loadgen', run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", run_cli, str(REPO)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "--write-ratio" in result.stdout and "--ledger" in result.stdout
