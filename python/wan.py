"""Wan 2.1 / 2.2 text-to-video with TeaCache decided on the device, and the transformer(s) compiled with fullgraph=True.

On a GPU, with a checkpoint available (Hugging Face cache or a local directory):
    python python/wan.py --prompt "a cat surfing a wave at sunset" --compare
    python python/wan.py --coefficients wan2.1-t2v-1.3b-ret --thresh 0.1 --compare   # the authors' ret mode
    python python/wan.py --model Wan-AI/Wan2.2-T2V-A14B-Diffusers --coefficients wan2.1-t2v-14b --thresh 0.2
Anywhere, as a smoke test (a tiny random-weight WanPipeline on the CPU; the videos are noise):
    python python/wan.py --tiny            # --two-stage: a tiny Wan 2.2-style pipeline with transformer_2

WanPipeline (Wan-AI/Wan2.1-T2V-1.3B-Diffusers by default) with the transformer in bf16 and the VAE in float32
(as diffusers' Wan docs load it), 832x480, 81 frames, 50 steps, guidance 5 (the authors' t2v settings). The
coefficient set picks the authors' mode: the default `wan2.1-*` sets compare the time embedding before its
projection, first and last step forced; the `*-ret` sets compare the projection the blocks receive, the first 5
steps forced. The default set comes from the model's config (1.3B / 14B, T2V / I2V). Wan 2.2 has no published
set: give --coefficients. A two-stage Wan 2.2 pipeline gets TeaCache on both transformers, each with its own
state and step count; --thresh-2 sets the low-noise transformer's threshold. --compare also generates without
TeaCache (same seed, same compile mode) and reports the speedup and the PSNR of the TeaCache frames.

What has been run: only --tiny, on the CPU (eager, and compiled in the slow test of tests/test_examples.py). The
real checkpoints have not been run with this script (it was written without a GPU or downloads): the real-model
path follows diffusers' documented usage, but its speed and quality are unmeasured. With --tiny the pipeline
returns latents; the script decodes them with the tiny VAE as the pipeline would, and reports PSNR on the
decoded frames and on the latents. The tiny model has no published set: --tiny uses wan2.1-i2v-14b-480p.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _example as ex  # noqa: E402

MODEL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
FPS = 16
NEGATIVE = "blurry, low quality, static, distorted, watermark, text"
# The tiny random model has no published set (its hidden size is 24); this one gives computed and reused steps on it.
TINY_SET = "wan2.1-i2v-14b-480p"


def decode_tiny(pipe, latents) -> np.ndarray:
    """Latents (batch, channels, frames, h, w) -> uint8 frames, as WanPipeline decodes them."""
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
    with torch.no_grad():
        video = vae.decode(latents / std + mean, return_dict=False)[0]
    return ex.to_uint8(pipe.video_processor.postprocess_video(video, output_type="pil")[0])


def load(args) -> ex.Example:
    if args.tiny:
        from teacache_kernels.tiny_families.wan import wan_generate, wan_pipeline

        pipe = wan_pipeline(args.seed, two_stage=args.two_stage)
        pipe.set_progress_bar_config(disable=True)
        args.coefficients = args.coefficients or TINY_SET
        return ex.Example("tiny random WanPipeline" + (" (two-stage)" if args.two_stage else ""), pipe,
                          lambda steps, seed: wan_generate(pipe, steps), pixels=lambda latents: decode_tiny(pipe, latents),
                          latents=lambda latents: latents, video=True, fps=FPS)  # fmt: skip

    from diffusers import AutoencoderKLWan, WanPipeline

    vae = AutoencoderKLWan.from_pretrained(args.model, subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(args.model, vae=vae, torch_dtype=torch.bfloat16).to(args.device)
    inputs = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                  num_frames=args.frames, guidance_scale=args.guidance)  # fmt: skip

    def generate(steps, seed):
        return pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)).frames[0]

    record = {k: v for k, v in inputs.items() if k not in ("prompt", "negative_prompt")}
    return ex.Example(args.model, pipe, generate, pixels=ex.to_uint8, video=True, fps=FPS, record=record)


def main(argv=None) -> int:
    p = ex.parser(__doc__, model=MODEL, steps=50, out="wan_out", prompt="A cat walks on the grass, realistic style.")
    p.add_argument("--negative-prompt", default=NEGATIVE)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81, help="num_frames (default 81)")
    p.add_argument("--guidance", type=float, default=5.0, help="guidance_scale (default 5)")
    p.add_argument("--thresh-2", type=float, default=None, help="rel_l1_thresh of transformer_2 (Wan 2.2; default: --thresh)")
    p.add_argument("--two-stage", action="store_true", help="with --tiny: a Wan 2.2-style pipeline with transformer_2")
    args = ex.finish(p.parse_args(argv))
    if args.two_stage and not args.tiny:
        p.error("--two-stage builds a tiny pipeline: use it with --tiny (a Wan 2.2 --model is two-stage already)")
    example = load(args)
    if args.thresh_2 is not None:
        args.teacache_2 = {"rel_l1_thresh": args.thresh_2}
    return ex.run(example, args)


if __name__ == "__main__":
    raise SystemExit(main())
