"""The cross-validation tables: per fold and pooled over folds, from the report folders
that ``Training/crossval/run.sh`` writes (``RUNS/eval/<row>/<fold>/{real,synth}``).

``python -m GDPITraining.crossval --runs runs/cv [--out table.md]``

For every evaluated row (a model recipe, optionally with a tag for other settings) and
method it pools the saved scores of all folds (each fold's model only ever scores its
own patient) and computes, on real and on synthetic tumours: pixel AUROC, AP and best
Dice over liver pixels, lesions found at the best-Dice threshold, slice AUROC, the
normal-liver bias (mean score over the liver pixels of healthy slices, HU), and the
lesion-level figures (FROC: sensitivity at 0.5, 1, 2, 4 false-positive components per
case, FROC score, sensitivity per lesion size; pooled: with bootstrap intervals over
cases, as are the pixel AUROC and AP; ``--froc`` plots the curves). Derived rows,
from the same saved scores:

- ``gdpi (auto)``: per patient the one-sided or two-sided run, as the automatic AME
  side of ``gdpi detect`` picks it (contrast phase, ``phase.py``); identical to running
  ``--method gdpi`` because each slice's noise depends only on its seed;
- ``... + 3-D σ=S``: the score averaged over neighbouring slices (Gaussian, sigma S mm,
  ``scoring.smooth_across_slices``), as ``--depth-sigma-mm S`` does after the median
  filter.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from GDPILiverAnomalyLib.method.lesions import at_threshold, volumes_from_slices
from GDPILiverAnomalyLib.method.metrics import lesion_detection, pixel_metrics, slice_auroc
from GDPILiverAnomalyLib.method.scoring import smooth_across_slices

from .evaluate import (
    DEFAULT_THRESHOLD_HU,
    case_phases,
    lesion_level,
    load_test_set,
    slice_positions_mm,
)
from .report import LESION_NOTE, ci_text, froc_png, lesion_table

SETS = ("real", "synth")
RESAMPLES = 1000  # bootstrap resamples over cases of the pooled figures (seed 0)
DEPTH_SIGMAS_MM = (2.5, 5.0)


def _load(report: Path) -> tuple:
    """A report's test set and the scores of each of its methods."""
    results = json.loads((report / "results.json").read_text())
    cfg = results["config"]
    test = load_test_set(
        cfg["store"], cfg["abnormal_split"], cfg["healthy_split"], cfg["max_slices"], cfg["cases"]
    )
    scores = {}
    for path in sorted((report / "scores").glob("*.npz")):
        saved = np.load(path)
        if not np.array_equal(saved["store_index"], test.index):
            raise ValueError(f"{path}: slices differ from the report's test set")
        scores[path.stem] = saved["score"]
    nfe = {m: r["nfe"] for m, r in results["methods"].items()}
    slices = {m: r["details"].get("slices_inpainted") for m, r in results["methods"].items()}
    return test, scores, nfe, slices


def _with_derived(test, scores: dict) -> dict:
    """Add the automatic-AME-side and 3-D-smoothed variants of the GDPI scores."""
    out = dict(scores)
    sides = [m for m in ("gdpi-one-sided", "gdpi-two-sided") if m in scores]
    if sides:
        phases = case_phases(test)
        arterial = np.array([phases[g[0]]["arterial"] for g in test.groups])
        if len(sides) == 2:
            out["gdpi (auto)"] = np.where(
                arterial[:, None, None], scores["gdpi-two-sided"], scores["gdpi-one-sided"]
            )
        elif np.all(arterial == (sides[0] == "gdpi-two-sided")):
            out["gdpi (auto)"] = scores[sides[0]]  # only the side the phase picks was run
    positions = slice_positions_mm(test)
    cases = [g[0] for g in test.groups]
    for name in [n for n in out if n.startswith("gdpi")]:
        for sigma in DEPTH_SIGMAS_MM:
            smooth = smooth_across_slices(out[name], positions, sigma, cases)
            out[f"{name} + 3-D σ={sigma:g}"] = np.where(test.liver > 0, smooth, 0.0)
    return out


