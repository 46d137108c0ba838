"""Command line: `python -m teacache_kernels {demo,models,ptx}`."""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def _demo(args) -> int:
    import torch

    import teacache_kernels as tk
    from teacache_kernels.tiny_models import TinyFluxShape, flow_matching_loop, flux_inputs, tiny_flux_transformer

    shape = TinyFluxShape(layers=args.layers, single_layers=args.single_layers, height=args.size, width=args.size)
    latents, cond = flux_inputs(shape)
    negative = flux_inputs(shape, seed=7)[1] if args.cfg else None
    contexts = ("cond", "uncond") if args.cfg else ("cond",)
    calls = args.steps * len(contexts)

    def generate(model, repeats=1):
        """Final latents and the median wall time of `repeats` generations (each one a new generation)."""
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = flow_matching_loop(model, latents, cond, args.steps, negative=negative, cfg_scale=3.0)
            times.append(time.perf_counter() - start)
        return out, statistics.median(times)

    print(
        f"teacache_kernels demo: tiny random-weight FluxTransformer2DModel ({shape.layers} double + "
        f"{shape.single_layers} single blocks, {shape.image_tokens} image tokens), {args.steps} Euler steps, "
        f"{'true CFG (cond + uncond contexts)' if args.cfg else 'no CFG'}, CPU, torch {torch.__version__}"
    )
    print("Random weights: this shows the mechanics (schedule, state, compile), not image quality.")

    rows, schedules, graph_breaks = [], {}, None
    modes = ["eager"] + (["compiled"] if args.compile else [])
    for mode in modes:
        # One model per mode and per cached/uncached: a compiled module is compiled for the structure it had.
        plain, cached = tiny_flux_transformer(shape), tiny_flux_transformer(shape)
        tk.enable_teacache(cached, rel_l1_thresh=args.thresh[0], num_inference_steps=args.steps)
        if mode == "compiled":
            with torch.no_grad():
                explained = torch._dynamo.explain(cached)(hidden_states=latents, timestep=torch.ones(1), **cond)
            graph_breaks = explained.graph_break_count
            torch._dynamo.reset()
            plain, run_cached = torch.compile(plain, fullgraph=True), torch.compile(cached, fullgraph=True)
            print("compiling both models (fullgraph=True; a cold CPU compile takes about a minute each) ...", flush=True)
            generate(plain)
            tk.reset_teacache(cached)
            generate(run_cached)
        else:
            run_cached = cached
        baseline, t_base = generate(plain, args.repeats)
        if mode == "eager":
            reference = baseline
        rows.append((f"uncached, {mode}", calls, calls, t_base, t_base, (baseline - reference).abs().max().item()))
        for thresh in args.thresh:
            tk.enable_teacache(cached, rel_l1_thresh=thresh)  # written on the device: no recompile
            out, t = generate(run_cached, args.repeats)
            s = tk.summary(cached)
            computed = sum(s.contexts[n].computed_steps for n in contexts)
            rows.append((f"TeaCache {thresh:g}, {mode}", calls, computed, t, t_base, (out - reference).abs().max().item()))
            schedules[(mode, thresh)] = {n: s.contexts[n].schedule for n in contexts}

    print(f"\n{'run':<26} {'calls':>5} {'computed':>8} {'wall s':>7} {'speedup':>8}  max|x - uncached eager|")
    for name, n, computed, t, t_base, err in rows:
        print(f"{name:<26} {n:>5} {computed:>8} {t:>7.3f} {t_base / t:>7.2f}x  {err:.2e}")
    print(f"(wall: median of {args.repeats} generations; speedup: against the uncached run of the same mode, this run)")
    print("\nschedules (C = blocks computed, R = cached residual reused):")
    for (mode, thresh), per_context in schedules.items():
        for ctx, sched in per_context.items():
            print(f"  {mode:<8} thresh {thresh:<5g} {ctx:<6} {sched}")
    if args.compile:
        same = all(schedules[("eager", t)] == schedules[("compiled", t)] for t in args.thresh)
        print(f"\ncompiled vs eager schedules: {'identical' if same else 'DIFFERENT'}; graph breaks: {graph_breaks}")
        return 0 if same and graph_breaks == 0 else 1
    return 0


def _models(args) -> int:
    from teacache_kernels.coefficients import PUBLISHED
    from teacache_kernels.models import FAMILIES

    print("Supported transformer classes (cached forward installed by enable_teacache):")
    for cls, fam in sorted(FAMILIES.items()):
        print(f"  {cls:<28} family {fam.name}, block span: {' + '.join(fam.block_lists)}")
    print("\nPublished coefficient sets (use by name: coefficients='...'):")
    for s in PUBLISHED.values():
        print(f"  {s.name:<22} default thresh {s.default_thresh:<5g} {s.model}")
    return 0


def _ptx(args) -> int:
    from teacache_kernels.ops import aot

    aot.dump(args.out, archs=args.arch, dtypes=args.dtype)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m teacache_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="TeaCache on a tiny random-weight FLUX transformer: schedule, eager vs compiled")
    demo.add_argument("--steps", type=int, default=28)
    demo.add_argument("--thresh", type=float, nargs="+", default=[0.4, 0.8], help="rel_l1_thresh values to run")
    demo.add_argument("--cfg", action=argparse.BooleanOptionalAction, default=True, help="true CFG: two cache contexts")
    demo.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="also run torch.compile(fullgraph=True)")
    demo.add_argument("--layers", type=int, default=2)
    demo.add_argument("--single-layers", type=int, default=4)
    demo.add_argument("--size", type=int, default=32, help="latent height = width (image tokens = size^2 / 4)")
    demo.add_argument("--repeats", type=int, default=5, help="generations timed per row (median)")
    demo.set_defaults(run=_demo)
    models = sub.add_parser("models", help="supported transformer classes and published coefficient sets")
    models.set_defaults(run=_models)
    ptx = sub.add_parser("ptx", help="compile the kernels for NVIDIA GPUs (no GPU needed); write PTX, cubin, resource usage")
    ptx.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    ptx.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"], choices=["bf16", "fp16", "fp32"])
    ptx.add_argument("--out", default="ptx", help="output directory")
    ptx.set_defaults(run=_ptx)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
