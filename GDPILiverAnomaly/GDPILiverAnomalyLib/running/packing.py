"""Slices of many cases packed into full network batches, and put back together per case.

Folder mode's ``local`` engine batches each case on its own, so a case's last batch runs
part empty; the ``ray`` engine (:mod:`.ray_engine`) queues the slices of every prepared
case here and sends full batches to the model workers. A slice's noise is seeded by the
slice itself (:func:`GDPILiverAnomalyLib.method.repaint.slice_seeds`), so the packing never changes a result.
Pure Python and numpy: no Ray needed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class CaseSlices:
    """One case's slices to inpaint and the differences received so far.

    ``ct`` (float32 HU) and ``mask`` (uint8, 1 = re-paint) are ``[W, n, n]`` for the
    ``work`` slices (indices into the case's liver slices); ``seeds[k][w]`` seeds the
    k-th inpainting of work slice ``w``; ``diff`` (inpainted - input, HU) is filled in.
    """

    name: str
    ct: np.ndarray
    mask: np.ndarray
    seeds: list[list[int]]
    work: list[int]
    diff: np.ndarray = field(init=False)
    missing: int = field(init=False)
    batches: int = 0
    workers: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.diff = np.zeros(self.ct.shape, np.float32)
        self.missing = len(self.work)

    @property
    def complete(self) -> bool:
        return self.missing == 0


@dataclass
class Batch:
    """A network batch: ``jobs`` are (case, work slice) pairs, the arrays stacked."""

    jobs: list[tuple[str, int]]
    ct: np.ndarray  # [B, n, n] float32 HU
    mask: np.ndarray  # [B, n, n] uint8
    seeds: list[list[int]]  # seeds[k][b]


class Packer:
    """First come, first served: slices of the cases added, in batches of ``batch_size``
    (full ones, and a part-full last one only when :meth:`next_batch` is told to flush)."""

    def __init__(self, batch_size: int):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.batch_size = batch_size
        self.cases: dict[str, CaseSlices] = {}
        self.queue: deque[tuple[str, int]] = deque()
        self.batches = 0
        self.slices = 0

    def add(self, case: CaseSlices) -> None:
        self.cases[case.name] = case
        self.queue.extend((case.name, w) for w in range(len(case.work)))

    def __len__(self) -> int:
        """Slices waiting for a batch."""
        return len(self.queue)

    def next_batch(self, flush: bool = False) -> Batch | None:
        """The next full batch; with ``flush`` also a part-full one; else None."""
        if len(self.queue) < self.batch_size and not (flush and self.queue):
            return None
        jobs = [self.queue.popleft() for _ in range(min(self.batch_size, len(self.queue)))]
        for name in dict.fromkeys(name for name, _ in jobs):
            self.cases[name].batches += 1
        samples = len(self.cases[jobs[0][0]].seeds)
        self.batches += 1
        self.slices += len(jobs)
        return Batch(
            jobs,
            np.stack([self.cases[n].ct[w] for n, w in jobs]),
            np.stack([self.cases[n].mask[w] for n, w in jobs]),
            [[self.cases[n].seeds[k][w] for n, w in jobs] for k in range(samples)],
        )

    def receive(self, batch: Batch, diff: np.ndarray, worker: str) -> list[CaseSlices]:
        """Store a batch's differences (``[B, n, n]`` HU); return the cases it completed
        (they leave the packer)."""
        done = []
        for (name, w), d in zip(batch.jobs, diff):
            case = self.cases.get(name)
            if case is None:  # dropped meanwhile
                continue
            case.diff[w] = d
            case.missing -= 1
            case.workers.add(worker)
            if case.complete:
                done.append(self.cases.pop(name))
        return done

    def drop(self, names: set[str]) -> list[CaseSlices]:
        """Take cases out (their model work failed): queued slices are forgotten and
        results still coming for them are ignored. Returns the cases dropped."""
        self.queue = deque(job for job in self.queue if job[0] not in names)
        return [self.cases.pop(name) for name in names if name in self.cases]

    @property
    def fill(self) -> float:
        """Mean batch fill so far: slices sent / (batches x batch size)."""
        return self.slices / (self.batches * self.batch_size) if self.batches else 0.0


def batch_fill(slices_per_case: list[int], batch_size: int, packed: bool) -> float:
    """Mean batch fill of cases with these numbers of slices to inpaint: each case on its
    own (``packed=False``, the local engine) or all packed together (the Ray engine)."""
    total = sum(slices_per_case)
    if not total:
        return 0.0
    if packed:
        batches = -(-total // batch_size)
    else:
        batches = sum(-(-n // batch_size) for n in slices_per_case)
    return total / (batches * batch_size)
