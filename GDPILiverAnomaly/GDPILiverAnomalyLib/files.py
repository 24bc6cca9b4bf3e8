"""File-system helpers: output folders written all or nothing, atomic text files,
default permissions for files made by ``tempfile``."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError


def give_default_permissions(path: str | Path) -> None:
    """Give a file or folder made by ``tempfile`` (0600 / 0700) the permissions the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)


def check_output_dir(out: str | Path, overwrite: bool = False, marker: str | None = None) -> Path:
    """The output-folder contract, checked before anything is written.

    ``out`` (a symbolic link is followed to its target) must be a folder that does not
    exist yet, or an empty one. With ``overwrite`` it may also hold an earlier result
    (recognised by its ``marker`` file, e.g. ``run.json``), which is then replaced as a
    whole; a folder holding anything else is never overwritten. Returns the path.
    """
    out = Path(out).absolute()
    if out.is_symlink():
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path exists and is not a folder: {out}")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder is not writable: {out}")
    if out.exists() and not os.access(out.parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder is not writable: {out.parent}")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(
                f"output folder {out} exists and is not empty: choose a new folder, or "
                "pass --overwrite to replace an earlier result there"
            )
        if marker is not None and not (out / marker).is_file():
            raise OutputError(
                f"output folder {out} holds files that are not an earlier result (no "
                f"{marker}): --overwrite replaces only an earlier result"
            )
    return out


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it becomes ``out``, replacing
    an existing ``out`` as a whole (the old folder is moved aside, then deleted); on
    failure it is deleted and ``out`` is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    give_default_permissions(tmp)
    old = None
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.rename(tmp, out)
    except BaseException:
        if old is not None and (old / out.name).exists() and not out.exists():
            os.replace(old / out.name, out)  # put the earlier result back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)
