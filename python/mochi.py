"""Mochi 1 (preview) with TeaCache decided on the device, and the transformer compiled with fullgraph=True.

On a GPU, with the checkpoint available (Hugging Face cache or a local directory):
    python python/mochi.py --prompt "a chameleon's eye, its scales changing color, close-up" --compare
Anywhere, as a smoke test (a tiny random-weight MochiPipeline on the CPU; the videos are noise):
    python python/mochi.py --tiny

MochiPipeline (genmo/mochi-1-preview, its bf16 weights) in bf16, with the VAE's tiling on; 848x480, 85 frames,
64 steps (the steps of the authors' TeaCache4Mochi). TeaCache keeps one state, the pipeline batching cond and
uncond into one call, and takes the residual after `norm_out` as the original does. Default threshold: the
`mochi` set's, 0.06 (0.09: ~2.1x in the authors' measurements). --compare also generates without TeaCache (same
seed, same compile mode) and reports the speedup and the PSNR of the TeaCache frames against the uncached ones.
The video goes to --out as MP4 through diffusers.utils.export_to_video when imageio (with imageio-ffmpeg) or
OpenCV is installed, else as one PNG of the frames side by side; run.json next to it.

diffusers' Mochi attention calls torch.nonzero: torch._dynamo.explain reports graph breaks even on the plain
model, while torch.compile(fullgraph=True) compiles it whole (tests/test_families.py).

What has been run: only --tiny, on the CPU (eager, and compiled in the slow test of tests/test_examples.py).
The real checkpoint has not been run with this script (it was written without a GPU or downloads): the
real-model path follows diffusers' documented usage, but its speed and quality are unmeasured. With --tiny the
pipeline returns latents; the script decodes them with the tiny VAE as the pipeline would, and reports PSNR on
the decoded frames and on the latents.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _example as ex  # noqa: E402

MODEL = "genmo/mochi-1-preview"
FPS = 30


def decode_tiny(pipe, latents) -> np.ndarray:
    """Latents (batch, channels, frames, h, w) -> uint8 frames, as MochiPipeline decodes them."""
    config = pipe.vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    with torch.no_grad():
        video = pipe.vae.decode(latents, return_dict=False)[0]
    return ex.to_uint8(pipe.video_processor.postprocess_video(video, output_type="pil")[0])


def load(args) -> ex.Example:
    if args.tiny:
        from teacache_kernels.tiny_families import TINY

        fam = TINY["mochi"]
        pipe = fam.pipeline(args.seed)
        return ex.Example("tiny random MochiPipeline", pipe, lambda steps, seed: fam.generate(pipe, steps),
                          pixels=lambda latents: decode_tiny(pipe, latents), latents=lambda latents: latents,
                          video=True, fps=FPS)  # fmt: skip

    from diffusers import MochiPipeline

    # genmo/mochi-1-preview has bf16 files for the transformer and the VAE (half the download); the text encoder
    # loads from its default files.
    variant = {"variant": args.variant} if args.variant else {}
    pipe = MochiPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16, **variant).to(args.device)
    pipe.enable_vae_tiling()
    inputs = dict(prompt=args.prompt, height=args.height, width=args.width, num_frames=args.frames,
                  guidance_scale=args.guidance)  # fmt: skip

    def generate(steps, seed):
        return pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)).frames[0]

    record = {k: v for k, v in inputs.items() if k != "prompt"}
    return ex.Example(args.model, pipe, generate, pixels=ex.to_uint8, video=True, fps=FPS, record=record)


def main(argv=None) -> int:
    p = ex.parser(__doc__, model=MODEL, steps=64, out="mochi_out",
                  prompt="Close-up of a chameleon's eye, with its scaly skin changing color. Ultra high resolution 4k.")  # fmt: skip
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=848)
    p.add_argument("--frames", type=int, default=85, help="num_frames (default 85)")
    p.add_argument("--guidance", type=float, default=4.5, help="guidance_scale (default 4.5)")
    p.add_argument("--variant", default="bf16", help="weights variant to load (default bf16; '' for the default files)")
    args = ex.finish(p.parse_args(argv))
    return ex.run(load(args), args)


if __name__ == "__main__":
    raise SystemExit(main())
