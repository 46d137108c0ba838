"""HiDream-I1 (Full, Dev or Fast) with TeaCache decided on the device.

On a GPU, with the checkpoints available (Hugging Face cache or local directories; the Llama text encoder is gated):
    python python/hidream.py --prompt 'A cat holding a sign that says "Hi-Dreams.ai".' --compare
    python python/hidream.py --model HiDream-ai/HiDream-I1-Dev --compare
Anywhere, as a smoke test (a tiny random-weight HiDreamImagePipeline on the CPU; the images are noise):
    python python/hidream.py --tiny

HiDreamImagePipeline in bf16, with Meta-Llama-3.1-8B-Instruct as its fourth text encoder (as the authors' script
loads it). Per model, as they are run: Full 50 steps, guidance 5 (uncond and cond batched into one call: one
TeaCache state), coefficients hidream-full (the authors' TeaCache4HiDream-I1: first 10% of the steps computed,
not the last; threshold 0.3: ~2x on an A100 in their measurements; 0.17/0.25/0.45 -> 1.5/1.7/2.6x); Dev 28 steps
and Fast 16, guidance 0, coefficients hidream-dev / hidream-fast (ComfyUI-TeaCache's; thresholds 1.0 / 1.5, first
step computed). The set follows from --model unless --coefficients names one (the transformer config cannot tell
the three apart). --compare also generates without TeaCache (same seed) and reports the speedup and PSNR.

Compiling: the released models' MoE feed-forwards (diffusers' `moe_infer`) read their expert counts on the host,
which torch.compile(fullgraph=True) cannot trace, and TeaCache's span runs the blocks inside torch.cond, where no
graph break may fall: the real models run eagerly (compile is off and --compile refused). With --tiny --compile
the tiny pipeline is built with plain feed-forwards (num_routed_experts=0), which compiles whole.

What has been run: only --tiny, on the CPU (eager, and compiled in the slow test of tests/test_examples.py).
The real checkpoints have not been run with this script (it was written without a GPU or downloads): the
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

MODEL = "HiDream-ai/HiDream-I1-Full"
LLAMA = "meta-llama/Meta-Llama-3.1-8B-Instruct"
# Per model (matched in --model): coefficient set, steps, guidance_scale, as the authors and HiDream run them.
VARIANTS = {"full": ("hidream-full", 50, 5.0), "dev": ("hidream-dev", 28, 0.0), "fast": ("hidream-fast", 16, 0.0)}


def variant(model: str) -> str:
    name = Path(model).name.lower()
    return next((v for v in ("dev", "fast") if name.endswith(v) or f"-{v}" in name), "full")


def decode_tiny(pipe, latents) -> np.ndarray:
    """Latents -> uint8 image, as HiDreamImagePipeline decodes them."""
    config = pipe.vae.config
    with torch.no_grad():
        image = pipe.vae.decode(latents / config.scaling_factor + config.shift_factor, return_dict=False)[0]
    return ex.to_uint8(pipe.image_processor.postprocess(image, output_type="pil")[0])


def load(args) -> ex.Example:
    if args.tiny:
        from teacache_kernels.tiny_families import hidream

        # Plain feed-forwards when compiling: diffusers' MoE inference cannot be compiled with fullgraph=True.
        pipe = hidream.pipeline(args.seed, **({"experts": 0} if args.compile else {}))
        return ex.Example("tiny random HiDreamImagePipeline", pipe, lambda steps, seed: hidream.generate(pipe, steps),
                          pixels=lambda latents: decode_tiny(pipe, latents), latents=lambda latents: latents)  # fmt: skip

    from diffusers import HiDreamImagePipeline
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer_4 = PreTrainedTokenizerFast.from_pretrained(args.llama)
    text_encoder_4 = LlamaForCausalLM.from_pretrained(args.llama, output_hidden_states=True, output_attentions=True,
                                                      torch_dtype=torch.bfloat16)  # fmt: skip
    pipe = HiDreamImagePipeline.from_pretrained(args.model, tokenizer_4=tokenizer_4, text_encoder_4=text_encoder_4,
                                                torch_dtype=torch.bfloat16).to(args.device)  # fmt: skip
    inputs = dict(prompt=args.prompt, height=args.size, width=args.size, guidance_scale=args.guidance)

    def generate(steps, seed):
        return pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)).images[0]

    record = dict(variant=args.variant, guidance_scale=args.guidance, size=args.size)
    return ex.Example(args.model, pipe, generate, pixels=ex.to_uint8, record=record)


def main(argv=None) -> int:
    p = ex.parser(__doc__, model=MODEL, steps=50, out="hidream_out", prompt='A cat holding a sign that says "Hi-Dreams.ai".',
                  model_help=f"HiDream-I1 Full, Dev or Fast: Hugging Face id or local folder (default: {MODEL})")  # fmt: skip
    p.add_argument("--llama", default=LLAMA, help=f"the Llama text encoder (default: {LLAMA})")
    p.add_argument("--size", type=int, default=1024, help="height = width (default 1024)")
    p.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: 5 for Full, 0 for Dev and Fast)")
    args = p.parse_args(argv)
    if not args.tiny:
        if args.compile:
            p.error("HiDream-I1's MoE feed-forwards cannot be compiled with TeaCache (see --help); run without --compile")
        args.compile = False
        args.variant = variant(args.model)
        coefficients, steps, guidance = VARIANTS[args.variant]
        args.coefficients = args.coefficients or coefficients
        args.default_steps = steps
        args.guidance = guidance if args.guidance is None else args.guidance
    args = ex.finish(args)
    return ex.run(load(args), args)


if __name__ == "__main__":
    raise SystemExit(main())