def metrics(score: np.ndarray, test, resamples: int = 0) -> dict:
    """The figures of one score stack on one (pooled) test set; ``lesion_level``: the
    FROC figures (``evaluate.lesion_level``), with bootstrap intervals over cases when
    ``resamples`` > 0."""
    liver = test.liver > 0
    truth = test.tumour > 0
    pixel = pixel_metrics(score, truth, liver)
    lesions = lesion_detection(score, truth, test.groups, pixel["threshold"])
    slice_scores = np.array([score[i][liver[i]].max() if liver[i].any() else 0.0
                             for i in range(len(score))])  # fmt: skip
    healthy = ~test.abnormal
    return {
        "auroc": pixel["auroc"],
        "ap": pixel["ap"],
        "best_dice": pixel["best_dice"],
        "lesions_found": lesions.get("found"),
        "lesions": lesions.get("lesions"),
        "slice_auroc": slice_auroc(slice_scores, test.abnormal),
        "normal_bias_hu": float(score[healthy][liver[healthy]].mean()) if healthy.any() else None,
        "lesion_level": lesion_level(score, test, resamples, DEFAULT_THRESHOLD_HU),
    }


class _Pooled:
    """Test sets of several folds stacked (cases stay distinct)."""

    def __init__(self, tests: list):
        self.liver = np.concatenate([t.liver for t in tests])
        self.tumour = np.concatenate([t.tumour for t in tests])
        self.abnormal = np.concatenate([t.abnormal for t in tests])
        self.groups = [g for t in tests for g in t.groups]
        self._voxel_ml = {case: ml for t in tests for case, ml in t.voxel_ml().items()}

    def voxel_ml(self) -> dict:
        return self._voxel_ml


def summarize(runs: str | Path) -> dict:
    """``{row: {set: {fold|"pooled": {method: figures}}}}`` plus NFE per inpainted slice."""
    runs = Path(runs)
    table: dict = {}
    for row_dir in sorted(p for p in (runs / "eval").iterdir() if p.is_dir()):
        row: dict = {}
        kept: dict = {}
        for which in SETS:
            folds = sorted(
                p.name for p in row_dir.iterdir() if (p / which / "results.json").is_file()
            )
            if not folds:
                continue
            per_fold, tests, stacks, nfe_info = {}, [], {}, {}
            for fold in folds:
                test, scores, nfe, slices = _load(row_dir / fold / which)
                scores = _with_derived(test, scores)
                per_fold[fold] = {m: metrics(s, test) for m, s in scores.items()}
                tests.append(test)
                for m, s in scores.items():
                    stacks.setdefault(m, []).append(s)
                for m in nfe:
                    if slices.get(m):
                        nfe_info[m] = nfe[m] and round(nfe[m] / max(1, len(test.index)), 1)
            pooled = _Pooled(tests)
            common = [m for m, parts in stacks.items() if len(parts) == len(folds)]
            joined = {m: np.concatenate(stacks[m]) for m in common}
            per_fold["pooled"] = {m: metrics(joined[m], pooled, RESAMPLES) for m in common}
            row[which] = per_fold
            kept[which] = (pooled, joined)
        if len(kept) == len(SETS):
            row["operating_point"] = operating_points(row, kept)
        table[row_dir.name] = row
    return table


#: False positives per scan at which the operating point is chosen (on ``CHOOSE_ON``).
OPERATING_RATE = 1.0
#: The set the threshold is chosen on; it is then reported on the other one.
CHOOSE_ON = "synth"


