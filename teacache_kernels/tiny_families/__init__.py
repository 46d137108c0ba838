"""Tiny random-weight pipelines of the built-in families (FLUX: tiny_models.py), for tests and `--tiny`.

Real diffusers transformer, VAE, scheduler and pipeline classes from small configs; text encoders are left
out and the pipelines are called with prompt embeddings. `TINY[name]` gives, per family:
  pipeline(seed) -> the pipeline;  generate(pipe, steps, cfg=True, **kw) -> final latents;
  transformer_call(seed) -> keyword arguments of one direct transformer call (compile / explain tests).
Random weights exercise the mechanics (schedules, state, compile); they say nothing about quality.
The seed families' builders are here; each later family has its module (ltx_video.py, hunyuan_video.py, ...).
"""

from __future__ import annotations

import torch

from . import hidream, hunyuan_video, ltx_video, wan
from .common import TinyFamily, _forked, _mask, _randn

# -- Qwen-Image -----------------------------------------------------------------------------------------------


def qwen_image_transformer(seed: int = 0, **config):
    from diffusers import QwenImageTransformer2DModel

    args = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
                joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))  # fmt: skip
    return _forked(seed, lambda: QwenImageTransformer2DModel(**{**args, **config}).eval())


def qwen_image_pipeline(seed: int = 0, pipeline_class=None):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    z = 4
    vae = _forked(seed + 1, lambda: AutoencoderKLQwenImage(
        base_dim=6 * z, z_dim=z, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * z, latents_std=[1.0] * z).eval())  # fmt: skip
    cls = pipeline_class or QwenImagePipeline
    return cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
               transformer=qwen_image_transformer(seed), **({"processor": None} if "Edit" in cls.__name__ else {}))  # fmt: skip


def qwen_image_generate(pipe, steps: int, cfg: bool = True, **kw):
    prompt = dict(prompt_embeds=_randn(1, 7, 16, seed=2), prompt_embeds_mask=_mask(7, 5), true_cfg_scale=1.0)
    if cfg:
        prompt.update(negative_prompt_embeds=_randn(1, 5, 16, seed=3), negative_prompt_embeds_mask=_mask(5, 5),
                      true_cfg_scale=4.0)  # fmt: skip
    return pipe(**prompt, height=32, width=32, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kw).images  # fmt: skip


def qwen_image_call(seed: int = 1) -> dict:
    return dict(hidden_states=_randn(1, 16, 16, seed=seed), encoder_hidden_states=_randn(1, 7, 16, seed=seed + 1),
                encoder_hidden_states_mask=_mask(7, 5), timestep=torch.full((1,), 0.7), img_shapes=[[(1, 4, 4)]],
                return_dict=False)  # fmt: skip


# -- Lumina-Image-2.0 -------------------------------------------------------------------------------------------


def lumina2_transformer(seed: int = 0, **config):
    from diffusers import Lumina2Transformer2DModel

    args = dict(sample_size=4, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
                num_attention_heads=4, num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 2, 2), axes_lens=(256, 64, 64),
                cap_feat_dim=16)  # fmt: skip
    return _forked(seed, lambda: Lumina2Transformer2DModel(**{**args, **config}).eval())


def lumina2_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline

    vae = _forked(seed + 1, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611, shift_factor=0.1159).eval())  # fmt: skip
    return Lumina2Pipeline(transformer=lumina2_transformer(seed), scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0),
                           vae=vae, text_encoder=None, tokenizer=None)  # fmt: skip


def lumina2_generate(pipe, steps: int, cfg: bool = True, **kw):
    # Prompt and negative differ in length (5 vs 1 valid tokens), as the real pipeline's do: the two branches
    # run at joint sequence lengths 21 and 17.
    return pipe(prompt_embeds=_randn(1, 8, 16, seed=2), prompt_attention_mask=_mask(8, 5),
                negative_prompt_embeds=_randn(1, 8, 16, seed=3), negative_prompt_attention_mask=_mask(8, 1),
                guidance_scale=4.0 if cfg else 1.0, height=64, width=64, num_inference_steps=steps,
                output_type="latent", generator=torch.Generator().manual_seed(0), **kw).images  # fmt: skip


def lumina2_call(seed: int = 1, valid_tokens: int = 5) -> dict:
    return dict(hidden_states=_randn(1, 4, 8, 8, seed=seed), timestep=torch.full((1,), 0.3),
                encoder_hidden_states=_randn(1, 8, 16, seed=seed + 1), encoder_attention_mask=_mask(8, valid_tokens),
                return_dict=False)  # fmt: skip


# -- CogVideoX ------------------------------------------------------------------------------------------------

# Config fields that tell the variants apart (diffusers' conversion script and the released configs).
COGVIDEOX_VARIANTS = {
    "2b": dict(),
    "5b": dict(use_rotary_positional_embeddings=True),
    "5b-i2v": dict(use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True, in_channels=8),
    "1.5-5b": dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False),
    "1.5-5b-i2v": dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False, ofs_embed_dim=8, in_channels=8),
}


