"""Tiny random-weight HunyuanVideo models and pipelines: HunyuanVideo, HunyuanVideo 1.5 and FramePack.

Configs follow diffusers' own tests (tests/pipelines/hunyuan_video*/): 2 heads of 8 channels, 2 double-stream
and 2 single-stream blocks, patch size 1 (FramePack: 2), a tiny VAE. The pipelines have no text encoders and
are called with prompt embeddings; FramePack's pipeline has a tiny SiglipVisionModel built from a config
(nothing is downloaded).

  HunyuanVideoPipeline          guidance-distilled (`guidance`), true CFG with a negative prompt and
                                `true_cfg_scale > 1`: calls in cache_context("cond") and ("uncond");
  HunyuanVideo15Pipeline        CFG through its guider: cache_context("pred_cond") and ("pred_uncond");
  HunyuanVideoFramepackPipeline image to video in sections, each a full denoising loop over the window's
                                latents with the history latents packed in front; no cache_context.
"""

from __future__ import annotations

import torch

from .common import _forked, _mask, _randn

TEXT_DIM, POOLED_DIM = 16, 8
LATENT = (4, 3, 4, 4)  # channels, frames, height, width of the direct-call latents


# -- HunyuanVideo ---------------------------------------------------------------------------------------------


def hunyuan_video_transformer(seed: int = 0, **config):
    from diffusers import HunyuanVideoTransformer3DModel

    args = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
                text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, rope_axes_dim=(2, 2, 4))  # fmt: skip
    return _forked(seed, lambda: HunyuanVideoTransformer3DModel(**{**args, **config}).eval())


def _vae(seed: int):
    from diffusers import AutoencoderKLHunyuanVideo

    return _forked(seed, lambda: AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4).eval())  # fmt: skip


def hunyuan_video_pipeline(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    return HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=hunyuan_video_transformer(seed),
                                vae=_vae(seed + 1), scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                text_encoder_2=None, tokenizer_2=None)  # fmt: skip


def conditioning(seed: int) -> dict:
    """One prompt's transformer inputs (seed 2: the prompt, 3: the negative prompt, with fewer valid tokens)."""
    valid = 5 if seed == 2 else 3
    return dict(encoder_hidden_states=_randn(1, 7, TEXT_DIM, seed=seed), encoder_attention_mask=_mask(7, valid),
                pooled_projections=_randn(1, POOLED_DIM, seed=seed + 10), guidance=torch.tensor([6000.0]))  # fmt: skip


def hunyuan_video_generate(pipe, steps: int, cfg: bool = True, **kw):
    """cfg: true CFG (a negative prompt, true_cfg_scale 4); else the embedded guidance alone (one call a step)."""
    cond, uncond = conditioning(2), conditioning(3)
    prompt = dict(prompt_embeds=cond["encoder_hidden_states"], prompt_attention_mask=cond["encoder_attention_mask"],
                  pooled_prompt_embeds=cond["pooled_projections"])  # fmt: skip
    if cfg:
        prompt.update(negative_prompt_embeds=uncond["encoder_hidden_states"], true_cfg_scale=4.0,
                      negative_prompt_attention_mask=uncond["encoder_attention_mask"],
                      negative_pooled_prompt_embeds=uncond["pooled_projections"])  # fmt: skip
    return pipe(**prompt, height=32, width=32, num_frames=9, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kw).frames  # fmt: skip


def hunyuan_video_call(seed: int = 1) -> dict:
    return dict(hidden_states=_randn(1, *LATENT, seed=seed), timestep=torch.tensor([700.0]), return_dict=False,
                **conditioning(2))  # fmt: skip


# -- HunyuanVideo 1.5 -----------------------------------------------------------------------------------------

TEXT_2_DIM, IMAGE_EMBED_DIM = 32, 12


def hunyuan_video15_transformer(seed: int = 0, **config):
    from diffusers import HunyuanVideo15Transformer3DModel

    # in_channels: the latents, the condition latents and their mask, concatenated by the pipeline.
    args = dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=TEXT_DIM,
                text_embed_2_dim=TEXT_2_DIM, image_embed_dim=IMAGE_EMBED_DIM, rope_axes_dim=(2, 2, 4),
                target_size=16, task_type="t2v")  # fmt: skip
    return _forked(seed, lambda: HunyuanVideo15Transformer3DModel(**{**args, **config}).eval())


