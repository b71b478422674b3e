"""The lab's file writer: a secrets file is never readable by others, not even for a moment."""

import os
import stat
from pathlib import Path

from igops.lab import files


def test_a_0600_file_is_never_wider_while_it_holds_its_content(tmp_path, monkeypatch):
    seen = []
    real_chmod, real_replace = Path.chmod, os.replace

    def observe(path):
        path = Path(path)
        if path.exists() and path.stat().st_size:
            seen.append((path.name, stat.S_IMODE(path.stat().st_mode)))

    def chmod(self, mode, **kwargs):
        observe(self)
        return real_chmod(self, mode, **kwargs)

    def replace(source, target):
        observe(source)
        return real_replace(source, target)

    monkeypatch.setattr(Path, "chmod", chmod)
    monkeypatch.setattr(files.os, "replace", replace)
    old_umask = os.umask(0o022)
    try:
        secrets_file = tmp_path / "secrets.toml"
        assert files.write_file(secrets_file, 'pingdom_token = "lab-token"\n', mode=0o600)
        (tmp_path / ".secrets.toml.tmp").write_text("left over by a killed run")
        assert files.write_file(secrets_file, 'pingdom_token = "new-token"\n', mode=0o600)
    finally:
        os.umask(old_umask)
    assert seen and all(mode == 0o600 for _, mode in seen), seen
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    assert secrets_file.read_text() == 'pingdom_token = "new-token"\n'
    assert not (tmp_path / ".secrets.toml.tmp").exists()