def cogvideox_transformer(seed: int = 0, variant: str = "5b", **config):
    from diffusers import CogVideoXTransformer3DModel

    args = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
                text_embed_dim=32, num_layers=2, sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
                temporal_compression_ratio=4, max_text_seq_length=8)  # fmt: skip
    return _forked(seed, lambda: CogVideoXTransformer3DModel(**{**args, **COGVIDEOX_VARIANTS[variant], **config}).eval())


def cogvideox_pipeline(seed: int = 0):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    vae = _forked(seed + 1, lambda: AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4).eval())  # fmt: skip
    scheduler = CogVideoXDDIMScheduler(
        snr_shift_scale=1.0, beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False,
        num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
        timestep_spacing="trailing")  # fmt: skip
    return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=cogvideox_transformer(seed), scheduler=scheduler)


def cogvideox_generate(pipe, steps: int, cfg: bool = True, **kw):
    return pipe(prompt_embeds=_randn(1, 8, 32, seed=2), negative_prompt_embeds=_randn(1, 8, 32, seed=3),
                guidance_scale=6.0 if cfg else 1.0, height=16, width=16, num_frames=9, max_sequence_length=8,
                num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0), **kw).frames  # fmt: skip


def cogvideox_call(seed: int = 1) -> dict:
    # Batch 2: the pipelines batch uncond and cond into one call.
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    cos, sin = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (2, 2)), grid_size=(2, 2), temporal_size=3)
    return dict(hidden_states=_randn(2, 3, 4, 4, 4, seed=seed), encoder_hidden_states=_randn(2, 8, 32, seed=seed + 1),
                timestep=torch.tensor([700, 700]), image_rotary_emb=(cos, sin), return_dict=False)  # fmt: skip


# -- Mochi ----------------------------------------------------------------------------------------------------


def mochi_transformer(seed: int = 0, **config):
    from diffusers import MochiTransformer3DModel

    args = dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
                in_channels=12, text_embed_dim=16, time_embed_dim=4, max_sequence_length=16)  # fmt: skip
    return _forked(seed, lambda: MochiTransformer3DModel(**{**args, **config}).eval())


def mochi_pipeline(seed: int = 0):
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline

    vae = _forked(seed + 1, lambda: AutoencoderKLMochi(
        latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1)).eval())  # fmt: skip
    return MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                         transformer=mochi_transformer(seed))  # fmt: skip


def mochi_generate(pipe, steps: int, cfg: bool = True, **kw):
    return pipe(prompt_embeds=_randn(1, 16, 16, seed=2), prompt_attention_mask=_mask(16, 12, torch.bool),
                negative_prompt_embeds=_randn(1, 16, 16, seed=3), negative_prompt_attention_mask=_mask(16, 1, torch.bool),
                guidance_scale=4.5 if cfg else 1.0, height=32, width=32, num_frames=7, num_inference_steps=steps,
                output_type="latent", generator=torch.Generator().manual_seed(0), **kw).frames  # fmt: skip


def mochi_call(seed: int = 1) -> dict:
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0, 10:] = False
    return dict(hidden_states=_randn(2, 12, 2, 8, 8, seed=seed), encoder_hidden_states=_randn(2, 16, 16, seed=seed + 1),
                timestep=torch.tensor([900.0, 900.0]), encoder_attention_mask=mask, return_dict=False)  # fmt: skip


TINY: dict[str, TinyFamily] = {
    f.name: f
    for f in (
        TinyFamily("qwen-image", qwen_image_transformer, qwen_image_pipeline, qwen_image_generate, qwen_image_call, ("cond", "uncond")),
        TinyFamily("lumina2", lumina2_transformer, lumina2_pipeline, lumina2_generate, lumina2_call, ("seq21", "seq17")),
        TinyFamily("cogvideox", cogvideox_transformer, cogvideox_pipeline, cogvideox_generate, cogvideox_call, ("cond_uncond",)),
        TinyFamily("mochi", mochi_transformer, mochi_pipeline, mochi_generate, mochi_call, ("cond_uncond",)),
        TinyFamily("ltx-video", ltx_video.transformer, ltx_video.pipeline, ltx_video.generate, ltx_video.transformer_call, ("cond_uncond",)),
        TinyFamily("hunyuan-video", hunyuan_video.hunyuan_video_transformer, hunyuan_video.hunyuan_video_pipeline,
                   hunyuan_video.hunyuan_video_generate, hunyuan_video.hunyuan_video_call, ("cond", "uncond")),  # fmt: skip
        TinyFamily("hidream", hidream.transformer, hidream.pipeline, hidream.generate, hidream.transformer_call, ("default",)),
        # No published set fits the tiny Wan (hidden size 24): enable it with coefficients= (tests/test_wan.py).
        TinyFamily("wan", wan.wan_transformer, wan.wan_pipeline, wan.wan_generate, wan.wan_call, ("cond", "uncond")),
    )
}
# Cosmos (tiny_families/cosmos.py) is not here: diffusers' Cosmos pipelines are refused (models/cosmos.py).