def hunyuan_video15_pipeline(seed: int = 0):
    from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
    from diffusers.guiders import ClassifierFreeGuidance

    vae = _forked(seed + 1, lambda: AutoencoderKLHunyuanVideo15(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16), layers_per_block=1,
        spatial_compression_ratio=4, temporal_compression_ratio=2, downsample_match_channel=False,
        upsample_match_channel=False).eval())  # fmt: skip
    return HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=hunyuan_video15_transformer(seed),
                                  vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                  tokenizer_2=None, guider=ClassifierFreeGuidance(guidance_scale=6.0))  # fmt: skip


def hunyuan_video15_generate(pipe, steps: int, cfg: bool = True, **kw):
    """cfg False: the guider at scale 1, which runs the conditional branch alone."""
    pipe.guider.guidance_scale = 6.0 if cfg else 1.0
    return pipe(prompt_embeds=_randn(1, 7, TEXT_DIM, seed=2), prompt_embeds_mask=_mask(7, 5),
                prompt_embeds_2=_randn(1, 5, TEXT_2_DIM, seed=4), prompt_embeds_mask_2=_mask(5, 4),
                negative_prompt_embeds=_randn(1, 7, TEXT_DIM, seed=3), negative_prompt_embeds_mask=_mask(7, 2),
                negative_prompt_embeds_2=_randn(1, 5, TEXT_2_DIM, seed=5), negative_prompt_embeds_mask_2=_mask(5, 1),
                height=16, width=16, num_frames=9, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kw).frames  # fmt: skip


def hunyuan_video15_call(seed: int = 1) -> dict:
    return dict(hidden_states=_randn(1, 9, 3, 4, 4, seed=seed), timestep=torch.tensor([700.0]),
                encoder_hidden_states=_randn(1, 7, TEXT_DIM, seed=2), encoder_attention_mask=_mask(7, 5),
                encoder_hidden_states_2=_randn(1, 5, TEXT_2_DIM, seed=4), encoder_attention_mask_2=_mask(5, 4),
                image_embeds=torch.zeros(1, 6, IMAGE_EMBED_DIM), return_dict=False)  # fmt: skip


# -- FramePack (HunyuanVideo image to video in sections) -------------------------------------------------------

SIGLIP_DIM = 32


def hunyuan_video_framepack_transformer(seed: int = 0, **config):
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    # The released checkpoints' configuration: image projection and history embedders on (the forward needs both).
    args = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
                num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
                text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, rope_axes_dim=(2, 4, 4),
                has_image_proj=True, image_proj_dim=SIGLIP_DIM, has_clean_x_embedder=True)  # fmt: skip
    return _forked(seed, lambda: HunyuanVideoFramepackTransformer3DModel(**{**args, **config}).eval())


def hunyuan_video_framepack_pipeline(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    image_encoder = _forked(seed + 2, lambda: SiglipVisionModel(SiglipVisionConfig(
        hidden_size=SIGLIP_DIM, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=30,
        patch_size=6)).eval())  # fmt: skip
    return HunyuanVideoFramepackPipeline(
        text_encoder=None, tokenizer=None, transformer=hunyuan_video_framepack_transformer(seed), vae=_vae(seed + 1),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None,
        image_encoder=image_encoder, feature_extractor=SiglipImageProcessor(size={"height": 30, "width": 30}),
    )  # fmt: skip


def hunyuan_video_framepack_generate(pipe, steps: int, cfg: bool = False, **kw):
    """Two sections of 3 latent frames each (num_frames 17, latent_window_size 3); cfg: true CFG (4.0)."""
    from PIL import Image

    cond, uncond = conditioning(2), conditioning(3)
    prompt = dict(prompt_embeds=cond["encoder_hidden_states"], prompt_attention_mask=cond["encoder_attention_mask"],
                  pooled_prompt_embeds=cond["pooled_projections"])  # fmt: skip
    if cfg:
        prompt.update(negative_prompt_embeds=uncond["encoder_hidden_states"], true_cfg_scale=4.0,
                      negative_prompt_attention_mask=uncond["encoder_attention_mask"],
                      negative_pooled_prompt_embeds=uncond["pooled_projections"])  # fmt: skip
    out = pipe(image=Image.new("RGB", (32, 32), (120, 80, 40)), **prompt, guidance_scale=6.0, height=32, width=32,
               num_frames=17, latent_window_size=3, num_inference_steps=steps, output_type="latent",
               generator=torch.Generator().manual_seed(0), **kw).frames  # fmt: skip
    return out[0] if isinstance(out, (list, tuple)) else out
