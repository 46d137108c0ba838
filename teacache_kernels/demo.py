"""`python -m teacache_kernels demo`: what TeaCache buys on a real trained model, on any CPU.

The embedded digits model (teacache_kernels.digits) generates the same 20 digits uncached and at a few
thresholds, with the transformer compiled (fullgraph=True) in both cases. Prints steps computed, wall
time, speedup, PSNR and SSIM against the uncached samples, and writes the grid as a PNG.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

import torch


@dataclass
class Row:
    name: str
    computed: int  # transformer calls that ran the blocks
    calls: int
    seconds: float  # median wall time of one generation
    images: torch.Tensor | None
    schedule: str = ""  # the "cond" context's C/R string

    def metrics(self, reference: torch.Tensor) -> tuple[float, float]:
        from .digits.quality import psnr, ssim

        same = torch.equal(self.images, reference)
        return (float("inf") if same else float(psnr(self.images, reference).mean()), float(ssim(self.images, reference).mean()))


def _recognised(images: torch.Tensor, labels: torch.Tensor) -> str:
    try:
        from .digits.quality import digit_accuracy

        return f"{100 * digit_accuracy(images, labels):.0f}%"
    except ImportError:  # scikit-learn is optional (the `train` and `test` extras)
        return "-"


def run(
    thresholds: list[float] | None = None,
    *,
    steps: int | None = None,
    seed: int = 0,
    per_digit: int = 2,
    compile: bool = True,
    repeats: int = 3,
    out: str = "teacache_demo.png",
) -> list[Row]:
    import teacache_kernels as tk
    from teacache_kernels import digits

    steps = steps or digits.NUM_STEPS
    labels = torch.arange(10).repeat(per_digit)
    calls = 2 * steps  # true CFG: a "cond" and an "uncond" call per step
    recommended = tk.TeaCacheConfig(coefficients_file=digits.COEFFICIENTS_FILE)
    default_thresh = _recommended_thresh(digits.COEFFICIENTS_FILE)
    thresholds = thresholds or [default_thresh * f for f in (0.5, 1.0, 2.0)]
    mode = "compiled (fullgraph=True)" if compile else "eager"
    print(
        f"teacache_kernels demo: the embedded digits model (FluxTransformer2DModel, 2 double + 4 single blocks, "
        f"trained on scikit-learn's 8x8 digits), {len(labels)} samples, {steps} Euler steps with true CFG, "
        f"{mode}, CPU, torch {torch.__version__}",
        flush=True,
    )

    def sample(model):
        return digits.generate(model, labels, seed=seed, num_steps=steps)

    torch.manual_seed(0)
    plain = digits.load_transformer()
    cached = digits.load_transformer()
    tk.enable_teacache(cached, recommended, rel_l1_thresh=thresholds[0], num_inference_steps=steps)
    if compile:
        run_plain, run_cached = torch.compile(plain, fullgraph=True), torch.compile(cached, fullgraph=True)
        for name, model in (("uncached", run_plain), ("TeaCache", run_cached)):
            print(f"compiling the {name} transformer (a cold CPU compile takes about a minute) ...", end=" ", flush=True)
            start = time.perf_counter()
            sample(model)
            print(f"{time.perf_counter() - start:.0f} s", flush=True)
    else:
        run_plain, run_cached = plain, cached

    # Rounds: each round times every row once, so drift on a shared machine hits all rows alike.
    names = ["uncached"] + [f"TeaCache {t:.3g}" + (" (default)" if t == default_thresh else "") for t in thresholds]
    rows = [Row(name, calls, calls, 0.0, None) for name in names]
    times = [[] for _ in rows]
    for _ in range(repeats):
        for row, thresh, spent in zip(rows, [None, *thresholds], times):
            if thresh is not None:
                tk.enable_teacache(cached, rel_l1_thresh=thresh)  # written to device buffers: no recompile
            start = time.perf_counter()
            row.images = sample(run_plain if thresh is None else run_cached)
            spent.append(time.perf_counter() - start)
            if thresh is not None:
                s = tk.summary(cached)
                row.computed = sum(c.computed_steps for c in s.contexts.values())
                row.schedule = s.contexts["cond"].schedule
    for row, spent in zip(rows, times):
        row.seconds = statistics.median(spent)
    reference, t_base = rows[0].images, rows[0].seconds

    print(f"\n{'run':<24} {'computed':>9} {'wall s':>7} {'speedup':>8} {'PSNR dB':>8} {'SSIM':>6} {'recognised':>10}")
    for row in rows:
        p, q = row.metrics(reference)
        print(
            f"{row.name:<24} {row.computed:>4}/{row.calls:<4} {row.seconds:>7.3f} {t_base / row.seconds:>7.2f}x "
            f"{p:>8.1f} {q:>6.3f} {_recognised(row.images, labels):>10}"
        )
    print(
        f"(computed: transformer calls that ran the blocks, of {steps} steps x 2 CFG contexts; wall: median of "
        f"{repeats} generations, rows timed in turn; speedup, PSNR, SSIM: against the uncached run above; recognised: an SVM trained "
        f"on the real digits labels the sample as the digit asked for)"
    )
    print("\nschedule of the cond context (C = blocks computed, R = cached residual reused):")
    for row in rows[1:]:
        print(f"  {row.name:<24} {row.schedule}")
    if compile:
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        print(f"\ngraph breaks under torch.compile: {breaks}")

    from .digits.grid import save_grid

    grid = []
    for row in rows:
        p, q = row.metrics(reference)
        if row is rows[0]:
            detail = f"\n{row.calls}/{row.calls} computed\n{row.seconds:.2f} s"
        else:
            detail = f"\n{row.computed}/{row.calls} computed, {t_base / row.seconds:.2f}x\nPSNR {p:.1f} dB, SSIM {q:.3f}"
        grid.append((row.name + detail, row.images))
    path = save_grid(grid, out, label_width=200)
    print(f"wrote {path}")
    return rows


def _recommended_thresh(path) -> float:
    from .coefficients import load_calibrated

    _, sets = load_calibrated(path)
    thresh = sets[-1].recommended_thresh
    if thresh is None:
        sys.exit(f"{path} has no recommended_thresh: run `python -m teacache_kernels threshold --model digits --save`")
    return thresh
