"""FLUX (FluxTransformer2DModel): FLUX.1-dev/schnell, FLUX.1-Kontext, TangoFlux, any calibrated FLUX.

The span is both block lists: 19 double-stream blocks, then 38 single-stream blocks. The signal is
what the original TeaCache4FLUX compares: block 0's `norm1(hidden_states, emb=temb)[0]`, the image
stream's modulated input; or `temb` itself when a calibration file says the timestep embedding is the
better predictor for that model (no extra GEMV, but blind to the image). The residual is cached on the
image stream only: after the single blocks FLUX's forward uses nothing but `hidden_states`, so the span
returns the text stream as it came in.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..block_list import original_blocks
from .base import ModelFamily


class FluxBlockSpan(nn.Module):
    """FLUX's double and single blocks as one cached unit (called once, like a double block).

    Not registered in the transformer: iterating `transformer_blocks` yields it (see install.py).
    """

    def __init__(self, transformer_blocks: nn.ModuleList, single_transformer_blocks: nn.ModuleList, *, cache):
        super().__init__()
        self.transformer_blocks = transformer_blocks
        self.single_transformer_blocks = single_transformer_blocks
        self.cache = cache  # a FusedCache or a ReferenceCache: plain object, never in state_dict

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache.signal == "timestep_embedding":  # a Python string: static under compile
            signal = temb
        else:
            signal = self.transformer_blocks[0].norm1(hidden_states, emb=temb)[0]
        rope = tuple(image_rotary_emb) if image_rotary_emb is not None else ()

        def full(h, e, temb, *rope):
            kwargs = dict(temb=temb, image_rotary_emb=rope or None, joint_attention_kwargs=joint_attention_kwargs)
            for block in original_blocks(self.transformer_blocks):
                e, h = block(hidden_states=h, encoder_hidden_states=e, **kwargs)
            for block in original_blocks(self.single_transformer_blocks):
                e, h = block(hidden_states=h, encoder_hidden_states=e, **kwargs)
            return (h,)

        operands = (hidden_states, encoder_hidden_states, temb, *rope)
        (hidden_states,) = self.cache.run(signal, (hidden_states,), full, operands)
        return encoder_hidden_states, hidden_states


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
    span_class=FluxBlockSpan,
    default_coefficients=_default_coefficients,
    unsupported_input=_unsupported_input,
)
