"""FLUX.1 with TeaCache decided on the device, and the transformer compiled with fullgraph=True.

On a GPU, with the checkpoint available (Hugging Face cache or a local directory):
    python python/flux.py --prompt "a photo of a corgi surfing" --steps 28 --thresh 0.4 --compare
Anywhere, as a smoke test (a tiny random-weight FluxPipeline on the CPU; the images are noise):
    python python/flux.py --tiny

--compare also generates without TeaCache (same seed, same compile mode) and reports the speedup and
the PSNR of the TeaCache image against it. Images and a JSON record go to --out.

Many GPUs (context parallelism: each GPU holds 1/N of the sequence; TeaCache sums its decision over them):
    torchrun --nproc-per-node 4 python/flux.py --cp 4 --compare                  # Ulysses attention
    torchrun --nproc-per-node 4 python/flux.py --cp 4 --cp-kind ring --compare   # Ring attention (needs flash)
    torchrun --nproc-per-node 2 python/flux.py --tiny --cp 2                      # CPU smoke test, gloo
Rank 0 writes the images and run.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import teacache_kernels as tk


def start_context_parallel(args) -> int:
    """Under torchrun with --cp N: join the process group and pick this rank's device. Returns the rank."""
    if args.cp <= 1:
        return 0
    import os

    import torch.distributed as dist

    if "LOCAL_RANK" not in os.environ:
        raise SystemExit(f"--cp {args.cp} runs one process per GPU: start it with torchrun --nproc-per-node {args.cp}")
    local_rank = int(os.environ["LOCAL_RANK"])
    if args.tiny:  # CPU: gloo, and diffusers' mesh on the CPU "accelerator" (it picks device rank % device_count)
        torch.accelerator.device_count = lambda: 1
        dist.init_process_group("gloo")
    else:
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
        dist.init_process_group("nccl")
    if dist.get_world_size() != args.cp:
        raise SystemExit(f"--cp {args.cp} but torchrun started {dist.get_world_size()} processes")
    return dist.get_rank()


def enable_context_parallel(pipe, args) -> None:
    """diffusers' own context parallelism on the transformer (before or after TeaCache: either order works)."""
    if args.cp <= 1:
        return
    from diffusers import ContextParallelConfig

    if args.cp_kind == "ring":
        pipe.transformer.set_attention_backend("flash")  # Ring attention needs the log-sum-exp: flash (or sage) on GPUs
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(**{f"{args.cp_kind}_degree": args.cp}))


def load_pipeline(args):
    if args.tiny:
        from teacache_kernels.tiny_models import TinyFluxShape, tiny_flux_pipeline, tiny_flux_prompt

        shape = TinyFluxShape()
        pipe = tiny_flux_pipeline(shape)
        size = 2 * shape.height
        return pipe, dict(**tiny_flux_prompt(shape), height=size, width=size)
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16).to(args.device)
    return pipe, dict(prompt=args.prompt, height=args.size, width=args.size, guidance_scale=args.guidance)


def generate(pipe, inputs, args):
    """(PIL image, seconds); a CUDA sync brackets the timing on a GPU."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and not args.tiny else (lambda: None)
    sync()
    start = time.perf_counter()
    image = pipe(**inputs, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed)).images[0]
    sync()
    return image, time.perf_counter() - start


def maybe_compile(pipe, args):
    if args.compile:
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)


def psnr(a, b) -> float:
    x, y = (np.asarray(im, dtype=np.float64) for im in (a, b))
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random-weight pipeline on the CPU (smoke test)")
    p.add_argument("--model", default="black-forest-labs/FLUX.1-dev")
    p.add_argument("--prompt", default="A cat holding a sign that says hello world")
    p.add_argument("--steps", type=int, default=None, help="default: 28 (8 with --tiny)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--thresh", type=float, default=None, help="rel_l1_thresh (default: the coefficient set's, 0.4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None, help="also run uncached (default: on with --tiny)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--cp", type=int, default=1, metavar="N", help="context parallelism over N GPUs (run with torchrun)")
    p.add_argument("--cp-kind", choices=("ulysses", "ring"), default="ulysses")
    p.add_argument("--out", default="flux_out")
    args = p.parse_args(argv)
    if args.cp < 1:
        p.error(f"--cp must be at least 1, got {args.cp}")
    rank = start_context_parallel(args)
    args.steps = args.steps or (8 if args.tiny else 28)
    args.compare = args.tiny if args.compare is None else args.compare
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pipe, inputs = load_pipeline(args)
    enable_context_parallel(pipe, args)
    record = {"model": "tiny random FLUX" if args.tiny else args.model, "steps": args.steps, "compile": args.compile,
              "context_parallel": args.cp}  # fmt: skip
    save = rank == 0  # every rank computes the same image: rank 0 writes it

    baseline = None
    if args.compare:
        maybe_compile(pipe, args)
        generate(pipe, inputs, args)  # warm-up (compiles)
        baseline, record["uncached_s"] = generate(pipe, inputs, args)
        if save:
            baseline.save(out / "uncached.png")
        pipe.transformer = getattr(pipe.transformer, "_orig_mod", pipe.transformer)  # uncompiled again

    tk.enable_teacache(pipe, rel_l1_thresh=args.thresh)
    maybe_compile(pipe, args)
    generate(pipe, inputs, args)  # warm-up (compiles; the cache state is reset by the next call)
    image, record["teacache_s"] = generate(pipe, inputs, args)
    summary = tk.summary(pipe)
    if not save:
        return 0
    image.save(out / "teacache.png")
    print(summary)
    record["summary"] = summary.as_dict()
    if baseline is not None:
        record["speedup"] = record["uncached_s"] / record["teacache_s"]
        record["psnr_db"] = psnr(image, baseline)
        print(f"uncached {record['uncached_s']:.2f} s, TeaCache {record['teacache_s']:.2f} s: "
              f"{record['speedup']:.2f}x; PSNR vs uncached {record['psnr_db']:.1f} dB")  # fmt: skip
    (out / "run.json").write_text(json.dumps(record, indent=1, default=str))
    print(f"images and run.json in {out}/")
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    raise SystemExit(code)
