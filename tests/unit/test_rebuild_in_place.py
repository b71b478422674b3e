"""The host-side shell of an in-place rebuild (igops.pg.rebuild_actions), run here with a stand-in
for blkid: fstab's entry for the mount names the new filesystem by UUID, every other line kept."""

import subprocess
from pathlib import Path

import pytest

from igops.pg.rebuild_actions import _FSTAB, _PUT_BACK_RESTORE, _SET_CATCH_UP_RESTORE, _sh


def run_fstab(tmp_path: Path, text: str | None, mount: str) -> tuple[str, str | None]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    blkid = bin_dir / "blkid"
    blkid.write_text("#!/bin/sh\necho 0b1c-new-uuid\n")
    blkid.chmod(0o755)
    fstab = tmp_path / "fstab"
    if text is not None:
        fstab.write_text(text)
    done = subprocess.run(
        ["sh", "-c", _sh(_FSTAB, str(fstab), mount, "/dev/loop9")],
        capture_output=True,
        text=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        check=True,
    )
    return done.stdout.strip(), fstab.read_text() if fstab.exists() else None


def test_the_mount_entry_names_the_new_filesystem_and_the_rest_stays(tmp_path):
    text = "# static\nUUID=old-1\t/data\txfs\tnoatime\t0\t2\nUUID=old-2 /wal xfs defaults 0 2\n"
    said, after = run_fstab(tmp_path, text, "/data")
    assert said == "UUID=0b1c-new-uuid"
    assert after == "# static\nUUID=0b1c-new-uuid\t/data\txfs\tnoatime\t0\t2\nUUID=old-2 /wal xfs defaults 0 2\n"


def test_no_entry_for_the_mount_or_no_fstab_leaves_it_alone(tmp_path):
    said, after = run_fstab(tmp_path, "UUID=old-2 /wal xfs defaults 0 2\n# /data was here\n", "/data")
    assert said == "no entry" and after == "UUID=old-2 /wal xfs defaults 0 2\n# /data was here\n"
    assert not list(tmp_path.glob("fstab.igops"))


def test_no_fstab_at_all(tmp_path):
    assert run_fstab(tmp_path, None, "/data") == ("", None)


def test_restore_command_is_written_in_postgresql_conf_quoting():
    from igops.pg.rebuild_actions import _conf_literal

    assert (
        _conf_literal('pgbackrest --stanza=main archive-get %f "%p"')
        == "'pgbackrest --stanza=main archive-get %f \"%p\"'"
    )
    assert _conf_literal("it's a\\b") == "'it''s a\\\\b'"


ARCHIVE = "restore_command = 'pgbackrest --stanza=main archive-get %f \"%p\"'"


def sh(script: str, *args: str) -> str:
    return subprocess.run(["sh", "-c", _sh(script, *args)], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("own", [None, "restore_command = 'cp /mnt/wal/%f \"%p\"'"])
def test_the_catch_up_restore_command_is_set_then_the_datas_own_put_back(tmp_path, own):
    data = tmp_path / "pgdata"
    data.mkdir()
    auto = data / "postgresql.auto.conf"
    before = "primary_conninfo = 'host=db1'\n" + (own + "\n" if own else "")
    auto.write_text(before)
    sh(_SET_CATCH_UP_RESTORE, str(data), ARCHIVE)
    sh(_SET_CATCH_UP_RESTORE, str(data), ARCHIVE)  # a rerun keeps what the data had, not its own line
    assert auto.read_text() == "primary_conninfo = 'host=db1'\n" + ARCHIVE + "\n"
    said = sh(_PUT_BACK_RESTORE, str(data))
    assert said == ("its own again" if own else "none, as its data had")
    assert auto.read_text() == before and not list(data.glob("igops-rebuild.*")) and not list(data.glob("*.igops"))
    assert sh(_PUT_BACK_RESTORE, str(data)) == "put back already" and auto.read_text() == before
