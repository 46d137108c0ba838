"""Tiny random-weight diffusers models and pipelines, for the demo, the examples' `--tiny` and the tests.

Real diffusers classes built from small configs, so every code path is the real one; nothing downloads.
Random weights exercise the mechanics (schedules, state, compile); they say nothing about image quality.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TinyFluxShape:
    layers: int = 2  # double-stream blocks
    single_layers: int = 2  # single-stream blocks
    heads: int = 2
    head_dim: int = 16  # a multiple of 16: rotary axes get 1/4, 3/8, 3/8 of it
    in_channels: int = 16  # latent channels x 2 x 2 (FLUX packs 2x2 patches)
    text_dim: int = 32
    pooled_dim: int = 32
    text_len: int = 8
    height: int = 16  # latent height and width before packing: image tokens = (height/2) * (width/2)
    width: int = 16

    @property
    def image_tokens(self) -> int:
        return (self.height // 2) * (self.width // 2)


def tiny_flux_transformer(shape: TinyFluxShape = TinyFluxShape(), seed: int = 0, dtype=torch.float32):
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=shape.in_channels,
            num_layers=shape.layers,
            num_single_layers=shape.single_layers,
            attention_head_dim=shape.head_dim,
            num_attention_heads=shape.heads,
            joint_attention_dim=shape.text_dim,
            pooled_projection_dim=shape.pooled_dim,
            axes_dims_rope=(shape.head_dim // 4, 3 * shape.head_dim // 8, 3 * shape.head_dim // 8),
        )
    # .to() only when needed: diffusers warns on any dtype cast of a model built in float32.
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def flux_inputs(shape: TinyFluxShape = TinyFluxShape(), seed: int = 1, batch: int = 1, dtype=torch.float32, device="cpu"):
    """(initial noise latents, conditioning kwargs) for a FLUX transformer call, deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, shape.image_tokens, shape.in_channels, generator=g)
    cond = dict(
        encoder_hidden_states=torch.randn(batch, shape.text_len, shape.text_dim, generator=g).to(device, dtype),
        pooled_projections=torch.randn(batch, shape.pooled_dim, generator=g).to(device, dtype),
        img_ids=_image_ids(shape).to(device),
        txt_ids=torch.zeros(shape.text_len, 3, device=device),
    )
    return latents.to(device, dtype), cond


def _image_ids(shape: TinyFluxShape) -> torch.Tensor:
    h, w = shape.height // 2, shape.width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


@torch.no_grad()
def flow_matching_loop(transformer, latents, cond, num_steps: int, *, negative=None, cfg_scale: float = 1.0):
    """Euler steps from t=1 to t=0 on the FLUX velocity, as FluxPipeline does (without the scheduler's shift).

    With `negative` conditioning, each step calls the transformer in the "cond" and "uncond" cache
    contexts and mixes them (true CFG), as FluxPipeline does. Returns the final latents.
    `transformer` may be a compiled module; cache contexts are entered on it.
    """
    x = latents.clone()
    ts = torch.linspace(1.0, 0.0, num_steps + 1, device=x.device)
    for i in range(num_steps):
        t = ts[i : i + 1].to(x.dtype)
        with transformer.cache_context("cond"):
            v = transformer(hidden_states=x, timestep=t, return_dict=False, **cond)[0]
        if negative is not None:
            with transformer.cache_context("uncond"):
                v_neg = transformer(hidden_states=x, timestep=t, return_dict=False, **negative)[0]
            v = v_neg + cfg_scale * (v - v_neg)
        x = x + (ts[i + 1] - ts[i]).to(x.dtype) * v
    return x


def tiny_flux_pipeline(shape: TinyFluxShape = TinyFluxShape(), seed: int = 0, dtype=torch.float32, pipeline_class=None):
    """A real FluxPipeline (or `pipeline_class`) from a tiny transformer and a tiny VAE.

    The text encoders and tokenizers are left out: call it with `prompt_embeds` / `pooled_prompt_embeds`
    (see `tiny_flux_prompt`). Generate at height = width = 2 * shape.height pixels.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),  # two levels: the VAE downsamples by 2
            latent_channels=shape.in_channels // 4,
            norm_num_groups=4,
            sample_size=2 * shape.height,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=0.3611,  # FLUX.1's VAE values: FluxPipeline decodes with both
            shift_factor=0.1159,
        )
    cls = pipeline_class or FluxPipeline
    return cls(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae if dtype == torch.float32 else vae.to(dtype),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=tiny_flux_transformer(shape, seed, dtype),
    )


def tiny_flux_prompt(shape: TinyFluxShape = TinyFluxShape(), seed: int = 2, dtype=torch.float32) -> dict:
    """prompt_embeds and pooled_prompt_embeds standing in for an encoded prompt."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=torch.randn(1, shape.text_len, shape.text_dim, generator=g).to(dtype),
        pooled_prompt_embeds=torch.randn(1, shape.pooled_dim, generator=g).to(dtype),
    )
