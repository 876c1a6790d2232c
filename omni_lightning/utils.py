"""Small shared helpers."""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path


@functools.cache
def _umask() -> int:
    """The process's umask, read once: it can only be read by setting it, which for an instant applies 0 to
    files other threads create."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def readable_mode() -> int:
    """The mode a plain ``open()`` would give a new file (0o666 less the umask); mkstemp's is 0o600."""
    return 0o666 & ~_umask()


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


def atomic_savefig(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure to ``path`` through a temporary file in the same folder and a rename; closes it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.chmod(tmp, readable_mode())  # mkstemp makes it private; a figure is for reading
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def dir_mode() -> int:
    """The mode a plain ``mkdir()`` would give a new folder (0o777 less the umask); mkdtemp's is 0o700."""
    return 0o777 & ~_umask()


def check_output_apart(output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None], what: str) -> Path:
    """Refuse an ``output`` folder that equals, contains or lies inside any of ``inputs`` (symlinks resolved).

    ``inputs`` maps a name for the message (``"model"``, ``"data root"``) to a path; ``None`` entries are
    ignored. ``what`` names the output in the message (``"model.init_args.export_dir"``, ``"--out"``). Call it
    before anything is read or written: replacing such an output would delete or corrupt an input. Returns the
    resolved output path.
    """
    out = Path(output).expanduser().resolve()
    for name, path in inputs.items():
        if path is None or str(path) == "":
            continue
        p = Path(path).expanduser().resolve()
        if out == p:
            how = "is"
        elif out in p.parents:
            how = "contains"
        elif p in out.parents:
            how = "lies inside"
        else:
            continue
        raise ValueError(f"{what} {output} ({out}) {how} the {name} {path} ({p}): writing it would delete or "
                         f"change an input. Choose an output folder apart from every input")
    return out


log = logging.getLogger(__name__)


def lock_output(dest: str | os.PathLike) -> list:
    """Take the exclusive lock of an output folder written through temporary folders beside it (``flock`` on
    ``.<name>.lock`` in its parent; non-blocking): ``[fd, path]`` for :func:`unlock_output`. Refuses (with
    ``FileExistsError``) while another write to the same output holds it; a killed writer's lock dies with it."""
    dest = Path(dest)
    path = dest.parent / f".{dest.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exn:
            os.close(fd)
            if exn.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FileExistsError(f"another write to {dest} is in progress (it holds {path}); wait for it to "
                                      "finish") from None
            raise
        try:  # the holder before us may have removed the file after we opened it: lock the current one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return [fd, path]
        except FileNotFoundError:
            pass
        os.close(fd)


def unlock_output(lock: list) -> None:
    fd, path = lock
    if fd is None:
        return
    try:
        Path(path).unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the flock
        lock[0] = None


def remove_leftovers(dest: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders of ``dest`` (``.<name>.tmp-*``, ``.<name>.old-*``) that a killed write left
    beside it. Call with the output's lock held (:func:`lock_output`): then no live write owns them."""
    dest = Path(dest)
    found = sorted(p for pattern in (f".{dest.name}.tmp-*", f".{dest.name}.old-*") for p in dest.parent.glob(pattern))
    for p in found:
        log.warning("removing %s, left over by an interrupted write of %s", p, dest)
        shutil.rmtree(p, ignore_errors=True)
    return found
