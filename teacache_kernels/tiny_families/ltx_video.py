"""A tiny random-weight LTX-Video: LTXVideoTransformer3DModel, AutoencoderKLLTXVideo and the real LTXPipeline.

The pipeline batches uncond and cond into one transformer call per step (`cache_context("cond_uncond")`).
One departure from plain random weights, for the schedules' sake: the output projection (the velocity) and
the last layer of the timestep embedder are scaled by `SLOW`. With diffusers' default init, block 0's modulated
input moves 6-10% a call over 8 steps (the latents by the random velocity, the modulation by the timestep),
so the published set at its own threshold (0.05) would compute every call; scaled, it moves 2-3% a call and
that threshold computes some calls and reuses others. It is still a random model: mechanics, not quality.
"""

from __future__ import annotations

import torch

from .common import _forked, _mask, _randn

TEXT_DIM = 16  # caption_channels: what the prompt embeddings carry
SLOW = 0.3


def transformer(seed: int = 0, **config):
    from diffusers import LTXVideoTransformer3DModel

    # cross_attention_dim must be the inner dim (2 x 8): attn2 reads the caption projection's output.
    args = dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=TEXT_DIM)  # fmt: skip

    def build():
        model = LTXVideoTransformer3DModel(**{**args, **config}).eval()
        with torch.no_grad():
            timestep_out = model.time_embed.emb.timestep_embedder.linear_2
            for p in (model.proj_out.weight, model.proj_out.bias, timestep_out.weight):
                p.mul_(SLOW)
        return model

    return _forked(seed, build)


def pipeline(seed: int = 0):
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline

    # Spatial and temporal compression 8 (three scaling stages, patch 1): 17 frames of 32 x 32 -> 3 x 4 x 4 latents.
    vae = _forked(seed + 1, lambda: AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False), decoder_spatio_temporal_scaling=(True, True, True, False),
        patch_size=1, patch_size_t=1).eval())  # fmt: skip
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                       transformer=transformer(seed))  # fmt: skip


def generate(pipe, steps: int, cfg: bool = True, **kw):
    """Final latents, packed as the pipeline keeps them: (batch, tokens, channels). cfg=False: guidance_scale 1,
    one conditional call per step (still in the pipeline's "cond_uncond" context)."""
    kw = {"height": 32, "width": 32, "num_frames": 17, **kw}
    return pipe(prompt_embeds=_randn(1, 8, TEXT_DIM, seed=2), prompt_attention_mask=_mask(8, 5),
                negative_prompt_embeds=_randn(1, 8, TEXT_DIM, seed=3), negative_prompt_attention_mask=_mask(8, 2),
                guidance_scale=3.0 if cfg else 1.0, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kw).frames  # fmt: skip


def transformer_call(seed: int = 1) -> dict:
    # Batch 2 (uncond, cond), 3 x 4 x 4 latent tokens, as the pipeline calls it.
    mask = torch.cat([_mask(8, 2), _mask(8, 5)])
    return dict(hidden_states=_randn(2, 48, 8, seed=seed), encoder_hidden_states=_randn(2, 8, TEXT_DIM, seed=seed + 1),
                timestep=torch.tensor([700.0, 700.0]), encoder_attention_mask=mask, num_frames=3, height=4, width=4,
                rope_interpolation_scale=(8 / 25, 8, 8), return_dict=False)  # fmt: skip
