"""``gdpi`` command line: detect, demo, init-model, prepare, train, evaluate, synth-tumours.

Exit codes: 0 success; 2 bad input, parameter, checkpoint or output folder (one-line
``gdpi: error: ...`` on stderr, nothing written); 3 folder mode with at least one
failed case; 130 cancelled (SIGINT/SIGTERM; nothing written for the running case).
With ``--progress json`` every line on stdout is one JSON object with an ``event``
key: ``start``, ``progress``, ``case``, ``partial`` (with ``--stream-dir``), ``done``,
``error``, ``cancelled``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from .checkpoint import init_checkpoint, load_checkpoint, save_checkpoint
from .errors import Cancelled, GDPIError
from .grid import InputGrid
from .job import run_case, run_folder
from .pipeline import PRESETS, DetectionParams, Progress
from .unet import MODEL_SIZES


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gdpi", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

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
        type=int,
        default=None,
        help="liver label value in a label map (default: nonzero of a binary or "
        "LiTS map; TotalSegmentator: 5)",
    )
    d.add_argument("--checkpoint", required=True, help="GDPI checkpoint (.safetensors)")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="paper",
        help="paper: 250 steps, jump 10, 10 resamplings; fast: 50 steps, jump 5, 3 resamplings",
    )
    d.add_argument("--steps", type=_positive_int, help="respaced diffusion steps")
    d.add_argument("--jump-length", type=_positive_int, help="RePaint jump length")
    d.add_argument("--jump-n-sample", type=_positive_int, help="RePaint resamplings")
    d.add_argument(
        "--offset-hu", type=float, help="AME offset below the liver median (HU, default 20)"
    )
    d.add_argument(
        "--two-sided",
        action="store_true",
        default=None,
        help="AME also flags tissue brighter than median + offset (arterial phase)",
    )
    d.add_argument(
        "--min-candidate-mm2", type=float, help="drop smaller in-slice candidate regions (mm^2)"
    )
    d.add_argument(
        "--median-size", type=int, help="median filter size in model-grid pixels (0 = off)"
    )
    d.add_argument(
        "--threshold", dest="threshold_hu", type=float, help="anomaly threshold (HU, default 20)"
    )
    d.add_argument(
        "--batch-size",
        type=_positive_int,
        help="slices inpainted together (default: 8 on CUDA, 1 on CPU)",
    )
    d.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    d.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast on CUDA")
    d.add_argument("--seed", type=int, help="random seed (default 0)")
    d.add_argument(
        "--allow-non-hu", action="store_true", help="process a CT whose values do not look like HU"
    )
    d.add_argument(
        "--progress",
        choices=("text", "json", "none"),
        default="text",
        help="text: progress bar on stderr; json: one JSON object per line on stdout",
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

    p = sub.add_parser(
        "prepare",
        help="make a slice store (healthy/abnormal slices on a model grid)",
        description="Healthy slices for training and abnormal slices for testing, "
        "split by patient (see Training/README.md).",
    )
    p.add_argument(
        "--layout", required=True, choices=("lits", "msd", "ircad", "folders", "list", "synthetic")
    )
    p.add_argument("--input", type=Path, help="dataset folder (or CSV for --layout list)")
    p.add_argument("--out", required=True, type=Path, help="store folder to create")
    p.add_argument("--grid-size", type=int, default=64, help="model grid pixels (default 64)")
    p.add_argument(
        "--grid-spacing",
        type=float,
        default=3.5,
        help="model grid mm per pixel, centred on the liver (0 = whole slice; default 3.5)",
    )
    p.add_argument("--liver-label", type=int, help="liver label (default: 1 and 2 as LiTS)")
    p.add_argument("--tumour-label", type=int, help="tumour label (default 2)")
    p.add_argument(
        "--ignore-label",
        type=int,
        help="label counted as liver whose slices are left out (synth-tumours writes 3)",
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="fraction of cases for validation"
    )
    p.add_argument(
        "--test-cases",
        default="",
        help="comma-separated case names held out for testing ('*' = every case)",
    )
    p.add_argument(
        "--min-liver-mm2", type=float, default=1000.0, help="minimum liver area of a slice (mm^2)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--synthetic-cases", type=int, default=0, help="--layout synthetic: number of cases"
    )
    p.add_argument(
        "--synthetic-lesions", action="store_true", help="--layout synthetic: add lesions"
    )

    t = sub.add_parser(
        "train",
        help="train the diffusion model (resumes from --out/state.pt if present)",
        description="Improved DDPM on healthy slices. Multi-GPU / multi-node: "
        "torchrun --nproc_per_node N -m GDPILiverAnomalyLib train ...",
    )
    t.add_argument("--data", required=True, help="slice store made by gdpi prepare")
    t.add_argument(
        "--out", required=True, help="run folder (model.safetensors, state.pt, log.csv, ...)"
    )
    t.add_argument(
        "--model",
        choices=("ddpm", "ae", "vae", "dae"),
        default="ddpm",
        help="ddpm: the GDPI diffusion prior (default); ae, vae, dae: the paper's baselines",
    )
    t.add_argument("--size", choices=sorted(MODEL_SIZES), default="tiny")
    t.add_argument("--steps", type=_positive_int, default=10_000)
    t.add_argument("--batch-size", type=_positive_int, default=16, help="global batch size")
    t.add_argument("--lr", type=float, help="learning rate (default 1e-4; 1e-3 for ae and vae)")
    t.add_argument("--ema-decay", type=float, default=0.999)
    t.add_argument("--schedule", choices=("linear", "cosine"), default="linear")
    t.add_argument("--fixed-variance", action="store_true", help="no learned sigma (L_simple only)")
    t.add_argument("--no-augment", action="store_true")
    t.add_argument("--save-every", type=_positive_int, default=500)
    t.add_argument("--log-every", type=_positive_int, default=25)
    t.add_argument(
        "--preview-every", type=int, default=0, help="preview PNG interval (0: at the end)"
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--bf16", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    e = sub.add_parser(
        "evaluate",
        help="the paper's protocol: GDPI variants and baselines on a prepared test set",
        description="Pixel AUROC/AP/best Dice (liver and whole-slice pooling), lesion "
        "detection, slice AUROC and normal-image bias; writes results.md, results.json, "
        "ROC/PR curves and qualitative panels (see Training/README.md).",
    )
    e.add_argument("--data", required=True, help="slice store made by gdpi prepare")
    e.add_argument("--out", required=True, help="report folder to create")
    e.add_argument(
        "--method",
        action="append",
        required=True,
        metavar="NAME[=CHECKPOINT]",
        help="gdpi, gdpi-wrd, gdpi-wr, gdpi-wd, gdpi-two-sided, gdpi-fast, gdpi-paper, "
        "gdpi-memory-bank, ae=PATH, vae=PATH, dae=PATH, darkness (repeat the option)",
    )
    e.add_argument("--checkpoint", help="diffusion checkpoint of the GDPI methods")
    e.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="GDPI base preset")
    e.add_argument(
        "--abnormal-split", default="test", help="split of the abnormal slices (or 'any')"
    )
    e.add_argument(
        "--healthy-split", default="test", help="split of the healthy slices ('any', 'none')"
    )
    e.add_argument(
        "--max-slices", type=_positive_int, help="at most N abnormal and N healthy slices"
    )
    e.add_argument("--offset-hu", type=float, help="AME offset (HU; default from the preset)")
    e.add_argument("--steps", type=_positive_int, help="override the preset's respaced steps")
    e.add_argument("--jump-length", type=_positive_int, help="override the RePaint jump length")
    e.add_argument("--jump-n-sample", type=_positive_int, help="override the resamplings")
    e.add_argument("--batch-size", type=_positive_int, help="slices inpainted together")
    e.add_argument("--bank", help="memory-bank store (default: --data's healthy train slices)")
    e.add_argument(
        "--bank-level",
        type=float,
        default=0.5,
        help="memory bank: start level as a fraction of the respaced steps (default 0.5)",
    )
    e.add_argument("--cases", help="comma-separated case names: evaluate only their slices")
    e.add_argument(
        "--reuse",
        help="an earlier report folder: take each method's scores from its scores/ (no re-run)",
    )
    e.add_argument("--panels", type=int, default=4, help="qualitative panels (default 4)")
    e.add_argument("--title", default="", help="report title")
    e.add_argument("--device", default="auto")
    e.add_argument("--seed", type=int, default=0)

    st = sub.add_parser(
        "synth-tumours",
        help="add synthetic tumours (Hu et al. 2023 style) to a real CT with a liver mask",
        description="Writes ct.nii.gz, seg.nii.gz (1 liver, 2 synthetic tumour, 3 source "
        "tumour) and tumours.json into --out; deterministic for a seed.",
    )
    st.add_argument("--ct", required=True, help="CT volume (HU)")
    st.add_argument("--seg", required=True, help="label map with the liver (and tumours)")
    st.add_argument("--out", required=True, type=Path, help="case folder to create")
    st.add_argument("--variant", choices=("hu2023", "subtle", "bright", "small"), default="hu2023")
    st.add_argument("--count", type=_positive_int, default=3, help="tumours to add")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument(
        "--liver-label",
        type=int,
        action="append",
        help="liver label(s) (default: every nonzero label)",
    )
    st.add_argument(
        "--source-tumour-label",
        type=int,
        default=2,
        help="label of real tumours to keep clear of (default 2; 0 = none)",
    )
    return parser


def _demo(args: argparse.Namespace, cancelled: dict) -> int:
    from .demo import run_demo

    reporter = _Reporter(args.progress)
    try:
        metrics = run_demo(
            args.out,
            args.checkpoint,
            args.seed,
            args.preset,
            args.device,
            progress=reporter,
            should_cancel=lambda: cancelled["flag"],
            log=lambda m: print(m, file=sys.stderr) if args.progress != "json" else None,
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


def _prepare(args: argparse.Namespace) -> int:
    from GDPITraining.prepare import prepare, print_summary

    if args.layout != "synthetic" and args.input is None:
        raise GDPIError("--input is required for this layout")
    if args.out.exists() and any(args.out.iterdir()):
        raise GDPIError(f"output store {args.out} exists and is not empty")
    grid = InputGrid(args.grid_size, None if args.grid_spacing == 0 else args.grid_spacing)
    summary = prepare(
        args.layout,
        args.input,
        args.out,
        grid,
        liver_label=args.liver_label,
        tumour_label=args.tumour_label,
        val_fraction=args.val_fraction,
        test_cases={c for c in args.test_cases.split(",") if c},
        min_liver_mm2=args.min_liver_mm2,
        seed=args.seed,
        synthetic_cases=args.synthetic_cases,
        synthetic_lesions=args.synthetic_lesions,
        ignore_label=args.ignore_label,
        log=lambda m: print(m, file=sys.stderr),
    )
    print_summary(summary)
    print(f"wrote {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from GDPITraining.train import TrainConfig, train

    config = TrainConfig(
        data=args.data,
        out=args.out,
        model=args.model,
        size=args.size,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr if args.lr is not None else (1e-3 if args.model in ("ae", "vae") else 1e-4),
        ema_decay=args.ema_decay,
        schedule=args.schedule,
        learn_sigma=not args.fixed_variance,
        augment=not args.no_augment,
        save_every=args.save_every,
        log_every=args.log_every,
        preview_every=args.preview_every,
        seed=args.seed,
        device=args.device,
        bf16=args.bf16,
        progress=not args.no_progress,
    )
    path = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from GDPITraining.evaluate import EvaluateConfig, evaluate

    config = EvaluateConfig(
        store=args.data,
        out=args.out,
        methods=args.method,
        checkpoint=args.checkpoint,
        preset=args.preset,
        abnormal_split=args.abnormal_split,
        healthy_split=args.healthy_split,
        max_slices=args.max_slices,
        device=args.device,
        seed=args.seed,
        batch_size=args.batch_size,
        offset_hu=args.offset_hu,
        steps=args.steps,
        jump_length=args.jump_length,
        jump_n_sample=args.jump_n_sample,
        bank=args.bank,
        bank_level=args.bank_level,
        panels=args.panels,
        title=args.title,
        cases=[c for c in (args.cases or "").split(",") if c] or None,
        reuse=args.reuse,
    )
    evaluate(config, log=lambda m: print(m, file=sys.stderr))
    print(Path(args.out, "results.md").read_text())
    print(f"wrote {args.out}")
    return 0


def _synth_tumours(args: argparse.Namespace) -> int:
    from GDPITraining.tumours import write_synthetic_case

    info = write_synthetic_case(
        args.ct,
        args.seg,
        args.out,
        args.variant,
        args.count,
        args.seed,
        tuple(args.liver_label) if args.liver_label else None,
        args.source_tumour_label or None,
    )
    for t in info["tumours"]:
        print(
            f"tumour at k,j,i {t['centre_kji']}: {t['volume_ml']} mL, "
            f"darkening {t['darkening_hu']} HU"
        )
    print(f"wrote {args.out}")
    return 0


class _Reporter:
    """Turns progress into a tqdm bar (text) or throttled JSON lines (json)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.bar = None
        self.last = 0.0
        self.case = None

    def emit(self, event: str, **fields) -> None:
        if self.mode == "json":
            print(json.dumps({"event": event, **fields}), flush=True)

    def start_case(self, name: str | None) -> None:
        self.close()
        self.case = name

    def __call__(self, p: Progress) -> None:
        if self.mode == "json":
            now = time.monotonic()
            final = p.nfe_done == p.nfe_total
            if final or now - self.last >= 0.25 or p.nfe_done == 0:
                self.last = now
                self.emit("progress", case=self.case, **p.to_dict())
        elif self.mode == "text":
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(
                    total=p.nfe_total,
                    unit="NFE",
                    desc=self.case or "inpainting",
                    file=sys.stderr,
                    dynamic_ncols=True,
                )
            self.bar.n = p.nfe_done
            self.bar.set_postfix_str(f"slices {p.slices_done}/{p.slices_total}", refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _PartialWriter:
    """Writes streamed partial scores as numbered .npy files and announces them."""

    def __init__(self, folder: Path, reporter: _Reporter):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.reporter = reporter
        self.count = 0
        self.previous: Path | None = None

    def __call__(self, score: np.ndarray) -> None:
        nonzero = [np.flatnonzero(score.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1))]
        if any(len(n) == 0 for n in nonzero):
            return
        lo = [int(n[0]) for n in nonzero]
        hi = [int(n[-1]) + 1 for n in nonzero]
        self.count += 1
        path = self.folder / f"partial-{self.count:04d}.npy"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            np.save(f, score[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
        os.replace(tmp, path)
        if self.previous is not None:
            self.previous.unlink(missing_ok=True)
        self.previous = path
        self.reporter.emit("partial", path=str(path), offset=lo)


def _detect(args: argparse.Namespace, cancelled: dict) -> int:
    overrides = {
        k: getattr(args, k)
        for k in (
            "steps",
            "jump_length",
            "jump_n_sample",
            "offset_hu",
            "two_sided",
            "min_candidate_mm2",
            "median_size",
            "threshold_hu",
            "batch_size",
            "device",
            "bf16",
            "seed",
        )
    }
    params = DetectionParams.from_preset(args.preset, **overrides)
    checkpoint = load_checkpoint(args.checkpoint)
    params.validate(checkpoint.diffusion.num_timesteps)
    reporter = _Reporter(args.progress)
    ct, liver = Path(args.ct), Path(args.liver)

    def should_cancel() -> bool:
        return cancelled["flag"]

    folder_mode = ct.is_dir() and liver.is_dir() and not _is_dicom_folder(ct)
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

            def on_case(number: int, total: int, name: str) -> None:
                reporter.start_case(name)
                reporter.emit("case", number=number, total=total, case=name)

            rows = run_folder(
                ct,
                liver,
                checkpoint,
                params,
                args.out,
                args.liver_label,
                args.allow_non_hu,
                on_case,
                reporter,
                should_cancel,
            )
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
            )
            if args.progress == "text":
                print(
                    f"{len(rows) - len(failed)}/{len(rows)} cases done; summary: "
                    f"{Path(args.out) / 'summary.csv'}",
                    file=sys.stderr,
                )
            return 3 if failed else 0
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
            None if args.stream_dir is None else _PartialWriter(args.stream_dir, reporter),
            args.stream_every,
        )
    finally:
        reporter.close()
    reporter.emit(
        "done",
        out=str(Path(args.out).absolute()),
        lesions=info["results"]["lesions"],
        nfe=info["nfe"],
        seconds=round(time.perf_counter() - t0, 2),
    )
    if args.progress == "text":
        print(
            f"{info['results']['lesions']} lesion(s), max score {info['results']['max_score_hu']:.1f} HU, "
            f"{info['nfe']} NFE, {info['timings_s']['wall']:.1f} s; outputs in {args.out}",
            file=sys.stderr,
        )
    return 0


