"""What the runnable examples in python/ share: arguments, timing, PSNR, saving, and the uncached/TeaCache run.

A script describes its model as an `Example` (how to call the pipeline, and how to turn one output into
uint8 pixels) and hands it to `run`, which does what python/flux.py does: optionally generate without
TeaCache first (`--compare`), enable TeaCache, compile the transformer, warm up, generate, print
`tk.summary(pipe)`, save the image or video, and write `run.json` into `--out`.

`--tiny` runs use the random-weight pipelines of `teacache_kernels.tiny_families` on the CPU: they check the
mechanics (schedule, state, compile, saving), not quality.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import teacache_kernels as tk

TINY_STEPS = 8


def parser(doc: str, *, model: str | None, steps: int, prompt: str, out: str, model_help: str | None = None,
           warmup_steps: int = 2) -> argparse.ArgumentParser:  # fmt: skip
    """The arguments every example takes; scripts add their own (sizes, guidance, images...)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random-weight pipeline on the CPU (smoke test)")
    p.add_argument("--model", default=model, help=model_help or f"Hugging Face id or local folder (default: {model})")
    p.add_argument("--prompt", default=prompt)
    p.add_argument("--steps", type=int, default=None, help=f"default: {steps} ({TINY_STEPS} with --tiny)")
    p.add_argument("--thresh", type=float, default=None, help="rel_l1_thresh (default: the coefficient set's)")
    p.add_argument("--coefficients", default=None, metavar="SET",
                   help="a published coefficient set by name (default: the family's choice for the model)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="generator seed (with --tiny: the random weights' seed)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the transformer (default: on, off with --tiny)")  # fmt: skip
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="also run uncached, same seed and compile mode: speedup and PSNR (default: on with --tiny)")  # fmt: skip
    p.add_argument("--warmup-steps", type=int, default=warmup_steps,
                   help="steps of the untimed warm-up generation before each timed one (compiles; 0: none)")  # fmt: skip
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=Path(out), help=f"output folder (default: {out})")
    p.set_defaults(default_steps=steps)
    return p


def finish(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on --tiny; set torch's threads to 1 for tiny runs (much faster on CPU)."""
    args.steps = args.steps or (TINY_STEPS if args.tiny else args.default_steps)
    args.compile = (not args.tiny) if args.compile is None else args.compile
    args.compare = args.tiny if args.compare is None else args.compare
    if args.tiny:
        args.device = "cpu"
        torch.set_num_threads(1)
    return args


@dataclass
class Example:
    """One model, ready to run.

    generate(steps, seed) -> output: one pipeline call (the timed part).
    pixels(output) -> uint8 array, (H, W, 3) for an image or (frames, H, W, 3) for a video.
    latents(output) -> the final latents, where the output is latents (--tiny): PSNR on them too.
    """

    name: str
    pipe: Any
    generate: Callable[[int, int], Any]
    pixels: Callable[[Any], np.ndarray]
    video: bool = False
    fps: int = 8
    latents: Callable[[Any], torch.Tensor] | None = None
    fullgraph: bool = True
    record: dict = field(default_factory=dict)  # extra fields for run.json


def _transformer_names(pipe) -> list[str]:
    # Wan 2.2's two-stage pipelines have a second transformer for the low-noise steps.
    return ["transformer"] + (["transformer_2"] if getattr(pipe, "transformer_2", None) is not None else [])


def compile_transformer(pipe, *, fullgraph: bool) -> None:
    for name in _transformer_names(pipe):
        setattr(pipe, name, torch.compile(getattr(pipe, name), fullgraph=fullgraph))


def uncompile_transformer(pipe) -> None:
    for name in _transformer_names(pipe):
        module = getattr(pipe, name)
        setattr(pipe, name, getattr(module, "_orig_mod", module))


def timed(ex: Example, args) -> tuple[Any, float]:
    """(output, seconds); a CUDA sync brackets the timing on a GPU."""
    sync = torch.cuda.synchronize if args.device.startswith("cuda") and torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    output = ex.generate(args.steps, args.seed)
    sync()
    return output, time.perf_counter() - start


def warm_up(ex: Example, args) -> None:
    # Compiles both branches of the cached span (torch.cond traces both): a shorter generation suffices, and
    # a new step count does not recompile. The next call's scheduler.set_timesteps resets the cache state.
    if args.warmup_steps > 0:
        ex.generate(args.warmup_steps, args.seed)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def latent_psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR of latents, with the reference's value range as the peak."""
    ref = reference.detach().double().cpu().numpy()
    return psnr(x.detach().double().cpu().numpy(), ref, peak=float(ref.max() - ref.min()) or 1.0)


def to_uint8(images) -> np.ndarray:
    """PIL image(s), or float arrays in [0, 1], -> uint8 array."""
    if isinstance(images, (list, tuple)):
        return np.stack([to_uint8(im) for im in images])
    a = np.asarray(images)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0.0, 1.0) * 255).round().astype(np.uint8)
    return a


