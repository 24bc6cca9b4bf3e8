"""``gdpi`` engine commands: detect, demo, init-model, devices (``python -m GDPILiverAnomalyLib``).

The ``gdpi`` console script adds the training commands (``GDPITraining.cli``) to these.
Exit codes: 0 success; 2 bad input, parameter, checkpoint or output folder (one-line
``gdpi: error: ...`` on stderr, nothing written); 3 folder mode with at least one
failed case; 130 cancelled (SIGINT/SIGTERM; nothing written for the running case).
With ``--progress json`` every line on stdout is one JSON object with an ``event``
key: ``start``, ``progress``, ``case``, ``partial`` (with ``--stream-dir``), ``done``,
``error``, ``cancelled``; with ``--engine ray`` also ``workers``, ``batch`` (progress over
all cases) and ``case_done``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import (
    Cancelled,
    CheckpointError,
    GDPIError,
    OutputError,
    ParameterError,
    os_error_message,
)
from ..files.checkpoint import FORMAT as CHECKPOINT_FORMAT
from ..files.checkpoint import init_checkpoint, load_checkpoint, read_header, save_checkpoint
from ..files.checks import itk_path
from ..files.dicom import describe_series
from ..method.grid import InputGrid
from ..method.parameters import (
    DEFAULT_CHECKPOINT,
    PRESETS,
    DetectionParams,
    add_arguments,
    describe_preset,
    overrides_from,
)
from ..method.phase import describe_ame_side
from ..method.unet import MODEL_SIZES
from . import signals
from .progress import PartialWriter, Reporter

#: A command: ``handler(args, should_cancel)`` returns the exit code; ``should_cancel()``
#: turns True on SIGINT/SIGTERM for commands that stop cooperatively (:mod:`.signals`).
Handler = Callable[[argparse.Namespace, Callable[[], bool]], int]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``gdpi: error: ...`` and exit 2, no usage dump."""

    def error(self, message: str):
        sys.stderr.write(f"gdpi: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def liver_label(text: str) -> int:
    """``--liver-label`` (argparse type): a whole number other than 0, the background."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value == 0:
        raise argparse.ArgumentTypeError(
            "0 is the background; leave --liver-label out for a binary (0/1, 0/255) or "
            "LiTS (1 liver, 2 tumour) mask"
        )
    return value


#: Adds subcommands to the ``gdpi`` parser; returns ``{name: (handler, cooperative)}``.
CommandSet = Callable[[argparse._SubParsersAction], "dict[str, tuple[Handler, bool]]"]


def add_commands(sub: argparse._SubParsersAction) -> dict:
    """The engine's subcommands (detect, demo, init-model)."""
    d = sub.add_parser(
        "detect",
        help="detect liver anomalies in a CT (or every case of folders)",
        description="Run GDPI on a CT and its liver mask, or on every case of a "
        "folder (LiTS names, case subfolders, or same names).",
    )
    d.add_argument(
        "--ct", required=True, help="CT file (NIfTI/NRRD/MHA), DICOM folder, or a folder of cases"
    )
    d.add_argument("--liver", required=True, help="liver mask file (or folder in folder mode)")
    d.add_argument(
        "--liver-label",
        type=liver_label,
        default=None,
        help="liver label value in a label map (default: nonzero of a binary (0/1, 0/255) "
        "or LiTS map; TotalSegmentator: 5)",
    )
    d.add_argument(
        "--checkpoint",
        default=str(DEFAULT_CHECKPOINT),
        help="GDPI checkpoint (.safetensors; default: the bundled real-CT model)",
    )
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="fast",
        help="; ".join(describe_preset(name) for name in PRESETS) + " (default fast)",
    )
    add_arguments(d)
    d.add_argument(
        "--allow-non-hu", action="store_true", help="process a CT whose values do not look like HU"
    )
    d.add_argument(
        "--allow-non-ct",
        action="store_true",
        help="process a DICOM series whose Modality is not CT (MR, PT, ...; the model was "
        "trained on CT in HU)",
    )
    d.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier result in --out as a whole (without it, --out must be new "
        "or empty; a folder holding anything but an earlier result is never replaced)",
    )
    d.add_argument(
        "--progress",
        choices=("text", "json", "none"),
        default="text",
        help="text: progress bar on stderr; json: one JSON object per line on stdout",
    )
    e = d.add_argument_group(
        "folder engine", "how folder mode runs: here, case after case (local), or on Ray"
    )
    e.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: one case after another in this process (default); ray: slices of many "
        "cases packed into full batches for model workers on a local Ray instance or a "
        'cluster (pip install "gdpi-liver-anomaly[ray]")',
    )
    e.add_argument(
        "--address",
        help="ray: join a running cluster (auto, or HOST:PORT of its head) instead of starting "
        "a local instance sized to this machine",
    )
    e.add_argument(
        "--workers",
        type=int,
        help="ray: model workers, one model each (default: one per GPU of the cluster, else 1)",
    )
    e.add_argument(
        "--gpus-per-worker",
        type=float,
        help="ray: GPUs per model worker (default 1 where the cluster has GPUs, else 0: CPU "
        "workers)",
    )
    e.add_argument(
        "--cpus-per-worker",
        type=int,
        help="ray: CPUs a model worker reserves and uses as PyTorch threads (default 1 with "
        "GPUs; CPU workers: a node's CPUs minus one, left to reading and scoring)",
    )
    d.add_argument(
        "--stream-dir",
        type=Path,
        help="single case: write the score so far to DIR/partial-N.npy while running "
        "(cropped to its nonzero box; a json 'partial' event gives the file and offset)",
    )
    d.add_argument(
        "--stream-every",
        type=float,
        default=2.0,
        help="seconds between streamed partial scores (default 2)",
    )

    m = sub.add_parser(
        "init-model", help="write a randomly initialised checkpoint (tests, smoke runs)"
    )
    m.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    m.add_argument("--size", choices=sorted(MODEL_SIZES), default="tiny")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument(
        "--fixed-variance", action="store_true", help="no learned sigma (C output channels)"
    )
    m.add_argument(
        "--grid-spacing",
        type=float,
        default=None,
        help="model grid spacing in mm (0 = fit the whole slice; default by size)",
    )
    m.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing gdpi checkpoint at --out (any other file is never replaced)",
    )
    dm = sub.add_parser(
        "demo",
        help="synthetic case + bundled demo model: detect, figure, metrics",
        description="Generate a synthetic abdominal CT with lesions, run gdpi detect with "
        "the bundled demo model, draw a figure and print pixel metrics.",
    )
    dm.add_argument("--out", required=True, type=Path, help="output folder")
    dm.add_argument("--checkpoint", help="another checkpoint instead of the bundled demo model")
    dm.add_argument("--preset", choices=sorted(PRESETS), default="fast")
    dm.add_argument("--seed", type=int, default=7, help="synthetic case seed (default 7)")
    dm.add_argument("--device", default="auto")
    dm.add_argument("--progress", choices=("text", "json", "none"), default="text")
    dm.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    dv = sub.add_parser(
        "devices",
        help="list the devices PyTorch can use here (CPU, CUDA GPUs, Apple MPS)",
        description="One line per device: the --device value and its name; with --json one "
        'JSON object {"event": "devices", "devices": [{"id", "name", ...}], "torch"}.',
    )
    dv.add_argument("--json", action="store_true", help="one JSON line on stdout")
    return {
        "detect": (_detect, True),
        "demo": (_demo, True),
        "init-model": (_init_model, False),
        "devices": (_devices, False),
    }


