"""Folder mode on Ray (``gdpi detect --engine ray``): many cases, many model workers,
one machine or a cluster.

Ray Core, three kinds of work:

- a CPU task per case reads the CT and mask, checks them, orients them and plans the
  model-grid slices (:func:`.pipeline.plan_slices`);
- model workers (Ray actors, one model each, loaded once; one per GPU, or CPU workers)
  inpaint batches that this driver packs from the slices of every prepared case
  (:class:`.packing.Packer`): full batches, whatever the cases' sizes;
- a CPU task per case reads the CT again, scores it (:func:`.pipeline.finish_detection`)
  and writes its folder all or nothing (:func:`.runner.write_case`).

Outputs are those of the local engine, voxel for voxel: a slice's noise is seeded by the
slice, never by its batch. A model worker that dies is restarted by Ray and its batch
retried; a case whose task fails is recorded in ``summary.csv``. Inputs and ``--out``
must be on a file system every node sees (e.g. NFS); the checkpoint travels through
Ray's object store. Ray is optional: ``pip install "gdpi-liver-anomaly[ray]"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import Cancelled, GDPIError, ParameterError, os_error_message
from ..files.checkpoint import Checkpoint
from ..method.grid import InputGrid
from ..method.parameters import DetectionParams, default_batch_size
from . import signals
from .packing import CaseSlices, Packer
from .pipeline import (
    bf16_active,
    finish_detection,
    inpaint_grid,
    plan_slices,
)
from .progress import BatchProgress
from .runner import (
    CaseInputs,
    complete_result,
    error_row,
    start_batch,
    summary_row,
    write_case,
)

#: Batches queued per model worker beyond the running one (keeps a GPU busy).
QUEUE_PER_WORKER = 1
#: Slices kept prepared ahead, in batches per worker.
PREFETCH_BATCHES = 3
#: Retries of a batch whose model worker died (Ray restarts the worker each time).
WORKER_RETRIES = 3
#: GPU batch of 64 px models: on an H200 (docs/performance.md) the network costs 0.094 ms
#: per slice per evaluation at batch 64 against 0.99 at 8 (launch-bound below 32).
GPU_BATCH = 64
#: Seconds the model workers may take to start (placement, loading the model).
WORKER_START_S = 600


@dataclass
class RayOptions:
    """Where and how wide the Ray engine runs.

    ``address``: None starts a local Ray instance sized to this machine; ``"auto"`` or
    ``HOST:PORT`` joins a running cluster. ``workers``: model workers (default: one per
    ``gpus_per_worker`` GPUs of the cluster, else one). ``gpus_per_worker``: default 1
    where the cluster has GPUs and ``--device`` allows them, else 0 (CPU workers).
    ``cpus_per_worker``: logical CPUs a model worker reserves and its PyTorch threads
    (default 1 with GPUs; CPU workers: the smallest node's CPUs minus one, left to the
    read/score tasks).
    """

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: int | None = None

    def check(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ParameterError(f"--workers must be at least 1 (got {self.workers})")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ParameterError(f"--gpus-per-worker must be >= 0 (got {self.gpus_per_worker})")
        if self.cpus_per_worker is not None and self.cpus_per_worker < 1:
            raise ParameterError(
                f"--cpus-per-worker must be at least 1 (got {self.cpus_per_worker})"
            )


def import_ray():
    """Ray, or a clear error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise GDPIError(
            'the Ray engine needs Ray: pip install "gdpi-liver-anomaly[ray]" (or pip install '
            "ray), or use --engine local"
        ) from None
    return ray


# ---- the work, as plain functions (Ray runs them as tasks and an actor) -------------


def prepare_case(inputs, grid: InputGrid, params: DetectionParams) -> tuple[dict, object]:
    """CPU task: read and plan one case. Returns ``(work, plan)``: ``work`` holds the
    grid slices to inpaint (or ``error``), ``plan`` the detached :class:`SlicePlan`."""
    t0 = time.perf_counter()
    try:
        ct, liver = inputs.read()
        t_read = time.perf_counter() - t0
        plan = plan_slices(ct, liver, grid, params)
    except GDPIError as exc:
        return {"error": str(exc)}, None
    except OSError as exc:
        return {"error": os_error_message(exc)}, None
    work = plan.work  # the grid images with candidates that the depth sampling keeps
    return {
        "ct": plan.ct_grid[work],
        "mask": plan.paint_grid[work],
        "seeds": [[s[i] for i in work] for s in plan.seeds],
        "work": work,
        "read_s": round(t_read, 3),
        "prepare_s": round(time.perf_counter() - t0 - t_read, 3),
    }, plan.detached()


