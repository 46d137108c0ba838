"""Wan 2.1 / 2.2 (WanTransformer3DModel): the authors' TeaCache4Wan2.1, both of its modes.

The mode is the coefficient set's (coefficients.py): a set carries its signal and its forced calls.
- default mode (`wan2.1-*` sets; the script's default, `use_ret_steps` off): the signal is the time
  embedding `e` before `time_projection`: diffusers' `temb`, the first output of `condition_embedder`,
  which the blocks never see (they get the projection): the family captures it there (`captures`).
  The first and the last step compute.
- ret mode (`wan2.1-*-ret` sets, `use_ret_steps`): the signal is `e0 = time_projection(e)`, the
  `timestep_proj` the blocks receive as `temb`. The first 5 steps compute, the last one does not have to.
- CFG: the original counts cond and uncond calls in one counter and keeps one state per parity (even:
  cond, odd: uncond), `num_steps = 2 x sample_steps`; its forced counters {0, 1, 2N-2, 2N-1} (default)
  and {0..9} (ret) are those steps of each branch. diffusers' Wan pipelines call each branch under
  `cache_context("cond"/"uncond")`: one state per context is that, exactly. WanPipeline also passes
  `step_index` (and `num_inference_steps`): the state's step is set from it (install.py), so a
  generation's start and its forced calls never depend on counting alone.
- the residual is taken over all blocks, before the head (`norm_out` and the `scale_shift_table`
  modulation), on the video tokens: Wan's blocks do not update the text stream.

Wan 2.2's two-stage pipelines (`transformer` for the high-noise steps, `transformer_2` for the rest,
switching at `boundary_ratio`): `enable_teacache(pipe)` enables both, each with its own states and its own
step count, the steps it runs (follow.py); its first call is step 0 of its share. The authors published no
Wan 2.2 coefficients: enabling one needs `coefficients=` (a Wan 2.1 set, or a calibration file).

Default coefficients from the config: hidden size 1536 -> 1.3B, 5120 -> 14B; an image embedder
(`image_dim`) -> I2V. Wan 2.1 I2V-14B-480P and -720P have the same config: the default is 480P (the
authors' first I2V set); `coefficients="wan2.1-i2v-14b-720p"` for the 720P checkpoint.

Not served: WanVACETransformer3DModel adds control hints after some blocks inside its own block loop
(state a cached span cannot see), and the Wan-Animate transformers have no published TeaCache; both are
refused by name (models/__init__.py, `REFUSED`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import ModelFamily

_HIDDEN_1_3B, _HIDDEN_14B = 1536, 5120


def _default_coefficients(transformer: nn.Module, pipeline: Any) -> str:
    config = transformer.config
    hidden = config.num_attention_heads * config.attention_head_dim
    two_stage = pipeline is not None and (
        getattr(pipeline, "transformer_2", None) is not None or getattr(pipeline.config, "boundary_ratio", None) is not None
    )
    if two_stage or hidden not in (_HIDDEN_1_3B, _HIDDEN_14B):
        what = "a two-stage (Wan 2.2) pipeline" if two_stage else f"a Wan transformer of hidden size {hidden}"
        raise ValueError(
            f"TeaCache has no published coefficients for {what}: the authors fitted Wan 2.1 (1.3B, 14B) only. Give "
            "coefficients= (a Wan 2.1 set, e.g. 'wan2.1-t2v-14b' or 'wan2.1-i2v-720p-ret'; vLLM-Omni starts Wan 2.2 from "
            "the T2V-14B one) or a coefficients_file= written by `python -m teacache_kernels calibrate`"
        )
    if hidden == _HIDDEN_1_3B:
        return "wan2.1-t2v-1.3b"
    return "wan2.1-i2v-14b-480p" if config.image_dim is not None else "wan2.1-t2v-14b"


WAN = ModelFamily(
    name="wan",
    class_names=("WanTransformer3DModel",),
    block_lists=("blocks",),
    signals={
        "timestep_embedding": lambda block, call: call["timestep_embedding"],  # e (default mode)
        "timestep_projection": lambda block, call: call["temb"],  # e0 = time_projection(e) (ret mode)
    },
    captures={"timestep_embedding": ("condition_embedder", 0)},  # (temb, timestep_proj, text, image)[0]
    default_coefficients=_default_coefficients,
)
