"""The files ``gdpi evaluate`` writes: Markdown tables, JSON, curves and qualitative panels.

- ``results.md``: one table per pixel pool (every method), then the paper's layouts:
  Table I/II (AE, VAE, DAE, GDPI), Table III (normal-image bias), Table IV (ablations).
  AUC, AP and DICE are percentages, as in the paper.
- ``results.json``: every figure, the configuration, the test set, versions, hardware.
- ``roc_liver.png``, ``pr_liver.png``, ``roc_slice.png``, ``pr_slice.png``,
  ``froc_liver.png`` (lesion sensitivity against false-positive components per case).
- ``qualitative/slice-*.png``: input, reference, and per method its reconstruction,
  score and heatmap over the input (the layout of the paper's Figures 6 to 9).
- ``scores/<method>.npz``: score (and reconstruction) of every evaluated slice, with
  the store indices, for re-plotting without re-running.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .methods import BASELINES, DISPLAY, POOLS

HU_DISPLAY = (-125.0, 225.0)  # the paper's display window
SCORE_DISPLAY_HU = (0.0, 50.0)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def ci_text(figure: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    """``value [low, high]`` of a bootstrap interval (``lesions.interval``), in percent
    (``scale`` 1: as is)."""
    if figure is None or figure.get("value") is None:
        return "-"
    text = f"{scale * figure['value']:.{digits}f}"
    if figure.get("low") is not None:
        text += f" [{scale * figure['low']:.{digits}f}, {scale * figure['high']:.{digits}f}]"
    return text


def lesion_table(rows: dict[str, dict]) -> list[str]:
    """Markdown lines of the lesion-level table: one row per ``name -> lesion_level``
    figures (``evaluate.lesion_level``)."""
    lines = [
        "| method | lesions | sens. @0.5 FP | @1 FP | @2 FP | @4 FP | FROC score | "
        "<1 mL | 1-10 mL | >10 mL | pixel AUROC | pixel AP | at threshold: sens. / FP per scan |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in rows.items():
        froc = f.get("froc") or {}
        sizes = f.get("by_size") or {}
        cells = [str(f["lesions"])]
        cells += [ci_text(froc.get(r)) for r in ("0.5", "1.0", "2.0", "4.0")]
        cells.append(ci_text(froc.get("mean")))
        for size in ("<1 mL", "1-10 mL", ">10 mL"):
            c = sizes.get(size)
            cells.append(f"{c['found']}/{c['lesions']}" if c and c["lesions"] else "-")
        pixel = f.get("pixel_bootstrap") or {}
        cells += [ci_text(pixel.get("auroc")), ci_text(pixel.get("ap"))]
        at = f.get("at_threshold")
        cells.append("-" if not at else f"{at['threshold_hu']:g} HU: {ci_text(at['sensitivity'])} / "
                     f"{ci_text(at['fp_per_scan'], 1.0)}")  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


LESION_NOTE = (
    "Lesion level: components = 3-D connected components (26-connectivity) of score > t in "
    "the liver, as `gdpi detect`'s lesion table; a lesion (3-D component of the reference "
    "within consecutive slices of a case) is found when a component overlaps it; a component "
    "overlapping no lesion is a false positive (FP). Sensitivity (%) at 0.5, 1, 2, 4 FP per "
    "case = the best of any threshold with at most that many; FROC score = mean over 1/8, "
    "1/4, 1/2, 1, 2, 4, 8 FP per case (LUNA16); lesions found per size (mL on the model "
    "grid, evaluated slices only) at 1 FP per case. [low, high]: 95 % bootstrap interval "
    "over cases (1000 resamples, seed 0; none with one case)."
)


def _markdown(report: dict, title: str) -> str:

    methods = report["methods"]
    test = report["test_set"]
    cfg = report["config"]
    lines = [f"# {title or 'GDPI evaluation'}", ""]
    lines.append(
        f"Test set: `{test['store']}`: {test['abnormal_slices']} abnormal and "
        f"{test['healthy_slices']} healthy slices of {len(test['cases'])} case(s) "
        f"({', '.join(test['cases'])}); grid {test['grid']}. Base preset `{cfg['preset']}`, "
        f"seed {cfg['seed']}, {report['hardware']}, {report['date']}."
    )
    lines.append("")
    lines.append(f"Command: `{report['command']}`")
    for pool, description in POOLS.items():
        lines += ["", f"## Pixels pooled: {pool} ({description})", ""]
        lines.append(
            "| method | AUC | AP | DICE | threshold | lesions found | slice AUROC "
            "| healthy px >= thr | seconds | NFE |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for name, r in methods.items():
            p = r[pool]
            les = p["lesions"]
            fp = p.get("healthy_fp_fraction")
            lines.append(
                f"| {DISPLAY[name]} | {_pct(p['auroc'])} | {_pct(p['ap'])} | "
                f"{_pct(p['best_dice'])} | {p['threshold']:.4g} | "
                f"{les['found']}/{les['lesions']} | {_pct(r['slice_auroc'])} | "
                f"{_pct(fp) if fp is not None else '-'} | {r['seconds']:.1f} | {r['nfe']} |"
            )
    lesion_rows = {DISPLAY[n]: r["lesion_level"] for n, r in methods.items() if "lesion_level" in r}
    if lesion_rows:
        lines += ["", "## Lesion level (liver)", ""]
        lines += lesion_table(lesion_rows)
        lines += ["", LESION_NOTE]
    paper_rows = [n for n in (*BASELINES, "gdpi") if n in methods]
    if paper_rows:
        lines += [
            "",
            "## Table I/II layout (liver pixels)",
            "",
            "| | AUC | AP | DICE |",
            "|---|---|---|---|",
        ]
        for n in paper_rows:
            p = methods[n]["liver"]
            lines.append(
                f"| {DISPLAY[n]} | {_pct(p['auroc'])} | {_pct(p['ap'])} | {_pct(p['best_dice'])} |"
            )
    bias_rows = [n for n in methods if methods[n]["normal_bias"] is not None]
    if bias_rows:
        lines += [
            "",
            "## Table III layout: normal-image bias (mean score on healthy liver pixels)",
            "",
        ]
        lines.append("| | " + " | ".join(DISPLAY[n] for n in bias_rows) + " |")
        lines.append("|---|" + "---|" * len(bias_rows))
        lines.append(
            "| Mean | "
            + " | ".join(f"{methods[n]['normal_bias']['mean_liver']:.4g}" for n in bias_rows)
            + " |"
        )
        lines.append(
            "| units | " + " | ".join(methods[n]["units"].split(" ")[0] for n in bias_rows) + " |"
        )
    ablations = [n for n in ("gdpi-wrd", "gdpi-wr", "gdpi-wd", "gdpi") if n in methods]
    extra = [
        n for n in ("gdpi-two-sided", "gdpi-fast", "gdpi-paper", "gdpi-memory-bank") if n in methods
    ]
    if len(ablations) + len(extra) > 1:
        lines += ["", "## Table IV layout: GDPI ablations and additions (liver pixels)", ""]
        lines += ["| | AUC | AP | DICE | lesions found | NFE |", "|---|---|---|---|---|---|"]
        for n in ablations + extra:
            p = methods[n]["liver"]
            lines.append(
                f"| {DISPLAY[n]} | {_pct(p['auroc'])} | {_pct(p['ap'])} | {_pct(p['best_dice'])} "
                f"| {p['lesions']['found']}/{p['lesions']['lesions']} | {methods[n]['nfe']} |"
            )
    lines += [
        "",
        "AUC, AP, DICE: pixel AUROC, average precision and pixel F1 at the F1-optimal "
        "threshold (exact, from the precision-recall curve), in percent. A lesion is a 3-D "
        "connected component of the reference within consecutive slices of a case; found = "
        "any of its pixels at or above the threshold. Slice AUROC: slice score = maximum over "
        "its liver pixels. Scores: HU for GDPI and darkness; squared reconstruction error "
        "(model units) for AE, VAE, DAE.",
        "",
    ]
    return "\n".join(lines)


def _curves_png(path: Path, report: dict, pool: str, kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.6), dpi=110)
    for name, r in report["methods"].items():
        c = r[pool]["curves"]
        if kind == "roc":
            ax.plot(c["fpr"], c["tpr"], label=f"{DISPLAY[name]} ({r[pool]['auroc']:.3f})")
        else:
            ax.plot(c["recall"], c["precision"], label=f"{DISPLAY[name]} ({r[pool]['ap']:.3f})")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax.set(
            xlabel="false positive rate", ylabel="true positive rate", title=f"ROC, {pool} pixels"
        )
    else:
        ax.set(xlabel="recall", ylabel="precision", title=f"Precision-recall, {pool} pixels")
    ax.set(xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def froc_png(path: Path, curves: dict[str, dict], title: str = "FROC, liver") -> None:
    """Lesion sensitivity against false-positive components per case (log axis, 1/8 to
    8 marked) for each ``name -> lesion_level`` figures with a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.6), dpi=110)
    for name, f in curves.items():
        c = f.get("curve")
        if not c:
            continue
        fp = np.asarray(c["fp_per_scan"])
        sens = np.asarray(c["sensitivity"])
        order = np.argsort(fp, kind="stable")
        # the best sensitivity reachable at each false-positive rate (a staircase)
        best = np.maximum.accumulate(sens[order])
        score = f["froc"]["mean"]["value"]
        ax.step(np.maximum(fp[order], 1 / 16), best, where="post", label=f"{name} ({score:.3f})")
    for rate in (0.125, 0.25, 0.5, 1, 2, 4, 8):
        ax.axvline(rate, color="0.85", lw=0.6, zorder=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks([0.125, 0.25, 0.5, 1, 2, 4, 8], ["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    ax.minorticks_off()
    ax.set(xlim=(1 / 16, 16), ylim=(0, 1.01), title=title,
           xlabel="false-positive components per case", ylabel="lesion sensitivity")  # fmt: skip
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _panel_slices(test, count: int) -> list[int]:
    """Abnormal slices for the panels: spread from the largest to the smallest tumour."""
    abnormal = np.flatnonzero(test.abnormal)
    if count <= 0 or not len(abnormal):
        return []
    order = abnormal[np.argsort(-test.tumour[abnormal].sum(axis=(1, 2)), kind="stable")]
    picks = np.unique(np.linspace(0, len(order) - 1, min(count, len(order))).round().astype(int))
    return [int(order[p]) for p in picks]


def _panel_png(path: Path, i: int, test, outputs: dict, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(outputs)
    rows = 1 + len(names)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows), dpi=100, squeeze=False)
    image = test.images[i]
    tumour = test.tumour[i] > 0
    kw = dict(cmap="gray", vmin=HU_DISPLAY[0], vmax=HU_DISPLAY[1])
    axes[0, 0].imshow(image, **kw)
    axes[0, 0].set_title("input", fontsize=8)
    axes[0, 1].imshow(image, **kw)
    axes[0, 1].contour(tumour, levels=[0.5], colors="lime", linewidths=0.8)
    axes[0, 1].set_title("reference (tumour)", fontsize=8)
    axes[0, 2].imshow(tumour, cmap="gray", vmin=0, vmax=1)
    axes[0, 2].set_title("reference mask", fontsize=8)
    for row, name in enumerate(names, start=1):
        out = outputs[name]
        threshold = report["methods"][name]["liver"]["threshold"]
        if out.units == "HU":
            vmin, vmax = SCORE_DISPLAY_HU
            label = "score 0-50 HU"
        else:
            vmin, vmax = 0.0, 2.5 * max(threshold, 1e-12)
            label = "score 0-2.5x threshold"
        if out.reconstruction is not None:
            axes[row, 0].imshow(out.reconstruction[i], **kw)
            axes[row, 0].set_title(f"{DISPLAY[name]}: reconstruction", fontsize=8)
        else:
            axes[row, 0].imshow(image, **kw)
            axes[row, 0].set_title(f"{DISPLAY[name]}: (no reconstruction)", fontsize=8)
        axes[row, 1].imshow(out.score[i], cmap="inferno", vmin=vmin, vmax=vmax)
        axes[row, 1].set_title(label, fontsize=8)
        axes[row, 2].imshow(image, **kw)
        heat = np.ma.masked_less_equal(out.score[i], vmin)
        axes[row, 2].imshow(heat, cmap="inferno", vmin=vmin, vmax=vmax, alpha=0.6)
        axes[row, 2].contour(tumour, levels=[0.5], colors="lime", linewidths=0.6)
        axes[row, 2].contour(out.score[i] >= threshold, levels=[0.5], colors="cyan", linewidths=0.6)
        axes[row, 2].set_title("heatmap; cyan = above F1 threshold", fontsize=8)
    for ax in axes.ravel():
        ax.set_axis_off()
    case, number = test.groups[i]
    fig.suptitle(f"{case}, slice {number} (store index {int(test.index[i])})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (2.5 * rows)))  # room for the title
    fig.savefig(path)
    plt.close(fig)


def write_report(folder: Path, report: dict, test, outputs: dict, panels: int, title: str) -> None:
    folder = Path(folder)
    (folder / "results.json").write_text(json.dumps(report, indent=2))
    (folder / "results.md").write_text(_markdown(report, title))
    for pool in ("liver", "slice"):
        for kind in ("roc", "pr"):
            _curves_png(folder / f"{kind}_{pool}.png", report, pool, kind)
    froc_png(
        folder / "froc_liver.png",
        {DISPLAY[n]: r["lesion_level"] for n, r in report["methods"].items()},
    )
    (folder / "qualitative").mkdir()
    for i in _panel_slices(test, panels):
        _panel_png(
            folder / "qualitative" / f"slice-{int(test.index[i]):05d}.png", i, test, outputs, report
        )
    (folder / "scores").mkdir()
    for name, out in outputs.items():
        arrays = {"score": out.score, "store_index": test.index}
        if out.reconstruction is not None:
            arrays["reconstruction"] = out.reconstruction
        np.savez_compressed(folder / "scores" / f"{name}.npz", **arrays)