def finish_case(
    inputs, plan, diff: np.ndarray, work: list[int], inpainting: dict, out: Path, params,
    checkpoint_identity: dict, timings: dict, engine: dict, overwrite: bool,
) -> dict:  # fmt: skip
    """CPU task: score a case whose slices came back and write its folder. Returns
    run.json's content, or ``{"error": ...}``. ``timings["elapsed_s"]`` is the time the
    case has taken before this task (its wall clock goes on from there)."""
    start = time.perf_counter() - timings["elapsed_s"]
    written = None if overwrite else complete_result(out)
    if written is not None:  # this task ran before and died after moving the case in place
        return written
    try:
        if inputs.changed():
            return {"error": "its CT or liver mask file changed during the run; run it again"}
        ct, liver = inputs.read()
        plan = plan.attach(ct, liver)
        diff_grid = np.zeros(plan.cand_grid.shape, np.float32)  # slices and windows
        if work:  # a case whose AME found nothing has no slices to inpaint
            diff_grid[work] = diff
        result = finish_detection(plan, diff_grid, work, inpainting, start)
        case_timings = {"read": timings["read"], "started": timings["started"], "t0": start}
        return write_case(
            out, inputs, ct, liver, result, params, checkpoint_identity, case_timings,
            engine, overwrite,
        )  # fmt: skip
    except GDPIError as exc:
        return {"error": str(exc)}
    except OSError as exc:  # disk full, ...: fails only this case
        return {"error": os_error_message(exc)}


class InpaintWorker:
    """A model worker: the checkpoint loaded once; inpaints packed batches."""

    def __init__(self, checkpoint: Checkpoint, params: DetectionParams, threads: int):
        import torch

        from .devices import resolve_device

        if threads:
            torch.set_num_threads(threads)
        self.checkpoint = checkpoint
        self.params = params
        self.device = resolve_device(params.device)
        self.name = f"{_node_ip()}:{os.getpid()} {self.device}"

    def describe(self) -> dict:
        """This worker's name (node:pid device), device and whether bf16 autocast runs."""
        return {
            "name": self.name,
            "device": str(self.device),
            "bf16": bf16_active(self.params.bf16, self.device),
        }

    def inpaint(self, ct: np.ndarray, mask: np.ndarray, seeds: list[list[int]]):
        """``(inpainted - input in HU, this worker's name)`` for a batch."""
        diff = inpaint_grid(
            ct, mask, self.checkpoint, self.params, self.device, [list(range(len(ct)))], seeds
        )
        return diff, self.name


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray
        return "localhost"


# ---- the driver ---------------------------------------------------------------------


