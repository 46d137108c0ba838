"""PNG figures: the calibration fits per candidate, and a threshold's quality / speedup trade-off."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'teacache-kernels[plot]'") from e
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_calibration(result, path: str | os.PathLike) -> None:
    """One panel per candidate: (x, y) pairs colored by step index, the fitted polynomial, R^2 in the title."""
    plt = _pyplot()
    fits = result.candidates
    cols = min(3, len(fits))
    rows = math.ceil(len(fits) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols + 1.0, 4.0 * rows), squeeze=False, layout="constrained")
    best = result.best
    scatter = None
    for ax, fit in zip(axes.flat, fits):
        x, y, step = result.recording.arrays(fit.signal)
        scatter = ax.scatter(x, y, c=step, cmap="viridis", s=9, alpha=0.75, linewidths=0)
        lo, hi = fit.x_range
        grid = np.linspace(lo, hi, 200)
        ax.plot(grid, fit(grid), color="crimson", lw=1.8, label=f"degree-{result.degree} fit")
        is_best = best is not None and fit.signal == best.signal
        runtime = "" if fit.signal in result.runtime_signals else " (not at run time)"
        ax.set_title(
            f"{fit.signal}{runtime}\nR$^2$ = {fit.r2:.4f}" + ("   BEST" if is_best else ""),
            fontsize=10,
            fontweight="bold" if is_best else "normal",
        )
        if is_best:
            for spine in ax.spines.values():
                spine.set_edgecolor("crimson")
                spine.set_linewidth(2.2)
        ax.set_xlabel(f"x: rel. L1 step change of {fit.signal}", fontsize=8)
        ax.set_ylabel(f"y: rel. L1 step change of {result.target}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(fits) :]:
        ax.set_visible(False)
    if scatter is not None:
        fig.colorbar(scatter, ax=axes.ravel().tolist(), label="step index (later call of the pair)", shrink=0.85)
    fig.suptitle(
        f"TeaCache calibration: {result.model_name}, {result.seq_len} tokens, {result.num_samples} samples x "
        f"{result.num_inference_steps} steps ({', '.join(result.contexts)})",
        fontsize=11,
    )
    _save(fig, path)


def plot_threshold(result, path: str | os.PathLike) -> None:
    """Worst-sample and mean PSNR against the calls speedup, each point labelled with its threshold."""
    plt = _pyplot()
    pts = sorted(result.points, key=lambda p: p.threshold)
    finite = [v for p in pts for v in (p.min_psnr, p.mean_psnr) if math.isfinite(v)]
    cap = (max(finite) if finite else 60.0) + 8.0  # where an identical output (PSNR inf) is drawn

    def shown(v):
        return cap if math.isinf(v) and v > 0 else v

    fig, ax = plt.subplots(figsize=(7.5, 5))
    sx = [p.calls_speedup for p in pts]
    ax.plot(sx, [shown(p.min_psnr) for p in pts], "o-", color="tab:blue", label="worst sample PSNR")
    ax.plot(sx, [shown(p.mean_psnr) for p in pts], "s--", color="tab:gray", alpha=0.7, ms=4, label="mean PSNR")
    labels: dict[tuple[float, float], list[str]] = {}  # thresholds landing on one point share a label
    for p in pts:
        labels.setdefault((p.calls_speedup, shown(p.min_psnr)), []).append(f"{p.threshold:.3g}")
    xs = [k[0] for k in labels if math.isfinite(k[0])] or [1.0]
    ys = [k[1] for k in labels if math.isfinite(k[1])] or [0.0]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float]] = []
    chosen_key = None if result.chosen is None else (result.chosen.calls_speedup, shown(result.chosen.min_psnr))
    for (sx_, sy_), names in sorted(labels.items(), key=lambda kv: kv[0] != chosen_key):  # the chosen first
        if any(abs(sx_ - px) < 0.05 * span_x and abs(sy_ - py) < 0.05 * span_y for px, py in placed):
            continue  # too close to a label already drawn: the point stays, its label goes (see the report)
        placed.append((sx_, sy_))
        text = ", ".join(names) if len(names) <= 4 else f"{names[0]} ... {names[-1]}"
        ax.annotate(
            text,
            (sx_, sy_),
            textcoords="offset points",
            xytext=(4, -11),
            fontsize=7,
            color="tab:blue",
            fontweight="bold" if (sx_, sy_) == chosen_key else "normal",
        )
    if result.criterion == "min_psnr":
        ax.axhline(result.target, color="crimson", ls=":", label=f"floor {result.target:g} dB")
    else:
        ax.axvline(result.target, color="crimson", ls=":", label=f"target {result.target:g}x")
    chosen = result.chosen
    if chosen is not None:
        ax.plot(
            [chosen.calls_speedup],
            [shown(chosen.min_psnr)],
            "*",
            ms=17,
            color="crimson",
            label=f"chosen: thresh {chosen.threshold:.3g} ({chosen.calls_speedup:.2f}x calls)",
        )
    if any(math.isinf(p.min_psnr) for p in pts):
        ax.axhline(cap, color="black", lw=0.5, alpha=0.3)
        ax.text(ax.get_xlim()[1], cap, "identical to uncached (PSNR inf) ", fontsize=7, va="bottom", ha="right")
    ax.set_xlabel("speedup in transformer calls (total / computed); labels: rel_l1_thresh")
    ax.set_ylabel("PSNR vs uncached output (dB)")
    ax.set_title(
        f"TeaCache threshold trade-off: {result.model_name}, {result.num_samples} samples x "
        f"{result.num_inference_steps} steps",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    _save(fig, path)


def _save(fig, path) -> None:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
