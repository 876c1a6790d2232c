"""Small shared helpers."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path


@functools.cache
def readable_mode() -> int:
    """The mode a plain ``open()`` would give a new file (0o666 less the umask); mkstemp's is 0o600. Read once:
    the umask can only be read by setting it, which for an instant applies 0 to files other threads create."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, readable_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
