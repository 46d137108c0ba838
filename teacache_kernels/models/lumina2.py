"""Lumina-Image-2.0 (Lumina2Transformer2DModel): the authors' TeaCache4Lumina2.

- signal: `layers[0].norm1(joint text+image tokens, temb)[0]`, the input of the main layers after the
  refiners (block 0's arguments);
- the span is `layers` (the refiners always run); the residual is the joint stream's, before `norm_out`;
- state is kept per joint sequence length, as the original keys its cache: Lumina2Pipeline calls the
  transformer for cond and uncond without a cache context, and the two differ in length (the negative
  prompt gets no system prompt);
- first and last calls computed. The original counts steps with one counter shared by all lengths, which
  advances only on calls whose length differs from the first call's. Whenever both branches run every step
  that gives each branch exactly the per-length step index this package uses (tested against a port of
  the original). It differs where one branch does not run every step: without CFG the original's counter
  never moves and nothing is ever cached; with `cfg_trunc_ratio < 1` it freezes, the last call is not
  forced and the next generation starts mid-count. Here each length counts its own calls, and a new
  generation (the pipeline's scheduler) resets them all; a branch that stops early (the truncated uncond)
  has no forced last call. Measured on the tiny pipeline (tests/test_fidelity.py): cfg_trunc_ratio=0.5
  computes 14 calls to the original's 13, 0.0063 from the uncached run against its 0.0758; without CFG,
  9/10 calls against the original's 10/10.
Sets: `lumina2` (fitted, the default) and `lumina2-v2` (tuned on LPIPS).
"""

from __future__ import annotations

from .base import ModelFamily

LUMINA2 = ModelFamily(
    name="lumina2",
    class_names=("Lumina2Transformer2DModel",),
    block_lists=("layers",),
    signals={"modulated_input": lambda block, call: block.norm1(call["hidden_states"], call["temb"])[0]},
    streams=("hidden_states",),
    default_coefficients="lumina2",
    state_key=lambda call: f"seq{call['hidden_states'].shape[1]}",
)
