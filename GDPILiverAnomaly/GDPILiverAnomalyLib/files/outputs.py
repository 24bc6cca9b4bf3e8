"""File-system helpers: output folders written all or nothing, atomic text files,
default permissions for files made by ``tempfile``, a lock on an output folder, and
CSV cells that a spreadsheet never runs as formulas."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from ..errors import OutputError

log = logging.getLogger("gdpi")

#: Hidden file in every temporary folder of :func:`atomic_dir` while it is written:
#: JSON ``{"tool": "gdpi", "pid", "host", "target", "started"}``. It proves that the
#: folder is gdpi's and says whether its writer is still running.
WRITER_MARKER = ".gdpi-writing"


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
    is untouched. The temporary folder carries :data:`WRITER_MARKER` until it is moved
    into place; stale ones beside ``out`` (their writer is gone) are removed first
    (:func:`remove_stale_partials`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    give_default_permissions(tmp)
    _write_marker(tmp, out.name)
    old = None
    try:
        yield tmp
        (tmp / WRITER_MARKER).unlink()  # the result holds only what the caller wrote
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
            _write_marker(old, out.name)
            os.replace(out, old / out.name)
        os.rename(tmp, out)
    except BaseException:
        if old is not None and (old / out.name).exists() and not out.exists():
            os.replace(old / out.name, out)  # put the earlier result back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (out.exists() or not (old / out.name).exists()):
            shutil.rmtree(old, ignore_errors=True)  # kept only when it holds the only copy


#: Ending of :func:`write_text_atomic`'s temporary files (never a user's file name).
TEXT_TMP_SUFFIX = ".gdpi-tmp"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename; on any
    failure the temporary file is removed and ``path`` is left as it was. Characters that
    UTF-8 cannot hold (a file name's non-UTF-8 bytes) are written as ``\\xNN``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEXT_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
        give_default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def csv_safe(value):
    """A CSV cell that a spreadsheet shows as text, never runs as a formula (OWASP CSV
    injection): a string starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
    return gets a leading single quote, unless it is a plain number (``-12.5``). Other
    values are returned unchanged."""
    if not isinstance(value, str) or not value or value[0] not in "=+-@\t\r":
        return value
    return value if _NUMBER.fullmatch(value) else "'" + value


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # no inf or nan: names


def csv_safe_row(row: dict) -> dict:
    """:func:`csv_safe` on every cell of a ``csv.DictWriter`` row."""
    return {key: csv_safe(value) for key, value in row.items()}


def this_process() -> dict:
    """This process, as a writer or lock holder records it."""
    return {"tool": "gdpi", "pid": os.getpid(), "host": socket.gethostname(),
            "pid_space": _pid_space(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip


def _pid_space() -> str | None:
    """Which running kernel and PID namespace a pid belongs to (Linux: the boot id and
    the namespace's inode; containers sharing a host name differ here), else None."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _write_marker(folder: Path, target: str) -> None:
    (folder / WRITER_MARKER).write_text(json.dumps({**this_process(), "target": target}))


def _read_record(text: str) -> dict | None:
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("tool") != "gdpi":
        return None
    return record if isinstance(record.get("pid"), int) else None


def _pid_running(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (True when that cannot be told)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate it on Windows
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return not ok or code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def writer_gone(record: dict) -> bool:
    """Whether the process a marker or lock ``record`` names has ended: only provable on
    the same host (another host's process may still run)."""
    return (
        record.get("host") == socket.gethostname()
        and record.get("pid_space") == _pid_space()
        and not _pid_running(record["pid"])
    )


def remove_stale_partials(parent: Path) -> list[Path]:
    """Remove the temporary folders of :func:`atomic_dir` in ``parent`` whose writer is
    gone (killed): only folders carrying :data:`WRITER_MARKER`, from a process of this
    host that no longer runs. A stale ``.old-`` folder (an earlier result being replaced)
    is removed only when its target exists again. Each removal is logged (warning);
    returns the removed folders."""
    removed = []
    try:
        entries = [p for p in parent.iterdir() if _partial_name(p.name)]
    except OSError:
        return removed
    for folder in entries:
        record = partial_record(folder)
        if record is None or not writer_gone(record):
            continue
        if ".old-" in folder.name and not (parent / str(record.get("target"))).exists():
            continue  # holds the only copy of an earlier result
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
            log.warning(
                f"gdpi: removed {folder}: left behind by an interrupted gdpi run "
                f"(pid {record['pid']}, no longer running)"
            )
    return removed


def _partial_name(name: str) -> bool:
    return name.startswith(".") and (".partial-" in name or ".old-" in name)


def partial_record(path: Path) -> dict | None:
    """The marker record of a temporary folder of :func:`atomic_dir` (None when ``path``
    is not one: not a hidden ``.partial-``/``.old-`` folder, or no gdpi marker in it)."""
    if not _partial_name(path.name) or path.is_symlink() or not path.is_dir():
        return None
    try:
        return _read_record((path / WRITER_MARKER).read_text())
    except (OSError, UnicodeDecodeError):
        return None


@contextmanager
def folder_lock(folder: Path, name: str, what: str) -> Iterator[dict | None]:
    """Hold an exclusive lock on ``folder`` (the file ``folder/name``, removed at the
    end) while the block runs; another process asking for it gets an
    :class:`OutputError` naming the holder (``what``: e.g. "gdpi train"). A lock left by
    a killed holder is taken over: the block receives its record (pid, host, started),
    else None. POSIX: ``flock`` (released by the system when the holder dies);
    elsewhere an exclusively created file whose holder's pid is checked."""
    path = folder / name
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    if fcntl is None:
        fd, previous = _exclusive_lock_file(path, what)
    else:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_record(_read_fd(fd))
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputError(
                        f"cannot lock {path} ({exc.strerror or exc}): this file system does "
                        f"not support file locks; use a folder on another file system"
                    ) from None
                raise OutputError(_busy(folder, path, holder, what)) from None
            try:  # the holder before may have removed the file just now: lock the new one
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and os.path.samestat(current, mine):
                break
            os.close(fd)
        previous = _read_record(_read_fd(fd))  # a holder that died without removing it
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(this_process()).encode())
    try:
        yield previous
    finally:
        if fcntl is None:  # Windows removes no open file
            os.close(fd)
        try:
            os.unlink(path)  # POSIX: while still holding the lock
        except OSError:
            pass
        if fcntl is not None:
            os.close(fd)


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode("utf-8", "replace")


def _busy(folder: Path, path: Path, holder: dict | None, what: str) -> str:
    who = "" if holder is None else (
        f" (pid {holder['pid']} on {holder.get('host')}, since {holder.get('started')})"
    )  # fmt: skip
    return (
        f"{folder} is in use by another {what}{who}: wait for it to end or choose another "
        f"output folder (the lock is {path})"
    )


def _exclusive_lock_file(path: Path, what: str) -> tuple[int, dict | None]:
    previous = None
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            try:
                holder = _read_record(path.read_text())
            except OSError:
                holder = None
            if holder is None or not writer_gone(holder):
                raise OutputError(_busy(path.parent, path, holder, what)) from None
            previous = holder
            path.unlink(missing_ok=True)
            continue
        os.write(fd, json.dumps(this_process()).encode())
        return fd, previous
    raise OutputError(_busy(path.parent, path, None, what))
