"""FLUX (FluxTransformer2DModel): FLUX.1-dev/schnell, FLUX.1-Kontext, TangoFlux, any calibrated FLUX.

The span is both block lists: the double-stream blocks, then the single-stream blocks (same call
convention: they take and return both streams). The signal is what the original TeaCache4FLUX compares:
block 0's `norm1(hidden_states, emb=temb)[0]`, the image stream's modulated input; or `temb` itself when a
calibration file says the timestep embedding is the better predictor for that model (no extra GEMV, but
blind to the image). The residual is cached on the image stream only: after the single blocks FLUX's
forward uses nothing but `hidden_states`, so the span returns the text stream as it came in.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import ModelFamily


def _default_coefficients(transformer: nn.Module, pipeline: Any) -> str:
    # FLUX and FLUX-Kontext share the transformer class: only the pipeline tells them apart.
    if pipeline is not None and "Kontext" in type(pipeline).__name__:
        return "flux-kontext"
    return "flux"


def _unsupported_input(args: tuple, kwargs: dict) -> str | None:
    for name in ("controlnet_block_samples", "controlnet_single_block_samples"):
        if kwargs.get(name) is not None:
            return f"{name} (ControlNet residuals are added per block, inside the cached span)"
    jak = kwargs.get("joint_attention_kwargs")
    if jak is not None and "ip_adapter_image_embeds" in jak:
        return "joint_attention_kwargs['ip_adapter_image_embeds'] (IP-Adapter)"
    return None


FLUX = ModelFamily(
    name="flux",
    class_names=("FluxTransformer2DModel",),
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    signals={
        "modulated_input": lambda block, call: block.norm1(call["hidden_states"], emb=call["temb"])[0],
        "timestep_embedding": lambda block, call: call["temb"],
    },
    streams=("hidden_states", "encoder_hidden_states"),
    returns=("encoder_hidden_states", "hidden_states"),
    cached=("hidden_states",),
    default_coefficients=_default_coefficients,
    unsupported_input=_unsupported_input,
)
