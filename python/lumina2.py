"""Lumina-Image-2.0 with TeaCache decided on the device, and the transformer compiled.

On a GPU, with the checkpoint available (Hugging Face cache or a local directory):
    python python/lumina2.py --prompt "a red fox in the snow, photograph" --steps 50 --compare
Anywhere, as a smoke test (a tiny random-weight Lumina2Pipeline on the CPU; the images are noise):
    python python/lumina2.py --tiny

Lumina2Pipeline (Alpha-VLLM/Lumina-Image-2.0) in bf16. Lumina2Pipeline calls the transformer for the
conditional and unconditional branches without a cache context, and the two differ in sequence length: TeaCache
keeps one state per joint sequence length (contexts "seq<N>" in the summary). Default threshold: the `lumina2`
set's, 0.3 (`--coefficients lumina2-v2` for the authors' LPIPS-tuned set). --cfg-trunc-ratio < 1 stops the
unconditional branch early (diffusers' default 1.0 runs both every step).

Compiling: diffusers' Lumina2 forward reads the caption lengths from the mask on the host (`.tolist()`), so
`torch.compile(fullgraph=True)` cannot compile it, with or without TeaCache; the transformer is compiled with
fullgraph=False. TeaCache's own span adds no graph break (tests/test_families.py checks that on the tiny model).

What has been run: only --tiny, on the CPU (eager, and compiled in the slow test of tests/test_examples.py).
The real checkpoint has not been run with this script (it was written without a GPU or downloads): the
real-model path follows diffusers' documented usage, but its speed and quality are unmeasured. With --tiny the
pipeline returns latents; the script decodes them with the tiny VAE as the pipeline would, and reports PSNR on
the decoded image and on the latents.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _example as ex  # noqa: E402

MODEL = "Alpha-VLLM/Lumina-Image-2.0"


def decode_tiny(pipe, latents) -> np.ndarray:
    """Latents -> uint8 image, as Lumina2Pipeline decodes them."""
    config = pipe.vae.config
    with torch.no_grad():
        image = pipe.vae.decode(latents / config.scaling_factor + config.shift_factor, return_dict=False)[0]
    return ex.to_uint8(pipe.image_processor.postprocess(image, output_type="pil")[0])


def load(args) -> ex.Example:
    if args.tiny:
        from teacache_kernels.tiny_families import TINY

        fam = TINY["lumina2"]
        pipe = fam.pipeline(args.seed)
        return ex.Example("tiny random Lumina2Pipeline", pipe, lambda steps, seed: fam.generate(pipe, steps),
                          pixels=lambda latents: decode_tiny(pipe, latents), latents=lambda latents: latents,
                          fullgraph=False)  # fmt: skip

    from diffusers import Lumina2Pipeline

    pipe = Lumina2Pipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16).to(args.device)
    inputs = dict(prompt=args.prompt, height=args.size, width=args.size, guidance_scale=args.guidance,
                  cfg_trunc_ratio=args.cfg_trunc_ratio, cfg_normalization=True)  # fmt: skip

    def generate(steps, seed):
        return pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)).images[0]

    return ex.Example(args.model, pipe, generate, pixels=ex.to_uint8, fullgraph=False,
                      record=dict(guidance_scale=args.guidance, cfg_trunc_ratio=args.cfg_trunc_ratio, size=args.size))  # fmt: skip


def main(argv=None) -> int:
    p = ex.parser(__doc__, model=MODEL, steps=50, out="lumina2_out",
                  prompt="A serene photograph of a red fox curled up in fresh snow at dawn, soft golden light")  # fmt: skip
    p.add_argument("--size", type=int, default=1024, help="height = width (default 1024)")
    p.add_argument("--guidance", type=float, default=4.0, help="guidance_scale (default 4.0)")
    p.add_argument("--cfg-trunc-ratio", type=float, default=1.0, help="diffusers' cfg_trunc_ratio (default 1.0)")
    args = ex.finish(p.parse_args(argv))
    return ex.run(load(args), args)


if __name__ == "__main__":
    raise SystemExit(main())