def build_parser(*command_sets: CommandSet) -> tuple[argparse.ArgumentParser, dict]:
    """The ``gdpi`` parser with the engine's commands and those of ``command_sets``;
    returns it with ``{name: (handler, cooperative)}``."""
    parser = ArgumentParser(prog="gdpi", description="Liver tumour anomaly detection in CT (GDPI).")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = add_commands(sub)
    for command_set in command_sets:
        handlers.update(command_set(sub))
    return parser, handlers


def _demo(args: argparse.Namespace, should_cancel: Callable[[], bool]) -> int:
    from .demo import run_demo

    reporter = Reporter(args.progress)
    try:
        metrics = run_demo(
            args.out,
            args.checkpoint,
            args.seed,
            args.preset,
            args.device,
            progress=reporter,
            should_cancel=should_cancel,
            log=lambda m: print(m, file=sys.stderr) if args.progress != "json" else None,
            overwrite=args.overwrite,
        )
    finally:
        reporter.close()
    reporter.emit(
        "done",
        out=str(args.out.absolute()),
        **{k: metrics[k] for k in ("auroc", "ap", "best_dice")},
    )
    if args.progress != "json":
        print(
            f"AUROC {metrics['auroc']:.4f}  AP {metrics['ap']:.4f}  best Dice {metrics['best_dice']:.4f}"
        )
    return 0


