import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IGOPS = [sys.executable, "-m", "igops"]

# Tests stop what they started (igops, the load generator) with SIGINT, as an operator's Ctrl-C
# would. A run started in the background by a shell without job control (a CI runner, `cmd &`
# in a script) inherits SIGINT ignored, and an ignored signal stays ignored across exec: every
# child would shrug the SIGINT off. A handled signal is reset to its default at exec, so
# handling it here gives each child the default again (and this run its Ctrl-C back).
signal.signal(signal.SIGINT, signal.default_int_handler)


def run_igops(
    *args: str, env: dict | None = None, input: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user or cron would."""
    full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [*IGOPS, *args], capture_output=True, text=True, env=full_env, input=input, timeout=timeout, cwd=ROOT
    )


@pytest.fixture
def igops():
    return run_igops


@pytest.fixture(scope="session")
def lab():
    """The lab fleet, brought up once per session through the library.

    Test sessions on one machine share one lab, so a session holds an exclusive lock while it
    uses it: a second session waits instead of switching over a cluster under the first. A lab
    that was already running is left running afterwards; one this session started is brought
    down at the end unless IGOPS_LAB_KEEP=1 (handy while writing tests)."""
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (loop devices, mounts, port 22 and 80)")
    from igops import inventory, lab as lab_module
    from igops.lab import state
    from igops.output import Reporter

    lock_path = Path(os.environ.get("IGOPS_LAB_TEST_LOCK", "/tmp/igops-lab-tests.lock"))
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        was_running = lab_module.running()
        lab_module.up(Reporter())
        yield inventory.load_file(state.paths().inventory)
        if not was_running and os.environ.get("IGOPS_LAB_KEEP") != "1":
            lab_module.down(reporter=Reporter())