def _message(exc: BaseException) -> str:
    """The last line of an exception's text (Ray's wrap the task's own error last)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


@dataclass
class _Case:
    case: object  # cases.Case
    inputs: object  # runner.CaseInputs
    plan: object = None  # ObjectRef of the detached plan
    slices: CaseSlices | None = None
    read_s: float = 0.0
    prepare_s: float = 0.0
    submitted: float = 0.0
    started: datetime | None = None
    first_batch: float | None = None


def run_folder_ray(
    ct_dir: str | Path,
    liver_dir: str | Path,
    checkpoint: Checkpoint,
    params: DetectionParams,
    out: str | Path,
    options: RayOptions,
    liver_label: int | None = None,
    allow_non_hu: bool = False,
    on_case_done: Callable[[dict], None] | None = None,
    progress: Callable[[BatchProgress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    overwrite: bool = False,
    on_workers: Callable[[list[str]], None] | None = None,
    allow_non_ct: bool = False,
) -> tuple[list[dict], dict]:
    """Every case of a folder into ``out/<case>/`` plus ``out/summary.csv``, on Ray.

    Same folder contract, resume and outputs as :func:`.runner.run_folder`. Returns the
    summary rows (case order) and the run's figures (cases, slices, batches, batch fill,
    slices per second, workers). ``on_case_done(row)`` after each case; ``progress``
    over all cases; ``on_workers(names)`` once the model workers are up. Cancelling
    (``should_cancel``, Ctrl+C) stops the cluster work; cases being written finish, no
    case is left half-written, and the summary holds what is done.
    """
    options.check()
    params.validate(checkpoint.diffusion.num_timesteps)
    ray = import_ray()
    batch = start_batch(
        ct_dir, liver_dir, params, checkpoint.sha256, out, overwrite, liver_label, allow_non_hu
    )
    if not batch.todo:  # everything done already: no cluster needed
        batch.open()
        return [batch.done[c.name] for c in batch.cases], {}
    started_here = not ray.is_initialized()
    if started_here:
        _init_ray(ray, options.address)
    workers: list = []
    # ray.init sets its own SIGTERM handler: gdpi's (if installed) are put back
    with signals.cooperative():
        try:
            gpus, cpus, threads, count, device = _size_workers(ray, options, params)
            batch_size = params.batch_size or worker_batch_size(bool(gpus), checkpoint.grid.size)
            batch.open()
            actor = ray.remote(InpaintWorker).options(
                num_cpus=cpus, num_gpus=gpus, max_restarts=-1, max_task_retries=WORKER_RETRIES
            )
            checkpoint_ref = ray.put(checkpoint)
            worker_params = dataclasses.replace(params, device=device)
            workers = [actor.remote(checkpoint_ref, worker_params, threads) for _ in range(count)]
            described = _wait_for_workers(ray, workers, should_cancel)
            if on_workers is not None:
                on_workers([d["name"] for d in described])
            engine = {
                "name": "ray",
                "ray": ray.__version__,
                "address": options.address or "local",
                "batch_size": batch_size,
            }
            inputs = [  # absolute: the tasks run anywhere in the cluster
                CaseInputs(Path(c.ct).absolute(), Path(c.liver).absolute(), liver_label,
                           allow_non_hu, allow_non_ct=allow_non_ct)
                for c in batch.todo
            ]  # fmt: skip
            loop = _Loop(ray, batch, batch_size, workers, params, checkpoint, engine, overwrite,
                         inputs, on_case_done, progress, should_cancel, cpus, described[0])  # fmt: skip
            rows, figures = loop.run()
        finally:
            for w in workers:
                with contextlib.suppress(Exception):  # already gone with a dying cluster
                    ray.kill(w)
            if started_here:
                ray.shutdown()
    every = {**batch.done, **rows}
    return [every[c.name] for c in batch.cases if c.name in every], figures


def worker_batch_size(gpu: bool, image_size: int) -> int:
    """Slices per batch of a model worker when ``--batch-size`` is not given: on a GPU
    :data:`GPU_BATCH` for models of up to 64 px (packing keeps such batches full), else
    the local engine's default (:func:`GDPILiverAnomalyLib.method.parameters.default_batch_size`)."""
    if gpu and image_size <= 64:
        return GPU_BATCH
    return default_batch_size("cuda" if gpu else "cpu", image_size)


def _wait_for_workers(ray, workers: list, should_cancel) -> list[dict]:
    """The model workers' :meth:`InpaintWorker.describe`, once every one is up."""
    pending = {w.describe.remote(): i for i, w in enumerate(workers)}
    described: list = [None] * len(workers)
    deadline = time.monotonic() + WORKER_START_S
    while pending:
        if should_cancel is not None and should_cancel():
            raise Cancelled()
        if time.monotonic() > deadline:
            raise GDPIError(
                f"the model workers did not start within {WORKER_START_S} s: the cluster "
                "lacks the CPUs/GPUs they ask for (--workers, --cpus-per-worker, "
                "--gpus-per-worker)"
            )
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
        for ref in ready:
            try:
                described[pending.pop(ref)] = ray.get(ref)
            except ray.exceptions.RayError as exc:
                raise GDPIError(f"a model worker could not start: {_message(exc)}") from None
    kinds = {(d["device"].split(":")[0], d["bf16"]) for d in described}
    if len(kinds) > 1:
        raise GDPIError(f"model workers of different kinds (device, bf16): {sorted(kinds)}")
    return described


