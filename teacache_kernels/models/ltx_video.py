"""LTX-Video (LTXVideoTransformer3DModel): the authors' TeaCache4LTX-Video.

- signal: block 0's modulated input, `norm1(hidden_states) * (1 + scale_msa) + shift_msa` with
  `scale_shift_table[None, None] + temb.reshape(batch, temb.size(1), 6, -1)` (the original computes exactly
  what block 0 computes first, over the whole call: cond and uncond together);
- one state: LTXPipeline (and its image-to-video and condition pipelines) batches uncond and cond into one
  call (`cache_context("cond_uncond")`), as the original's one counter over calls assumes;
- the first and last calls compute (the original's `cnt == 0 or cnt == num_steps - 1`,
  `num_steps = num_inference_steps`);
- the residual is cached on the video stream only (`encoder_hidden_states` goes into every block unchanged).

One deviation, measured in tests/test_ltx_video.py: the original takes the residual **after** the final
`norm_out` and the modulation `* (1 + scale) + shift` (computed: `final(blocks(h)) - h`; reused: `h + residual`
straight into `proj_out`). Here it is taken before `norm_out` (computed: `blocks(h) - h`; reused: `h + residual`,
then `norm_out` and the modulation of this call's timestep). The family `tail` can run `norm_out` inside the span,
but the modulation is inline arithmetic in diffusers' forward, on `embedded_timestep`, which no block receives:
it would be applied a second time to the reused stream. Computed calls are the same in both; a reused call
differs by the final modulation of the current step instead of the cached step's.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ModelFamily


def _modulated_input(block: nn.Module, call: dict) -> torch.Tensor:
    # LTXVideoTransformerBlock.forward's first lines (the original copies them), stopped before attn1.
    hidden_states, temb = call["hidden_states"], call["temb"]
    table = block.scale_shift_table
    ada = table[None, None].to(temb.device) + temb.reshape(hidden_states.size(0), temb.size(1), table.shape[0], -1)
    shift_msa, scale_msa = ada[:, :, 0], ada[:, :, 1]
    return block.norm1(hidden_states) * (1 + scale_msa) + shift_msa


LTX_VIDEO = ModelFamily(
    name="ltx-video",
    class_names=("LTXVideoTransformer3DModel",),
    block_lists=("transformer_blocks",),
    signals={"modulated_input": _modulated_input, "timestep_embedding": lambda block, call: call["temb"]},
    streams=("hidden_states",),
    default_coefficients="ltx-video",
)
