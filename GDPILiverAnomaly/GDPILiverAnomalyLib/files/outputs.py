"""File-system helpers: output folders written all or nothing, atomic text files,
default permissions for files made by ``tempfile``."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError


def give_default_permissions(path: str | Path) -> None:
    """Give a file or folder made by ``tempfile`` (0600 / 0700) the permissions the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)


def check_output_dir(
    out: str | Path,
    overwrite: bool = False,
    marker: str | None = None,
    result_entries: Callable[[Path], bool] | None = None,
) -> Path:
    """The output-folder contract, checked before anything is written.

    ``out`` (a symbolic link is followed to its target) must be a folder that does not
    exist yet, or an empty one. With ``overwrite`` it may also hold an earlier result:
    its ``marker`` file (e.g. ``run.json``) is there and every entry is one a result
    holds (``result_entries(path)`` says so), and it is then replaced as a whole; a
    folder holding anything else is never overwritten. Mount points and the current
    folder (or one above it) are refused: they cannot be replaced. Returns the path.
    """
    out = Path(out).absolute()
    if out.is_symlink():
        out = out.resolve()
    here = Path.cwd().resolve()
    if out.exists() and (out.resolve() == here or out.resolve() in here.parents):
        raise OutputError(
            f"output folder {out} is the current folder or holds it: choose a new one"
        )
    if out.exists() and os.path.ismount(out):
        raise OutputError(f"output folder {out} is a mount point: choose a new folder inside it")
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
        foreign = [] if result_entries is None else [
            p.name for p in out.iterdir() if not result_entries(p)
        ]  # fmt: skip
        if (marker is not None and not (out / marker).is_file()) or foreign:
            detail = f"no {marker}" if not foreign else f"{foreign[0]} is not part of one"
            raise OutputError(
                f"output folder {out} holds files that are not an earlier result "
                f"({detail}): --overwrite replaces only an earlier result"
            )
    return out


@contextmanager
def atomic_dir(out: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it becomes ``out``. With
    ``replace`` an existing ``out`` is replaced as a whole (moved aside, then deleted);
    without it only a missing or empty ``out`` is (a folder that gained files meanwhile
    is refused: nothing is lost). On failure the temporary folder is deleted and ``out``
    is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    give_default_permissions(tmp)
    old = None
    try:
        yield tmp
        if not replace:
            try:
                os.rename(tmp, out)  # POSIX: replaces only a missing or empty folder
            except OSError:
                raise OutputError(
                    f"output folder {out} was filled by something else meanwhile; the "
                    "results were not moved there"
                ) from None
            return
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
    give_default_permissions(tmp)
    os.replace(tmp, path)
