"""``gdpi`` training commands: prepare, train, evaluate, synth-tumours.

The ``gdpi`` console script is :func:`main`: the engine's commands
(``GDPILiverAnomalyLib.running.cli``: detect, demo, init-model) plus these. Multi-GPU or
multi-node training: ``torchrun --nproc_per_node N -m GDPITraining train ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from GDPILiverAnomalyLib.errors import GDPIError
from GDPILiverAnomalyLib.method.grid import InputGrid
from GDPILiverAnomalyLib.method.parameters import PRESETS, add_arguments
from GDPILiverAnomalyLib.method.unet import MODEL_SIZES
from GDPILiverAnomalyLib.running import cli as engine_cli


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_commands(sub: argparse._SubParsersAction) -> dict:
    """The training subcommands; returns ``{name: (handler, cooperative)}``."""
    p = sub.add_parser(
        "prepare",
        help="make a slice store (healthy/abnormal slices on a model grid)",
        description="Healthy slices for training and abnormal slices for testing, "
        "split by patient (see docs/training.md).",
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
    p.add_argument(
        "--liver-label", type=engine_cli.liver_label, help="liver label (default: 1 and 2 as LiTS)"
    )
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
        "--ame-sigma-mm",
        type=float,
        default=PRESETS["fast"]["ame_sigma_mm"],
        help="AME margins on the CT smoothed by this Gaussian sigma (mm), as gdpi detect "
        "--ame-sigma-mm; gdpi evaluate checks they match (default: the fast preset's, "
        f"{PRESETS['fast']['ame_sigma_mm']:g}; the paper preset's AME is 0, raw pixels)",
    )
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
        "torchrun --nproc_per_node N -m GDPITraining train ...",
    )
    t.add_argument("--data", required=True, help="slice store made by gdpi prepare")
    t.add_argument(
        "--out",
        required=True,
        help="run folder (model.safetensors, state.pt, log.csv, ...): new, empty, or an earlier "
        "run's folder, which is resumed; locked while training",
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
    t.add_argument(
        "--augment-phase",
        action="store_true",
        help="also vary contrast phase (soft-tissue contrast x0.8..1.25, HU +-20) and "
        "CT noise (0-6 HU): for data from few scans",
    )
    t.add_argument(
        "--exclude-cases",
        default="",
        help="comma-separated case names whose slices are never trained on "
        "(patient-level cross-validation)",
    )
    t.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop after this many minutes of training, saving the model (0 = run all steps)",
    )
    t.add_argument(
        "--snapshot-every",
        type=int,
        default=0,
        help="keep a copy of the EMA model every N steps in snapshots/ (for curves)",
    )
    t.add_argument(
        "--weights-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="precision of the saved model weights (float16: half the file size)",
    )
    t.add_argument("--save-every", type=_positive_int, default=500)
    t.add_argument("--log-every", type=_positive_int, default=25)
    t.add_argument(
        "--preview-every", type=int, default=0, help="preview PNG interval (0: at the end)"
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--bf16", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument(
        "--restart",
        action="store_true",
        help="start over at step 0; an earlier state.pt is kept aside as state.pt.restarted",
    )
    e = sub.add_parser(
        "evaluate",
        help="the paper's protocol: GDPI variants and baselines on a prepared test set",
        description="Pixel AUROC/AP/best Dice (liver and whole-slice pooling), lesion "
        "detection, slice AUROC and normal-image bias; writes results.md, results.json, "
        "ROC/PR curves and qualitative panels (see docs/evaluation.md).",
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
    e.add_argument(
        "--preset", choices=sorted(PRESETS), default="fast", help="GDPI base preset (default fast)"
    )
    e.add_argument(
        "--abnormal-split", default="test", help="split of the abnormal slices (or 'any')"
    )
    e.add_argument(
        "--healthy-split", default="test", help="split of the healthy slices ('any', 'none')"
    )
    e.add_argument(
        "--max-slices", type=_positive_int, help="at most N abnormal and N healthy slices"
    )
    add_arguments(
        e,
        ("offset_hu", "steps", "jump_length", "jump_n_sample", "batch_size", "samples",
         "calibrate", "depth_sigma_mm", "median_size", "ame_sigma_mm", "sampler", "eta"),
    )  # fmt: skip
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
        type=engine_cli.liver_label,
        action="append",
        help="liver label(s) (default: every nonzero label)",
    )
    st.add_argument(
        "--source-tumour-label",
        type=int,
        default=2,
        help="label of real tumours to keep clear of (default 2; 0 = none)",
    )
    return {
        "prepare": (_prepare, False),
        "train": (_train, False),
        "evaluate": (_evaluate, False),
        "synth-tumours": (_synth_tumours, False),
    }


def _prepare(args: argparse.Namespace, should_cancel) -> int:
    from .prepare import prepare, print_summary

    if args.layout != "synthetic" and args.input is None:
        raise GDPIError("--input is required for this layout")
    if args.input is not None and args.layout != "synthetic":
        wanted = "a CSV file" if args.layout == "list" else "a folder"
        if not args.input.exists():
            raise GDPIError(f"--input {args.input} not found ({wanted} for --layout {args.layout})")
        if args.input.is_dir() == (args.layout == "list"):
            raise GDPIError(f"--input {args.input} must be {wanted} for --layout {args.layout}")
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
        ame_sigma_mm=args.ame_sigma_mm,
        log=lambda m: print(m, file=sys.stderr),
    )
    print_summary(summary)
    print(f"wrote {args.out}")
    return 0


def _train(args: argparse.Namespace, should_cancel) -> int:
    from .loop import TrainConfig
    from .train import train

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
        augment_phase=args.augment_phase,
        exclude_cases=[c for c in args.exclude_cases.split(",") if c],
        max_minutes=args.max_minutes,
        snapshot_every=args.snapshot_every,
        weights_dtype=args.weights_dtype,
        save_every=args.save_every,
        log_every=args.log_every,
        preview_every=args.preview_every,
        seed=args.seed,
        device=args.device,
        bf16=args.bf16,
        progress=not args.no_progress,
        restart=args.restart,
    )
    path = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {path}")
    return 0


def _evaluate(args: argparse.Namespace, should_cancel) -> int:
    from .evaluate import EvaluateConfig, evaluate

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
        params={
            name: getattr(args, name)
            for name in (
                "samples",
                "calibrate",
                "depth_sigma_mm",
                "median_size",
                "ame_sigma_mm",
                "sampler",
                "eta",
            )
            if getattr(args, name) is not None
        },
    )
    evaluate(config, log=lambda m: print(m, file=sys.stderr))
    print(Path(args.out, "results.md").read_text())
    print(f"wrote {args.out}")
    return 0


def _synth_tumours(args: argparse.Namespace, should_cancel) -> int:
    from .tumours import write_synthetic_case

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


def main(argv: list[str] | None = None) -> int:
    """The ``gdpi`` console script: engine and training commands."""
    return engine_cli.main(argv, add_commands)


if __name__ == "__main__":
    from GDPILiverAnomalyLib.running.signals import install

    install()
    sys.exit(main())
