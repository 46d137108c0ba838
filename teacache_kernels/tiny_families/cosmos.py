"""Tiny random-weight Cosmos models (diffusers CosmosTransformer3DModel, CosmosTextToWorldPipeline).

The transformer follows diffusers' own test (tests/pipelines/cosmos/test_cosmos.py) with heads of 12 channels
(the rotary embedding splits a head into t/h/w parts of 4), the learnable per-block position embedding of
Cosmos-1.0, and `concat_padding_mask=False`: the padding-mask channel is resized with torchvision, which this
environment lacks (it only adds an input channel before the blocks). The pipeline has no text encoder and is
called with prompt embeddings and `output_type="latent"`.

Not in `TINY`: TeaCache refuses diffusers' Cosmos pipelines (they call cond and uncond without
`cache_context`, see models/cosmos.py), so `cosmos_loop` runs CosmosTextToWorldPipeline's denoising loop on the
bare transformer, each branch in its cache context. tests/test_cosmos.py checks that the loop and the
pipeline give the same latents, bit for bit.
"""

from __future__ import annotations

import contextlib

import torch

from .common import _forked, _randn

Z = 4  # latent channels of the tiny VAE (the real one has 16)
TEXT_DIM = 16
TEXT_LEN = 8
LATENT_SHAPE = (1, Z, 3, 8, 8)  # 9 frames of 32 x 32 through the tiny VAE (x4 in time and space)
GUIDANCE = 7.0  # the pipeline's default guidance_scale


def cosmos_transformer(seed: int = 0, **config):
    from diffusers import CosmosTransformer3DModel

    args = dict(in_channels=Z, out_channels=Z, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2,
                text_embed_dim=TEXT_DIM, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2),
                concat_padding_mask=False, extra_pos_embed_type="learnable")  # fmt: skip
    return _forked(seed, lambda: CosmosTransformer3DModel(**{**args, **config}).eval())


def cosmos_scheduler():
    from diffusers import EDMEulerScheduler

    # The scheduler config of nvidia/Cosmos-1.0-Diffusion-7B-Text2World (and of diffusers' test).
    return EDMEulerScheduler(sigma_min=0.002, sigma_max=80, sigma_data=0.5, sigma_schedule="karras", num_train_timesteps=1000,
                             prediction_type="epsilon", rho=7.0, final_sigmas_type="sigma_min")  # fmt: skip


def _unused_safety_checker():
    from diffusers import ConfigMixin, ModelMixin

    class UnusedSafetyChecker(ModelMixin, ConfigMixin):
        """Cosmos pipelines refuse to run without a safety checker, and the real one (cosmos_guardrail) is
        gigabytes. Called with prompt embeddings and output_type="latent" the pipeline only moves it between
        devices: this holds a buffer for that, and nothing else (a safety check would fail, AttributeError)."""

        def __init__(self):
            super().__init__()
            self.register_buffer("device_tracker", torch.zeros(1), persistent=False)

    return UnusedSafetyChecker()


def cosmos_pipeline(seed: int = 0):
    from diffusers import AutoencoderKLCosmos, CosmosTextToWorldPipeline

    vae = _forked(seed + 1, lambda: AutoencoderKLCosmos(
        in_channels=3, out_channels=3, latent_channels=Z, encoder_block_out_channels=(8, 8, 8, 8),
        decode_block_out_channels=(8, 8, 8, 8), attention_resolutions=(8,), resolution=64, num_layers=2, patch_size=4,
        patch_type="haar", scaling_factor=1.0, spatial_compression_ratio=4, temporal_compression_ratio=4).eval())  # fmt: skip
    pipe = CosmosTextToWorldPipeline(text_encoder=None, tokenizer=None, transformer=cosmos_transformer(seed), vae=vae,
                                     scheduler=cosmos_scheduler(), safety_checker=_unused_safety_checker())  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    return _randn(1, TEXT_LEN, TEXT_DIM, seed=2), _randn(1, TEXT_LEN, TEXT_DIM, seed=3)


def cosmos_generate(pipe, steps: int, cfg: bool = True, **kw):
    """One CosmosTextToWorldPipeline call -> final latents (uncached: TeaCache refuses the pipeline)."""
    cond, uncond = prompts()
    return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=GUIDANCE if cfg else 1.0, height=32,
                width=32, num_frames=9, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kw).frames  # fmt: skip


def _context(model, name: str):
    enter = getattr(model, "cache_context", None)  # the class has none; TeaCache's installation adds one
    return enter(name) if enter is not None else contextlib.nullcontext()


def cosmos_loop(model, steps: int, cfg: bool = True) -> torch.Tensor:
    """CosmosTextToWorldPipeline.__call__'s denoising loop (diffusers 0.42.1) on `model`, with the cond call in
    `cache_context("cond")` and the uncond call in `("uncond")` where the model has one. Final latents."""
    cond, uncond = prompts()
    scheduler = cosmos_scheduler()
    scheduler.set_timesteps(steps)
    latents = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(0)) * scheduler.config.sigma_max
    padding_mask = latents.new_zeros(1, 1, 32, 32)
    with torch.no_grad():
        for t in scheduler.timesteps:
            timestep = t.expand(latents.shape[0])
            x = scheduler.scale_model_input(latents, t)
            call = dict(hidden_states=x, timestep=timestep, fps=30, padding_mask=padding_mask, return_dict=False)
            with _context(model, "cond"):
                noise_pred = model(encoder_hidden_states=cond, **call)[0]
            sample = latents
            if cfg:
                with _context(model, "uncond"):
                    noise_pred_uncond = model(encoder_hidden_states=uncond, **call)[0]
                noise_pred = torch.cat([noise_pred_uncond, noise_pred])
                sample = torch.cat([sample, sample])
            noise_pred = scheduler.step(noise_pred, t, sample, return_dict=False)[1]  # x0
            scheduler._step_index -= 1
            if cfg:
                noise_pred_uncond, noise_pred_cond = noise_pred.chunk(2)
                noise_pred = noise_pred_cond + GUIDANCE * (noise_pred_cond - noise_pred_uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False, pred_original_sample=noise_pred)[0]
    return latents


def cosmos_call(seed: int = 1) -> dict:
    """Keyword arguments of one direct transformer call."""
    return dict(hidden_states=_randn(*LATENT_SHAPE, seed=seed), timestep=torch.tensor([0.5]),
                encoder_hidden_states=prompts()[0], fps=30, padding_mask=torch.zeros(1, 1, 32, 32), return_dict=False)  # fmt: skip
