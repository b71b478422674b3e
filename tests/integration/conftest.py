"""The `lab` fixture: the lab fleet, brought up once per session through the library.

A lab that was already running before the session is left running afterwards; one the session
started is brought down at its end unless IGOPS_LAB_KEEP=1 (handy while writing tests).
"""

import os

import pytest


@pytest.fixture(scope="session")
def lab():
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (loop devices, mounts, port 22 and 80)")
    from igops import inventory, lab as lab_module
    from igops.lab import state
    from igops.output import Reporter

    was_running = lab_module.running()
    lab_module.up(Reporter())
    yield inventory.load_file(state.paths().inventory)
    if not was_running and os.environ.get("IGOPS_LAB_KEEP") != "1":
        lab_module.down(reporter=Reporter())