def save(pixels: np.ndarray, out: Path, stem: str, *, video: bool, fps: int) -> str:
    """Write an image as PNG; a video with diffusers' export_to_video (imageio or OpenCV), else a PNG strip."""
    from PIL import Image

    if not video:
        path = out / f"{stem}.png"
        Image.fromarray(pixels).save(path)
        return path.name
    frames = [Image.fromarray(f) for f in pixels]
    try:
        from diffusers.utils import export_to_video

        path = out / f"{stem}.mp4"
        export_to_video(frames, str(path), fps=fps)
        return path.name
    except (ImportError, AttributeError, RuntimeError, OSError, ValueError) as e:  # no video backend
        path = out / f"{stem}_frames.png"
        Image.fromarray(np.concatenate(list(pixels), axis=1)).save(path)
        print(f"no video backend for export_to_video ({type(e).__name__}; it needs imageio with imageio-ffmpeg, or "
              f"opencv-python): frames side by side in {path.name}")  # fmt: skip
        return path.name


def run(ex: Example, args) -> int:
    """--compare: uncached first; then TeaCache; summary, outputs and run.json in args.out."""
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    record = {"model": ex.name, "pipeline": type(ex.pipe).__name__, "steps": args.steps, "compile": args.compile,
              "fullgraph": ex.fullgraph if args.compile else None, "warmup_steps": args.warmup_steps,
              "thresh_given": args.thresh, "coefficients_given": args.coefficients, **ex.record}  # fmt: skip

    baseline = None
    if args.compare:
        if args.compile:
            compile_transformer(ex.pipe, fullgraph=ex.fullgraph)
        warm_up(ex, args)
        baseline, record["uncached_s"] = timed(ex, args)
        baseline_pixels = ex.pixels(baseline)
        record["uncached_output"] = save(baseline_pixels, out, "uncached", video=ex.video, fps=ex.fps)
        uncompile_transformer(ex.pipe)  # enable on the plain model, then compile again

    coefficients = {"coefficients": args.coefficients} if args.coefficients else {}
    second = getattr(args, "teacache_2", None)  # Wan 2.2: transformer_2's own fields
    tk.enable_teacache(ex.pipe, rel_l1_thresh=args.thresh, **coefficients, **({"transformer_2": second} if second else {}))
    if args.compile:
        compile_transformer(ex.pipe, fullgraph=ex.fullgraph)
    warm_up(ex, args)
    output, record["teacache_s"] = timed(ex, args)
    summary = tk.summary(ex.pipe)
    print(summary)
    record["summary"] = summary.as_dict()
    pixels = ex.pixels(output)
    record["teacache_output"] = save(pixels, out, "teacache", video=ex.video, fps=ex.fps)
    if baseline is not None:
        record["speedup"] = record["uncached_s"] / record["teacache_s"]
        record["psnr_db"] = psnr(pixels, baseline_pixels)
        record["psnr_on"] = "decoded video frames, uint8" if ex.video else "decoded image, uint8"
        line = (f"uncached {record['uncached_s']:.2f} s, TeaCache {record['teacache_s']:.2f} s: "
                f"{record['speedup']:.2f}x; PSNR vs uncached {record['psnr_db']:.1f} dB ({record['psnr_on']})")  # fmt: skip
        if ex.latents is not None:
            record["psnr_latents_db"] = latent_psnr(ex.latents(output), ex.latents(baseline))
            line += f", {record['psnr_latents_db']:.1f} dB on the latents"
        print(line)
    (out / "run.json").write_text(json.dumps(record, indent=1, default=str))
    print(f"outputs and run.json in {out}/")
    return 0
