"""LTX-Video 0.9.1 with TeaCache decided on the device, and the transformer compiled with fullgraph=True.

On a GPU, with the checkpoint available (Hugging Face cache or a local directory):
    python python/ltx_video.py --prompt "a turquoise river flowing through a rocky canyon" --compare
Anywhere, as a smoke test (a tiny random-weight LTXPipeline on the CPU; the videos are noise):
    python python/ltx_video.py --tiny

LTXPipeline (a-r-r-o-w/LTX-Video-0.9.1-diffusers, the checkpoint of the authors' TeaCache4LTX-Video) in bf16,
with the authors' settings: 768x512, 161 frames, 50 steps, their negative prompt, decode_timestep 0.03 and
decode_noise_scale 0.025. TeaCache keeps one state, the pipeline batching cond and uncond into one call.
Default threshold: the `ltx-video` set's, 0.05 (the authors: 0.03 -> ~1.6x, 0.05 -> ~2.1x on an A800). One
deviation from their script: the residual is cached before `norm_out` and the final modulation, theirs after
(teacache_kernels/models/ltx_video.py; measured in tests/test_ltx_video.py). --compare also generates without
TeaCache (same seed, same compile mode) and reports the speedup and the PSNR of the TeaCache frames against the
uncached ones. The video goes to --out as MP4 through diffusers.utils.export_to_video when imageio (with
imageio-ffmpeg) or OpenCV is installed, else as one PNG of the frames side by side; run.json next to it.

What has been run: only --tiny, on the CPU (eager, and compiled in the slow test of tests/test_examples.py).
The real checkpoint has not been run with this script (it was written without a GPU or downloads): the
real-model path follows diffusers' documented usage, but its speed and quality are unmeasured. With --tiny the
pipeline returns its packed latents; the script unpacks and decodes them with the tiny VAE as the pipeline
would, and reports PSNR on the decoded frames and on the latents.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _example as ex  # noqa: E402

MODEL = "a-r-r-o-w/LTX-Video-0.9.1-diffusers"
FPS = 24
NEGATIVE = "worst quality, inconsistent motion, blurry, jittery, distorted"  # the authors' script's
TINY_SIZE = dict(height=32, width=32, num_frames=17)  # what teacache_kernels.tiny_families.ltx_video.generate asks for


def decode_tiny(pipe, latents) -> np.ndarray:
    """Packed latents (batch, tokens, channels) -> uint8 frames, as LTXPipeline decodes them (no decode timestep:
    the tiny VAE has no timestep conditioning)."""
    frames = (TINY_SIZE["num_frames"] - 1) // pipe.vae_temporal_compression_ratio + 1
    height, width = (TINY_SIZE[k] // pipe.vae_spatial_compression_ratio for k in ("height", "width"))
    latents = pipe._unpack_latents(latents, frames, height, width, pipe.transformer_spatial_patch_size,
                                   pipe.transformer_temporal_patch_size)  # fmt: skip
    vae = pipe.vae
    latents = pipe._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    with torch.no_grad():
        video = vae.decode(latents, None, return_dict=False)[0]
    return ex.to_uint8(pipe.video_processor.postprocess_video(video, output_type="pil")[0])


def load(args) -> ex.Example:
    if args.tiny:
        from teacache_kernels.tiny_families import TINY

        fam = TINY["ltx-video"]
        pipe = fam.pipeline(args.seed)
        pipe.set_progress_bar_config(disable=True)
        return ex.Example("tiny random LTXPipeline", pipe, lambda steps, seed: fam.generate(pipe, steps),
                          pixels=lambda latents: decode_tiny(pipe, latents), latents=lambda latents: latents,
                          video=True, fps=FPS)  # fmt: skip

    from diffusers import LTXPipeline

    pipe = LTXPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16).to(args.device)
    inputs = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                  num_frames=args.frames, guidance_scale=args.guidance,
                  decode_timestep=0.03, decode_noise_scale=0.025)  # the authors' script's  # fmt: skip

    def generate(steps, seed):
        return pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)).frames[0]

    record = {k: v for k, v in inputs.items() if k not in ("prompt", "negative_prompt")}
    return ex.Example(args.model, pipe, generate, pixels=ex.to_uint8, video=True, fps=FPS, record=record)


def main(argv=None) -> int:
    p = ex.parser(__doc__, model=MODEL, steps=50, out="ltx_video_out",
                  prompt="A clear, turquoise river flows through a rocky canyon, cascading over a small waterfall and "
                         "forming a pool of water at the bottom.")  # fmt: skip
    p.add_argument("--negative-prompt", default=NEGATIVE)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--frames", type=int, default=161, help="num_frames (default 161)")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance_scale (default 3, LTXPipeline's)")
    args = ex.finish(p.parse_args(argv))
    return ex.run(load(args), args)


if __name__ == "__main__":
    raise SystemExit(main())
