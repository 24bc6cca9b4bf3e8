"""Progress of a detection, and how the ``gdpi`` command shows it.

:class:`Progress` is what the pipeline reports; :class:`Reporter` turns it into a tqdm
bar on stderr (``--progress text``) or JSON lines on stdout (``--progress json``, the
Slicer worker protocol); :class:`PartialWriter` streams the score so far as ``.npy``
files (``--stream-dir``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import OutputError


@dataclass
class Progress:
    """One progress report. ``nfe`` counts network evaluations of whole batches."""

    slices_done: int
    slices_total: int
    nfe_done: int
    nfe_total: int
    elapsed_s: float
    eta_s: float | None
    device: str = ""

    @property
    def fraction(self) -> float:
        return 1.0 if self.nfe_total == 0 else self.nfe_done / self.nfe_total

    def to_dict(self) -> dict:
        return {**asdict(self), "fraction": round(self.fraction, 4)}


@dataclass
class BatchProgress:
    """Progress of a folder run over all cases (the Ray engine). ``slices_total`` is
    estimated until every case is prepared (cases not yet read count as the mean)."""

    cases_done: int
    cases_failed: int
    cases_total: int
    slices_done: int
    slices_total: int
    slices_per_s: float
    eta_s: float | None
    batch_fill: float
    workers: int

    def to_dict(self) -> dict:
        return asdict(self)


class LineProgress:
    """A progress bar for logs: one plain line every ``every_s`` seconds (and at the end)
    instead of the carriage-return updates a terminal bar writes. Implements the part of
    tqdm's interface this project uses (``n``, ``update``, ``set_postfix[_str]``,
    ``refresh``, ``close``)."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, every_s: float = 10.0,
                 file=None):  # fmt: skip
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every_s, self.file = every_s, file or sys.stderr
        self.postfix = ""
        self.started = time.monotonic()
        self.last = None

    def update(self, n: int = 1) -> None:
        self.n += n
        self.refresh()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and self.last is not None and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.started
        share = self.n / self.total if self.total else 1.0
        line = f"{self.desc}: {100 * share:.0f}% ({self.n}/{self.total} {self.unit}"
        line += f", {self.postfix})" if self.postfix else ")"
        line += f", {elapsed:.0f} s elapsed"
        if 0 < self.n < self.total:
            line += f", about {elapsed / self.n * (self.total - self.n):.0f} s left"
        print(line, file=self.file, flush=True)

    def close(self) -> None:
        self.refresh(force=True)