def _is_dicom_folder(folder: Path) -> bool:
    import SimpleITK as sitk

    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def _init_model(args: argparse.Namespace) -> int:
    grid = None
    if args.grid_spacing is not None:
        size = MODEL_SIZES[args.size]["image_size"]
        grid = InputGrid(size, None if args.grid_spacing == 0 else args.grid_spacing)
    ckpt = init_checkpoint(args.size, args.seed, learn_sigma=not args.fixed_variance, grid=grid)
    path = save_checkpoint(ckpt, args.out)
    params = sum(p.numel() for p in ckpt.model.parameters())
    print(
        f"wrote {path} ({args.size}, {params / 1e6:.2f} M parameters, grid {ckpt.grid.size} px "
        f"at {ckpt.grid.spacing_mm or 'whole-slice'} mm; random weights, not trained)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cancelled = {"flag": False}

    def on_signal(signum, frame) -> None:
        cancelled["flag"] = True

    # detect and demo stop cooperatively (nothing half-written); other commands keep the
    # default handlers (training saves its state at intervals and resumes from it)
    cooperative = args.command in ("detect", "demo")
    signals = (signal.SIGINT, signal.SIGTERM) if cooperative else ()
    previous = {s: signal.signal(s, on_signal) for s in signals}
    try:
        if args.command == "detect":
            return _detect(args, cancelled)
        if args.command == "demo":
            return _demo(args, cancelled)
        if args.command == "prepare":
            return _prepare(args)
        if args.command == "train":
            return _train(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "synth-tumours":
            return _synth_tumours(args)
        return _init_model(args)
    except GDPIError as exc:
        if getattr(args, "progress", None) == "json":
            print(json.dumps({"event": "error", "message": str(exc)}), flush=True)
        print(f"gdpi: error: {exc}", file=sys.stderr)
        return 2
    except Cancelled:
        if getattr(args, "progress", None) == "json":
            print(json.dumps({"event": "cancelled"}), flush=True)
        print("gdpi: cancelled; nothing written for the running case", file=sys.stderr)
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
