"""`igops` on PATH after the README's set-up: `make lab`, `make test` and `make install` link
BINDIR/igops (default /usr/local/bin) to this checkout's venv entry point."""

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

VENV = Path(sys.executable).parent.parent  # the venv running these tests has an igops entry point


def make_link(bindir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), "link", f"BINDIR={bindir}", f"VENV={VENV}"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_make_link_puts_a_working_igops_on_path(tmp_path):
    done = make_link(tmp_path)
    assert done.returncode == 0, done.stderr
    link = tmp_path / "igops"
    assert link.is_symlink() and link.readlink() == VENV / "bin" / "igops"
    assert subprocess.run([str(link), "--version"], capture_output=True, text=True).stdout.startswith("igops ")
    assert make_link(tmp_path).stdout == ""  # already in place: quiet


def test_make_link_leaves_another_igops_alone(tmp_path):
    (tmp_path / "igops").write_text("#!/bin/sh\n")
    done = make_link(tmp_path)
    assert done.returncode == 0 and "exists and is not a link: left alone" in done.stdout
    assert not (tmp_path / "igops").is_symlink()


def test_the_set_up_targets_install_the_link():
    makefile = (Path(ROOT) / "Makefile").read_text()
    assert "lab: deps install\n" in makefile and "test: deps install\n" in makefile
    assert "install: venv link\n" in makefile and "BINDIR ?= /usr/local/bin\n" in makefile