#: Seconds to wait for a Ray cluster's head to answer before giving up.
CONNECT_TIMEOUT_S = 15.0


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse, in one line, a ``host:port`` (or ``ray://host:port``) that does not accept
    a TCP connection within ``timeout_s``: Ray itself retries for minutes in silence.
    ``auto`` (the address Ray finds itself) is left to Ray."""
    import socket

    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise GDPIError(f"--address {address}: expected host:port, ray://host:port or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {timeout_s:g} s"
        else:
            reason = exc.strerror or str(exc)
        raise GDPIError(f"cannot reach the Ray cluster at {address} ({reason})") from None


def _init_ray(ray, address: str | None) -> None:
    import logging

    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if address is not None:
        check_reachable(address)
    try:
        if address is None:
            ray.init(**kwargs)  # a local instance with this machine's CPUs and GPUs
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = "a local Ray instance" if address is None else f"the Ray cluster at {address}"
        raise GDPIError(f"could not start or join {where}: {exc}") from None


def _size_workers(ray, options: RayOptions, params: DetectionParams):
    """(GPUs, CPUs and threads per worker, number of workers, device) for the cluster.

    At least one CPU of the cluster stays free for the read and score tasks: model
    workers that take every CPU would starve them and the run would never end."""
    resources = ray.cluster_resources()
    cpu_nodes = [
        n["Resources"]["CPU"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")
    ]
    cluster_cpus, cluster_gpus = int(resources.get("CPU", 0)), resources.get("GPU", 0)
    device = params.device
    gpus = options.gpus_per_worker
    if gpus is None:
        gpus = 1 if cluster_gpus and device in ("auto", "cuda") else 0
    if gpus and device not in ("auto", "cuda"):
        raise ParameterError(
            f"--gpus-per-worker {gpus:g} needs --device auto or cuda, not {device}"
        )
    if not gpus and device not in ("auto", "cpu"):
        raise ParameterError(
            f"--device {device}: the Ray engine's CPU workers run on cpu; for GPUs give "
            "--gpus-per-worker (Ray assigns the GPU)"
        )
    if cluster_cpus < 2:
        raise ParameterError(
            f"the Ray cluster has {cluster_cpus} CPU(s): the engine needs at least 2 (model "
            "workers, and reading and scoring)"
        )
    biggest = int(max(cpu_nodes, default=cluster_cpus))
    cpus = options.cpus_per_worker or (1 if gpus else max(1, biggest - 1))
    count = options.workers
    if count is None:
        count = int(cluster_gpus // gpus) if gpus else (cluster_cpus - 1) // cpus
        count = max(1, min(count, (cluster_cpus - 1) // cpus))
    if cpus > biggest or count * cpus > cluster_cpus - 1:
        raise ParameterError(
            f"{count} model worker(s) of {cpus} CPU(s) leave no CPU of this {cluster_cpus}-CPU "
            f"cluster (largest node {biggest}) for reading and scoring: lower --workers or "
            "--cpus-per-worker"
        )
    if gpus and count * gpus > cluster_gpus:
        raise ParameterError(
            f"{count} model worker(s) of {gpus:g} GPU(s), but the cluster has {cluster_gpus:g}"
        )
    return gpus, cpus, (0 if gpus else cpus), count, ("cuda" if gpus else "cpu")


class _Loop:
    """The driver's event loop: prepare tasks in, packed batches out, finish tasks."""

    def __init__(self, ray, batch, batch_size, workers, params, checkpoint, engine, overwrite,
                 inputs, on_case_done, progress, should_cancel, worker_cpus, worker):  # fmt: skip
        self.ray, self.batch, self.workers = ray, batch, workers
        self.params, self.engine, self.overwrite = params, engine, overwrite
        self.identity = checkpoint.identity()
        self.worker = worker  # InpaintWorker.describe() of the first worker
        self.grid = checkpoint.grid
        self.nfe_batch = params.nfe_per_batch()
        self.packer = Packer(batch_size)
        self.todo = [_Case(c, i) for c, i in zip(batch.todo, inputs)]
        self.todo.reverse()  # pop() takes the first case
        self.cases_total = len(batch.todo)
        self.on_case_done, self.progress, self.should_cancel = on_case_done, progress, should_cancel
        free_cpus = ray.cluster_resources().get("CPU", 1) - worker_cpus * len(workers)
        self.max_preparing = max(1, min(int(free_cpus), 2 * len(workers) + 2))
        self.prepare = ray.remote(prepare_case).options(num_cpus=1, num_returns=2)
        self.finish = ray.remote(finish_case).options(num_cpus=1)
        self.preparing: dict = {}  # work ref -> _Case
        self.running: dict = {}  # result ref -> (worker index, packing.Batch)
        self.finishing: dict = {}  # result ref -> _Case
        self.queued = [0] * len(workers)
        self.packed_cases: dict[str, _Case] = {}  # cases with slices in the packer
        self.failed_unread = 0  # cases that failed before their slices were known
        self.rows: dict[str, dict] = {}
        self.failed = 0
        self.slice_counts: list[int] = []
        self.slices_done = 0
        self.t0 = time.perf_counter()
        self.t_first: float | None = None

    def run(self) -> tuple[dict, dict]:
        ray = self.ray
        try:
            while self.todo or self.preparing or len(self.packer) or self.running or self.finishing:
                if self.should_cancel is not None and self.should_cancel():
                    raise Cancelled()
                self._submit_prepares()
                self._dispatch()
                refs = [*self.preparing, *self.running, *self.finishing]
                ready, _ = ray.wait(refs, num_returns=1, timeout=0.5)
                for ref in ready:
                    if ref in self.preparing:
                        self._prepared(ref, self.preparing.pop(ref))
                    elif ref in self.running:
                        self._inpainted(ref, *self.running.pop(ref))
                    else:
                        self._finished(ref, self.finishing.pop(ref))
                self._report()
        except (Cancelled, KeyboardInterrupt):
            self._stop()
            raise Cancelled() from None
        except BaseException:
            self._stop()
            raise
        elapsed = time.perf_counter() - (self.t_first or self.t0)
        figures = {
            "slices_inpainted": self.slices_done,
            "batches": self.packer.batches,
            "batch_size": self.packer.batch_size,
            "batch_fill": round(self.packer.fill, 4),
            "slices_per_s": round(self.slices_done / elapsed, 3) if elapsed > 0 else 0.0,
            "workers": len(self.workers),
        }
        return self.rows, figures

    # -- submitting
    def _submit_prepares(self) -> None:
        ahead = PREFETCH_BATCHES * len(self.workers) * self.packer.batch_size
        while self.todo and len(self.preparing) < self.max_preparing and len(self.packer) < ahead:
            case = self.todo.pop()
            case.submitted = time.perf_counter()
            case.started = datetime.now(timezone.utc)
            # the files as they are now: finish_case reads them again and compares
            case.inputs = dataclasses.replace(case.inputs, stamps=case.inputs.file_stamps())
            work_ref, case.plan = self.prepare.remote(case.inputs, self.grid, self.params)
            self.preparing[work_ref] = case

    def _dispatch(self) -> None:
        flush = not self.todo and not self.preparing
        for index, worker in enumerate(self.workers):
            while self.queued[index] <= QUEUE_PER_WORKER:
                packed = self.packer.next_batch(flush)
                if packed is None:
                    return
                if self.t_first is None:
                    self.t_first = time.perf_counter()
                for name in dict.fromkeys(n for n, _ in packed.jobs):
                    case = self.packed_cases[name]
                    case.first_batch = case.first_batch or time.perf_counter()
                ref = worker.inpaint.remote(packed.ct, packed.mask, packed.seeds)
                self.running[ref] = (index, packed)
                self.queued[index] += 1

    def _finish(self, case: _Case, slices: CaseSlices | None) -> None:
        now = time.perf_counter()
        work = [] if slices is None else slices.work
        inpaint_s = 0.0 if case.first_batch is None else now - case.first_batch
        inpainting = {
            "device": self.worker["device"],
            "bf16": self.worker["bf16"],
            "batches": 0 if slices is None else slices.batches,
            "batch_size": self.packer.batch_size,
            "nfe": self.nfe_batch * (0 if slices is None else slices.batches),
            "timings_s": {"prepare": case.prepare_s, "inpaint": round(inpaint_s, 3)},
        }
        engine = {**self.engine, "workers": sorted(slices.workers) if slices else []}
        timings = {"read": case.read_s, "started": case.started, "elapsed_s": now - case.submitted}
        diff = np.zeros((0,), np.float32) if slices is None else slices.diff
        ref = self.finish.remote(
            case.inputs, case.plan, diff, work, inpainting, self.batch.out / case.case.name,
            self.params, self.identity, timings, engine, self.overwrite,
        )  # fmt: skip
        self.finishing[ref] = case

    # -- receiving
    def _prepared(self, ref, case: _Case) -> None:
        work = self._get(ref)
        if "error" in work:
            self.failed_unread += 1
            self._record(case, None, work["error"])
            return
        case.read_s, case.prepare_s = work["read_s"], work["prepare_s"]
        self.slice_counts.append(len(work["work"]))
        if not work["work"]:
            self._finish(case, None)
            return
        case.slices = CaseSlices(case.case.name, work["ct"], work["mask"], work["seeds"],
                                 work["work"])  # fmt: skip
        self.packer.add(case.slices)
        self.packed_cases[case.case.name] = case

    def _inpainted(self, ref, index: int, packed) -> None:
        self.queued[index] -= 1
        try:
            diff, worker = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:  # not a crash (Ray retries those)
            self._fail_batch(packed, f"model work failed: {_message(exc)}")
            return
        self.slices_done += len(packed.jobs)
        for slices in self.packer.receive(packed, diff, worker):
            self._finish(self.packed_cases.pop(slices.name), slices)

    def _fail_batch(self, packed, error: str) -> None:
        """A batch failed past its retries: its cases fail, the others go on."""
        names = {name for name, _ in packed.jobs}
        self.packer.drop(names)
        for name in names:
            case = self.packed_cases.pop(name, None)
            if case is not None:
                self._record(case, None, error)

    def _finished(self, ref, case: _Case) -> None:
        info = self._get(ref)
        self._record(case, info, info.get("error"))

    def _get(self, ref) -> dict:
        """A read or score task's result; a task that failed past Ray's retries (its
        worker killed, out of memory, a bug) fails its case only."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            return {"error": f"task failed: {_message(exc)}"}

    def _record(self, case: _Case, info: dict | None, error: str | None) -> None:
        seconds = round(time.perf_counter() - case.submitted, 2)
        if error is not None:
            row = error_row(self.batch, case.case, error, self.overwrite)
            row["seconds"] = seconds
            self.failed += 1
        else:
            row = summary_row(self.batch.row(case.case), info, seconds)
        self.rows[case.case.name] = row
        self.batch.write_summary(self.rows)
        if self.on_case_done is not None:
            self.on_case_done(row)

    def _report(self) -> None:
        if self.progress is None:
            return
        done = len(self.rows)
        known = sum(self.slice_counts)
        unknown = self.cases_total - len(self.slice_counts) - self.failed_unread
        mean = known / len(self.slice_counts) if self.slice_counts else 0.0
        total = int(round(known + max(0, unknown) * mean))
        elapsed = time.perf_counter() - (self.t_first or self.t0)
        rate = self.slices_done / elapsed if self.t_first and elapsed > 0 else 0.0
        eta = (total - self.slices_done) / rate if rate else None
        self.progress(
            BatchProgress(
                done, self.failed, self.cases_total, self.slices_done, total,
                round(rate, 3), None if eta is None else round(eta, 1),
                round(self.packer.fill, 4), len(self.workers),
            )
        )  # fmt: skip

    # -- stopping
    def _stop(self) -> None:
        """Cancel the reading and the model work; let the cases being written finish."""
        with contextlib.suppress(Exception):  # a cluster going down with us (SIGTERM)
            for ref in self.preparing:
                self.ray.cancel(ref, force=True)
            for worker in self.workers:
                self.ray.kill(worker)
        for ref, case in list(self.finishing.items()):
            with contextlib.suppress(Exception):  # a failed write left nothing (atomic)
                self._finished(ref, case)
        self.batch.write_summary(self.rows)
