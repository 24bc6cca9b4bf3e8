"""``gdpi`` as a background process: start it, read its JSON lines without blocking,
cancel its whole process tree.

No torch, no Slicer: the Slicer logic, console batch processing and the tests share
this class. Inside Slicer ``python`` is ``PythonSlicer``, a launcher that starts the
real interpreter as a child, so cancelling must kill the tree, not one process.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

#: Folder that holds the ``GDPILiverAnomalyLib`` package (put on the worker's PYTHONPATH).
LIB_PARENT = str(Path(__file__).resolve().parent.parent.parent)
#: Win32 process-creation flags (their values, so the options can be checked anywhere).
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000


def process_options(os_name: str = os.name) -> dict:
    """``Popen`` options of a worker: its own process group (so cancel reaches the whole
    tree) and, on Windows, no console window (as ``slicer.util.launchConsoleProcess``:
    ``CREATE_NO_WINDOW`` and a hidden window in ``STARTUPINFO``), so that no window
    appears and closing one cannot kill the detection."""
    if os_name != "nt":
        return {"start_new_session": True}
    options: dict = {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW}
    startupinfo = getattr(subprocess, "STARTUPINFO", None)  # exists on Windows only
    if startupinfo is not None:
        info = startupinfo()
        info.dwFlags |= subprocess.STARTF_USESHOWWINDOW  # type: ignore[attr-defined]
        info.wShowWindow = 0  # SW_HIDE
        options["startupinfo"] = info
    return options


def kill_tree_command(pid: int) -> list[str]:
    """The Windows command that ends a process and all its children."""
    return ["taskkill", "/F", "/T", "/PID", str(pid)]


def default_python() -> str:
    """``PythonSlicer`` next to Slicer's executable when running in Slicer, else this Python."""
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else sys.executable


class WorkerProcess:
    """One ``python -m GDPILiverAnomalyLib <args>`` run in its own process group.

    Standard output is parsed as JSON lines (``--progress json``) by a reader thread;
    :meth:`events` returns what arrived since the last call and never blocks. Lines
    that are not JSON arrive as ``{"event": "log", "message": line}``. Standard error
    goes to ``stderr_path`` so it can be shown when the run fails.

    ``command`` runs another program the same way (its full argument list; ``args``
    and ``python`` are then unused), e.g. TotalSegmentator; ``stderr_path=None`` merges
    its standard error into the lines read (carriage-return progress bars included).
    """

    def __init__(
        self,
        args: list[str],
        stderr_path: str | Path | None,
        python: str | None = None,
        env: dict | None = None,
        command: list[str] | None = None,
    ):
        if command is not None:
            self.args = list(command)
        else:
            self.args = [python or default_python(), "-m", "GDPILiverAnomalyLib", *args]
        self.stderr_path = Path(stderr_path) if stderr_path is not None else None
        environment = dict(os.environ if env is None else env)
        if command is None:  # our package; another program gets the environment as it is
            paths = [LIB_PARENT, environment.get("PYTHONPATH", "")]
            environment["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        environment["PYTHONUNBUFFERED"] = "1"
        self._queue: queue.Queue[dict] = queue.Queue()
        if self.stderr_path is None:
            stderr = subprocess.STDOUT
        else:
            stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - the child keeps its own copy
        options = process_options()
        self.process = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=environment,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **options,
        )
        if self.stderr_path is not None:
            stderr.close()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
                if not isinstance(event, dict) or "event" not in event:
                    raise ValueError
            except ValueError:
                event = {"event": "log", "message": line}
            self._queue.put(event)
        self.process.stdout.close()

    def events(self) -> list[dict]:
        """Events received since the last call (never blocks)."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def poll(self) -> int | None:
        """Exit status, or None while running. After exit, all output has been read."""
        code = self.process.poll()
        if code is not None:
            self._reader.join(timeout=5)
        return code

    def stderr_tail(self, lines: int = 15) -> str:
        """The last lines of the worker's standard error ("" when it was merged)."""
        if self.stderr_path is None:
            return ""
        try:
            with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
                return "".join(deque(f, maxlen=lines)).rstrip()
        except OSError:
            return ""

    def cancel(self, grace_s: float = 2.0) -> None:
        """Stop the whole process tree: SIGTERM, then SIGKILL after ``grace_s`` seconds.

        The worker stops cooperatively on SIGTERM (writing nothing); the kill catches a
        launcher or a child that does not react in time. Returns once the tree is gone.
        """
        if self.process.poll() is None:
            if os.name == "nt":
                hidden = process_options("nt")  # taskkill must not flash a console either
                hidden["creationflags"] = CREATE_NO_WINDOW
                subprocess.run(
                    kill_tree_command(self.pid), capture_output=True, check=False, **hidden
                )
            else:
                _signal_group(self.pid, signal.SIGTERM)
                deadline = time.monotonic() + grace_s
                while time.monotonic() < deadline and _group_alive(self.pid):
                    time.sleep(0.05)
                    self.process.poll()
                _signal_group(self.pid, signal.SIGKILL)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - the OS did not deliver the kill
            pass
        if os.name != "nt":
            deadline = time.monotonic() + 5
            while _group_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.poll()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    """True while any process of the group exists (zombies of our own child excluded)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return bool(group_members(pgid)) if Path("/proc").is_dir() else True


def group_members(pgid: int) -> list[int]:
    """PIDs of the live (non-zombie) processes in a process group (Linux ``/proc``)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            members.append(int(entry.name))
    return members