def _detect(args: argparse.Namespace, should_cancel: Callable[[], bool]) -> int:
    params = DetectionParams.from_preset(args.preset, **overrides_from(args))
    params.validate()  # before any file is read: a bad option is the first error
    checkpoint = load_checkpoint(args.checkpoint)
    params.validate(checkpoint.diffusion.num_timesteps)
    reporter = Reporter(args.progress)
    ct, liver = Path(args.ct), Path(args.liver)
    for path, what in ((ct, "CT"), (liver, "liver mask"), (Path(args.out), "--out")):
        itk_path(path, what)  # SimpleITK aborts the process on a name that is not UTF-8
    if args.stream_dir is not None:
        stream, out = Path(args.stream_dir).absolute(), Path(args.out).absolute()
        if stream == out or out in stream.parents:
            raise ParameterError(
                f"--stream-dir {args.stream_dir} is inside --out {args.out}: the results "
                "could then not be moved there; stream to another folder"
            )

    folder_mode = ct.is_dir() and liver.is_dir() and not _is_dicom_folder(ct)
    ray_options = _ray_options(args, folder_mode)
    reporter.emit(
        "start",
        ct=str(ct),
        liver=str(liver),
        out=args.out,
        folder=folder_mode,
        parameters=params.to_dict(),
        nfe_per_batch=params.nfe_per_batch(),
    )
    t0 = time.perf_counter()
    try:
        if folder_mode:
            figures = {}
            if ray_options is not None:
                from .ray_engine import run_folder_ray

                # Ray prints its cluster messages on stdout: they go to stderr, stdout
                # keeps the JSON lines only; Ctrl+C stops the cluster work cleanly
                reporter.stream = sys.stdout
                with signals.cooperative(), contextlib.redirect_stdout(sys.stderr):
                    rows, figures = run_folder_ray(
                        ct, liver, checkpoint, params, args.out, ray_options, args.liver_label,
                        args.allow_non_hu,
                        on_case_done=lambda row: reporter.emit("case_done", **row),
                        progress=reporter.batch,
                        should_cancel=should_cancel,
                        overwrite=args.overwrite,
                        on_workers=lambda names: reporter.emit("workers", workers=names),
                        allow_non_ct=args.allow_non_ct,
                    )  # fmt: skip
            else:

                def on_case(number: int, total: int, name: str) -> None:
                    reporter.start_case(name)
                    reporter.emit("case", number=number, total=total, case=name)

                from .runner import run_folder

                rows = run_folder(
                    ct, liver, checkpoint, params, args.out, args.liver_label,
                    args.allow_non_hu, on_case, reporter, should_cancel,
                    overwrite=args.overwrite, allow_non_ct=args.allow_non_ct,
                )  # fmt: skip
            reporter.close()
            failed = [r for r in rows if r["status"] != "ok"]
            for r in failed:
                print(f"gdpi: case {r['case']} failed: {r['error']}", file=sys.stderr)
            reporter.emit(
                "done",
                out=str(Path(args.out).absolute()),
                cases=len(rows),
                failed=len(failed),
                seconds=round(time.perf_counter() - t0, 2),
                engine=args.engine,
                **figures,
            )
            if args.progress == "text":
                print(
                    f"{len(rows) - len(failed)}/{len(rows)} cases done; summary: "
                    f"{Path(args.out) / 'summary.csv'}",
                    file=sys.stderr,
                )
            return 3 if failed else 0
        from .runner import run_case

        info = run_case(
            ct,
            liver,
            checkpoint,
            params,
            args.out,
            args.liver_label,
            args.allow_non_hu,
            reporter,
            should_cancel,
            None if args.stream_dir is None else PartialWriter(args.stream_dir, reporter),
            args.stream_every,
            overwrite=args.overwrite,
            allow_non_ct=args.allow_non_ct,
        )
    finally:
        reporter.close()
    series = info["inputs"].get("ct_dicom_series")
    reporter.emit(
        "done",
        out=str(Path(args.out).absolute()),
        lesions=info["results"]["lesions"],
        nfe=info["nfe"],
        ame=describe_ame_side(info["stats"]["two_sided"], info["stats"]["phase"]),
        seconds=round(time.perf_counter() - t0, 2),
        **({"ct_dicom_series": series} if series else {}),
    )
    if args.progress == "text":
        if series:
            print(f"CT: {describe_series(series)}", file=sys.stderr)
        print(
            f"{info['results']['lesions']} lesion(s), max score {info['results']['max_score_hu']:.1f} HU, "
            f"{info['nfe']} NFE, {info['timings_s']['wall']:.1f} s; "
            f"{describe_ame_side(info['stats']['two_sided'], info['stats']['phase'])}; "
            f"outputs in {args.out}",
            file=sys.stderr,
        )
    return 0


