"""Tiny random-weight Wan models and pipelines (diffusers WanTransformer3DModel, WanPipeline, WanImageToVideoPipeline).

Configs follow diffusers' own tests (tests/pipelines/wan/test_wan*.py): 2 heads of 12 channels (the rotary
embedding splits a head into t/h/w parts of 4), 2 layers, a Wan VAE with `base_dim=3`. Two variants:
  "t2v"  Wan2.1 T2V (and each expert of Wan2.2 A14B): latents in, text cross-attention;
  "i2v"  Wan2.1 I2V-14B: the latents concatenated with the 4 mask channels and the encoded first frame
         (in_channels = 2 * z + 4), CLIP image tokens in front of the text, read through the extra k/v
         projections (`added_kv_proj_dim`). diffusers' processor takes the last 512 context tokens as text,
         so the I2V prompt embeddings are 512 long, as the real pipeline pads them.
The pipelines have no text encoder and are called with prompt embeddings; the I2V pipeline has a tiny
CLIPVisionModelWithProjection built from a config (as diffusers' test does: nothing is downloaded).
`two_stage=True` gives a Wan2.2-style pipeline: `transformer` (high noise) and `transformer_2` (low noise,
another seed) switching at `boundary_ratio * 1000`.

One departure from plain random weights, for the schedules' sake (as in ltx_video.py): the time embedder's
last weight is scaled by `SLOW`. With diffusers' default init the TeaCache signals move far more per step
than a trained Wan's (over 10 steps: `temb` 50-95% a call, `timestep_proj` 18-33%), so the published
polynomials are evaluated far outside their fitted range (huge, or negative) and give degenerate schedules
(all computed, or all reused) at any threshold; scaled, they move 7-14% and 2-4% a call, and the published sets at their README thresholds give
mixed schedules. Still a random model: mechanics, not quality.
"""

from __future__ import annotations

import torch

from .common import _forked, _randn

Z = 4  # latent channels of the tiny VAE (the real one has 16)
TEXT_DIM = 16
IMAGE_DIM = 8  # CLIP hidden size of the tiny image encoder (the real one: 1280)
SLOW = 0.1  # scale of the time embedder's last weight (see the module docstring)

WAN_VARIANTS = {
    "t2v": dict(in_channels=Z),
    # Wan2.1-I2V-14B: image_dim=1280, added_kv_proj_dim=inner_dim (5120); here inner_dim = 2 * 12.
    "i2v": dict(in_channels=2 * Z + 4, image_dim=IMAGE_DIM, added_kv_proj_dim=24),
}


def wan_transformer(seed: int = 0, variant: str = "t2v", **config):
    from diffusers import WanTransformer3DModel

    args = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, out_channels=Z, text_dim=TEXT_DIM,
                freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                rope_max_seq_len=32)  # fmt: skip

    def build():
        model = WanTransformer3DModel(**{**args, **WAN_VARIANTS[variant], **config}).eval()
        with torch.no_grad():  # see SLOW
            model.condition_embedder.time_embedder.linear_2.weight.mul_(SLOW)
        return model

    return _forked(seed, build)


def _vae(seed: int):
    from diffusers import AutoencoderKLWan

    return _forked(seed, lambda: AutoencoderKLWan(
        base_dim=3, z_dim=Z, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * Z, latents_std=[1.0] * Z).eval())  # fmt: skip


def _scheduler():
    # What the released Wan checkpoints ship (flow_shift 3.0 is the 480p setting).
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def wan_pipeline(seed: int = 0, two_stage: bool = False, boundary_ratio: float = 0.875):
    """`boundary_ratio` 0.875 is Wan2.2-T2V-A14B's; with this scheduler it splits 8 steps 3 high-noise + 5 low-noise
    (0.5 would give 7 + 1)."""
    from diffusers import WanPipeline

    stage2 = dict(transformer_2=wan_transformer(seed + 7), boundary_ratio=boundary_ratio) if two_stage else {}
    return WanPipeline(tokenizer=None, text_encoder=None, vae=_vae(seed + 1), scheduler=_scheduler(),
                       transformer=wan_transformer(seed), **stage2)  # fmt: skip


def wan_i2v_pipeline(seed: int = 0):
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    try:  # transformers 5: the PIL backend, which needs no torchvision (CLIPImageProcessor warns and falls back to it)
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    clip = CLIPVisionConfig(hidden_size=IMAGE_DIM, projection_dim=IMAGE_DIM, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, intermediate_size=16, patch_size=8)  # fmt: skip
    image_encoder = _forked(seed + 2, lambda: CLIPVisionModelWithProjection(clip).eval())  # 4*4 patches + 1 = 17 tokens
    return WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=_vae(seed + 1), scheduler=_scheduler(),
        transformer=wan_transformer(seed, "i2v"), image_encoder=image_encoder,
        image_processor=CLIPImageProcessor(crop_size=32, size=32))  # fmt: skip


def _prompt(length: int, valid: int, seed: int) -> torch.Tensor:
    # Wan's text encoding: the valid tokens, then zeros up to the padded length.
    e = _randn(1, length, TEXT_DIM, seed=seed)
    e[:, valid:] = 0
    return e


def wan_generate(pipe, steps: int, cfg: bool = True, **kw):
    """Final latents of a 9-frame 32x32 generation (latents 4 x 3 x 4 x 4: 12 tokens per call)."""
    from diffusers import WanImageToVideoPipeline

    i2v = isinstance(pipe, WanImageToVideoPipeline)
    length = 512 if i2v else 8  # the I2V processor reads the last 512 context tokens as the text
    extra = {}
    if i2v:
        from PIL import Image

        pixels = (torch.arange(32 * 32 * 3).reshape(32, 32, 3) * 37 % 256).to(torch.uint8)  # a fixed pattern
        extra["image"] = Image.fromarray(pixels.numpy())
    return pipe(prompt_embeds=_prompt(length, 5, seed=2), negative_prompt_embeds=_prompt(length, 2, seed=3),
                guidance_scale=5.0 if cfg else 1.0, height=32, width=32, num_frames=9, num_inference_steps=steps,
                output_type="latent", generator=torch.Generator().manual_seed(0), **extra, **kw).frames  # fmt: skip


def wan_call(seed: int = 1, variant: str = "t2v") -> dict:
    # Batch 1: the Wan pipelines call cond and uncond separately.
    call = dict(hidden_states=_randn(1, WAN_VARIANTS[variant]["in_channels"], 3, 4, 4, seed=seed),
                encoder_hidden_states=_prompt(512 if variant == "i2v" else 8, 5, seed=seed + 1),
                timestep=torch.tensor([700.0]), return_dict=False)  # fmt: skip
    if variant == "i2v":
        call["encoder_hidden_states_image"] = _randn(1, 17, IMAGE_DIM, seed=seed + 2)
    return call
