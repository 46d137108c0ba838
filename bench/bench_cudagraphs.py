"""Per-step latency of a compiled FLUX-shaped transformer: uncached, TeaCache on the torch.cond path, the split path
and the conditional (zero-sync) path.

    python bench/bench_cudagraphs.py                 # on a GPU: real widths (3072), a few blocks, 1024px tokens
    python bench/bench_cudagraphs.py --small         # a small latent, where launch overhead dominates
    python bench/bench_cudagraphs.py --quick         # CPU smoke: tiny widths, few repeats

Variants, each `torch.compile`d in one process and timed interleaved (median seconds per transformer call over a
generation, after two untimed warm-up generations):
  uncached, mode          the plain transformer, compiled with `--mode` (reduce-overhead: CUDA graphs on a GPU)
  teacache cond           tk.compile(model): the torch.cond path, one graph (no CUDA graphs in torch 2.13)
  teacache split          tk.compile(model, mode=--mode): the split path, one host read per call
  teacache conditional    tk.compile(model, mode="conditional"): each call one CUDA graph with a device-side IF node,
                          no host read (needs CUDA >= 12.4, build and driver: skipped with the reason printed where
                          it is unavailable, e.g. on CPU)
at threshold 0 (every call computes: the caching overhead) and at a threshold that reuses about half the calls.
On CPU Inductor captures no CUDA graphs: the rows then compare the branch mechanisms only. Rows are appended to bench/results/cudagraphs.csv with the
hardware named.
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
from teacache_kernels.tiny_models import TinyFluxShape, flow_matching_loop, flux_inputs, tiny_flux_transformer  # noqa: E402


# Untimed rounds: the first compiles every graph; on the second some variants still compile (seen on CPU: a second
# round of 0.2-1.3 s per call before the times settle), so both are left out.
WARMUP_ROUNDS = 2


def shape_for(args) -> TinyFluxShape:
    if args.quick:
        return TinyFluxShape()
    side = 32 if args.small else 128  # latent side before 2x2 packing: 128 -> 4096 tokens, FLUX at 1024px
    return TinyFluxShape(heads=24, head_dim=128, layers=2, single_layers=4, height=side, width=side)


def timed_generation(model, inputs, steps: int, device: str) -> float:
    latents, cond = inputs
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    flow_matching_loop(model, latents, cond, steps)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mode", default="reduce-overhead")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--small", action="store_true", help="a 256-token latent (launch overhead dominates)")
    p.add_argument("--quick", action="store_true", help="tiny widths, 8 steps, 2 repeats (a CPU smoke run)")
    p.add_argument("--half-thresh", type=float, default=0.6, help="the threshold that reuses about half the calls")
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print every round's time per variant")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 8, 2
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    shape = shape_for(args)
    inputs = flux_inputs(shape, device=args.device, dtype=dtype)

    def build():
        return tiny_flux_transformer(shape, dtype=dtype).to(args.device)

    variants = {f"uncached, {args.mode}": torch.compile(build(), mode=args.mode)}
    cached = {}
    paths = ["cond", "split"]
    from teacache_kernels.cudagraph_conditional import conditional_nodes_unavailable

    unavailable = conditional_nodes_unavailable(args.device)
    if unavailable is None:
        paths.append("conditional")
    else:
        print(f"teacache conditional: skipped ({unavailable})")
    modes = {"cond": None, "split": args.mode, "conditional": "conditional"}
    for path in paths:
        for thresh in (0.0, args.half_thresh):
            model = build()
            tk.enable_teacache(model, rel_l1_thresh=thresh, num_inference_steps=args.steps)
            cached[(path, thresh)] = model
            variants[f"teacache {path}, thresh {thresh:g}"] = tk.compile(model, mode=modes[path])

    samples = {name: [] for name in variants}
    with torch.no_grad():
        for _ in range(args.repeats + WARMUP_ROUNDS):
            for name, model in variants.items():
                samples[name].append(timed_generation(model, inputs, args.steps, args.device))
    if args.verbose:
        for name, times in samples.items():
            print(name, [f'{t * 1e3:.2f}' for t in times])
    hw = hardware(args.device)
    base = statistics.median(samples[f"uncached, {args.mode}"][WARMUP_ROUNDS:])
    rows = []
    for name, times in samples.items():
        t = statistics.median(times[WARMUP_ROUNDS:])
        key = next((k for k in cached if name == f"teacache {k[0]}, thresh {k[1]:g}"), None)
        summary = tk.summary(cached[key]) if key is not None else None
        rows.append({
            "hardware": hw, **versions(), "device": args.device, "dtype": str(dtype).replace("torch.", ""),
            "model": f"FLUX-shaped {shape.layers}+{shape.single_layers} blocks, {shape.heads * shape.head_dim} wide, {shape.image_tokens} tokens",
            "variant": name, "schedule": summary.contexts["cond"].schedule if summary else "-",
            "host_reads_per_call": f"{summary.host_reads_per_call:.2f}" if summary else "-",
            "median_ms_per_call": f"{t * 1e3:.3f}", "speedup_vs_uncached": f"{base / t:.2f}x",
        })  # fmt: skip
    print(f"per-call latency, {hw}; {rows[0]['model']}, {args.steps} steps, median of {args.repeats}")
    # The conditional path's own graph count, printed (the CSV keeps its columns; the variant names the path).
    graphs = [tk.summary(cached[k]).cuda_graphs if k is not None else None for k in (
        next((k for k in cached if r["variant"] == f"teacache {k[0]}, thresh {k[1]:g}"), None) for r in rows)]
    shown = [{**r, "cuda_graphs": "-" if g is None else g} for r, g in zip(rows, graphs)]
    print_table(shown, ["variant", "median_ms_per_call", "speedup_vs_uncached", "host_reads_per_call", "cuda_graphs", "schedule"])
    if not args.no_csv:
        print(f"appended to {append_csv('cudagraphs', rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