def progress_bar(total: int, desc: str, unit: str, initial: int = 0, leave: bool = True):
    """tqdm on a terminal; :class:`LineProgress` when stderr is a file or pipe (logs)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                    dynamic_ncols=True, leave=leave)  # fmt: skip
    return LineProgress(total, desc, unit, initial)


class Reporter:
    """Turns progress into a tqdm bar (``text``), throttled JSON lines (``json``) or nothing."""

    def __init__(self, mode: str):
        self.mode = mode
        self.stream = None  # where JSON lines go: sys.stdout at the time of each line
        self.bar = None
        self.last = 0.0
        self.case: str | None = None
        self.estimated = False

    def emit(self, event: str, **fields) -> None:
        """One JSON event line on stdout (``json`` mode only)."""
        if self.mode == "json":
            print(
                json.dumps({"event": event, **fields}), file=self.stream or sys.stdout, flush=True
            )

    def start_case(self, name: str | None) -> None:
        self.close()
        self.case = name
        self.estimated = False

    def __call__(self, p: Progress) -> None:
        if self.mode == "json" and not self.estimated and p.nfe_done >= min(3, p.nfe_total):
            # after a few network evaluations of the real batch: the time the whole case
            # will take on this device (the Slicer panel shows it before the long wait)
            self.estimated = True
            if p.nfe_done:
                self.emit(
                    "estimate",
                    case=self.case,
                    seconds=round(p.elapsed_s / p.nfe_done * p.nfe_total, 1),
                    device=p.device,
                    nfe_total=p.nfe_total,
                    slices_total=p.slices_total,
                )
        if self.mode == "json":
            now = time.monotonic()
            final = p.nfe_done == p.nfe_total
            if final or now - self.last >= 0.25 or p.nfe_done == 0:
                self.last = now
                self.emit("progress", case=self.case, **p.to_dict())
        elif self.mode == "text":
            if self.bar is None:
                self.bar = progress_bar(p.nfe_total, self.case or "inpainting", "NFE")
            self.bar.n = p.nfe_done
            self.bar.set_postfix_str(f"slices {p.slices_done}/{p.slices_total}", refresh=False)
            self.bar.refresh()
            if p.nfe_done == p.nfe_total and p.slices_done == p.slices_total:
                self.close()  # the last line before whatever the command prints next

    def batch(self, p: BatchProgress) -> None:
        """One bar over all cases and slices (``text``) or throttled ``batch`` events."""
        if self.mode == "json":
            now = time.monotonic()
            if now - self.last >= 0.25 or p.cases_done == p.cases_total:
                self.last = now
                self.emit("batch", **p.to_dict())
        elif self.mode == "text":
            if self.bar is None:
                self.bar = progress_bar(p.slices_total, "slices", "slice")
            self.bar.total = max(p.slices_total, p.slices_done)
            self.bar.n = p.slices_done
            failed = f", {p.cases_failed} failed" if p.cases_failed else ""
            self.bar.set_postfix_str(
                f"cases {p.cases_done}/{p.cases_total}{failed}, {p.slices_per_s:.2f} slices/s, "
                f"batch fill {100 * p.batch_fill:.0f}%, {p.workers} worker(s)",
                refresh=False,
            )
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _remove(path: Path) -> bool:
    """Delete ``path``; False while Windows refuses because the file is still open (the
    Slicer panel reading it, a virus scanner): tried again with the next file, never an
    error that stops the detection."""
    try:
        path.unlink(missing_ok=True)
        return True
    except PermissionError:
        return False


class PartialWriter:
    """Writes streamed partial scores as numbered ``.npy`` files and announces them.

    Each file holds the score cropped to its nonzero box (CT index order ``[k, j, i]``);
    the ``partial`` event gives its path and the box's ``[k, j, i]`` offset. Only the
    newest file is kept. Files the run did not create are never touched: a number
    whose file exists already (an earlier run's, or anyone's) is passed over, and each
    file appears complete (a temporary file, then a link that never replaces one). A
    ``folder`` that is a file or cannot be written is an :class:`OutputError` here,
    before anything runs; the folder is made with the first file.
    """

    def __init__(self, folder: Path, reporter: Reporter):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputError(f"--stream-dir {self.folder} exists and is not a folder")
        parent = next(p for p in (self.folder, *self.folder.absolute().parents) if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"--stream-dir {self.folder} is not writable")
        self.reporter = reporter
        self.count = 0
        self.previous: Path | None = None
        self.stale: list[Path] = []  # this run's older files, still to delete

    def __call__(self, score: np.ndarray) -> None:
        nonzero = [np.flatnonzero(score.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1))]
        if any(len(n) == 0 for n in nonzero):
            return
        lo = [int(n[0]) for n in nonzero]
        hi = [int(n[-1]) + 1 for n in nonzero]
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, score[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
            path = self._place(Path(tmp))
        finally:
            Path(tmp).unlink(missing_ok=True)
        if self.previous is not None:
            self.stale.append(self.previous)  # this run's own file
        self.stale = [p for p in self.stale if not _remove(p)]
        self.previous = path
        self.reporter.emit("partial", path=str(path), offset=lo)

    def _place(self, tmp: Path) -> Path:
        """Give ``tmp`` the next free ``partial-N.npy`` name; never replaces a file."""
        while True:
            self.count += 1
            path = self.folder / f"partial-{self.count:04d}.npy"
            if os.path.lexists(path):
                continue
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                continue
            except OSError:  # a file system without hard links: an exclusive copy
                try:
                    with open(path, "xb") as f:
                        f.write(tmp.read_bytes())
                    return path
                except FileExistsError:
                    continue