def _ray_options(args: argparse.Namespace, folder_mode: bool):
    """The Ray engine's options (``None`` for the local engine), checked."""
    given = [
        f"--{name.replace('_', '-')}" for name in RAY_OPTIONS if getattr(args, name) is not None
    ]
    if args.engine != "ray":
        if given:
            raise ParameterError(f"{given[0]} is an option of --engine ray")
        return None
    if not folder_mode:
        raise ParameterError(
            "--engine ray runs folder mode: give folders of cases to --ct and --liver"
        )
    if args.stream_dir is not None:
        raise ParameterError("--stream-dir streams a single case; not with --engine ray")
    from .ray_engine import RayOptions

    return RayOptions(**{name: getattr(args, name) for name in RAY_OPTIONS})  # checked by run


#: ``gdpi detect`` options of the Ray engine (argparse names).
RAY_OPTIONS = ("address", "workers", "gpus_per_worker", "cpus_per_worker")


def _is_dicom_folder(folder: Path) -> bool:
    from ..files.volumes import dicom_series_ids

    return bool(dicom_series_ids(folder))


def _devices(args: argparse.Namespace, should_cancel: Callable[[], bool]) -> int:
    import torch

    from .devices import available_devices

    devices = available_devices()
    if args.json:
        print(json.dumps({"event": "devices", "devices": devices, "torch": torch.__version__}))
    else:
        for device in devices:
            print(f"{device['id']:8s} {device['name']}")
    return 0


def _init_model(args: argparse.Namespace, should_cancel: Callable[[], bool]) -> int:
    grid = None
    if args.grid_spacing is not None:
        size = MODEL_SIZES[args.size]["image_size"]
        grid = InputGrid(size, None if args.grid_spacing == 0 else args.grid_spacing)
    out = _check_checkpoint_out(Path(args.out), args.overwrite)
    ckpt = init_checkpoint(args.size, args.seed, learn_sigma=not args.fixed_variance, grid=grid)
    try:
        path = save_checkpoint(ckpt, out)  # a temporary file, then a rename
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
    params = sum(p.numel() for p in ckpt.model.parameters())
    print(
        f"wrote {path} ({args.size}, {params / 1e6:.2f} M parameters, grid {ckpt.grid.size} px "
        f"at {ckpt.grid.spacing_mm or 'whole-slice'} mm; random weights, not trained)"
    )
    return 0


def _check_checkpoint_out(out: Path, overwrite: bool) -> Path:
    """``init-model --out``: a new file; with ``overwrite`` also an existing gdpi
    checkpoint (its safetensors header says ``format: gdpi-checkpoint``), never any
    other file."""
    if out.is_dir():
        raise OutputError(
            f"--out {out} is a folder: give a file name (e.g. {out / 'model.safetensors'})"
        )
    if not (out.exists() or out.is_symlink()):
        return out
    if not overwrite:
        raise OutputError(
            f"{out} exists: pass --overwrite to replace it (only a gdpi checkpoint is replaced)"
        )
    if not out.is_file():  # a named pipe would block the read below
        raise OutputError(f"{out} is not a regular file: choose another --out")
    try:
        found = read_header(out).get("format")
    except (CheckpointError, AttributeError):  # unreadable, or metadata not an object
        found = None
    if found != CHECKPOINT_FORMAT:
        raise OutputError(
            f"{out} is not a gdpi checkpoint: --overwrite replaces only a checkpoint "
            "(header format gdpi-checkpoint); choose another --out"
        )
    return out


def main(argv: list[str] | None = None, *command_sets: CommandSet) -> int:
    """Run one ``gdpi`` command; returns the exit code (see the module docstring).

    Signals: see :mod:`.signals` (the entry points install its handlers before the heavy
    imports; an in-process call leaves the caller's handlers alone)."""
    parser, handlers = build_parser(*command_sets)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a one-line argument error (2)
        return int(exc.code or 0)
    handler, cooperative = handlers[args.command]
    if cooperative:
        signals.immediate()  # until the network loop or the writing starts
    else:
        signals.uninstall()  # e.g. training: saves its state at intervals, resumes
    try:
        if signals.cancelled():  # a signal during start-up
            raise Cancelled()
        return handler(args, signals.cancelled)
    except GDPIError as exc:
        if getattr(args, "progress", None) == "json":
            print(json.dumps({"event": "error", "message": str(exc)}), flush=True)
        print(f"gdpi: error: {exc}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        if getattr(args, "progress", None) == "json":
            print(json.dumps({"event": "cancelled"}), flush=True)
        print("gdpi: cancelled; nothing written for the running case", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout (--progress json | ...) went away
        _drop_stdout()
        print("gdpi: error: stdout was closed by its reader; stopped", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system said no: a one-line error, not a traceback
        message = os_error_message(exc)
        if getattr(args, "progress", None) == "json":
            print(json.dumps({"event": "error", "message": message}), flush=True)
        print(f"gdpi: error: {message}", file=sys.stderr)
        return 2


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit cannot fail again."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    signals.install()
    sys.exit(main())
