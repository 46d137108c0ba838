"""HunyuanVideo with TeaCache decided on the device, and the transformer compiled with fullgraph=True.

On a GPU, with the checkpoint available (Hugging Face cache or a local directory):
    python python/hunyuan_video.py --prompt "A cat walks on the grass, realistic style." --compare
Anywhere, as a smoke test (a tiny random-weight HunyuanVideoPipeline on the CPU; the videos are noise):
    python python/hunyuan_video.py --tiny

HunyuanVideoPipeline (hunyuanvideo-community/HunyuanVideo, diffusers' layout of tencent/HunyuanVideo) in bf16,
with the VAE's tiling on; 1280x720, 129 frames, 50 steps: the authors' TeaCache4HunyuanVideo run. HunyuanVideo is
guidance-distilled: --guidance is the embedded guidance (one transformer call per step); --true-cfg-scale > 1
with a --negative-prompt adds diffusers' true CFG (an "uncond" call per step), and TeaCache keeps one state per
branch. Default threshold: the `hunyuan-video` set's, 0.15 (~2.1x in the authors' measurements; 0.1: ~1.6x).
--compare also generates without TeaCache (same seed, same compile mode) and reports the speedup and the PSNR of
the TeaCache frames against the uncached ones. The video goes to --out as MP4 through
diffusers.utils.export_to_video when imageio (with imageio-ffmpeg) or OpenCV is installed, else as one PNG of
the frames side by side; run.json next to it.

Memory: the 13B transformer in bf16 is ~26 GB, the Llama text encoder ~16 GB; 720p x 129 frames is ~120k
tokens, whose attention dominates the time. --cpu-offload moves each model to the GPU only while it runs.

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

MODEL = "hunyuanvideo-community/HunyuanVideo"
FPS = 24  # what the authors' script saves at


def decode_tiny(pipe, latents) -> np.ndarray:
    """Latents (batch, channels, frames, h, w) -> uint8 frames, as HunyuanVideoPipeline decodes them."""
    with torch.no_grad():
        video = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return ex.to_uint8(pipe.video_processor.postprocess_video(video, output_type="pil")[0])


def load(args) -> ex.Example:
    if args.tiny:
        from teacache_kernels.tiny_families import TINY

        fam = TINY["hunyuan-video"]
        pipe = fam.pipeline(args.seed)
        pipe.set_progress_bar_config(disable=True)
        return ex.Example("tiny random HunyuanVideoPipeline", pipe, lambda steps, seed: fam.generate(pipe, steps),
                          pixels=lambda latents: decode_tiny(pipe, latents), latents=lambda latents: latents,
                          video=True, fps=FPS)  # fmt: skip

    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=args.device)
    else:
        pipe.to(args.device)
    pipe.vae.enable_tiling()
    inputs = dict(prompt=args.prompt, height=args.height, width=args.width, num_frames=args.frames,
                  guidance_scale=args.guidance, true_cfg_scale=args.true_cfg_scale)  # fmt: skip
    if args.negative_prompt is not None:
        inputs["negative_prompt"] = args.negative_prompt

    def generate(steps, seed):
        return pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)).frames[0]

    record = {k: v for k, v in inputs.items() if k != "prompt"}
    return ex.Example(args.model, pipe, generate, pixels=ex.to_uint8, video=True, fps=FPS, record=record)


def main(argv=None) -> int:
    p = ex.parser(__doc__, model=MODEL, steps=50, out="hunyuan_video_out",
                  prompt="A cat walks on the grass, realistic style.")  # fmt: skip
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--frames", type=int, default=129, help="num_frames (default 129)")
    p.add_argument("--guidance", type=float, default=6.0, help="embedded guidance_scale (default 6.0)")
    p.add_argument("--true-cfg-scale", type=float, default=1.0,
                   help="true CFG with --negative-prompt when > 1 (default 1.0: off)")  # fmt: skip
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload (less GPU memory, slower)")
    args = ex.finish(p.parse_args(argv))
    return ex.run(load(args), args)


if __name__ == "__main__":
    raise SystemExit(main())