def operating_points(row: dict, kept: dict) -> dict:
    """Per method: the threshold (HU) of the highest lesion sensitivity with at most
    :data:`OPERATING_RATE` false positives per scan on the pooled :data:`CHOOSE_ON` set,
    and the figures that one threshold gives on the other set (``lesions.at_threshold``,
    bootstrap intervals over cases): a threshold chosen on one set, tested on another."""
    other = next(w for w in SETS if w != CHOOSE_ON)
    test, stacks = kept[other]
    out = {}
    for method, figures in row[CHOOSE_ON]["pooled"].items():
        at = (figures["lesion_level"].get("at") or {}).get(str(OPERATING_RATE))
        if at is None or method not in stacks:
            continue
        volumes = volumes_from_slices(stacks[method], test.liver, test.tumour, test.groups,
                                      test.voxel_ml())  # fmt: skip
        out[method] = {
            "rate": OPERATING_RATE,
            "chosen_on": CHOOSE_ON,
            "threshold_hu": at["threshold"],
            CHOOSE_ON: at,
            other: at_threshold(volumes, at["threshold"], RESAMPLES),
        }
    return out


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown(table: dict) -> str:
    """Pooled table (one line per row and method), then the per-fold AUROC/AP/Dice."""
    lines = []
    for which, title in (("real", "Real tumours"), ("synth", "Synthetic tumours")):
        lines += [f"### {title}, pooled over folds", "",
                  "| row | method | AUROC | AP | best Dice | lesions found | slice AUROC | "
                  "normal bias (HU) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row, sets in table.items():
            for method, m in sets.get(which, {}).get("pooled", {}).items():
                found = "-" if m["lesions"] is None else f"{m['lesions_found']}/{m['lesions']}"
                bias = "-" if m["normal_bias_hu"] is None else f"{m['normal_bias_hu']:.2f}"
                lines.append(
                    f"| {row} | {method} | {_pct(m['auroc'])} | {_pct(m['ap'])} | "
                    f"{_pct(m['best_dice'])} | {found} | {_pct(m['slice_auroc'])} | {bias} |"
                )
        lines.append("")
        lines += [f"### {title}, lesion level, pooled over folds", ""]
        lines += lesion_table({f"{row} · {method}": m["lesion_level"]
                               for row, sets in table.items()
                               for method, m in sets.get(which, {}).get("pooled", {}).items()})  # fmt: skip
        lines += ["", LESION_NOTE, ""]
        lines += [f"### {title}, per fold (AUROC / AP / best Dice)", ""]
        for row, sets in table.items():
            folds = [f for f in sets.get(which, {}) if f != "pooled"]
            if not folds:
                continue
            lines += [f"{row}:", "", "| method | " + " | ".join(folds) + " |",
                      "|---|" + "---|" * len(folds)]  # fmt: skip
            for method in sets[which]["pooled"]:
                cells = []
                for f in folds:
                    m = sets[which][f].get(method)
                    cells.append("-" if m is None else
                                 f"{_pct(m['auroc'])} / {_pct(m['ap'])} / {_pct(m['best_dice'])}")  # fmt: skip
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
    points = {f"{row} · {m}": p for row, sets in table.items()
              for m, p in sets.get("operating_point", {}).items()}  # fmt: skip
    if points:
        lines += [f"### Operating point: chosen on the {CHOOSE_ON} set at <= {OPERATING_RATE:g} "
                  "false positive per case, tested on the other", "",
                  "| row · method | threshold (HU) | chosen on: sens. / FP per case | tested on: "
                  "sens. [95% CI] | FP per case [95% CI] | found |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for name, p in points.items():
            chosen, tested = p[p["chosen_on"]], p[next(w for w in SETS if w != p["chosen_on"])]
            lines.append(
                f"| {name} | {p['threshold_hu']:.2f} | {100 * chosen['sensitivity']:.1f} / "
                f"{chosen['fp_per_scan']:.2f} | {ci_text(tested['sensitivity'])} | "
                f"{ci_text(tested['fp_per_scan'], 1.0, 2)} | {tested['found']}/{tested['lesions']} |"
            )
        lines.append("")
    return "\n".join(lines)


def schedules(runs: str | Path) -> dict[str, dict]:
    """Each evaluated row's GDPI sampler and schedule (from one of its reports) and its
    network evaluations per inpainted slice."""
    from GDPILiverAnomalyLib.method.parameters import DetectionParams

    out = {}
    for report in sorted(Path(runs).glob("eval/*/*/real/results.json")):
        row = report.parents[2].name
        methods = json.loads(report.read_text())["methods"]
        method = next((m for name, m in methods.items() if name.startswith("gdpi")), None)
        if row in out or method is None:
            continue
        params = DetectionParams(**method["details"]["params"])
        out[row] = {"sampler": params.sampler, "steps": params.steps,
                    "jump_length": params.jump_length, "jump_n_sample": params.jump_n_sample,
                    "nfe": params.nfe_per_batch()}  # fmt: skip
    return out


def plot_curve(table: dict, runs: str | Path, path: str | Path, seconds_per_nfe: float,
               fixed_s: float) -> None:  # fmt: skip
    """Quality (pooled AUROC and AP, real and synthetic tumours; method ``gdpi``, else the
    derived ``gdpi (auto)``) against network evaluations per slice and against seconds
    per CT (``fixed_s + seconds_per_nfe * NFE``, from a measured ``gdpi detect`` run):
    filled markers RePaint, open DDNM; dotted lines the paper schedule's figures minus
    1 AUROC / 2 AP points (the bound the ``fast`` preset was chosen by)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sched = schedules(runs)
    folds = max((len(sets.get(w, {})) for sets in table.values() for w in SETS), default=0)
    complete = {r for r, sets in table.items() if all(len(sets.get(w, {})) == folds for w in SETS)}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
    for sampler, marker in (("repaint", "o"), ("ddnm", "s")):
        rows = sorted((r for r in sched if sched[r]["sampler"] == sampler and r in complete),
                      key=lambda r: sched[r]["nfe"])  # fmt: skip
        for which in ("real", "synth"):
            pooled = {r: table[r].get(which, {}).get("pooled", {}) for r in rows}
            points = [(sched[r]["nfe"], pooled[r].get("gdpi", pooled[r].get("gdpi (auto)")))
                      for r in rows]  # fmt: skip
            points = [(n, m) for n, m in points if m is not None]
            if not points:
                continue
            nfe = [n for n, _ in points]
            colour = "tab:blue" if which == "real" else "tab:orange"
            for i, metric in enumerate(("auroc", "ap")):
                values = [100 * m[metric] for _, m in points]
                label = f"{sampler}, {'real' if which == 'real' else 'synthetic'}"
                for j, x in enumerate((nfe, [fixed_s + seconds_per_nfe * n for n in nfe])):
                    axes[i, j].plot(x, values, linestyle="none", marker=marker, color=colour,
                                    fillstyle="full" if sampler == "repaint" else "none",
                                    label=label)  # fmt: skip
    paper = next((r for r in complete if sched.get(r, {}).get("nfe") == 2410), None)
    for which, colour in (("real", "tab:blue"), ("synth", "tab:orange")):
        pooled = table[paper][which]["pooled"] if paper else {}
        m = pooled.get("gdpi", pooled.get("gdpi (auto)"))
        for i, (metric, slack) in enumerate((("auroc", 1.0), ("ap", 2.0))):
            for j in range(2):
                if m is not None:  # the bound: paper - 1 AUROC point, - 2 AP points
                    axes[i, j].axhline(100 * m[metric] - slack, color=colour, linestyle=":",
                                       linewidth=1)  # fmt: skip
    for i, metric in enumerate(("pixel AUROC (%)", "AP (%)")):
        axes[i, 0].set_ylabel(metric)
        for j in range(2):
            axes[i, j].set_xscale("log")
            axes[i, j].xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            axes[i, j].grid(alpha=0.3, which="both")
    axes[1, 0].set_xlabel("network evaluations per inpainted slice")
    axes[1, 1].set_xlabel("seconds per 100-liver-slice CT (this CPU)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Quality vs cost, patient-level cross-validation (pooled over 3 folds); "
                 "dotted: paper - 1 AUROC / - 2 AP", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_froc(table: dict, path: str | Path, methods: list[str]) -> list[Path]:
    """The pooled FROC of ``methods`` of every row, one figure per tumour set:
    ``<path stem>_real.png`` and ``<path stem>_synth.png``; returns the files written."""
    path = Path(path)
    written = []
    for which, title in (("real", "real tumours"), ("synth", "synthetic tumours")):
        curves = {
            f"{row} · {method}": sets[which]["pooled"][method]["lesion_level"]
            for row, sets in table.items()
            for method in methods
            if method in sets.get(which, {}).get("pooled", {})
        }
        if curves:
            out = path.with_name(f"{path.stem}_{which}{path.suffix or '.png'}")
            froc_png(out, curves, f"FROC, {title}, pooled over folds")
            written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m GDPITraining.crossval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--runs", required=True, help="RUNS folder of Training/crossval/run.sh")
    p.add_argument("--out", help="write the markdown table here (and .json beside it)")
    p.add_argument("--curve", help="also plot quality against cost into this PNG")
    p.add_argument(
        "--seconds-per-nfe",
        type=float,
        default=0.0,
        help="--curve: seconds per network evaluation per CT (bench_detect)",
    )
    p.add_argument("--fixed-seconds", type=float, default=0.0,
                   help="--curve: seconds per CT besides the network (bench_detect)")  # fmt: skip
    p.add_argument("--froc", help="also plot the pooled FROC into PATH_real.png and PATH_synth.png")
    p.add_argument("--froc-methods", default="gdpi,gdpi (auto) + 3-D σ=5,darkness",
                   help="--froc: comma-separated methods (derived names included)")  # fmt: skip
    args = p.parse_args(argv)
    table = summarize(args.runs)
    if args.froc:
        plot_froc(table, args.froc, args.froc_methods.split(","))
    if args.curve:
        plot_curve(table, args.runs, args.curve, args.seconds_per_nfe, args.fixed_seconds)
    text = markdown(table)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(table, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
