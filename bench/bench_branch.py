"""How eager (uncompiled) TeaCache should branch: a Python `if` on `.item()` or an eager `torch.cond`.

    python bench/bench_branch.py

Both read the decision on the host (eager `torch.cond` evaluates its predicate in Python). The
benchmark runs the same generations on the same tiny random-weight FLUX transformer with each
mechanism, alternating them, and reports the median wall time per transformer call. Schedules must be
identical. Results: a table and rows appended to bench/results/branch.csv.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_csv, hardware, print_table, versions  # noqa: E402

import teacache_kernels as tk  # noqa: E402
from teacache_kernels.cached_forward import FusedCache  # noqa: E402
from teacache_kernels.tiny_models import TinyFluxShape, flow_matching_loop, flux_inputs, tiny_flux_transformer  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--thresh", type=float, default=0.6)
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)

    shape = TinyFluxShape(layers=2, single_layers=4, height=32, width=32)
    latents, cond = flux_inputs(shape, device=args.device)
    model = tiny_flux_transformer(shape).to(args.device)
    tk.enable_teacache(model, rel_l1_thresh=args.thresh, num_inference_steps=args.steps)

    samples, schedules = {"python": [], "cond": []}, {}
    try:
        for _ in range(args.repeats + 1):  # the first round warms up
            for mechanism in samples:
                FusedCache.eager_branch = mechanism
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                flow_matching_loop(model, latents, cond, args.steps)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                samples[mechanism].append((time.perf_counter() - start) / args.steps)
                schedules[mechanism] = tk.summary(model).contexts["cond"].schedule
    finally:
        FusedCache.eager_branch = "python"
    assert schedules["python"] == schedules["cond"], schedules

    hw = hardware(args.device)
    base = statistics.median(samples["python"][1:])
    rows = []
    for mechanism, times in samples.items():
        t = statistics.median(times[1:])
        rows.append({
            "hardware": hw, **versions(), "device": args.device, "model": f"tiny FLUX {shape.layers}+{shape.single_layers} blocks, {shape.image_tokens} tokens",
            "schedule": schedules[mechanism], "branch": mechanism, "median_us_per_call": f"{t * 1e6:.0f}",
            "relative_to_python": f"{t / base:.2f}",
        })  # fmt: skip
    print(f"eager branch mechanism, {hw}; schedule {schedules['python']}")
    print_table(rows, ["branch", "median_us_per_call", "relative_to_python"])
    if not args.no_csv:
        print(f"appended to {append_csv('branch', rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
