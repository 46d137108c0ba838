"""Qwen-Image (and Qwen-Image-Edit) with TeaCache decided on the device, the transformer compiled with fullgraph=True.

On a GPU, with the checkpoint available (Hugging Face cache or a local directory):
    python python/qwen_image.py --prompt "a coffee shop sign that says Qwen" --steps 50 --compare
    python python/qwen_image.py --edit photo.png --prompt "make the sky purple" --compare   # Qwen-Image-Edit
Anywhere, as a smoke test (a tiny random-weight QwenImagePipeline on the CPU; the images are noise):
    python python/qwen_image.py --tiny            (add --edit IMAGE for the tiny QwenImageEditPipeline; its
                                                   condition image is shrunk to ~32x32 there, not ~1 MP)

QwenImagePipeline (Qwen/Qwen-Image) or, with --edit, QwenImageEditPipeline (Qwen/Qwen-Image-Edit), in bf16.
TeaCache keeps one state per CFG context ("cond", "uncond": CFG needs a negative prompt and true_cfg_scale > 1;
the default negative prompt is " "). Default threshold: the `qwen-image` set's, 0.2. --compare also generates
without TeaCache (same seed, same compile mode) and reports the speedup and the PSNR of the TeaCache image
against it. Images and run.json go to --out.

What has been run: only --tiny, on the CPU (eager, and compiled in the slow test of tests/test_examples.py).
The real checkpoints have not been run with this script (it was written without a GPU or downloads): the
real-model path follows diffusers' documented usage of these pipelines, but its speed and quality are unmeasured.
With --tiny the pipeline returns latents; the script decodes them with the tiny VAE as the pipeline would, and
reports PSNR on the decoded image and on the latents.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _example as ex  # noqa: E402

MODEL, EDIT_MODEL = "Qwen/Qwen-Image", "Qwen/Qwen-Image-Edit"


def decode_tiny(pipe, latents) -> np.ndarray:
    """Packed latents (batch, tokens, channels) of a square image -> uint8 image, as the pipeline decodes them."""
    side = math.isqrt(latents.shape[1]) * 2 * pipe.vae_scale_factor
    with torch.no_grad():
        latents = pipe._unpack_latents(latents, side, side, pipe.vae_scale_factor).to(pipe.vae.dtype)
        config = pipe.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents)
        image = pipe.vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
    return ex.to_uint8(pipe.image_processor.postprocess(image, output_type="pil")[0])


def shrink_edit_condition_image(area: int = 32 * 32) -> None:
    """--tiny --edit: resize the condition image to ~`area` pixels instead of diffusers' ~1 MP.

    QwenImageEditPipeline resizes its input image to about 1024x1024 whatever the output size; on the tiny model
    that is 16k image tokens more per call (minutes on the CPU). Patched in this process only, for --tiny.
    """
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit

    original = edit.calculate_dimensions

    def small(target_area, ratio):
        width, height, rest = original(area, ratio)
        return max(width, 32), max(height, 32), rest

    edit.calculate_dimensions = small


def load(args) -> ex.Example:
    from diffusers import QwenImageEditPipeline, QwenImagePipeline
    from diffusers.utils import load_image

    cls = QwenImageEditPipeline if args.edit else QwenImagePipeline
    extra = dict(image=load_image(args.edit).convert("RGB")) if args.edit else {}
    if args.tiny:
        from teacache_kernels.tiny_families import TINY, qwen_image_pipeline

        fam = TINY["qwen-image"]
        pipe = qwen_image_pipeline(args.seed, pipeline_class=cls)
        if args.edit:
            shrink_edit_condition_image()
        return ex.Example(f"tiny random {cls.__name__}", pipe, lambda steps, seed: fam.generate(pipe, steps, **extra),
                          pixels=lambda latents: decode_tiny(pipe, latents), latents=lambda latents: latents)  # fmt: skip

    model = args.model or (EDIT_MODEL if args.edit else MODEL)
    pipe = cls.from_pretrained(model, torch_dtype=torch.bfloat16).to(args.device)
    inputs = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, true_cfg_scale=args.cfg, **extra)
    size = args.size or (None if args.edit else 1328)  # Edit: the input image's aspect ratio at ~1 MP
    if size:
        inputs.update(height=size, width=size)

    def generate(steps, seed):
        return pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)).images[0]

    record = dict(true_cfg_scale=args.cfg, size=size, edit=args.edit)
    return ex.Example(model, pipe, generate, pixels=ex.to_uint8, record=record)


def main(argv=None) -> int:
    p = ex.parser(__doc__, model=None, model_help=f"Hugging Face id or local directory (default: {MODEL}; {EDIT_MODEL} "
                  "with --edit)", steps=50, prompt="A coffee shop entrance with a chalkboard sign reading "
                  "'Qwen Coffee $2 per cup', a neon light beside it displaying 'TeaCache'", out="qwen_image_out")  # fmt: skip
    p.add_argument("--edit", metavar="IMAGE", help=f"edit this image (QwenImageEditPipeline; model {EDIT_MODEL})")
    p.add_argument("--negative-prompt", default=" ", help="CFG needs one (default: ' ', as Qwen's examples)")
    p.add_argument("--cfg", type=float, default=4.0, help="true_cfg_scale (default 4.0)")
    p.add_argument("--size", type=int, default=None, help="height = width (default 1328; Edit: from the input image)")
    args = ex.finish(p.parse_args(argv))
    return ex.run(load(args), args)


if __name__ == "__main__":
    raise SystemExit(main())
