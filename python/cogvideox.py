"""CogVideoX (2b, 5b, 5b-I2V, 1.5-5B, 1.5-5B-I2V) with TeaCache decided on the device, the transformer compiled
with fullgraph=True.

On a GPU, with the checkpoint available (Hugging Face cache or a local directory):
    python python/cogvideox.py --prompt "a panda playing guitar in a bamboo forest" --compare     # CogVideoX-5b
    python python/cogvideox.py --model 1.5-5b --steps 50 --compare
    python python/cogvideox.py --image first_frame.png --prompt "..." --compare    # 5b-I2V (or --model 1.5-5b-i2v)
Anywhere, as a smoke test (a tiny random-weight CogVideoXPipeline on the CPU; the videos are noise):
    python python/cogvideox.py --tiny            (--model and --image pick the tiny variant and pipeline too)

CogVideoXPipeline, or CogVideoXImageToVideoPipeline with --image, in bf16, with the VAE's tiling and slicing on.
--model takes a variant (2b, 5b, 5b-i2v, 1.5-5b, 1.5-5b-i2v; default 5b, or 5b-i2v with --image) or a Hugging
Face id / local directory. TeaCache picks the coefficient set from the transformer's config (cogvideox-2b,
cogvideox-5b, cogvideox1.5-5b, cogvideox1.5-5b-i2v) and keeps one state: the pipeline batches cond and uncond
into one call. --compare also generates without TeaCache (same seed, same compile mode) and reports the speedup
and the PSNR of the TeaCache frames against the uncached ones. The video goes to --out as MP4 through
diffusers.utils.export_to_video when imageio (with imageio-ffmpeg) or OpenCV is installed, else as one PNG of
the frames side by side; run.json next to it.

What has been run: only --tiny, on the CPU (eager, with the tiny layout of every variant; compiled, the 5b
layout, in the slow test of tests/test_examples.py). The real checkpoints have not been run with this script (it
was written without a GPU or downloads): the real-model path follows diffusers' documented usage, but its speed
and quality are unmeasured. With --tiny the pipeline returns latents; the script decodes them with the tiny VAE as
the pipeline would (dropping the padding frames CogVideoX 1.5 adds), and reports PSNR on the decoded frames and on
the latents.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _example as ex  # noqa: E402

# variant: (checkpoint, image-to-video, height, width, frames, fps): the sizes and frame rates of the model cards.
VARIANTS = {
    "2b": ("THUDM/CogVideoX-2b", False, 480, 720, 49, 8),
    "5b": ("THUDM/CogVideoX-5b", False, 480, 720, 49, 8),
    "5b-i2v": ("THUDM/CogVideoX-5b-I2V", True, 480, 720, 49, 8),
    "1.5-5b": ("THUDM/CogVideoX1.5-5B", False, 768, 1360, 81, 16),
    "1.5-5b-i2v": ("THUDM/CogVideoX1.5-5B-I2V", True, 768, 1360, 81, 16),
}
TINY_FRAMES = 9  # the num_frames teacache_kernels.tiny_families.cogvideox_generate asks for


def variant_of(model: str | None, image: str | None) -> tuple[str, str]:
    """(variant, checkpoint) for --model: a variant name, one of the variants' checkpoints, or another id / path."""
    if model is None:
        model = "5b-i2v" if image else "5b"
    if model.lower() in VARIANTS:
        return model.lower(), VARIANTS[model.lower()][0]
    for name, (checkpoint, *_) in VARIANTS.items():
        if model.rstrip("/").lower().endswith(checkpoint.split("/")[1].lower()):
            return name, model
    # Another checkpoint (a fine-tune, a local copy under another name): sizes from its name and --image.
    base = "1.5-5b" if "1.5" in model else "5b"
    return base + ("-i2v" if image else ""), model


