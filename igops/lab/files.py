"""Writing the lab's files: rendered templates, changed only when their content changes."""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from string import Template

TEMPLATES = Path(__file__).resolve().parent / "templates"


def render(name: str, **values: object) -> str:
    """A template from igops/lab/templates with its ${placeholders} filled (all required)."""
    return Template((TEMPLATES / name).read_text()).substitute({key: str(value) for key, value in values.items()})


def chown(path: Path, user: str, recursive: bool = False) -> None:
    entry = pwd.getpwnam(user)
    targets = [path]
    if recursive:
        targets += [Path(root) / name for root, dirs, files in os.walk(path) for name in dirs + files]
    for target in targets:
        os.chown(target, entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def write_file(path: Path, text: str, mode: int = 0o644, owner: str | None = None) -> bool:
    """Write only when the content changes; True if it did. Modes and owners are set either way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    changed = not path.exists() or path.read_text() != text
    if changed:
        # Created with its mode, never wider for a moment: secrets are written this way.
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.unlink(missing_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(temporary, path)
    path.chmod(mode)
    if owner:
        chown(path, owner)
    return changed
