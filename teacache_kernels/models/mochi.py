"""Mochi (MochiTransformer3DModel): the authors' TeaCache4Mochi.

- signal: `transformer_blocks[0].norm1(hidden_states, temb)[0]`;
- one state: MochiPipeline batches cond and uncond into one call (`cache_context("cond_uncond")`);
- first and last calls computed;
- the image stream's residual is taken **after `norm_out`**, as the original does (computed: `norm_out(blocks(h)) - h`;
  reused: `h + residual`, then `proj_out`). The span runs `norm_out` itself as its last step, and while
  TeaCache is on the transformer's own `norm_out` call passes the stream through (family `tail`).
diffusers' Mochi attention calls `torch.nonzero` (a data-dependent shape): `torch._dynamo.explain` reports
graph breaks there even on the plain model, while `torch.compile(fullgraph=True)` compiles it whole (it
captures data-dependent shapes). Inside the span's torch.cond branch such an op cannot become a graph
break, so while a Mochi model has TeaCache on, `capture_dynamic_output_shape_ops` is on for every compile
(as fullgraph=True has it): the cached model then compiles in one graph either way.
"""

from __future__ import annotations

from .base import ModelFamily

MOCHI = ModelFamily(
    name="mochi",
    class_names=("MochiTransformer3DModel",),
    block_lists=("transformer_blocks",),
    signals={"modulated_input": lambda block, call: block.norm1(call["hidden_states"], call["temb"])[0]},
    streams=("hidden_states", "encoder_hidden_states"),
    cached=("hidden_states",),
    default_coefficients="mochi",
    tail=("norm_out", ("temb",)),
    dynamo_config={"capture_dynamic_output_shape_ops": True},
)