def decode_tiny(pipe, latents) -> np.ndarray:
    """Latents (batch, frames, channels, h, w) -> uint8 frames, as the pipeline decodes them."""
    padding = latents.shape[1] - ((TINY_FRAMES - 1) // pipe.vae_scale_factor_temporal + 1)  # CogVideoX 1.5
    with torch.no_grad():
        video = pipe.decode_latents(latents[:, padding:])
    return ex.to_uint8(pipe.video_processor.postprocess_video(video=video, output_type="pil")[0])


def load(args) -> ex.Example:
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline
    from diffusers.utils import load_image

    variant, model = variant_of(args.model, args.image)
    _, i2v, height, width, frames, fps = VARIANTS[variant]
    cls = CogVideoXImageToVideoPipeline if i2v else CogVideoXPipeline
    extra = dict(image=load_image(args.image).convert("RGB")) if args.image else {}
    record = dict(variant=variant)
    if args.tiny:
        from teacache_kernels.tiny_families import TINY, cogvideox_pipeline, cogvideox_transformer

        fam = TINY["cogvideox"]
        components = cogvideox_pipeline(args.seed).components  # the 5b layout; the variant's transformer below
        pipe = cls(**{**components, "transformer": cogvideox_transformer(args.seed, variant)})
        generate = lambda steps, seed: fam.generate(pipe, steps, **extra)  # noqa: E731
        return ex.Example(f"tiny random CogVideoX {variant}", pipe, generate,
                          pixels=lambda latents: decode_tiny(pipe, latents), latents=lambda latents: latents,
                          video=True, fps=fps, record=record)  # fmt: skip

    pipe = cls.from_pretrained(model, torch_dtype=torch.bfloat16).to(args.device)
    pipe.vae.enable_tiling()
    pipe.vae.enable_slicing()
    dynamic_cfg = variant != "2b" if args.dynamic_cfg is None else args.dynamic_cfg
    inputs = dict(prompt=args.prompt, height=args.height or height, width=args.width or width,
                  num_frames=args.frames or frames, guidance_scale=args.guidance, use_dynamic_cfg=dynamic_cfg, **extra)  # fmt: skip
    record.update({k: v for k, v in inputs.items() if k not in ("prompt", "image")})

    def generate(steps, seed):
        return pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)).frames[0]

    return ex.Example(model, pipe, generate, pixels=ex.to_uint8, video=True, fps=fps, record=record)


def main(argv=None) -> int:
    p = ex.parser(__doc__, model=None, steps=50, out="cogvideox_out",
                  model_help=f"a variant ({', '.join(VARIANTS)}; default 5b, or 5b-i2v with --image), or a Hugging "
                  "Face id / local directory",
                  prompt="A panda, dressed in a small red jacket and a tiny hat, sits on a wooden stool in a serene "
                  "bamboo forest, strumming a miniature acoustic guitar")  # fmt: skip
    p.add_argument("--image", help="first frame: image-to-video (CogVideoXImageToVideoPipeline, an -i2v model)")
    p.add_argument("--height", type=int, help="default: the variant's (480; 768 for 1.5)")
    p.add_argument("--width", type=int, help="default: the variant's (720; 1360 for 1.5)")
    p.add_argument("--frames", type=int, help="num_frames (default: the variant's, 49; 81 for 1.5)")
    p.add_argument("--guidance", type=float, default=6.0, help="guidance_scale (default 6.0)")
    p.add_argument("--dynamic-cfg", action=argparse.BooleanOptionalAction, default=None,
                   help="use_dynamic_cfg (default: on, off for 2b, as the model cards)")  # fmt: skip
    args = ex.finish(p.parse_args(argv))
    variant, model = variant_of(args.model, args.image)
    if VARIANTS[variant][1] != bool(args.image):
        p.error(f"{model} is an image-to-video model: give --image" if args.image is None else
                f"--image needs an image-to-video model ({', '.join(v for v in VARIANTS if v.endswith('i2v'))}), "
                f"not {model}")  # fmt: skip
    return ex.run(load(args), args)


if __name__ == "__main__":
    raise SystemExit(main())
