"""Class-conditional sampling from the embedded model: Euler steps on the flow-matching velocity.

The same loop FluxPipeline runs (sigmas from 1 to 0, `x += (sigma_next - sigma) * v`), with true
classifier-free guidance: the conditional and unconditional calls run in the "cond" and "uncond"
cache contexts, which is where TeaCache and diffusers' caches keep per-branch state.
"""

from __future__ import annotations

from typing import Callable

import torch

from .model import CHANNELS, NULL_CLASS, TOKENS, conditioning, unpack

NUM_STEPS = 30  # the demo's and the calibration's step count
GUIDANCE_SCALE = 2.0


def initial_noise(batch: int, seed: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Deterministic in `seed` alone, on any device (drawn on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TOKENS, CHANNELS, generator=g).to(device=device, dtype=dtype)


@torch.no_grad()
def generate(
    transformer,
    labels,
    *,
    seed: int = 0,
    num_steps: int = NUM_STEPS,
    guidance_scale: float = GUIDANCE_SCALE,
    noise: torch.Tensor | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Images [B, 8, 8] in [-1, 1] for digit `labels`; `transformer` may be compiled or cached.

    `guidance_scale` 1 skips the unconditional branch. `on_step(i, latents)` runs after each step.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if guidance_scale < 1:
        raise ValueError(f"guidance_scale must be at least 1 (1 turns guidance off), got {guidance_scale}")
    labels = torch.as_tensor(labels, dtype=torch.long)
    param = next(transformer.parameters())
    dtype, device = param.dtype, param.device
    labels = labels.to(device)
    x = initial_noise(len(labels), seed, dtype, device) if noise is None else noise.to(device, dtype).clone()
    cond = conditioning(labels, dtype)
    uncond = conditioning(torch.full_like(labels, NULL_CLASS), dtype)
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1)
    for i in range(num_steps):
        t = torch.full((len(labels),), float(sigmas[i]), dtype=dtype, device=device)
        with transformer.cache_context("cond"):
            v = transformer(hidden_states=x, timestep=t, return_dict=False, **cond)[0]
        if guidance_scale != 1:
            with transformer.cache_context("uncond"):
                v_uncond = transformer(hidden_states=x, timestep=t, return_dict=False, **uncond)[0]
            v = v_uncond + guidance_scale * (v - v_uncond)
        x = x + float(sigmas[i + 1] - sigmas[i]) * v
        if on_step is not None:
            on_step(i, x)
    return unpack(x.float()).clamp(-1, 1)
