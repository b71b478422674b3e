import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IGOPS = [sys.executable, "-m", "igops"]


def run_igops(*args: str, env: dict | None = None, input: str | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user or cron would."""
    full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([*IGOPS, *args], capture_output=True, text=True, env=full_env,
                          input=input, timeout=timeout, cwd=ROOT)


@pytest.fixture
def igops():
    return run_igops
