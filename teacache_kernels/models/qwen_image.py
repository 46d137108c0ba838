"""Qwen-Image (QwenImageTransformer2DModel): Qwen-Image, -Edit, -Edit-Plus, -Layered.

The algorithm is vLLM-Omni's TeaCache (vllm_omni/diffusion/cache/teacache/), as the issue that asked for
this family specifies, with the vLLM-Omni guide's forced calls:
- signal: block 0's image-stream modulated input, `_modulate(img_norm1(h), img_mod(temb).chunk(2)[0])[0]`
  (with the block's own `modulate_index`, which the Edit-2511 `zero_cond_t` models pass; vLLM-Omni's
  later extractor passes it too);
- the `qwen-image` set accumulates |poly(x)| with x = mean|d| / (mean|prev| + 1e-8) (a property of the set);
- state per CFG context (the pipelines call `cache_context("cond")` / `("uncond")`);
- the first and last calls compute (the guide; vLLM-Omni's code forces only the first);
- the residuals of both streams are cached, over all blocks, before `norm_out`.
Edit pipelines concatenate the condition image's latents to the sequence: they are part of the signal,
as in vLLM-Omni (its extractor runs after `img_in` on the joint image stream).
"""

from __future__ import annotations

from .base import ModelFamily


def _signal(block, call):
    img_mod1 = block.img_mod(call["temb"]).chunk(2, dim=-1)[0]
    return block._modulate(block.img_norm1(call["hidden_states"]), img_mod1, call.get("modulate_index"))[0]


def _unsupported_input(args: tuple, kwargs: dict) -> str | None:
    if kwargs.get("controlnet_block_samples") is not None:
        return "controlnet_block_samples (ControlNet residuals are added between blocks, inside the cached span)"
    return None


QWEN_IMAGE = ModelFamily(
    name="qwen-image",
    class_names=("QwenImageTransformer2DModel",),
    block_lists=("transformer_blocks",),
    signals={"modulated_input": _signal},
    streams=("hidden_states", "encoder_hidden_states"),
    returns=("encoder_hidden_states", "hidden_states"),
    cached=("hidden_states", "encoder_hidden_states"),
    default_coefficients="qwen-image",
    unsupported_input=_unsupported_input,
)
