"""Cosmos (CosmosTransformer3DModel): the authors' TeaCache4Cosmos, for Cosmos-1.0-Diffusion-7B Text2World / Video2World.

What the original does (ali-vilab/TeaCache 7c10efc, TeaCache4Cosmos/teacache_sample_video_{t2v,i2v}.py, on
NVIDIA's cosmos1 GeneralDIT), and how the span reproduces it:
- signal: block 0's self-attention adaLN input, `transformer_blocks[0].norm1(hidden_states, embedded_timestep,
  temb)[0]`. The original: `adaln_norm_state(blocks["block0"].blocks[0].norm_state, x, scale, shift)` with
  `shift, scale, _ = (adaLN_modulation(affline_emb_B_D) + adaln_lora_B_3D).chunk(3)`: the same LayerNorm (no
  affine, eps 1e-6), the same SiLU-Linear-Linear modulation of the RMS-normed timestep embedding plus the adaLN
  LoRA term (diffusers' `temb`). It takes `x` before block 0 adds the learnable per-block position embedding;
  diffusers' block adds `extra_pos_emb` inside itself, so the span's `hidden_states` is that same `x`.
- two states: the original counts every call with one counter and alternates, even calls cond and odd calls
  uncond (its sampler's `x0_fn` calls cond then uncond), each with its own accumulator, previous signal and
  residual. Here: one state per `cache_context`, "cond" and "uncond". (Both branches see the same latents and
  timestep, so the same signal and the same decisions; what must stay apart is the residual.)
- forced: the first and last call of each branch (the original: cnt 0 and num_steps for even, 1 and num_steps+1
  for odd, num_steps = 2 * steps, its sampler evaluating the model steps + 1 times per generation).
- residual: the image stream over all blocks, before `norm_out` (the original: `x - ori_x` before `decoder_head`).

What diffusers 0.42.1 lacks for the rest: none of the pipelines that run this class (CosmosTextToWorld,
CosmosVideoToWorld, Cosmos2TextToImage, Cosmos2VideoToWorld, Cosmos2_5_PredictBase, Cosmos2_5_Transfer)
enters `transformer.cache_context` around its cond and uncond calls (the class has no CacheMixin), and nothing
in the calls tells the branches apart: same shapes, same latents and timestep, hence the same signal. One state
would compare each uncond call with the cond call just before it (distance 0) and could hand it the cond
branch's residual. So:
- `enable_teacache(pipeline)` refuses (NotImplementedError, before anything is installed) when the pipeline's
  `__call__` never enters `cache_context` (`unsupported_pipeline`);
- an enabled transformer called outside any `cache_context` refuses the call (NotImplementedError);
- a loop of your own that calls the enabled transformer in `transformer.cache_context("cond")` and
  `("uncond")` is served exactly (the installation gives the class a `cache_context`), with
  `enable_teacache(transformer, num_inference_steps=...)` and `reset_teacache` per generation.

Coefficients: the published set "cosmos-7b" is the default for the 7B configuration (4096 channels, 28 blocks:
Cosmos-1.0-Diffusion-7B-Text2World and -Video2World; the authors' i2v script uses the same polynomial).
Other sizes (Cosmos-1.0 14B, Cosmos-Predict2 2B/14B, Cosmos-Predict2.5 2B) have no default: give `coefficients=`
or `coefficients_file=`. The authors' scripts accept the 14B checkpoints with the 7B polynomial hard-coded but
publish and measure only 7B; Predict2 and 2.5 are flow-matching models with another timestep parametrisation,
on which the 7B fit has no claim. `coefficients="cosmos-7b"` on a 14B model does what the authors' script does.
ControlNet residuals (Cosmos-Transfer2.5, `block_controlnet_hidden_states`) are added between blocks inside the
span: refused by name.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .base import BlockSpan, ModelFamily

_7B = dict(channels=4096, layers=28)  # Cosmos-1.0-Diffusion-7B (FADITV2_7B: model_channels 4096, num_blocks 28)


def _enters_cache_context(pipeline: Any) -> bool:
    # Read the pipeline's own code: a later diffusers (or a subclass) that tags its branches is served.
    try:
        return "cache_context(" in inspect.getsource(type(pipeline).__call__)
    except (OSError, TypeError):  # no source to read: assume it does not
        return False


def _unsupported_pipeline(pipeline: Any) -> str | None:
    if _enters_cache_context(pipeline):
        return None
    return (
        "it calls the transformer for the cond and the uncond branch without transformer.cache_context(...), so the "
        "two branches (same latents, same timestep) cannot keep the separate states the original TeaCache4Cosmos "
        "keeps. Enable TeaCache on the bare transformer (num_inference_steps=...) and call it in "
        "transformer.cache_context('cond') and ('uncond') from a loop of your own"
    )


def _default_coefficients(transformer: nn.Module, pipeline: Any) -> str | None:
    config = transformer.config
    if config.num_attention_heads * config.attention_head_dim == _7B["channels"] and config.num_layers == _7B["layers"]:
        return "cosmos-7b"
    return None


def _unsupported_input(args: tuple, kwargs: dict) -> str | None:
    controlnet = kwargs.get("block_controlnet_hidden_states", args[3] if len(args) > 3 else None)
    if controlnet is not None:
        return "block_controlnet_hidden_states (ControlNet residuals are added between blocks, inside the cached span)"
    return None


class CosmosSpan(BlockSpan):
    """The generic span, refusing calls made outside a cache context (the branches would share one state)."""

    def forward(self, *args, **kwargs):
        if self.cache.active == "default":
            raise NotImplementedError(
                "TeaCache for CosmosTransformer3DModel keeps one state per CFG branch, as TeaCache4Cosmos does, and "
                "learns the branch from transformer.cache_context(...), which diffusers' Cosmos pipelines do not "
                "enter: call the transformer in transformer.cache_context('cond') (and 'uncond' for the negative "
                "prompt), or disable TeaCache"
            )
        return super().forward(*args, **kwargs)


COSMOS = ModelFamily(
    name="cosmos",
    class_names=("CosmosTransformer3DModel",),
    block_lists=("transformer_blocks",),
    signals={
        "modulated_input": lambda block, call: block.norm1(
            call["hidden_states"], call["embedded_timestep"], call["temb"]
        )[0]
    },
    default_coefficients=_default_coefficients,
    unsupported_input=_unsupported_input,
    unsupported_pipeline=_unsupported_pipeline,
    span_class=CosmosSpan,
)
